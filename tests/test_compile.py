"""The optional torch.compile switch: same numbers as eager, no graph breaks in the hot path."""

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
