"""docs/examples: each script runs end to end on tiny data."""

import os
import sys
from pathlib import Path

import pytest

from lstainnorm.config import make_config
from lstainnorm.data.synthetic import write_synthetic
from lstainnorm.tasks.train import RUN_DIR_ENV, train

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "examples"
pytestmark = pytest.mark.slow


def _run(script: str, *args: str, cwd: Path) -> str:
    """Run an example as ``python docs/examples/SCRIPT ARGS`` would, in this process (saves the
    interpreter start and the imports), and return what it printed."""
    import contextlib
    import io
    import runpy

    out = io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    try:
        sys.argv = [str(EXAMPLES / script), *args]
        os.chdir(cwd)
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return out.getvalue()


def test_every_example_is_tested():
    tested = {"plain_pytorch_timm.py", "lightning_module.py", "segmentation_smp.py", "normalize_folder.py", "core_layer.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_core_layer_example(tmp_path):
    """The layer on torch alone (also run in a venv with only the core install: tests/test_install.py)."""
    out = _run("core_layer.py", cwd=tmp_path)
    assert "lab" in out and "hsv" in out


def _clean_run(script: str, *args: str, tmp_path: Path, monkeypatch) -> str:
    """Run an example with its temporary folders under ``tmp_path/tmp``: none may be left behind, and
    no "Converting a tensor with requires_grad=True to a scalar" warning (``float(loss)``) may show."""
    import tempfile
    import warnings

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _run(script, *args, cwd=tmp_path)
    assert not [str(w.message) for w in caught if "requires_grad=True to a scalar" in str(w.message)]
    # (wandb, imported by Lightning's loggers in this process, keeps two folders of its own there)
    left = [p.name for p in (tmp_path / "tmp").iterdir() if "wandb" not in p.name]
    assert not left, f"the example left its temporary data behind: {left}"
    return out


def test_plain_pytorch_loop_with_timm(tmp_path, monkeypatch):
    out = _clean_run("plain_pytorch_timm.py", "--backbone", "test_resnet", "--size", "32", "--epochs", "1",
                     tmp_path=tmp_path, monkeypatch=monkeypatch)
    assert "epoch 1: loss" in out and "learned template" in out


def test_own_lightning_module(tmp_path):
    out = _run("lightning_module.py", "--backbone", "test_resnet", "--size", "32", "--epochs", "1", "--out", str(tmp_path / "pl"), cwd=tmp_path)
    assert "val/acc" in out and "learned template" in out


def test_segmentation_models_pytorch_unet(tmp_path, monkeypatch):
    out = _clean_run("segmentation_smp.py", "--encoder", "resnet18", "--crop", "64", "--epochs", "1",
                     tmp_path=tmp_path, monkeypatch=monkeypatch)
    assert "training-set Dice" in out


def test_trained_layer_on_a_folder_and_as_a_transform(tmp_path):
    synth = tmp_path / "s"
    write_synthetic(synth, centres=2, per_class=4, size=32, classes=2, workers=1, progress=False)
    os.environ.pop(RUN_DIR_ENV, None)
    cfg, _ = make_config({"data": {"manifest": str(synth / "manifest.csv"), "train_centres": ["A"], "batch_size": 8},
                          "model": {"backbone": "test_resnet"}, "trainer": {"max_epochs": 1, "accelerator": "cpu", "progress": False},
                          "output_path": str(tmp_path / "runs")})
    run = train(cfg)["run_dir"]
    os.environ.pop(RUN_DIR_ENV, None)
    out = _run("normalize_folder.py", "--run", run, "--input", str(synth / "B" / "test"), "--output", str(tmp_path / "out"), cwd=tmp_path)
    n = len(list((synth / "B" / "test").rglob("*.png")))
    assert len(list((tmp_path / "out").rglob("*.png"))) == n and f"wrote {n} images" in out
    assert "transform in a DataLoader" in out
