"""Reading and writing images: every format a tile folder holds, decoded to RGB uint8, and the one
conversion pair between uint8 images (H, W, 3) and the float tensors (3, H, W) in [0, 1] the layers take."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..files import atomic_write_bytes

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "read_rgb",
    "read_mask",
    "to_uint8_rgb",
    "write_image",
    "is_image_file",
    "find_images",
    "walk_files",
    "image_to_tensor",
    "tensor_to_image",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class ImageReadError(ValueError):
    """An image file could not be read or decoded; the message names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def is_image_file(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def to_uint8_rgb(arr: np.ndarray, where: str = "image") -> np.ndarray:
    """Any image array (greyscale, RGB, RGBA, 16-bit, float) to RGB uint8 of shape (H, W, 3).

    RGBA is composited on white (transparent slide background is glass, not black);
    16-bit is scaled by 1/257; float arrays must lie in [0, 1].
    """
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels-first TIFF pages
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"{where}: unsupported image shape {a.shape}")
    if a.dtype == np.uint8 and a.shape[-1] in (3, 4):
        # The common cases (RGB, and OpenSlide's RGBA regions) in integer arithmetic: a slide
        # reads gigapixels through here, and a float round trip would cost more than decoding.
        if a.shape[-1] == 3:
            return np.ascontiguousarray(a)
        rgb, alpha = a[..., :3], a[..., 3:]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        al = alpha.astype(np.uint32)
        return ((rgb.astype(np.uint32) * al + 255 * (255 - al) + 127) // 255).astype(np.uint8)
    if a.dtype == np.uint8:
        f = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        f = a.astype(np.float32) / 65535.0
    elif a.dtype == bool:
        f = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.integer):  # e.g. PIL mode "I": 8- or 16-bit data in int32
        scale = 65535.0 if a.max() > 255 else 255.0
        f = np.clip(a.astype(np.float32) / scale, 0.0, 1.0)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"{where}: contains NaN or Inf")
        if a.min() < 0 or a.max() > 1.0 + 1e-6:
            raise ValueError(f"{where}: float image values must lie in [0, 1], observed [{a.min():.4g}, {a.max():.4g}]")
        f = a.astype(np.float32)
    else:
        raise ValueError(f"{where}: unsupported dtype {a.dtype}")
    c = f.shape[-1]
    if c in (2, 4):  # grey+alpha or RGBA: composite on white
        alpha = f[..., -1:]
        f = f[..., :-1] * alpha + (1.0 - alpha)
        c -= 1
    if c == 1:
        f = np.repeat(f, 3, axis=-1)
    return (np.clip(f, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def walk_files(root: str | Path, extensions: Sequence[str], exclude: Sequence[str | Path] = ()) -> list[Path]:
    """Files under the folder ``root`` with a suffix in ``extensions``, sorted; hidden files and
    folders skipped.

    Symlinked sub-folders are followed, each real folder once (a link back to an ancestor
    cannot loop); folders in ``exclude`` (e.g. an output folder inside the input) are skipped.
    """
    exts = {e.lower() for e in extensions}
    skip = {os.path.realpath(e) for e in exclude}
    seen: set[str] = set()
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or real in skip:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            p = Path(dirpath) / f
            if not f.startswith(".") and p.suffix.lower() in exts and p.is_file():
                out.append(p)
    return sorted(out)


def find_images(root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS, exclude: Sequence[str | Path] = ()) -> list[Path]:
    """Every file under ``root`` whose suffix is in ``extensions`` (:func:`walk_files`: recursive,
    sorted, symlinked folders followed once, ``exclude`` skipped), or ``[root]`` for a single such
    file. The one way lstainnorm lists inputs."""
    root = Path(root)
    exts = {e.lower() for e in extensions}
    if root.is_file():
        if root.suffix.lower() not in exts:
            raise ValueError(f"{root} is not an image file ({', '.join(sorted(exts))})")
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"not found: {root}")
    files = walk_files(root, extensions, exclude)
    if not files:
        raise ValueError(f"no images found under {root}")
    return files


def image_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """RGB uint8 ``(H, W, 3)`` -> float32 tensor ``(3, H, W)`` in [0, 1] (``(N, H, W, 3)`` -> ``(N, 3, H, W)``)."""
    a = np.ascontiguousarray(arr)
    if not a.flags.writeable:  # e.g. np.asarray of a PIL image; torch wants writable memory
        a = a.copy()
    return torch.from_numpy(a).movedim(-1, -3).float().div_(255.0)


def tensor_to_image(t: torch.Tensor) -> np.ndarray:
    """Float tensor ``(3, H, W)`` (or ``(N, 3, H, W)``) in [0, 1] -> RGB uint8 ``(H, W, 3)``, rounded
    to nearest; values outside [0, 1] are clipped."""
    t = t.detach().float().cpu().clamp(0.0, 1.0).mul(255.0).add_(0.5)
    return t.to(torch.uint8).movedim(-3, -1).numpy()


def _read_array(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            if getattr(page, "photometric", None) is not None and page.photometric.name == "PALETTE":
                from PIL import Image

                with Image.open(path) as im:
                    return np.asarray(im.convert("RGB"))
            return page.asarray()
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(im, dtype=np.uint16)
        elif im.mode == "I":
            return np.asarray(im, dtype=np.int32)
        elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        elif im.mode == "1":
            im = im.convert("L")
        return np.asarray(im)


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3); raises :class:`ImageReadError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(p, "no such file")
    try:
        arr = _read_array(p)
    except Exception as err:  # PIL/tifffile raise many types for corrupt files
        raise ImageReadError(p, f"{type(err).__name__}: {err}") from err
    try:
        return to_uint8_rgb(arr, where=str(p))
    except ValueError as err:
        raise ImageReadError(p, str(err)) from err


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask: a binary (0/255 or 0/1) or instance label map (integers), as int64 (H, W).

    Raises :class:`ImageReadError` for unreadable files, colour masks whose channels differ,
    and non-integer values.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(p, "no such file")
    try:
        arr = _read_array(p)
    except Exception as err:
        raise ImageReadError(p, f"{type(err).__name__}: {err}") from err
    a = np.asarray(arr)
    if a.ndim == 3:
        if a.shape[-1] == 4:
            a = a[..., :3]
        if not (a == a[..., :1]).all():
            raise ImageReadError(p, "mask has colour channels that differ; expected a single-channel label map")
        a = a[..., 0]
    if a.ndim != 2:
        raise ImageReadError(p, f"mask must be 2-D, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or not np.array_equal(a, np.round(a)):
            raise ImageReadError(p, "mask has non-integer labels; expected 0/1, 0/255 or integer instance labels")
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if (a < 0).any():
        raise ImageReadError(p, "mask has negative labels")
    return a.astype(np.int64)


def write_image(path: str | Path, arr: np.ndarray, quality: int = 95) -> Path:
    """Write an image atomically; format from the suffix (PNG, JPEG, TIFF; 16-bit PNG/TIFF kept)."""
    import io

    path = Path(path)
    a = np.asarray(arr)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        buf = io.BytesIO()
        tifffile.imwrite(buf, a, photometric="rgb" if a.ndim == 3 else "minisblack", compression="zlib")
        return atomic_write_bytes(path, buf.getvalue())
    from PIL import Image

    buf = io.BytesIO()
    if a.dtype == np.uint16 and a.ndim == 2:
        im = Image.fromarray(a) if suffix == ".png" else Image.fromarray(a.astype(np.int32))
    else:
        im = Image.fromarray(a)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}.get(suffix)
    if fmt is None:
        raise ValueError(f"unsupported output format {suffix!r} for {path}")
    im.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return atomic_write_bytes(path, buf.getvalue())
