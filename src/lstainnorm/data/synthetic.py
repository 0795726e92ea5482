"""A synthetic multi-centre H&E tile benchmark.

Tissue classes differ by **morphology and texture** (nuclear density, size, shape and
arrangement; fibres; vacuoles), not by colour. Each tile is rendered through the
Beer-Lambert law: per-pixel haematoxylin and eosin concentrations times stain
optical-density vectors, then RGB. Each *centre* (hospital) has its own stain vectors,
stain strengths, background brightness and tint, saturation, blur, sensor noise and JPEG
quality, so the same tissue looks different at each centre, as in real multi-centre data.

Morphology depends only on the class and the tile's seed; colour only on the centre.
Everything is deterministic given ``seed``.

    >>> gen = SyntheticHE(size=96, seed=0)
    >>> rgb, nuclei = gen.render(cls=0, centre=1, index=7)   # uint8 (96, 96, 3), bool (96, 96)
"""

from __future__ import annotations

import io
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage
from torch.utils.data import Dataset

from ..files import atomic_write_bytes
from .io import image_to_tensor, write_image

__all__ = ["Centre", "DEFAULT_CENTRES", "MONUSEG_CENTRES", "CENTRE_PRESETS", "CLASSES", "SyntheticHE", "SyntheticTiles", "write_synthetic", "split_counts", "SPLITS", "write_synthetic_segmentation"]

# Ruifrok-Johnston stain optical-density vectors (rows of scikit-image's rgb_from_hed).
_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11])


def _unit(v: Sequence[float]) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class Centre:
    """How one hospital's lab and scanner render tissue.

    Attributes:
        name: short name (folder name when written to disk).
        stain_h, stain_e: haematoxylin and eosin optical-density vectors (R, G, B), normalised.
        scale_h, scale_e: stain strength (multiplies the concentrations).
        background: RGB of glass (light source and tint), 0-1.
        saturation: chroma multiplier after rendering (1 = unchanged).
        blur: Gaussian blur sigma in pixels (focus, optics).
        noise: sensor noise standard deviation (0-1 scale).
        jpeg_quality: JPEG round trip quality (100 = none).
        gamma: scanner tone curve exponent.
    """

    name: str
    stain_h: tuple[float, float, float]
    stain_e: tuple[float, float, float]
    scale_h: float = 1.0
    scale_e: float = 1.0
    background: tuple[float, float, float] = (0.94, 0.94, 0.95)
    saturation: float = 1.0
    blur: float = 0.5
    noise: float = 0.01
    jpeg_quality: int = 95
    gamma: float = 1.0
    description: str = ""


# Stain vectors: centre A uses the H&E optical-density vectors typical of Macenko estimates on
# real slides; the others rotate them (bluer/redder haematoxylin, pinker/oranger eosin).
DEFAULT_CENTRES: tuple[Centre, ...] = (
    Centre(
        "A",
        tuple(_unit([0.5626, 0.7201, 0.4062])),
        tuple(_unit([0.2159, 0.8012, 0.5581])),
        scale_h=1.0,
        scale_e=0.75,
        background=(0.95, 0.94, 0.95),
        saturation=1.0,
        blur=0.5,
        noise=0.010,
        jpeg_quality=95,
        description="standard H&E: purple nuclei, pink eosin",
    ),
    Centre(
        "B",
        tuple(_unit([0.45, 0.80, 0.40])),
        tuple(_unit([0.10, 0.90, 0.42])),
        scale_h=1.35,
        scale_e=1.05,
        background=(0.93, 0.91, 0.95),
        saturation=1.2,
        blur=0.8,
        noise=0.015,
        jpeg_quality=85,
        description="strong staining: blue-violet nuclei, magenta eosin",
    ),
    Centre(
        "C",
        tuple(_unit([0.66, 0.66, 0.36])),
        tuple(_unit([0.30, 0.74, 0.60])),
        scale_h=0.60,
        scale_e=0.50,
        background=(0.97, 0.96, 0.90),
        saturation=0.75,
        blur=0.4,
        noise=0.012,
        jpeg_quality=92,
        gamma=0.9,
        description="faded, yellowish: pale lilac nuclei, weak pink",
    ),
    Centre(
        "D",
        tuple(_unit([0.52, 0.64, 0.56])),
        tuple(_unit([0.08, 0.72, 0.69])),
        scale_h=1.15,
        scale_e=1.0,
        background=(0.86, 0.88, 0.91),
        saturation=1.10,
        blur=1.0,
        noise=0.022,
        jpeg_quality=70,
        gamma=1.15,
        description="dark, cool scanner: navy nuclei, red-orange eosin, blur, JPEG",
    ),
)

