"""Stress curves of every run a benchmark trained (``bench ... --stress``).

Each run goes through :func:`lstainnorm.tasks.stress.stress` (resumable per run); this module
writes one table of robustness scores (mean +- std over seeds, per method and axis) and one PNG
with a small panel per axis: the metric against severity, one line per method (mean over seeds).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lstainnorm.files import atomic_write_bytes
from lstainnorm.tasks.stress import finished_stress, stress
from lstainnorm.experiments.runner import markdown_table, mean_std

__all__ = ["stress_runs", "BENCH_STRESS_LEVELS"]

# Fewer levels than the command's default: a benchmark stresses every method and seed.
BENCH_STRESS_LEVELS = (0.5, 1.0)


def _curves_png(results: dict[str, list[dict]], metric: str, axes: Sequence[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = int(np.ceil(len(axes) / cols))
    fig, grid = plt.subplots(rows, cols, figsize=(3.2 * cols + 1.8, 2.4 * rows), sharey=True, squeeze=False)
    for k, axis in enumerate(axes):
        ax = grid[k // cols][k % cols]
        for i, (method, runs) in enumerate(results.items()):
            sev = sorted({r["severity"] for run in runs for r in run if r["axis"] == axis})
            mean = [np.mean([r[metric] for run in runs for r in run if r["axis"] == axis and r["severity"] == s]) for s in sev]
            # tab20: a colour of its own for each of up to 20 methods (the default cycle repeats after 10)
            ax.plot(sev, mean, marker="o", markersize=3, label=method, color=plt.cm.tab20(i % 20))
        ax.set_title(axis, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for k in range(len(axes), rows * cols):
        grid[k // cols][k % cols].axis("off")
    grid[0][0].set_ylabel(metric, fontsize=8)
    handles, labels = grid[0][0].get_legend_handles_labels()
    fig.supxlabel("severity", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.82, 1))  # the legend beside the panels, not over the first one
    fig.legend(handles, labels, loc="center right", fontsize=6, frameon=False)
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
    rerun: Callable[[dict], str] | None = None,
) -> dict:
    """Stress every ``{"method", "seed", "run_dir"}`` of ``runs`` on ``data``; returns the scores
    table (markdown), the per-method scores, the PNG's path and the runs left unstressed.

    A run whose run folder is gone but whose stress folder (``out/METHOD_sSEED``) is finished is read
    back: the curves outlive the run folders (keep the stress folders with the records). A run that is
    not finished and whose run folder is gone is trained again by ``rerun(run) -> run folder`` if given (the same
    config and seed), else left out and listed in ``missing``."""
    out = Path(out)
    per_method: dict[str, list[dict]] = {}
    curves: dict[str, list[list[dict]]] = {}
    missing: list[str] = []
    metric, axis_names = "", list(axes or [])
    for r in runs:
        folder = out / f"{r['method']}_s{r['seed']}"
        run_dir = r.get("run_dir")
        alive = bool(run_dir) and Path(run_dir).is_dir()
        # A finished folder is read back: always when the run folder is gone, and when it is there if the
        # folder stressed that run's checkpoint (kept folders hold stress.json and stress.csv only, from
        # which stress() would start over). Otherwise stress() resumes (and refuses another checkpoint's).
        res = finished_stress(folder, axes, levels)
        if res is not None and alive and not _stressed_in(res, Path(run_dir)):
            res = None
        if res is None:
            if not alive:
                if rerun is None:
                    missing.append(f"{r['method']} seed {r['seed']}")
                    continue
                if progress:
                    print(f"[bench stress] the run folder of {r['method']} seed {r['seed']} is gone: training it again", flush=True)
                run_dir = rerun(r)
                _drop_orphaned(folder)
            if progress:
                print(f"[bench stress] {r['method']} seed {r['seed']}", flush=True)
            res = stress(run_dir, data, axes=axes, levels=levels, split=split, out=folder, progress=False)
        metric, axis_names = res["metric"], [a for a in res["axes"] if not axes or a in axes]
        per_method.setdefault(r["method"], []).append(res["scores"])
        curves.setdefault(r["method"], []).append(res["rows"])
    text = ""
    if per_method:
        single = all(len(scores) == 1 for scores in per_method.values())
        # One seed has no spread: its score alone, not a "± 0.000" that would claim one.
        rows = [[m] + [f"{scores[0][a]:.3f}" if single else mean_std([s[a] for s in scores], digits=3) for a in axis_names]
                for m, scores in per_method.items()]
        table = markdown_table(["method"] + axis_names, rows)
        text = (f"Robustness score ({metric}: area under the metric-vs-severity curve over severities "
                f"{[0.0, *levels]}, divided by the value at 0; 1 = no loss), "
                f"{'one seed' if single else 'mean ± std over seeds'}:\n\n{table}\n")
    if missing:
        text += f"\nNot stressed yet (run folders gone, nothing trained in this mode): {', '.join(missing)}.\n"
    png = out / "stress_curves.png"
    if per_method:
        atomic_write_bytes(png, _curves_png(curves, metric, axis_names))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "stress.md", text.encode())
    return {"text": text, "scores": per_method, "png": str(png), "metric": metric, "missing": missing}


def _stressed_in(result: dict, run_dir: Path) -> bool:
    """Whether a finished stress ``result`` stressed a checkpoint inside ``run_dir``."""
    ckpt = (result.get("settings") or {}).get("checkpoint")
    return bool(ckpt) and Path(ckpt).resolve().is_relative_to(run_dir.resolve())


def _drop_orphaned(folder: Path) -> None:
    """Half-done stress levels of a checkpoint that no longer exists cannot be finished; they would
    mix two trainings in one curve, so a retrained run starts its folder again."""
    settings = folder / "stress_settings.json"
    if not settings.is_file():
        return
    try:
        ckpt = json.loads(settings.read_text()).get("checkpoint")
    except ValueError:
        ckpt = None
    if not ckpt or not Path(ckpt).is_file():
        for name in ("stress_settings.json", "results.jsonl"):
            (folder / name).unlink(missing_ok=True)
