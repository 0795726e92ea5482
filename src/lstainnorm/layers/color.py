"""Differentiable colour spaces for stain normalisation, and their registry.

Each space is a pair of pure functions ``to_space(rgb)`` / ``from_space(y)`` on
tensors of shape ``(*, 3, H, W)``, with RGB in [0, 1].  The registry
(:data:`SPACES`) holds them with their units, default template and the floor used
for the per-image standard deviation, so adding a space is one :func:`register_space` call.

Units (the layers' internal units; :meth:`ColorSpace.to_natural` converts for display):

==========  =========================================  ==========================================
space       channels and range                         notes
==========  =========================================  ==========================================
``lab``     L* in [0, 100], a*, b* in about [-128, 127]  CIE L*a*b*, D65, 2 deg observer (kornia)
``hsv``     H in radians [0, 2 pi), S and V in [0, 1]   kornia's convention; scikit-image's hue is
                                                        H / (2 pi) in [0, 1); degrees are H * 180 / pi
``rgb``     R, G, B in [0, 1]                           identity
``hed``     haematoxylin, eosin, DAB optical density    Ruifrok & Johnston deconvolution with
            (log10); about [-1, 6]                      scikit-image's stain matrix; scikit-image's
                                                        ``rgb2hed`` equals these / 6, clipped at 0
==========  =========================================  ==========================================

The Lab and HSV formulas are kornia's (``kornia.color.rgb_to_lab`` etc.: same
matrices, white point and thresholds; the tests check agreement to 1e-4), written
channel by channel without ``stack``/``gather``/``matmul`` so that ``torch.compile``
fuses a whole normalisation into a couple of loops; kornia's versions compile to
several kernels and run about 3.7x slower on a CPU.  They are also made safe for
autograd: every ``pow``/``log`` sees a clamped argument, so no unselected
``torch.where`` branch can inject a NaN gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .checks import check_image

__all__ = [
    "ColorSpace",
    "SPACES",
    "register_space",
    "get_space",
    "list_spaces",
    "rgb_to_lab",
    "lab_to_rgb",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "rgb_to_hed",
    "hed_to_rgb",
    "rgb_identity",
    "rgb_to_lab_vjp",
    "lab_to_rgb_vjp",
    "rgb_to_hsv_vjp",
    "hsv_to_rgb_vjp",
    "rgb_to_hed_vjp",
    "hed_to_rgb_vjp",
    "rgb_identity_vjp",
    "post_mask",
    "RgbToLab",
    "LabToRgb",
    "RgbToHsv",
    "HsvToRgb",
    "RgbToHed",
    "HedToRgb",
]

# --- CIE L*a*b* (kornia's constants: sRGB D65 matrices, white point, thresholds) -----------------
_RGB2XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_XYZ2RGB = (
    (3.2404813432005266, -1.5371515162713185, -0.4985363261688878),
    (-0.9692549499965682, 1.8759900014898907, 0.0415559265582928),
    (0.0556466391351772, -0.2040413383665112, 1.0573110696453443),
)
_WHITE = (0.95047, 1.0, 1.08883)
_LAB_T = 0.008856
_LAB_T_INV = 0.2068966


# Powers are written exp(p * log(t)): Sleef's vectorised exp and log cost about half a
# vectorised pow, and the clamp keeps log's argument positive (no NaN gradient).
def _srgb_to_linear(c: Tensor) -> Tensor:
    hi = torch.exp(2.4 * torch.log((c.clamp(min=0.04045) + 0.055) / 1.055))
    return torch.where(c > 0.04045, hi, c / 12.92)


def _linear_to_srgb(c: Tensor) -> Tensor:
    hi = 1.055 * torch.exp(torch.log(c.clamp(min=0.0031308)) / 2.4) - 0.055
    return torch.where(c > 0.0031308, hi, 12.92 * c)


def _lab_f(t: Tensor) -> Tensor:
    return torch.where(t > _LAB_T, torch.exp(torch.log(t.clamp(min=_LAB_T)) / 3.0), 7.787 * t + 4.0 / 29.0)


def _lab_f_inv(f: Tensor) -> Tensor:
    return torch.where(f > _LAB_T_INV, f * f * f, (f - 4.0 / 29.0) / 7.787)


def _srgb_to_linear_d(c: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_srgb_to_linear` and its derivative, sharing the power."""
    u = (c.clamp(min=0.04045) + 0.055) / 1.055
    p = torch.exp(2.4 * torch.log(u))
    hi = c > 0.04045
    return torch.where(hi, p, c / 12.92), torch.where(hi, (2.4 / 1.055) * p / u, 1.0 / 12.92)


