"""``lstainnorm bench accuracy``: the synthetic multi-centre benchmark for every method and seed.

Train on centre A, test on A-D; mean and std over seeds per method. Resumable
(:func:`~lstainnorm.experiments.runner.run_resumable`): a (method, seed) whose record is in
``out/results.jsonl`` is not rerun.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from lstainnorm.config import make_config
from lstainnorm.data.synthetic import write_synthetic
from lstainnorm.files import atomic_write_bytes
from lstainnorm.runs import write_json
from lstainnorm.tasks.train import train
from lstainnorm.experiments.demo import demo_config
from lstainnorm.experiments.runner import benchmark_methods, markdown_table, mean_std, method_overrides, paired_table, run_resumable
from suites.stress import stress_runs

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
) -> dict:
    """Train on centre A, test on A-D, for every method (default: all of
    :func:`~lstainnorm.experiments.runner.benchmark_methods`) and seed; mean and std per method.
    With ``stress``, every trained run is then stressed on the test split (:mod:`.stress`).
    ``preset`` names the synthetic centres (``default`` or ``monuseg``, measured on real hospitals);
    ``report`` the table files (``accuracy.md``; ``ablation.md`` for ``--ablation``)."""
    out = Path(out)
    methods = list(methods or benchmark_methods())
    manifest = _synthetic_set(out, per_class, size, progress, preset)

    def run(job: dict) -> dict:
        image = first_training_tile(manifest) if job["method"] == "lstainnorm-init-image" else None
        raw = demo_config()
        raw["data"]["manifest"] = str(manifest)
        raw["output_path"] = str(out / "runs")
        raw["postfix"] = f"{job['method']}_s{job['seed']}" + ("" if preset == "default" else f"_{preset}")
        raw["seed"] = job["seed"]
        raw["trainer"]["max_epochs"] = epochs
        raw["trainer"]["progress"] = False
        raw["model"]["backbone"] = backbone
        cfg, notes = make_config(raw, method_overrides(job["method"], out / "cache", image) + list(overrides))
        res = train(cfg, notes)
        return {
            "in_acc": res["in_centre"]["acc"], "in_f1": res["in_centre"]["f1"],
            "cross_acc": res["cross_centre"]["acc"], "cross_f1": res["cross_centre"]["f1"],
            "per_centre": {c: v["acc"] for c, v in res["test"]["per_centre"].items()},
            "fallbacks": res.get("norm_fallbacks"), "run_dir": res["run_dir"],
        }

    extra = {} if preset == "default" else {"preset": preset}  # records of the default set keep their old keys
    jobs = [{"method": m, "seed": s, "epochs": epochs, "backbone": backbone, **extra} for m in methods for s in seeds]
    sel = run_resumable(out, jobs, run, "bench accuracy", progress)

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
    result = {"summary": summary, "runs": sel, "text": text}
    if stress and sel:
        st = stress_runs(sel, manifest, out / "stress", split="test", progress=progress)
        result["stress"] = st["scores"]
        text += "\n\n" + st["text"] + f"\nCurves: {st['png']}"
        result["text"] = text
    atomic_write_bytes(out / f"{report}.md", (text + "\n").encode())
    write_json(out / f"{report}.json", result)
    return result
