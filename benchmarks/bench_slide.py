"""Whole-slide normalisation: throughput and peak memory on a generated 20000 x 20000 slide.

    python benchmarks/bench_slide.py [--size 20000] [--threads 2] [--keep]

1. Writes a tiled, pyramidal, JPEG-compressed TIFF of synthetic H&E (a bank of rendered
   256 x 256 tiles laid out at random, with glass) of SIZE x SIZE pixels.
2. Normalises it with `normalize_slide` (LStainNorm, attention window 224, slide statistics)
   in a fresh process, and records wall time (megapixels per second) and peak memory
   (peak RSS of that process).
3. Measures the layer's in-memory throughput on 224 x 224 tiles at batch 64, same threads.
Targets: peak memory < 2 GB; slide throughput >= 80 % of the in-memory throughput.
Writes bench_out/slide.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, save, time_ms  # noqa: E402


def make_slide(path: Path, size: int, seed: int = 0) -> None:
    import tifffile

    from lstainnorm.data.synthetic import SyntheticHE

    gen = SyntheticHE(size=256, seed=seed)
    bank = [gen.render(k % 6, k % 4, k)[0] for k in range(48)]
    glass = np.full((256, 256, 3), 242, np.uint8)
    rng = np.random.default_rng(seed)
    n = -(-size // 256)
    layout = rng.integers(0, len(bank), size=(n, n))
    cy, cx = np.mgrid[0:n, 0:n]
    inside = ((cy - n / 2) ** 2 + (cx - n / 2) ** 2) < (0.45 * n) ** 2  # a round piece of tissue on glass

    def small(t: np.ndarray, div: int) -> np.ndarray:
        s = 256 // div
        return t.reshape(s, div, s, div, 3).mean(axis=(1, 3)).astype(np.uint8)

    def source(i: int, j: int) -> np.ndarray:
        if i >= n or j >= n or not inside[i, j]:
            return glass
        return bank[layout[i, j]]

    def tiles(div: int):
        # Level k of the pyramid: each 256 x 256 tile averages div x div level-0 tiles.
        m = -(-size // (256 * div))
        for i in range(m):
            for j in range(m):
                if div == 1:
                    yield source(i, j)
                    continue
                s = 256 // div
                out = np.empty((256, 256, 3), np.uint8)
                for a in range(div):
                    for b in range(div):
                        out[a * s : (a + 1) * s, b * s : (b + 1) * s] = small(source(i * div + a, j * div + b), div)
                yield out

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        opts = {"tile": (256, 256), "photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": 90}, "dtype": np.uint8}
        tw.write(tiles(1), shape=(size, size, 3), **opts)
        div = 2
        while size // div >= 512 and div <= 256:
            tw.write(tiles(div), shape=(size // div, size // div, 3), subfiletype=1, **opts)
            div *= 2


def child(src: str, dst: str, threads: int) -> None:
    torch.set_num_threads(threads)
    from lstainnorm import LStainNorm
    from lstainnorm.apply.slides import normalize_slide

    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    norm = LStainNorm().eval()
    t = time.perf_counter()
    info = normalize_slide(norm, src, dst, tile=1792, window=224, progress=False)
    info["seconds"] = time.perf_counter() - t
    info["peak_rss_mb"] = status("VmHWM") / 1024
    print(json.dumps(info))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the generated slide and its output")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.threads)
        return
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="lstainnorm-slide-"))
    src, dst = tmp / "slide.tif", tmp / "normalised.tif"
    t = time.perf_counter()
    make_slide(src, a.size)
    print(f"generated {a.size} x {a.size} slide in {time.perf_counter() - t:.0f} s ({src.stat().st_size / 2**20:.0f} MB)", file=sys.stderr)
    res = subprocess.run([sys.executable, __file__, "--child", str(src), str(dst), "--threads", str(a.threads)], capture_output=True, text=True)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if not line:
        raise SystemExit(f"slide normalisation failed:\n{res.stderr[-3000:]}")
    info = json.loads(line[-1])
    mp = a.size * a.size / 1e6
    slide_mps = mp / info["seconds"]

    from lstainnorm import LStainNorm

    norm = LStainNorm().eval()
    x = torch.rand(64, 3, 224, 224) * 0.6 + 0.3
    with torch.no_grad():
        ms = time_ms(lambda: norm(x), repeats=3)
    mem_mps = 64 * 224 * 224 / 1e6 / (ms / 1000)
    ratio = slide_mps / mem_mps
    rows = [
        ["slide: statistics + normalisation + pyramidal TIFF", f"{info['seconds']:.0f} s", slide_mps, info["peak_rss_mb"]],
        ["layer in memory, 224 x 224 tiles, batch 64", f"{ms:.0f} ms / batch", mem_mps, "-"],
    ]
    text = (
        f"Generated {a.size} x {a.size} pyramidal JPEG TIFF of synthetic H&E ({mp:.0f} megapixels, tissue fraction "
        f"{info['tissue_fraction']:.2f}); LStainNorm (eager, attention window 224), {a.threads} threads; {machine()}.\n\n"
        + markdown_table(["what", "time", "megapixels / s", "peak memory (MB)"], rows)
        + "\n\n"
        + markdown_table(
            ["target", "value", "wanted", "met"],
            [
                ["peak memory", f"{info['peak_rss_mb']:.0f} MB", "< 2048 MB", "yes" if info["peak_rss_mb"] < 2048 else "NO"],
                ["slide / in-memory throughput", f"{ratio:.2f}", ">= 0.80", "yes" if ratio >= 0.8 else "NO"],
            ],
        )
    )
    print(text)
    save("slide", text, {"slide": info, "slide_mps": slide_mps, "in_memory_mps": mem_mps, "ratio": ratio, "size": a.size})
    if not a.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept: {tmp}", file=sys.stderr)


if __name__ == "__main__":
    main()
