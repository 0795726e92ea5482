"""Where LStainNorm's training cost goes (the profile behind BENCHMARKS.md's training-cost section).

    python benchmarks/profile_layer.py [--batch 32] [--repeats 3]

1. Eager: how many tensors autograd saves for the backward pass (counted with
   ``torch.autograd.graph.saved_tensors_hooks``), in units of one full-size (B, 3, H, W) image.
2. Compiled: torch.profiler's split of forward+backward into the compiled forward graph, the
   compiled backward graph and everything else, against the compiled forward without autograd.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_tiles, markdown_table  # noqa: E402

import lstainnorm  # noqa: E402


def saved_tensors(x: torch.Tensor) -> tuple[int, float]:
    """Number of distinct saved storages and their size in full-size images."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    norm = lstainnorm.LStainNorm()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        norm(x)
    return len(seen), sum(seen.values()) / (x.numel() * x.element_size())


def compiled_split(x: torch.Tensor, repeats: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    norm = lstainnorm.LStainNorm().enable_compile()

    def fwd_bwd():
        norm.zero_grad(set_to_none=True)
        norm(x).mean().backward()

    for _ in range(2):
        fwd_bwd()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fwd_bwd()
    total = fwd = bwd = 0.0
    for ev in prof.key_averages():
        if ev.key == "CompiledFunction":
            fwd += ev.cpu_time_total
        elif ev.key == "CompiledFunctionBackward":
            bwd += ev.cpu_time_total
    total = sum(ev.self_cpu_time_total for ev in prof.key_averages())
    with torch.no_grad():
        norm(x)
        t = time.perf_counter()
        for _ in range(repeats):
            norm(x)
        infer = (time.perf_counter() - t) / repeats
    per_tile = 1.0 / (repeats * x.shape[0] * 1000.0)  # profiler times are in microseconds
    return {"forward graph (with autograd)": fwd * per_tile, "backward graph": bwd * per_tile,
            "everything else": (total - fwd - bwd) * per_tile, "forward without autograd": infer * 1000.0 / x.shape[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    x, source = load_tiles(a.batch)
    n, images = saved_tensors(x)
    split = compiled_split(x, a.repeats)
    print(f"LStainNorm, batch {x.shape[0]} of 224 x 224 tiles ({source}), torch {torch.__version__}, 2 threads.\n")
    print(f"Eager: autograd saves {n} tensors for the backward pass, {images:.1f} full-size images in all.\n")
    print(markdown_table(["compiled forward+backward", "ms / tile"], [[k, v] for k, v in split.items()]))


if __name__ == "__main__":
    main()
