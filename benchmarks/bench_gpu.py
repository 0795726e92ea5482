"""Layer and training-step timings on one device (a GPU by default), float32 and bf16 autocast.

Two tables, every ratio measured in this run:

1. the layers (StainNorm(lab), LStainNorm eager and compiled): inference and forward+backward
   ms per tile and peak device memory, at each ``--batches`` size;
2. a training step (forward, backward, AdamW) of ResNet-18 alone and with LStainNorm in front
   (eager and compiled): ms per tile and the layer's overhead in %.

    python benchmarks/bench_gpu.py --device cuda --out bench_out/gpu      # what gpu_check.sh runs
    python benchmarks/bench_gpu.py --device cpu --quick --out /tmp/x      # smoke test (CPU)

Tiles: crops of the MoNuSeg images under $LSTAINNORM_SHARED_DATA when set, else synthetic.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_tiles, markdown_table  # noqa: E402

import lstainnorm  # noqa: E402
from lstainnorm.layers.norm import closed_form_backward  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in ms, the device synchronised around every call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _peak_mb(device: torch.device, fn) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


_PARTIAL: Path | None = None


def _emit(row: dict) -> None:
    """Keep every finished row (a killed run still leaves its measurements)."""
    print(json.dumps(row), file=sys.stderr, flush=True)
    if _PARTIAL is not None:
        with open(_PARTIAL, "a") as fh:
            fh.write(json.dumps(row) + "\n")


class _ExactAttention(torch.nn.Module):
    """LStainNorm with the exact N x N attention (the layer before the linear-time attention)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        from lstainnorm.layers import fusion

        saved, fusion.MAX_RANK = fusion.MAX_RANK, 0
        try:
            return self.inner(x)
        finally:
            fusion.MAX_RANK = saved


def _layer(name: str, device: torch.device) -> torch.nn.Module:
    if name == "StainNorm(lab)":
        return lstainnorm.StainNorm("lab").to(device)
    m = lstainnorm.LStainNorm().to(device)
    return _ExactAttention(m) if name == "LStainNorm, exact attention" else m


def layer_table(x_all: torch.Tensor, device: torch.device, batches: list[int], precisions: list[str], compile_batches: list[int], repeats: int) -> list[dict]:
    rows = []
    for b in batches:
        # Each new batch size recompiles (about a minute per graph on a GPU): compiled only where asked.
        variants = [("StainNorm(lab)", "eager"), ("LStainNorm, exact attention", "eager"), ("LStainNorm", "eager")] + ([("LStainNorm", "compiled")] if b in compile_batches else [])
        x = x_all[:b].to(device)
        for precision in precisions:
            for name, mode in variants:
                m = _layer(name, device)
                if mode == "compiled":
                    m.enable_compile()
                print(f"[layers] batch {b} {precision} {name} [{mode}]", file=sys.stderr, flush=True)

                def infer():
                    with torch.no_grad(), _autocast(device, precision):
                        m(x)

                def fwd_bwd():
                    m.zero_grad(set_to_none=True)
                    with _autocast(device, precision):
                        out = m(x)
                    out.float().mean().backward()

                row = {"batch": b, "precision": precision, "layer": name, "mode": mode}
                try:
                    row["infer_ms_per_tile"] = timed_ms(infer, device, repeats) / b
                    row["train_ms_per_tile"] = timed_ms(fwd_bwd, device, repeats) / b
                    row["peak_mb"] = _peak_mb(device, fwd_bwd)
                    if not all(bool(torch.isfinite(p.grad).all()) for p in m.parameters() if p.grad is not None):
                        row = {k: row[k] for k in ("batch", "precision", "layer", "mode")} | {"error": "non-finite gradients"}
                except Exception as err:  # e.g. out of memory, a compiler failure: report, go on
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                rows.append(row)
                _emit(row)
    return rows


