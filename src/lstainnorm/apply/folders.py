"""``lstainnorm normalize``: a trained layer (or a template) applied to images, folders and slides.

- A single image, a folder tree (layout and file names preserved) or whole slides.
- Resumable: outputs that exist are finished (every write is atomic) and are skipped.
- An input is never overwritten; OUTPUT may not be, or lie inside, INPUT.
- Unreadable inputs are reported, skipped and counted.
- ``shard=(k, n)`` processes every n-th file starting at the k-th, so n processes (or GPUs)
  together cover every file exactly once.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..data.io import IMAGE_EXTENSIONS, ImageReadError, find_images, image_to_tensor, read_rgb, tensor_to_image, write_image
from ..layers.norm import StainNorm
from ..layers.template import Template
from ..runs import load_norm
from .slides import is_slide, normalize_slide, normalize_windowed

__all__ = ["SLIDE_EXTENSIONS", "list_inputs", "shard_files", "norm_from_run", "norm_from_template", "normalize_path"]

SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif", ".tif", ".tiff")


def list_inputs(inp: str | Path) -> list[Path]:
    """Images and slides under ``inp`` (recursively, sorted), or ``[inp]`` for a file."""
    inp = Path(inp)
    if inp.is_file():
        return [inp]
    if not inp.is_dir():
        raise FileNotFoundError(f"input not found: {inp}")
    return find_images(inp, IMAGE_EXTENSIONS + SLIDE_EXTENSIONS)


def shard_files(files: Sequence[Path], shard: tuple[int, int]) -> list[Path]:
    """The files of shard ``k`` of ``n`` (1-based): every n-th file starting at the k-th."""
    k, n = shard
    if n < 1 or not 1 <= k <= n:
        raise ValueError(f"--shard must be K/N with 1 <= K <= N, got {k}/{n}")
    return list(files[k - 1 :: n])


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return (1, 1)
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like K/N (e.g. 2/4), got {text!r}") from None
    shard_files([], (k, n))
    return k, n


def norm_from_run(run: str | Path) -> tuple[nn.Module, int | None]:
    """The trained normalisation layer of a run, and its window (the training tile size)."""
    trained = load_norm(run)
    return trained.norm, trained.window


def norm_from_template(template: str | Path, space: str = "lab") -> nn.Module:
    """Reinhard normalisation (a frozen StainNorm) to a template YAML's ``space`` statistics."""
    t = Template.load(template)
    if space not in t:
        raise ValueError(f"template {template} has no '{space}' statistics (it has {t.spaces}); pick one with --space")
    return StainNorm(space, *t[space], learnable=False).eval()


def _output_path(src: Path, base: Path, out: Path, single: bool, slide: bool) -> Path:
    rel = Path(src.name) if single else src.relative_to(base)
    if slide or rel.suffix.lower() not in IMAGE_EXTENSIONS:
        rel = rel.with_suffix(".tif")
    return out / rel


@torch.no_grad()
def normalize_path(
    norm: nn.Module,
    inp: str | Path,
    out: str | Path,
    *,
    window: int | None = None,
    slide_window: int | None = None,
    shard: tuple[int, int] = (1, 1),
    tile: int = 2048,
    progress: bool = True,
) -> dict:
    """Normalise an image, a folder tree or slides into ``out``; returns a summary.

    Regular images are normalised whole with their own statistics (``window`` splits larger
    ones window by window); slides go through :func:`normalize_slide` with slide statistics and
    ``slide_window``.
    """
    from tqdm.auto import tqdm

    inp, out = Path(inp), Path(out)
    r_in, r_out = inp.resolve(), out.resolve()
    if r_out == r_in or (inp.is_dir() and r_in in r_out.parents):
        raise ValueError(f"OUTPUT {out} must not be INPUT or lie inside it: inputs are never overwritten")
    files = shard_files(list_inputs(inp), shard)
    single = inp.is_file()
    base = inp.parent if single else inp
    done, written, skipped, slides = 0, [], [], []
    bar = tqdm(files, desc="normalising", unit="file", disable=not progress)
    for src in bar:
        slide = src.suffix.lower() in SLIDE_EXTENSIONS and is_slide(src)
        dst = _output_path(src, base, out, single, slide)
        if dst.resolve() == src.resolve():
            raise ValueError(f"refusing to overwrite the input {src}")
        if dst.is_file() and dst.stat().st_size > 0:
            done += 1
            continue
        try:
            if slide:
                normalize_slide(norm, src, dst, tile=tile, window=slide_window, progress=False)
                slides.append(str(src))
            else:
                x = image_to_tensor(read_rgb(src)).unsqueeze(0)
                if window is not None and max(x.shape[-2:]) > window and hasattr(norm, "image_stats"):
                    st = norm.image_stats(x)
                    stats = st if isinstance(st, dict) else {norm.space.name: st}
                    y = normalize_windowed(norm, x, stats, window)
                else:
                    y = norm(x)
                write_image(dst, tensor_to_image(y[0]))
            written.append(str(src))
        except ImageReadError as err:
            skipped.append(str(src))
            warnings.warn(f"skipping unreadable input: {err}", stacklevel=2)
    return {"written": written, "already_done": done, "skipped": skipped, "slides": slides, "files": len(files), "output": str(out)}
