"""Stain-aware normalisation in optical density: ``StainOD`` (issue 27).

Beer-Lambert: a pixel's optical density ``od = -ln(I / I0)`` is a sum of stain vectors times
concentrations, ``od = c_H h + c_E e + c_R r`` (``r`` = ``h x e``, what the two stains do not
explain). A change of how much of each stain a laboratory uses, i.e. of the H/E ratio, scales
``c_H`` and ``c_E``: no per-channel standardisation in Lab, HSV or RGB undoes it, and the fixed
Ruifrok vectors of the ``hed`` space mix it into all three channels when a slide's own
vectors differ (``benchmarks/invariance.py``). ``StainOD`` separates the stains with each
image's own vectors (Macenko's estimate), or with vectors learned from Ruifrok's, scales each
stain's concentration so that its mean over the tissue equals a template amount, keeps the
residual, and recomposes RGB::

    od     = -ln(max(x, 1/255))
    c      = od @ inverse([h; e; r])             (per pixel: c_H, c_E, c_R)
    a_k    = mean of c_k over tissue pixels       (k = H, E)
    c'_k   = c_k * clamp(t_k / a_k, 1/g, g)       (t_k: template amount, g = max_gain)
    out    = exp(-(c'_H h + c'_E e + c_R r))

Scaling (no shift) keeps glass at zero stain and maps a scaled stain exactly back; the gain
bound ``g`` keeps glass and one-stain tiles (an amount near 0) from being amplified to noise.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .checks import check_image, check_rgb_range, compute_dtype
from .color import _RGB_FROM_HED
from .registry import register_norm
from .tissue import TISSUE_MIN_PIXELS, tissue_mask

__all__ = ["StainOD", "stain_od", "macenko_stains", "stain_basis", "stain_amounts", "RUIFROK", "STAIN_MODES"]

# Ruifrok & Johnston's H and E optical-density vectors: the first two rows of the ``hed`` space's matrix.
RUIFROK = torch.tensor(_RGB_FROM_HED[:2], dtype=torch.float64)
OD_MIN = 1.0 / 255.0  # darkest transmission the OD takes (torch-staintools' convention)
STAIN_MODES = ("estimate", "ruifrok", "learned")
# The mean over the 9-tile NCT-CRC-HE-100K sample (``../shared/data/nct-crc-he-sample/*.tif``) of each
# tile's ``stain_amounts`` (its own Macenko vectors), as the colour spaces' default templates are
# estimated on that sample: 0.6385, 0.7063 (tests/test_stain.py recomputes them where ../shared exists).
DEFAULT_AMOUNTS = (0.64, 0.71)
# Stain vectors are estimated on every ``ESTIMATE_STRIDE``-th row and column (1/9 of the pixels):
# a stain direction is a statistic of thousands of pixels, the percentiles a sort of all of them.
ESTIMATE_STRIDE = 3


def macenko_stains(x: Tensor, stride: int = ESTIMATE_STRIDE, beta: float = 0.15, alpha: float = 1.0) -> Tensor:
    """Each image's H and E optical-density vectors, ``(B, 2, 3)`` unit rows: Macenko et al.
    (2009) as published, batched. Pixels with OD >= ``beta`` in every channel; the plane of the
    two largest singular vectors of their (uncentred) OD; the directions at the ``alpha`` and
    ``100 - alpha`` percentiles of the angle in that plane; the redder one is haematoxylin.
    Ruifrok's vectors where an image has too little tissue or the two directions (nearly)
    coincide. ``stride`` > 1 estimates on every ``stride``-th row and column. No gradient."""
    with torch.no_grad():
        xs = x.detach()[..., ::stride, ::stride].to(torch.float32)
        od = -torch.log(xs.clamp(min=OD_MIN)).flatten(2)  # (B, 3, N)
        keep = (od >= beta).all(dim=1)  # (B, N)
        w = keep.to(od.dtype).unsqueeze(1)
        n = w.sum(-1, keepdim=True).clamp(min=1.0)
        moment = (od * w) @ od.transpose(1, 2) / n  # (B, 3, 3)
        _, vecs = torch.linalg.eigh(moment.double())
        v1, v2 = vecs[..., 2].float(), vecs[..., 1].float()
        v1 = v1 * torch.where(v1.sum(-1, keepdim=True) < 0, -1.0, 1.0)  # OD vectors point into the positive octant
        v2 = v2 * torch.where(v2.sum(-1, keepdim=True) < 0, -1.0, 1.0)
        phi = torch.atan2((od * v2.unsqueeze(-1)).sum(1), (od * v1.unsqueeze(-1)).sum(1))
        phi = phi.masked_fill(~keep, float("nan"))
        enough = keep.sum(-1) >= TISSUE_MIN_PIXELS
        phi = torch.where(enough.unsqueeze(-1), phi, 0.0)  # no NaN-only rows for nanquantile; these images get Ruifrok's below
        lo = torch.nanquantile(phi, alpha / 100.0, dim=1).unsqueeze(-1)
        hi = torch.nanquantile(phi, 1.0 - alpha / 100.0, dim=1).unsqueeze(-1)
        a = v1 * torch.cos(lo) + v2 * torch.sin(lo)
        b = v1 * torch.cos(hi) + v2 * torch.sin(hi)
        a_is_h = (a[:, 0] > b[:, 0]).unsqueeze(-1)
        he = torch.stack([torch.where(a_is_h, a, b), torch.where(a_is_h, b, a)], dim=1)
        he = he / he.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        cos = (he[:, 0] * he[:, 1]).sum(-1).abs()
        bad = ~enough | (cos > 0.995) | ~torch.isfinite(he).flatten(1).all(1)
        ruifrok = (RUIFROK / RUIFROK.norm(dim=1, keepdim=True)).to(he)
        he = torch.where(bad.view(-1, 1, 1), ruifrok, he)
    return he.to(x.dtype if x.is_floating_point() else torch.float32)


def stain_basis(he: Tensor) -> Tensor:
    """``(..., 3, 3)`` basis ``[h; e; r]`` from unit H and E vectors ``(..., 2, 3)``, with
    ``r = h x e / |h x e|``: the third direction, what the two stains do not explain."""
    r = torch.linalg.cross(he[..., 0, :], he[..., 1, :], dim=-1)
    r = r / r.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    return torch.cat([he, r.unsqueeze(-2)], dim=-2)


def _concentrations(x: Tensor, he: Tensor) -> tuple[Tensor, Tensor]:
    """``(conc, basis)``: per-pixel concentrations ``(B, 3, H, W)`` of ``[h, e, r]``, and the basis."""
    od = -torch.log(x.clamp(min=OD_MIN))
    basis = stain_basis(he)  # (B, 3, 3), rows h, e, r: od = basis^T c
    conc = torch.einsum("bkc,bchw->bkhw", torch.linalg.inv(basis).transpose(-1, -2), od)
    return conc, basis


def stain_amounts(x: Tensor, he: Tensor | None = None) -> Tensor:
    """Mean H and E concentration over each image's tissue, ``(B, 2)``: what :class:`StainOD`
    scales to its template. ``he`` (``(B, 2, 3)``): the stain vectors; default each image's own."""
    check_image(x, "x")
    he = macenko_stains(x).to(x) if he is None else he.to(x)
    conc, _ = _concentrations(x, he)
    return _amounts(x, conc[:, :2])


