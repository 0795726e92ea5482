"""Tile datasets for classification: ImageFolder trees, manifests, and robust decoding.

A tree like the reference's::

    root/ADI/xxx.png
    root/TUM/yyy.tif
    ...

Corrupt or unreadable files are skipped with a warning that names them (and counted:
the collate function puts their paths in ``batch["skipped"]``); with ``strict=True``
they are an error.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..files import atomic_write_bytes
from .io import IMAGE_EXTENSIONS, ImageReadError, find_images, image_to_tensor, is_image_file, read_rgb, walk_files

__all__ = [
    "TileRecord",
    "TileFolder",
    "stack_stats",
    "scan_image_folder",
    "read_manifest",
    "MANIFEST_COLUMNS",
    "stratified_split",
    "grouped_split",
    "collate_tiles",
    "save_class_map",
    "load_class_map",
    "check_same_classes",
    "round_robin",
    "ImageFiles",
]

T = TypeVar("T")


@dataclass(frozen=True)
class TileRecord:
    path: str
    label: int
    centre: str = ""
    group: str = ""  # e.g. the slide: tiles of one group are not independent


def scan_image_folder(root: str | Path, classes: Sequence[str] | None = None) -> tuple[list[TileRecord], list[str]]:
    """List ``root/CLASS/**/*.{png,jpg,jpeg,tif,tiff,bmp}``; classes sorted by name.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no class folders, an empty class folder, or (with ``classes``) a class
            folder set that differs from ``classes``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"tile folder not found: {root}")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        loose = [p.name for p in root.iterdir() if is_image_file(p)][:3]
        hint = f" (it holds images such as {loose}: put them in one folder per class)" if loose else ""
        raise ValueError(f"{root} has no class folders; expected root/CLASS/image.png{hint}")
    if classes is not None:
        check_same_classes(list(classes), found, f"{root}")
        found = list(classes)
    records = []
    for idx, name in enumerate(found):
        files = walk_files(root / name, IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"class folder {root / name} holds no images ({', '.join(e for e in ('.png', '.jpg', '.tif', '.bmp'))} ...)")
        records += [TileRecord(str(p), idx) for p in files]
    return records, found


def check_same_classes(expected: Sequence[str], found: Sequence[str], where: str) -> None:
    """Raise a ValueError that lists the difference when two class sets differ."""
    if list(expected) != list(found):
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        raise ValueError(
            f"class folders of {where} differ from the training classes: "
            f"missing {missing or 'none'}, unexpected {extra or 'none'} (training classes: {list(expected)})"
        )


# What a manifest's columns mean; ``path`` and ``class`` are required.
MANIFEST_COLUMNS = ("path", "class", "centre", "split", "group")


