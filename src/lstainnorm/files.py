"""Where and how lstainnorm writes files: atomically, inside the folder it was given, one file per input.

The one place that knows how: a temporary file in the destination's folder, then a rename
(atomic on POSIX and Windows). An interrupted write leaves the previous file or none, never a
truncated one. Lowest layer of the package: it imports nothing from lstainnorm.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "confined", "unique_names"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it is renamed onto ``path``.

    Use it for writers that want a file name (``torch.save``, ONNX export, tifffile);
    on an exception the temporary file is removed and ``path`` is left as it was. The file
    gets the usual permissions (0666 minus the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def confined(out: str | Path, rel: str | Path) -> Path:
    """``out / rel``, refusing any ``rel`` that would leave ``out`` (``..`` parts, absolute paths).

    Output names derive from input names; this keeps a crafted name from writing elsewhere.
    """
    out = Path(out)
    rel = Path(rel)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"refusing to write {rel} outside the output folder {out}")
    path = out / rel
    if not os.path.normpath(path).startswith(os.path.normpath(out)):
        raise ValueError(f"refusing to write {path} outside the output folder {out}")
    return path


def unique_names(wanted: dict[Path, Path]) -> dict[Path, Path]:
    """Make output names unique: inputs whose wanted output names collide (``a.png`` and ``a.jpg``
    both becoming ``a_mask.png``, ``x.svs`` and ``x.tif`` both ``x.tif``) get their own suffix
    in the name instead (``a-png``, ``a-jpg``). ``wanted`` maps each input to its output name."""
    groups: dict[str, list[Path]] = {}
    for src, name in wanted.items():
        groups.setdefault(str(name).lower(), []).append(src)
    out = dict(wanted)
    for srcs in groups.values():
        if len(srcs) > 1:
            for src in srcs:
                name = wanted[src]
                tag = src.suffix.lstrip(".").lower() or "noext"
                out[src] = name.with_name(f"{name.stem}-{tag}{name.suffix}")
    if len({str(v).lower() for v in out.values()}) != len(out):  # e.g. a.png, a.PNG and a-png.png
        raise ValueError("inputs map to the same output name even with their suffixes; rename them: "
                         + ", ".join(str(s) for s in sorted(out)))
    return out
