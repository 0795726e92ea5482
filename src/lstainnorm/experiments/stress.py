"""Stress curves of every run a benchmark trained (``bench ... --stress``).

Each run goes through :func:`lstainnorm.tasks.stress.stress` (resumable per run); this module
writes one table of robustness scores (mean +- std over seeds, per method and axis) and one PNG
with a small panel per axis: the metric against severity, one line per method (mean over seeds).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from ..files import atomic_write_bytes
from ..tasks.stress import stress
from .runner import markdown_table, mean_std

__all__ = ["stress_runs", "BENCH_STRESS_LEVELS"]

# Fewer levels than the command's default: a benchmark stresses every method and seed.
BENCH_STRESS_LEVELS = (0.5, 1.0)


def _curves_png(results: dict[str, list[dict]], metric: str, axes: Sequence[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = int(np.ceil(len(axes) / cols))
    fig, grid = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), sharey=True, squeeze=False)
    for k, axis in enumerate(axes):
        ax = grid[k // cols][k % cols]
        for method, runs in results.items():
            sev = sorted({r["severity"] for run in runs for r in run if r["axis"] == axis})
            mean = [np.mean([r[metric] for run in runs for r in run if r["axis"] == axis and r["severity"] == s]) for s in sev]
            ax.plot(sev, mean, marker="o", markersize=3, label=method)
        ax.set_title(axis, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for k in range(len(axes), rows * cols):
        grid[k // cols][k % cols].axis("off")
    grid[0][0].set_ylabel(metric, fontsize=8)
    grid[0][0].legend(fontsize=6)
    fig.supxlabel("severity", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def stress_runs(
    runs: Sequence[dict],
    data: str | Path,
    out: str | Path,
    split: str | None = "test",
    levels: Sequence[float] = BENCH_STRESS_LEVELS,
    axes: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Stress every ``{"method", "seed", "run_dir"}`` of ``runs`` on ``data``; returns the scores
    table (markdown), the per-method scores and the PNG's path."""
    out = Path(out)
    per_method: dict[str, list[dict]] = {}
    curves: dict[str, list[list[dict]]] = {}
    metric, axis_names = "", list(axes or [])
    for r in runs:
        if progress:
            print(f"[bench stress] {r['method']} seed {r['seed']}", flush=True)
        res = stress(r["run_dir"], data, axes=axes, levels=levels, split=split,
                     out=out / f"{r['method']}_s{r['seed']}", progress=False)
        metric, axis_names = res["metric"], res["axes"]
        per_method.setdefault(r["method"], []).append(res["scores"])
        curves.setdefault(r["method"], []).append(res["rows"])
    rows = [[m] + [mean_std([s[a] for s in scores], digits=3) for a in axis_names] for m, scores in per_method.items()]
    table = markdown_table(["method"] + axis_names, rows)
    png = out / "stress_curves.png"
    atomic_write_bytes(png, _curves_png(curves, metric, axis_names))
    text = (f"Robustness score ({metric}: area under the metric-vs-severity curve over severities "
            f"{[0.0, *levels]}, divided by the value at 0; 1 = no loss), mean ± std over seeds:\n\n{table}\n")
    atomic_write_bytes(out / "stress.md", text.encode())
    return {"text": text, "scores": per_method, "png": str(png), "metric": metric}
