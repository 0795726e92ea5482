"""Datasets and loaders of a run, built from its config: tiles for classification, image-mask
pairs (random crops for training, whole images for evaluation) for segmentation."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import Config
from ..data.segmentation import SegmentationDataset, collate_segmentation, monuseg_records, pair_images_masks, split_records
from ..data.tiles import TileFolder, collate_tiles, grouped_split, round_robin, stack_stats, stratified_split

__all__ = [
    "ClassificationData",
    "SegmentationData",
    "EpochShuffleSampler",
    "ClassBalancedSampler",
    "ResumableLoader",
    "build_classification_data",
    "build_segmentation_data",
    "build_data",
    "resize_transform",
    "class_weights",
    "segmentation_records",
    "sample_tiles",
]

log = logging.getLogger("lstainnorm")


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a generator seeded by ``(seed, epoch)``: the order of an epoch does not
    depend on the global RNG, so a resumed run sees the same batches as an uninterrupted one.
    Lightning calls :meth:`set_epoch` (and wraps it for DDP)."""

    def __init__(self, n: int, seed: int, size: int | None = None) -> None:
        # ``size``: indices per epoch (data.epoch_size); more than ``n`` chains further permutations.
        self.n, self.seed, self.epoch, self.size = n, int(seed), 0, int(size or n)
        self._resume: tuple[int, int] | None = None  # (epoch, indices already trained on)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, done: int) -> None:
        """The next pass over ``epoch`` leaves out its first ``done`` indices (already trained on
        before an interruption); any other epoch is whole."""
        self._resume = (int(epoch), int(done))

    def order(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        out = rng.permutation(self.n).tolist()
        while len(out) < self.size:
            out += rng.permutation(self.n).tolist()
        return out[: self.size]

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        if self._resume is not None and self._resume[0] == self.epoch:
            order = order[self._resume[1] :]
            self._resume = None
        return iter(order)

    def __len__(self) -> int:
        return self.size


class ResumableLoader(DataLoader):
    """The training DataLoader, checkpointed mid-epoch: Lightning saves :meth:`state_dict` with the
    loop state (its ``_Stateful`` interface) and, on ``--resume``, :meth:`load_state_dict` makes the
    epoch's sampler skip the batches already trained on. So a run stopped mid-epoch (SIGTERM,
    Ctrl-C) and resumed sees the same batches as one that was never stopped.
    :attr:`completed` is set after each training batch (:class:`~.callbacks.StopAndSave`)."""

    completed = 0

    def state_dict(self) -> dict:
        # A finished epoch is not skipped into: Lightning restarts after it by itself.
        done = int(self.completed) if self.completed < len(self) else 0
        return {"epoch": int(self.sampler.epoch), "batches": done}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict) -> None:
        self.sampler.resume_at(state["epoch"], state["batches"] * int(self.batch_size or 1))  # type: ignore[attr-defined]