# Centres measured on real hospitals (``python benchmarks/calibrate_centres.py``): the Macenko stain
# vectors and the 99th-percentile H and E concentrations of MoNuSeg's tiles, median per hospital
# (TCGA tissue-source site). Real hospitals differ far more in the H/E ratio (1.3 to 3.0 here) than
# the hand-made centres above (1.15 to 1.35), which a per-image colour standardisation cannot undo.
# Stain amounts map to the generator's units as centre A above: H99 2.45 -> scale_h 1.0, E99 1.11 ->
# scale_e 0.75 (the medians over all 30 tiles). Scanner settings are the hand-made centres'.
def _measured(name: str, site: str, h: Sequence[float], e: Sequence[float], h99: float, e99: float, like: Centre) -> Centre:
    return Centre(
        name, tuple(_unit(h)), tuple(_unit(e)), scale_h=round(h99 / 2.45, 3), scale_e=round(0.75 * e99 / 1.11, 3),
        background=like.background, saturation=1.0, blur=like.blur, noise=like.noise, jpeg_quality=like.jpeg_quality,
        gamma=like.gamma, description=f"MoNuSeg hospital {site}: H/E ratio {h99 / e99:.2f}",
    )


MONUSEG_CENTRES: tuple[Centre, ...] = (
    _measured("A", "G9", [0.498, 0.762, 0.416], [0.133, 0.828, 0.550], 1.76, 0.86, DEFAULT_CENTRES[0]),
    _measured("B", "A7", [0.636, 0.686, 0.354], [0.320, 0.802, 0.504], 2.53, 0.83, DEFAULT_CENTRES[1]),
    _measured("C", "DK", [0.584, 0.72, 0.375], [0.371, 0.802, 0.469], 2.28, 1.81, DEFAULT_CENTRES[2]),
    _measured("D", "49", [0.505, 0.779, 0.372], [0.174, 0.895, 0.410], 3.73, 1.78, DEFAULT_CENTRES[3]),
)
# ``lstainnorm synth --preset``: the hand-made centres (the demo's) or the ones measured on MoNuSeg.
CENTRE_PRESETS: dict[str, tuple[Centre, ...]] = {"default": DEFAULT_CENTRES, "monuseg": MONUSEG_CENTRES}

CLASSES: tuple[tuple[str, str], ...] = (
    ("tumour", "tumour epithelium: crowded large pleomorphic nuclei, glands"),
    ("stroma", "stroma: wavy eosinophilic fibres, sparse spindle nuclei"),
    ("lymphocytes", "lymphocytes: dense small round dark nuclei"),
    ("adipose", "adipose: large empty vacuoles with thin membranes"),
    ("mucus", "mucus: pale wispy matrix, few floating cells"),
    ("debris", "debris/necrosis: nuclear dust, granular eosinophilic background"),
)


# --- drawing primitives (float32 maps in [0, ~1]) --------------------------------------------------
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return n / (n.std() + 1e-6)


