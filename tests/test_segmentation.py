"""Nuclei segmentation: instance metrics, sliding windows, training, prediction."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lstainnorm.config import make_config
from lstainnorm.data.io import read_mask
from lstainnorm.data.synthetic import write_synthetic_segmentation
from lstainnorm.data.instances import aji, panoptic_quality, postprocess
from lstainnorm.tasks.segment import sliding_window
from lstainnorm.tasks.train import RUN_DIR_ENV, train


def test_aji_hand_computed():
    gt = np.zeros((4, 6), int)
    gt[0:2, 0:2] = 1  # 4 px
    gt[2:4, 3:6] = 2  # 6 px
    pred = np.zeros((4, 6), int)
    pred[0:2, 0:3] = 5  # 6 px, overlaps gt1 by 4: IoU 4/6
    pred[3, 3:6] = 7  # 3 px inside gt2: IoU 3/6
    pred[0, 5] = 9  # 1 px false positive, never paired
    # C = 4 + 3 = 7; U = 6 + 6 + 1 (unpaired prediction) = 13
    assert aji(gt, pred) == pytest.approx(7 / 13)
    assert aji(gt, gt) == 1.0
    assert aji(gt, np.zeros_like(gt)) == 0.0
    assert aji(np.zeros_like(gt), np.zeros_like(gt)) == 1.0


def test_pq_hand_computed():
    gt = np.zeros((4, 6), int)
    gt[0:2, 0:2] = 1
    gt[2:4, 3:6] = 2
    pred = np.zeros((4, 6), int)
    pred[0:2, 0:3] = 5  # IoU 4/6 > 0.5: a match
    pred[3, 3:6] = 7  # IoU 0.5: not a match (needs > 0.5)
    pred[0, 5] = 9
    r = panoptic_quality(gt, pred)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 2, 1)
    dq = 1 / (1 + 0.5 * 2 + 0.5 * 1)
    assert r["dq"] == pytest.approx(dq) and r["sq"] == pytest.approx(4 / 6) and r["pq"] == pytest.approx(dq * 4 / 6)
    assert panoptic_quality(gt, gt)["pq"] == 1.0


def test_postprocess_splits_touching_nuclei():
    yy, xx = np.mgrid[0:40, 0:60]
    prob = (((yy - 20) ** 2 + (xx - 20) ** 2 < 100) | ((yy - 20) ** 2 + (xx - 37) ** 2 < 100)).astype(float)
    merged = postprocess(prob, watershed=False)
    split = postprocess(prob, watershed=True)
    assert merged.max() == 1 and split.max() == 2
    assert postprocess(np.zeros((8, 8))).max() == 0
    speck = np.zeros((20, 20))
    speck[2, 2] = 1
    assert postprocess(speck, min_size=5).max() == 0


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        return self.c(x)


def test_sliding_window_equals_whole_image_where_both_fit():
    torch.manual_seed(0)
    net = _Conv()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        whole = net(x)
    assert torch.allclose(sliding_window(net, x, window=64), whole, atol=1e-6)
    # A pointwise model is exact under any tiling: windows, overlaps and padding cancel out.
    point = torch.nn.Conv2d(3, 1, 1)
    y = torch.rand(1, 3, 100, 70)
    with torch.no_grad():
        assert torch.allclose(sliding_window(point, y, window=32, overlap=0.5), point(y), atol=1e-5)
        assert sliding_window(point, torch.rand(2, 3, 20, 90), window=32).shape == (2, 1, 20, 90)


def _seg_cfg(tmp, root, *ov):
    raw = {
        "task": "segmentation", "seed": 0, "output_path": str(tmp / "runs"), "postfix": "seg",
        "data": {"batch_size": 8}, "norm": {"mode": "lstainnorm", "lr": 0.05}, "model": {"backbone": "resnet18"},
        "optim": {"lr": 0.003, "T_max": 20},
        "segmentation": {"root": str(root), "split_column": "tss_code", "test_values": ["B"], "crop": 64, "samples_per_image": 8, "window": 64, "min_size": 4},
        "trainer": {"max_epochs": 6, "accelerator": "cpu", "progress": False, "patience": 20},
    }
    return make_config(raw, list(ov))


@pytest.mark.heavy
@pytest.mark.slow
def test_training_beats_trivial_predictor_and_predict_writes_outputs(tmp_path):
    root = write_synthetic_segmentation(tmp_path / "seg", n_images=10, size=96, centres=2, seed=1)
    os.environ.pop(RUN_DIR_ENV, None)
    cfg, notes = _seg_cfg(tmp_path, root)
    res = train(cfg, notes)
    os.environ.pop(RUN_DIR_ENV, None)
    test_masks = [read_mask(p) for p in sorted((root / "masks").glob("*.png"))[1::2]]  # centre B
    fg = float(np.mean([(m > 0).mean() for m in test_masks]))
    trivial = 2 * fg / (1 + fg)  # Dice of predicting "nucleus" everywhere
    dice = res["test"]["overall"]["dice"]
    assert dice > trivial + 0.15, (dice, trivial)
    assert {"aji", "pq", "iou"} <= set(res["test"]["overall"]) and set(res["test"]["per_centre"]) == {"B"}
    assert len(res["test"]["per_image"]) == 5
    # predict: masks, 16-bit instance labels and overlays; resumable; unreadable inputs skipped.
    from lstainnorm.cli import main

    inp = tmp_path / "in"
    inp.mkdir()
    for p in sorted((root / "images").glob("*.png"))[:2]:
        (inp / p.name).write_bytes(p.read_bytes())
    (inp / "broken.png").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="skipping unreadable image.*broken.png"):
        assert main(["predict", res["run_dir"], str(inp), str(tmp_path / "out")]) == 0
    outs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(outs) == 6 and "seg_000_instances.png" in outs
    assert Image.open(tmp_path / "out" / "seg_000_instances.png").mode in ("I;16", "I;16B", "I")
    mtime = (tmp_path / "out" / "seg_000_mask.png").stat().st_mtime_ns
    with pytest.warns(UserWarning, match="skipping unreadable image.*broken.png"):  # said again on a rerun
        assert main(["predict", res["run_dir"], str(inp), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "seg_000_mask.png").stat().st_mtime_ns == mtime
    # evaluate a segmentation run on a folder with images/ and masks/
    from lstainnorm.tasks.evaluate import evaluate

    ev = evaluate(res["run_dir"], root, progress=False)
    assert ev["overall"]["n"] == 10 and 0 <= ev["overall"]["dice"] <= 1


@pytest.mark.slow
def test_real_monuseg_smoke(shared_data, tmp_path):
    names = sorted(p.stem for p in (shared_data / "monuseg-train" / "images").glob("*.png"))[:2]
    split = tmp_path / "split.csv"
    split.write_text("name,split\n" + f"{names[0]},train\n{names[1]},val\n")
    os.environ.pop(RUN_DIR_ENV, None)
    cfg, notes = make_config(
        {
            "task": "segmentation", "output_path": str(tmp_path / "runs"), "data": {"batch_size": 2},
            "norm": {"mode": "learnable", "templates": "auto"}, "model": {"backbone": "resnet18"},
            "segmentation": {"root": str(shared_data / "monuseg-train"), "split_file": str(split), "scale": 0.25, "crop": 64, "samples_per_image": 2, "window": 128},
            "trainer": {"max_epochs": 1, "accelerator": "cpu", "progress": False},
        }
    )
    with pytest.warns(UserWarning, match="images are not in split file"):  # the split names two images of 30
        res = train(cfg, notes)
    os.environ.pop(RUN_DIR_ENV, None)
    assert res["val"]["overall"]["n"] == 1 and 0.0 <= res["val"]["overall"]["dice"] <= 1.0
    assert json.loads((Path(res["run_dir"]) / "metrics.json").read_text())["best_epoch"] == 1  # counted from 1, as the log


def test_segmentation_bench_tables_only_pairs_against_template(tmp_path):
    """`bench.py segmentation --tables-only`: trains nothing (the config does not even exist), tables the
    recorded runs and pairs each method with `template` seed by seed when `lstainnorm` has no runs."""
    from suites.segmentation import segmentation_benchmark

    config, out = tmp_path / "absent.yaml", tmp_path / "seg"
    out.mkdir()
    dice = {("template", 0): 0.70, ("template", 1): 0.72, ("stain", 0): 0.75, ("stain", 1): 0.78}
    with open(out / "results.jsonl", "w") as f:
        for (method, seed), d in dice.items():
            f.write(json.dumps({"method": method, "seed": seed, "config": str(config), "overrides": [], "dice": d, "iou": d - 0.1,
                                "aji": d - 0.3, "pq": d - 0.4, "per_centre": {"A": {"dice": d, "aji": 0.0, "pq": 0.0}},
                                "run_dir": "", "best_epoch": 3, "minutes": 1.0}) + "\n")
    res = segmentation_benchmark(config, out, methods=["template", "stain", "lstainnorm-stain"], seeds=[0, 1], progress=False,
                                 run_missing=False)
    assert [d["method"] for d in res["runs"]] == ["template", "template", "stain", "stain"]  # nothing trained
    assert "minus `lstainnorm`" not in res["text"]
    pairs = res["text"].split("each method minus `template` on the same seed:")[1]
    assert "| stain | +0.055 |" in pairs and "+0.050 / +0.060" in pairs


def test_segmentation_bench_pairs_compare_records_with_an_image_bootstrap(tmp_path):
    """Records of `lstainnorm compare` carry each test image's Dice: the paired table adds a bootstrap over
    test images and gives a verdict only when it and the paired t both exclude 0."""
    from suites.segmentation import segmentation_benchmark

    config, out = tmp_path / "absent.yaml", tmp_path / "seg"
    out.mkdir()
    with open(out / "results.jsonl", "w") as f:
        for method, base in (("none", 0.70), ("template", 0.75)):
            for seed in (0, 1, 2):
                groups = {f"img{i}": base + 0.01 * i + 0.002 * seed for i in range(6)}
                d = sum(groups.values()) / len(groups)
                f.write(json.dumps({"protocol": "split", "method": method, "seed": seed, "overrides": [f"norm.mode={method}"],
                                    "metrics": {"dice": d, "iou": d - 0.1, "aji": d - 0.3, "pq": d - 0.4}, "groups": groups,
                                    "per_centre": {"A": {"dice": d}}, "run_dir": "", "best_epoch": 30, "seconds": 60}) + "\n")
    res = segmentation_benchmark(config, out, methods=["none", "template"], seeds=[0, 1, 2], progress=False, run_missing=False)
    pairs = res["text"].split("each method minus `template` on the same seed:")[1]
    assert "95 % CI (group bootstrap)" in pairs
    row = next(line for line in pairs.splitlines() if line.startswith("| none |"))
    assert "| -0.050 |" in row and "| worse |" in row
