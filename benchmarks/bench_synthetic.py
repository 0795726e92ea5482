"""The synthetic multi-centre benchmark: generator speed and calibration of the stain shift.

    python benchmarks/bench_synthetic.py [--seeds 2] [--per-class 200] [--quick]

1. Speed: tiles per second at 96 x 96, rendering in memory with 2 worker processes and
   writing PNGs with `write_synthetic` (target >= 200 tiles/s on 2 cores).
2. Calibration: a small CNN (4 conv blocks, no normalisation) trained on centre A alone must
   reach >= 90 % on A's test tiles and <= 75 % on every other centre (the stain shift hurts),
   while the same CNN trained on all centres must reach >= 90 % on every centre (the classes
   are separable by morphology). Writes bench_out/synthetic.{md,json}.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, save  # noqa: E402

from lstainnorm.data.synthetic import SyntheticHE, SyntheticTiles, write_synthetic  # noqa: E402


def _render_chunk(args):
    seed, size, jobs = args
    gen = SyntheticHE(size=size, seed=seed)
    return sum(gen.render(k, c, i)[0].shape[0] for c, k, i in jobs)


def speed(n: int = 2000, size: int = 96, workers: int = 2) -> dict:
    jobs = [(i % 4, i % 6, i) for i in range(n)]
    chunks = [(0, size, jobs[i::workers]) for i in range(workers)]
    ctx = mp.get_context("fork")
    t = time.perf_counter()
    with ctx.Pool(workers) as pool:
        pool.map(_render_chunk, chunks)
    render = n / (time.perf_counter() - t)
    tmp = Path(tempfile.mkdtemp())
    try:
        per_class = max(3, n // 24)
        t = time.perf_counter()
        write_synthetic(tmp / "s", centres=4, per_class=per_class, size=size, workers=workers, progress=False)
        written = 4 * 6 * per_class / (time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"render_tiles_per_s": render, "write_tiles_per_s": written, "workers": workers, "size": size}


def small_cnn(n_classes: int) -> nn.Module:
    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(
        block(3, 16), block(16, 32), block(32, 64), block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, n_classes)
    )


def _tensors(ds: SyntheticTiles) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(ds.images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(ds.labels_)


def train_cnn(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = small_cnn(int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            xb = x[idx]
            if torch.rand(()) < 0.5:
                xb = xb.flip(3)
            if torch.rand(()) < 0.5:
                xb = xb.flip(2)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def calibrate(per_class: int, seeds: list[int], epochs_one: int, epochs_all: int) -> dict:
    gen = SyntheticHE(size=96, seed=0)
    names = gen.centre_names
    train = {c: _tensors(SyntheticTiles(gen, "train", per_class, centres=[c])) for c in names}
    test = {c: _tensors(SyntheticTiles(gen, "test", per_class, centres=[c])) for c in names}
    xa, ya = train["A"]
    xall = torch.cat([train[c][0] for c in names])
    yall = torch.cat([train[c][1] for c in names])
    res: dict = {"one_centre": {c: [] for c in names}, "all_centres": {c: [] for c in names}}
    for s in seeds:
        m = train_cnn(xa, ya, epochs_one, s)
        for c in names:
            res["one_centre"][c].append(accuracy(m, *test[c]))
        m = train_cnn(xall, yall, epochs_all, s)
        for c in names:
            res["all_centres"][c].append(accuracy(m, *test[c]))
    res["n_train_per_centre"] = len(ya)
    res["n_test_per_centre"] = len(test["A"][1])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    n, epochs_one, epochs_all = 2000, 30, 8
    if args.quick:
        n, args.per_class, args.seeds, epochs_one, epochs_all = 96, 10, 1, 1, 1
    sp = speed(n)
    cal = calibrate(args.per_class, list(range(args.seeds)), epochs_one, epochs_all)

    def mean(v):
        return float(np.mean(v))

    names = list(cal["one_centre"])
    rows = [
        ["trained on A only"] + [f"{100 * mean(cal['one_centre'][c]):.1f}" for c in names],
        ["trained on all centres"] + [f"{100 * mean(cal['all_centres'][c]):.1f}" for c in names],
    ]
    ok_in = mean(cal["one_centre"]["A"]) >= 0.90
    ok_cross = all(mean(cal["one_centre"][c]) <= 0.75 for c in names if c != "A")
    ok_all = all(mean(cal["all_centres"][c]) >= 0.90 for c in names)
    text = (
        f"{machine()}.\n\n"
        + markdown_table(
            ["generator (96 x 96)", "tiles/s", "target"],
            [
                ["render in memory, 2 processes", sp["render_tiles_per_s"], ">= 200"],
                ["write_synthetic (PNG + manifest), 2 processes", sp["write_tiles_per_s"], "-"],
            ],
        )
        + f"\n\nCalibration: test accuracy (%) per centre, small CNN without normalisation, mean of "
        f"{len(cal['one_centre']['A'])} seed(s); {cal['n_train_per_centre']} training and "
        f"{cal['n_test_per_centre']} test tiles per centre.\n\n"
        + markdown_table(["training data"] + [f"centre {c}" for c in names], rows)
        + "\n\n"
        + markdown_table(
            ["check", "met"],
            [
                ["one centre: in-centre >= 90 %", "yes" if ok_in else "NO"],
                ["one centre: every other centre <= 75 %", "yes" if ok_cross else "NO"],
                ["all centres: every centre >= 90 %", "yes" if ok_all else "NO"],
            ],
        )
    )
    print(text)
    save("synthetic", text, {"speed": sp, "calibration": cal})


if __name__ == "__main__":
    main()
