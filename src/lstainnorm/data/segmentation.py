"""Segmentation pairs: ``images/`` + ``masks/`` matched by file stem, and the MoNuSeg layout.

Masks may be binary (0/255 or 0/1) or instance label maps (uint16, 0 = background),
PNG or TIFF. Training items are random crops with flips and 90-degree rotations;
evaluation items are whole images (sliding-window inference is the model's job).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from .io import ImageReadError, image_to_tensor, is_image_file, read_mask, read_rgb

__all__ = [
    "SegRecord",
    "pair_images_masks",
    "monuseg_records",
    "split_records",
    "read_split_file",
    "SegmentationDataset",
    "load_pair",
    "collate_segmentation",
]


@dataclass(frozen=True)
class SegRecord:
    image: str
    mask: str
    name: str
    centre: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def pair_images_masks(images_dir: str | Path, masks_dir: str | Path, centre: str = "") -> list[SegRecord]:
    """Match ``images_dir/<stem>.*`` with ``masks_dir/<stem>.*`` (PNG/TIFF/...).

    Raises:
        FileNotFoundError: a folder is missing.
        ValueError: no images, or an image without a mask (both names given).
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"folder not found: {d}")
    images = sorted(p for p in images_dir.iterdir() if p.is_file() and is_image_file(p))
    if not images:
        raise ValueError(f"no images in {images_dir}")
    masks: dict[str, Path] = {}
    for p in sorted(masks_dir.iterdir()):
        if p.is_file() and is_image_file(p):
            masks.setdefault(p.stem, p)
    records = []
    for img in images:
        m = masks.get(img.stem)
        if m is None:
            raise ValueError(f"image {img} has no mask: expected {masks_dir / img.stem}.png (or .tif) in {masks_dir}")
        records.append(SegRecord(str(img), str(m), img.stem, centre))
    return records


def read_metadata_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a MoNuSeg-style ``metadata.csv`` (one row per tile, keyed by ``name``)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def monuseg_records(root: str | Path, masks: str = "masks_instance") -> list[SegRecord]:
    """Records of a MoNuSeg-style folder: ``images/``, ``masks_instance/`` (or ``masks_binary/``)
    and ``metadata.csv``; the hospital (``tss_code``) becomes the centre, every metadata column
    is kept in ``meta``."""
    root = Path(root)
    recs = pair_images_masks(root / "images", root / masks)
    meta_path = root / "metadata.csv"
    if not meta_path.is_file():
        return recs
    meta = {row["name"]: row for row in read_metadata_csv(meta_path)}
    out = []
    for r in recs:
        m = meta.get(r.name, {})
        out.append(SegRecord(r.image, r.mask, r.name, m.get("tss_code", ""), dict(m)))
    return out


def read_split_file(path: str | Path) -> dict[str, str]:
    """A split file: CSV with ``name, split`` columns (split in train/val/test); ``#`` lines are comments."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(line for line in fh if not line.lstrip().startswith("#")))
    if not rows or "name" not in rows[0] or "split" not in rows[0]:
        raise ValueError(f"split file {path} needs 'name' and 'split' columns")
    bad = {r["split"] for r in rows} - {"train", "val", "test"}
    if bad:
        raise ValueError(f"split file {path} has unknown splits {sorted(bad)}; use train/val/test")
    return {r["name"]: r["split"] for r in rows}


def split_records(
    records: Sequence[SegRecord],
    split: str,
    *,
    split_file: str | Path | None = None,
    column: str | None = None,
    test_values: Sequence[str] = (),
    val_values: Sequence[str] = (),
) -> list[SegRecord]:
    """Select one split, either from a split file or by a metadata column.

    With ``column`` (e.g. ``tss_code``), records whose value is in ``test_values`` are
    ``test``, in ``val_values`` are ``val``, and the rest ``train``: a leave-hospitals-out split.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if split_file is not None:
        table = read_split_file(split_file)
        unknown = sorted(set(table) - {r.name for r in records})
        if unknown:
            raise ValueError(f"split file {split_file} names images that are not in the data: {unknown[:5]}")
        missing = [r.name for r in records if r.name not in table]
        if missing and split == "train":
            import warnings

            warnings.warn(f"{len(missing)} images are not in split file {split_file} and are left out: {missing[:3]} ...", stacklevel=2)
        return [r for r in records if table.get(r.name) == split]
    if column is None:
        raise ValueError("give a split_file or a metadata column")

    def value(r: SegRecord) -> str:
        if column not in r.meta:
            raise ValueError(f"record {r.name} has no metadata column {column!r} (has {sorted(r.meta)})")
        return str(r.meta[column])

    def which(r: SegRecord) -> str:
        v = value(r)
        return "test" if v in test_values else "val" if v in val_values else "train"

    return [r for r in records if which(r) == split]


