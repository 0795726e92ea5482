"""Cost per pixel against tile size: LStainNorm forward+backward (eager, float32) on many small
tiles and on one large tile of the same number of pixels, and the peak memory of one large tile.

    python benchmarks/bench_tile_size.py            # 21 x 224^2 vs 1 x 1024^2; peak RSS of 2048^2

Issue 13's targets: per-pixel time of a 1024 x 1024 tile at most 1.5x that of 224 x 224 tiles,
and a 2048 x 2048 tile's forward+backward under 2 GB. Memory is the peak RSS growth of a fresh
process (Linux), so the tables of one run do not disturb each other.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, save, time_ms  # noqa: E402

import lstainnorm  # noqa: E402


def _fwd_bwd_ms(norm, x, repeats: int) -> float:
    def step():
        norm.zero_grad(set_to_none=True)
        norm(x).mean().backward()

    return time_ms(step, repeats)


def _peak_child(side: int) -> None:
    torch.set_num_threads(2)
    norm = lstainnorm.LStainNorm()
    x = torch.rand(1, 3, side, side) * 0.8 + 0.1
    status = Path("/proc/self/status")

    def kb(field):
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith(field + ":"))

    before = kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t = time.perf_counter()
    norm(x).mean().backward()
    print(json.dumps({"peak_mb": (kb("VmHWM") - before) / 1024, "seconds": time.perf_counter() - t}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=224)
    ap.add_argument("--large", type=int, default=1024)
    ap.add_argument("--memory-side", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peak_child:
        _peak_child(a.peak_child)
        return
    torch.set_num_threads(2)
    norm = lstainnorm.LStainNorm()
    n_small = max(1, round(a.large**2 / a.small**2))
    small = torch.rand(n_small, 3, a.small, a.small) * 0.8 + 0.1
    large = torch.rand(1, 3, a.large, a.large) * 0.8 + 0.1
    ns_small = _fwd_bwd_ms(norm, small, a.repeats) * 1e6 / small[:, 0].numel()
    ns_large = _fwd_bwd_ms(norm, large, a.repeats) * 1e6 / large[:, 0].numel()
    res = subprocess.run([sys.executable, __file__, "--peak-child", str(a.memory_side)], capture_output=True, text=True)
    peak = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {"peak_mb": None, "seconds": None}
    rows = [
        [f"{n_small} x {a.small}^2", ns_small, "-"],
        [f"1 x {a.large}^2", ns_large, f"{ns_large / ns_small:.2f} (target <= 1.5)"],
    ]
    text = (
        f"LStainNorm forward+backward, eager float32, torch {torch.__version__}, 2 threads, median of {a.repeats}.\n\n"
        + markdown_table(["tiles", "ns / pixel", "ratio to small tiles"], rows)
        + f"\n\nOne {a.memory_side} x {a.memory_side} tile: peak RSS growth {peak['peak_mb']:.0f} MB (target < 2048), "
        f"{peak['seconds']:.1f} s."
    )
    print(text)
    save("tile_size", text, {"ns_per_pixel_small": ns_small, "ns_per_pixel_large": ns_large, **peak})


if __name__ == "__main__":
    main()
