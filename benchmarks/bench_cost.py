"""The layer's training cost: targets 1-3, each printed met / not met, in one run.

    python benchmarks/bench_cost.py                 # ~10 min on 2 CPU cores (with the compiled row)
    python benchmarks/bench_cost.py --no-compile    # ~7 min, eager rows only
    python benchmarks/bench_cost.py --quick         # smoke test: tiny sizes, numbers meaningless

1. Training step (forward, backward, AdamW) of a ResNet-18 at 224 x 224, batch 32, alone and
   with LStainNorm in front: eager with the closed-form backward (``train``'s mode below 500
   steps), eager through autograd (the code before it, as baseline) and compiled (``train``'s
   mode from 500 steps). Interleaved rounds, median. Target: <= 10 % in the default mode of
   any run length, i.e. eager and compiled both. The stain-aware options ride along (LStainNorm after
   a StainConcentrationNorm stage, learning its amounts or frozen; StainConcentrationNorm alone): their target is LStainNorm's
   own eager cost. A row with no layer but an input gradient measures the floor that any
   trainable layer in front of the network pays: the first convolution's gradient at its input,
   which the network alone never computes; a learnable Lab template is the cheapest such layer.
2. Peak memory (RSS growth in a fresh process, after a warm-up on one small crop so that library
   code paged in does not count) of one eager forward+backward of LStainNorm at batch 64 x 224 x 224
   (target <= 1 GB) and of one 2048 x 2048 image (target < 2 GB), closed form and autograd.
3. Outputs of the closed-form path equal autograd's; its float32 gradients are no further from
   the formulas (autograd in float64) than autograd's float32 gradients are, to 1e-5 of each
   tensor's largest value (every parameter and the input); ``gradcheck`` in float64.

The process sets glibc's allocator as ``lstainnorm`` commands do (:mod:`lstainnorm.allocator`).
Writes bench_out/cost.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

from _common import load_tiles, machine, markdown_table, save, status_kb  # noqa: E402

import lstainnorm  # noqa: E402
from lstainnorm.allocator import keep_freed_pages  # noqa: E402
from lstainnorm.layers.norm import closed_form_backward  # noqa: E402

TARGETS = {"step": 10.0, "peak_batch": 1024.0, "peak_2048": 2048.0, "rel_err": 1e-5}
# The stain-aware options, whose training cost is to be no more than LStainNorm's.
STAGED = "with LStainNorm after a StainConcentrationNorm stage (eager)"
STAGED_FROZEN = "with LStainNorm after a frozen StainConcentrationNorm stage (eager)"
STAIN_ALONE = "with StainConcentrationNorm alone (eager)"
# No layer, but a gradient at the input: the part of any trainable front layer's cost that is the network's.
FLOOR = "ResNet-18 with an input gradient (no layer)"
# The cheapest trainable layer the README offers (its "learnable" column).
LEARNABLE = "with a learnable Lab template (eager)"


class _InputGradient(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.detach().requires_grad_(True))


def memory_child(batch: int, size: int, closed: bool) -> None:
    """In a fresh process: peak RSS growth (MB) of one eager forward+backward."""
    torch.set_num_threads(2)
    keep_freed_pages()
    x = load_tiles(batch, size)[0] if size <= 1024 else torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    norm = lstainnorm.LStainNorm()
    with closed_form_backward(closed):  # warm-up on a small crop: library code paged in, thread pools up
        norm(x[:1, :, :64, :64]).mean().backward()
    norm.zero_grad(set_to_none=True)
    before = status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
    with closed_form_backward(closed):
        norm(x).mean().backward()
    print(json.dumps({"peak_mb": (status_kb("VmHWM") - before) / 1024}))


def measure_memory(batch: int, size: int, closed: bool) -> float | None:
    cmd = [sys.executable, __file__, "--memory-child", str(batch), str(size), "1" if closed else "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in res.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)["peak_mb"]
    print(f"memory run failed ({batch} x {size}): {res.stderr[-500:]}", file=sys.stderr)
    return None


def _grads(norm: torch.nn.Module, x: torch.Tensor, closed: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    with closed_form_backward(closed):
        out = norm(x)
        return out.detach(), list(torch.autograd.grad(out, [x, *norm.parameters()], g))


def gradient_check(x: torch.Tensor) -> dict:
    """Closed-form and autograd gradients in float32 against autograd in float64 (the formulas),
    on real tiles with perturbed parameters, every parameter and the input; gradcheck in float64.

    Errors are the largest difference over the largest float64 value, per tensor; the attention
    key's bias is left out (its true gradient is 0: a softmax ignores a shift of every key)."""
    torch.manual_seed(0)
    norm = lstainnorm.LStainNorm(spaces=("lab", "hsv", "rgb", "hed"))
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out, closed = _grads(norm, x, True)
    ref32, auto32 = _grads(norm, x, False)
    _, ref64 = _grads(copy.deepcopy(norm).double(), x.double(), False)
    names = ["input", *(n for n, _ in norm.named_parameters())]
    err_closed, err_auto = {}, {}
    for name, c, a, r in zip(names, closed, auto32, ref64):
        scale = float(r.abs().max())
        if name == "attention.key.bias" or scale == 0.0:
            continue
        err_closed[name] = float((c.double() - r).abs().max()) / scale
        err_auto[name] = float((a.double() - r).abs().max()) / scale
    excess = max(err_closed[k] - err_auto[k] for k in err_closed)
    small = lstainnorm.LStainNorm(spaces=("lab", "hsv", "rgb", "hed")).double()
    xd = torch.rand(1, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    ok = torch.autograd.gradcheck(lambda t, *p: small(t), (xd, *small.parameters()), eps=1e-6, atol=1e-4, rtol=1e-3, fast_mode=True)
    return {
        "output_max_diff": float((out - ref32).abs().max()),
        "closed_err": max(err_closed.values()),
        "autograd32_err": max(err_auto.values()),
        "excess": excess,
        "per_tensor": {k: (err_closed[k], err_auto[k]) for k in err_closed},
        "gradcheck_float64": bool(ok),
    }


def training_rows(x: torch.Tensor, repeats: int, compile: bool) -> list[dict]:
    import timm

    y = torch.arange(x.shape[0]) % 9
    variants = ["ResNet-18 alone", FLOOR, LEARNABLE, "with LStainNorm (eager, closed-form backward)", "with LStainNorm (eager, autograd backward)",
                STAGED, STAGED_FROZEN, STAIN_ALONE]
    if compile:
        variants.append("with LStainNorm (compiled)")
    steps = {}
    for variant in variants:
        torch.manual_seed(0)
        net = timm.create_model("resnet18", pretrained=False, num_classes=9)
        if variant == FLOOR:
            net = _InputGradient(net)
        elif variant == STAIN_ALONE:
            net = lstainnorm.with_stain_norm(net, lstainnorm.StainConcentrationNorm())
        elif variant == LEARNABLE:
            net = lstainnorm.with_stain_norm(net, lstainnorm.create_norm("learnable", space="lab"))
        elif variant != variants[0]:
            staged = variant in (STAGED, STAGED_FROZEN)
            norm = lstainnorm.LStainNorm(stain_first="estimate" if staged else None, stain_learnable=False if variant == STAGED_FROZEN else None)
            if "compiled" in variant:
                norm.enable_compile()
            net = lstainnorm.with_stain_norm(net, norm)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        closed = "autograd" not in variant

        def step(net=net, opt=opt, closed=closed):
            opt.zero_grad(set_to_none=True)
            with closed_form_backward(closed):
                torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

        print(f"[cost] warm-up: {variant}", file=sys.stderr, flush=True)
        step()
        step()
        steps[variant] = step
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(repeats):  # interleaved: a slow spell of a shared machine hits every pipeline
        for variant, step in steps.items():
            t = time.perf_counter()
            step()
            times[variant].append((time.perf_counter() - t) * 1000 / x.shape[0])
        print(f"[cost] round {r + 1}/{repeats}", file=sys.stderr, flush=True)
    base = statistics.median(times[variants[0]])
    rows = []
    for variant in variants:
        ms = statistics.median(times[variant])
        rows.append({"pipeline": variant, "ms_per_tile": ms, "overhead_pct": 100.0 * (ms / base - 1.0)})
    return rows


def _met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="training-step batch (default 32)")
    ap.add_argument("--memory-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled training row (compiling takes minutes)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds, no compile (smoke test)")
    ap.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(int(args.memory_child[0]), int(args.memory_child[1]), args.memory_child[2] == "1")
        return
    torch.set_num_threads(2)
    keep_freed_pages()
    if args.quick:
        args.batch, args.memory_batch, args.repeats, args.no_compile = 4, 4, 2, True
    size = 64 if args.quick else 224
    big = 256 if args.quick else 2048
    x, source = load_tiles(max(args.batch, 4), size)

    check = gradient_check(x[:4, :, :64, :64])
    mem = {
        (mode, what): measure_memory(*shape, closed=(mode == "closed-form"))
        for mode in ("closed-form", "autograd")
        for what, shape in (("batch", (args.memory_batch, size)), ("2048", (1, big)))
    }
    steps = training_rows(x[: args.batch], args.repeats, not args.no_compile)

    by = {r["pipeline"]: r for r in steps}
    eager = by["with LStainNorm (eager, closed-form backward)"]["overhead_pct"]
    compiled = by.get("with LStainNorm (compiled)", {}).get("overhead_pct")
    floor = by[FLOOR]["overhead_pct"]
    step_table = markdown_table(
        ["training step, ResNet-18, batch %d" % args.batch, "ms / tile", "overhead"],
        [[r["pipeline"], f"{r['ms_per_tile']:.1f}", f"{r['overhead_pct']:+.1f} %"] for r in steps],
    )
    mem_table = markdown_table(
        ["eager forward+backward of LStainNorm", "closed-form backward: peak MB", "autograd: peak MB"],
        [
            [f"batch {args.memory_batch} x {size} x {size}", *(f"{mem[(m, 'batch')]:.0f}" if mem[(m, "batch")] is not None else "failed" for m in ("closed-form", "autograd"))],
            [f"one {big} x {big} image", *(f"{mem[(m, '2048')]:.0f}" if mem[(m, "2048")] is not None else "failed" for m in ("closed-form", "autograd"))],
        ],
    )
    peak_b, peak_2k = mem[("closed-form", "batch")], mem[("closed-form", "2048")]
    targets = [
        ["1. step overhead, eager (train's mode below 500 steps)", f"{eager:+.1f} %", "<= 10 %", _met(eager <= TARGETS["step"])],
        ["1. ... of which the network's input gradient (the floor of any trainable front layer)", f"{floor:+.1f} %", "-", "-"],
        ["1. ... the layer's own share (eager overhead minus the floor)", f"{eager - floor:+.1f} %", "-", "-"],
        ["1. step overhead, compiled (train's mode from 500 steps)", "not run" if compiled is None else f"{compiled:+.1f} %", "<= 10 %", _met(None if compiled is None else compiled <= TARGETS["step"])],
        [f"2. eager fwd+bwd peak, batch {args.memory_batch}", "failed" if peak_b is None else f"{peak_b:.0f} MB", "<= 1024 MB", _met(None if peak_b is None else peak_b <= TARGETS["peak_batch"])],
        [f"2. eager fwd+bwd peak, {big} x {big}", "failed" if peak_2k is None else f"{peak_2k:.0f} MB", "< 2048 MB", _met(None if peak_2k is None else peak_2k < TARGETS["peak_2048"])],
        ["3. float32 gradients' error vs float64 formulas: closed form (autograd's)", f"{check['closed_err']:.1e} ({check['autograd32_err']:.1e})", "-", "-"],
        ["3. ... closed form's error beyond autograd's, worst tensor", f"{check['excess']:+.1e}", "<= 1e-5", _met(check["excess"] <= TARGETS["rel_err"])],
        ["3. outputs vs autograd path (float32, largest difference)", f"{check['output_max_diff']:.1e}", "0", _met(check["output_max_diff"] == 0.0)],
        ["3. gradcheck, float64 (every parameter and the input)", "passed" if check["gradcheck_float64"] else "failed", "passes", _met(check["gradcheck_float64"])],
    ]
    for variant in (STAGED, STAGED_FROZEN, STAIN_ALONE):  # the stain-aware options: no more than LStainNorm's cost (eager, train's mode below 500 steps)
        own = by[variant]["overhead_pct"]
        targets.append([f"stain-aware: step overhead {variant[5:]}", f"{own:+.1f} %", f"<= LStainNorm's {eager:+.1f} %", _met(own <= eager)])
    text = "\n\n".join(
        [
            f"Tiles: {source}; {machine()}; glibc allocator tuned: {keep_freed_pages()}; {args.repeats} interleaved rounds, median.",
            step_table,
            mem_table,
            markdown_table(["target", "measured", "target value", "met"], targets),
        ]
    )
    print(text)
    path = save("cost", text, {"steps": steps, "memory": {f"{k[0]} {k[1]}": v for k, v in mem.items()}, "check": check, "targets": targets})
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
