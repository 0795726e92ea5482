"""Training and evaluation end to end, on generated tiles (tiny backbone, few steps)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import killed_writer_temp
from PIL import Image

from lstainnorm.config import ConfigError, load_config, make_config, to_dict
from lstainnorm.data.synthetic import write_synthetic
from lstainnorm.runs import load_norm
from lstainnorm.tasks.evaluate import evaluate, load_module
from lstainnorm.tasks.train import RUN_DIR_ENV, train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, centres=2, per_class=10, size=32, seed=0, classes=3, workers=1, progress=False)
    return root


def _cfg(tmp, synth, *overrides):
    raw = {
        "seed": 1,
        "output_path": str(tmp / "runs"),
        "postfix": "t",
        "data": {"manifest": str(synth / "manifest.csv"), "train_centres": ["A"], "batch_size": 16},
        "norm": {"mode": "lstainnorm", "templates": "auto", "lr": 0.05},
        "model": {"backbone": "test_resnet"},
        "optim": {"lr": 0.003},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "progress": False},
    }
    cfg, notes = make_config(raw, list(overrides))
    return cfg, notes


@pytest.fixture(autouse=True)
def _fresh_run_dir_env():
    os.environ.pop(RUN_DIR_ENV, None)
    yield
    os.environ.pop(RUN_DIR_ENV, None)


def test_end_to_end_run_outputs_and_learning(tmp_path, synth):
    cfg, notes = _cfg(tmp_path, synth)
    res = train(cfg, notes)
    run = Path(res["run_dir"])
    for f in ("config.yaml", "train.log", "classes.json", "template_init.yaml", "history.csv", "template_history.jsonl", "metrics.json", "normalization.png", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run / f).is_file(), f
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["test"]["per_centre"]) == {"A", "B"}
    assert {"acc", "bal_acc", "f1", "auroc", "confusion"} <= set(metrics["test"]["overall"])
    assert metrics["in_centre"]["centres"] == ["A"] and metrics["cross_centre"]["centres"] == ["B"]
    # The normalisation parameters moved away from their initial values.
    traj = [json.loads(line) for line in (run / "template_history.jsonl").read_text().splitlines()]
    assert [t["epoch"] for t in traj] == [-1, 0, 1]
    assert traj[0]["internal"]["lab"]["mu"] != traj[-1]["internal"]["lab"]["mu"]
    assert traj[0]["fusion"]["lab"]["a"] != traj[-1]["fusion"]["lab"]["a"]
    init = yaml.safe_load((run / "template_init.yaml").read_text())
    assert traj[0]["internal"]["lab"]["mu"] == pytest.approx(init["mu0_lab"])
    # One row per test tile, in the test set's order, with a path from the manifest.
    import csv

    preds = list(csv.DictReader(open(run / "test_predictions.csv", newline="")))
    assert len(preds) == metrics["test"]["overall"]["n"] and metrics["test_predictions"].endswith("test_predictions.csv")
    acc = sum(p["label"] == p["prediction"] for p in preds) / len(preds)
    assert acc == pytest.approx(metrics["test"]["overall"]["acc"], abs=1e-6)
    assert {p["centre"] for p in preds} == {"A", "B"} and all(Path(p["path"]).is_file() for p in preds)
    assert "predictions" not in metrics["test"] and "predictions" not in metrics["val"]
    # Rerunning the saved config reproduces the config.
    again, _ = load_config(run / "config.yaml")
    assert again.norm.mode == "lstainnorm"


def test_best_checkpoint_reloads_to_identical_predictions(tmp_path, synth):
    cfg, notes = _cfg(tmp_path, synth, "norm.mode=learnable", "trainer.max_epochs=1")
    res = train(cfg, notes)
    a, b = load_module(res["run_dir"]), load_module(res["best_checkpoint"])
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        # The layer alone, loaded without the network, is the trained layer.
        trained = load_norm(res["run_dir"])
        assert trained.config.norm.mode == "learnable" and trained.window == 224
        assert not any(k.startswith("net.") for k in trained.norm.state_dict())
        assert torch.equal(trained.norm(x), a.norm(x))
        assert not torch.equal(trained.norm.dmu, torch.zeros(3))
    ev = evaluate(res["run_dir"], synth / "manifest.csv", split="test", progress=False)
    assert ev["overall"]["acc"] == pytest.approx(res["test"]["overall"]["acc"])
    assert ev["per_centre"]["B"]["n"] == res["test"]["per_centre"]["B"]["n"]


def test_evaluate_folder_with_corrupt_image(tmp_path, synth):
    cfg, notes = _cfg(tmp_path, synth, "norm.mode=none", "trainer.max_epochs=1")
    res = train(cfg, notes)
    folder = tmp_path / "eval"
    for row in (synth / "manifest.csv").read_text().splitlines()[1:]:
        path, cls, centre, split = row.split(",")
        if split == "test" and centre == "B":
            (folder / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(synth / path, folder / cls / Path(path).name)
    (folder / "tumour" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.warns(UserWarning, match="broken.png"):
        ev = evaluate(res["run_dir"], folder, progress=False)
    assert len(ev["skipped_files"]) == 1 and ev["skipped_files"][0].endswith("broken.png")
    assert ev["overall"]["n"] == sum(1 for _ in folder.rglob("*.png")) - 1
    assert Path(ev["output"]).is_file()
    rows = Path(ev["predictions"]).read_text().splitlines()
    assert len(rows) == 1 + ev["overall"]["n"] and not any("broken.png" in r for r in rows)


def test_template_from_one_image_and_ablation_switches(tmp_path, synth):
    """norm.templates may name one image (as a classical normaliser's target); norm.fusion and
    norm.learn_template reach the layer a run trains."""
    from lstainnorm.runs import resolve_template_setting
    from lstainnorm.layers.template import estimate_template
    from lstainnorm.data.io import read_rgb

    image = sorted((synth / "A" / "train").rglob("*.png"))[0]
    cfg, notes = _cfg(tmp_path, synth, f"norm.templates={image}", "norm.fusion=mean", "norm.learn_template=false", "trainer.max_epochs=1")
    expected = estimate_template([read_rgb(image)], spaces=["lab", "hsv", "rgb"], tissue_mask=True, progress=False)
    got = resolve_template_setting(cfg.norm)
    for space in ("lab", "hsv", "rgb"):
        assert got[space][0] == pytest.approx(expected[space][0]) and got[space][1] == pytest.approx(expected[space][1])
    res = train(cfg, notes)
    init = yaml.safe_load((Path(res["run_dir"]) / "template_init.yaml").read_text())
    assert init["mu0_lab"] == pytest.approx(expected.stats["lab"][0])
    module = load_module(res["run_dir"])
    assert module.norm.fusion == "mean" and not any(p.requires_grad for p in module.norm.parameters())
    bad, _ = _cfg(tmp_path, synth, f"norm.templates={tmp_path / 'missing.png'}")
    with pytest.raises(FileNotFoundError, match="norm.templates: image not found"):
        resolve_template_setting(bad.norm)


def test_config_errors():
    with pytest.raises(ConfigError, match=r"unknown key 'data.batchsize'.*did you mean 'batch_size'"):
        make_config({"data": {"batchsize": 3}})
    with pytest.raises(ConfigError, match=r"norm.mode: invalid value 'foo'; choose one of \['learnable', 'lstainnorm'"):
        make_config({}, ["norm.mode=foo"])
    with pytest.raises(ConfigError, match="data.batch_size"):
        make_config({}, ["data.batch_size=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        make_config({}, ["trainer.max_epochs"])
    with pytest.raises(ConfigError, match="trainer.max_epochs must be at least 1"):
        make_config({}, ["trainer.max_epochs=0"])
    with pytest.raises(ConfigError, match="norm.spaces: invalid value 'xyz'"):
        make_config({"norm": {"spaces": ["lab", "xyz"]}})


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("norm:\n  mdoe: lstainnorm\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'norm.mdoe'.*did you mean 'mode'"):
        load_config(bad)


def test_reference_config_mapping():
    raw = yaml.safe_load((REPO / "configs" / "reference-config-SA1.yaml").read_text())
    cfg, notes = make_config(raw)
    assert any("reference config detected" in n for n in notes)
    assert cfg.norm.mode == "lstainnorm" and cfg.model.backbone == "resnet50"
    assert cfg.optim.lr == pytest.approx(5e-4) and cfg.trainer.max_epochs == 100 and cfg.trainer.patience == 8
    assert cfg.norm.template_values["mu0_lab"] == pytest.approx([19.5645, 20.6909, -16.7789])
    assert cfg.data.train.endswith("NCT-CRC-HE-100K-NONORM") and cfg.data.test.endswith("CRC-VAL-HE-7K")
    prenorm, _ = make_config({**raw, "SA3": False, "prenorm": True})
    assert prenorm.norm.mode == "learnable" and list(prenorm.norm.mu0) == [19.5645, 20.6909, -16.7789]
    with pytest.raises(ConfigError, match="choose one of SA3, prenorm, temnorm"):
        make_config({**raw, "prenorm": True})
    with pytest.raises(ConfigError, match="unknown key 'lerning_rate'.*learning_rate"):
        make_config({**raw, "lerning_rate": 1})


def test_reference_config_runs_on_generated_data(tmp_path, synth):
    # ImageFolder trees like the reference's train_root / test_root.
    for split, root in (("train", tmp_path / "train_root"), ("test", tmp_path / "test_root")):
        for row in (synth / "manifest.csv").read_text().splitlines()[1:]:
            path, cls, centre, s = row.split(",")
            if s == split or (split == "train" and s == "val"):
                (root / cls).mkdir(parents=True, exist_ok=True)
                shutil.copy(synth / path, root / cls / Path(path).name)
    raw = yaml.safe_load((REPO / "configs" / "reference-config-SA1.yaml").read_text())
    raw.update(train_root=str(tmp_path / "train_root"), test_root=str(tmp_path / "test_root"), output_path=str(tmp_path / "out"), model="test_resnet", batch_size=16, epochs=1, num_workers=0, device="cpu")
    cfg_file = tmp_path / "config-SA1.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    cfg, notes = load_config(cfg_file, ["trainer.progress=false"])
    res = train(cfg, notes)
    assert res["test"]["overall"]["n"] > 0
    assert Path(res["run_dir"]).name.endswith("_SA3_resnet50")
    assert "reference config detected" in (Path(res["run_dir"]) / "train.log").read_text()


def _cli(args, env=None, timeout=600):
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    e.pop(RUN_DIR_ENV, None)
    return subprocess.run([sys.executable, "-m", "lstainnorm.cli", *args], capture_output=True, text=True, env=e, timeout=timeout)


def _write_cfg(tmp, synth, name, batch_size=16, **extra):
    raw = {
        "seed": 3,
        "output_path": str(tmp / name),
        "postfix": name,
        "data": {"manifest": str(synth / "manifest.csv"), "train_centres": ["A"], "batch_size": batch_size},
        "norm": {"mode": "lstainnorm", "lr": 0.05},
        "model": {"backbone": "test_resnet"},
        "trainer": {"max_epochs": 3, "accelerator": "cpu", "progress": False, "patience": 10, **extra},
    }
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _only_run(folder: Path) -> Path:
    runs = [p for p in folder.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.heavy
def test_resume_after_interruption_ends_like_uninterrupted(tmp_path, synth):
    full = _cli(["train", str(_write_cfg(tmp_path, synth, "full"))])
    assert full.returncode == 0, full.stderr[-3000:]
    cut = _cli(["train", str(_write_cfg(tmp_path, synth, "cut"))], env={"LSTAINNORM_INTERRUPT_AFTER_EPOCHS": "1"})
    assert cut.returncode != 0  # interrupted after one epoch
    run = _only_run(tmp_path / "cut")
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "metrics.json").exists()
    half = killed_writer_temp(run / "checkpoints", "last.ckpt")  # as a kill -9 mid-save leaves it
    resumed = _cli(["train", "--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not half.exists() and not list(run.rglob(".tmp-*"))
    a = torch.load(_only_run(tmp_path / "full") / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    ma = json.loads((_only_run(tmp_path / "full") / "metrics.json").read_text())
    mb = json.loads((run / "metrics.json").read_text())
    assert ma["test"]["overall"]["acc"] == pytest.approx(mb["test"]["overall"]["acc"])
    hist = (run / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in hist[1:]] == ["0", "1", "2"]


def _same_weights_and_test(run_a: Path, run_b: Path) -> None:
    a = torch.load(run_a / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(run_b / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (run_a, run_b))
    assert ma["test"]["overall"]["acc"] == pytest.approx(mb["test"]["overall"]["acc"])


@pytest.mark.heavy
def test_sigterm_mid_epoch_saves_the_step_and_resume_ends_like_uninterrupted(tmp_path, synth):
    """What SLURM/Kubernetes send before a kill: the run saves the current step, says how to resume,
    exits 143; --resume continues from that step (mid-epoch) to the same weights as a run never stopped."""
    full = _cli(["train", str(_write_cfg(tmp_path, synth, "full", batch_size=4, max_epochs=2))])
    assert full.returncode == 0, full.stderr[-3000:]
    cut = _cli(["train", str(_write_cfg(tmp_path, synth, "cut", batch_size=4, max_epochs=2))],
               env={"LSTAINNORM_SIGNAL_AT": "SIGTERM:1:1"})  # epoch 2, after its second batch
    assert cut.returncode == 143, cut.stderr[-3000:]
    run = _only_run(tmp_path / "cut")
    log = (run / "train.log").read_text()
    assert "stopped by SIGTERM at epoch 2 step 2" in log and f"lstainnorm train --resume {run}" in log
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "metrics.json").exists()
    resumed = _cli(["train", "--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from a checkpoint that ended before the epoch ended" not in resumed.stderr
    _same_weights_and_test(_only_run(tmp_path / "full"), run)


def test_sigterm_before_the_first_step_removes_the_new_run_folder(tmp_path, synth, monkeypatch):
    import signal

    from lstainnorm.tasks import train as train_mod

    def terminated(*args, **kwargs):  # SIGTERM while the run is being set up (template estimation)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this

    monkeypatch.setattr(train_mod, "resolve_initial_template", terminated)
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    cfg, notes = _cfg(tmp_path, synth)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as err:
        train(cfg, notes)
    assert err.value.code == 143
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert signal.getsignal(signal.SIGTERM) == before  # the default handler is back


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("task: classification\n")
    r = _cli(["train", "--resume", str(tmp_path / "run")])
    assert r.returncode == 1 and "nothing to resume" in r.stderr


def test_ddp_two_processes_on_cpu_keep_templates_identical(tmp_path, synth):
    cfg = _write_cfg(tmp_path, synth, "ddp", max_epochs=1, devices=2, strategy="ddp")
    r = _cli(["train", str(cfg)], timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    run = _only_run(tmp_path / "ddp")
    check = json.loads((run / "ddp_check.json").read_text())
    assert check["world_size"] == 2 and check["identical"] is True
    assert (run / "metrics.json").is_file()


def test_cli_help_lists_commands():
    r = _cli(["--help"])
    for cmd in ("synth", "template", "train", "evaluate", "demo"):
        assert cmd in r.stdout
    for cmd in ("synth", "template", "train", "evaluate", "demo"):
        h = _cli([cmd, "--help"])
        assert h.returncode == 0 and "examples:" in h.stdout


def test_demo_config_copy_is_in_sync():
    packaged = (REPO / "src" / "lstainnorm" / "configs" / "demo.yaml").read_text()
    copy = (REPO / "configs" / "demo.yaml").read_text()
    assert copy.split("\n", 1)[1] == packaged
    assert (REPO / "configs" / "classify.yaml").read_text() == (REPO / "src" / "lstainnorm" / "configs" / "classify.yaml").read_text()


def test_packaged_configs_resolve_by_name_and_validate(tmp_path, monkeypatch):
    from lstainnorm.cli import main
    from lstainnorm.config import packaged_configs, resolve_config

    monkeypatch.chdir(tmp_path)  # outside the checkout: only the package's own files
    assert {"classify", "segment", "demo"} <= set(packaged_configs())
    for name in packaged_configs():
        cfg, _ = load_config(name)
        assert cfg.task in ("classification", "segmentation")
        assert resolve_config(f"{name}.yaml") == packaged_configs()[name]
    (tmp_path / "classify").mkdir()  # a folder of that name is not a config file: the packaged one is used
    assert load_config("classify")[0].task == "classification"
    with pytest.raises(FileNotFoundError, match="lstainnorm configs"):
        load_config("nosuch")
    assert main(["configs"]) == 0 and main(["configs", "segment"]) == 0


def test_pretrained_without_local_weights_is_a_clear_error(tmp_path):
    from omegaconf import OmegaConf

    from lstainnorm.tasks.build import build_classifier

    cfg = OmegaConf.create({"backbone": "test_resnet", "pretrained": True, "weights": None, "drop_rate": 0.0})
    with pytest.raises(ValueError, match="not available locally.*model.weights"):  # offline: no download attempt
        build_classifier(cfg, 3)
    # A local weights file works.
    import timm

    path = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), path)
    cfg.weights = str(path)
    assert build_classifier(cfg, 3) is not None
    cfg.weights = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="model.weights"):
        build_classifier(cfg, 3)


def test_removed_consistency_keys_are_dropped_when_off_and_refused_when_on(tmp_path, synth):
    """norm.consistency was removed (no gain, twice the layer's cost). A saved run's
    config.yaml still carries it switched off: that loads, with a note; asking for the term is a
    clear error, from the YAML and from an override."""
    from lstainnorm.config import config_from_dict, make_config

    cfg, notes = make_config({"norm": {"mode": "lstainnorm", "consistency": 0.0, "consistency_strength": 4.0}})
    assert "consistency" not in cfg.norm and any("norm.consistency ignored" in n for n in notes)
    cfg, notes = make_config({}, ["norm.consistency=0"])
    assert any("override 'norm.consistency=0' ignored" in n for n in notes)
    for raw, ov in (({"norm": {"consistency": 1.0}}, []), ({}, ["norm.consistency=1.0"])):
        with pytest.raises(ConfigError, match="consistency term .* was removed"):
            make_config(raw, ov)
    saved = to_dict(_cfg(tmp_path, synth)[0])
    saved["norm"] = {**saved["norm"], "consistency": 2.0, "consistency_strength": 4.0}  # a run trained with it
    assert "consistency" not in config_from_dict(saved).norm  # its model still loads
    with pytest.raises(ConfigError, match="unknown key 'norm.consistenc'"):  # other unknown keys stay errors
        make_config({"norm": {"consistenc": 1.0}})


def test_stain_mode_trains_from_the_config(tmp_path, synth):
    """norm.mode=stain trains end to end, with a learned stain matrix; norm.stains is validated."""
    import torch

    from lstainnorm.tasks.module import StainNormModule

    cfg, notes = _cfg(tmp_path, synth, "norm.mode=stain", "norm.stains=learned", "trainer.max_epochs=1")
    res = train(cfg, notes)
    assert (Path(res["run_dir"]) / "metrics.json").is_file()
    module = StainNormModule(to_dict(cfg), ["a", "b", "c"], ["A"])
    assert type(module.norm).__name__ == "StainConcentrationNorm" and module.norm.stains == "learned"
    batch = {"image": torch.rand(4, 3, 32, 32) * 0.6 + 0.3, "label": torch.tensor([0, 1, 2, 0])}
    module.log = lambda *a, **k: None  # a step outside a Trainer: nothing to log to
    module.training_step(batch, 0).backward()
    assert torch.isfinite(module.norm.he.grad).all() and module.norm.he.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="norm.stains: invalid value 'vahadane'"):
        _cfg(tmp_path, synth, "norm.mode=stain", "norm.stains=vahadane")


def test_stain_first_config_builds_the_stage_and_its_template(tmp_path, synth):
    """norm.stain_first: the layer gets a StainConcentrationNorm stage, the auto template is estimated on what the
    branches see (stain-normalised tiles), and other modes refuse the key."""
    cfg, notes = _cfg(tmp_path, synth, "norm.stain_first=true", "norm.templates=auto", "trainer.max_epochs=1")
    res = train(cfg, notes)
    run = Path(res["run_dir"])
    assert (run / "metrics.json").is_file() and (run / "template_init.yaml").is_file()
    from lstainnorm.runs import load_norm

    norm = load_norm(run).norm
    assert norm.stain_first is not None and norm.stain_first.stains == "estimate"
    with pytest.raises(ConfigError, match="norm.stain_first adds a stain stage"):
        _cfg(tmp_path, synth, "norm.stain_first=true", "norm.mode=macenko")
    from lstainnorm.runs import build_norm

    frozen, _ = _cfg(tmp_path, synth, "norm.stain_first=true", "norm.stain_learnable=false")
    assert not build_norm(frozen.norm).stain_first.log_amounts.requires_grad
    with pytest.raises(ConfigError, match="norm.stain_learnable .* needs norm.stain_first: true"):
        _cfg(tmp_path, synth, "norm.stain_learnable=false")