def load_pair(rec: SegRecord, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3) uint8 and instance labels (H, W) int64 of a record.

    A binary mask (0/1 or 0/255) becomes instance labels by connected components.
    ``scale`` < 1 resizes both (image: area-averaging; labels: nearest), e.g. 0.5 turns 40x
    tiles into 20x. Raises ValueError naming both files when their sizes differ.
    """
    img = read_rgb(rec.image)
    lab = read_mask(rec.mask)
    if img.shape[:2] != lab.shape:
        raise ValueError(
            f"mask size {lab.shape[1]}x{lab.shape[0]} of {rec.mask} does not match image size "
            f"{img.shape[1]}x{img.shape[0]} of {rec.image}"
        )
    values = np.unique(lab)
    if set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}:
        lab, _ = ndimage.label(lab > 0)
    if scale != 1.0:
        from PIL import Image

        h, w = lab.shape
        size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
        img = np.asarray(Image.fromarray(img).resize(size, Image.BOX if scale < 1 else Image.BILINEAR))
        lab = np.asarray(Image.fromarray(lab.astype(np.int32)).resize(size, Image.NEAREST)).astype(np.int64)
    return img, lab.astype(np.int64)


class SegmentationDataset(Dataset):
    """Image/mask pairs for nuclei segmentation.

    Items: ``image`` float (3, H, W) in [0, 1], ``mask`` float (1, H, W) in {0, 1},
    ``instances`` int64 (H, W), ``name``, ``centre``, ``index``.

    Args:
        records: from :func:`pair_images_masks` or :func:`monuseg_records`.
        crop: training crop size (``None``: whole images, for evaluation).
        augment: random flips and 90-degree rotations (with ``crop``).
        samples_per_image: crops drawn from each image per epoch (training).
        cache: keep decoded images in memory (a MoNuSeg tile is 3 MB).
        scale: resize factor applied on load (see :func:`load_pair`).
    """

    def __init__(
        self,
        records: Sequence[SegRecord],
        crop: int | None = None,
        augment: bool = False,
        samples_per_image: int = 1,
        cache: bool = True,
        scale: float = 1.0,
    ) -> None:
        if not records:
            raise ValueError("no segmentation records")
        self.records = list(records)
        self.crop = crop
        self.augment = augment
        self.samples = max(1, int(samples_per_image)) if crop else 1
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.cache = cache
        self.scale = float(scale)
        if crop is not None:
            for i, r in enumerate(self.records):
                h, w = self._get(i)[1].shape
                if h < crop or w < crop:
                    raise ValueError(f"crop {crop} is larger than image {r.image} ({w}x{h})")

    def _get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self._cache:
            return self._cache[i]
        pair = load_pair(self.records[i], self.scale)
        if self.cache:
            self._cache[i] = pair
        return pair

    def __len__(self) -> int:
        return len(self.records) * self.samples

    def __getitem__(self, j: int) -> dict:
        return self.get(j)

    def get(self, j: int, generator: torch.Generator | None = None) -> dict:
        """Item ``j``; crops and flips draw from ``generator`` (default: torch's global RNG)."""
        i = j // self.samples
        img, lab = self._get(i)
        if self.crop is not None:
            h, w = lab.shape
            y = int(torch.randint(0, h - self.crop + 1, (), generator=generator).item())
            x = int(torch.randint(0, w - self.crop + 1, (), generator=generator).item())
            img = img[y : y + self.crop, x : x + self.crop]
            lab = lab[y : y + self.crop, x : x + self.crop]
            if self.augment:
                k = int(torch.randint(0, 4, (), generator=generator).item())
                img, lab = np.rot90(img, k), np.rot90(lab, k)
                if torch.rand((), generator=generator) < 0.5:
                    img, lab = img[:, ::-1], lab[:, ::-1]
        image = image_to_tensor(img)
        inst = torch.from_numpy(np.ascontiguousarray(lab))
        rec = self.records[i]
        return {
            "image": image,
            "mask": (inst > 0).float().unsqueeze(0),
            "instances": inst,
            "name": rec.name,
            "centre": rec.centre,
            "index": i,
        }


def collate_segmentation(items: list[dict]) -> dict:
    """Stack same-size items (training crops); whole images of different sizes need batch size 1."""
    shapes = {tuple(it["image"].shape) for it in items}
    if len(shapes) > 1:
        raise ValueError(f"segmentation images in one batch differ in size {sorted(shapes)}; use batch size 1 for evaluation")
    return {
        "image": torch.stack([it["image"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "instances": torch.stack([it["instances"] for it in items]),
        "name": [it["name"] for it in items],
        "centre": [it["centre"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }


__all__ += ["ImageReadError"]