def _linear_to_srgb_d(c: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_linear_to_srgb` and its derivative, sharing the root."""
    cc = c.clamp(min=0.0031308)
    p = torch.exp(torch.log(cc) / 2.4)
    hi = c > 0.0031308
    return torch.where(hi, 1.055 * p - 0.055, 12.92 * c), torch.where(hi, (1.055 / 2.4) * p / cc, 12.92)


def _lab_f_d(t: Tensor) -> tuple[Tensor, Tensor]:
    tc = t.clamp(min=_LAB_T)
    f = torch.exp(torch.log(tc) / 3.0)
    hi = t > _LAB_T
    return torch.where(hi, f, 7.787 * t + 4.0 / 29.0), torch.where(hi, f / (3.0 * tc), 7.787)


def _lab_f_inv_d(f: Tensor) -> tuple[Tensor, Tensor]:
    hi = f > _LAB_T_INV
    return torch.where(hi, f * f * f, (f - 4.0 / 29.0) / 7.787), torch.where(hi, 3.0 * f * f, 1.0 / 7.787)


def post_mask(out: Tensor, post: str | None) -> Tensor:
    """Derivative of the step applied after a conversion back to RGB, as autograd takes it:
    ``"abs"`` (LStainNorm's ``|x_s|``; 0 at 0), ``"clamp"`` (to [0, 1], inclusive) or None."""
    if post == "abs":
        return torch.sign(out)
    if post == "clamp":
        return ((out >= 0.0) & (out <= 1.0)).to(out.dtype)
    return torch.ones_like(out)


def rgb_to_lab(image: Tensor) -> Tensor:
    r"""Convert RGB in [0, 1] to CIE L*a*b* (D65, 2 deg observer).

    Args:
        image: RGB image of shape :math:`(*, 3, H, W)`, values in [0, 1].

    Returns:
        Lab image of shape :math:`(*, 3, H, W)`: L* in [0, 100], a* and b* in about [-128, 127].

    Example:
        >>> rgb_to_lab(torch.ones(1, 3, 2, 2))[0, :, 0, 0]  # white
        tensor([1.0000e+02, ...
    """
    check_image(image, "image", batched=False)
    r, g, b = (_srgb_to_linear(c) for c in image.unbind(-3))
    x = (_RGB2XYZ[0][0] * r + _RGB2XYZ[0][1] * g + _RGB2XYZ[0][2] * b) / _WHITE[0]
    y = _RGB2XYZ[1][0] * r + _RGB2XYZ[1][1] * g + _RGB2XYZ[1][2] * b
    z = (_RGB2XYZ[2][0] * r + _RGB2XYZ[2][1] * g + _RGB2XYZ[2][2] * b) / _WHITE[2]
    fx, fy, fz = _lab_f(x), _lab_f(y), _lab_f(z)
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=-3)


def rgb_to_lab_vjp(image: Tensor, grad: Tensor) -> Tensor:
    """Closed-form vector-Jacobian product of :func:`rgb_to_lab` at ``image``: ``grad`` (Lab,
    ``(*, 3, H, W)``) back to RGB. Recomputes the forward's powers and reuses them."""
    lin, dlin = zip(*(_srgb_to_linear_d(c) for c in image.unbind(-3)))
    m = _RGB2XYZ
    x = (m[0][0] * lin[0] + m[0][1] * lin[1] + m[0][2] * lin[2]) / _WHITE[0]
    y = m[1][0] * lin[0] + m[1][1] * lin[1] + m[1][2] * lin[2]
    z = (m[2][0] * lin[0] + m[2][1] * lin[1] + m[2][2] * lin[2]) / _WHITE[2]
    gl, ga, gb = grad.unbind(-3)
    gx = 500.0 * ga * _lab_f_d(x)[1] / _WHITE[0]
    gy = (116.0 * gl - 500.0 * ga + 200.0 * gb) * _lab_f_d(y)[1]
    gz = -200.0 * gb * _lab_f_d(z)[1] / _WHITE[2]
    return torch.stack([(m[0][i] * gx + m[1][i] * gy + m[2][i] * gz) * dlin[i] for i in range(3)], dim=-3)


def lab_to_rgb_vjp(image: Tensor, grad: Tensor, post: str | None = None) -> Tensor:
    """Closed-form vector-Jacobian product of ``post(lab_to_rgb(image))`` (clipped) at ``image``."""
    lum, a, b = image.unbind(-3)
    fy = (lum + 16.0) / 116.0
    fx = a / 500.0 + fy
    fz_raw = fy - b / 200.0
    fz = fz_raw.clamp(min=0.0)
    (x, dx), (y, dy), (z, dz) = _lab_f_inv_d(fx), _lab_f_inv_d(fy), _lab_f_inv_d(fz)
    x, z = x * _WHITE[0], z * _WHITE[2]
    m = _XYZ2RGB
    glin = []
    for i, g in enumerate(grad.unbind(-3)):
        c, dc = _linear_to_srgb_d(m[i][0] * x + m[i][1] * y + m[i][2] * z)
        inside = (c >= 0.0) & (c <= 1.0)  # the clip
        glin.append(torch.where(inside, g * post_mask(c.clamp(0.0, 1.0), post) * dc, 0.0))
    gx = (m[0][0] * glin[0] + m[1][0] * glin[1] + m[2][0] * glin[2]) * (_WHITE[0] * dx)
    gy = (m[0][1] * glin[0] + m[1][1] * glin[1] + m[2][1] * glin[2]) * dy
    gz = (m[0][2] * glin[0] + m[1][2] * glin[1] + m[2][2] * glin[2]) * (_WHITE[2] * dz)
    gz = torch.where(fz_raw >= 0.0, gz, 0.0)
    return torch.stack(((gx + gy + gz) / 116.0, gx / 500.0, -gz / 200.0), dim=-3)


def lab_to_rgb(image: Tensor, clip: bool = True) -> Tensor:
    r"""Convert CIE L*a*b* to RGB.

    Args:
        image: Lab image of shape :math:`(*, 3, H, W)` (L* in [0, 100], a*, b* in about [-128, 127]).
        clip: clamp the result to [0, 1] (kornia's default; colours outside the sRGB gamut saturate).

    Returns:
        RGB image of shape :math:`(*, 3, H, W)`.
    """
    check_image(image, "image", batched=False)
    lum, a, b = image.unbind(-3)
    fy = (lum + 16.0) / 116.0
    fx = a / 500.0 + fy
    fz = (fy - b / 200.0).clamp(min=0.0)
    x = _lab_f_inv(fx) * _WHITE[0]
    y = _lab_f_inv(fy)
    z = _lab_f_inv(fz) * _WHITE[2]
    rgb = [
        _linear_to_srgb(m[0] * x + m[1] * y + m[2] * z)
        for m in _XYZ2RGB
    ]
    out = torch.stack(rgb, dim=-3)
    return out.clamp(0.0, 1.0) if clip else out


# --- HSV (kornia's convention: hue in radians) ----------------------------------------------------
_TWO_PI = 2.0 * math.pi


def rgb_to_hsv(image: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Convert RGB in [0, 1] to HSV.

    Args:
        image: RGB image of shape :math:`(*, 3, H, W)`, values in [0, 1].
        eps: added to V before dividing (saturation of black is 0).

    Returns:
        HSV image of shape :math:`(*, 3, H, W)`: H in radians [0, 2 pi), S and V in [0, 1].
        Grey pixels (no chroma) get H = 0, as in kornia and scikit-image.
    """
    check_image(image, "image", batched=False)
    r, g, b = image.unbind(-3)
    mx = torch.maximum(torch.maximum(r, g), b)
    mn = torch.minimum(torch.minimum(r, g), b)
    delta = mx - mn
    s = delta / (mx + eps)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    # The first maximal channel decides the hue sector (kornia's argmax tie-break: r, then g, then b).
    h_r = (g - b) / safe
    h_g = (b - r) / safe + 2.0
    h_b = (r - g) / safe + 4.0
    h = torch.where((r >= g) & (r >= b), h_r, torch.where(g >= b, h_g, h_b))
    h = torch.remainder(h / 6.0, 1.0) * _TWO_PI
    return torch.stack((h, s, mx), dim=-3)


def _max_split(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """How autograd splits the gradient of ``torch.maximum(a, b)``: all to the larger, half each on a tie."""
    wa = torch.where(a > b, 1.0, torch.where(a == b, 0.5, 0.0)).to(a.dtype)
    return wa, 1.0 - wa


def rgb_to_hsv_vjp(image: Tensor, grad: Tensor, eps: float = 1e-8) -> Tensor:
    """Closed-form vector-Jacobian product of :func:`rgb_to_hsv` at ``image`` (autograd's choices
    at ties of the maximum and minimum: the gradient is split, as ``torch.maximum``'s)."""
    r, g, b = image.unbind(-3)
    gh, gs, gv = grad.unbind(-3)
    rg = torch.maximum(r, g)
    mx = torch.maximum(rg, b)
    rg_n = torch.minimum(r, g)
    mn = torch.minimum(rg_n, b)
    delta = mx - mn
    den = mx + eps
    nz = delta != 0
    safe = torch.where(nz, delta, torch.ones_like(delta))
    gh0 = gh * (_TWO_PI / 6.0)  # remainder's derivative is 1
    use_r = (r >= g) & (r >= b)
    use_g = ~use_r & (g >= b)
    use_b = ~use_r & ~use_g
    num = torch.where(use_r, g - b, torch.where(use_g, b - r, r - g))
    gsafe = -gh0 * num / (safe * safe)
    gq = gh0 / safe  # derivative of the chosen numerator's first (+) and second (-) operand
    gdelta = gs / den + torch.where(nz, gsafe, 0.0)
    gmx = gv - gs * delta / (den * den) + gdelta
    gmn = -gdelta
    w_rg, w_b = _max_split(rg, b)
    w_r, w_g = _max_split(r, g)
    n_rg, n_b = _max_split(-rg_n, -b)  # minimum(a, b) = -maximum(-a, -b)
    n_r, n_g = _max_split(-r, -g)
    gr = gmx * w_rg * w_r + gmn * n_rg * n_r + torch.where(use_b, gq, 0.0) - torch.where(use_g, gq, 0.0)
    gg = gmx * w_rg * w_g + gmn * n_rg * n_g + torch.where(use_r, gq, 0.0) - torch.where(use_b, gq, 0.0)
    gb_ = gmx * w_b + gmn * n_b + torch.where(use_g, gq, 0.0) - torch.where(use_r, gq, 0.0)
    return torch.stack((gr, gg, gb_), dim=-3)


def hsv_to_rgb_vjp(image: Tensor, grad: Tensor, post: str | None = None) -> Tensor:
    """Closed-form vector-Jacobian product of ``post(hsv_to_rgb(image))`` at ``image``."""
    h, s, v = image.unbind(-3)
    h6 = h * (6.0 / _TWO_PI)
    vs = v * s
    gv = torch.zeros_like(v)
    gvs = torch.zeros_like(v)
    gh6 = torch.zeros_like(v)
    for n, g in zip((5.0, 3.0, 1.0), grad.unbind(-3)):
        k = torch.remainder(h6 + n, 6.0)
        lo = torch.minimum(k, 4.0 - k)
        t = lo.clamp(0.0, 1.0)
        gc = g * post_mask(v - vs * t, post)
        gv = gv + gc
        gvs = gvs - gc * t
        # through clamp (inclusive) and minimum(k, 4 - k) (a tie at k = 2 gives 1/2 - 1/2 = 0)
        dk = torch.where(k < 4.0 - k, 1.0, torch.where(k > 4.0 - k, -1.0, 0.0))
        gh6 = gh6 - torch.where((lo >= 0.0) & (lo <= 1.0), gc * vs * dk, 0.0)
    return torch.stack((gh6 * (6.0 / _TWO_PI), gvs * v, gv + gvs * s), dim=-3)


def hsv_to_rgb(image: Tensor) -> Tensor:
    r"""Convert HSV (hue in radians) to RGB.

    Hue outside [0, 2 pi) wraps around; S and V are used as given (values outside [0, 1]
    give RGB outside [0, 1], which the fusion layer folds back with ``abs`` like the reference).

    Args:
        image: HSV image of shape :math:`(*, 3, H, W)`.

    Returns:
        RGB image of shape :math:`(*, 3, H, W)`.
    """
    check_image(image, "image", batched=False)
    h, s, v = image.unbind(-3)
    h6 = h * (6.0 / _TWO_PI)
    vs = v * s

    def channel(n: float) -> Tensor:
        k = torch.remainder(h6 + n, 6.0)
        return v - vs * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)

    return torch.stack((channel(5.0), channel(3.0), channel(1.0)), dim=-3)


# --- HED colour deconvolution (Ruifrok & Johnston; scikit-image's stain matrix) -------------------
_RGB_FROM_HED = (
    (0.65, 0.70, 0.29),
    (0.07, 0.99, 0.11),
    (0.27, 0.57, 0.78),
)


def _inverse3(m: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
    (a, b, c), (d, e, f), (g, h, i) = m
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    adj = (
        (e * i - f * h, c * h - b * i, b * f - c * e),
        (f * g - d * i, a * i - c * g, c * d - a * f),
        (d * h - e * g, b * g - a * h, a * e - b * d),
    )
    return tuple(tuple(v / det for v in row) for row in adj)


_HED_FROM_RGB = _inverse3(_RGB_FROM_HED)
_OD_FLOOR = 1e-6  # scikit-image's floor: black maps to OD 6 instead of infinity
_LN10 = math.log(10.0)


def rgb_to_hed(image: Tensor) -> Tensor:
    r"""Convert RGB in [0, 1] to haematoxylin, eosin and DAB optical densities.

    ``od = -log10(max(rgb, 1e-6))`` per channel, then ``hed = od @ hed_from_rgb`` with
    scikit-image's Ruifrok-Johnston matrix. Concentrations are not clipped at 0 (unlike
    ``skimage.color.rgb2hed``), so that :func:`hed_to_rgb` inverts this exactly.

    Args:
        image: RGB image of shape :math:`(*, 3, H, W)`, values in [0, 1].

    Returns:
        HED image of shape :math:`(*, 3, H, W)` in optical-density units (white is 0).
    """
    check_image(image, "image", batched=False)
    od = [-torch.log10(c.clamp(min=_OD_FLOOR)) for c in image.unbind(-3)]
    m = _HED_FROM_RGB
    return torch.stack(
        [od[0] * m[0][j] + od[1] * m[1][j] + od[2] * m[2][j] for j in range(3)], dim=-3
    )


def rgb_to_hed_vjp(image: Tensor, grad: Tensor) -> Tensor:
    """Closed-form vector-Jacobian product of :func:`rgb_to_hed` at ``image``."""
    m = _HED_FROM_RGB
    gh = grad.unbind(-3)
    out = []
    for i, c in enumerate(image.unbind(-3)):
        god = gh[0] * m[i][0] + gh[1] * m[i][1] + gh[2] * m[i][2]
        out.append(torch.where(c >= _OD_FLOOR, -god / (_LN10 * c.clamp(min=_OD_FLOOR)), 0.0))
    return torch.stack(out, dim=-3)


def hed_to_rgb_vjp(image: Tensor, grad: Tensor, post: str | None = None) -> Tensor:
    """Closed-form vector-Jacobian product of ``post(hed_to_rgb(image))`` (clipped) at ``image``."""
    hh, ee, dd = image.unbind(-3)
    m = _RGB_FROM_HED
    gs = []
    for i, g in enumerate(grad.unbind(-3)):
        e = torch.exp(-_LN10 * (hh * m[0][i] + ee * m[1][i] + dd * m[2][i]))
        inside = (e >= 0.0) & (e <= 1.0)
        gs.append(torch.where(inside, -_LN10 * g * post_mask(e.clamp(0.0, 1.0), post) * e, 0.0))
    return torch.stack([gs[0] * m[j][0] + gs[1] * m[j][1] + gs[2] * m[j][2] for j in range(3)], dim=-3)


def hed_to_rgb(image: Tensor, clip: bool = True) -> Tensor:
    r"""Convert haematoxylin, eosin and DAB optical densities back to RGB.

    Args:
        image: HED image of shape :math:`(*, 3, H, W)` in optical-density units.
        clip: clamp to [0, 1] (negative densities would otherwise give values above 1).

    Returns:
        RGB image of shape :math:`(*, 3, H, W)`.
    """
    check_image(image, "image", batched=False)
    hh, ee, dd = image.unbind(-3)
    m = _RGB_FROM_HED
    out = torch.stack(
        [torch.exp(-_LN10 * (hh * m[0][i] + ee * m[1][i] + dd * m[2][i])) for i in range(3)], dim=-3
    )
    return out.clamp(0.0, 1.0) if clip else out


def rgb_identity_vjp(image: Tensor, grad: Tensor, post: str | None = None) -> Tensor:
    """Vector-Jacobian product of ``post(image)``: the identity's, masked by ``post``."""
    return grad if post is None else grad * post_mask(image, post)


def rgb_identity(image: Tensor) -> Tensor:
    """RGB is its own space: returns ``image`` unchanged (shape :math:`(*, 3, H, W)`)."""
    check_image(image, "image", batched=False)
    return image


# --- registry -------------------------------------------------------------------------------------
Triple = tuple[float, float, float]


@dataclass(frozen=True)
class ColorSpace:
    """A colour space the layers can normalise in.

    Attributes:
        name: registry key.
        to_space: RGB in [0, 1] -> space, on ``(*, 3, H, W)``.
        from_space: space -> RGB, on ``(*, 3, H, W)``.
        to_space_vjp, from_space_vjp: their closed-form vector-Jacobian products
            (``(input, grad)`` and ``(input, grad, post)``); with both, the layers' training
            step saves only its input (:class:`lstainnorm.layers.norm.StandardiseFunction`).
            A space without them trains through autograd.
        channels: channel names, for logs and reports.
        natural_units: channel units as :meth:`to_natural` reports them.
        natural_scale: factor from internal to natural units, per channel.
        default_mu, default_sigma: template used when none is given (internal units).
        std_floor: lower bound on the per-image std (internal units), so that a
            uniform or background-only tile is not amplified by ``1 / eps``.
        description: one line for docs and ``--help``.
    """

    name: str
    to_space: Callable[[Tensor], Tensor]
    from_space: Callable[[Tensor], Tensor]
    channels: tuple[str, str, str]
    natural_units: tuple[str, str, str]
    natural_scale: Triple
    default_mu: Triple
    default_sigma: Triple
    std_floor: Triple
    description: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    to_space_vjp: Callable[[Tensor, Tensor], Tensor] | None = None
    from_space_vjp: Callable[..., Tensor] | None = None

    def to_natural(self, values: Triple | list[float] | Tensor) -> list[float]:
        """Convert a per-channel triple (a mean or a std) from internal to natural units."""
        vals = values.tolist() if isinstance(values, Tensor) else list(values)
        return [float(v) * s for v, s in zip(vals, self.natural_scale)]

    def from_natural(self, values: Triple | list[float]) -> list[float]:
        """Inverse of :meth:`to_natural`."""
        return [float(v) / s for v, s in zip(values, self.natural_scale)]


SPACES: dict[str, ColorSpace] = {}


def register_space(space: ColorSpace, *, overwrite: bool = False) -> ColorSpace:
    """Add a colour space to the registry (``overwrite=True`` replaces an existing one)."""
    if space.name in SPACES and not overwrite:
        raise ValueError(f"colour space {space.name!r} is already registered")
    SPACES[space.name] = space
    return space


def list_spaces() -> list[str]:
    """Names of the registered colour spaces."""
    return sorted(SPACES)


def get_space(name: str | ColorSpace) -> ColorSpace:
    """Look up a colour space by name (case-insensitive)."""
    if isinstance(name, ColorSpace):
        return name
    if not isinstance(name, str):
        raise TypeError(f"colour space must be a name (str), got {type(name).__name__}")
    key = name.lower()
    if key in SPACES:
        return SPACES[key]
    for sp in SPACES.values():
        if key in sp.aliases:
            return sp
    raise ValueError(f"unknown colour space {name!r}; choose one of {list_spaces()}")


# Default templates (docs/method.md, "Default templates"): Lab is the reference's single-space
# template (NCT-CRC-HE-100K); HSV, RGB and HED are `lstainnorm template` on the 9-tile
# NCT-CRC-HE-100K sample, tissue-masked (the reference's own HSV/RGB numbers describe far
# darker images than H&E and are kept as templates="reference").
register_space(
    ColorSpace(
        name="lab",
        to_space=rgb_to_lab,
        from_space=lab_to_rgb,
        to_space_vjp=rgb_to_lab_vjp,
        from_space_vjp=lab_to_rgb_vjp,
        channels=("L*", "a*", "b*"),
        natural_units=("L*", "a*", "b*"),
        natural_scale=(1.0, 1.0, 1.0),
        default_mu=(70.5085, 21.9641, -13.7990),
        default_sigma=(12.7103, 8.7185, 6.0168),
        std_floor=(0.5, 0.5, 0.5),
        description="CIE L*a*b* (D65): L* 0-100, a*/b* about -128..127",
        aliases=("cielab",),
    )
)
register_space(
    ColorSpace(
        name="hsv",
        to_space=rgb_to_hsv,
        from_space=hsv_to_rgb,
        to_space_vjp=rgb_to_hsv_vjp,
        from_space_vjp=hsv_to_rgb_vjp,
        channels=("H", "S", "V"),
        natural_units=("deg", "0-1", "0-1"),
        natural_scale=(180.0 / math.pi, 1.0, 1.0),
        default_mu=(4.7961, 0.3829, 0.6810),
        default_sigma=(0.3500, 0.0907, 0.1084),
        std_floor=(0.01, 0.005, 0.005),
        description="HSV: hue in radians (degrees in reports), S and V in 0-1",
    )
)
register_space(
    ColorSpace(
        name="rgb",
        to_space=rgb_identity,
        from_space=rgb_identity,
        to_space_vjp=rgb_identity_vjp,
        from_space_vjp=rgb_identity_vjp,
        channels=("R", "G", "B"),
        natural_units=("0-255", "0-255", "0-255"),
        natural_scale=(255.0, 255.0, 255.0),
        default_mu=(0.6661, 0.4677, 0.6091),
        default_sigma=(0.1127, 0.1056, 0.0953),
        std_floor=(0.005, 0.005, 0.005),
        description="RGB in 0-1 (0-255 in reports)",
    )
)
register_space(
    ColorSpace(
        name="hed",
        to_space=rgb_to_hed,
        from_space=hed_to_rgb,
        to_space_vjp=rgb_to_hed_vjp,
        from_space_vjp=hed_to_rgb_vjp,
        channels=("H", "E", "D"),
        natural_units=("OD", "OD", "OD"),
        natural_scale=(1.0, 1.0, 1.0),
        default_mu=(0.2365, 0.1725, 0.2223),
        default_sigma=(0.1453, 0.1174, 0.0765),
        std_floor=(0.005, 0.005, 0.005),
        description="haematoxylin/eosin/DAB optical density (Ruifrok-Johnston)",
    )
)


# --- thin modules (kornia style) ------------------------------------------------------------------
class _Convert(nn.Module):
    fn: Callable[[Tensor], Tensor]

    def forward(self, image: Tensor) -> Tensor:
        return type(self).fn(image)


class RgbToLab(_Convert):
    """Module form of :func:`rgb_to_lab`: ``(*, 3, H, W)`` RGB in [0, 1] -> Lab."""

    fn = staticmethod(rgb_to_lab)


class LabToRgb(_Convert):
    """Module form of :func:`lab_to_rgb` (with clipping): ``(*, 3, H, W)`` Lab -> RGB."""

    fn = staticmethod(lab_to_rgb)


class RgbToHsv(_Convert):
    """Module form of :func:`rgb_to_hsv`: ``(*, 3, H, W)`` RGB in [0, 1] -> HSV (hue in radians)."""

    fn = staticmethod(rgb_to_hsv)


class HsvToRgb(_Convert):
    """Module form of :func:`hsv_to_rgb`: ``(*, 3, H, W)`` HSV -> RGB."""

    fn = staticmethod(hsv_to_rgb)


class RgbToHed(_Convert):
    """Module form of :func:`rgb_to_hed`: ``(*, 3, H, W)`` RGB in [0, 1] -> HED optical density."""

    fn = staticmethod(rgb_to_hed)


class HedToRgb(_Convert):
    """Module form of :func:`hed_to_rgb` (with clipping): ``(*, 3, H, W)`` HED -> RGB."""

    fn = staticmethod(hed_to_rgb)
