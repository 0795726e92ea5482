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


@pytest.mark.heavy
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


# -- a user's own torch.compile of the layer or of a model holding it ----------------------------------
def _grads(module: torch.nn.Module, x: torch.Tensor):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}, x.grad.clone()


def _eager_and_compiled(make, x: torch.Tensor, **compile_kwargs):
    """Forward + backward of ``make()`` eagerly and through the user's ``torch.compile``, from equal weights."""
    torch.manual_seed(0)
    eager_m = make()
    compiled_m = make()
    compiled_m.load_state_dict(eager_m.state_dict())
    results = []
    for m, run in ((eager_m, eager_m), (compiled_m, torch.compile(compiled_m, **compile_kwargs))):
        xi = x.clone().requires_grad_(True)
        out = run(xi)
        assert isinstance(out, torch.Tensor), f"got {type(out).__name__}, not the output tensor"
        (out.square().sum()).backward()
        results.append((out.detach(), *_grads(m, xi)))
    return results


def _assert_same(eager, compiled, atol=1e-5):
    (out_e, g_e, gx_e), (out_c, g_c, gx_c) = eager, compiled
    assert torch.allclose(out_c, out_e, atol=atol, rtol=1e-4), (out_c - out_e).abs().max()
    assert set(g_c) == set(g_e) and g_e
    for name in g_e:
        assert torch.allclose(g_c[name], g_e[name], atol=atol, rtol=1e-3), (name, (g_c[name] - g_e[name]).abs().max())
    assert torch.allclose(gx_c, gx_e, atol=atol, rtol=1e-3)


@pytest.mark.skipif(not _dynamo_ok(), reason="torch.compile unavailable")
def test_user_compile_of_the_layer_returns_the_image_and_its_gradients():
    # aot_eager traces like inductor (dynamo + AOT autograd: where the tuple came from) without
    # generating C++; the model test below runs the default inductor backend.
    torch._dynamo.reset()
    eager, compiled = _eager_and_compiled(LStainNorm, he_like(2, 24, 16), backend="aot_eager")
    _assert_same(eager, compiled)


@pytest.mark.heavy
@pytest.mark.skipif(not _dynamo_ok(), reason="torch.compile unavailable")
def test_user_compile_of_with_stain_norm_model_trains_like_eager():
    """The issue's reproduction: torch.compile(with_stain_norm(net, LStainNorm())) crashed in conv2d."""
    import timm

    from lstainnorm import with_stain_norm

    torch._dynamo.reset()

    def make():
        return with_stain_norm(timm.create_model("test_resnet", num_classes=2), LStainNorm())

    # eval(): batch-norm statistics would otherwise update differently in the two passes' order.
    eager, compiled = _eager_and_compiled(lambda: make().eval(), he_like(2, 32, 32))
    _assert_same(eager, compiled, atol=1e-4)


@pytest.mark.skipif(not _dynamo_ok(), reason="torch.compile unavailable")
def test_user_compile_of_own_module_keeps_the_exact_fallback():
    """A user's module holding the layer: where the fixed rank's error bound fails (logits spread far)
    the graph takes the exact attention, as eager does. (aot_eager: the torch.cond graph that inductor
    compiles in the model test above, here in seconds.)"""

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = LStainNorm()
            with torch.no_grad():
                self.norm.attention.query.weight.mul_(2000.0)
                self.norm.attention.key.weight.mul_(2000.0)
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(self.norm(x)).mean(dim=(-2, -1))

    torch._dynamo.reset()
    x = he_like(2, 24, 16)
    from lstainnorm.layers.fusion import COMPILED_RANK, SharedAttention

    head = Head()
    with torch.no_grad():  # the case really is outside the compiled rank's bound
        xs = head.norm._branch_images(x, None)
        pooled = torch.cat([head.norm.attention.pooled(xi) for xi in xs])
        assert not bool(SharedAttention.bound_holds(pooled, COMPILED_RANK))
    eager, compiled = _eager_and_compiled(Head, x, backend="aot_eager")
    _assert_same(eager, compiled, atol=1e-4)


@pytest.mark.skipif(not _dynamo_ok(), reason="torch.compile unavailable")
def test_user_compile_of_a_layer_that_enabled_its_own_compile():
    torch._dynamo.reset()
    norm = LStainNorm()
    x = he_like(1, 16, 16)
    eager = norm(x)
    norm.enable_compile(dynamic=False)
    out = torch.compile(norm, backend="aot_eager")(x)
    assert isinstance(out, torch.Tensor)
    assert torch.allclose(out, eager, atol=1e-5)
    assert torch.allclose(torch.compile(StainNorm("hsv"), backend="aot_eager")(x), StainNorm("hsv")(x), atol=1e-5)
