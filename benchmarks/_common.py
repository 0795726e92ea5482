"""Helpers shared by the benchmark scripts (thin wrappers over lstainnorm.experiments)."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Callable

import torch

from lstainnorm.experiments.runner import markdown_table, median_ms
from suites.speed import load_benchmark_tiles

REPO = Path(__file__).resolve().parents[1]
# The literal transcription of the reference lives with the tests (it is not part of the package).
sys.path.insert(0, str(REPO / "tests"))
SHARED = Path(os.environ.get("LSTAINNORM_SHARED_DATA", REPO.parent / "shared" / "data"))
OUT = REPO / "bench_out"

__all__ = ["load_tiles", "time_ms", "markdown_table", "save", "machine", "status_kb", "OUT", "SHARED"]


def load_tiles(n: int = 64, size: int = 224, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``n`` RGB tiles in [0, 1]: crops of the MoNuSeg images in ../shared/data if present, else synthetic."""
    folder = SHARED / "monuseg-train" / "images"
    return load_benchmark_tiles(n, size, folder if folder.is_dir() else None, seed)


def time_ms(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    return median_ms(fn, repeats, warmup)


def save(name: str, text: str, data: object) -> Path:
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.md").write_text(text + "\n")
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    return OUT / f"{name}.md"


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``; Linux): the memory benchmarks' measure."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
