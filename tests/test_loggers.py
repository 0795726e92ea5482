"""Experiment loggers of `lstainnorm train` (Lightning's), the epoch lines of train.log."""

import os
from pathlib import Path

import pytest

from lstainnorm.config import ConfigError, logger_names, make_config
from lstainnorm.data.synthetic import write_synthetic
from lstainnorm.tasks.train import RUN_DIR_ENV, preflight, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, centres=1, per_class=6, size=32, seed=0, classes=2, workers=1, progress=False)
    return root


def _cfg(tmp, synth, *overrides):
    cfg, _ = make_config({
        "seed": 0, "output_path": str(tmp / "runs"),
        "data": {"manifest": str(synth / "manifest.csv"), "batch_size": 8},
        "norm": {"mode": "lstainnorm", "lr": 0.05}, "model": {"backbone": "test_resnet"},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "progress": False},
    }, list(overrides))
    return cfg


@pytest.fixture(autouse=True)
def _fresh_env():
    os.environ.pop(RUN_DIR_ENV, None)
    yield
    os.environ.pop(RUN_DIR_ENV, None)


def test_logger_setting_forms_and_errors():
    assert logger_names("csv") == ["csv"]
    assert logger_names("csv, tensorboard") == ["csv", "tensorboard"]
    assert logger_names(["tensorboard", "csv", "csv"]) == ["tensorboard", "csv"]
    assert logger_names("none") == [] and logger_names(None) == []
    cfg, _ = make_config({}, ["trainer.logger=[csv,tensorboard]"])
    assert logger_names(list(cfg.trainer.logger)) == ["csv", "tensorboard"]
    with pytest.raises(ConfigError, match="trainer.logger.*'neptune'.*choose one of"):
        make_config({}, ["trainer.logger=neptune"])


def test_missing_logger_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg, _ = make_config({"model": {"backbone": "test_resnet"}}, ["trainer.logger=[csv,wandb]"])
    with pytest.raises(ConfigError, match=r"pip install 'lstainnorm\[wandb\]'"):
        preflight(cfg)


def _tb_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(folder.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {folder}"
    acc = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_run_of_the_demo_has_curves_template_trajectories_and_the_grid(tmp_path):
    """`lstainnorm demo --set trainer.logger=[csv,tensorboard]` (tiny): the event file holds them."""
    from lstainnorm.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--methods", "lstainnorm", "--epochs", "2", "--per-class", "5",
                 "--set", "model.backbone=test_resnet", "--set", "trainer.progress=false", "--set", "data.batch_size=16",
                 "--set", "trainer.logger=[csv,tensorboard]"]) == 0
    run = next((tmp_path / "demo" / "runs").iterdir())
    acc = _tb_events(run / "logs" / "tensorboard")
    tags = acc.Tags()["scalars"]
    for tag in ("train/loss", "val/loss", "val/acc", "template/lab/L/mu", "template/hsv/S/sigma", "fusion/rgb/a"):
        assert tag in tags, f"{tag} not in {sorted(tags)}"
    assert any(t.startswith("lr-") for t in tags), tags
    # One template point per epoch, and it moved while training (a trajectory, not a constant).
    lab_l = [e.value for e in acc.Scalars("template/lab/L/mu")]
    assert len(lab_l) == 2 and lab_l[0] != lab_l[1]
    images = acc.Tags()["images"]
    assert "normalisation/before_after" in images and len(acc.Images("normalisation/before_after")) == 2
    # csv: Lightning's metrics.csv beside our history.csv
    assert (run / "logs" / "csv" / "metrics.csv").is_file() and (run / "history.csv").is_file()
    # One line per epoch in train.log although the progress bar is off.
    lines = [ln for ln in (run / "train.log").read_text().splitlines() if "epoch " in ln and " | " in ln]
    assert len(lines) == 2, lines
    assert "epoch 1/2" in lines[0] and "train/loss" in lines[0] and "val/acc" in lines[0] and "template lab mu (" in lines[0]


def test_mlflow_and_wandb_log_offline(tmp_path, synth, monkeypatch):
    pytest.importorskip("mlflow", reason="lstainnorm[mlflow] not installed")
    pytest.importorskip("wandb", reason="lstainnorm[wandb] not installed")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    res = train(_cfg(tmp_path, synth, "trainer.logger=[mlflow,wandb]", "trainer.max_epochs=1"))
    logs = Path(res["run_dir"]) / "logs"
    metric_files = {p.name for p in (logs / "mlruns").rglob("metrics/*/*")} | {p.name for p in (logs / "mlruns").rglob("metrics/*")}
    assert "acc" in metric_files or any("acc" in m for m in metric_files), metric_files
    assert list((logs / "mlruns").rglob("*.png")), "the before/after grid was not logged to MLflow"
    offline = list((logs / "wandb").rglob("offline-run-*"))
    assert offline, "no offline W&B run"
    assert list(offline[0].rglob("*.wandb")), "the offline W&B run holds no data"