class ClassBalancedSampler(EpochShuffleSampler):
    """An epoch of ``size`` (default ``len(labels)``) indices drawn with replacement, each class equally
    likely (``data.balance: sampler``); seeded by ``(seed, epoch)`` like :class:`EpochShuffleSampler`,
    so a resumed run draws the same tiles."""

    def __init__(self, labels: Sequence[int], seed: int, size: int | None = None) -> None:
        super().__init__(len(labels), seed, size)
        lab = np.asarray(labels)
        counts = np.bincount(lab)
        weights = 1.0 / counts[lab]
        self.p = weights / weights.sum()

    def order(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        return rng.choice(self.n, size=self.size, replace=True, p=self.p).tolist()


def class_weights(labels: Sequence[int], n_classes: int) -> list[float]:
    """Inverse class frequency, ``n / (k * count_c)`` (``data.balance: loss``): 1 for balanced
    data; a class absent from the training labels gets weight 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(float)
    n = counts.sum()
    return [float(n / (n_classes * c)) if c else 0.0 for c in counts]


def resize_transform(size: int | None, center_crop: int | None = None):
    """Tile preprocessing of ``data``: the central ``center_crop`` square (tiles centred on an object,
    e.g. a mitotic figure: full resolution, less context), then a resize to ``size``; None if neither."""
    if size is None and center_crop is None:
        return None
    if center_crop is not None:
        crop, resize_only = int(center_crop), resize_transform(size)

        def crop_resize(img: torch.Tensor) -> torch.Tensor:
            h, w = img.shape[-2:]
            if h < crop or w < crop:
                raise ValueError(f"data.center_crop={crop} is larger than a {h} x {w} tile")
            top, left = (h - crop) // 2, (w - crop) // 2
            img = img[..., top : top + crop, left : left + crop]
            return img if resize_only is None else resize_only(img)

        return crop_resize

    def resize(img: torch.Tensor) -> torch.Tensor:
        if tuple(img.shape[-2:]) == (size, size):
            return img
        out = torch.nn.functional.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return out[0].clamp_(0.0, 1.0)

    return resize


@dataclass
class ClassificationData:
    train: TileFolder
    val: TileFolder
    test: TileFolder | None
    classes: list[str]
    centres: list[str] = field(default_factory=list)
    train_centres: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    collate = staticmethod(collate_tiles)

    def template_source(self) -> Dataset:
        """The tiles that initial templates and stain statistics are estimated on."""
        return self.train

    @property
    def labels(self) -> list[int]:
        return self.train.labels

    def loaders(self, cfg: Config, seed: int) -> tuple[DataLoader, DataLoader, DataLoader | None]:
        d = cfg.data
        kw = {"num_workers": d.num_workers, "collate_fn": collate_tiles, "persistent_workers": d.num_workers > 0}
        ev = d.eval_batch_size or d.batch_size
        size = d.epoch_size
        sampler = ClassBalancedSampler(self.train.labels, seed, size) if d.balance == "sampler" else EpochShuffleSampler(len(self.train), seed, size)
        train = ResumableLoader(self.train, batch_size=d.batch_size, sampler=sampler, drop_last=False, **kw)
        val = DataLoader(self.val, batch_size=ev, shuffle=False, **kw)
        test = DataLoader(self.test, batch_size=ev, shuffle=False, **kw) if self.test is not None else None
        return train, val, test


def _check_nonempty(ds: Dataset, what: str) -> None:
    if len(ds) == 0:
        raise ValueError(f"{what} is empty")


def build_classification_data(cfg: Config, seed: int) -> ClassificationData:
    """Training, validation and test tiles from folders or a manifest (see :class:`DataConfig`)."""
    d = cfg.data
    tf = resize_transform(d.image_size, d.center_crop)
    notes: list[str] = []
    if d.manifest:
        cols = dict(d.columns) if d.columns else None
        tc = list(d.train_centres) if d.train_centres else None
        train = TileFolder.from_manifest(d.manifest, split=d.train_split, centres=tc, transform=tf, strict=d.strict, columns=cols)
        classes = train.classes
        vc = list(d.val_centres) if d.val_centres else tc
        try:
            val = TileFolder.from_manifest(d.manifest, split=d.val_split, centres=vc, classes=classes, transform=tf, strict=d.strict, columns=cols)
        except ValueError:
            val = None
        test_c = list(d.test_centres) if d.test_centres else None
        test = TileFolder.from_manifest(d.manifest, split=d.test_split, centres=test_c, classes=classes, transform=tf, strict=d.strict, columns=cols)
        if d.test_split is None:
            notes.append(f"test: every row of centres {test_c} ({len(test)} tiles; none of these centres trains)")
        train_centres = sorted(set(train.centres))
    else:
        if not d.train:
            raise ValueError("data.train (a class-folder tree) or data.manifest is required")
        train = TileFolder(d.train, transform=tf, strict=d.strict)
        classes = train.classes
        val = TileFolder(d.val, classes=classes, transform=tf, strict=d.strict) if d.val else None
        test = TileFolder(d.test, classes=classes, transform=tf, strict=d.strict) if d.test else None
        train_centres = sorted(set(train.centres))
    if len(classes) < 2:
        raise ValueError(f"the training data has only one class ({classes[0]!r}); classification needs at least two "
                         "(one class folder per class, or two values in the manifest's class column)")
    if val is None:
        groups = train.groups
        seed = d.split_seed if d.split_seed is not None else seed
        if all(groups):
            tr_idx, va_idx = grouped_split(train.labels, groups, d.val_fraction, seed, strata=train.centres)
            how = f"by group, {len(set(train.subset(va_idx).groups))} of {len(set(groups))} groups"
        else:
            tr_idx, va_idx = stratified_split(train.labels, d.val_fraction, seed)
            how = "stratified"
        val = train.subset(va_idx)
        train = train.subset(tr_idx)
        notes.append(f"validation: {len(val)} tiles held out of the training set ({how}, val_fraction={d.val_fraction}, seed={seed})")
    _check_nonempty(train, "the training set")
    _check_nonempty(val, "the validation set")
    centres = sorted({c for ds in (train, val, test) if ds is not None for c in ds.centres})
    return ClassificationData(train, val, test, classes, centres, train_centres, notes)


class EpochSeededCropSampler(EpochShuffleSampler):
    """Yields ``(index, epoch)`` so each crop's position and flips derive from (seed, epoch, index):
    a resumed run draws the same crops as an uninterrupted one."""

    def order(self) -> list:  # type: ignore[override]
        return [(int(i), self.epoch) for i in super().order()]


class _SeededCrops(Dataset):
    def __init__(self, ds: SegmentationDataset, seed: int) -> None:
        self.ds, self.seed = ds, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0]))
        return self.ds.get(i, generator=g)


@dataclass
class SegmentationData:
    train: SegmentationDataset
    val: SegmentationDataset
    test: SegmentationDataset | None
    classes: list[str] = field(default_factory=lambda: ["nucleus"])
    centres: list[str] = field(default_factory=list)
    train_centres: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    collate = staticmethod(collate_segmentation)

    def template_source(self) -> Dataset:
        """Whole training images (not random crops) for template and stain statistics."""
        return SegmentationDataset(self.train.records, scale=self.train.scale)

    @property
    def labels(self) -> list[int]:
        return [0] * len(self.train.records)

    def loaders(self, cfg: Config, seed: int):
        d = cfg.data
        kw = {"num_workers": d.num_workers, "collate_fn": collate_segmentation, "persistent_workers": d.num_workers > 0}
        train = ResumableLoader(_SeededCrops(self.train, seed), batch_size=d.batch_size, sampler=EpochSeededCropSampler(len(self.train), seed), **kw)
        val = DataLoader(self.val, batch_size=1, shuffle=False, **kw)
        test = DataLoader(self.test, batch_size=1, shuffle=False, **kw) if self.test is not None else None
        return train, val, test


def build_segmentation_data(cfg: Config) -> SegmentationData:
    """Train/val/test image-mask pairs from ``segmentation.root`` and a split file or metadata column."""
    s = cfg.segmentation
    if not s.root:
        raise ValueError("segmentation.root is required: a folder with images/ and masks/ (or MoNuSeg's masks_instance/)")
    root = Path(s.root)
    if not root.is_dir():
        raise FileNotFoundError(f"segmentation.root not found: {root}")
    records = segmentation_records(root, cfg)
    notes = []
    if s.split_file or s.split_column:
        kw = {"split_file": s.split_file} if s.split_file else {"column": s.split_column, "test_values": list(s.test_values), "val_values": list(s.val_values)}
        train = split_records(records, "train", **kw)
        val = split_records(records, "val", **kw)
        test = split_records(records, "test", **kw)
    else:
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(len(records)).tolist()
        n_test = max(1, len(records) // 5)
        n_val = max(1, len(records) // 5)
        test = [records[i] for i in order[:n_test]]
        val = [records[i] for i in order[n_test : n_test + n_val]]
        train = [records[i] for i in order[n_test + n_val :]]
        notes.append(f"no split given: {len(train)}/{len(val)}/{len(test)} images for train/val/test (seeded)")
    if not val:
        rng = np.random.default_rng(cfg.seed)
        k = max(1, int(round(len(train) * cfg.data.val_fraction)))
        pick = set(rng.permutation(len(train))[:k].tolist())
        val = [r for i, r in enumerate(train) if i in pick]
        train = [r for i, r in enumerate(train) if i not in pick]
        notes.append(f"validation: {len(val)} images held out of the training images (seeded)")
    if not train:
        raise ValueError("no training images in the segmentation split")
    tr = SegmentationDataset(train, crop=s.crop, augment=True, samples_per_image=s.samples_per_image, scale=s.scale)
    va = SegmentationDataset(val, scale=s.scale)
    te = SegmentationDataset(test, scale=s.scale) if test else None
    centres = sorted({r.centre for r in records})
    notes.append(f"segmentation: {len(train)} training, {len(val)} validation, {len(test)} test images")
    return SegmentationData(tr, va, te, ["nucleus"], centres, sorted({r.centre for r in train}), notes)


def segmentation_records(root: Path, cfg: Config) -> list:
    """Image-mask pairs of a folder: MoNuSeg's layout (``metadata.csv``, centres from its tss_code
    column) or ``images/`` and ``masks/`` (``segmentation.images`` / ``segmentation.masks``)."""
    s = cfg.segmentation
    masks = s.masks if (root / s.masks).is_dir() else "masks"
    if (root / "metadata.csv").is_file():
        return monuseg_records(root, masks=masks)
    return pair_images_masks(root / s.images, root / masks)


def build_data(cfg: Config) -> ClassificationData | SegmentationData:
    """The data of a run's task."""
    if cfg.task == "segmentation":
        return build_segmentation_data(cfg)
    return build_classification_data(cfg, cfg.seed)


