"""StainConcentrationNorm: stain-aware normalisation in optical density."""

from __future__ import annotations

import math

import pytest
import torch

from lstainnorm import StainConcentrationNorm, create_norm
from lstainnorm.layers.stain import RUIFROK, macenko_stains, stain_amounts, stain_basis, stain_od

UNIT = RUIFROK / RUIFROK.norm(dim=1, keepdim=True)


def _tissue(b: int = 2, size: int = 48, h_scale: float = 1.0, e_scale: float = 1.0, seed: int = 0, he=UNIT) -> torch.Tensor:
    """Beer-Lambert tiles made of two stains: haematoxylin blobs on an eosin background, some glass."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    h = 0.9 * (torch.sin(xx / 3.0) * torch.cos(yy / 4.0)).clamp(min=0) + 0.05 * torch.rand(b, size, size, generator=g)
    e = 0.4 + 0.2 * torch.rand(b, size, size, generator=g)
    e[:, :, : size // 6] = 0.0  # a strip of glass
    h[:, :, : size // 6] = 0.0
    od = h_scale * h.unsqueeze(1) * he[0].view(1, 3, 1, 1).float() + e_scale * e.unsqueeze(1) * he[1].view(1, 3, 1, 1).float()
    return torch.exp(-od).clamp(0.0, 1.0)


def test_shapes_dtypes_and_range():
    x = _tissue()
    for stains in ("estimate", "ruifrok", "learned"):
        y = StainConcentrationNorm(stains)(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    assert StainConcentrationNorm()(x.double()).dtype == torch.float64
    assert create_norm("stain", stains="ruifrok").stains == "ruifrok"


def test_module_equals_function():
    x = _tissue()
    layer = StainConcentrationNorm("ruifrok", amounts=(0.4, 0.3), learnable=False)
    ref = stain_od(x, UNIT.float(), torch.tensor([0.4, 0.3]))
    assert torch.allclose(layer(x), ref, atol=1e-6)


def test_undoes_an_he_ratio_change_made_along_its_vectors():
    """Scaling the haematoxylin x2 and the eosin x0.5 along the vectors the layer uses is undone."""
    x, y = _tissue(), _tissue(h_scale=2.0, e_scale=0.5)
    layer = StainConcentrationNorm("ruifrok")
    before = (x - y).abs().mean()
    after = (layer(x) - layer(y)).abs().mean()
    assert before > 0.05 and after < 0.01 * before


def test_amounts_are_the_template_after_normalisation():
    x = _tissue(h_scale=1.7, e_scale=0.6)
    layer = StainConcentrationNorm("ruifrok", amounts=(0.5, 0.3))
    a = stain_amounts(layer(x), UNIT.float().expand(2, 2, 3))
    assert torch.allclose(a, torch.tensor([[0.5, 0.3]] * 2), atol=0.01)


def test_macenko_finds_the_stains_of_a_two_stain_image():
    other = torch.tensor([[0.55, 0.76, 0.35], [0.12, 0.92, 0.37]], dtype=torch.float64)
    other = other / other.norm(dim=1, keepdim=True)
    est = macenko_stains(_tissue(he=other), stride=1)
    cos = (est.double() * other).sum(-1)
    assert (cos > 0.98).all(), cos


def test_glass_black_and_one_stain_tiles_stay_finite_with_finite_gradients():
    glass = torch.ones(1, 3, 32, 32) * 0.97
    black = torch.zeros(1, 3, 32, 32)
    one_h = _tissue(1, 32, e_scale=0.0)
    one_e = _tissue(1, 32, h_scale=0.0)
    flat = torch.full((1, 3, 32, 32), 0.6)
    ruifrok = (RUIFROK / RUIFROK.norm(dim=1, keepdim=True)).float()
    assert torch.allclose(macenko_stains(glass)[0], ruifrok)  # too little tissue: the standard vectors
    for stains in ("estimate", "ruifrok", "learned"):
        layer = StainConcentrationNorm(stains)
        for name, x in (("glass", glass), ("black", black), ("H only", one_h), ("E only", one_e), ("flat", flat)):
            x = x.clone().requires_grad_(True)
            y = layer(x)
            y.square().sum().backward()
            assert torch.isfinite(y).all(), (stains, name)
            assert torch.isfinite(x.grad).all(), (stains, name)
            assert all(p.grad is None or torch.isfinite(p.grad).all() for p in layer.parameters()), (stains, name)
    # glass is not amplified into colour: the gain is bounded
    assert (StainConcentrationNorm()(glass) - glass).abs().max() < 0.1


def test_gradcheck_float64():
    x = (0.25 + 0.6 * torch.rand(2, 3, 5, 6, dtype=torch.float64)).requires_grad_(True)
    he = UNIT.clone().requires_grad_(True)
    t = torch.tensor([0.5, 0.4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: stain_od(a, b, c, max_gain=50.0), (x, he, t))
    # through the layer's learned vectors and log-amounts
    layer = StainConcentrationNorm("learned").double()
    assert torch.autograd.gradcheck(lambda a: layer(a), (x,))
    layer(x).sum().backward()
    assert layer.he.grad is not None and layer.log_amounts.grad is not None


@pytest.mark.parametrize("case", ["tissue", "clamped gain", "glass and saturated white", "batch template"])
def test_closed_form_backward_equals_autograd(case):
    """StainODFunction's gradients (input and amounts) are autograd's, on tissue, where the gain bound
    binds (an H-only tile), on glass with pixels at exactly 1.0 (OD 0: the clamp's tie) and black."""
    from lstainnorm.layers.norm import closed_form_backward
    from lstainnorm.layers.stain import StainODFunction

    x = _tissue(3, 24, seed=1)
    if case == "clamped gain":
        x = _tissue(3, 24, e_scale=0.02, seed=2)
    elif case == "glass and saturated white":
        x[:, :, :4] = 1.0
        x[:, :, -3:] = 0.0
        x[2] = 0.97
    he = macenko_stains(x)
    t = torch.tensor([0.5, 0.4]) if case != "batch template" else torch.tensor([[0.5, 0.4]]).expand(3, 2).contiguous()
    if case == "clamped gain":  # the E amount is below its bound t / 2 on every tile, so the clamp binds
        assert (stain_amounts(x, he)[:, 1] < t[1] / 2.0).all()
    weight = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    grads = []
    for closed in (True, False):
        xr, tr = x.clone().requires_grad_(True), t.clone().requires_grad_(True)
        with closed_form_backward(closed):
            y = stain_od(xr, he, tr, max_gain=2.0)
        assert (y.grad_fn.name() == "StainODFunctionBackward") == closed
        (y * weight).sum().backward()
        grads.append((y.detach(), xr.grad, tr.grad))
    (y1, gx1, gt1), (y0, gx0, gt0) = grads
    assert torch.allclose(y1, y0, atol=1e-6)
    assert torch.allclose(gx1, gx0, atol=1e-4, rtol=1e-4), (gx1 - gx0).abs().max()
    assert torch.allclose(gt1, gt0, atol=1e-4, rtol=1e-4), (gt1, gt0)
    # only the amounts need a gradient (the usual training case: an input image)
    tr = t.clone().requires_grad_(True)
    StainODFunction.apply(x, he, tr, 2.0).mul(weight).sum().backward()
    assert torch.allclose(tr.grad, gt0, atol=1e-4, rtol=1e-4)


def test_closed_form_gradcheck_float64():
    from lstainnorm.layers.stain import StainODFunction

    # two-stain tiles (random grey pixels would give a negative E amount, below any bound); off 1.0,
    # where the output's clamp would tie under gradcheck's finite differences
    x = (0.97 * _tissue(2, 6, seed=3).double()).requires_grad_(True)
    he = UNIT.double().expand(2, 2, 3).contiguous()
    for gain in (50.0, 1.2):  # the gain bound free, and binding
        t = torch.tensor([0.5, 0.3], dtype=torch.float64, requires_grad=True)
        a = stain_amounts(x.detach(), he)
        binds = (a < t.detach() / gain) | (a > t.detach() * gain)
        assert bool(binds.any()) == (gain < 2.0)
        assert torch.autograd.gradcheck(lambda a, c: StainODFunction.apply(a, he, c, gain), (x, t))


def test_basis_is_invertible_and_keeps_the_stain_rows():
    b = stain_basis(UNIT.unsqueeze(0))
    assert torch.allclose(b[0, :2], UNIT)
    assert abs(float(torch.linalg.det(b[0]))) > 0.1


def test_learnable_switch_and_parameter_groups():
    from lstainnorm import norm_param_groups

    assert not StainConcentrationNorm(learnable=False).log_amounts.requires_grad
    groups = norm_param_groups(StainConcentrationNorm("learned"))
    assert sum(len(g["params"]) for g in groups) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stains": "vahadane"}, "stains must be one of"),
        ({"amounts": (0.5,)}, "amounts must be two positive numbers"),
        ({"amounts": (0.5, -1.0)}, "amounts must be two positive numbers"),
        ({"amounts": (0.5, math.nan)}, "amounts must be two positive numbers"),
        ({"max_gain": 0.5}, "max_gain must be"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StainConcentrationNorm(**kwargs)


def test_input_errors():
    layer = StainConcentrationNorm()
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([[0.5]])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        layer(torch.rand(3, 8, 8))
    with pytest.raises(ValueError):
        layer(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError):
        layer(torch.full((1, 3, 8, 8), 2.0))


def test_stain_stage_before_the_layers():
    """stain_first: the StainConcentrationNorm stage runs before the colour spaces of StainNorm and LStainNorm, at every
    entry point, learns with the templates, and the layer then undoes an H/E-ratio change it could not."""
    from lstainnorm import LStainNorm, StainNorm

    x, y = _tissue(), _tissue(h_scale=2.0, e_scale=0.5)
    plain, staged = StainNorm("rgb", learnable=False), StainNorm("rgb", learnable=False, stain_first="ruifrok")
    assert not staged.stain_first.log_amounts.requires_grad
    gap = lambda m: float((m(x) - m(y)).abs().mean())  # noqa: E731
    assert gap(staged) < 0.2 * gap(plain)
    stage = StainConcentrationNorm("ruifrok", validate=False)
    assert torch.allclose(staged(x), plain(stage(x)), atol=1e-6)  # the stage, then the layer
    fused = LStainNorm(stain_first="estimate")
    xr = x.clone().requires_grad_(True)
    fused(xr).sum().backward()
    assert fused.stain_first.log_amounts.grad is not None and torch.isfinite(xr.grad).all()
    ref = LStainNorm()
    ref.load_state_dict({k: v for k, v in fused.state_dict().items() if not k.startswith("stain_first.")})
    staged_x = fused.stain_first(x)
    assert torch.allclose(fused.branch_images(x)["lab"], ref.branch_images(staged_x)["lab"], atol=1e-5)
    assert fused(torch.empty(0, 3, 8, 8)).shape == (0, 3, 8, 8)


def test_stain_stage_amounts_learn_as_the_layer_or_as_told():
    """stain_learnable: None follows the layer's templates; False freezes the stage, and then no gradient
    reaches the stage (none is sent back through the colour spaces for it), the layer's own still do."""
    from lstainnorm import LStainNorm, StainNorm

    assert LStainNorm(stain_first="ruifrok").stain_first.log_amounts.requires_grad
    assert not LStainNorm(stain_first="ruifrok", learnable=False).stain_first.log_amounts.requires_grad
    assert StainNorm("lab", learnable=False, stain_first="ruifrok", stain_learnable=True).stain_first.log_amounts.requires_grad
    frozen = LStainNorm(stain_first="estimate", stain_learnable=False)
    assert not frozen.stain_first.log_amounts.requires_grad
    frozen(_tissue()).sum().backward()
    assert frozen.stain_first.log_amounts.grad is None and frozen.delta.grad is not None
    assert frozen.branches["lab"].dmu.grad is not None


def test_stain_stage_is_refused_where_it_cannot_work():
    from lstainnorm import LStainNorm
    from lstainnorm.apply.export import ExportableNorm
    from lstainnorm.apply.slides import _spaces_of

    with pytest.raises(TypeError, match="stain stage"):
        ExportableNorm(LStainNorm(stain_first="estimate"))
    with pytest.raises(ValueError, match="stain stage"):
        _spaces_of(LStainNorm(stain_first="estimate"))


def test_default_amounts_are_the_nct_sample_means(shared_data):
    """DEFAULT_AMOUNTS is what its comment says: the mean of each NCT-CRC sample tile's stain_amounts."""
    import numpy as np
    from PIL import Image

    from lstainnorm.layers.stain import DEFAULT_AMOUNTS

    files = sorted((shared_data / "nct-crc-he-sample").glob("*.tif"))
    if not files:
        pytest.skip(f"no NCT-CRC sample tiles in {shared_data / 'nct-crc-he-sample'}")
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1) for f in files])
    assert torch.allclose(stain_amounts(x).mean(0), torch.tensor(DEFAULT_AMOUNTS), atol=0.005)
