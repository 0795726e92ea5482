"""Stain-aware normalisation in optical density: ``StainConcentrationNorm``.

Beer-Lambert: a pixel's optical density ``od = -ln(I / I0)`` is a sum of stain vectors times
concentrations, ``od = c_H h + c_E e + c_R r`` (``r`` = ``h x e``, what the two stains do not
explain). A change of how much of each stain a laboratory uses, i.e. of the H/E ratio, scales
``c_H`` and ``c_E``: no per-channel standardisation in Lab, HSV or RGB undoes it, and the fixed
Ruifrok vectors of the ``hed`` space mix it into all three channels when a slide's own
vectors differ (``benchmarks/invariance.py``). ``StainConcentrationNorm`` separates the stains with each
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
from .closed_form import closed_form_enabled
from .registry import register_norm
from .tissue import TISSUE_MIN_PIXELS, tissue_mask

__all__ = ["StainConcentrationNorm", "StainODFunction", "stain_od", "macenko_stains", "stain_basis", "stain_amounts", "RUIFROK", "STAIN_MODES"]

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


def _od(x: Tensor) -> Tensor:
    return -torch.log(x.clamp(min=OD_MIN))


def _tissue_weights(x: Tensor) -> Tensor:
    """``(B, 1, H, W)`` weights that average over each image's tissue (all pixels on glass, so
    that the (tiny) amounts stay defined): ``mask / count``."""
    mask = tissue_mask(x.detach())
    few = mask.sum(dim=(-2, -1), keepdim=True) < TISSUE_MIN_PIXELS
    w = (mask | few).to(x.dtype)
    return w / w.sum(dim=(-2, -1), keepdim=True)


def _inverse_rows(basis: Tensor) -> Tensor:
    """``P`` with ``c = P od``: the concentrations of ``[h, e, r]`` from a pixel's OD (``od = basis^T c``)."""
    return torch.linalg.inv(basis).transpose(-1, -2)


def stain_amounts(x: Tensor, he: Tensor | None = None) -> Tensor:
    """Mean H and E concentration over each image's tissue, ``(B, 2)``: what :class:`StainConcentrationNorm`
    scales to its template. ``he`` (``(B, 2, 3)``): the stain vectors; default each image's own."""
    check_image(x, "x")
    he = macenko_stains(x).to(x) if he is None else he.to(x)
    return _amounts(_inverse_rows(stain_basis(he)), _tissue_mean(_od(x), _tissue_weights(x)))


def _tissue_mean(img: Tensor, w: Tensor) -> Tensor:
    """``(B, C)``: each channel's mean over the tissue, ``w`` from :func:`_tissue_weights`."""
    return (img * w).sum(dim=(-2, -1))


def _amounts(p: Tensor, mean_od: Tensor) -> Tensor:
    """``(B, 2)`` mean H and E concentrations: linear in the tissue-mean OD, ``a = P[:2] mean_od``."""
    return (p[:, :2] @ mean_od.unsqueeze(-1)).squeeze(-1)


def _stain_map(he: Tensor, t: Tensor, mean_od: Tensor, max_gain: float):
    """The per-image ``(B, 3, 3)`` map of OD to normalised OD, ``M = basis^T diag(gain, gain, 1) P``,
    with what the backward needs: ``(M, basis, P, a, t, ac)`` (``t`` per image). The amounts are
    linear in the OD, so neither they nor the output need the concentration images."""
    basis = stain_basis(he)
    p = _inverse_rows(basis)
    a = _amounts(p, mean_od)
    t = t.to(a).expand_as(a)
    ac = a.clamp(min=t / max_gain, max=t * max_gain)
    scale = torch.cat([t / ac, torch.ones_like(a[:, :1])], dim=1)  # the residual is kept as it is
    return basis.transpose(-1, -2) @ (scale.unsqueeze(-1) * p), basis, p, a, t, ac


def _apply_map(m: Tensor, od: Tensor) -> Tensor:
    return torch.einsum("bcd,bdhw->bchw", m, od)


def _stain_od_autograd(x: Tensor, he: Tensor, t: Tensor, max_gain: float) -> Tensor:
    od = _od(x)
    m = _stain_map(he, t, _tissue_mean(od, _tissue_weights(x)), max_gain)[0]
    return torch.exp(-_apply_map(m, od).clamp(min=0.0)).clamp(0.0, 1.0)


