"""The statistics of a comparison: paired differences over seeds, a bootstrap over test groups, verdicts
and power lines.

Two methods trained with the same seeds are compared seed by seed (their difference on each seed), not
by their means: the seed's own luck (which tiles, which initial weights) is shared and cancels. Two
intervals judge a difference:

- a paired t interval over seeds: how much another seed would move it;
- a bootstrap over test groups (slides, images): how much other test slides would move it. Crops of
  one slide are not independent, so whole groups are resampled.

A difference is called (``better`` / ``worse``) only when both exclude 0. The power line says what
these seeds can resolve at the spread they show: the smallest difference whose paired-t interval
would exclude 0, and how many seeds a 1-point difference would need.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

__all__ = ["paired_t", "group_bootstrap", "verdict", "power_line", "counts_by_group", "counts_of", "balanced_accuracy",
           "Scores", "auroc", "scores_by_tile", "summarise_predictions", "BOOTSTRAP_SAMPLES", "t_quantile"]

BOOTSTRAP_SAMPLES = 2000


def counts_by_group(predictions: str | Path) -> dict[str, dict[str, list[int]]]:
    """``{group: {class: [right, total]}}`` from a run's ``test_predictions.csv`` (a row without a group
    is its own group): all that the balanced accuracy of any resampling of whole groups needs, small
    enough to keep in a comparison's records (which then need no run folder to be tabled again)."""
    return summarise_predictions(predictions)[0]


def scores_by_tile(predictions: str | Path) -> dict[str, Any] | None:
    """``{"positive", "label", "score", "group"}`` of a two-class run's ``test_predictions.csv``: each
    tile's probability of the second class (4 decimals) and whether it is that class, for AUROC and its
    group bootstrap (:class:`Scores`); None for more than two classes."""
    return summarise_predictions(predictions)[1]


def summarise_predictions(predictions: str | Path) -> tuple[dict[str, dict[str, list[int]]], dict[str, Any] | None]:
    """:func:`counts_by_group` and :func:`scores_by_tile` of one ``test_predictions.csv``, read once."""
    with open(predictions, newline="") as fh:
        reader = csv.DictReader(fh)
        classes = [c[2:] for c in reader.fieldnames or [] if c.startswith("p_")]
        rows = list(reader)
    groups = [r["group"] or r["path"] for r in rows]
    counts = counts_of([r["label"] for r in rows], [r["prediction"] for r in rows], groups)
    if len(classes) != 2:
        return counts, None
    pos = classes[1]
    return counts, {"positive": pos, "label": [int(r["label"] == pos) for r in rows],
                    "score": [round(float(r[f"p_{pos}"]), 4) for r in rows], "group": groups}


def counts_of(labels: Sequence[Any], predictions: Sequence[Any], groups: Sequence[str]) -> dict[str, dict[str, list[int]]]:
    """``{group: {class: [right, total]}}`` of per-tile labels and decisions (classes as strings)."""
    out: dict[str, dict[str, list[int]]] = {}
    for y, pred, g in zip(labels, predictions, groups):
        cell = out.setdefault(g, {}).setdefault(str(y), [0, 0])
        cell[0] += int(str(y) == str(pred))
        cell[1] += 1
    return out


def balanced_accuracy(counts: Mapping[str, Mapping[str, Sequence[int]]]) -> float:
    """Balanced accuracy of :func:`counts_of` counts, every group counted once."""
    groups = sorted(counts)
    classes = sorted({c for g in counts.values() for c in g})
    return float(_balanced_accuracy(counts, groups, classes, np.ones((1, len(groups))))[0])


def t_quantile(df: int, q: float = 0.975) -> float:
    """Student's t quantile (scipy where installed; the [train] extra has it)."""
    from scipy import stats

    return float(stats.t.ppf(q, df))


def paired_t(diffs: Sequence[float]) -> tuple[float, float, float] | None:
    """``(mean, low, high)``: the mean per-seed difference and its 95 % paired-t interval; None for one seed."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return None
    half = t_quantile(len(d) - 1) * float(np.std(d, ddof=1)) / math.sqrt(len(d))
    m = float(np.mean(d))
    return m, m - half, m + half


def _balanced_accuracy(counts: Mapping[str, Mapping[str, Sequence[int]]], groups: Sequence[str], classes: Sequence[str], weights: np.ndarray) -> np.ndarray:
    right = np.array([[counts.get(g, {}).get(c, [0, 0])[0] for c in classes] for g in groups], dtype=float)
    total = np.array([[counts.get(g, {}).get(c, [0, 0])[1] for c in classes] for g in groups], dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = (weights @ right) / (weights @ total)  # (samples + 1, classes)
    return np.nanmean(per_class, axis=1)  # a class absent from a resample does not count


class Scores(NamedTuple):
    """Per-tile labels (1 the positive class, anything else negative), the positive class's scores and
    each tile's group: what AUROC, and its bootstrap over whole groups, needs."""

    labels: Sequence[int]
    scores: Sequence[float]
    groups: Sequence[str]


def auroc(s: Scores) -> float:
    """Area under the ROC curve (ties count half): threshold-free, so it does not move with the
    decision rule that balanced accuracy depends on."""
    groups = sorted(set(s.groups))
    return float(_auroc(s, groups, np.ones((1, len(groups))))[0])


