"""``lstainnorm stress``: robustness curves of a trained run under graded re-staining.

The run's evaluation images are re-stained along each axis of :mod:`lstainnorm.data.restain`
(stain hue, stain amount, H/E ratio, scanner white point, gamma, saturation, JPEG, all at once)
at graded severities, morphology kept, and the run is evaluated at every level, exactly as
``lstainnorm evaluate`` does (severity 0 is the evaluation itself). Outputs, in ``OUT``:

- ``stress.csv``: one row per axis and severity with every overall metric;
- ``stress.png``: the metric the run was trained to monitor (``trainer.monitor``, e.g. balanced
  accuracy) against severity, one line per axis;
- ``index.html``: the plot, the table, the axes' definitions and one robustness score per axis,
  the area under the metric-vs-severity curve divided by the metric at severity 0 (1 = no loss);
- ``stress.json``: the scores and settings. ``results.jsonl`` holds the finished levels: an
  interrupted run resumes where it stopped, and a rerun with other ``--axes``/``--levels`` into the same
  folder adds to it: the tables and plot then cover every axis and level the folder holds.
"""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from ..data.restain import AXES, restain
from ..files import atomic_write_bytes, sweep_stale_temps
from ..runs import find_checkpoint, run_dir_of
from .base import monitored_metric
from .evaluate import _test, data_name, evaluation_data, load_module

__all__ = ["stress", "finished_stress", "Restained", "robustness_score", "DEFAULT_LEVELS"]

DEFAULT_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


class Restained(Dataset):
    """``ds`` with every item's ``image`` re-stained along ``axis`` at ``severity`` (seeded per item),
    with each item's stain vectors from ``stains`` (``{index: (2, 3)}``) where given."""

    def __init__(self, ds: Dataset, axis: str, severity: float, seed: int = 0, stains: dict | None = None) -> None:
        self.ds, self.axis, self.severity, self.seed = ds, axis, float(severity), int(seed)
        self.stains = stains or {}

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        item = self.ds[i]
        if isinstance(item, dict) and item.get("image") is not None and self.severity > 0:
            item = {**item, "image": restain(item["image"], self.axis, self.severity, seed=self.seed * 1_000_003 + i,
                                             stains=self.stains.get(i))}
        return item


STAIN_AXES = ("hematoxylin-hue", "eosin-hue", "stain-amount", "he-ratio", "combined")


def estimate_stains(ds: Dataset, batch: int = 64, progress: bool = False) -> dict[int, torch.Tensor]:
    """Each item's Macenko stain vectors, estimated once (batched over same-size images) and then
    reused at every severity and stain axis."""
    from ..data.restain import stain_matrices

    out: dict[int, torch.Tensor] = {}
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if pending:
            for (i, _), m in zip(pending, stain_matrices(torch.stack([x for _, x in pending]))):
                out[i] = m
            pending.clear()

    for i in range(len(ds)):
        item = ds[i]
        x = item.get("image") if isinstance(item, dict) else None
        if x is None:
            continue
        if pending and (pending[0][1].shape != x.shape or len(pending) >= batch):
            flush()
        pending.append((i, x))
        if progress and i % 500 == 0:
            print(f"[stress] stain vectors: {i}/{len(ds)} images", flush=True)
    flush()
    return out


def robustness_score(severities: Sequence[float], values: Sequence[float]) -> float:
    """Area under ``values`` over ``severities`` (trapezoids, from 0 to the last severity),
    divided by that span and by the value at severity 0: 1 means no loss at any level."""
    pts = sorted(zip(severities, values))
    if len(pts) < 2 or pts[0][0] != 0.0 or pts[0][1] == 0:
        return float("nan")
    area = sum((s1 - s0) * (v0 + v1) / 2.0 for (s0, v0), (s1, v1) in zip(pts, pts[1:]))
    return area / (pts[-1][0] - pts[0][0]) / pts[0][1]


