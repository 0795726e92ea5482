"""Nuclei instance post-processing and instance metrics (AJI, PQ).

Post-processing (the standard recipe for semantic nuclei maps): threshold the foreground
probability, label connected components, optionally split touching nuclei with a
distance-transform watershed, and drop specks smaller than ``min_size`` pixels.

Metrics on label maps (0 = background):

- **AJI**, aggregated Jaccard index (Kumar et al., IEEE TMI 2017): every ground-truth nucleus
  is paired with the prediction of highest IoU; AJI = sum of their intersections / (sum of
  their unions + the areas of predictions never paired).
- **PQ**, panoptic quality (Kirillov et al. 2019; nuclei use as in HoVer-Net): pairs with
  IoU > 0.5 are matches (unique by construction); DQ = TP / (TP + FP/2 + FN/2),
  SQ = mean IoU of the matches, PQ = DQ x SQ.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["postprocess", "aji", "panoptic_quality", "overlap_table", "relabel"]


def relabel(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n in order of first appearance (0 stays background)."""
    labels = np.asarray(labels)
    ids = np.unique(labels)
    ids = ids[ids != 0]
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, dtype=np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[labels]


def postprocess(prob: np.ndarray, threshold: float = 0.5, watershed: bool = True, min_size: int = 10, min_distance: int = 3) -> np.ndarray:
    """Foreground probability (H, W) -> nuclei instance labels (H, W), int32."""
    fg = np.asarray(prob) > threshold
    if min_size > 1:
        lab, n = ndimage.label(fg)
        if n:
            sizes = np.bincount(lab.ravel())
            small = sizes < min_size
            small[0] = False
            fg[small[lab]] = False
    if not watershed:
        lab, _ = ndimage.label(fg)
        return lab.astype(np.int32)
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed as ws

    dist = ndimage.distance_transform_edt(fg)
    comp, _ = ndimage.label(fg)
    peaks = peak_local_max(dist, min_distance=min_distance, labels=comp, exclude_border=False)
    markers = np.zeros(fg.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # Components without a peak (tiny or flat) keep a marker of their own.
    missing = np.setdiff1d(np.unique(comp[fg]), np.unique(comp[markers > 0]))
    if len(missing):
        for k, c in enumerate(missing, start=len(peaks) + 1):
            ys, xs = np.nonzero(comp == c)
            markers[ys[0], xs[0]] = k
    lab = ws(-dist, markers, mask=fg)
    return relabel(lab).astype(np.int32)


def overlap_table(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersections (n_gt, n_pred) and areas of two label maps (labels relabelled 1..n)."""
    g, p = relabel(gt).ravel(), relabel(pred).ravel()
    ng, npd = int(g.max()) if g.size else 0, int(p.max()) if p.size else 0
    joint = np.bincount(g * (npd + 1) + p, minlength=(ng + 1) * (npd + 1)).reshape(ng + 1, npd + 1)
    inter = joint[1:, 1:].astype(np.float64)
    area_g = joint[1:, :].sum(1).astype(np.float64)
    area_p = joint[:, 1:].sum(0).astype(np.float64)
    return inter, area_g, area_p


def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard index of two instance label maps (1.0 when both are empty)."""
    inter, area_g, area_p = overlap_table(gt, pred)
    if len(area_g) == 0:
        return 1.0 if len(area_p) == 0 else 0.0
    if len(area_p) == 0:
        return 0.0
    union = area_g[:, None] + area_p[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    best = iou.argmax(axis=1)
    has = iou[np.arange(len(area_g)), best] > 0
    c = float(inter[np.arange(len(area_g)), best][has].sum())
    u = float(union[np.arange(len(area_g)), best][has].sum() + area_g[~has].sum())
    used = np.zeros(len(area_p), dtype=bool)
    used[best[has]] = True
    u += float(area_p[~used].sum())
    return c / u if u > 0 else 1.0


def panoptic_quality(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict[str, float]:
    """PQ, DQ (detection quality) and SQ (segmentation quality) of two instance label maps."""
    inter, area_g, area_p = overlap_table(gt, pred)
    ng, npd = len(area_g), len(area_p)
    if ng == 0 and npd == 0:
        return {"pq": 1.0, "dq": 1.0, "sq": 1.0, "tp": 0, "fp": 0, "fn": 0}
    if ng and npd:
        union = area_g[:, None] + area_p[None, :] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        # With IoU > 0.5 each nucleus can match at most one prediction, so matching is unique.
        gi, pi = np.nonzero(iou > iou_threshold)
        ious = iou[gi, pi]
    else:
        ious = np.zeros(0)
    tp = len(ious)
    fp, fn = npd - tp, ng - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(ious.mean()) if tp else 0.0
    return {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn}
