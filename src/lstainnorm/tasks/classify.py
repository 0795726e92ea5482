"""Classification: a timm backbone, cross-entropy, and torchmetrics metrics overall and per centre."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torchmetrics.functional.classification as FC
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

from ..config import Config
from ..files import atomic_write_bytes
from .build import build_classifier
from .loaders import centre_index, flips

__all__ = ["ClassificationTask", "classification_metrics", "decide", "best_threshold", "in_cross_summary", "view_probs", "VIEW_COUNTS"]

# The views of trainer.tta, in an order whose prefixes are the modes: the tile, its 3 flips of the last two
# dims ("flips": the first 4), then the transposes of those 4 ("dihedral": all 8 rotations and reflections).
_FLIPS = (lambda x: x, lambda x: x.flip(-1), lambda x: x.flip(-2), lambda x: x.flip(-2).flip(-1))
_VIEWS = _FLIPS + tuple((lambda x, f=f: f(x.transpose(-1, -2))) for f in _FLIPS)
VIEW_COUNTS = {"none": 1, "flips": 4, "dihedral": 8}


def view_probs(model: nn.Module, x: torch.Tensor, tta: str = "none", per_view: bool = False) -> torch.Tensor:
    """Class probabilities of ``model`` on tiles ``x`` of shape ``(B, C, H, W)``, averaged over the views
    of ``tta`` (``none``: the tile as it is; ``flips``: 4 flips; ``dihedral``: the 8 rotations and
    reflections, square tiles only). Returns ``(B, classes)`` float probabilities; with ``per_view``,
    ``(views, B, classes)`` unaveraged, in an order whose first 1 / 4 / 8 are ``none`` / ``flips`` /
    ``dihedral`` (see :data:`VIEW_COUNTS`)."""
    if tta not in VIEW_COUNTS:
        raise ValueError(f"tta must be one of {list(VIEW_COUNTS)}, got {tta!r}")
    if tta == "dihedral" and x.shape[-1] != x.shape[-2]:
        raise ValueError(f"tta='dihedral' transposes tiles, which needs square ones; got {tuple(x.shape[-2:])} (use tta='flips')")
    p = torch.stack([model(v(x)).float().softmax(-1) for v in _VIEWS[: VIEW_COUNTS[tta]]])
    return p if per_view else p.mean(0)


def decide(probs: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Predicted classes: the most probable, or with two classes and a ``threshold``, class 1 where
    its probability reaches it (see :func:`best_threshold`)."""
    if threshold is None or probs.shape[-1] != 2:
        return probs.argmax(-1)
    return (probs[:, 1] >= threshold).long()


