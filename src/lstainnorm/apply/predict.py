"""``lstainnorm predict``: nuclei masks, instance labels and overlays for a folder of images.

Takes any segmenter as a function from an RGB batch to logits (a trained run's model with its
sliding window: :func:`lstainnorm.cli.predict` wires it up), so this module needs
nothing from training.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.io import ImageReadError, find_images, image_to_tensor, read_rgb, write_image
from ..files import confined, sweep_stale_temps, unique_names
from ..data.instances import postprocess

__all__ = ["overlay", "predict_folder"]


def overlay(image: np.ndarray, labels: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """The image with instance contours drawn in ``colour``."""
    from skimage.segmentation import find_boundaries

    out = image.copy()
    out[find_boundaries(labels, mode="inner")] = colour
    return out


@torch.no_grad()
def predict_folder(
    segment: Callable[[Tensor], Tensor],
    inp: str | Path,
    output: str | Path,
    *,
    scale: float = 1.0,
    threshold: float = 0.5,
    watershed: bool = True,
    min_size: int = 10,
    progress: bool = True,
) -> dict:
    """Segment every image of ``inp`` (a file or a folder) and write, per image,
    ``<name>_mask.png`` (0/255), ``<name>_instances.png`` (16-bit labels) and ``<name>_overlay.png``.

    ``segment`` maps ``(1, 3, H, W)`` RGB in [0, 1] to logits ``(1, 1, H, W)``; images are
    resized by ``scale`` first (the training scale) and masks returned at the input's size.
    Finished outputs are kept (resumable); unreadable inputs are reported and skipped. Every
    input has its own outputs (``a.png`` and ``a.jpg`` become ``a-png_*`` and ``a-jpg_*``), inside
    ``output``; an ``output`` inside ``inp`` is not read as input.
    """
    from tqdm.auto import tqdm

    inp, output = Path(inp), Path(output)
    if output.resolve() == inp.resolve():
        raise ValueError("OUTPUT must differ from INPUT (inputs are never overwritten)")
    # An OUTPUT inside INPUT is skipped while listing: a rerun never reads its own masks.
    files = find_images(inp, exclude=[output])
    base = inp if inp.is_dir() else inp.parent
    names = unique_names({f: f.relative_to(base).with_suffix("") for f in files})
    sweep_stale_temps(output)  # half-written files of an earlier run that was killed
    done, skipped, written = 0, [], []
    for f in tqdm(files, desc="segmenting", unit="image", disable=not progress):
        rel = names[f]
        outs = [confined(output, f"{rel}_{k}.png") for k in ("mask", "instances", "overlay")]
        if all(p.is_file() for p in outs):
            done += 1
            continue
        try:
            img = read_rgb(f)
        except ImageReadError as err:
            skipped.append(str(f))
            warnings.warn(f"skipping unreadable image: {err}", stacklevel=2)
            continue
        x = image_to_tensor(img).unsqueeze(0)
        if scale != 1.0:  # predict at the training scale, return masks at the input's size
            x = F.interpolate(x, scale_factor=scale, mode="area" if scale < 1 else "bilinear")
        logits = segment(x)
        if scale != 1.0:
            logits = F.interpolate(logits, size=img.shape[:2], mode="bilinear", align_corners=False)
        prob = torch.sigmoid(logits)[0, 0].numpy()
        inst = postprocess(prob, threshold, watershed, min_size)
        write_image(outs[0], ((prob > threshold) * 255).astype(np.uint8))
        write_image(outs[1], inst.astype(np.uint16))
        write_image(outs[2], overlay(img, inst))
        written.append(str(f))
    return {"written": written, "already_done": done, "skipped": skipped}
