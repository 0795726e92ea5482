"""``python benchmarks/bench.py organ``: organ-of-origin classification on real tissue, held-out hospitals.

There is no multi-centre labelled tile set offline, but MoNuSeg's 30 tiles carry their organ
(7 organs) and hospital (TCGA tissue-source site, 18 hospitals). Each tile is cut into a grid of
crops; for every organ the hospital with the fewest tiles (ties: the first code) is held out for
testing, so a network without normalisation can learn a training hospital's colour as a shortcut
for its organ, and pays for it on the held-out hospitals. Validation crops (one grid row of each
training tile) come from the training hospitals.

Crops of one tile are not independent, so confidence intervals resample whole test tiles
(cluster bootstrap), and the spread over seeds is reported beside them.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from lstainnorm.data.io import read_rgb
from lstainnorm.data.segmentation import read_metadata_csv
from lstainnorm.files import atomic_write_bytes
from lstainnorm.runs import write_json
from lstainnorm.experiments.demo import demo_config
from lstainnorm.experiments.runner import markdown_table, mean_std, method_overrides, paired_table
from suites.common import Job, engine_records, write_config

__all__ = ["organ_benchmark", "organ_split", "write_organ_crops", "tile_bootstrap", "ORGAN_METHODS"]

ORGAN_METHODS = ("none", "template", "learnable-lab", "lstainnorm", "macenko")
CROP_SETTINGS = {"scale": 0.5, "crop": 96, "grid": 5, "val_row": 2}


def _organ(value: str) -> str:
    return value.split("(")[0].strip()  # "liver(as labelled by MoNuSeg)" -> "liver"


def read_metadata(root: Path) -> list[dict[str, str]]:
    path = root / "metadata.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: bench organ needs MoNuSeg's metadata.csv (organ and tss_code per tile)")
    rows = read_metadata_csv(path)
    for col in ("name", "organ", "tss_code"):
        if not rows or col not in rows[0]:
            raise ValueError(f"{path} lacks a '{col}' column")
    return rows


def organ_split(rows: Sequence[dict[str, str]]) -> dict[str, str]:
    """``{tile name: train | test}``: per organ, the hospital with the fewest tiles (ties: the first
    code) is the test hospital; organs seen in a single hospital cannot be split and are left out."""
    by_organ: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_organ[_organ(r["organ"])][r["tss_code"]].append(r["name"])
    split: dict[str, str] = {}
    for organ, hosp in sorted(by_organ.items()):
        if len(hosp) < 2:
            continue
        test = min(hosp, key=lambda h: (len(hosp[h]), h))
        for h, names in hosp.items():
            for n in names:
                split[n] = "test" if h == test else "train"
    return split


def write_organ_crops(root: str | Path, out: str | Path, progress: bool = True, settings: dict | None = None) -> Path:
    """Cut every tile of ``root`` (MoNuSeg layout) into a ``grid`` x ``grid`` of ``crop``-pixel crops
    after resizing by ``scale`` (``settings``, default :data:`CROP_SETTINGS`) under ``out``; returns the
    manifest (``path, class, centre, split, tile``). Reuses an existing set with the same settings."""
    from PIL import Image
    from tqdm.auto import tqdm

    root, out = Path(root), Path(out)
    info = out / "organ_crops.json"
    manifest = out / "manifest.csv"
    s = {**CROP_SETTINGS, **(settings or {})}
    if info.is_file() and manifest.is_file() and json.loads(info.read_text()) == {**s, "root": str(root.resolve())}:
        return manifest
    rows = read_metadata(root)
    split = organ_split(rows)
    lines = [["path", "class", "centre", "split", "tile"]]
    for r in tqdm([r for r in rows if r["name"] in split], desc="organ crops", disable=not progress):
        img = Image.fromarray(read_rgb(root / "images" / f"{r['name']}.png"))
        img = img.resize((round(img.width * s["scale"]), round(img.height * s["scale"])), Image.Resampling.BOX)
        arr = np.asarray(img)
        h, w = arr.shape[:2]
        ys = np.linspace(0, h - s["crop"], s["grid"]).round().astype(int)
        xs = np.linspace(0, w - s["crop"], s["grid"]).round().astype(int)
        organ = _organ(r["organ"])
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                rel = Path("crops") / organ / f"{r['name']}_{i}{j}.png"
                buf = io.BytesIO()
                Image.fromarray(arr[y : y + s["crop"], x : x + s["crop"]]).save(buf, format="PNG")
                atomic_write_bytes(out / rel, buf.getvalue())
                sp = split[r["name"]]
                if sp == "train" and i == s["val_row"]:
                    sp = "val"
                lines.append([str(rel), organ, r["tss_code"], sp, r["name"]])
    buf = io.StringIO()
    csv.writer(buf).writerows(lines)
    atomic_write_bytes(manifest, buf.getvalue().encode())
    atomic_write_bytes(info, json.dumps({**s, "root": str(root.resolve())}).encode())
    return manifest


def tile_bootstrap(correct_by_tile: dict[str, list[bool]], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the accuracy, resampling whole tiles (crops of a tile are correlated)."""
    tiles = list(correct_by_tile)
    rng = np.random.default_rng(seed)
    sums = np.array([sum(correct_by_tile[t]) for t in tiles], dtype=float)
    counts = np.array([len(correct_by_tile[t]) for t in tiles], dtype=float)
    draws = rng.integers(0, len(tiles), size=(n, len(tiles)))
    acc = sums[draws].sum(1) / counts[draws].sum(1)
    return float(np.percentile(acc, 2.5)), float(np.percentile(acc, 97.5))