def best_threshold(probs: torch.Tensor, labels: torch.Tensor) -> float | None:
    """The threshold on class 1's probability that maximises balanced accuracy on ``probs`` (two
    classes; chosen on validation, applied to test: ``trainer.threshold: val``). Midway between
    neighbouring probabilities; among equally good ones the nearest to 0.5. None without both classes."""
    if probs.shape[-1] != 2 or labels.numel() == 0 or len(labels.unique()) < 2:
        return None
    p = probs[:, 1].double().cpu()
    y = labels.cpu()
    cuts = torch.unique(p)
    cands = torch.cat([cuts[:1] - 1e-6, (cuts[1:] + cuts[:-1]) / 2, cuts[-1:] + 1e-6]).clamp(0.0, 1.0)
    pred1 = p[None, :] >= cands[:, None]                                   # (thresholds, tiles)
    tpr = (pred1 & (y == 1)).sum(1).double() / (y == 1).sum()
    tnr = (~pred1 & (y == 0)).sum(1).double() / (y == 0).sum()
    bal = (tpr + tnr) / 2
    best = bal.max()
    ok = torch.nonzero(bal >= best - 1e-12).flatten()
    return float(cands[ok[torch.argmin((cands[ok] - 0.5).abs())]])


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, n_classes: int, threshold: float | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, macro AUROC and the confusion matrix (torchmetrics);
    the class decisions by :func:`decide` (AUROC does not depend on them)."""
    if labels.numel() == 0:
        return {"n": 0}
    probs = probs.float()
    pred = decide(probs, threshold)
    out: dict[str, Any] = {
        "n": int(labels.numel()),
        "acc": float(FC.multiclass_accuracy(pred, labels, n_classes, average="micro")),
        "bal_acc": float(FC.multiclass_accuracy(pred, labels, n_classes, average="macro")),
        "f1": float(FC.multiclass_f1_score(pred, labels, n_classes, average="macro")),
    }
    present = labels.unique()
    # AUROC is undefined for classes absent from the labels; macro-average over present ones.
    if len(present) >= 2:
        per = FC.multiclass_auroc(probs, labels, n_classes, average="none")
        out["auroc"] = float(per[present].mean())
    else:
        out["auroc"] = float("nan")
    out["confusion"] = FC.multiclass_confusion_matrix(pred, labels, n_classes).tolist()
    return out


class ClassificationTask:
    """Tile classification (:class:`~lstainnorm.tasks.base.Task`): a timm backbone, cross-entropy,
    accuracy / balanced accuracy / macro-F1 / AUROC overall and per centre."""

    monitor: ClassVar[str] = "val/acc"
    metrics: ClassVar[tuple[str, ...]] = ("train/loss", "val/loss", "val/acc", "val/bal_acc", "val/f1", "val/auroc")

    def __init__(self, cfg: Config, classes: Sequence[str], centres: Sequence[str]) -> None:
        self.cfg = cfg
        self.classes = list(classes)
        self.centres = list(centres)
        k = len(self.classes)
        self.val_metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(k, average="micro"),
                "bal_acc": MulticlassAccuracy(k, average="macro"),
                "f1": MulticlassF1Score(k, average="macro"),
                "auroc": MulticlassAUROC(k, average="macro"),
            }
        )
        self._collected: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # Per-class weights of the cross-entropy (data.balance: loss), or None.
        self.weight: torch.Tensor | None = None
        # Two classes: class 1 where its probability reaches this (trainer.threshold: val), else argmax.
        self.threshold: float | None = None

    def build_net(self) -> nn.Module:
        return build_classifier(self.cfg.model, len(self.classes))

    def target(self, batch: dict) -> torch.Tensor:
        return batch["label"]

    def augment_pair(self, x: torch.Tensor, batch: dict, seed: int, epoch: int, batch_idx: int):
        d = self.cfg.data
        return flips(x, seed, epoch, batch_idx, d.hflip, d.vflip), batch["label"]

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(out.device)
        return nn.functional.cross_entropy(out.float(), target, weight=weight)

    def predict(self, model: nn.Module, x: torch.Tensor, tta: bool = True) -> torch.Tensor:
        """Logits; with ``trainer.tta`` (and ``tta``), the log of the probabilities averaged over its views."""
        mode = self.cfg.trainer.tta
        if not tta or mode == "none":
            return model(x)
        return view_probs(model, x, mode).clamp_min(1e-12).log()

    def update(self, out: torch.Tensor, batch: dict) -> None:
        m = self.val_metrics.to(out.device)
        m.update(out.float().softmax(-1), batch["label"])

    def compute(self) -> dict[str, float]:
        vals = {k: float(v) for k, v in self.val_metrics.compute().items()}
        self.val_metrics.reset()
        return vals

    # -- test: everything collected, metrics per centre ---------------------------------------
    def reset_collect(self) -> None:
        self._collected = []

    def collect(self, out: torch.Tensor, batch: dict) -> None:
        c = centre_index(batch["centre"], self.centres).to(out.device)
        self._collected.append((out.float().softmax(-1).detach(), batch["label"], c, batch["index"]))

    def finish_collect(self, module) -> dict:
        k = len(self.classes)
        if self._collected:
            probs, labels, cents, idx = (torch.cat(t) for t in zip(*self._collected))
        else:
            dev = module.device
            probs, labels, cents, idx = torch.zeros(0, k, device=dev), *(torch.zeros(0, dtype=torch.long, device=dev) for _ in range(3))
        if module.trainer is not None and module.trainer.world_size > 1:
            probs, labels, cents, idx = _gather_uneven(module, probs, labels, cents, idx)
        # Distributed samplers pad with repeats: keep each tile once.
        order = torch.argsort(idx, stable=True)
        probs, labels, cents, idx = probs[order], labels[order], cents[order], idx[order]
        keep = torch.ones_like(idx, dtype=torch.bool)
        keep[1:] = idx[1:] != idx[:-1]
        probs, labels, cents, idx = probs[keep].cpu(), labels[keep].cpu(), cents[keep].cpu(), idx[keep].cpu()
        t = self.threshold
        res: dict[str, Any] = {"overall": classification_metrics(probs, labels, k, t), "per_centre": {}}
        # Per tile (dataset index order): train and evaluate write them as a predictions CSV.
        res["predictions"] = {"index": idx.tolist(), "label": labels.tolist(), "pred": (pred := decide(probs, t)).tolist(),
                              "prob": probs.gather(1, pred[:, None]).squeeze(1).tolist(), "probs": probs.tolist()}
        for ci, name in enumerate(self.centres):
            sel = cents == ci
            if sel.any():
                res["per_centre"][name] = classification_metrics(probs[sel], labels[sel], k, t)
        return res


def write_predictions(path: Path, predictions: dict, dataset: Any, classes: Sequence[str]) -> Path:
    """One row per tile: ``path, centre, group, label, prediction, probability`` (of the predicted
    class) and ``p_<class>`` for every class, as the test loop collected them (``predictions`` of
    :meth:`ClassificationTask.finish_collect`). ``group`` is the manifest's group (slide), if any."""
    records = getattr(dataset, "records", None)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "centre", "group", "label", "prediction", "probability", *(f"p_{c}" for c in classes)])
    all_probs = predictions.get("probs") or [[] for _ in predictions["index"]]
    for i, y, p, pr, ps in zip(predictions["index"], predictions["label"], predictions["pred"], predictions["prob"], all_probs):
        rec = records[i] if records is not None else None
        w.writerow([rec.path if rec else i, rec.centre if rec else "", getattr(rec, "group", "") if rec else "",
                    classes[y], classes[p], f"{pr:.4f}", *(f"{v:.4f}" for v in ps)])
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


def _gather_uneven(module, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """all_gather for tensors whose first dimension differs between ranks."""
    n = torch.tensor([tensors[0].shape[0]], device=module.device)
    sizes = module.all_gather(n).flatten()
    top = int(sizes.max())
    out = []
    for t in tensors:
        pad = torch.zeros((top - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        g = module.all_gather(torch.cat([t, pad]))  # (world, top, ...)
        out.append(torch.cat([g[r, : int(sizes[r])] for r in range(g.shape[0])]))
    return out


def in_cross_summary(test: dict, train_centres: Sequence[str]) -> dict:
    """Tile-weighted accuracy over training centres (in-centre) and over the others (cross-centre)."""
    out = {}
    for name, sel in (("in_centre", lambda c: c in train_centres), ("cross_centre", lambda c: c not in train_centres)):
        parts = [(v["n"], v) for c, v in test.get("per_centre", {}).items() if sel(c) and v.get("n")]
        n = sum(p[0] for p in parts)
        if n:
            out[name] = {
                "n": n,
                "centres": [c for c, v in test["per_centre"].items() if sel(c)],
                **{m: sum(k * v[m] for k, v in parts) / n for m in ("acc", "bal_acc", "f1")},
            }
    return out
