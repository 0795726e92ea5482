"""Where and how lstainnorm writes files: atomically, inside the folder it was given, one file per input.

The one place that knows how: a temporary file in the destination's folder, then a rename
(atomic on POSIX and Windows). An interrupted write leaves the previous file or none, never a
truncated one. Lowest layer of the package: it imports nothing from lstainnorm.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["OutputError", "atomic_path", "atomic_write_bytes", "confined", "sweep_stale_temps", "temp_prefix", "unique_names"]

# Temporary names carry the writer's host and pid, so a later run can tell a file left by a killed
# writer (kill -9, power loss: nothing could clean up) from one a live shard is writing right now.
_TEMP_RE = re.compile(r"^\.tmp-([0-9a-f]{8})-(\d+)-")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def temp_prefix() -> str:
    """Prefix for this process's temporary files and folders: ``.tmp-<host hash>-<pid>-``."""
    return f".tmp-{_host_tag()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only (POSIX)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def sweep_stale_temps(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Remove the temporary files and folders under ``folder`` left by writers that died on this host.

    Only names made by :func:`temp_prefix` whose host is this one and whose pid no longer runs are
    removed: a live writer's file (another shard of the same job) and another host's (a shared
    file system) are left alone. On Windows nothing is removed (no safe liveness check).
    ``recursive=False`` looks at ``folder``'s own entries only: for a folder that is not ours
    alone (the one an exported file goes to), where walking every subfolder could take minutes.
    Returns what was removed.
    """
    folder = Path(folder)
    if os.name != "posix" or not folder.is_dir():
        return []
    host, removed = _host_tag(), []
    for path in sorted(folder.rglob(".tmp-*") if recursive else folder.glob(".tmp-*")):
        m = _TEMP_RE.match(path.name)
        if not m or m.group(1) != host or _alive(int(m.group(2))):  # our own pid is alive too
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


class OutputError(ValueError):
    """An output cannot be written (read-only folder, a file where a folder should be, a full disk):
    ``cannot write to PATH: reason``, said once by the command instead of a traceback."""

    def __init__(self, path: str | Path, err: OSError) -> None:
        self.path = Path(path)
        reason = err.strerror or type(err).__name__
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
        super().__init__(f"cannot write to {path}: {reason}{where}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it is renamed onto ``path``.

    Use it for writers that want a file name (``torch.save``, ONNX export, tifffile);
    on an exception the temporary file is removed and ``path`` is left as it was. The file
    gets the usual permissions (0666 minus the umask), not mkstemp's 0600.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=path.suffix, dir=path.parent)
    except (PermissionError, FileExistsError, NotADirectoryError, IsADirectoryError, OSError) as err:
        raise OutputError(path, err) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            os.replace(tmp, path)
        except OSError as err:  # e.g. a folder of that name is in the way
            raise OutputError(path, err) from None
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