def training_table(x_all: torch.Tensor, device: torch.device, batch: int, precisions: list[str], compile: bool, repeats: int) -> list[dict]:
    """ms per tile of a training step for each pipeline. The pipelines are built and warmed up
    (compiled) first, then timed in interleaved rounds (one step of each per round, median over
    rounds), so that a slow spell of a shared machine hits every pipeline alike."""
    import timm

    x = x_all[:batch].to(device)
    y = torch.arange(batch, device=device) % 9
    rows = []
    variants = ["ResNet-18 alone", "with LStainNorm, exact attention (eager)", "with LStainNorm (eager)",
                "with LStainNorm (eager, autograd backward)"] + (["with LStainNorm (compiled)"] if compile else [])
    for precision in precisions:
        steps, errors, nets = {}, {}, {}
        for variant in variants:
            torch.manual_seed(0)
            net = timm.create_model("resnet18", pretrained=False, num_classes=9)
            if variant != "ResNet-18 alone":
                norm = lstainnorm.LStainNorm()
                if "compiled" in variant:
                    norm.enable_compile()
                if "exact" in variant:
                    norm = _ExactAttention(norm)
                net = lstainnorm.with_stain_norm(net, norm)
            net = net.to(device).train()
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
            print(f"[training step] {precision} {variant}: warm-up", file=sys.stderr, flush=True)

            def step(net=net, opt=opt, closed="autograd" not in variant):
                opt.zero_grad(set_to_none=True)
                # eager LStainNorm trains through the closed-form backward unless the row says autograd
                with closed_form_backward(closed):
                    with _autocast(device, precision):
                        loss = torch.nn.functional.cross_entropy(net(x).float(), y)
                    loss.backward()
                opt.step()

            try:
                timed_ms(step, device, 1, warmup=2)
                steps[variant], nets[variant] = step, net
            except Exception as err:
                errors[variant] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        times: dict[str, list[float]] = {v: [] for v in steps}
        for _ in range(repeats):
            for variant, step in steps.items():
                times[variant].append(timed_ms(step, device, 1, warmup=0))
        for variant, net in nets.items():
            # A fast step that trains on NaN is no result: check the weights it left.
            if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
                errors[variant] = f"non-finite weights after {2 + repeats} steps (NaN or Inf gradients)"
                times.pop(variant)
        base = statistics.median(times[variants[0]]) / batch if variants[0] in times else None
        for variant in variants:
            row = {"precision": precision, "pipeline": variant, "batch": batch}
            if variant in times:
                row["ms_per_tile"] = statistics.median(times[variant]) / batch
                if base:
                    row["overhead_pct"] = 100.0 * (row["ms_per_tile"] / base - 1.0)
            else:
                row["error"] = errors[variant]
            rows.append(row)
            _emit(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-batches", type=int, nargs="*", default=[64], help="batch sizes of the layer table that also run compiled (default 64)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat, no compile (smoke test)")
    ap.add_argument("--out", type=Path, default=Path("bench_out/gpu"))
    a = ap.parse_args()
    if a.quick:
        a.batches, a.train_batch, a.size, a.repeats, a.no_compile = [2], 2, 64, 1, True
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu")
    warnings.filterwarnings("ignore")
    n = max(a.batches + [a.train_batch])
    x_all, source = load_tiles(n, a.size)
    precisions = a.precisions
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    global _PARTIAL
    a.out.mkdir(parents=True, exist_ok=True)
    _PARTIAL = a.out / "gpu_rows.jsonl"
    _PARTIAL.unlink(missing_ok=True)
    steps = training_table(x_all, device, a.train_batch, precisions, not a.no_compile, a.repeats)
    layers = layer_table(x_all, device, a.batches, precisions, [] if a.no_compile else a.compile_batches, a.repeats)

    def v(r, k):
        return r.get(k, r.get("error", "-"))

    text = (
        f"Device: {card}; torch {torch.__version__}; {a.size} x {a.size} tiles ({source}); median of {a.repeats} runs; "
        "bf16 = torch.autocast(bfloat16) (the layer itself computes in float32).\n\n"
        + markdown_table(
            ["batch", "precision", "layer", "mode", "inference ms/tile", "fwd+bwd ms/tile", "fwd+bwd / inference", "peak MB fwd+bwd"],
            [[r["batch"], r["precision"], r["layer"], r["mode"], v(r, "infer_ms_per_tile"), v(r, "train_ms_per_tile"),
              (r["train_ms_per_tile"] / r["infer_ms_per_tile"]) if "train_ms_per_tile" in r else "-", v(r, "peak_mb")] for r in layers],
        )
        + f"\n\nTraining step (forward, backward, AdamW), batch {a.train_batch}:\n\n"
        + markdown_table(
            ["precision", "pipeline", "ms/tile", "overhead vs ResNet-18 alone (%)"],
            [[r["precision"], r["pipeline"], v(r, "ms_per_tile"), v(r, "overhead_pct")] for r in steps],
        )
    )
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_tables.md").write_text(text + "\n")
    (a.out / "gpu_tables.json").write_text(json.dumps({"device": card, "torch": torch.__version__, "layers": layers, "training_step": steps}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
