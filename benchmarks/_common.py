"""Helpers shared by the benchmarks: real tiles when ../shared/data is there, timing, tables."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LSTAINNORM_SHARED_DATA", REPO.parent / "shared" / "data"))
OUT = REPO / "bench_out"


def load_tiles(n: int = 64, size: int = 224, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``n`` RGB tiles (float, [0, 1]): crops of the MoNuSeg images if present, else synthetic."""
    folder = SHARED / "monuseg-train" / "images"
    if folder.is_dir():
        from PIL import Image

        tiles = []
        files = sorted(folder.glob("*.png"))
        per = max(1, -(-n // len(files)))
        rng = np.random.default_rng(seed)
        for f in files:
            a = np.asarray(Image.open(f).convert("RGB"))
            for _ in range(per):
                i, j = rng.integers(0, a.shape[0] - size), rng.integers(0, a.shape[1] - size)
                tiles.append(a[i : i + size, j : j + size])
        arr = np.stack(tiles[:n])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255).contiguous(), f"{n} real MoNuSeg crops"
    from lstainnorm.data.synthetic import SyntheticHE

    gen = SyntheticHE(size=size, seed=seed)
    x = torch.stack([gen.render(i % gen.n_classes, i % gen.n_centres, i)[0] for i in range(n)])
    return x, f"{n} synthetic tiles (../shared/data absent)"


def time_ms(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def save(name: str, text: str, data: object) -> Path:
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.md").write_text(text + "\n")
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=2))
    return OUT / f"{name}.md"


def machine() -> str:
    import platform

    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
