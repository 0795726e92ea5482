"""The organ-of-origin benchmark (``benchmarks/bench.py organ``): split rule, crops, bootstrap, a tiny run."""

from __future__ import annotations

import csv
import os

import pytest

from lstainnorm.data.synthetic import write_synthetic_segmentation
from suites.organ import organ_benchmark, organ_split, tile_bootstrap, write_organ_crops
from lstainnorm.runs import RUN_DIR_ENV


def test_split_holds_out_one_hospital_per_organ():
    rows = [
        {"name": "a1", "organ": "liver(as labelled)", "tss_code": "21"},
        {"name": "a2", "organ": "liver(as labelled)", "tss_code": "21"},
        {"name": "a3", "organ": "liver(as labelled)", "tss_code": "38"},
        {"name": "a4", "organ": "liver(as labelled)", "tss_code": "18"},
        {"name": "b1", "organ": "kidney", "tss_code": "HE"},
        {"name": "b2", "organ": "kidney", "tss_code": "B0"},
        {"name": "c1", "organ": "skin", "tss_code": "ZZ"},  # one hospital only: cannot be split
    ]
    split = organ_split(rows)
    # fewest tiles, ties to the first code: 18 for liver (1 tile, before 38), B0 for kidney
    assert split == {"a1": "train", "a2": "train", "a3": "train", "a4": "test", "b1": "train", "b2": "test"}


def test_crops_manifest_and_reuse(tmp_path):
    root = write_synthetic_segmentation(tmp_path / "seg", n_images=8, size=64, centres=2)
    settings = {"scale": 1.0, "crop": 24, "grid": 3, "val_row": 1}
    manifest = write_organ_crops(root, tmp_path / "crops", progress=False, settings=settings)
    rows = list(csv.DictReader(open(manifest, newline="")))
    assert len(rows) == 8 * 9 and set(rows[0]) == {"path", "class", "centre", "split", "tile"}
    test_tiles = {r["tile"] for r in rows if r["split"] == "test"}
    train_tiles = {r["tile"] for r in rows if r["split"] in ("train", "val")}
    assert test_tiles and not test_tiles & train_tiles  # whole tiles (hospitals) are held out
    for organ in {r["class"] for r in rows}:  # each organ is tested on a hospital it was not trained on
        tr = {r["centre"] for r in rows if r["class"] == organ and r["split"] == "train"}
        te = {r["centre"] for r in rows if r["class"] == organ and r["split"] == "test"}
        assert tr and te and not tr & te
    assert all(r["split"] == "val" for r in rows if r["tile"] in train_tiles and r["path"].endswith(("_10.png", "_12.png")))
    mtime = manifest.stat().st_mtime_ns
    assert write_organ_crops(root, tmp_path / "crops", progress=False, settings=settings).stat().st_mtime_ns == mtime
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        write_organ_crops(tmp_path / "nowhere", tmp_path / "c2", progress=False)


def test_tile_bootstrap_brackets_the_accuracy():
    by_tile = {"t1": [True] * 10, "t2": [False] * 10, "t3": [True] * 5 + [False] * 5}
    lo, hi = tile_bootstrap(by_tile)
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    assert tile_bootstrap({"t": [True] * 4, "u": [True] * 3}) == (1.0, 1.0)


@pytest.mark.slow
@pytest.mark.heavy
def test_organ_benchmark_tiny_run(tmp_path):
    root = write_synthetic_segmentation(tmp_path / "seg", n_images=8, size=64, centres=2)
    os.environ.pop(RUN_DIR_ENV, None)
    res = organ_benchmark(root, tmp_path / "out", methods=("none", "lstainnorm"), seeds=(0, 1), epochs=1, backbone="test_resnet",
                          progress=False, crops={"scale": 1.0, "crop": 24, "grid": 3, "val_row": 1})
    text = (tmp_path / "out" / "organ.md").read_text()
    assert "| none |" in text and "| lstainnorm |" in text and "95 % CI (tiles)" in text
    assert "each method minus `lstainnorm`" in text  # the paired table
    lo, hi = res["summary"]["none"]["ci"]
    assert 0.0 <= lo <= hi <= 1.0
    assert len(res["runs"]) == 4 and all(os.path.isfile(r["predictions"]) for r in res["runs"])
