"""Re-staining real images at graded severities, morphology kept: the perturbations of
``lstainnorm stress``.

Every axis maps a float RGB image ``(3, H, W)`` in [0, 1] and a severity in [0, 1] to an image of
the same shape; severity 0 returns the input unchanged (bit for bit), 1 is the documented maximum
(:data:`AXES`), chosen to cover what real centres show and a margin beyond.

Stain axes work on the Beer-Lambert decomposition ``OD = -ln(I) = C S + R``: the stain matrix ``S``
(haematoxylin and eosin optical-density vectors) is estimated per image with Macenko's method
(torch-staintools), falling back to Ruifrok and Johnston's standard vectors when the image has too
little tissue; concentrations ``C`` by least squares. A perturbation changes ``C S`` and keeps the
residual ``R``, so everything the two stains do not explain (texture, noise, blur) stays as it was.

Scanner axes act on the RGB image: white point (a warm cast of the light source), gamma (tone
curve), saturation, and a JPEG round trip. ``combined`` draws every axis at once, each at a random
fraction of the severity and, for the hue rotations, a random direction (seeded per image).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..layers.stain import OD_MIN as _OD_MIN
from ..layers.stain import RUIFROK

__all__ = ["AXES", "Axis", "restain", "stain_matrix", "stain_matrices", "RUIFROK", "rotate_about_grey"]


@dataclass(frozen=True)
class Axis:
    """One stress axis: what severity 1 means, in words and in the axis's own unit."""

    name: str
    maximum: float
    unit: str
    description: str


AXES: dict[str, Axis] = {a.name: a for a in (
    Axis("hematoxylin-hue", 25.0, "degrees", "haematoxylin OD vector rotated about the grey axis (hue of the nuclear stain)"),
    Axis("eosin-hue", 25.0, "degrees", "eosin OD vector rotated about the grey axis (hue of the counterstain)"),
    Axis("stain-amount", 1.0, "fraction", "both stain concentrations x (1 + severity): up to twice the stain"),
    Axis("he-ratio", 1.0, "log2 ratio", "haematoxylin x 2^s, eosin x 2^-s: up to 4x the H/E ratio"),
    Axis("white-point", 0.25, "fraction", "blue and green of the light source dimmed by up to 12.5 % and 25 % (a warm cast)"),
    Axis("gamma", 0.8, "exponent offset", "tone curve I^(1 + 0.8 s): darker mid-tones, more contrast"),
    Axis("saturation", 1.0, "fraction", "chroma x (1 + s): up to twice as saturated"),
    Axis("jpeg", 85.0, "quality points", "JPEG round trip at quality 95 - 85 s (10 at severity 1)"),
    Axis("combined", 1.0, "fraction", "all of the above at once, each at a random fraction of the severity"),
)}


def rotate_about_grey(v: Tensor, degrees: float) -> Tensor:
    """Rotate OD vectors ``(..., 3)`` about the grey axis (1, 1, 1)/sqrt(3) (Rodrigues' formula):
    the hue of the stain changes, its optical density along the grey axis does not."""
    k = torch.full((3,), 1.0 / math.sqrt(3.0), dtype=v.dtype)
    t = math.radians(degrees)
    kxv = torch.linalg.cross(k.expand_as(v), v, dim=-1)
    kdv = (v * k).sum(-1, keepdim=True)
    return v * math.cos(t) + kxv * math.sin(t) + k * kdv * (1.0 - math.cos(t))


def stain_matrices(x: Tensor) -> Tensor:
    """The ``(B, 2, 3)`` H and E optical-density vectors of a batch ``(B, 3, H, W)`` (unit rows,
    float64): Macenko's estimate (torch-staintools, vectorised over the batch), or Ruifrok's
    standard vectors for an image where that fails (too little tissue, a degenerate estimate)."""
    import logging

    from torch_staintools.functional.conversion.od import rgb2od
    from torch_staintools.functional.tissue_mask import get_tissue_mask
    from torch_staintools.normalizer import NormalizerBuilder

    logging.getLogger("torch_staintools").setLevel(logging.ERROR)
    b = x.shape[0]
    out = RUIFROK.expand(b, 2, 3).clone()
    xf = x.float()
    mask = get_tissue_mask(xf, 0.8, None, throw_error=False)
    enough = mask.flatten(1).sum(1) >= 16
    if enough.any():
        idx = enough.nonzero().flatten()
        try:
            extract = NormalizerBuilder.build("macenko", concentration_solver="qr", luminosity_threshold=0.8).get_stain_matrix
            est = extract(rgb2od(xf[idx]), mask[idx]).to(torch.float64)
            good = torch.isfinite(est).flatten(1).all(1) & (est.norm(dim=2) > 0).all(1)
            out[idx[good]] = est[good]
        except Exception:  # noqa: BLE001 - torch-staintools raises several kinds on degenerate images
            pass
    return out / out.norm(dim=2, keepdim=True)


def stain_matrix(x: Tensor) -> Tensor:
    """The (2, 3) H and E optical-density vectors of one image ``(3, H, W)``: :func:`stain_matrices`."""
    return stain_matrices(x.unsqueeze(0))[0]


