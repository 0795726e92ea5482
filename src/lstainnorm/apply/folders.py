"""``lstainnorm normalize``: a trained layer (or a template) applied to images, folders and slides.

- A single image, a folder tree (layout and file names preserved) or whole slides.
- Resumable: outputs that exist are finished (every write is atomic) and are skipped; they are
  tied to the settings that made them (``OUTPUT/.lstainnorm-normalize.json``), so a rerun with
  other settings is refused (or, with ``force``, redoes every file) instead of mixing.
- Tissue statistics by default: glass and black stay as they are.
- An input is never overwritten; OUTPUT may not be, or lie inside, INPUT; every input has its
  own output file, inside OUTPUT.
- Unreadable inputs are reported by name, skipped and counted.
- ``shard=(k, n)`` processes every n-th file starting at the k-th, so n processes (or GPUs)
  together cover every file exactly once.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..data.io import IMAGE_EXTENSIONS, ImageReadError, find_images, image_to_tensor, read_rgb, tensor_to_image, write_image
from ..files import atomic_write_bytes, confined, sweep_stale_temps, unique_names
from ..layers.fusion import LStainNorm
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


@contextmanager
def tissue_stats_as(norm: nn.Module, on: bool) -> Iterator[nn.Module]:
    """The layer (and its branches) with tissue statistics switched on or off for the block;
    the caller's setting is restored afterwards."""
    layers = [m for m in norm.modules() if isinstance(m, (StainNorm, LStainNorm))]
    saved = [m.tissue_stats for m in layers]
    for m in layers:
        m.tissue_stats = bool(on)
    try:
        yield norm
    finally:
        for m, v in zip(layers, saved):
            m.tissue_stats = v


def layer_fingerprint(norm: nn.Module) -> str:
    """A hash of what the layer computes: its class, settings and every parameter and buffer."""
    h = hashlib.sha256(f"{type(norm).__name__}:{norm.extra_repr()}".encode())
    for k, v in sorted(norm.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


SETTINGS_FILE = ".lstainnorm-normalize.json"


def _check_settings(out: Path, settings: dict, force: bool) -> None:
    """Tie the outputs in ``out`` to the settings that made them (``out/.lstainnorm-normalize.json``)."""
    path = out / SETTINGS_FILE
    if path.is_file() and not force:
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old != settings:
            diff = sorted(k for k in set(settings) | set(old or {}) if (old or {}).get(k) != settings.get(k))
            raise ValueError(
                f"OUTPUT {out} holds outputs made with other settings (differing: {', '.join(diff) or 'unreadable settings file'}); "
                "choose another output folder, or pass --force (force=True) to redo every file with the new settings"
            )
    atomic_write_bytes(path, json.dumps(settings, indent=2, sort_keys=True).encode())


def output_names(files: Sequence[Path], base: Path, single: bool) -> dict[Path, Path]:
    """Each input's output name relative to OUTPUT: layout and names kept, slides and other
    formats as ``.tif``; inputs whose names would collide keep their suffix in the name."""
    wanted = {}
    for src in files:
        rel = Path(src.name) if single else src.relative_to(base)
        wanted[src] = rel if rel.suffix.lower() in IMAGE_EXTENSIONS else rel.with_suffix(".tif")
    return unique_names(wanted)


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
    tissue_stats: bool = True,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Normalise an image, a folder tree or slides into ``out``; returns a summary.

    Regular images are normalised whole with their own statistics (``window`` splits larger
    ones window by window); slides go through :func:`normalize_slide` with slide statistics and
    ``slide_window``. ``tissue_stats`` (default) takes statistics over tissue and leaves glass
    and black as they are, as a person looking at the output expects. Outputs are tied to the
    settings that made them: a folder made with other settings is refused unless ``force``,
    which redoes every file.
    """
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of pixels, got {window}")
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    inp, out = Path(inp), Path(out)
    r_in, r_out = inp.resolve(), out.resolve()
    if r_out == r_in or (inp.is_dir() and r_in in r_out.parents):
        raise ValueError(f"OUTPUT {out} must not be INPUT or lie inside it: inputs are never overwritten")
    all_files = list_inputs(inp)
    single = inp.is_file()
    names = output_names(all_files, inp.parent if single else inp, single)
    files = shard_files(all_files, shard)
    with tissue_stats_as(norm, tissue_stats):
        settings = {"layer": type(norm).__name__, "fingerprint": layer_fingerprint(norm), "window": window,
                    "slide_window": slide_window, "tile": tile, "tissue_stats": bool(tissue_stats)}
        _check_settings(out, settings, force)
        sweep_stale_temps(out)  # half-written files of an earlier run that was killed
        return _normalize_files(norm, files, names, out, window, slide_window, tile, force, progress)


def _normalize_files(norm: nn.Module, files: Sequence[Path], names: dict[Path, Path], out: Path, window: int | None,
                     slide_window: int | None, tile: int, force: bool, progress: bool) -> dict:
    from tqdm.auto import tqdm

    done, written, skipped, slides = 0, [], [], []
    for src in tqdm(files, desc="normalising", unit="file", disable=not progress):
        dst = confined(out, names[src])
        if dst.resolve() == src.resolve():
            raise ValueError(f"refusing to overwrite the input {src}")
        if not force and dst.is_file() and dst.stat().st_size > 0:
            done += 1
            continue
        try:
            if src.suffix.lower() in SLIDE_EXTENSIONS and is_slide(src):
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