def _amounts(x: Tensor, conc: Tensor) -> Tensor:
    mask = tissue_mask(x.detach()).to(conc.dtype)  # (B, 1, H, W)
    n = mask.sum(dim=(-2, -1))
    few = n < TISSUE_MIN_PIXELS  # glass: all pixels, so the (tiny) amounts stay defined
    mask = torch.where(few.view(-1, 1, 1, 1), torch.ones_like(mask), mask)
    return (conc * mask).sum(dim=(-2, -1)) / mask.sum(dim=(-2, -1))


def stain_od(x: Tensor, he: Tensor, amounts: Tensor, max_gain: float = 4.0) -> Tensor:
    """Functional :class:`StainOD`: scale each image's H and E concentrations to ``amounts``.

    Args:
        x: RGB in [0, 1], shape ``(B, 3, H, W)``.
        he: H and E optical-density vectors, ``(2, 3)`` or ``(B, 2, 3)`` (rows normalised here).
        amounts: template mean H and E concentrations over tissue, ``(2,)``, positive.
        max_gain: bound on each stain's scale factor (and its inverse).

    Returns:
        RGB ``(B, 3, H, W)`` in [0, 1].
    """
    he = he / he.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    if he.ndim == 2:
        he = he.expand(x.shape[0], 2, 3)
    conc, basis = _concentrations(x, he)
    a = _amounts(x, conc[:, :2])  # (B, 2)
    t = amounts.to(conc).expand_as(a)
    gain = t / a.clamp(min=t / max_gain, max=t * max_gain)
    scale = torch.cat([gain, torch.ones_like(gain[:, :1])], dim=1)  # the residual is kept as it is
    od = torch.einsum("bkc,bkhw->bchw", basis, conc * scale[..., None, None])
    return torch.exp(-od.clamp(min=0.0)).clamp(0.0, 1.0)