def _tile_correct(predictions_csv: Path, tile_of: dict[str, str]) -> dict[str, list[bool]]:
    """Per test tile, whether each of its crops was classified correctly; ``tile_of`` maps a crop's
    resolved path to its tile."""
    out: dict[str, list[bool]] = defaultdict(list)
    with open(predictions_csv, newline="") as fh:
        for r in csv.DictReader(fh):
            out[tile_of[str(Path(r["path"]).resolve())]].append(r["label"] == r["prediction"])
    return out


def organ_benchmark(
    root: str | Path,
    out: str | Path,
    methods: Sequence[str] = ORGAN_METHODS,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 20,
    backbone: str = "resnet18",
    overrides: Sequence[str] = (),
    progress: bool = True,
    crops: dict | None = None,
    run: dict | None = None,
) -> dict:
    """Train an organ classifier on the training hospitals' crops per method and seed; test on
    the held-out hospitals. Accuracy and macro-F1 (mean ± std over seeds), a tile-bootstrap 95 %
    interval of the accuracy of the seeds' pooled predictions, and per-seed differences from ``lstainnorm``.
    ``crops`` changes :data:`CROP_SETTINGS` (scale, crop, grid, val_row)."""
    out = Path(out)
    cs = {**CROP_SETTINGS, **(crops or {})}
    manifest = write_organ_crops(root, out / "data", progress, cs)

    raw = demo_config()
    raw["data"] = {"manifest": str(manifest), "batch_size": 32, "num_workers": 0, "image_size": cs["crop"]}
    raw["model"]["backbone"] = backbone
    raw["optim"]["T_max"] = epochs
    # A fixed schedule (cosine to the minimum learning rate), no early stopping: on 400 crops the
    # validation curve is noisy (loss 0.3 to 20 between neighbouring epochs early on), so early
    # stopping picked undertrained epochs. The checkpoint kept is the best validation accuracy
    # (validation crops come from the training hospitals).
    raw["trainer"].update({"max_epochs": epochs, "patience": epochs, "monitor": "val/acc"})
    config = write_config(out / "configs" / f"{backbone}_e{epochs}.yaml", raw)
    # The job's protocol names what else its records depend on: the backbone, the epochs, the crops.
    label = f"{backbone}:e{epochs}" + ("" if cs == CROP_SETTINGS else ":" + ",".join(f"{k}={v}" for k, v in sorted(cs.items())))
    jobs = [Job(label, m, s, tuple(method_overrides(m, out / "cache") + list(overrides))) for s in seeds for m in methods]
    sel = [{"method": r["method"], "seed": r["seed"], "acc": r["metrics"].get("acc"), "f1": r["metrics"].get("f1"),
            "per_centre": {c: v.get("acc") for c, v in r.get("per_centre", {}).items()}, "predictions": r.get("predictions"),
            "run_dir": r.get("run_dir"), "best_epoch": r.get("best_epoch"), "minutes": (r.get("seconds") or float("nan")) / 60}
           for r in engine_records(config, jobs, out, progress=progress, **(run or {}))]

    with open(manifest, newline="") as fh:
        crop_rows = list(csv.DictReader(fh))
    tile_of = {str((manifest.parent / r["path"]).resolve()): r["tile"] for r in crop_rows}
    rows, summary = [], {}
    for method in methods:
        rs = [d for d in sel if d["method"] == method]
        if not rs:
            continue
        pooled: dict[str, list[bool]] = defaultdict(list)
        for d in rs:
            for tile, c in _tile_correct(Path(d["predictions"]), tile_of).items():
                pooled[tile] += c
        lo, hi = tile_bootstrap(pooled)
        summary[method] = {"acc": float(np.mean([d["acc"] for d in rs])), "f1": float(np.mean([d["f1"] for d in rs])), "ci": [lo, hi]}
        rows.append([method, mean_std([d["acc"] for d in rs], 100), f"[{100 * lo:.1f}, {100 * hi:.1f}]",
                     mean_std([d["f1"] for d in rs], 100), len(rs), f"{np.mean([d['minutes'] for d in rs]):.1f}"])
    test_tiles = sorted({(r["class"], r["centre"], r["tile"]) for r in crop_rows if r["split"] == "test"})
    n = {sp: sum(r["split"] == sp for r in crop_rows) for sp in ("train", "val", "test")}
    text = (
        f"Organ of origin ({len({r['class'] for r in crop_rows})} organs) from {cs['crop']} x {cs['crop']} crops of the tiles at scale {cs['scale']}; "
        f"{n['train']} training / {n['val']} validation crops from the training hospitals, {n['test']} test crops from "
        f"{len(test_tiles)} tiles of {len({t[1] for t in test_tiles})} held-out hospitals (one per organ); {backbone}, "
        f"{epochs} epochs (cosine schedule), the checkpoint of best validation accuracy; mean ± std over seeds {list(seeds)} (%); "
        "CI: 95 % tile bootstrap of the seeds' pooled predictions.\n\n"
        + markdown_table(["method", "test accuracy", "95 % CI (tiles)", "test macro-F1", "seeds", "min / run"], rows)
    )
    paired = paired_table(sel, "acc", scale=100) if len(seeds) > 1 else ""
    if paired:
        text += "\n\nTest accuracy, each method minus `lstainnorm` on the same seed (points):\n\n" + paired
    result = {"summary": summary, "runs": sel, "text": text, "test_tiles": [list(t) for t in test_tiles]}
    atomic_write_bytes(out / "organ.md", (text + "\n").encode())
    write_json(out / "organ.json", result)
    return result
