"""lstainnorm.data.restain: each stress axis changes the image in the intended way only."""

import math

import numpy as np
import pytest
import torch

from lstainnorm.data.restain import AXES, RUIFROK, restain, rotate_about_grey, stain_matrix


def _he_image(h_conc: float = 1.0, e_conc: float = 1.0, size: int = 48, seed: int = 0) -> torch.Tensor:
    """An image made of known stains: Ruifrok's H and E vectors with textured concentrations."""
    g = torch.Generator().manual_seed(seed)
    ch = (torch.rand(size, size, generator=g) ** 2) * 1.2 * h_conc
    ce = (0.3 + 0.4 * torch.rand(size, size, generator=g)) * e_conc
    s = RUIFROK / RUIFROK.norm(dim=1, keepdim=True)
    od = ch[None] * s[0].view(3, 1, 1) + ce[None] * s[1].view(3, 1, 1)
    return torch.exp(-od).float()


def _od(x):
    return -torch.log(x.double().clamp(min=1 / 255))


def test_severity_zero_is_the_identity_for_every_axis():
    x = _he_image()
    for axis in AXES:
        assert restain(x, axis, 0.0) is x


def test_stain_matrix_recovers_known_vectors():
    x = _he_image()
    s = stain_matrix(x)
    ref = RUIFROK / RUIFROK.norm(dim=1, keepdim=True)
    cos = (s * ref).sum(1)
    assert cos.min() > 0.98, cos  # H first, E second, close to the vectors the image was made of


def test_stain_matrix_falls_back_to_ruifrok_without_tissue():
    s = stain_matrix(torch.ones(3, 16, 16))
    assert torch.allclose(s, RUIFROK / RUIFROK.norm(dim=1, keepdim=True))


def test_rotation_about_grey_keeps_length_and_grey_component():
    v = torch.tensor([0.65, 0.70, 0.29], dtype=torch.float64)
    r = rotate_about_grey(v, 25.0)
    grey = torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64)
    assert torch.isclose(r.norm(), v.norm()) and torch.isclose(r @ grey, v @ grey)
    cos = float((r @ v - (v @ grey) ** 2) / (v.norm() ** 2 - (v @ grey) ** 2))
    assert math.degrees(math.acos(max(-1.0, min(1.0, cos)))) == pytest.approx(25.0, abs=1e-6)


def test_stain_amount_scales_optical_density_of_the_stains():
    x = _he_image()
    y = restain(x, "stain-amount", 0.5, stains=RUIFROK)
    ratio = (_od(y).sum() / _od(x).sum()).item()
    assert ratio == pytest.approx(1.5, rel=0.05)  # OD is linear in the concentrations


def test_he_ratio_moves_haematoxylin_and_eosin_apart():
    x = _he_image()
    y = restain(x, "he-ratio", 1.0, stains=RUIFROK)  # the stains the image was made of
    s = RUIFROK.T.double() / RUIFROK.norm(dim=1).double()
    cx = torch.linalg.lstsq(s, _od(x).reshape(3, -1)).solution.sum(1)
    cy = torch.linalg.lstsq(s, _od(y).reshape(3, -1)).solution.sum(1)
    assert (cy[0] / cx[0]).item() == pytest.approx(2.0, rel=0.1)
    assert (cy[1] / cx[1]).item() == pytest.approx(0.5, rel=0.1)


def test_hue_rotation_changes_one_stain_only():
    x = _he_image()
    y = restain(x, "hematoxylin-hue", 1.0)
    assert not torch.allclose(x, y, atol=1e-3)
    # Pixels without haematoxylin (only eosin) keep their colour.
    e_only = _he_image(h_conc=0.0)
    assert torch.allclose(restain(e_only, "hematoxylin-hue", 1.0, stains=RUIFROK), e_only, atol=2e-3)


def test_scanner_axes():
    x = _he_image()
    wp = restain(x, "white-point", 1.0)
    assert torch.equal(wp[0], x[0]) and (wp[2] < x[2]).float().mean() > 0.9  # red kept, blue dimmed
    assert (restain(x, "gamma", 1.0) <= x + 1e-6).all()  # darker mid-tones
    sat = restain(x, "saturation", 1.0)
    assert (sat.std(0) >= x.std(0) - 1e-6).float().mean() > 0.99  # channels further apart
    jpg = restain(x, "jpeg", 1.0)
    assert jpg.shape == x.shape and 0 < (jpg - x).abs().mean() < 0.1


def test_combined_is_seeded_and_harder_with_severity():
    x = _he_image()
    a, b = restain(x, "combined", 0.7, seed=3), restain(x, "combined", 0.7, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, restain(x, "combined", 0.7, seed=4))
    small = (restain(x, "combined", 0.2, seed=1) - x).abs().mean()
    large = (restain(x, "combined", 1.0, seed=1) - x).abs().mean()
    assert large > small


def test_bad_arguments_are_named():
    x = _he_image()
    with pytest.raises(ValueError, match="unknown stress axis"):
        restain(x, "blur", 0.5)
    with pytest.raises(ValueError, match="severity must be in"):
        restain(x, "gamma", 1.5)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        restain(x[None], "gamma", 0.5)
    with pytest.raises(ValueError, match=r"\(2, 3\) matrix"):
        restain(x, "he-ratio", 0.5, stains=torch.ones(3, 3))


def test_outputs_stay_images():
    x = _he_image()
    for axis in AXES:
        y = restain(x, axis, 1.0, seed=0)
        assert y.shape == x.shape and y.dtype == x.dtype and float(y.min()) >= 0 and float(y.max()) <= 1
        assert np.isfinite(y.numpy()).all()
