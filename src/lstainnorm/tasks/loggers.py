"""Experiment loggers for ``lstainnorm train``: Lightning's own (CSV, TensorBoard, MLflow, Weights &
Biases), chosen with ``trainer.logger``, and what a run sends them beyond Lightning's metrics: the
learned template per space and channel as scalars, and a grid of validation tiles before and after
normalisation as an image, once per epoch. Learning rates come from Lightning's
``LearningRateMonitor``. Everything is written under ``RUN/logs/`` and works offline (MLflow to a
local file store unless ``MLFLOW_TRACKING_URI`` says otherwise, W&B in offline mode unless
``WANDB_MODE=online``)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence

import lightning as L
import torch

from ..config import logger_names

__all__ = ["LOGGERS", "logger_names", "check_logger_extras", "build_loggers", "ExperimentLogCallback", "template_scalars"]

# Each of config.LOGGER_CHOICES -> (the module it needs, the pip extra that installs it)
LOGGERS: dict[str, tuple[str | None, str | None]] = {
    "csv": (None, None),
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}


def check_logger_extras(names: Sequence[str]) -> None:
    """Raise ``ImportError`` naming the pip extra for a logger whose package is not installed."""
    for name in names:
        module, extra = LOGGERS[name]
        if module is not None and importlib.util.find_spec(module) is None:
            raise ImportError(
                f"trainer.logger={name} needs the optional dependency {module!r}: pip install 'lstainnorm[{extra}]'"
            )


def build_loggers(names: Sequence[str], run_dir: Path) -> list:
    """Lightning loggers writing under ``run_dir/logs`` (one folder per logger)."""
    from lightning.pytorch import loggers as pl_loggers

    logs = Path(run_dir) / "logs"
    out = []
    for name in names:
        if name == "csv":
            out.append(pl_loggers.CSVLogger(save_dir=str(logs), name="csv", version=""))
        elif name == "tensorboard":
            out.append(pl_loggers.TensorBoardLogger(save_dir=str(logs), name="tensorboard", version="", default_hp_metric=False))
        elif name == "mlflow":
            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:  # a local file store inside the run (MLflow 3 asks for an explicit opt-in)
                uri = (logs / "mlruns").resolve().as_uri()
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            out.append(pl_loggers.MLFlowLogger(experiment_name="lstainnorm", run_name=Path(run_dir).name, tracking_uri=uri))
        elif name == "wandb":
            offline = os.environ.get("WANDB_MODE", "offline").lower() != "online"
            (logs / "wandb").mkdir(parents=True, exist_ok=True)
            out.append(pl_loggers.WandbLogger(project=os.environ.get("WANDB_PROJECT", "lstainnorm"), name=Path(run_dir).name,
                                              save_dir=str(logs / "wandb"), offline=offline))
    return out


def template_scalars(record: dict | None) -> dict[str, float]:
    """The learned template (natural units) and fusion weights as flat scalar names:
    ``template/<space>/<channel>/mu|sigma`` and ``fusion/<space>/a|b``."""
    if record is None:
        return {}
    out: dict[str, float] = {}
    for space, d in record["natural"].items():
        for ch, mu, sd in zip(d["channels"], d["mu"], d["sigma"]):
            out[f"template/{space}/{ch}/mu"] = float(mu)
            out[f"template/{space}/{ch}/sigma"] = float(sd)
    for space, f in (record.get("fusion") or {}).items():
        out[f"fusion/{space}/a"] = float(f["a"])
        out[f"fusion/{space}/b"] = float(f["b"])
    return out


def _log_image(logger, key: str, grid: torch.Tensor, step: int, epoch: int) -> None:
    """One (3, H, W) float image in [0, 1] to a logger, in that logger's own API."""
    from lightning.pytorch import loggers as pl_loggers

    if isinstance(logger, pl_loggers.TensorBoardLogger):
        logger.experiment.add_image(key, grid, global_step=step)
    elif isinstance(logger, pl_loggers.WandbLogger):
        logger.log_image(key=key, images=[grid], step=step)
    elif isinstance(logger, pl_loggers.MLFlowLogger):
        img = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        logger.experiment.log_image(logger.run_id, img, f"{key}/epoch_{epoch:03d}.png")
    # CSV has no images: `lstainnorm report RUN` draws the same grid.


class ExperimentLogCallback(L.Callback):
    """Sends the learned template (scalars) and a before/after grid of the first validation
    tiles (an image) to the run's loggers after each epoch's validation."""

    def __init__(self, n_images: int = 8, max_side: int = 256) -> None:
        self.n_images = n_images
        self.max_side = max_side
        self.samples: torch.Tensor | None = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.samples is None and batch_idx == 0 and isinstance(batch, dict) and batch["image"].shape[0]:
            x = batch["image"][: self.n_images].detach()
            h, w = x.shape[-2:]
            top, left = max(0, (h - self.max_side) // 2), max(0, (w - self.max_side) // 2)
            self.samples = x[..., top : top + self.max_side, left : left + self.max_side].float().cpu().clone()

    @torch.no_grad()
    def _grid(self, pl_module) -> torch.Tensor:
        from torchvision.utils import make_grid

        x = self.samples.to(pl_module.device)
        y = pl_module.norm(x).float().clamp(0.0, 1.0)
        return make_grid(torch.cat([x, y]).cpu(), nrow=x.shape[0], padding=2, pad_value=1.0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Runs after the epoch's validation (Lightning's order), so the grid shows this epoch's layer.
        if not trainer.loggers or not trainer.is_global_zero:
            return
        step = trainer.global_step
        # Channel names without "*" (L*, a*, b*): MLflow and others reject it in metric names.
        scalars = {k.replace("*", ""): v for k, v in template_scalars(pl_module.template_record()).items()}
        for lg in trainer.loggers:
            if scalars:
                lg.log_metrics({**scalars, "epoch": trainer.current_epoch}, step=step)
        from lightning.pytorch.loggers import CSVLogger

        image_loggers = [lg for lg in trainer.loggers if not isinstance(lg, CSVLogger)]
        if image_loggers and self.samples is not None and pl_module.cfg.norm.mode != "none":
            grid = self._grid(pl_module)
            for lg in image_loggers:
                _log_image(lg, "normalisation/before_after", grid, step, trainer.current_epoch)
        for lg in trainer.loggers:
            lg.save()
