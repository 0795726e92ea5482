"""Datasets and loaders of a classification run, built from the config."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.tiles import TileFolder, collate_tiles, stratified_split

__all__ = ["ClassificationData", "EpochShuffleSampler", "build_classification_data", "resize_transform"]

log = logging.getLogger("lstainnorm")


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a generator seeded by ``(seed, epoch)``: the order of an epoch does not
    depend on the global RNG, so a resumed run sees the same batches as an uninterrupted one.
    Lightning calls :meth:`set_epoch` (and wraps it for DDP)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        return iter(rng.permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


def resize_transform(size: int | None):
    if size is None:
        return None

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

    def loaders(self, cfg: DictConfig, seed: int) -> tuple[DataLoader, DataLoader, DataLoader | None]:
        d = cfg.data
        kw = {"num_workers": d.num_workers, "collate_fn": collate_tiles, "persistent_workers": d.num_workers > 0}
        ev = d.eval_batch_size or d.batch_size
        train = DataLoader(self.train, batch_size=d.batch_size, sampler=EpochShuffleSampler(len(self.train), seed), drop_last=False, **kw)
        val = DataLoader(self.val, batch_size=ev, shuffle=False, **kw)
        test = DataLoader(self.test, batch_size=ev, shuffle=False, **kw) if self.test is not None else None
        return train, val, test


def _check_nonempty(ds: Dataset, what: str) -> None:
    if len(ds) == 0:
        raise ValueError(f"{what} is empty")


def build_classification_data(cfg: DictConfig, seed: int) -> ClassificationData:
    """Training, validation and test tiles from folders or a manifest (see :class:`DataConfig`)."""
    d = cfg.data
    tf = resize_transform(d.image_size)
    notes: list[str] = []
    if d.manifest:
        tc = list(d.train_centres) if d.train_centres else None
        train = TileFolder.from_manifest(d.manifest, split="train", centres=tc, transform=tf, strict=d.strict)
        classes = train.classes
        vc = list(d.val_centres) if d.val_centres else tc
        try:
            val = TileFolder.from_manifest(d.manifest, split="val", centres=vc, classes=classes, transform=tf, strict=d.strict)
        except ValueError:
            val = None
        test_c = list(d.test_centres) if d.test_centres else None
        test = TileFolder.from_manifest(d.manifest, split="test", centres=test_c, classes=classes, transform=tf, strict=d.strict)
        train_centres = sorted(set(train.centres))
    else:
        if not d.train:
            raise ValueError("data.train (a class-folder tree) or data.manifest is required")
        train = TileFolder(d.train, transform=tf, strict=d.strict)
        classes = train.classes
        val = TileFolder(d.val, classes=classes, transform=tf, strict=d.strict) if d.val else None
        test = TileFolder(d.test, classes=classes, transform=tf, strict=d.strict) if d.test else None
        train_centres = sorted(set(train.centres))
    if val is None:
        tr_idx, va_idx = stratified_split(train.labels, d.val_fraction, seed)
        val = train.subset(va_idx)
        train = train.subset(tr_idx)
        notes.append(f"validation: {len(val)} tiles held out of the training set (stratified, val_fraction={d.val_fraction}, seed={seed})")
    _check_nonempty(train, "the training set")
    _check_nonempty(val, "the validation set")
    centres = sorted({c for ds in (train, val, test) if ds is not None for c in ds.centres})
    return ClassificationData(train, val, test, classes, centres, train_centres, notes)


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