def _plot(rows: list[dict], metric: str, axes: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in axes:
        pts = sorted((r["severity"], r[metric]) for r in rows if r["axis"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, linewidth=2.5 if name == "combined" else 1.2)
    ax.set_xlabel("severity (0 = images as they are, 1 = each axis's maximum)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _html(run: Path, data: Path, metric: str, rows: list[dict], scores: dict, axes: Sequence[str]) -> str:
    e = html.escape
    levels = sorted({r["severity"] for r in rows})
    head = "".join(f"<th>{s:g}</th>" for s in levels)
    body = []
    for name in axes:
        vals = {r["severity"]: r[metric] for r in rows if r["axis"] == name}
        cells = "".join(f"<td>{vals[s]:.4f}</td>" if s in vals else "<td>-</td>" for s in levels)
        body.append(f"<tr><td>{e(name)}</td>{cells}<td><b>{scores[name]:.3f}</b></td></tr>")
    defs = "".join(f"<li><b>{e(a.name)}</b>: {e(a.description)} (severity 1 = {a.maximum:g} {e(a.unit)})</li>" for a in AXES.values() if a.name in axes)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>stress: {e(run.name)}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}td,th{{padding:2px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head><body>
<h1>Robustness to re-staining</h1>
<p>Run <code>{e(str(run))}</code>, data <code>{e(str(data))}</code>. Metric: <b>{e(metric)}</b>.
Robustness score: area under the curve over severity 0-1 divided by the value at 0 (1 = no loss).</p>
<img src="stress.png" alt="metric against severity">
<table><tr><th>axis</th>{head}<th>score</th></tr>{''.join(body)}</table>
<h2>Axes</h2><ul>{defs}</ul>
<p>Stain axes re-compose the Beer-Lambert decomposition of each image (Macenko stain vectors, Ruifrok's where
the image has too little tissue) and keep what the two stains do not explain; scanner axes act on RGB.</p>
</body></html>"""


def stress(
    run_or_ckpt: str | Path,
    data: str | Path,
    *,
    axes: Sequence[str] | None = None,
    levels: Sequence[float] = DEFAULT_LEVELS,
    split: str | None = None,
    centres: Sequence[str] | None = None,
    out: str | Path | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Evaluate a trained run on re-stained copies of ``data`` (see the module docstring).

    Args:
        run_or_ckpt: a run folder or checkpoint (read as data only).
        data: what ``lstainnorm evaluate`` takes (class folders or a manifest; segmentation folder).
        axes: axes of :data:`lstainnorm.data.restain.AXES` (default all).
        levels: severities in (0, 1]; 0 is always evaluated too (the reference of every curve).
        split, centres: select from a manifest, as in ``evaluate``.
        out: output folder (default ``RUN/stress_<data name>-<hash>``).
        seed: the random draws of the ``combined`` axis.

    Returns:
        ``{"scores": {axis: score}, "metric": name, "rows": [...], "output": folder}``.
    """
    axes = list(axes) if axes else list(AXES)
    for a in axes:
        if a not in AXES:
            raise ValueError(f"unknown stress axis {a!r}; choose from {list(AXES)}")
    given = [float(s) for s in levels]
    # 0 may be listed (it is always run), but at least one level must stress: else every score is nan.
    if not any(s > 0.0 for s in given) or any(not 0.0 <= s <= 1.0 for s in given):  # also rejects nan
        raise ValueError(f"severity levels must be in (0, 1] (0, the unstressed data, is always run), got {given}")
    levels = sorted({0.0, *given})
    ckpt = find_checkpoint(run_or_ckpt)
    module = load_module(ckpt)  # first: a checkpoint that is not plain data stops here, nothing written
    data = Path(data)
    ds, collate, bs = evaluation_data(module, data, split=split, centres=centres, batch_size=batch_size)
    out = Path(out) if out else run_dir_of(ckpt) / data_name("stress", data, split, centres)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"checkpoint": str(ckpt.resolve()), "data": str(data.resolve()), "split": split,
                "centres": sorted(centres) if centres else None, "seed": seed}
    settings_path = out / "stress_settings.json"
    if settings_path.is_file() and json.loads(settings_path.read_text()) != settings:
        raise ValueError(f"{out} holds stress results of other settings ({settings_path}); choose another --out")
    atomic_write_bytes(settings_path, json.dumps(settings, indent=2).encode())
    sweep_stale_temps(out)  # half-written files of an earlier run that was killed

    metric = monitored_metric(module.cfg, module.task).split("/", 1)[1]
    done_path = out / "results.jsonl"
    done: dict[tuple[str, float], dict] = {}
    if done_path.is_file():
        for line in done_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["axis"], r["severity"])] = r
    jobs = [("none", 0.0)] + [(a, s) for a in axes for s in levels if s > 0]
    todo = [j for j in jobs if j not in done]
    stains = estimate_stains(ds, progress=progress) if any(a in STAIN_AXES for a, _ in todo) else {}
    for i, (axis, sev) in enumerate(jobs):
        if (axis, sev) in done:
            continue
        if progress:
            print(f"[stress {i + 1}/{len(jobs)}] {axis} at severity {sev:g}", flush=True)
        res = _test(module, Restained(ds, axis if axis != "none" else "combined", sev, seed, stains), collate, bs, progress=False)
        row = {"axis": axis, "severity": sev, **{k: float(v) for k, v in res["overall"].items() if isinstance(v, (int, float))}}
        done[(axis, sev)] = row
        lines = [json.dumps(r) for r in done.values()]
        atomic_write_bytes(done_path, ("\n".join(lines) + "\n").encode())
    base = done[("none", 0.0)]
    if metric not in base:  # monitored on a validation-only number (val/loss): report the task's own metric
        metric = module.task.monitor.split("/", 1)[1]
    # Merged, not replaced: the folder's tables and plot cover every axis and level it holds, this
    # call's and those of earlier calls with other --axes/--levels (same run, data and seed).
    earlier = [a for a in AXES if a not in axes and any(k[0] == a for k in done)]
    merged = bool(earlier) or any(k[0] in axes and k[1] not in levels for k in done if k[0] != "none")
    if merged and progress:
        print(f"{out} also holds earlier results of this run (other axes or levels): the tables and plot cover all of them", flush=True)
    axes = axes + earlier
    rows = [{**base, "axis": a, "severity": 0.0} for a in axes] + [
        done[k] for a in axes for k in sorted(done, key=lambda k: k[1]) if k[0] == a and k[1] > 0]
    levels = sorted({r["severity"] for r in rows})
    scores = {a: robustness_score([r["severity"] for r in rows if r["axis"] == a], [r[metric] for r in rows if r["axis"] == a]) for a in axes}

    keys = ["axis", "severity"] + [k for k in base if k not in ("axis", "severity")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_bytes(out / "stress.csv", buf.getvalue().encode())
    _plot(rows, metric, axes, out / "stress.png")
    atomic_write_bytes(out / "index.html", _html(run_dir_of(ckpt), data, metric, rows, scores, axes).encode())
    result = {"metric": metric, "scores": scores, "levels": levels, "axes": axes, "settings": settings, "merged": merged}
    atomic_write_bytes(out / "stress.json", json.dumps(result, indent=2).encode())
    return {**result, "rows": rows, "output": str(out)}


def finished_stress(out: str | Path, axes: Sequence[str] | None = None, levels: Sequence[float] = DEFAULT_LEVELS) -> dict | None:
    """What :func:`stress` returned for the folder ``out``, read back without the checkpoint, if the
    folder holds every axis of ``axes`` (default all) at every level of ``levels``; else ``None``.
    Lets a benchmark table stress curves whose runs' checkpoints are gone (only the records were kept)."""
    out = Path(out)
    try:
        result = json.loads((out / "stress.json").read_text())
        with open(out / "stress.csv", newline="") as fh:
            rows = [{k: (v if k == "axis" else float(v)) for k, v in r.items()} for r in csv.DictReader(fh)]
    except (OSError, ValueError, KeyError):  # absent, half-written by hand or of another version: not finished
        return None
    want = list(axes) if axes else list(AXES)
    have = {(r["axis"], r["severity"]) for r in rows}
    if not all((a, float(s)) in have for a in want for s in levels if s > 0):
        return None
    return {**result, "rows": rows, "output": str(out)}