def _auroc(s: Scores, groups: Sequence[str], weights: np.ndarray) -> np.ndarray:
    """AUROC per row of group ``weights`` (each tile weighs its group's weight): the weighted
    Mann-Whitney statistic, one sort for every resample."""
    index = {g: i for i, g in enumerate(groups)}
    p = np.asarray(s.scores, dtype=float)
    order = np.argsort(p, kind="stable")
    p = p[order]
    pos = (np.asarray(s.labels) == 1)[order]
    w = weights[:, np.array([index[g] for g in s.groups])[order]]  # (resamples, tiles), ascending score
    w_pos, w_neg = np.where(pos, w, 0.0), np.where(pos, 0.0, w)
    cum = np.concatenate([np.zeros((len(w), 1)), np.cumsum(w_neg, axis=1)], axis=1)
    _, first, size = np.unique(p, return_index=True, return_counts=True)  # blocks of tied scores
    block = np.repeat(np.arange(len(first)), size)
    lo, hi = first[block], first[block] + size[block]
    beaten = cum[:, lo] + 0.5 * (cum[:, hi] - cum[:, lo])  # negatives below each tile; tied ones count half
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample without one class: nan, left out
        return (w_pos * beaten).sum(1) / (w_pos.sum(1) * w_neg.sum(1))


def _mean_score(scores: Mapping[str, float], groups: Sequence[str], weights: np.ndarray) -> np.ndarray:
    v = np.array([scores.get(g, np.nan) for g in groups], dtype=float)
    present = ~np.isnan(v)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights[:, present] @ v[present]) / weights[:, present].sum(1)


def group_bootstrap(runs: Mapping[int, Any], ref: Mapping[int, Any], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """Difference of the metric (method minus reference, mean over the shared seeds) and its 95 %
    percentile interval from resampling test groups with replacement (the same groups for every seed
    and both methods).

    ``runs``/``ref``: per seed, either ``{group: {class: [right, total]}}`` (classification: the metric
    is balanced accuracy), :class:`Scores` (the metric is AUROC) or ``{group: score}`` (e.g.
    segmentation: Dice per image, the metric is their mean).
    """
    seeds = sorted(set(runs) & set(ref))
    if not seeds:
        raise ValueError("no seed with results of both methods")
    every = [runs[s] for s in seeds] + [ref[s] for s in seeds]
    scored = isinstance(every[0], Scores)
    groups = sorted({g for c in every for g in (c.groups if scored else c)})
    n = len(groups)
    rng = np.random.default_rng(seed)
    weights = np.vstack([np.ones(n), rng.multinomial(n, np.full(n, 1.0 / n), size=samples)])  # row 0: the data as it is
    if scored:
        def metric(c):
            return _auroc(c, groups, weights)
    elif isinstance(next(iter(every[0].values())), Mapping):
        classes = sorted({k for c in every for g in c.values() for k in g})

        def metric(c):
            return _balanced_accuracy(c, groups, classes, weights)
    else:
        def metric(c):
            return _mean_score(c, groups, weights)
    diff = np.mean([metric(runs[s]) - metric(ref[s]) for s in seeds], axis=0)
    lo, hi = np.nanpercentile(diff[1:], [2.5, 97.5])
    return float(diff[0]), float(lo), float(hi)


def verdict(t_ci: tuple[float, float] | None, boot: tuple[float, float] | None, groups: str = "test groups") -> str:
    """``better`` / ``worse`` only when the paired t over seeds and the group bootstrap both exclude 0 on
    the same side (one seed resolves nothing: the bootstrap does not see how much another seed would
    move). ``groups`` names what the bootstrap resampled (``slides``, ``images``) in the one-seed case."""
    if boot is not None and boot[0] <= 0 <= boot[1]:
        return "not resolved"
    if t_ci is None:
        if boot is None:
            return "one seed only"
        return f"one seed only ({'above' if boot[0] > 0 else 'below'} on the {groups})"
    if t_ci[0] <= 0 <= t_ci[1]:
        return "not resolved (the seeds' interval includes 0)"
    if boot is None:
        return "better (seeds only)" if t_ci[0] > 0 else "worse (seeds only)"
    if (t_ci[0] > 0) != (boot[0] > 0):
        return "not resolved (the intervals disagree)"
    return "better" if t_ci[0] > 0 else "worse"


def power_line(diffs: Sequence[float], target: float = 0.01, max_seeds: int = 1000) -> tuple[float | None, int | None]:
    """``(resolvable, seeds_needed)``: the smallest mean difference these seeds resolve (the paired-t
    half-width at the spread of ``diffs``), and the seeds a difference of ``target`` (one point) would
    need at that spread (None: fewer than two seeds, or more than ``max_seeds``)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return None, None
    sd = float(np.std(d, ddof=1))
    resolvable = t_quantile(len(d) - 1) * sd / math.sqrt(len(d))
    if sd == 0:
        return resolvable, 2
    for n in range(2, max_seeds + 1):
        if t_quantile(n - 1) * sd / math.sqrt(n) < target:
            return resolvable, n
    return resolvable, None
