import math

import kornia
import numpy as np
import pytest
import torch
from skimage import color as skcolor

from lstainnorm import color
from lstainnorm.layers.color import (
    ColorSpace,
    get_space,
    hed_to_rgb,
    hsv_to_rgb,
    lab_to_rgb,
    list_spaces,
    register_space,
    rgb_to_hed,
    rgb_to_hsv,
    rgb_to_lab,
)

PAIRS = [(rgb_to_lab, lab_to_rgb), (rgb_to_hsv, hsv_to_rgb), (rgb_to_hed, hed_to_rgb)]


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("fwd,inv", PAIRS)
@pytest.mark.parametrize("shape", [(3, 1, 1), (1, 3, 5, 7), (2, 4, 3, 6, 9)])
def test_shapes(fwd, inv, shape):
    x = _rand(*shape)
    assert fwd(x).shape == shape
    assert inv(fwd(x)).shape == shape


def test_lab_matches_skimage():
    x = _rand(1, 3, 8, 8, dtype=torch.float64)
    ours = rgb_to_lab(x)[0].permute(1, 2, 0).numpy()
    ref = skcolor.rgb2lab(x[0].permute(1, 2, 0).numpy())
    # kornia's (and ours) matrices differ from scikit-image's in the 4th decimal.
    np.testing.assert_allclose(ours, ref, atol=0.05)


def test_hsv_matches_skimage_with_hue_in_radians():
    x = _rand(1, 3, 8, 8, dtype=torch.float64)
    ours = rgb_to_hsv(x)[0].permute(1, 2, 0).numpy()
    ref = skcolor.rgb2hsv(x[0].permute(1, 2, 0).numpy())
    np.testing.assert_allclose(ours[..., 0] / (2 * math.pi), ref[..., 0], atol=1e-6)  # skimage hue in [0, 1)
    np.testing.assert_allclose(ours[..., 1:], ref[..., 1:], atol=1e-6)


def test_hed_matches_skimage_up_to_units():
    x = _rand(1, 3, 8, 8, dtype=torch.float64) * 0.9 + 0.05
    ours = rgb_to_hed(x)[0].permute(1, 2, 0).numpy()
    ref = skcolor.rgb2hed(x[0].permute(1, 2, 0).numpy())
    # scikit-image divides the log10 optical density by 6 (its log(1e-6) adjustment) and clips at 0.
    np.testing.assert_allclose(np.maximum(ours / 6.0, 0.0), ref, atol=1e-9)


def test_hed_of_white_is_zero_and_of_black_is_bounded():
    white = torch.ones(1, 3, 2, 2)
    black = torch.zeros(1, 3, 2, 2)
    assert torch.allclose(rgb_to_hed(white), torch.zeros(1, 3, 2, 2), atol=1e-6)
    assert torch.isfinite(rgb_to_hed(black)).all()


@pytest.mark.parametrize("ours,theirs", [(rgb_to_lab, kornia.color.rgb_to_lab), (rgb_to_hsv, kornia.color.rgb_to_hsv)])
def test_forward_matches_kornia(ours, theirs):
    x = _rand(2, 3, 16, 16)
    np.testing.assert_allclose(ours(x).numpy(), theirs(x).numpy(), atol=1e-4)


@pytest.mark.parametrize("ours,theirs,to", [(lab_to_rgb, kornia.color.lab_to_rgb, rgb_to_lab), (hsv_to_rgb, kornia.color.hsv_to_rgb, rgb_to_hsv)])
def test_inverse_matches_kornia_including_out_of_range(ours, theirs, to):
    y = to(_rand(2, 3, 16, 16))
    y = y * (1 + 0.3 * _rand(2, 3, 16, 16, seed=1)) - 0.1  # push some values out of range
    np.testing.assert_allclose(ours(y).numpy(), theirs(y).numpy(), atol=1e-4)


@pytest.mark.parametrize("fwd,inv", PAIRS)
def test_round_trip(fwd, inv):
    x = _rand(2, 3, 9, 11, dtype=torch.float64) * 0.98 + 0.01
    assert torch.allclose(inv(fwd(x)), x, atol=1e-6)


