"""Nuclei segmentation: a segmentation-models-pytorch U-Net behind the normalisation layer.

Same LightningModule, config and commands as classification (``task: segmentation``); this
module supplies the network, the BCE + Dice loss, sliding-window inference and the
metrics: pixel Dice and IoU (torchmetrics) and the instance metrics AJI and PQ after
post-processing (:mod:`lstainnorm.tasks.instances`), per image, per hospital and mean.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..data.instances import aji, panoptic_quality, postprocess

__all__ = ["SegmentationTask", "sliding_window", "segmentation_metrics"]


def _pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    return x, (h, w)


def _starts(size: int, window: int, step: int) -> list[int]:
    if size <= window:
        return [0]
    s = list(range(0, size - window + 1, step))
    if s[-1] != size - window:
        s.append(size - window)
    return s


@torch.no_grad()
def sliding_window(model: nn.Module, x: torch.Tensor, window: int = 256, overlap: float = 0.25, batch: int = 4) -> torch.Tensor:
    """Logits of ``model`` over a (B, 3, H, W) image of any size, window by window.

    Windows overlap by ``overlap``; their logits are averaged with weights that fall off
    towards the window's edge (less context there). An image no larger than one window is
    passed whole. H and W are padded (reflect) to a multiple of 32 for the U-Net.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    b, _, h, w = x.shape
    if h <= window and w <= window:
        xp, _ = _pad_to(x, 32)
        return model(xp)[..., :h, :w]
    xp = x
    if h < window or w < window:  # one side shorter than a window: pad it up
        xp = F.pad(x, (0, max(0, window - w), 0, max(0, window - h)), mode="replicate")
    hp, wp = xp.shape[-2:]
    step = max(1, int(round(window * (1.0 - overlap))))
    ramp = torch.minimum(torch.arange(window, dtype=torch.float32) + 1, torch.arange(window, 0, -1, dtype=torch.float32))
    ramp = (ramp / ramp.max()).clamp(min=1e-3)
    weight = (ramp[:, None] * ramp[None, :]).to(x.device)
    out = torch.zeros(b, 1, hp, wp, device=x.device)
    norm = torch.zeros(1, 1, hp, wp, device=x.device)
    coords = [(i, j) for i in _starts(hp, window, step) for j in _starts(wp, window, step)]
    for k in range(0, len(coords), batch):
        chunk = coords[k : k + batch]
        tiles = torch.cat([xp[..., i : i + window, j : j + window] for i, j in chunk])
        tiles, _ = _pad_to(tiles, 32)
        logits = model(tiles)[..., :window, :window].float()
        for n, (i, j) in enumerate(chunk):
            out[..., i : i + window, j : j + window] += logits[n * b : (n + 1) * b] * weight
            norm[..., i : i + window, j : j + window] += weight
    return (out / norm)[..., :h, :w]


def segmentation_metrics(prob: np.ndarray, gt_instances: np.ndarray, post: dict) -> dict[str, float]:
    """Dice, IoU (pixels) and AJI, PQ, DQ, SQ (instances) of one image."""
    from torchmetrics.functional.classification import binary_f1_score, binary_jaccard_index

    pred_fg = torch.from_numpy(prob > post.get("threshold", 0.5)).flatten()
    gt_fg = torch.from_numpy(gt_instances > 0).flatten()
    if gt_fg.any() or pred_fg.any():
        dice = float(binary_f1_score(pred_fg.long(), gt_fg.long()))
        iou = float(binary_jaccard_index(pred_fg.long(), gt_fg.long()))
    else:
        dice = iou = 1.0
    inst = postprocess(prob, post.get("threshold", 0.5), post.get("watershed", True), post.get("min_size", 10))
    pq = panoptic_quality(gt_instances, inst)
    return {"dice": dice, "iou": iou, "aji": aji(gt_instances, inst), "pq": pq["pq"], "dq": pq["dq"], "sq": pq["sq"], "n_pred": int(inst.max()), "n_true": int(np.unique(gt_instances[gt_instances > 0]).size)}


