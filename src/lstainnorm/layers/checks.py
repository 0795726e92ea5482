"""Input validation shared by the layers and the colour functions.

Every public entry point checks its input here so that a user gets one clear
``TypeError``/``ValueError`` saying what was expected, instead of a NaN deep
inside a colour conversion.
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_image", "check_rgb_range", "compute_dtype"]

# Float rounding in upstream resizes/augmentations gives values a hair outside [0, 1];
# accept those rather than reject a legitimate image.
RANGE_TOLERANCE = 1e-4


def check_image(x: object, name: str = "input", *, batched: bool = True) -> torch.Tensor:
    """Check that ``x`` is a float image tensor of shape (B, 3, H, W) (or (*, 3, H, W))."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, 3, H, W), got {type(x).__name__}")
    if batched and x.dim() != 4:
        raise ValueError(
            f"{name} must have shape (B, 3, H, W), got {tuple(x.shape)} ({x.dim()} dimensions); "
            "add a batch dimension with x.unsqueeze(0) for a single image"
        )
    if not batched and x.dim() < 3:
        raise ValueError(f"{name} must have shape (*, 3, H, W), got {tuple(x.shape)}")
    if x.shape[-3] != 3:
        raise ValueError(
            f"{name} must have 3 colour channels in dimension -3 (RGB, channels first), "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[-1] < 1 or x.shape[-2] < 1:
        raise ValueError(f"{name} must have H, W >= 1, got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise TypeError(
            f"{name} must be a floating-point tensor with values in [0, 1], got dtype {x.dtype}; "
            "for uint8 images use x.float() / 255"
        )
    return x


def check_rgb_range(x: torch.Tensor, name: str = "input") -> None:
    """Check that ``x`` is finite and lies in [0, 1] (one reduction, one sync)."""
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x.detach())
    lo_f, hi_f = float(lo), float(hi)
    # aminmax propagates NaN and +-Inf, so one pass finds every non-finite value.
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        raise ValueError(f"{name} contains NaN or Inf values; clean the image before normalising it")
    if lo_f < -RANGE_TOLERANCE or hi_f > 1.0 + RANGE_TOLERANCE:
        raise ValueError(
            f"{name} values must lie in [0, 1], observed range [{lo_f:.4g}, {hi_f:.4g}]; "
            + ("scale to [0, 1] (e.g. x / 255 for 8-bit images)" if hi_f > 1.0 else "scale to [0, 1]")
        )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layers compute in: float64 stays float64, everything else uses float32.

    Half and bfloat16 inputs (and autocast) are computed in float32 because the
    per-image statistics and the Lab/HSV conversions lose too much precision in 16 bits.
    """
    return torch.float64 if x.dtype == torch.float64 else torch.float32
