"""Normalising large images and whole slides tile by tile, with slide-level statistics.

Two passes with bounded memory:

1. **Statistics**: the per-channel mean and std of every branch's colour space, over the
   tissue pixels of the whole slide (accumulated tile by tile in float64).
2. **Normalisation**: each tile is normalised with those statistics, so there are no seams
   between tiles. LStainNorm's attention is computed window by window (``window``, the
   training tile size), on a grid aligned to the slide: processing tiles are multiples of
   the window, so normalising tile by tile equals normalising the whole image with the same
   statistics (tested to 1e-5).

The output of a slide is a tiled, pyramidal BigTIFF (JPEG or zlib), written strip by strip; its
downsampled levels are built from a temporary memory-mapped level on disk.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ..data.io import ImageReadError, image_to_tensor, read_rgb, tensor_to_image, to_uint8_rgb
from ..files import atomic_path, temp_prefix
from ..layers.fusion import LStainNorm, norm_spaces
from ..layers.norm import PooledStats

__all__ = [
    "SlideReader",
    "is_slide",
    "slide_statistics",
    "normalize_windowed",
    "iter_normalized_tiles",
    "normalize_slide",
    "SLIDE_PIXELS",
]

# Images with more pixels than this (or multi-level slides) are processed tile by tile.
SLIDE_PIXELS = 8192 * 8192


class SlideReader:
    """Region reader over OpenSlide (SVS, NDPI, MRXS, tiled TIFF, ...) or an in-memory array."""

    def __init__(self, path: str | Path | None = None, array: np.ndarray | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._slide = None
        self._array = None
        if array is not None:
            self._array = to_uint8_rgb(array)
            self.height, self.width = self._array.shape[:2]
            self.levels = 1
            return
        if self.path is None:
            raise ValueError("SlideReader needs a path or an array")
        try:
            import openslide

            self._slide = openslide.OpenSlide(str(self.path))
            self.width, self.height = self._slide.dimensions
            self.levels = self._slide.level_count
        except Exception as err:
            try:
                self._array = read_rgb(self.path)
            except ImageReadError:
                raise ImageReadError(self.path, f"neither OpenSlide nor the image decoders can read it ({type(err).__name__})") from None
            self.height, self.width = self._array.shape[:2]
            self.levels = 1

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def read(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """RGB uint8 (h, w, 3) of a region; (x, y) in level-0 pixels, (w, h) in ``level`` pixels.
        Transparent areas become white."""
        if self._array is not None:
            return self._array[y : y + h, x : x + w]
        region = np.asarray(self._slide.read_region((x, y), level, (w, h)))
        return to_uint8_rgb(region)

    def level_for(self, downsample: float) -> tuple[int, float]:
        """The pyramid level whose downsample is closest to, but not above, ``downsample``."""
        if self._slide is None:
            return 0, 1.0
        best = 0
        for k, d in enumerate(self._slide.level_downsamples):
            if d <= downsample + 1e-6:
                best = k
        return best, float(self._slide.level_downsamples[best])

    def level_size(self, level: int) -> tuple[int, int]:
        if self._slide is None:
            return self.width, self.height
        return self._slide.level_dimensions[level]


def is_slide(path: str | Path) -> bool:
    """True for multi-level slides and for images larger than :data:`SLIDE_PIXELS`."""
    try:
        import openslide

        fmt = openslide.OpenSlide.detect_format(str(path))
        if fmt is not None:
            with openslide.OpenSlide(str(path)) as s:
                w, h = s.dimensions
                return s.level_count > 1 or w * h > SLIDE_PIXELS or fmt != "generic-tiff"
    except Exception:
        pass
    return False


def _spaces_of(norm: nn.Module) -> list:
    if getattr(norm, "stain_first", None) is not None:
        raise ValueError("slide normalisation does not support a layer with a stain stage (norm.stain_first): its stain "
                         "vectors and amounts are per image, so tiles of one slide would be normalised apart (seams); "
                         "normalise the slide's tiles with `lstainnorm normalize` instead")
    return norm_spaces(norm, "slide normalisation")


def _tiles(width: int, height: int, tile: int) -> Iterator[tuple[int, int, int, int]]:
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            yield x, y, min(tile, width - x), min(tile, height - y)


@torch.no_grad()
def slide_statistics(norm: nn.Module, reader: SlideReader, tile: int = 2048, progress: bool = False, downsample: float = 1.0) -> dict:
    """Per-space (mean, std) over the tissue pixels of the whole slide, shapes (1, 3, 1, 1).

    Std is unbiased and floored like the layer's; a slide without tissue uses all pixels.
    ``downsample`` > 1 reads a lower pyramid level when the slide has one (colour statistics
    of a 4x-downsampled level differ from full resolution by far less than between slides).
    """
    from tqdm.auto import tqdm

    pooled = PooledStats(_spaces_of(norm), tissue=True)
    level, factor = reader.level_for(downsample)
    lw, lh = reader.level_size(level)
    cells = list(_tiles(lw, lh, tile))
    for x, y, w, h in tqdm(cells, desc="slide statistics", unit="tile", disable=not progress):
        pooled.add(image_to_tensor(reader.read(int(x * factor), int(y * factor), w, h, level)).unsqueeze(0))
    stats: dict = pooled.result()
    stats["_tissue_fraction"] = pooled.tissue_fraction
    stats["_level"] = level
    return stats


def _layer_stats(norm: nn.Module, stats: dict):
    return {k: v for k, v in stats.items() if not k.startswith("_")} if isinstance(norm, LStainNorm) else stats[norm.space.name]


@torch.no_grad()
def normalize_windowed(norm: nn.Module, x: Tensor, stats: dict, window: int | None = None) -> Tensor:
    """Normalise ``x`` (1, 3, H, W) with fixed statistics, window by window on a grid from (0, 0).

    StainNorm is per pixel given the statistics, so windows do not matter for it; LStainNorm's
    attention sees one ``window`` x ``window`` block at a time. Same-size windows run as a batch.
    """
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of pixels, got {window}")
    st = _layer_stats(norm, stats)
    if window is None or not isinstance(norm, LStainNorm):
        return norm(x, stats=st)
    _, _, h, w = x.shape
    out = torch.empty_like(x)
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for y0 in range(0, h, window):
        for x0 in range(0, w, window):
            groups.setdefault((min(window, h - y0), min(window, w - x0)), []).append((y0, x0))
    for (wh, ww), coords in groups.items():
        for k in range(0, len(coords), 32):
            chunk = coords[k : k + 32]
            batch = torch.cat([x[..., y0 : y0 + wh, x0 : x0 + ww] for y0, x0 in chunk])
            res = norm(batch, stats=st)
            for n, (y0, x0) in enumerate(chunk):
                out[..., y0 : y0 + wh, x0 : x0 + ww] = res[n]
    return out


def iter_normalized_tiles(norm: nn.Module, reader: SlideReader, stats: dict, tile: int = 2048, window: int | None = None):
    """Yield ``(x, y, normalised float tile (1, 3, h, w))`` over the slide; ``tile`` must be a
    multiple of ``window`` so that windows never straddle tiles."""
    if window and tile % window:
        raise ValueError(f"tile size {tile} must be a multiple of the window {window}")
    for x, y, w, h in _tiles(reader.width, reader.height, tile):
        img = image_to_tensor(reader.read(x, y, w, h)).unsqueeze(0)
        yield x, y, normalize_windowed(norm, img, stats, window)


def _pyramid_shapes(height: int, width: int, min_side: int = 512) -> list[tuple[int, int]]:
    shapes = [(height, width)]
    while max(shapes[-1]) > min_side and min(shapes[-1]) >= 2:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _down2(a: np.ndarray) -> np.ndarray:
    """2x downsample by averaging (odd edges replicated)."""
    h, w = a.shape[:2]
    if h % 2 or w % 2:
        a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    a = a.astype(np.uint16)
    return ((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4).astype(np.uint8)


def _tiff_tiles(arr: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """The ``size`` x ``size`` TIFF tiles of ``arr``, row by row; edge tiles padded with white."""
    h, w = arr.shape[:2]
    for ty in range(0, h, size):
        for tx in range(0, w, size):
            t = np.asarray(arr[ty : ty + size, tx : tx + size])
            if t.shape[:2] != (size, size):
                t = np.pad(t, ((0, size - t.shape[0]), (0, size - t.shape[1]), (0, 0)), constant_values=255)
            yield t


def _normalized_strips(norm: nn.Module, reader: SlideReader, stats: dict, tile: int, window: int | None) -> Iterator[tuple[int, np.ndarray]]:
    """``(y, uint8 strip of height tile)`` over the slide, normalised tile by tile."""
    for sy in range(0, reader.height, tile):
        sh = min(tile, reader.height - sy)
        strip = np.empty((sh, reader.width, 3), np.uint8)
        for sx in range(0, reader.width, tile):
            sw = min(tile, reader.width - sx)
            img = image_to_tensor(reader.read(sx, sy, sw, sh)).unsqueeze(0)
            strip[:, sx : sx + sw] = tensor_to_image(normalize_windowed(norm, img, stats, window)[0])
        yield sy, strip


def _halve_into(prev: np.ndarray, shape: tuple[int, int], path: Path) -> np.memmap:
    """The next pyramid level of ``prev`` in a memory-mapped file, strip by strip (bounded memory)."""
    nxt = np.memmap(path, dtype=np.uint8, mode="w+", shape=(*shape, 3))
    for ry in range(0, prev.shape[0], 2048):
        d = _down2(np.asarray(prev[ry : ry + 2048]))
        nxt[ry // 2 : ry // 2 + d.shape[0]] = d[: nxt.shape[0] - ry // 2]
    return nxt


def normalize_slide(
    norm: nn.Module,
    src: str | Path,
    dst: str | Path,
    *,
    tile: int = 2048,
    window: int | None = None,
    tiff_tile: int = 256,
    compression: str = "jpeg",
    stats_downsample: float = 4.0,
    progress: bool = True,
) -> dict:
    """Normalise a slide into a tiled, pyramidal BigTIFF at ``dst`` (atomically).

    ``compression``: ``jpeg`` (quality 90, as scanners store slides; fast) or ``zlib``
    (lossless). Statistics come from the pyramid level nearest ``stats_downsample``.
    """
    import tifffile
    from tqdm.auto import tqdm

    if isinstance(norm, LStainNorm) and window is None:
        raise ValueError("LStainNorm on a slide needs a window (its training tile size)")
    # Processing tiles hold whole attention windows and whole TIFF tiles.
    unit = math.lcm(window, tiff_tile) if window else tiff_tile
    tile = max(unit, int(round(tile / unit)) * unit)
    if compression not in ("jpeg", "zlib"):
        raise ValueError(f"compression must be 'jpeg' or 'zlib', got {compression!r}")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    opts = {"tile": (tiff_tile, tiff_tile), "photometric": "rgb", "dtype": np.uint8, "compression": compression,
            "compressionargs": {"level": 90 if compression == "jpeg" else 6}}
    with SlideReader(src) as reader, atomic_path(dst) as tmp_tif, \
            tempfile.TemporaryDirectory(prefix=temp_prefix() + "levels-", dir=dst.parent) as scratch:
        stats = slide_statistics(norm, reader, tile, progress, downsample=stats_downsample)
        shapes = _pyramid_shapes(reader.height, reader.width)
        # Level 1 gathers in a memory-mapped file while level 0 streams into the TIFF.
        lvl1 = np.memmap(Path(scratch) / "level1.raw", dtype=np.uint8, mode="w+", shape=(*shapes[1], 3)) if len(shapes) > 1 else None
        bar = tqdm(total=math.ceil(reader.height / tile), desc=f"normalising {Path(src).name}", unit="strip", disable=not progress)

        def level0_tiles() -> Iterator[np.ndarray]:
            for sy, strip in _normalized_strips(norm, reader, stats, tile, window):
                if lvl1 is not None:
                    d = _down2(strip)
                    lvl1[sy // 2 : sy // 2 + d.shape[0]] = d[: lvl1.shape[0] - sy // 2]
                yield from _tiff_tiles(strip, tiff_tile)
                bar.update()

        with tifffile.TiffWriter(tmp_tif, bigtiff=True) as tw:
            # Levels as successive reduced-resolution pages (the layout OpenSlide and QuPath read).
            tw.write(level0_tiles(), shape=(*shapes[0], 3), description="lstainnorm normalised slide", **opts)
            bar.close()
            prev = lvl1
            for k in range(1, len(shapes)):
                prev.flush()
                tw.write(_tiff_tiles(prev, tiff_tile), shape=(*shapes[k], 3), subfiletype=1, **opts)
                if k + 1 < len(shapes):
                    prev = _halve_into(prev, shapes[k + 1], Path(scratch) / f"level{k + 1}.raw")
    return {"output": str(dst), "width": reader.width, "height": reader.height, "levels": len(shapes), "tissue_fraction": stats["_tissue_fraction"]}
