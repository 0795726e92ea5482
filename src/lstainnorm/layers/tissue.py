"""Tissue masks and masked per-image channel statistics.

Statistics over glass dominate a tile that is mostly background, so the
template estimator (and, optionally, the layers) take them over tissue only.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["tissue_mask", "tissue_weight", "channel_stats", "mean_var", "centred_mean_var", "WHITE_THRESHOLD", "BLACK_THRESHOLD", "TISSUE_MIN_PIXELS"]

# A pixel is background when every channel is at least this bright (optical density below
# -log10(0.86) = 0.065 in every channel: glass and empty slide), ...
WHITE_THRESHOLD = 0.86
# ... and "black" (pen marks, out-of-focus voids, padding) when every channel is this dark.
BLACK_THRESHOLD = 0.04
# Fewer tissue pixels than this and an image's tissue statistics are not trusted.
TISSUE_MIN_PIXELS = 16


def tissue_mask(x: Tensor, white: float = WHITE_THRESHOLD, black: float = BLACK_THRESHOLD) -> Tensor:
    """Boolean tissue mask of an RGB batch.

    Args:
        x: RGB in [0, 1], shape ``(*, 3, H, W)``.
        white: pixels whose channels are all >= ``white`` are background (glass).
        black: pixels whose channels are all <= ``black`` are excluded too.

    Returns:
        Bool tensor of shape ``(*, 1, H, W)``: True on tissue.
    """
    lo = x.amin(dim=-3, keepdim=True)
    hi = x.amax(dim=-3, keepdim=True)
    return (lo < white) & (hi > black)


def tissue_weight(x: Tensor, lo: float = 0.80, hi: float = 0.92, black: float = BLACK_THRESHOLD) -> Tensor:
    """Soft tissue weight for blending, shape ``(*, 1, H, W)``: 0 on glass and on black, 1 on tissue.

    Glass: 1 where the darkest channel is <= ``lo``, 0 where it is >= ``hi``, linear between.
    Black: 0 where the brightest channel is <= ``black``, 1 from ``2 * black`` on, linear between.
    Layers with ``tissue_stats=True`` blend ``w * normalised + (1 - w) * input`` so that glass
    stays glass and black stays black (statistics taken over tissue alone would otherwise push
    them to extreme or flat colours), without a hard seam at the tissue edge.
    """
    lo_c = x.amin(dim=-3, keepdim=True)
    hi_c = x.amax(dim=-3, keepdim=True)
    glass = ((hi - lo_c) / (hi - lo)).clamp(0.0, 1.0)
    dark = ((hi_c - black) / black).clamp(0.0, 1.0)
    return glass * dark


def mean_var(y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image, per-channel mean and unbiased variance over H, W (torch's, as the reference;
    a 1-pixel image has no spread), shapes ``(B, C, 1, 1)``.

    Two passes (mean, then the squared deviations) rather than ``torch.var_mean``, whose
    Welford loop was the slow part of the statistics in a CPU profile; as accurate (no
    ``E[y^2] - E[y]^2`` cancellation).
    """
    mean, _, var = centred_mean_var(y)
    return mean, var


def centred_mean_var(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`mean_var` with the centred image it computes on the way: ``(mean, y - mean, var)``
    (the layers' forward reuses it)."""
    n = y.shape[-1] * y.shape[-2]
    mean = y.mean(dim=(-2, -1), keepdim=True)
    d = y - mean
    return mean, d, (d * d).sum(dim=(-2, -1), keepdim=True) / max(n - 1, 1)


def channel_stats(
    y: Tensor,
    weight: Tensor | None = None,
    std_floor: Tensor | None = None,
    min_pixels: int = TISSUE_MIN_PIXELS,
) -> tuple[Tensor, Tensor]:
    """Per-image, per-channel mean and (unbiased) std over H and W.

    Args:
        y: values of shape ``(B, C, H, W)``.
        weight: optional 0/1 mask of shape ``(B, 1, H, W)``; images with fewer than
            ``min(min_pixels, H*W)`` masked pixels fall back to all pixels.
        std_floor: optional per-channel lower bound on the std, shape ``(C,)``. The bound is
            applied to the variance (``sqrt(max(var, floor**2))``), so the gradient stays
            finite for a uniform image, where ``torch.std`` would give 0/0.
        min_pixels: see ``weight``.

    Returns:
        ``(mean, std)``, each of shape ``(B, C, 1, 1)``.
    """
    n = y.shape[-1] * y.shape[-2]
    if weight is None:
        mean, var = mean_var(y)
    else:
        w = weight.to(y.dtype)
        cnt = w.sum(dim=(-2, -1), keepdim=True)
        enough = cnt >= min(min_pixels, n)
        w = torch.where(enough, w, torch.ones_like(w))
        cnt = torch.where(enough, cnt, torch.full_like(cnt, float(n)))
        mean = (w * y).sum(dim=(-2, -1), keepdim=True) / cnt
        var = (w * (y - mean).square()).sum(dim=(-2, -1), keepdim=True) / (cnt - 1.0).clamp(min=1.0)
    if std_floor is not None:
        var = torch.maximum(var, std_floor.to(var.dtype).square().view(1, -1, 1, 1))
        return mean, var.sqrt()
    return mean, var.clamp(min=0.0).sqrt()
