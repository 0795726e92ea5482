"""One commit, one seed, one machine: the same numbers; and the recipe's averaging and warmup."""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lstainnorm.config import ConfigError, make_config
from lstainnorm.data.synthetic import write_synthetic
from lstainnorm.runs import code_version
from lstainnorm.tasks.build import warmup_lambdas
from lstainnorm.tasks.seeding import derive_seed, seeded
from lstainnorm.tasks.train import RUN_DIR_ENV, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, centres=2, per_class=8, size=32, seed=0, classes=2, workers=1, progress=False)
    return root


@pytest.fixture(autouse=True)
def _fresh_run_dir_env():
    os.environ.pop(RUN_DIR_ENV, None)
    yield
    os.environ.pop(RUN_DIR_ENV, None)


def _cfg(tmp: Path, synth: Path, name: str, *overrides: str):
    raw = {
        "seed": 3, "output_path": str(tmp / name), "postfix": "r",
        "data": {"manifest": str(synth / "manifest.csv"), "train_centres": ["A"], "batch_size": 8, "balance": "sampler"},
        "norm": {"mode": "lstainnorm", "templates": "auto", "compile": "false"},
        "model": {"backbone": "test_resnet", "drop_rate": 0.2},  # dropout: the training loop's own stream
        "optim": {"lr": 0.003},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "progress": False, "logger": "none"},
    }
    return make_config(raw, list(overrides))


def _numbers(res: dict) -> dict:
    run = Path(res["run_dir"])
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    return {"state": state, "test": res["test"]["overall"], "history": (run / "history.csv").read_text()}


