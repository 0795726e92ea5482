"""``make demo``: the synthetic multi-centre benchmark, one command, one table."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from ..config import make_config
from ..data.synthetic import write_synthetic
from ..files import atomic_write_bytes
from ..tasks.train import train
from .runner import run_resumable

__all__ = ["run_demo", "DEMO_METHODS", "FULL_DEMO_METHODS", "QUICK", "FULL", "demo_config"]

# The first command a newcomer runs: the point (normalisation vs none across centres) in about five
# minutes on 2 CPU cores. ``--full`` is the longer version: every layer, more and larger tiles.
DEMO_METHODS = ("none", "template", "lstainnorm")
FULL_DEMO_METHODS = ("none", "template", "learnable", "lstainnorm")
# Batch 16 in the quick demo: its ~290 training tiles then give ~18 steps an epoch, enough for the
# batch-norm statistics to settle (at 64 the network still answered one class for every tile).
QUICK = {"per_class": 80, "size": 64, "epochs": 8, "batch_size": 16}
FULL = {"per_class": 200, "size": 96, "epochs": None, "batch_size": None}  # None: configs/demo.yaml's


def demo_config() -> dict:
    text = resources.files("lstainnorm").joinpath("configs/demo.yaml").read_text()
    return OmegaConf.to_container(OmegaConf.create(text), resolve=True)


def results_table(rows: list[dict]) -> str:
    lines = [
        "| method | in-centre acc (A) | cross-centre acc (B, C, D) | B | C | D | macro-F1 cross | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pc = r["per_centre"]
        lines.append(
            f"| {r['method']} | {100 * r['in']:.1f} | {100 * r['cross']:.1f} | "
            + " | ".join(f"{100 * pc.get(c, float('nan')):.1f}" for c in ("B", "C", "D"))
            + f" | {100 * r['cross_f1']:.1f} | {r['minutes']:.1f} |"
        )
    return "\n".join(lines)


def run_demo(
    out: str | Path,
    methods: Sequence[str] | None = None,
    epochs: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    overrides: Sequence[str] = (),
    full: bool = False,
) -> list[dict]:
    """Write the synthetic set (if not there), train each method on centre A, test on A-D, print
    the table and the time it took. Resumable: methods already in ``out/results.jsonl`` with the
    same settings are kept. ``full``: every layer on more and larger tiles (about 15 minutes)."""
    import time

    t0 = time.time()
    out = Path(out)
    preset = FULL if full else QUICK
    methods = list(methods or (FULL_DEMO_METHODS if full else DEMO_METHODS))
    per_class = per_class or preset["per_class"]
    epochs = epochs or preset["epochs"]
    size = preset["size"]
    synth = out / f"synth_{size}px"
    manifest = synth / "manifest.csv"
    info = synth / "synthetic.json"
    if not (manifest.is_file() and info.is_file() and json.loads(info.read_text()).get("per_class") == per_class):
        print(f"[demo] writing the synthetic multi-centre set to {synth} ...")
        write_synthetic(synth, centres=4, per_class=per_class, size=size, seed=seed)
    base = demo_config()

    def run(job: dict) -> dict:
        raw = json.loads(json.dumps(base))
        raw["data"]["manifest"] = str(manifest)
        raw["norm"]["mode"] = job["method"]
        raw["output_path"] = str(out / "runs")
        raw["postfix"] = f"demo_{job['method']}"
        raw["seed"] = seed
        if epochs:
            raw["trainer"]["max_epochs"] = epochs
        if preset["batch_size"]:
            raw["data"]["batch_size"] = preset["batch_size"]
        cfg, notes = make_config(raw, overrides)
        print(f"\n[demo] method {job['method']}: training on centre A, testing on A, B, C, D")
        res = train(cfg, notes)
        return {
            "in": res["in_centre"]["acc"],
            "cross": res["cross_centre"]["acc"],
            "cross_f1": res["cross_centre"]["f1"],
            "per_centre": {c: v["acc"] for c, v in res["test"]["per_centre"].items()},
            "run_dir": res["run_dir"],
        }

    jobs = [{"method": m, "seed": seed, "epochs": epochs, "per_class": per_class, "size": size, "overrides": list(overrides)}
            for m in methods]
    rows = run_resumable(out, jobs, run, "demo", progress=False)
    table = results_table(rows)
    text = (
        f"Synthetic multi-centre H&E (6 classes, {size} x {size}, {per_class} tiles per class and centre), "
        "trained on centre A, tested on A-D; "
        f"test accuracy (%), {make_config(base, overrides)[0].model.backbone} backbone.\n\n" + table + "\n"
    )
    atomic_write_bytes(out / "results.md", text.encode())
    atomic_write_bytes(out / "results.json", json.dumps(rows, indent=2).encode())
    print("\n" + text)
    print(f"[demo] table written to {out / 'results.md'}; runs in {out / 'runs'}")
    print(f"[demo] done in {(time.time() - t0) / 60:.1f} minutes" + ("" if full else "; `lstainnorm demo --full` is the longer version"))
    return rows