def sample_tiles(data: ClassificationData | SegmentationData, n: int, crop: int = 256, with_stats: bool = False):
    """Up to ``n`` validation (and test) tiles of a run's data, round-robin over (class, centre),
    cropped to one square size of at most ``crop``: ``(n, 3, s, s)``, or None without tiles;
    ``with_stats``: ``(tiles, their pooled statistics or None)``."""
    pools: dict[tuple, list] = {}
    for ds in (data.val, data.test):
        if ds is None:
            continue
        centres = getattr(ds, "centres", None) or [""] * len(ds)
        labels = getattr(ds, "labels", None) or [0] * len(ds)
        for i in range(len(ds)):
            pools.setdefault((centres[i], labels[i]), []).append((ds, i))
    picks = round_robin([pools[k] for k in sorted(pools, key=lambda k: (k[1], k[0]))], n)
    items = [it for it in (ds[i] for ds, i in picks) if it["image"] is not None]
    if not items:
        return None
    size = min(crop, *(min(it["image"].shape[-2:]) for it in items))
    x = torch.stack([it["image"][:, :size, :size] for it in items])
    if with_stats:  # the items' pooled statistics (norm.stats_by), as collate_tiles stacks them; None without
        return x, stack_stats(items)
    return x


def flips(x: torch.Tensor, seed: int, epoch: int, batch_idx: int, hflip: bool, vflip: bool) -> torch.Tensor:
    """Random horizontal/vertical flips from a generator seeded by (seed, epoch, batch): reproducible on resume."""
    if not (hflip or vflip) or x.shape[0] == 0:
        return x
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, batch_idx]).generate_state(1)[0]))
    h, v = torch.rand(2, x.shape[0], generator=g).to(x.device) < 0.5
    if hflip:
        x = torch.where(h.view(-1, 1, 1, 1), x.flip(-1), x)
    if vflip:
        x = torch.where(v.view(-1, 1, 1, 1), x.flip(-2), x)
    return x


def centre_index(names: Sequence[str], centres: Sequence[str]) -> torch.Tensor:
    lookup = {c: i for i, c in enumerate(centres)}
    return torch.tensor([lookup.get(n, -1) for n in names], dtype=torch.long)
