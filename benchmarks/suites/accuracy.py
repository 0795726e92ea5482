"""``python benchmarks/bench.py accuracy``: the synthetic multi-centre benchmark for every method and seed.

Train on centre A, test on A-D; mean and std over seeds per method. Each run is a job of ``lstainnorm
compare``'s engine on a config written to ``out/configs/``: resumable (a job recorded in
``out/results.jsonl`` is not rerun), on local workers or a cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from lstainnorm.data.synthetic import write_synthetic
from lstainnorm.experiments.demo import demo_config
from lstainnorm.experiments.runner import benchmark_methods, markdown_table, mean_std, method_overrides, paired_table
from suites.common import Job, engine_records, finish, write_config

__all__ = ["accuracy_benchmark"]


def _synthetic_set(out: Path, per_class: int, size: int, progress: bool, preset: str = "default") -> Path:
    """The synthetic set under ``out/synth`` (``out/synth-<preset>`` for other centres; rewritten
    when its size settings differ)."""
    synth = out / ("synth" if preset == "default" else f"synth-{preset}")
    info = synth / "synthetic.json"
    meta = json.loads(info.read_text()) if info.is_file() else {}
    if meta.get("per_class") != per_class or meta.get("size") != size:
        write_synthetic(synth, centres=4, per_class=per_class, size=size, seed=0, progress=progress, preset=preset)
    return synth / "manifest.csv"


def first_training_tile(manifest: Path, min_tissue: float = 0.5) -> str:
    """The one image ``lstainnorm-init-image`` starts from: the first training tile of centre A
    (by path) that is at least ``min_tissue`` tissue (the measure the classical normalisers' fallback
    uses: :func:`~lstainnorm.baselines.classical.tissue_fraction`), as a user picks a classical normaliser's
    target (a tile of stained tissue, not one of glass or fat), without looking further."""
    from lstainnorm.baselines.classical import tissue_fraction
    from lstainnorm.data.io import image_to_tensor, read_rgb
    from lstainnorm.data.tiles import read_manifest

    rows = sorted((r for r in read_manifest(manifest) if r.get("split") == "train" and r.get("centre") == "A"), key=lambda r: r["path"])
    if not rows:
        raise ValueError(f"{manifest} has no training tiles of centre A")
    for r in rows:
        if float(tissue_fraction(image_to_tensor(read_rgb(r["path"]))[None])[0]) >= min_tissue:
            return str(r["path"])
    raise ValueError(f"{manifest}: no training tile of centre A is at least {min_tissue:.0%} tissue")


def _row(rec: dict) -> dict:
    """An engine record as the tables read it: in-centre (A) and cross-centre (B-D, tile-weighted)."""
    i, c = rec.get("in_centre", {}), rec.get("cross_centre", {})
    return {"method": rec["method"], "seed": rec["seed"], "in_acc": i.get("acc"), "in_f1": i.get("f1"),
            "cross_acc": c.get("acc"), "cross_f1": c.get("f1"),
            "per_centre": {k: v.get("acc") for k, v in rec.get("per_centre", {}).items()},
            "fallbacks": rec.get("norm_fallbacks"), "run_dir": rec.get("run_dir"), "code": rec.get("code")}


def accuracy_benchmark(
    out: str | Path,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 8,
    per_class: int = 200,
    backbone: str = "resnet18",
    size: int = 96,
    overrides: Sequence[str] = (),
    progress: bool = True,
    stress: bool = False,
    report: str = "accuracy",
    preset: str = "default",
    run: dict | None = None,
) -> dict:
    """Train on centre A, test on A-D, for every method (default: all of
    :func:`~lstainnorm.experiments.runner.benchmark_methods`) and seed; mean and std per method.
    With ``stress``, every trained run is then stressed on the test split (:mod:`.stress`).
    ``preset`` names the synthetic centres (``default`` or ``monuseg``, measured on real hospitals);
    ``report`` the table files (``accuracy.md``; ``ablation.md`` for ``--ablation``)."""
    out = Path(out)
    methods = list(methods or benchmark_methods())
    manifest = _synthetic_set(out, per_class, size, progress, preset)

    raw = demo_config()
    raw["data"]["manifest"] = str(manifest)
    raw["trainer"]["max_epochs"] = epochs
    raw["model"]["backbone"] = backbone
    config = write_config(out / "configs" / f"{preset}_{backbone}_e{epochs}.yaml", raw)
    image = first_training_tile(manifest) if "lstainnorm-init-image" in methods else None
    # The job's protocol names what else its records depend on: the centres, the backbone, the epochs.
    label = f"{preset}:{backbone}:e{epochs}"
    jobs = [Job(label, m, s, tuple(method_overrides(m, out / "cache", image) + list(overrides))) for m in methods for s in seeds]
    sel = [_row(r) for r in engine_records(config, jobs, out, progress=progress, **(run or {}))]

    rows, summary = [], {}
    for method in methods:
        rs = [d for d in sel if d["method"] == method]
        if not rs:
            continue
        summary[method] = {k: float(np.mean([d[k] for d in rs])) for k in ("in_acc", "cross_acc", "in_f1", "cross_f1")}
        summary[method]["n_seeds"] = len(rs)
        rows.append([method] + [mean_std([d[k] for d in rs], 100) for k in ("in_acc", "cross_acc", "in_f1", "cross_f1")]
                    + [" / ".join(f"{100 * np.mean([d['per_centre'].get(c, float('nan')) for d in rs]):.1f}" for c in ("B", "C", "D")), len(rs)])
    table = markdown_table(["method", "in-centre acc (A)", "cross-centre acc (B-D)", "in-centre macro-F1", "cross-centre macro-F1", "acc B / C / D", "seeds"], rows)
    notes = []
    if "lstainnorm" in summary:
        lst = summary["lstainnorm"]["cross_acc"]
        fixed = {m: v["cross_acc"] for m, v in summary.items() if m not in ("lstainnorm", "none") and not m.startswith("learnable")}
        beaten = [m for m, v in fixed.items() if v > lst]
        notes.append("LStainNorm cross-centre vs fixed normalisation and augmentation: " + ("at least as good as every one" if not beaten else f"below {beaten}"))
        if "none" in summary:
            notes.append(f"LStainNorm cross-centre vs none: {100 * (lst - summary['none']['cross_acc']):+.1f} points (target >= +10)")
    text = (
        f"Synthetic multi-centre set ({'centres measured on MoNuSeg hospitals, ' if preset == 'monuseg' else ''}{size} x {size}, {per_class} tiles per class and centre); {backbone} trained {epochs} epochs on "
        f"centre A, tested on A-D; mean ± std over seeds {list(seeds)} (%).\n\n" + table + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")
    )
    paired = paired_table(sel, "cross_acc", scale=100) if len(seeds) > 1 else ""
    if paired:
        text += "\n\nCross-centre accuracy, each method minus `lstainnorm` on the same seed (points):\n\n" + paired
    return finish(out, report, {"summary": summary, "runs": sel, "text": text}, manifest if stress else None, progress)
