"""lstainnorm stress: robustness curves of a trained run (classification and segmentation)."""

import csv
import json
import os
from pathlib import Path

import pytest
from conftest import killed_writer_temp

from lstainnorm.cli import main
from lstainnorm.config import make_config
from lstainnorm.data.synthetic import write_synthetic, write_synthetic_segmentation
from lstainnorm.tasks.evaluate import evaluate
from lstainnorm.tasks.stress import robustness_score, stress
from lstainnorm.tasks.train import RUN_DIR_ENV, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stress_cls")
    write_synthetic(tmp / "s", centres=2, per_class=6, size=32, classes=2, workers=1, progress=False)
    os.environ.pop(RUN_DIR_ENV, None)
    cfg, _ = make_config({"data": {"manifest": str(tmp / "s" / "manifest.csv"), "train_centres": ["A"], "batch_size": 8},
                          "model": {"backbone": "test_resnet"}, "trainer": {"max_epochs": 1, "accelerator": "cpu", "progress": False},
                          "output_path": str(tmp / "runs")})
    run = train(cfg)["run_dir"]
    os.environ.pop(RUN_DIR_ENV, None)
    return Path(run), tmp / "s" / "manifest.csv"


def test_robustness_score():
    assert robustness_score([0, 0.5, 1], [0.8, 0.8, 0.8]) == pytest.approx(1.0)
    assert robustness_score([0, 1], [1.0, 0.0]) == pytest.approx(0.5)
    assert robustness_score([0, 0.5, 1], [1.0, 0.5, 0.5]) == pytest.approx((0.75 * 0.5 + 0.5 * 0.5) / 1.0)


def test_severity_zero_reproduces_evaluate_and_outputs_are_written(cls_run, tmp_path):
    run, manifest = cls_run
    res = stress(run, manifest, split="test", axes=["stain-amount", "jpeg"], levels=[0.5, 1.0], out=tmp_path / "st", progress=False)
    ev = evaluate(run, manifest, split="test", out=tmp_path / "ev.json", progress=False)
    base = [r for r in res["rows"] if r["severity"] == 0.0]
    assert len(base) == 2 and all(r["acc"] == pytest.approx(ev["overall"]["acc"]) for r in base)
    assert set(res["scores"]) == {"stain-amount", "jpeg"} and res["metric"] == "acc"
    out = tmp_path / "st"
    for name in ("stress.csv", "stress.png", "index.html", "stress.json", "results.jsonl"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    rows = list(csv.DictReader(open(out / "stress.csv")))
    assert {(r["axis"], float(r["severity"])) for r in rows} == {(a, s) for a in ("stain-amount", "jpeg") for s in (0.0, 0.5, 1.0)}
    assert "stain-amount" in (out / "index.html").read_text()


def test_stress_resumes_and_refuses_other_settings(cls_run, tmp_path, monkeypatch):
    run, manifest = cls_run
    out = tmp_path / "st"
    stress(run, manifest, split="test", axes=["gamma"], levels=[1.0], out=out, progress=False)
    from lstainnorm.tasks import stress as mod

    calls = []
    real = mod._test
    monkeypatch.setattr(mod, "_test", lambda *a, **k: calls.append(1) or real(*a, **k))
    half = killed_writer_temp(out, "stress.png")  # a run killed while writing its plot
    stress(run, manifest, split="test", axes=["gamma", "saturation"], levels=[1.0], out=out, progress=False)
    assert len(calls) == 1  # only the new axis ran
    assert not half.exists() and not list(out.glob(".tmp-*"))
    with pytest.raises(ValueError, match="other settings"):
        stress(run, manifest, split="val", axes=["gamma"], out=out, progress=False)


def test_cli_stress_on_a_segmentation_run(tmp_path, capsys):
    data = write_synthetic_segmentation(tmp_path / "seg", n_images=6, size=64, centres=2)
    os.environ.pop(RUN_DIR_ENV, None)
    cfg, _ = make_config({"task": "segmentation", "model": {"backbone": "resnet18", "decoder_channels": [16, 8, 8, 8, 8]},
                          "segmentation": {"root": str(data), "split_column": "tss_code", "test_values": ["B"], "crop": 64,
                                           "samples_per_image": 2, "window": 64, "min_size": 4},
                          "data": {"batch_size": 4}, "trainer": {"max_epochs": 1, "accelerator": "cpu", "progress": False},
                          "output_path": str(tmp_path / "runs")})
    run = train(cfg)["run_dir"]
    os.environ.pop(RUN_DIR_ENV, None)
    assert main(["stress", run, "--data", str(data), "--split", "test", "--axes", "he-ratio", "--levels", "1", "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "stress.json").read_text())
    assert res["metric"] == "dice" and "he-ratio" in res["scores"]
    rows = list(csv.DictReader(open(tmp_path / "o" / "stress.csv")))
    assert {float(r["n"]) for r in rows} == {3.0}  # the run's test split: centre B's 3 of 6 images
    assert "he-ratio" in capsys.readouterr().out


@pytest.mark.heavy
def test_bench_accuracy_with_stress_tables_and_curves(tmp_path):
    """`bench.py accuracy --stress` (tiny): a robustness table per method and axis, and the curves PNG."""
    from PIL import Image

    from suites.accuracy import accuracy_benchmark

    res = accuracy_benchmark(tmp_path / "acc", methods=["none", "template"], seeds=[0], epochs=1, per_class=4,
                             backbone="test_resnet", size=32, overrides=["data.batch_size=16"], progress=False, stress=True)
    assert set(res["stress"]) == {"none", "template"} and "he-ratio" in res["stress"]["template"][0]
    md = (tmp_path / "acc" / "stress" / "stress.md").read_text()
    assert "| none |" in md and "| template |" in md and "combined" in md
    png = Image.open(tmp_path / "acc" / "stress" / "stress_curves.png")
    assert png.size[0] > 200 and "Robustness score" in (tmp_path / "acc" / "accuracy.md").read_text()