def read_manifest(path: str | Path, columns: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """Read a manifest CSV: one row per tile, columns ``path, class`` and optionally ``centre, split,
    group`` (the group, e.g. a slide id, keeps related tiles on one side of a validation split).

    ``columns`` maps these names onto the CSV's own headers, so that a CSV is read as it is, e.g.
    ``{"path": "file", "class": "label", "centre": "domain", "split": "authors_split", "group": "slide"}``;
    unmapped names are looked up under their own name. Rows come back keyed by these names; relative
    paths are resolved against the manifest's folder.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no rows, an unknown name in ``columns``, or a column that is not in the CSV
            (the message names it and lists the CSV's columns).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    mapping = {str(k): str(v) for k, v in (columns or {}).items()}
    unknown = sorted(set(mapping) - set(MANIFEST_COLUMNS))
    if unknown:
        raise ValueError(f"data.columns: unknown name(s) {unknown}; map any of {list(MANIFEST_COLUMNS)} onto the CSV's columns")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if not rows:
        raise ValueError(f"manifest {path} has no rows")
    for name, col in mapping.items():
        if col not in header:
            raise ValueError(f"manifest {path} has no column '{col}' (data.columns.{name}); its columns: {header}")
    for name in ("path", "class"):
        if mapping.get(name, name) not in header:
            raise ValueError(f"manifest {path} lacks a '{name}' column (columns: {header}); "
                             f"name the column that holds it with data.columns.{name}")
    present = {name: mapping.get(name, name) for name in MANIFEST_COLUMNS if mapping.get(name, name) in header}
    out = []
    for r in rows:
        row = {name: (r[col] or "").strip() for name, col in present.items()}
        p = Path(row["path"])
        row["path"] = str(p if p.is_absolute() else (path.parent / p))
        out.append(row)
    return out


def stratified_split(labels: Sequence[int], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded stratified split of indices: about ``fraction`` of each class goes to the second list.

    Every class with at least 2 items keeps at least one item on each side.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    first, second = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        second += idx[:k].tolist()
        first += idx[k:].tolist()
    return sorted(first), sorted(second)


def grouped_split(labels: Sequence[int], groups: Sequence[str], fraction: float, seed: int = 0,
                  strata: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """Seeded split of indices that keeps each group (e.g. slide) whole: about ``fraction`` of the
    items go to the second list, with the classes in about their overall proportions
    (scikit-learn's ``StratifiedGroupKFold``, one fold of ``round(1 / fraction)``); with ``strata``
    (e.g. each item's centre), stratified by class and stratum together, so every centre is in both.

    Raises:
        ValueError: fewer than 2 groups (nothing can be held out without splitting a group).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    from sklearn.model_selection import StratifiedGroupKFold

    groups_a = np.asarray([str(g) for g in groups])
    n_groups = len(set(groups_a.tolist()))
    if n_groups < 2:
        raise ValueError(f"a grouped validation split needs at least 2 groups, got {n_groups}")
    folds = min(n_groups, max(2, int(round(1.0 / fraction))))
    labels_a = np.asarray(labels)
    if strata is not None and len(set(strata)) > 1:
        _, labels_a = np.unique([f"{y}\x00{s}" for y, s in zip(labels_a.tolist(), strata)], return_inverse=True)
    # A class with fewer members than folds only draws scikit-learn's warning; the split is still whole groups.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=int(seed) % (2**32))
        first, second = next(cv.split(np.zeros(len(labels_a)), labels_a, groups_a))
    return sorted(first.tolist()), sorted(second.tolist())


class TileFolder(Dataset):
    """Classification tiles from an ImageFolder tree or a manifest.

    Items are dicts: ``image`` (float tensor (3, H, W) in [0, 1]), ``label``, ``centre``,
    ``path``, ``index``. A file that cannot be decoded gives an item with ``image=None``
    and a warning naming it (``strict=True`` raises instead); :func:`collate_tiles` drops
    such items and lists them in ``batch["skipped"]``.

    Args:
        root: class-folder tree (ignored when ``records`` is given).
        classes: expected class names, in index order (e.g. the training set's); a tree with
            other class folders is an error.
        transform: callable on the float image tensor (e.g. resizing, augmentation).
        strict: raise on unreadable files instead of skipping them.
        manifest: optional CSV with ``path`` and ``centre`` columns that adds centres to a tree.
        records: explicit records (used by :meth:`from_manifest` and :meth:`subset`).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        classes: Sequence[str] | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
        strict: bool = False,
        manifest: str | Path | None = None,
        records: Sequence[TileRecord] | None = None,
    ) -> None:
        if records is None:
            if root is None:
                raise ValueError("TileFolder needs a root folder or records")
            records, classes = scan_image_folder(root, classes)
            if manifest is not None:
                centres = {str(Path(r["path"]).resolve()): r.get("centre", "") for r in read_manifest(manifest)}
                records = [TileRecord(r.path, r.label, centres.get(str(Path(r.path).resolve()), "")) for r in records]
        elif classes is None:
            raise ValueError("classes are required with explicit records")
        self.root = None if root is None else Path(root)
        self.records = list(records)
        self.classes = list(classes)
        self.transform = transform
        self.strict = strict

    @classmethod
    def from_manifest(
        cls,
        manifest: str | Path,
        split: str | None = None,
        centres: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        columns: Mapping[str, str] | None = None,
        **kwargs,
    ) -> "TileFolder":
        """Tiles listed in a manifest CSV, optionally filtered by ``split`` and ``centres``
        (``columns``: see :func:`read_manifest`)."""
        rows = all_rows = read_manifest(manifest, columns)
        split_col = (columns or {}).get("split", "split")
        centre_col = (columns or {}).get("centre", "centre")
        if split is not None:
            if "split" not in rows[0]:
                raise ValueError(f"manifest {manifest} has no '{split_col}' column to select {split!r}")
            rows = [r for r in rows if r["split"] == split]
        if centres is not None:
            want = {str(c) for c in centres}
            have = {r.get("centre", "") for r in all_rows}  # every split's centres, for the error
            unknown = want - have
            if unknown:
                raise ValueError(f"centres {sorted(unknown)} not in column '{centre_col}' of manifest {manifest} (has {sorted(have)})")
            rows = [r for r in rows if r.get("centre", "") in want]
        if not rows:
            raise ValueError(f"manifest {manifest} has no rows for split={split!r}, centres={centres!r}")
        names = sorted({r["class"] for r in rows}) if classes is None else list(classes)
        unknown = {r["class"] for r in rows} - set(names)
        if unknown:
            raise ValueError(f"manifest {manifest} has classes {sorted(unknown)} not in {names}")
        index = {c: i for i, c in enumerate(names)}
        recs = [TileRecord(r["path"], index[r["class"]], r.get("centre", ""), r.get("group", "")) for r in rows]
        return cls(records=recs, classes=names, **kwargs)

    def subset(self, indices: Sequence[int], transform: Callable | None = None) -> "TileFolder":
        """A TileFolder over some of this one's records (same classes)."""
        return TileFolder(
            records=[self.records[i] for i in indices],
            classes=self.classes,
            transform=self.transform if transform is None else transform,
            strict=self.strict,
        )

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    @property
    def centres(self) -> list[str]:
        return [r.centre for r in self.records]

    @property
    def groups(self) -> list[str]:
        return [r.group for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        item = {"label": rec.label, "centre": rec.centre, "group": rec.group, "path": rec.path, "index": i, "image": None}
        try:
            arr = read_rgb(rec.path)
        except ImageReadError as err:
            if self.strict:
                raise
            warnings.warn(f"skipping unreadable tile: {err}", stacklevel=2)
            return item
        img = image_to_tensor(arr)
        if self.transform is not None:
            img = self.transform(img)
        item["image"] = img
        return item


def stack_stats(items: list[dict]) -> dict | None:
    """The items' pooled colour statistics (norm.stats_by) as a batch's: ``{space: (mean, std)}``,
    each ``(B, 3, 1, 1)``; None when the items carry none."""
    if not items or "stats" not in items[0]:
        return None
    return {s: tuple(torch.cat([it["stats"][s][k] for it in items]) for k in (0, 1)) for s in items[0]["stats"]}


def collate_tiles(items: list[dict]) -> dict:
    """Stack the readable items of a batch; list the unreadable ones in ``skipped``."""
    good = [it for it in items if it["image"] is not None]
    batch = {
        "skipped": [it["path"] for it in items if it["image"] is None],
        "label": torch.tensor([it["label"] for it in good], dtype=torch.long),
        "centre": [it["centre"] for it in good],
        "path": [it["path"] for it in good],
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
    }
    if good:
        shapes = {tuple(it["image"].shape) for it in good}
        if len(shapes) > 1:
            raise ValueError(
                f"tiles in one batch have different sizes {sorted(shapes)[:4]}; set data.image_size to resize them"
            )
        batch["image"] = torch.stack([it["image"] for it in good])
        stats = stack_stats(good)
        if stats is not None:
            batch["stats"] = stats
    else:
        batch["image"] = torch.empty(0, 3, 1, 1)
    return batch


def save_class_map(path: str | Path, classes: Sequence[str]) -> Path:
    data = {"classes": list(classes), "class_to_index": {c: i for i, c in enumerate(classes)}}
    return atomic_write_bytes(path, json.dumps(data, indent=2).encode())


def load_class_map(path: str | Path) -> list[str]:
    return list(json.loads(Path(path).read_text())["classes"])


def round_robin(groups: Sequence[Sequence[T]], n: int) -> list[T]:
    """Up to ``n`` items, one from each group in turn (each group's first items first).

    Used wherever a few tiles should cover every class or centre: sample grids, report
    tiles and the mosaic a classical normaliser is fitted to.
    """
    out: list[T] = []
    k = 0
    while len(out) < n and any(k < len(g) for g in groups):
        for g in groups:
            if k < len(g) and len(out) < n:
                out.append(g[k])
        k += 1
    return out


class ImageFiles(Dataset):
    """Every image under a folder (flat or class tree), as float tensors (3, H, W) in [0, 1].

    Unreadable files give ``None`` (with a warning naming them) and are listed in
    :attr:`skipped`; ``size`` resizes to a square.
    """

    def __init__(self, root: str | Path, size: int | None = None) -> None:
        self.files = find_images(root)
        self.size = size
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            arr = read_rgb(self.files[i])
        except ImageReadError as err:
            warnings.warn(f"skipping unreadable image: {err}", stacklevel=2)
            self.skipped.append(str(self.files[i]))
            return None
        img = image_to_tensor(arr)
        if self.size is not None and tuple(img.shape[-2:]) != (self.size, self.size):
            img = torch.nn.functional.interpolate(img[None], size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
        return img
