"""Cost per pixel against tile size: LStainNorm forward+backward (float32) on many small tiles
and on one large tile of the same number of pixels, the peak memory of one large tile in
training (eager and compiled), and inference on a large region (whole or strip by strip).

    python benchmarks/bench_tile_size.py            # 21 x 224^2 vs 1 x 1024^2; 2048^2; 4000^2
    python benchmarks/bench_tile_size.py --small 32 --large 64 --memory-side 64 --region 96 --repeats 1 --no-compile  # smoke test

The targets: per-pixel time of a 1024 x 1024 tile at most 1.5x that of 224 x 224 tiles,
and a 2048 x 2048 tile's forward+backward under 2 GB. Memory is the peak RSS growth of a fresh
process (Linux), so the rows of one run do not disturb each other.
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


def _peak_child(side: int, mode: str) -> None:
    """Peak RSS growth and seconds of one ``side`` x ``side`` image in a fresh process. Modes:
    ``eager``/``compiled`` forward+backward (compiled: the second call, after compiling), and
    ``infer-strips``/``infer-whole`` inference (the whole-image path forced for comparison)."""
    from lstainnorm.layers import norm as norm_mod

    torch.set_num_threads(2)
    norm = lstainnorm.LStainNorm()
    x = torch.rand(1, 3, side, side) * 0.8 + 0.1
    status = Path("/proc/self/status")

    def kb(field):
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith(field + ":"))

    def train_step():
        norm.zero_grad(set_to_none=True)
        norm(x).mean().backward()

    if mode == "compiled":
        norm.enable_compile()
        train_step()  # compiles
    if mode == "infer-whole":
        norm_mod.LARGE_IMAGE_PIXELS = side * side  # not above it: the whole-image path
    before = kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t = time.perf_counter()
    if mode.startswith("infer"):
        with torch.no_grad():
            norm(x)
    else:
        train_step()
    print(json.dumps({"peak_mb": (kb("VmHWM") - before) / 1024, "seconds": time.perf_counter() - t}))


def _child(side: int, mode: str) -> dict:
    res = subprocess.run([sys.executable, __file__, "--peak-child", str(side), mode], capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr[-2000:], file=sys.stderr)
        return {"peak_mb": float("nan"), "seconds": float("nan")}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=224)
    ap.add_argument("--large", type=int, default=1024)
    ap.add_argument("--memory-side", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--region", type=int, default=4000, help="side of the inference region")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled memory row (compiling takes a minute or more)")
    ap.add_argument("--peak-child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peak_child:
        _peak_child(int(a.peak_child[0]), a.peak_child[1])
        return
    torch.set_num_threads(2)
    norm = lstainnorm.LStainNorm()
    n_small = max(1, round(a.large**2 / a.small**2))
    small = torch.rand(n_small, 3, a.small, a.small) * 0.8 + 0.1
    large = torch.rand(1, 3, a.large, a.large) * 0.8 + 0.1
    ns_small = _fwd_bwd_ms(norm, small, a.repeats) * 1e6 / small[:, 0].numel()
    ns_large = _fwd_bwd_ms(norm, large, a.repeats) * 1e6 / large[:, 0].numel()
    with torch.no_grad():
        infer_small = time_ms(lambda: norm(small), a.repeats) * 1e6 / small[:, 0].numel()
    mem = {mode: _child(a.memory_side, mode) for mode in (("eager",) if a.no_compile else ("eager", "compiled"))}
    region = {mode: _child(a.region, mode) for mode in ("infer-strips", "infer-whole")}
    rows = [
        [f"{n_small} x {a.small}^2", ns_small, "-"],
        [f"1 x {a.large}^2", ns_large, f"{ns_large / ns_small:.2f} (target <= 1.5)"],
    ]
    side = a.memory_side
    mem_rows = [[f"{side} x {side}, forward+backward, {m}", f"{r['seconds']:.1f} s", f"{r['peak_mb']:.0f}",
                 "yes" if r["peak_mb"] < 2048 else "no"] for m, r in mem.items()]
    pixels = a.region**2
    reg_rows = [[f"{a.region} x {a.region} inference, {m.split('-')[1]}", f"{r['seconds']:.1f} s",
                 f"{r['seconds'] * 1e9 / pixels / infer_small:.2f}", f"{r['peak_mb']:.0f}"] for m, r in region.items()]
    text = (
        f"LStainNorm float32, torch {torch.__version__}, 2 threads, median of {a.repeats}; forward+backward, eager:\n\n"
        + markdown_table(["tiles", "ns / pixel", "ratio to small tiles"], rows)
        + "\n\nOne large image in a fresh process (compiled: the call after the one that compiled):\n\n"
        + markdown_table(["what", "time", "peak RSS growth (MB)", "< 2048 MB"], mem_rows)
        + "\n\n"
        + markdown_table(["what", "time", f"per pixel / {a.small}^2 tiles' inference", "peak RSS growth (MB)"], reg_rows)
    )
    print(text)
    save("tile_size", text, {"ns_per_pixel_small": ns_small, "ns_per_pixel_large": ns_large,
                             "infer_ns_per_pixel_small": infer_small, "memory": mem, "region": region})


if __name__ == "__main__":
    main()
