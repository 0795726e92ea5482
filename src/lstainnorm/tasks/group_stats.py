"""Colour statistics per centre or per slide instead of per tile (``norm.stats_by``).

The layers standardise each tile by its own mean and std. On crops centred on one object (a
mitotic figure) those statistics are partly the object's, so the standardisation removes some
of what the network should see. With ``norm.stats_by: centre`` (or ``group``: a manifest's group
column, e.g. the slide) every tile of a centre is standardised by the statistics pooled over all
of that centre's tiles in its split: one colour map per scanner, which undoes the scanner's
colours and keeps the differences between tiles. Each split's statistics come from that split's
own tiles, so a held-out centre is described by its own images (unlabelled, as a new hospital's
would be) and never by the training set's.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..layers.fusion import norm_spaces
from ..layers.norm import PooledStats

__all__ = ["STATS_BY", "group_statistics", "WithGroupStats", "with_group_stats"]

STATS_BY = ("centre", "group")


def _key(item: dict, by: str) -> str:
    key = item.get(by)
    if not key:
        raise ValueError(f"norm.stats_by={by}: tile {item.get('path', '?')} has no {by} "
                         f"(tiles need a CSV manifest with a {by} column, data.columns naming it; a folder tree has none)")
    return str(key)


@torch.no_grad()
def group_statistics(ds: Dataset, norm: nn.Module, by: str, tissue: bool = False, batch_size: int = 64) -> dict[str, dict]:
    """``{centre or group: {space: (mean, std)}}`` pooled over the tiles of ``ds`` (dict items with
    ``image`` and ``by``; unreadable tiles, ``image`` None, are left out)."""
    if by not in STATS_BY:
        raise ValueError(f"norm.stats_by: invalid value {by!r}; choose one of {list(STATS_BY)}")
    spaces = norm_spaces(norm, f"norm.stats_by={by}")
    pooled: dict[str, PooledStats] = defaultdict(lambda: PooledStats(spaces, tissue=tissue))
    for items in DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=list):
        by_key: dict[str, list[torch.Tensor]] = defaultdict(list)
        for it in items:
            if it["image"] is not None:
                by_key[_key(it, by)].append(it["image"])
        for k, imgs in by_key.items():
            pooled[k].add(torch.stack(imgs).float())
    return {k: p.result() for k, p in pooled.items()}


class WithGroupStats(Dataset):
    """``ds`` whose items carry ``stats``: their centre's (or group's) pooled statistics."""

    def __init__(self, ds: Dataset, table: dict[str, dict], by: str) -> None:
        self.ds, self.table, self.by = ds, table, by

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: Any) -> dict:
        item = self.ds[i]
        if item.get("image") is not None:
            item["stats"] = self.table[_key(item, self.by)]
        return item

    def __getattr__(self, name: str):  # records, labels, centres, classes ... of the wrapped set
        if name in ("ds", "table", "by"):  # unpickling (DataLoader workers): not yet set
            raise AttributeError(name)
        return getattr(self.ds, name)


def with_group_stats(ds: Dataset, norm: nn.Module, by: str | None, tissue: bool = False) -> Dataset:
    """``ds`` itself when ``by`` is None, else :class:`WithGroupStats` over its own statistics."""
    if by is None or ds is None:
        return ds
    return WithGroupStats(ds, group_statistics(ds, norm, by, tissue=tissue), by)