def _stamp_nuclei(
    shape: tuple[int, int],
    centres: np.ndarray,
    radii: np.ndarray,
    aspect: np.ndarray,
    angle: np.ndarray,
) -> np.ndarray:
    """Soft elliptical nuclei: an 'inside' value in [0, 1] per pixel (max over nuclei).

    All nuclei are evaluated at once on a patch around their centres, then scattered.
    """
    h, w = shape
    out = np.zeros(h * w, dtype=np.float32)
    n = len(centres)
    if n == 0:
        return out.reshape(shape)
    rmax = int(np.ceil(radii.max() * max(1.0, aspect.max()))) + 2
    off = np.arange(-rmax, rmax + 1, dtype=np.float32)
    iy = np.rint(centres[:, 0]).astype(np.int64)
    ix = np.rint(centres[:, 1]).astype(np.int64)
    dy = (off[None, :, None] + (iy - centres[:, 0]).astype(np.float32)[:, None, None])
    dx = (off[None, None, :] + (ix - centres[:, 1]).astype(np.float32)[:, None, None])
    c = np.cos(angle).astype(np.float32)[:, None, None]
    s = np.sin(angle).astype(np.float32)[:, None, None]
    r = radii.astype(np.float32)[:, None, None]
    a = aspect.astype(np.float32)[:, None, None]
    u = (dx * c + dy * s) / (r * a)
    v = (dy * c - dx * s) / (r / a)
    val = np.clip((1.0 - np.sqrt(u * u + v * v)) * r * 0.8, 0.0, 1.0)  # ~1 px soft edge
    yy = iy[:, None, None] + off.astype(np.int64)[None, :, None]
    xx = ix[:, None, None] + off.astype(np.int64)[None, None, :]
    yy, xx = np.broadcast_to(yy, val.shape), np.broadcast_to(xx, val.shape)
    ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w) & (val > 0)
    np.maximum.at(out, (yy[ok] * w + xx[ok]), val[ok])
    return out.reshape(shape)


def _poisson_points(rng: np.random.Generator, shape: tuple[int, int], n: int, min_dist: float) -> np.ndarray:
    """About ``n`` points, roughly ``min_dist`` apart: a jittered grid, thinned at random.

    The grid spacing is the larger of ``min_dist`` and the spacing that gives ``n`` points.
    """
    h, w = shape
    if n <= 0:
        return np.zeros((0, 2))
    spacing = max(min_dist, np.sqrt(h * w / n))
    gy = np.arange(spacing / 2, h, spacing)
    gx = np.arange(spacing / 2, w, spacing)
    pts = np.stack(np.meshgrid(gy, gx, indexing="ij"), -1).reshape(-1, 2)
    pts = pts + rng.uniform(-0.42, 0.42, pts.shape) * spacing + rng.uniform(0, spacing, 2)
    pts[:, 0] %= h
    pts[:, 1] %= w
    keep = min(n, int(round(len(pts) * 0.9)))  # thin a little so the grid does not show
    return pts[rng.permutation(len(pts))[:keep]]


# --- tissue classes: each returns (H, E, nuclei mask), concentrations ~0-1.5 -------------------------
def _nuclei_layer(rng, shape, pts, r_mean, r_sd, aspect=(1.0, 1.2), angle=None, dark=(0.9, 1.3)):
    n = len(pts)
    radii = np.clip(rng.normal(r_mean, r_sd, n), r_mean * 0.5, r_mean * 1.8)
    asp = rng.uniform(*aspect, n)
    ang = rng.uniform(0, np.pi, n) if angle is None else angle + rng.normal(0, 0.15, n)
    inside = _stamp_nuclei(shape, pts, radii, asp, ang)
    chromatin = 1.0 + 0.25 * _smooth_noise(rng, shape, 0.8)
    h = inside * np.clip(chromatin, 0.4, 1.6) * rng.uniform(*dark)
    return h, inside > 0.5


def _tumour(rng, shape):
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    lumen = np.zeros(shape, np.float32)
    ring_pts = []
    for _ in range(rng.integers(1, 3)):
        cy, cx = rng.uniform(0.15, 0.85, 2) * [h, w]
        ry, rx = rng.uniform(7, 14, 2)
        d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        lumen = np.maximum(lumen, np.clip((1.0 - d) * 4, 0, 1))
        k = int(2 * np.pi * (ry + rx) / 2 / 6)
        t = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 1)
        ring_pts.append(np.stack([cy + (ry + 5) * np.sin(t), cx + (rx + 5) * np.cos(t)], 1))
    dens = int(h * w / 120)
    sheet = _poisson_points(rng, shape, dens, 9.0)
    # no sheet nuclei inside the lumens or on the gland rings
    if ring_pts:
        ring = np.concatenate(ring_pts)
        far = np.min(np.linalg.norm(sheet[:, None] - ring[None], axis=-1), axis=1) > 6.0
        sheet = sheet[far & (lumen[sheet[:, 0].astype(int) % h, sheet[:, 1].astype(int) % w] < 0.2)]
    pts = np.concatenate([*ring_pts, sheet]) if ring_pts else sheet
    hh, nuc = _nuclei_layer(rng, shape, pts, 4.3, 1.1, aspect=(1.0, 1.7), dark=(0.8, 1.2))
    e = (0.45 + 0.12 * _smooth_noise(rng, shape, 3)) * (1 - lumen)
    hh = hh * (1 - lumen)
    return hh + 0.06 * (1 - lumen), e, nuc & (lumen < 0.5)