def test_reference_values():
    white = torch.ones(1, 3, 1, 1)
    np.testing.assert_allclose(rgb_to_lab(white).flatten().numpy(), [100.0, 0.0, 0.0], atol=1e-2)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    np.testing.assert_allclose(rgb_to_lab(red).flatten().numpy(), [53.24, 80.09, 67.20], atol=0.05)
    np.testing.assert_allclose(rgb_to_hsv(red).flatten().numpy(), [0.0, 1.0, 1.0], atol=1e-6)
    blue = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    np.testing.assert_allclose(rgb_to_hsv(blue).flatten().numpy(), [4 * math.pi / 3, 1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("fwd,inv", PAIRS)
def test_gradcheck_float64(fwd, inv):
    x = (_rand(1, 3, 3, 4, dtype=torch.float64, seed=3) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: inv(fwd(t)), (x,), eps=1e-6, atol=1e-4)


@pytest.mark.parametrize("fwd", [rgb_to_lab, rgb_to_hsv, rgb_to_hed])
def test_gradients_finite_at_extremes(fwd):
    x = torch.tensor([0.0, 1.0, 0.5, 0.0]).view(1, 1, 2, 2).repeat(1, 3, 1, 1).requires_grad_()
    fwd(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "mod,fn",
    [
        (color.RgbToLab(), rgb_to_lab),
        (color.LabToRgb(), lab_to_rgb),
        (color.RgbToHsv(), rgb_to_hsv),
        (color.HsvToRgb(), hsv_to_rgb),
        (color.RgbToHed(), rgb_to_hed),
        (color.HedToRgb(), hed_to_rgb),
    ],
)
def test_module_equals_function(mod, fn):
    x = _rand(2, 3, 5, 5)
    assert torch.equal(mod(x), fn(x))


@pytest.mark.parametrize("fn", [rgb_to_lab, lab_to_rgb, rgb_to_hsv, hsv_to_rgb, rgb_to_hed, hed_to_rgb])
def test_exceptions(fn):
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn(np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="3 colour channels"):
        fn(torch.rand(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(\*, 3, H, W\)"):
        fn(torch.rand(4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        fn(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


def test_registry():
    assert {"lab", "hsv", "rgb", "hed"} <= set(list_spaces())
    assert get_space("LAB").name == "lab"
    assert get_space("cielab").name == "lab"
    with pytest.raises(ValueError, match="unknown colour space 'xyz'"):
        get_space("xyz")
    with pytest.raises(TypeError):
        get_space(3)


def test_register_space_is_one_entry():
    from lstainnorm import StainNorm

    sp = ColorSpace(
        name="xyzdemo",
        to_space=lambda x: kornia.color.rgb_to_xyz(x),
        from_space=lambda y: kornia.color.xyz_to_rgb(y).clamp(0, 1),
        channels=("X", "Y", "Z"),
        natural_units=("", "", ""),
        natural_scale=(1.0, 1.0, 1.0),
        default_mu=(0.4, 0.35, 0.45),
        default_sigma=(0.1, 0.1, 0.1),
        std_floor=(0.005, 0.005, 0.005),
    )
    try:
        register_space(sp)
        with pytest.raises(ValueError, match="already registered"):
            register_space(sp)
        out = StainNorm("xyzdemo")(_rand(1, 3, 8, 8))
        assert out.shape == (1, 3, 8, 8) and torch.isfinite(out).all()
    finally:
        color.SPACES.pop("xyzdemo", None)


def test_natural_units():
    hsv = get_space("hsv")
    assert hsv.to_natural([math.pi, 0.5, 0.5]) == pytest.approx([180.0, 0.5, 0.5])
    assert get_space("rgb").to_natural([1.0, 0.5, 0.0]) == pytest.approx([255.0, 127.5, 0.0])
    assert hsv.from_natural(hsv.to_natural([1.0, 0.2, 0.3])) == pytest.approx([1.0, 0.2, 0.3])
