"""The Lightning module shared by classification and segmentation.

``normalisation layer -> task network``, trained together. Task-specific pieces (network,
loss, metrics) live in small ``Task`` objects (:mod:`lstainnorm.tasks.classify`,
:mod:`lstainnorm.tasks.segment`); optimisation, schedules, template logging, augmentation
and skipped-file accounting are shared here.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from ..baselines.augment import create_augmentation
from ..config import config_from_dict
from ..layers.fusion import LStainNorm
from ..layers.model import NormalizedNetwork
from ..layers.template import Template
from ..runs import build_norm, resolve_template_setting
from .base import Task
from ..layers.model import norm_param_groups
from .build import lr_lambdas, warmup_lambdas
from .classify import ClassificationTask
from .seeding import seeded
from .segment import SegmentationTask

__all__ = ["StainNormModule", "TASKS"]

# ``task:`` in the config -> the Task that implements it.
TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "segmentation": SegmentationTask}


class StainNormModule(L.LightningModule):
    """A normalisation layer in front of a task network, as one LightningModule.

    Args:
        config: the resolved run config (a plain dict, saved in every checkpoint).
        classes: class names (classification) or ``["nucleus"]`` (segmentation).
        centres: centre names seen in the data (for per-centre metrics).
        template: the initial template (``Template.to_config()`` dict), ``"reference"`` or None.
        augment_stats: training-set stain statistics for RandStainNA (``data.augment``).
        class_weights: per-class weights of the classification loss (``data.balance: loss``).
    """

    def __init__(
        self,
        config: dict,
        classes: list[str],
        centres: list[str] | None = None,
        template: Any = None,
        augment_stats: dict | None = None,
        class_weights: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = config_from_dict(config)
        self.classes = list(classes)
        self.centres = list(centres or [])
        if isinstance(template, dict):
            tpl: Any = Template.from_config(template)
        elif template is not None:
            tpl = template
        else:
            tpl = resolve_template_setting(self.cfg.norm)
        self.task: Task = TASKS[self.cfg.task](self.cfg, self.classes, self.centres)
        if class_weights is not None:
            self.task.weight = torch.tensor(class_weights, dtype=torch.float32)  # type: ignore[attr-defined]
        # Each from its own stream (seeding.py): the layer's initial weights do not move the network's.
        with seeded(self.cfg.seed, "norm"):
            self.norm = build_norm(self.cfg.norm, tpl)
        with seeded(self.cfg.seed, "net"):
            self.net = self.task.build_net()
        self.model = NormalizedNetwork(self.net, self.norm)
        self.skipped: set[str] = set()
        self.augment = None
        mode = self.cfg.data.augment
        if mode and mode != "none":
            self.augment = create_augmentation(mode, self.cfg.data.augment_strength, augment_stats)
        # Classical normalisers are a fixed pre-processing step: applied before augmentation.
        self.preprocess = bool(getattr(self.norm, "preprocessing", False))

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def normalize(self, x: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
        """The layer on ``x``; ``stats``: a batch's pooled statistics ``{space: (mean, std)}`` (norm.stats_by)."""
        if stats is None:
            return self.norm(x)
        return self.norm(x, stats=stats if isinstance(self.norm, LStainNorm) else stats[self.norm.space.name])

    def model_for(self, batch: dict):
        """The model (a callable on images) as it runs on ``batch``: with the batch's pooled statistics (norm.stats_by) if it has them."""
        st = batch.get("stats")
        return self.model if st is None else (lambda x: self.net(self.normalize(x, st)))

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        o, n = self.cfg.optim, self.cfg.norm
        groups = [{"params": [p for p in self.net.parameters() if p.requires_grad], "lr": o.lr, "weight_decay": o.weight_decay, "name": "net"}]
        groups += norm_param_groups(self.norm, n.lr, n.weight_decay)
        opt = torch.optim.AdamW(groups, lr=o.lr)
        factors = lr_lambdas(self.cfg, groups)
        if o.warmup_epochs > 0 and self._trainer is not None:
            # Per optimiser step: the epoch schedules as they are, times a linear warmup.
            per_epoch = max(1, int(self.trainer.estimated_stepping_batches) // max(1, int(self.trainer.max_epochs or 1)))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambdas(factors, per_epoch, round(o.warmup_epochs * per_epoch)))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factors)
        # One step per epoch for every group (the reference stepped once per parameter tensor).
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch", "frequency": 1}}

    # -- steps ----------------------------------------------------------------------------------
    def _note_skipped(self, batch: dict) -> None:
        for p in batch.get("skipped", []):
            self.skipped.add(p)

    def training_step(self, batch: dict, batch_idx: int):
        self._note_skipped(batch)
        x = batch["image"]
        if x.shape[0] == 0:
            return None
        if self.preprocess:
            x = self.norm(x)  # cached; the flips below commute with per-image normalisation
        x, target = self.task.augment_pair(x, batch, self.cfg.seed, self.current_epoch, batch_idx)
        if self.augment is not None:
            x = self.augment(x, seed=(self.cfg.seed, self.current_epoch, batch_idx))
        out = self.net(x) if self.preprocess else self.model_for(batch)(x)
        loss = self.task.loss(out, target)
        if not torch.isfinite(loss.detach()):
            # Stop before the optimiser writes NaN into every weight; checkpoints so far stay good.
            raise FloatingPointError(
                f"non-finite training loss ({float(loss.detach()):g}) at epoch {self.current_epoch}, batch {batch_idx}: "
                "lower optim.lr or norm.lr, or with norm.compile on try norm.compile=false "
                "(the run folder keeps the checkpoints of the epochs before)"
            )
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        self._note_skipped(batch)
        if batch["image"].shape[0] == 0:
            return None
        # One view: the checkpoint is chosen without trainer.tta, so training does not depend on it.
        out = self.task.predict(self.model_for(batch), batch["image"], tta=False)
        loss = self.task.loss(out, self.task.target(batch))
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=False, batch_size=batch["image"].shape[0], sync_dist=True)
        self.task.update(out, batch)

    def on_validation_epoch_end(self) -> None:
        for k, v in self.task.compute().items():
            self.log(f"val/{k}", v, prog_bar=k in ("acc", "dice"), sync_dist=False)

    def test_step(self, batch: dict, batch_idx: int):
        self._note_skipped(batch)
        if batch["image"].shape[0] == 0:
            return None
        out = self.task.predict(self.model_for(batch), batch["image"])
        self.task.collect(out, batch)

    def on_test_epoch_start(self) -> None:
        self.task.reset_collect()

    def on_test_epoch_end(self) -> None:
        self.test_results = self.task.finish_collect(self)

    # -- what the layer learned -------------------------------------------------------------------
    def template_record(self) -> dict | None:
        if not hasattr(self.norm, "template"):
            return None
        t = self.norm.template()
        return {"natural": t.natural(), "internal": {k: {"mu": v[0], "sigma": v[1]} for k, v in t.stats.items()}, "fusion": t.fusion}

    def learnable_norm_vector(self) -> torch.Tensor:
        ps = [p.detach().flatten() for p in self.norm.parameters()]
        return torch.cat(ps) if ps else torch.zeros(0, device=self.device)