class StainODFunction(torch.autograd.Function):
    r""":func:`stain_od` with its backward in closed form (eager training, fixed or estimated vectors).

    The output is a per-image 3 x 3 map of the OD, ``out = exp(-max(y, 0))``, ``y = M od``, with
    ``M = basis^T diag(s) P`` and ``s_k = t_k / clamp(a_k, t_k / g, t_k g)``, ``a = P[:2] m``, ``m``
    the tissue mean of ``od``. With ``G`` the gradient at ``out`` and ``w`` the tissue weights::

        g_y   = -G out [out < 1]                        (out < 1 iff y > 0 and the clamps pass)
        S     = sum_pixels g_y od^T                     (B, 3, 3): the gradient at M
        g_s_k = sum_cd S_cd basis_kc P_kd               (k = H, E)
        g_ac  = -g_s t / ac^2
        g_t   = g_s / ac + g_ac (i_lo / g + i_hi g),   g_m = P[:2]^T (g_ac i_a)
        g_x   = -(M^T g_y + g_m w) / x  [x > 1/255]

    ``i_lo, i_a, i_hi``: where ``a`` is below, inside and above the gain bounds (autograd's
    clamp splits a tie half and half; scalar clamps pass nothing at a tie, hence the strict
    inequalities). Autograd keeps the OD, the concentrations and their scaled copy (about four
    images); this saves the input and the output and recomputes the OD (one log). Equal to
    autograd's gradients (tests, gradcheck in float64). Once differentiable.
    """

    @staticmethod
    def forward(ctx, x: Tensor, he: Tensor, t: Tensor, max_gain: float):
        # in place, and with the OD's sign folded into the sums: the pixel passes are the cost here
        log_x = x.clamp(min=OD_MIN).log_()  # = -od
        w = _tissue_weights(x)
        m, basis, p, a, t_b, ac = _stain_map(he, t, -_tissue_mean(log_x, w), max_gain)
        out = _apply_map(m, log_x).clamp_(max=0.0).exp_()  # exp(-max(M od, 0)), in [0, 1] as it is
        ctx.max_gain = max_gain
        ctx.save_for_backward(x, out, w, m, basis, p, a, t_b, ac)
        ctx.t_shape = t.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, out, w, m, basis, p, a, t, ac = ctx.saved_tensors
        g = ctx.max_gain
        lo, hi = t / g, t * g  # as the forward's clamp computed them, so its ties are found here
        xc = x.clamp(min=OD_MIN)
        g_u = torch.where(out < 1.0, grad * out, 0.0)  # = -g_y
        s_grad = torch.einsum("bchw,bdhw->bcd", g_u, xc.log())  # the gradient at M: g_y od^T = g_u log(x)^T
        g_s = torch.einsum("bcd,bkc,bkd->bk", s_grad, basis[:, :2], p[:, :2])
        g_ac = -g_s * t / ac.square()
        half = lambda c: c.to(a) * 0.5  # noqa: E731
        i_lo, i_hi = (a < lo).to(a) + half(a == lo), (a > hi).to(a) + half(a == hi)
        g_t = g_x = None
        if ctx.needs_input_grad[2]:
            g_t = g_s / ac + g_ac * (i_lo / g + i_hi * g)
            g_t = g_t.sum_to_size(ctx.t_shape)  # a template for all images, or one per image
        if ctx.needs_input_grad[0]:
            g_m = (p[:, :2].transpose(-1, -2) @ (g_ac * (1.0 - i_lo - i_hi)).unsqueeze(-1)).squeeze(-1)
            g_x = torch.einsum("bcd,bchw->bdhw", m, g_u).sub_(g_m[..., None, None] * w).div_(xc)  # = -g_od / x
            g_x = torch.where(x > OD_MIN, g_x, 0.0)
        return g_x, None, g_t, None


def stain_od(x: Tensor, he: Tensor, amounts: Tensor, max_gain: float = 4.0) -> Tensor:
    """Functional :class:`StainConcentrationNorm`: scale each image's H and E concentrations to ``amounts``.

    Args:
        x: RGB in [0, 1], shape ``(B, 3, H, W)``.
        he: H and E optical-density vectors, ``(2, 3)`` or ``(B, 2, 3)`` (rows normalised here).
        amounts: template mean H and E concentrations over tissue, ``(2,)``, positive.
        max_gain: bound on each stain's scale factor (and its inverse).

    Returns:
        RGB ``(B, 3, H, W)`` in [0, 1]. Eagerly with fixed or estimated vectors, the
        closed-form :class:`StainODFunction` runs (its gradients when training); learned vectors,
        ``torch.compile`` and ``closed_form_backward(False)`` use autograd.
    """
    he = he / he.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    if he.ndim == 2:
        he = he.expand(x.shape[0], 2, 3)
    amounts = amounts.to(x.dtype)
    grad = torch.is_grad_enabled()
    training = grad and (x.requires_grad or amounts.requires_grad)
    if not (grad and he.requires_grad) and not torch.compiler.is_compiling() and (not training or closed_form_enabled()):
        return StainODFunction.apply(x, he, amounts, float(max_gain))  # also the in-place forward of inference
    return _stain_od_autograd(x, he, amounts, max_gain)


class StainConcentrationNorm(nn.Module):
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
        >>> StainConcentrationNorm()(torch.rand(2, 3, 32, 32)).shape
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
def _stain(stains: str = "estimate", amounts=None, learnable: bool = True, **kwargs) -> StainConcentrationNorm:
    return StainConcentrationNorm(stains, amounts, learnable=learnable, **kwargs)


def __getattr__(name: str):  # the names before the rename, for one release
    from ._deprecated import renamed

    return renamed(name, globals(), 'lstainnorm.layers.stain')
