"""Is a cross-centre failure in the normaliser's output or in the trained network? Swap them and see.

Given trained classification runs (e.g. `template` and `reinhard` on the same seed), every run's
network is evaluated behind every run's normalisation layer on the same test tiles. If a network
fails behind every normaliser, the failure lives in its weights (what it learned from the training
centre), not in the images the normaliser hands it; if it fails only behind one normaliser, the
normaliser's output is the cause. Also reports how far the normalisers' outputs differ (mean
absolute difference in 8-bit levels).

    .venv/bin/python benchmarks/swap_norm.py RUN [RUN ...] --manifest M.csv --split test --centres B C D

Needs no training; each network sees the test tiles once per normaliser (seconds to a minute on a CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lstainnorm.data.tiles import TileFolder, collate_tiles
from lstainnorm.experiments.runner import markdown_table
from lstainnorm.tasks.evaluate import load_module


def swap(mods: list, loader) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, int]:
    """Every module's network behind every module's normaliser, on the tiles of ``loader``.

    Returns ``correct[i, j]`` (tiles that network ``i`` classifies right behind normaliser ``j``),
    ``per_centre[c][i, j] = (correct, total)``, ``diff[i, j]`` (summed per-tile mean |norm_i - norm_j|
    in 8-bit levels) and the number of tiles."""
    k = len(mods)
    per_centre: dict[str, torch.Tensor] = {}
    diff = torch.zeros(k, k, dtype=torch.float64)
    with torch.no_grad():
        for batch in loader:
            x, y, centres = batch["image"], batch["label"], batch["centre"]
            normed = [m.norm(x) for m in mods]
            for j in range(k):
                for i in range(j):  # symmetric, zero on the diagonal
                    d = (normed[i] - normed[j]).abs().mean(dim=(1, 2, 3)).sum().double() * 255
                    diff[i, j] += d
                    diff[j, i] += d
                hits = torch.stack([m.net(normed[j]).argmax(1) == y for m in mods])  # (network, tile)
                for c in set(centres):
                    sel = torch.tensor([cc == c for cc in centres])
                    pc = per_centre.setdefault(c, torch.zeros(k, k, 2, dtype=torch.long))
                    pc[:, j, 0] += hits[:, sel].sum(dim=1)
                    pc[:, j, 1] += int(sel.sum())
    if not per_centre:
        raise ValueError("no readable tiles to evaluate")
    total = sum(per_centre.values())
    return total[..., 0], per_centre, diff, int(total[0, 0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="trained classification run folders (or checkpoints)")
    ap.add_argument("--manifest", required=True, help="the benchmark's manifest CSV")
    ap.add_argument("--split", default="test")
    ap.add_argument("--centres", nargs="*", default=None, help="centres to evaluate (default: all in the split)")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()

    mods = [load_module(r) for r in args.runs]
    names = [m.cfg.postfix or Path(r).name for r, m in zip(args.runs, mods)]
    classes = mods[0].classes
    for n, m in zip(names, mods):
        if m.cfg.task != "classification":
            raise SystemExit(f"{n}: a {m.cfg.task} run; this check swaps classifiers' normalisers")
        if list(m.classes) != list(classes):
            raise SystemExit(f"{n}: classes {m.classes} differ from {names[0]}'s {classes}")
    ds = TileFolder.from_manifest(args.manifest, split=args.split, centres=args.centres, classes=classes)
    loader = DataLoader(ds, batch_size=args.batch, shuffle=False, collate_fn=collate_tiles)
    correct, per_centre, diff, n = swap(mods, loader)
    k = len(mods)

    cs = sorted(per_centre)
    print(f"{n} tiles ({args.split}, centres {' '.join(cs)}); accuracy %, rows: network of run, columns: normaliser of run "
          f"(per centre {' / '.join(cs)} in brackets)\n")
    acc = [[f"{100 * correct[i, j] / n:.1f} (" + " / ".join(f"{100 * per_centre[c][i, j, 0] / per_centre[c][i, j, 1]:.0f}" for c in cs) + ")"
            for j in range(k)] for i in range(k)]
    print(markdown_table(["network \\ normaliser", *names], [[names[i], *acc[i]] for i in range(k)]))
    print("\nMean absolute difference between the normalisers' outputs (8-bit levels):\n")
    print(markdown_table(["", *names], [[names[i], *(f"{diff[i, j] / n:.2f}" for j in range(k))] for i in range(k)]))


if __name__ == "__main__":
    main()