def _aggregate(per_image: list[dict]) -> dict[str, Any]:
    keys = ("dice", "iou", "aji", "pq", "dq", "sq")
    out: dict[str, Any] = {"n": len(per_image)}
    for k in keys:
        vals = [r[k] for r in per_image]
        out[k] = float(np.mean(vals)) if vals else float("nan")
        out[f"{k}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return out


class SegmentationTask:
    """Nuclei segmentation (:class:`~lstainnorm.tasks.base.Task`): an smp U-Net, BCE + Dice,
    sliding-window inference, Dice/IoU per validation image, AJI and PQ per test image."""

    monitor: ClassVar[str] = "val/dice"
    metrics: ClassVar[tuple[str, ...]] = ("train/loss", "val/loss", "val/dice", "val/iou")

    def __init__(self, cfg: Config, classes: Sequence[str], centres: Sequence[str]) -> None:
        self.cfg = cfg
        self.classes = list(classes)
        self.centres = list(centres)
        self._val: list[dict] = []
        self._collected: list[dict] = []
        import segmentation_models_pytorch as smp

        self.dice_loss = smp.losses.DiceLoss(mode="binary", from_logits=True)

    @property
    def post(self) -> dict:
        s = self.cfg.segmentation
        return {"threshold": s.threshold, "watershed": s.watershed, "min_size": s.min_size}

    def build_net(self) -> nn.Module:
        import segmentation_models_pytorch as smp

        m = self.cfg.model
        if m.pretrained and not m.weights:
            raise ValueError("model.pretrained for segmentation needs model.weights: a local encoder weights file (no downloads)")
        extra = {"decoder_channels": list(m.decoder_channels)} if m.get("decoder_channels") else {}
        net = smp.Unet(encoder_name=m.backbone, encoder_weights=None, in_channels=3, classes=1, **extra)
        if m.weights:
            state = torch.load(m.weights, map_location="cpu", weights_only=True)
            missing = net.encoder.load_state_dict(state, strict=False)
            if len(missing.missing_keys) == len(list(net.encoder.state_dict())):
                raise ValueError(f"model.weights {m.weights}: no encoder weights matched '{m.backbone}'")
        return net

    def target(self, batch: dict) -> torch.Tensor:
        return batch["mask"]

    def augment_pair(self, x: torch.Tensor, batch: dict, seed: int, epoch: int, batch_idx: int):
        return x, batch["mask"]  # crops are flipped and rotated, with the mask, by the dataset

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = out.float()
        return F.binary_cross_entropy_with_logits(out, target) + self.dice_loss(out, target)

    def predict(self, model: nn.Module, x: torch.Tensor, tta: bool = True) -> torch.Tensor:
        s = self.cfg.segmentation
        return sliding_window(model, x, s.window, s.overlap)

    def update(self, out: torch.Tensor, batch: dict) -> None:
        prob = torch.sigmoid(out.float()).cpu().numpy()
        for i in range(prob.shape[0]):
            fg = prob[i, 0] > self.cfg.segmentation.threshold
            gt = batch["mask"][i, 0].cpu().numpy() > 0
            inter = float((fg & gt).sum())
            self._val.append({"inter": inter, "sum": float(fg.sum() + gt.sum()), "union": float((fg | gt).sum())})

    def compute(self) -> dict[str, float]:
        dices = [2 * v["inter"] / v["sum"] if v["sum"] else 1.0 for v in self._val]
        ious = [v["inter"] / v["union"] if v["union"] else 1.0 for v in self._val]
        self._val = []
        return {"dice": float(np.mean(dices)) if dices else 0.0, "iou": float(np.mean(ious)) if ious else 0.0}

    def reset_collect(self) -> None:
        self._collected = []

    def collect(self, out: torch.Tensor, batch: dict) -> None:
        prob = torch.sigmoid(out.float()).cpu().numpy()
        for i in range(prob.shape[0]):
            rec = segmentation_metrics(prob[i, 0], batch["instances"][i].cpu().numpy(), self.post)
            rec.update(name=batch["name"][i], centre=batch["centre"][i], index=int(batch["index"][i]))
            self._collected.append(rec)

    def finish_collect(self, module) -> dict:
        recs = self._collected
        if module.trainer is not None and module.trainer.world_size > 1:
            import torch.distributed as dist

            lists: list = [None] * module.trainer.world_size
            dist.all_gather_object(lists, recs)
            seen, recs = set(), []
            for lst in lists:
                for r in lst:
                    if r["index"] not in seen:
                        seen.add(r["index"])
                        recs.append(r)
        recs = sorted(recs, key=lambda r: r["index"])
        res: dict[str, Any] = {"overall": _aggregate(recs), "per_centre": {}, "per_image": recs}
        for c in sorted({r["centre"] for r in recs}):
            res["per_centre"][c] = _aggregate([r for r in recs if r["centre"] == c])
        return res