def _stroma(rng, shape):
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = 6.0 * _smooth_noise(rng, shape, 12) + 1.5 * _smooth_noise(rng, shape, 3)
    period = rng.uniform(5, 8)
    phase = 2 * np.pi * (yy + warp) / period + 0.8 * _smooth_noise(rng, shape, 6)
    amp = np.clip(0.7 + 0.35 * _smooth_noise(rng, shape, 8), 0.1, 1.2)  # fibres fade in and out
    fib = (0.5 + 0.5 * np.sin(phase)) ** 1.5 * amp
    e = 0.35 + 0.55 * fib + 0.08 * _smooth_noise(rng, shape, 1.5)
    pts = _poisson_points(rng, shape, int(h * w / 700), 12.0)
    hh, nuc = _nuclei_layer(rng, shape, pts, 2.6, 0.4, aspect=(2.2, 3.2), angle=0.0, dark=(0.8, 1.1))
    gaps = np.clip(_smooth_noise(rng, shape, 4) - 1.2, 0, 1)  # loose areas
    e = e * (1 - 0.7 * gaps)
    hh, e, nuc = _rot(rng, hh, e, nuc)
    return hh + 0.03, e, nuc


def _rot(rng, *arrays):
    k, flip = int(rng.integers(0, 4)), bool(rng.integers(0, 2))
    out = []
    for a in arrays:
        a = np.rot90(a, k)
        out.append(np.ascontiguousarray(a[:, ::-1] if flip else a))
    return out


def _lymphocytes(rng, shape):
    h, w = shape
    pts = _poisson_points(rng, shape, int(h * w / 38), 5.2)
    hh, nuc = _nuclei_layer(rng, shape, pts, 2.9, 0.3, aspect=(1.0, 1.15), dark=(1.2, 1.5))
    e = 0.22 + 0.06 * _smooth_noise(rng, shape, 2)
    return hh + 0.05, e, nuc


