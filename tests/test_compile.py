"""The optional torch.compile switch: same numbers as eager, no graph breaks in the hot path."""

from pathlib import Path

import pytest
import torch
from conftest import he_like

from lstainnorm import LStainNorm, StainNorm

pytestmark = pytest.mark.slow


def _dynamo_ok():
    try:
        import torch._dynamo  # noqa: F401
    except Exception:  # pragma: no cover
        return False
    return True


@pytest.mark.skipif(not _dynamo_ok(), reason="torch.compile unavailable")
def test_compiled_lstainnorm_equals_eager_without_graph_breaks():
    torch._dynamo.reset()
    norm = LStainNorm()
    x = he_like(2, 24, 16)
    eager = norm(x)
    # fullgraph=True (the default of enable_compile) raises on any graph break.
    norm.enable_compile(dynamic=False)
    assert norm.is_compiled
    out = norm(x)
    assert torch.allclose(out, eager, atol=1e-5)
    explanation = torch._dynamo.explain(norm._forward_impl)(x, None)
    assert explanation.graph_break_count == 0
    out.sum().backward()  # the compiled graph trains too
    assert norm.a.grad is not None and torch.isfinite(norm.a.grad).all()
    norm.disable_compile()
    assert not norm.is_compiled


@pytest.mark.skipif(not _dynamo_ok(), reason="torch.compile unavailable")
def test_compiled_stainnorm_equals_eager():
    torch._dynamo.reset()
    norm = StainNorm("lab")
    x = he_like(2, 16, 16)
    eager = norm(x)
    assert torch.allclose(norm.enable_compile()(x), eager, atol=1e-5)


def test_compiled_module_pickles():
    import copy

    norm = StainNorm("hsv").enable_compile()
    clone = copy.deepcopy(norm)
    assert not clone.is_compiled
    assert torch.equal(clone.mu0, norm.mu0)


@pytest.mark.skipif(not _dynamo_ok(), reason="torch.compile unavailable")
def test_compiled_attention_outside_its_bound_falls_back_to_exact():
    torch._dynamo.reset()
    norm = LStainNorm()
    with torch.no_grad():
        norm.attention.query.weight.mul_(2000.0)  # logits spread far beyond the compiled rank's bound
        norm.attention.key.weight.mul_(2000.0)
    x = he_like(2, 24, 16)
    eager = norm(x)
    norm.enable_compile(dynamic=False)
    assert torch.allclose(norm(x), eager, atol=1e-5)


def test_compile_mode_auto_compiles_for_training_only(monkeypatch):
    from lstainnorm.runs import AUTO_COMPILE_MIN_STEPS, COMPILE_ENV, compile_mode

    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert compile_mode("auto", training=True) == "fallback"
    assert compile_mode("auto", training=True, steps=AUTO_COMPILE_MIN_STEPS) == "fallback"
    assert compile_mode("auto", training=True, steps=AUTO_COMPILE_MIN_STEPS - 1) == "eager"  # too short to pay off
    assert compile_mode("true", training=True, steps=10) == "compile"
    assert compile_mode("auto", training=False) == "eager"
    assert compile_mode("true", training=False) == "compile"
    assert compile_mode("false", training=True) == "eager"
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert compile_mode("auto", training=True) == "eager"
    assert compile_mode("true", training=True) == "compile"  # an explicit setting wins
    monkeypatch.setenv(COMPILE_ENV, "1")
    assert compile_mode("auto", training=False) == "fallback"


def test_config_compile_accepts_yaml_booleans_and_rejects_others():
    from lstainnorm.config import ConfigError, make_config

    assert make_config({})[0].norm.compile == "auto"
    assert make_config({"norm": {"compile": True}})[0].norm.compile == "true"
    assert make_config({}, ["norm.compile=false"])[0].norm.compile == "false"
    with pytest.raises(ConfigError, match="norm.compile"):
        make_config({}, ["norm.compile=sometimes"])


def test_failed_compilation_falls_back_to_eager_with_a_warning():
    norm = StainNorm("lab").enable_compile(fallback=True)

    def broken(*args):
        raise RuntimeError("InductorError: no C++ compiler found")

    norm._compiled = broken
    x = he_like(2, 16, 16)
    with pytest.warns(UserWarning, match="torch.compile failed.*runs eagerly"):
        out = norm(x)
    assert not norm.is_compiled
    assert torch.allclose(out, StainNorm("lab")(x))
    strict = StainNorm("lab").enable_compile()
    strict._compiled = broken
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        strict(x)


@pytest.mark.skipif(not _dynamo_ok(), reason="torch.compile unavailable")
def test_train_with_default_compile_setting_compiles_long_runs_only(tmp_path, monkeypatch):
    """norm.compile=auto (the default): a short run stays eager, a long one trains compiled; both say so."""
    from lstainnorm import runs
    from lstainnorm.config import make_config
    from lstainnorm.data.synthetic import write_synthetic
    from lstainnorm.tasks.train import RUN_DIR_ENV, train

    monkeypatch.delenv("LSTAINNORM_COMPILE", raising=False)
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    torch._dynamo.reset()
    write_synthetic(tmp_path / "d", centres=1, per_class=4, size=32, seed=0, classes=2, workers=1, progress=False)
    cfg, notes = make_config({
        "output_path": str(tmp_path / "runs"),
        "data": {"manifest": str(tmp_path / "d" / "manifest.csv"), "batch_size": 4},
        "norm": {"mode": "learnable"}, "model": {"backbone": "test_resnet"},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "progress": False},
    })
    assert cfg.norm.compile == "auto"
    res = train(cfg, notes)
    assert "runs eagerly (1 training steps" in (Path(res["run_dir"]) / "train.log").read_text()
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    monkeypatch.setattr(runs, "AUTO_COMPILE_MIN_STEPS", 1)
    res = train(cfg, notes)
    assert "runs through torch.compile (1 training steps" in (Path(res["run_dir"]) / "train.log").read_text()
    assert 0.0 <= res["test"]["overall"]["acc"] <= 1.0
