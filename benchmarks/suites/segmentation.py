"""``python benchmarks/bench.py segmentation``: nuclei segmentation on held-out hospitals, every method and seed.

Reports Dice, IoU, AJI and PQ on the test split (mean over test images, then mean ± std over
seeds), overall and per held-out hospital. Every run is a job of ``lstainnorm compare``'s engine
(resumable, local workers or a cluster).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from lstainnorm.compare.report import pair_rows, pair_table
from lstainnorm.config import load_config
from suites.common import Job, engine_records, finish
from lstainnorm.experiments.runner import commits_line, markdown_table, mean_std, method_overrides, paired_table, per_seed

__all__ = ["segmentation_benchmark", "SEGMENTATION_METHODS", "suite_record"]

# The default selection: no normalisation, the fixed and learnable layers, and the strongest baseline.
SEGMENTATION_METHODS = ("none", "template", "learnable-lab", "lstainnorm", "macenko")


def first_training_image(config: str | Path, overrides: Sequence[str] = ()) -> str:
    """The first training image (by name) of a segmentation config's split: the one image
    ``lstainnorm-init-image`` starts from."""
    from lstainnorm.tasks.loaders import build_segmentation_data

    records = build_segmentation_data(load_config(config, list(overrides))[0]).train.records
    return str(min(records, key=lambda r: r.name).image)


def suite_record(rec: dict) -> dict:
    """A record as the tables read it: records from before the comparison engine (``dice`` at the top)
    as they are; a :mod:`lstainnorm.compare` record flattened."""
    if "dice" in rec:
        return rec
    m = rec.get("metrics", {})
    return {"method": rec["method"], "seed": rec["seed"], **{k: m.get(k) for k in ("dice", "iou", "aji", "pq")},
            "per_centre": rec.get("per_centre", {}), "run_dir": rec.get("run_dir"), "best_epoch": rec.get("best_epoch"),
            "minutes": (rec.get("seconds") or float("nan")) / 60, "code": rec.get("code"), "groups": rec.get("groups")}


def _paired(raw: Sequence[dict], sel: Sequence[dict], methods: Sequence[str], reference: str) -> str:
    """Each method minus ``reference`` on the same seeds. Comparison records (``raw``) with each test
    image's Dice (``groups``) get the comparison's table: paired t, a bootstrap over test images and a
    verdict only when both exclude 0; older records (``sel``, flattened) the paired t alone."""
    if not all(r.get("groups") and "metrics" in r for r in raw):
        return paired_table(sel, "dice", reference=reference, digits=3)
    pairs = pair_rows(raw, "split", methods, reference, "dice")
    return markdown_table(*pair_table(pairs)) if pairs else ""


def segmentation_benchmark(
    config: str | Path,
    out: str | Path,
    methods: Sequence[str] = SEGMENTATION_METHODS,
    seeds: Sequence[int] = (0, 1, 2),
    overrides: Sequence[str] = (),
    progress: bool = True,
    stress: bool = False,
    report: str = "segmentation",
    run_missing: bool = True,
    workers: int = 1,
    executor: str = "local",
    executor_options: Sequence[str] = (),
    records: str | Path | None = None,
) -> dict:
    """Train ``config`` (a segmentation config) once per method and seed; tables of the test metrics.
    With ``stress``, every trained run is then stressed on its test split (:mod:`.stress`).
    Each run is a job of the comparison engine (:func:`lstainnorm.compare.engine.run_jobs`).
    ``run_missing=False`` trains nothing: the tables of the runs recorded so far (``--tables-only``), in
    ``out/results.jsonl`` or in ``records``."""
    out = Path(out)
    if run_missing:
        load_config(config, list(overrides))  # a bad config or override fails before any run

    def job(method: str, seed: int) -> Job:
        image = first_training_image(config, overrides) if method == "lstainnorm-init-image" else None
        return Job("split", method, seed, tuple(method_overrides(method, out / "cache", image) + list(overrides)))

    jobs = [job(m, s) for m in methods for s in seeds]
    raw = engine_records(Path(config), jobs, out, run_missing, workers, executor, executor_options, progress, overrides,
                         records=records and Path(records))
    sel = [suite_record(r) for r in raw]

    rows, summary = [], {}
    centres = sorted({c for d in sel for c in d["per_centre"]})
    for method in methods:
        rs = [d for d in sel if d["method"] == method]
        if not rs:
            continue
        summary[method] = {k: float(np.mean([d[k] for d in rs])) for k in ("dice", "iou", "aji", "pq")}
        rows.append([method] + [mean_std([d[k] for d in rs], digits=3) for k in ("dice", "iou", "aji", "pq")] + [
            len(rs), per_seed(rs, "dice", "{:.3f}"), per_seed(rs, "best_epoch"), f"{np.mean([d['minutes'] for d in rs]):.0f}"])
    # Per-seed values beside the mean: with three seeds one weak run moves a mean by a lot.
    table = markdown_table(["method", "Dice", "IoU", "AJI", "PQ", "seeds", "Dice per seed", "best epoch per seed", "min / run"], rows)
    per = markdown_table(
        ["method"] + centres,
        [[m] + [f"{np.mean([d['per_centre'][c]['dice'] for d in sel if d['method'] == m and c in d['per_centre']]):.3f}" for c in centres] for m in methods if any(d["method"] == m for d in sel)],
    )
    text = (
        f"Config `{config}`{' with ' + ' '.join(overrides) if overrides else ''}; test = held-out hospitals; mean over test images, "
        f"then mean ± std over seeds {list(seeds)}.\n{commits_line(sel) if sel else ''}\n\n{table}\n\nDice per held-out hospital (mean over seeds):\n\n{per}"
    )
    # Against no normalisation, the method and the fixed template, where each has runs.
    for ref in ("none", "lstainnorm", "template"):
        paired = _paired(raw, sel, methods, ref) if len(seeds) > 1 else ""
        if paired:
            text += f"\n\nTest Dice, each method minus `{ref}` on the same seed:\n\n" + paired
    return finish(out, report, {"summary": summary, "runs": sel, "text": text}, load_config(config, list(overrides))[0].segmentation.root if stress else None, progress)
