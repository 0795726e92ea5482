"""Background tiles, uniform colours and bad input: the peers' most reported failures."""

import numpy as np
import pytest
import torch
from conftest import he_like
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lstainnorm import LStainNorm, StainNorm, stain_norm


def _layers():
    return [StainNorm(s) for s in ("lab", "hsv", "rgb", "hed")] + [LStainNorm(), LStainNorm(spaces=("lab", "hsv", "rgb", "hed"), tissue_stats=True)]


def _glass_tile():
    x = torch.full((1, 3, 40, 40), 0.94)
    x[..., :8, :8] = he_like(1, 8, 8)  # 4 % tissue
    x += 0.003 * torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    return x.clamp(0, 1)


PATHOLOGICAL = {
    "white": torch.ones(2, 3, 16, 16),
    "black": torch.zeros(2, 3, 16, 16),
    "uniform_pink": torch.tensor([0.85, 0.55, 0.75]).view(1, 3, 1, 1).expand(2, 3, 16, 16).clone(),
    "one_pixel": torch.tensor([0.3, 0.2, 0.5]).view(1, 3, 1, 1),
    "glass_95": _glass_tile(),
    "pure_red": torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 9, 9).clone(),
    "checker_0_1": (torch.arange(64).view(8, 8) % 2).float().expand(1, 3, 8, 8).clone(),
}


def _assert_finite_everywhere(norm, x):
    norm.zero_grad()
    out = norm(x)
    assert torch.isfinite(out).all(), "non-finite output"
    out.square().mean().backward()
    for name, p in norm.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"


@pytest.mark.parametrize("case", list(PATHOLOGICAL))
def test_pathological_inputs_are_finite(case):
    for norm in _layers():
        _assert_finite_everywhere(norm, PATHOLOGICAL[case])


def test_uniform_tile_maps_to_template_colour():
    """A uniform tile has no spread: it becomes the template's mean colour, not an eps blow-up."""
    norm = StainNorm("lab", mu0=(60.0, 15.0, -5.0), learnable=False)
    out = norm(PATHOLOGICAL["uniform_pink"])
    lab = norm.space.to_space(out)
    assert torch.allclose(lab.mean(dim=(2, 3)), torch.tensor([60.0, 15.0, -5.0]).expand(2, 3), atol=0.05)


def test_glass_tile_is_not_amplified_with_tissue_stats():
    x = _glass_tile()
    out = StainNorm("lab", learnable=False, tissue_stats=True)(x)
    glass = out[..., 20:, 20:]
    # The glass stays bright (it is far from tissue), instead of being stretched to tissue colours.
    assert glass.mean() > 0.85


def test_error_not_a_tensor():
    with pytest.raises(TypeError, match="must be a torch.Tensor of shape \\(B, 3, H, W\\), got ndarray"):
        StainNorm()(np.zeros((1, 3, 4, 4), dtype=np.float32))


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 1, 3, 8, 8)])
def test_error_rank(shape):
    with pytest.raises(ValueError, match="must have shape \\(B, 3, H, W\\)"):
        LStainNorm()(torch.rand(shape))


def test_error_channels():
    with pytest.raises(ValueError, match="3 colour channels"):
        LStainNorm()(torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="channels first"):
        StainNorm()(torch.rand(1, 8, 8, 3))


def test_error_integer_dtype():
    with pytest.raises(TypeError, match="x.float\\(\\) / 255"):
        LStainNorm()(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_error_non_finite(bad):
    x = torch.rand(1, 3, 8, 8)
    x[0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        StainNorm()(x)
    with pytest.raises(ValueError, match="NaN or Inf"):
        stain_norm(x)


def test_error_range_reports_observed_range():
    with pytest.raises(ValueError, match=r"observed range \[0, 255\].*x / 255"):
        LStainNorm()(torch.linspace(0, 255, 3 * 64).view(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"observed range \[-0.5"):
        StainNorm()(torch.linspace(-0.5, 0.5, 3 * 64).view(1, 3, 8, 8))


def test_validation_can_be_switched_off():
    norm = StainNorm(validate=False)
    assert norm(torch.full((1, 3, 4, 4), 2.0)).shape == (1, 3, 4, 4)


colour = st.tuples(*(st.sampled_from([0.0, 1.0, 1e-6, 1 - 1e-6, 0.5, 0.04045, 0.0031308, 0.86]) | st.floats(0, 1) for _ in range(3)))


@st.composite
def images(draw):
    h = draw(st.integers(1, 20))
    w = draw(st.integers(1, 20))
    kind = draw(st.sampled_from(["uniform", "two", "random", "sparse"]))
    c1 = torch.tensor(draw(colour), dtype=torch.float32).view(1, 3, 1, 1)
    if kind == "uniform":
        return c1.expand(1, 3, h, w).clone()
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.rand(1, 3, h, w, generator=g)
    c2 = torch.tensor(draw(colour), dtype=torch.float32).view(1, 3, 1, 1)
    frac = 0.5 if kind == "two" else 0.03
    m = (torch.rand(1, 1, h, w, generator=g) < frac).float()
    return c1 * (1 - m) + c2 * m


FUZZ_LAYERS = {
    "lab": StainNorm("lab"),
    "hsv": StainNorm("hsv"),
    "rgb": StainNorm("rgb"),
    "hed": StainNorm("hed"),
    "lstainnorm": LStainNorm(spaces=("lab", "hsv", "rgb", "hed")),
    "lstainnorm_tissue": LStainNorm(tissue_stats=True),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=images(), name=st.sampled_from(sorted(FUZZ_LAYERS)))
def test_fuzz_finite_outputs_and_gradients(x, name):
    _assert_finite_everywhere(FUZZ_LAYERS[name], x)