def _adipose(rng, shape):
    h, w = shape
    seeds = rng.uniform(-0.2, 1.2, size=(int(rng.integers(5, 9)), 2)) * [h, w]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.sqrt((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2)
    d.sort(axis=-1)
    edge = d[..., 1] - d[..., 0]
    membrane = np.clip(1.0 - edge / 1.6, 0, 1)
    e = 0.55 * membrane + 0.02
    pts = _poisson_points(rng, shape, 3, 20.0)
    hh, nuc = _nuclei_layer(rng, shape, pts, 2.2, 0.3, aspect=(1.5, 2.5), dark=(0.6, 0.9))
    hh = hh * (membrane > 0.2)
    return hh + 0.01, e, nuc & (membrane > 0.2)


def _mucus(rng, shape):
    n1 = _smooth_noise(rng, shape, 5)
    n2 = _smooth_noise(rng, shape, 1.2)
    wisps = np.clip(1.0 - np.abs(n1) * 1.6, 0, 1) ** 2
    hh = 0.12 + 0.14 * wisps + 0.03 * n2
    e = 0.06 + 0.08 * wisps + 0.02 * n2
    pts = _poisson_points(rng, shape, int(rng.integers(0, 4)), 15.0)
    nh, nuc = _nuclei_layer(rng, shape, pts, 3.5, 0.5, dark=(0.5, 0.8))
    return np.clip(hh, 0, None) + nh, np.clip(e, 0, None), nuc


def _debris(rng, shape):
    h, w = shape
    grain = _smooth_noise(rng, shape, 0.7)
    e = 0.60 + 0.18 * grain + 0.15 * _smooth_noise(rng, shape, 6)
    frag = _poisson_points(rng, shape, int(h * w / 30), 2.5)
    hh, nuc = _nuclei_layer(rng, shape, frag, 1.1, 0.35, aspect=(1.0, 2.0), dark=(0.9, 1.5))
    ghosts = _poisson_points(rng, shape, int(h * w / 400), 10.0)
    gh, _ = _nuclei_layer(rng, shape, ghosts, 4.0, 0.6, dark=(0.15, 0.3))
    holes = np.clip(_smooth_noise(rng, shape, 5) - 1.0, 0, 1)
    return (hh + gh + 0.08) * (1 - holes), np.clip(e, 0, None) * (1 - holes), nuc


_RENDERERS = {
    "tumour": _tumour,
    "stroma": _stroma,
    "lymphocytes": _lymphocytes,
    "adipose": _adipose,
    "mucus": _mucus,
    "debris": _debris,
}


def _seed(*parts: object) -> np.random.SeedSequence:
    return np.random.SeedSequence([zlib.crc32(str(p).encode()) for p in parts])


@dataclass
class SyntheticHE:
    """Generator of synthetic multi-centre H&E tiles.

    Args:
        n_classes: number of tissue classes (at most 6), taken in order from :data:`CLASSES`.
        n_centres: number of centres (at most the number of ``centres``).
        size: tile side in pixels.
        seed: global seed; the same seed gives the same bytes.
        centres: centre definitions (default :data:`DEFAULT_CENTRES`).
    """

    n_classes: int = 6
    n_centres: int = 4
    size: int = 96
    seed: int = 0
    centres: Sequence[Centre] = field(default_factory=lambda: DEFAULT_CENTRES)

    def __post_init__(self) -> None:
        if not 2 <= self.n_classes <= len(CLASSES):
            raise ValueError(f"n_classes must be between 2 and {len(CLASSES)}, got {self.n_classes}")
        if not 1 <= self.n_centres <= len(self.centres):
            raise ValueError(f"n_centres must be between 1 and {len(self.centres)}, got {self.n_centres}")
        if self.size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {self.size}")
        self.centres = tuple(self.centres[: self.n_centres])

    @property
    def classes(self) -> list[str]:
        return [c for c, _ in CLASSES[: self.n_classes]]

    @property
    def centre_names(self) -> list[str]:
        return [c.name for c in self.centres]

    def morphology(self, cls: int, index: int, stream: object = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Haematoxylin and eosin concentration maps and the nuclei mask of one tile (colour-free)."""
        name = self.classes[cls]
        rng = np.random.default_rng(_seed(self.seed, "morph", name, index, stream))
        h, e, nuc = _RENDERERS[name](rng, (self.size, self.size))
        return h.astype(np.float32), e.astype(np.float32), nuc

    def colourise(self, h: np.ndarray, e: np.ndarray, centre: int, key: object = 0) -> np.ndarray:
        """Render concentration maps as RGB uint8 with a centre's stains, optics and scanner."""
        c = self.centres[centre]
        rng = np.random.default_rng(_seed(self.seed, "colour", c.name, key))
        # Per-slide batch variation around the centre's mean protocol.
        sh = c.scale_h * rng.uniform(0.92, 1.08)
        se = c.scale_e * rng.uniform(0.92, 1.08)
        od = (
            h[..., None] * (np.asarray(c.stain_h) * sh)[None, None]
            + e[..., None] * (np.asarray(c.stain_e) * se)[None, None]
        )
        rgb = np.asarray(c.background, np.float32)[None, None] * np.power(10.0, -od, dtype=np.float32)
        if c.blur > 0:
            rgb = ndimage.gaussian_filter(rgb, (c.blur, c.blur, 0))
        grey = rgb.mean(axis=-1, keepdims=True)
        rgb = grey + c.saturation * (rgb - grey)
        rgb = np.clip(rgb, 0.0, 1.0) ** c.gamma
        rgb = rgb + rng.normal(0.0, c.noise, rgb.shape).astype(np.float32)
        out = (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        if c.jpeg_quality < 100:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(out).save(buf, format="JPEG", quality=int(c.jpeg_quality))
            buf.seek(0)
            out = np.array(Image.open(buf).convert("RGB"))
        return out

    def render(self, cls: int, centre: int, index: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """One tile: ``(rgb uint8 (S, S, 3), nuclei mask bool (S, S))``.

        Tiles of different centres and splits have different morphology seeds (they are
        different pieces of tissue); the morphology distribution is the same everywhere.
        """
        if not 0 <= cls < self.n_classes:
            raise ValueError(f"cls must be in [0, {self.n_classes}), got {cls}")
        if not 0 <= centre < self.n_centres:
            raise ValueError(f"centre must be in [0, {self.n_centres}), got {centre}")
        h, e, nuc = self.morphology(cls, index, stream=(self.centres[centre].name, split))
        return self.colourise(h, e, centre, key=(cls, index, split)), nuc

    def montage(self, index: int = 0, split: str = "test") -> np.ndarray:
        """A grid of tiles, one row per class and one column per centre (uint8 RGB), 2 px gaps."""
        s, gap = self.size, 2
        grid = np.full(
            (self.n_classes * (s + gap) - gap, self.n_centres * (s + gap) - gap, 3), 255, np.uint8
        )
        for k in range(self.n_classes):
            for c in range(self.n_centres):
                y, x = k * (s + gap), c * (s + gap)
                grid[y : y + s, x : x + s] = self.render(k, c, index, split)[0]
        return grid


# --- datasets and writers ---------------------------------------------------------------------------
SPLITS = ("train", "val", "test")


def split_counts(per_class: int, fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> dict[str, int]:
    """Tiles per class and centre in each split (train/val/test), summing to ``per_class``."""
    if per_class < 3:
        raise ValueError(f"per_class must be at least 3 (one tile per split), got {per_class}")
    n_val = max(1, int(round(per_class * fractions[1])))
    n_test = max(1, int(round(per_class * fractions[2])))
    return {"train": per_class - n_val - n_test, "val": n_val, "test": n_test}


def tile_plan(gen: SyntheticHE, per_class: int, centres: Sequence[int] | None = None):
    """(centre, split, class, index) of every tile of a synthetic set, in a fixed order."""
    counts = split_counts(per_class)
    centres = range(gen.n_centres) if centres is None else centres
    for c in centres:
        for split in SPLITS:
            for k in range(gen.n_classes):
                for i in range(counts[split]):
                    yield c, split, k, i


class SyntheticTiles(Dataset):
    """In-memory synthetic tiles as a Dataset of ``{"image", "label", "centre", ...}`` dicts.

    Tiles are rendered once (deterministically) and kept as uint8; ``image`` is a float
    tensor (3, S, S) in [0, 1], like :class:`lstainnorm.data.tiles.TileFolder` items.

    Args:
        gen: the generator.
        split: ``train``, ``val`` or ``test``.
        per_class: tiles per class and centre over all splits (see :func:`split_counts`).
        centres: centre indices or names to include (default all).
        transform: optional callable on the float image tensor.
        progress: show a progress bar while rendering.
    """

    def __init__(
        self,
        gen: SyntheticHE,
        split: str = "train",
        per_class: int = 200,
        centres: Sequence[int | str] | None = None,
        transform=None,
        progress: bool = False,
    ) -> None:
        from tqdm.auto import tqdm

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        names = gen.centre_names
        idx = []
        for c in centres if centres is not None else range(gen.n_centres):
            if isinstance(c, str):
                if c not in names:
                    raise ValueError(f"unknown centre {c!r}; choose from {names}")
                c = names.index(c)
            idx.append(int(c))
        plan = [p for p in tile_plan(gen, per_class, idx) if p[1] == split]
        self.gen, self.split, self.transform = gen, split, transform
        self.classes = gen.classes
        self.images = np.empty((len(plan), gen.size, gen.size, 3), np.uint8)
        self.labels_ = np.empty(len(plan), np.int64)
        self.centre_names = []
        for j, (c, s, k, i) in enumerate(tqdm(plan, desc=f"rendering {split}", disable=not progress)):
            self.images[j] = gen.render(k, c, i, s)[0]
            self.labels_[j] = k
            self.centre_names.append(names[c])

    @property
    def labels(self) -> list[int]:
        return self.labels_.tolist()

    @property
    def centres(self) -> list[str]:
        return list(self.centre_names)

    def __len__(self) -> int:
        return len(self.labels_)

    def __getitem__(self, j: int) -> dict:
        img = image_to_tensor(self.images[j])
        if self.transform is not None:
            img = self.transform(img)
        return {"image": img, "label": int(self.labels_[j]), "centre": self.centre_names[j], "path": f"synthetic:{self.split}:{j}", "index": j}


def _render_and_write(args):
    gen, out, c, split, k, i = args
    name = gen.centre_names[c]
    rel = Path(name) / split / gen.classes[k] / f"{name}_{gen.classes[k]}_{split}_{i:05d}.png"
    dst = Path(out) / rel
    if not (dst.is_file() and dst.stat().st_size > 0):  # resumable: finished tiles are kept
        write_image(dst, gen.render(k, c, i, split)[0])
    return str(rel), gen.classes[k], name, split


def write_synthetic(
    out: str | Path,
    centres: int = 4,
    per_class: int = 200,
    size: int = 96,
    seed: int = 0,
    classes: int = 6,
    workers: int = 2,
    progress: bool = True,
    preset: str = "default",
) -> Path:
    """Write a synthetic multi-centre set: ``out/<centre>/<split>/<class>/*.png`` + ``out/manifest.csv``.

    ``per_class`` tiles per class and centre are split 60/20/20 into train/val/test; ``preset``
    names the centres (:data:`CENTRE_PRESETS`: ``default`` hand-made, ``monuseg`` measured). Each
    PNG is written atomically and existing ones are kept, so an interrupted run resumes.
    Returns the manifest path.
    """
    import csv
    import multiprocessing as mp

    from tqdm.auto import tqdm

    if preset not in CENTRE_PRESETS:
        raise ValueError(f"preset must be one of {list(CENTRE_PRESETS)}, got {preset!r}")
    gen = SyntheticHE(n_classes=classes, n_centres=centres, size=size, seed=seed, centres=CENTRE_PRESETS[preset])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(gen, str(out), c, s, k, i) for c, s, k, i in tile_plan(gen, per_class)]
    bar = tqdm(total=len(jobs), desc="writing synthetic tiles", unit="tile", disable=not progress)
    rows = []
    if workers > 1:
        ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
        with ctx.Pool(workers) as pool:
            for row in pool.imap(_render_and_write, jobs, chunksize=16):
                rows.append(row)
                bar.update()
    else:
        for job in jobs:
            rows.append(_render_and_write(job))
            bar.update()
    bar.close()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "class", "centre", "split"])
    w.writerows(rows)
    manifest = atomic_write_bytes(out / "manifest.csv", buf.getvalue().encode())
    info = {
        "generator": "lstainnorm.data.synthetic", "centres": gen.centre_names, "classes": gen.classes,
        "per_class": per_class, "splits": split_counts(per_class), "size": size, "seed": seed, "preset": preset,
    }
    atomic_write_bytes(out / "synthetic.json", json.dumps(info, indent=2).encode())
    return manifest


def write_synthetic_segmentation(
    out: str | Path, n_images: int = 12, size: int = 128, centres: int = 2, seed: int = 0, progress: bool = False
) -> Path:
    """Image/mask pairs from the generator (tumour and lymphocyte tissue, nuclei instance labels):
    ``out/images/*.png``, ``out/masks/*.png`` (16-bit labels) and ``out/metadata.csv`` with a
    ``tss_code`` column naming the centre, like MoNuSeg's layout. For tests and tutorials."""
    from scipy import ndimage as ndi

    gen = SyntheticHE(n_classes=3, n_centres=centres, size=size, seed=seed)
    out = Path(out)
    rows = ["name,split,tss_code,organ"]
    for i in range(n_images):
        c = i % centres
        k = 0 if (i // centres) % 2 == 0 else 2  # tumour, lymphocytes
        rgb, nuc = gen.render(k, c, i, "seg")
        lab, _ = ndi.label(nuc)
        name = f"seg_{i:03d}"
        write_image(out / "images" / f"{name}.png", rgb)
        write_image(out / "masks" / f"{name}.png", lab.astype(np.uint16))
        rows.append(f"{name},train,{gen.centre_names[c]},{gen.classes[k]}")
    atomic_write_bytes(out / "metadata.csv", ("\n".join(rows) + "\n").encode())
    return out