def _stains(x: Tensor, stains: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(od, conc, S)``: OD image (3, N), concentrations (2, N) by least squares, stain matrix (2, 3)."""
    # float32: OD arithmetic on whole images (float64 exp/log are ~10x slower on a CPU)
    od = -torch.log(x.to(torch.float32).clamp(min=_OD_MIN)).reshape(3, -1)
    if stains is None:
        s = stain_matrix(x)
    else:
        s = torch.as_tensor(stains, dtype=torch.float64)
        if s.shape != (2, 3) or not torch.isfinite(s).all():
            raise ValueError(f"stains must be a finite (2, 3) matrix of H and E optical-density vectors, got {tuple(s.shape)}")
        s = s / s.norm(dim=1, keepdim=True)
    conc = torch.linalg.pinv(s.T).float() @ od  # least squares, (2, N); pinv of a 3 x 2 matrix is cheap
    s = s.float()
    return od, conc, s


def _recompose(x: Tensor, od: Tensor, conc: Tensor, s: Tensor, conc_new: Tensor, s_new: Tensor) -> Tensor:
    od_new = od + s_new.T @ conc_new - s.T @ conc  # the residual outside the stains is kept
    return torch.exp(-od_new.clamp(min=0.0)).reshape(x.shape).clamp(0.0, 1.0).to(x.dtype)


def _stain_axis(x: Tensor, hue_h: float = 0.0, hue_e: float = 0.0, amount: float = 0.0, ratio: float = 0.0,
                stains: Tensor | None = None) -> Tensor:
    od, conc, s = _stains(x, stains)
    s_new = torch.stack([rotate_about_grey(s[0].double(), hue_h), rotate_about_grey(s[1].double(), hue_e)]).float()
    scale = torch.tensor([(1.0 + amount) * 2.0**ratio, (1.0 + amount) * 2.0**-ratio], dtype=conc.dtype).view(2, 1)
    return _recompose(x, od, conc, s, conc * scale.clamp(min=0.0), s_new)


def _white_point(x: Tensor, s: float) -> Tensor:
    w = torch.tensor([1.0, 1.0 - 0.5 * AXES["white-point"].maximum * s, 1.0 - AXES["white-point"].maximum * s], dtype=x.dtype)
    return (x * w.view(3, 1, 1)).clamp(0.0, 1.0)


def _gamma(x: Tensor, s: float) -> Tensor:
    return x.clamp(min=0.0) ** (1.0 + AXES["gamma"].maximum * s)


def _saturation(x: Tensor, s: float) -> Tensor:
    grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
    return (grey + (1.0 + AXES["saturation"].maximum * s) * (x - grey)).clamp(0.0, 1.0)


def _jpeg(x: Tensor, s: float) -> Tensor:
    from PIL import Image

    quality = int(round(95 - AXES["jpeg"].maximum * s))
    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=max(1, quality))
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(out).permute(2, 0, 1).to(x.dtype)


def _combined(x: Tensor, s: float, seed: int, stains: Tensor | None) -> Tensor:
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(8, generator=g, dtype=torch.float64).tolist()
    sign = [1.0 if v > 0.5 else -1.0 for v in torch.rand(2, generator=g).tolist()]
    hue = AXES["hematoxylin-hue"].maximum
    y = _stain_axis(x, hue_h=sign[0] * hue * s * u[0], hue_e=sign[1] * hue * s * u[1],
                    amount=AXES["stain-amount"].maximum * s * u[2], ratio=AXES["he-ratio"].maximum * s * (2 * u[3] - 1),
                    stains=stains)
    y = _white_point(y, s * u[4])
    y = _gamma(y, s * u[5])
    y = _saturation(y, s * u[6])
    return _jpeg(y, s * u[7])


def restain(x: Tensor, axis: str, severity: float, seed: int = 0, stains: Tensor | None = None) -> Tensor:
    """Perturb one RGB image ``(3, H, W)`` in [0, 1] along ``axis`` at ``severity`` in [0, 1].

    Args:
        x: float RGB image, shape ``(3, H, W)``, values in [0, 1].
        axis: one of :data:`AXES`.
        severity: 0 (the image as it is, returned unchanged) to 1 (the axis's maximum).
        seed: the random draw of ``combined`` (use the image's index for a fixed draw per image).
        stains: the (2, 3) H and E optical-density vectors to use (e.g. estimated once per slide);
            default: estimated on this image (:func:`stain_matrix`).

    Returns:
        The perturbed image, same shape and dtype.
    """
    if axis not in AXES:
        raise ValueError(f"unknown stress axis {axis!r}; choose one of {list(AXES)}")
    if not 0.0 <= float(severity) <= 1.0:
        raise ValueError(f"severity must be in [0, 1], got {severity}")
    if x.ndim != 3 or x.shape[0] != 3 or not x.is_floating_point():
        raise ValueError(f"expected a float RGB image of shape (3, H, W), got {tuple(x.shape)} {x.dtype}")
    s = float(severity)
    if s == 0.0:
        return x
    if axis == "hematoxylin-hue":
        return _stain_axis(x, hue_h=AXES[axis].maximum * s, stains=stains)
    if axis == "eosin-hue":
        return _stain_axis(x, hue_e=AXES[axis].maximum * s, stains=stains)
    if axis == "stain-amount":
        return _stain_axis(x, amount=AXES[axis].maximum * s, stains=stains)
    if axis == "he-ratio":
        return _stain_axis(x, ratio=AXES[axis].maximum * s, stains=stains)
    if axis == "white-point":
        return _white_point(x, s)
    if axis == "gamma":
        return _gamma(x, s)
    if axis == "saturation":
        return _saturation(x, s)
    if axis == "jpeg":
        return _jpeg(x, s)
    return _combined(x, s, seed, stains)