def _assert_same(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.allclose(a["state"][k].double(), b["state"][k].double(), atol=1e-6, rtol=0), k
    for k in ("acc", "bal_acc", "auroc", "f1"):
        assert a["test"][k] == pytest.approx(b["test"][k], abs=1e-6), k


def test_same_seed_same_numbers_whatever_drew_from_the_global_generator(tmp_path, synth, monkeypatch):
    """Two runs of one config on one machine agree to 1e-6, weights and metrics, even when the run's
    set-up draws other numbers from the global generators (as a code change elsewhere would): the
    network's and the layer's initial weights and the training loop each have their own stream."""
    import lstainnorm.tasks.train as tt

    cfg, notes = _cfg(tmp_path, synth, "a")
    a = _numbers(train(cfg, notes))
    os.environ.pop(RUN_DIR_ENV, None)
    original = tt.resolve_augment_stats

    def drawing(*args, **kwargs):  # between the run's seeding and the building of its model
        torch.rand(1000), np.random.rand(10), random.random()
        return original(*args, **kwargs)

    monkeypatch.setattr(tt, "resolve_augment_stats", drawing)
    cfg, notes = _cfg(tmp_path, synth, "b")
    b = _numbers(train(cfg, notes))
    _assert_same(a, b)
    os.environ.pop(RUN_DIR_ENV, None)
    cfg, notes = _cfg(tmp_path, synth, "c", "seed=4")  # and the seed does matter
    c = _numbers(train(cfg, notes))
    assert any(not torch.equal(a["state"][k], c["state"][k]) for k in a["state"] if a["state"][k].is_floating_point())


def test_every_run_records_the_code_it_ran(tmp_path, synth):
    cfg, notes = _cfg(tmp_path, synth, "v", "trainer.max_epochs=1", "norm.mode=none")
    res = train(cfg, notes)
    saved = json.loads((Path(res["run_dir"]) / "metrics.json").read_text())
    assert saved["code"]["lstainnorm"] and saved["code"]["torch"] == torch.__version__
    here = code_version()
    assert saved["code"]["commit"] == here["commit"]  # None outside a git checkout, the HEAD inside one
    if here["commit"] is not None:
        assert len(here["commit"]) == 40 and isinstance(here["dirty"], bool)


def test_ema_and_warmup_train_and_the_checkpoint_holds_the_averaged_weights(tmp_path, synth):
    cfg, notes = _cfg(tmp_path, synth, "ema", "optim.ema_decay=0.9", "optim.warmup_epochs=1", "data.batch_size=2")
    res = train(cfg, notes)
    run = Path(res["run_dir"])
    ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    avg, raw = ck["state_dict"], ck["current_model_state"]
    assert avg.keys() == raw.keys()
    # The averaged weights are what validation saw and the best checkpoint holds, not the raw ones.
    assert any(not torch.allclose(avg[k], raw[k]) for k in avg if avg[k].is_floating_point())
    hist = (run / "history.csv").read_text().splitlines()
    head = hist[0].split(",")
    lr = [float(r.split(",")[head.index("lr/net")]) for r in hist[1:]]
    assert lr[0] < 0.003 * 0.5  # epoch 1 started inside the warmup (the first step's rate)
    assert np.isfinite(res["test"]["overall"]["bal_acc"])


def test_warmup_keeps_the_epoch_schedule_and_ramps_the_first_steps():
    f = [lambda e: 0.5 ** e]
    (g,) = warmup_lambdas(f, steps_per_epoch=10, warmup_steps=5)
    assert [g(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert g(9) == 1.0 and g(10) == 0.5 and g(25) == 0.25


def test_recipe_config_errors():
    with pytest.raises(ConfigError, match="optim.ema_decay"):
        make_config({}, ["optim.ema_decay=1.5"])
    with pytest.raises(ConfigError, match="optim.warmup_epochs"):
        make_config({}, ["optim.warmup_epochs=-1"])


def test_streams_are_independent_and_leave_the_global_generator_alone():
    assert derive_seed(0, "net") != derive_seed(0, "norm") != derive_seed(1, "net")
    assert derive_seed(7, "net") == derive_seed(7, "net") and 0 <= derive_seed(7, "net") < 2**31
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    with seeded(5, "net"):
        x = torch.rand(3)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.rand(10)
    with seeded(5, "net"):
        assert torch.equal(torch.rand(3), x)


def test_tables_say_which_commits_their_rows_come_from():
    from lstainnorm.experiments.runner import commits_line

    one = [{"code": {"commit": "a" * 40, "dirty": False}}] * 3
    assert commits_line(one) == "Code: aaaaaaaaaa (3 runs)."
    mixed = one + [{"code": {"commit": "b" * 40, "dirty": True}}, {}]
    line = commits_line(mixed)
    assert "aaaaaaaaaa (3 runs)" in line and "bbbbbbbbbb+changes (1 run)" in line and "unrecorded (1 run)" in line
    assert "mix code versions" in line


def test_best_threshold_maximises_balanced_accuracy_and_prefers_the_middle():
    from lstainnorm.tasks.classify import best_threshold, classification_metrics, decide

    p1 = torch.tensor([0.1, 0.2, 0.3, 0.35, 0.6, 0.7, 0.8, 0.9])
    probs = torch.stack([1 - p1, p1], 1)
    labels = torch.tensor([0, 0, 0, 1, 0, 1, 1, 1])
    t = best_threshold(probs, labels)
    # 0.325 (every positive above, 3 of 4 negatives below) and 0.65 (the reverse) both give 0.875:
    # the one nearer 0.5 wins.
    assert t == pytest.approx(0.65)
    m = classification_metrics(probs, labels, 2, t)
    assert m["bal_acc"] == pytest.approx(0.875) and m["confusion"] == [[4, 0], [1, 3]]
    assert classification_metrics(probs, labels, 2)["bal_acc"] == pytest.approx(0.75)  # argmax
    assert m["auroc"] == classification_metrics(probs, labels, 2)["auroc"]
    assert decide(probs, None).tolist() == (p1 >= 0.5).long().tolist()
    assert best_threshold(probs, torch.zeros(8, dtype=torch.long)) is None  # one class: nothing to fit
    assert best_threshold(torch.rand(4, 3).softmax(1), torch.tensor([0, 1, 2, 0])) is None


def test_threshold_val_fits_on_validation_and_evaluate_reuses_it(tmp_path, synth):
    from lstainnorm.tasks.evaluate import load_module

    cfg, notes = _cfg(tmp_path, synth, "thr", "trainer.threshold=val", "trainer.max_epochs=1", "norm.mode=none", "data.split_seed=0")
    res = train(cfg, notes)
    t = res["threshold"]
    assert t is None or 0.0 <= t <= 1.0
    saved = json.loads((Path(res["run_dir"]) / "metrics.json").read_text())
    assert saved["threshold"] == t
    assert load_module(res["run_dir"]).task.threshold == t
    with pytest.raises(ConfigError, match="trainer.threshold"):
        make_config({}, ["trainer.threshold=median"])


def test_split_seed_fixes_the_validation_split_across_seeds(synth):
    from lstainnorm.tasks.loaders import build_classification_data

    def val_paths(*ov):
        cfg, _ = make_config({"data": {"manifest": str(synth / "manifest.csv"), "val_split": "carved"}}, list(ov))
        return sorted(r.path for r in build_classification_data(cfg, cfg.seed).val.records)

    assert val_paths("seed=1", "data.split_seed=0") == val_paths("seed=2", "data.split_seed=0")
    assert val_paths("seed=1") != val_paths("seed=2") or val_paths("seed=1") != val_paths("seed=3")


def test_grouped_split_with_strata_puts_every_centre_in_validation():
    from lstainnorm.data.tiles import grouped_split

    rng = np.random.default_rng(0)
    centres = ["big"] * 400 + ["c1"] * 120 + ["c2"] * 120 + ["c3"] * 120  # 6 slides or more each
    groups = [f"{c}-{i // 20}" for i, c in enumerate(centres)]  # slides of 20 tiles
    labels = rng.integers(0, 2, len(centres)).tolist()
    for seed in range(5):
        tr, va = grouped_split(labels, groups, 0.2, seed, strata=centres)
        assert {centres[i] for i in va} == {"big", "c1", "c2", "c3"}
        assert not {groups[i] for i in tr} & {groups[i] for i in va}