class StainOD(nn.Module):
    r"""Stain-aware normalisation in optical density (module docstring: the formulas).

    Args:
        stains: the H and E vectors: ``"estimate"`` (each image's own, Macenko; default),
            ``"ruifrok"`` (Ruifrok & Johnston's standard vectors, fixed) or ``"learned"``
            (one pair for all images, learned from Ruifrok's).
        amounts: template mean H and E concentrations over tissue (natural-log OD units);
            default :data:`DEFAULT_AMOUNTS`.
        learnable: learn the template amounts (log-parametrised, so they stay positive).
        max_gain: bound on each stain's scale factor and its inverse.
        validate: check inputs for NaN/Inf and the [0, 1] range.

    Shape:
        - Input: :math:`(B, 3, H, W)` RGB in [0, 1].
        - Output: :math:`(B, 3, H, W)` RGB in [0, 1].

    Example:
        >>> StainOD()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(
        self,
        stains: str = "estimate",
        amounts: Sequence[float] | None = None,
        *,
        learnable: bool = True,
        max_gain: float = 4.0,
        validate: bool = True,
    ) -> None:
        super().__init__()
        if stains not in STAIN_MODES:
            raise ValueError(f"stains must be one of {STAIN_MODES}, got {stains!r}")
        amounts = DEFAULT_AMOUNTS if amounts is None else tuple(float(v) for v in amounts)
        if len(amounts) != 2 or not all(math.isfinite(v) and v > 0 for v in amounts):
            raise ValueError(f"amounts must be two positive numbers (H, E), got {list(amounts)}")
        if not (math.isfinite(max_gain) and max_gain >= 1.0):
            raise ValueError(f"max_gain must be a finite number >= 1, got {max_gain}")
        self.stains, self.max_gain, self.validate = stains, float(max_gain), bool(validate)
        log_t = torch.log(torch.tensor(amounts, dtype=torch.float32))
        self.log_amounts = nn.Parameter(log_t, requires_grad=learnable)
        he = RUIFROK.float() / RUIFROK.float().norm(dim=1, keepdim=True)
        if stains == "learned":
            self.he = nn.Parameter(he)
        else:
            self.register_buffer("he", he)

    def extra_repr(self) -> str:
        return f"stains={self.stains!r}, learnable={self.log_amounts.requires_grad}, max_gain={self.max_gain:g}"

    @property
    def amounts(self) -> Tensor:
        """The template's mean H and E concentrations, ``(2,)``."""
        return self.log_amounts.exp()

    def stain_vectors(self, x: Tensor) -> Tensor:
        """The ``(B, 2, 3)`` H and E vectors this layer uses for ``x``."""
        if self.stains == "estimate":
            return macenko_stains(x).to(x)
        return self.he.to(x).expand(x.shape[0], 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        check_image(x, "x")
        if self.validate:
            check_rgb_range(x, "x")
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):  # OD arithmetic in float32
            xc = x.to(dtype)
            out = stain_od(xc, self.stain_vectors(xc), self.amounts.to(dtype), self.max_gain)
        return out.to(x.dtype)


@register_norm("stain")
def _stain(stains: str = "estimate", amounts=None, learnable: bool = True, **kwargs) -> StainOD:
    return StainOD(stains, amounts, learnable=learnable, **kwargs)
