"""Speed and memory of the normalisation layers against their baselines, in one run.

    python benchmarks/bench_layers.py [--batch 64] [--threads 2] [--repeats 5] [--quick]

ms per 224 x 224 tile at batch 64 on the CPU (2 threads), inference and forward+backward,
for StainNorm in each space and LStainNorm (eager and torch.compile), against kornia's Lab
round trip, the literal transcription of the reference (tests/reference.py) and torchstain's
Macenko (per tile, fitted to one target, as its users run it). Peak memory of forward+backward
is measured in a fresh subprocess per layer (peak RSS growth). Writes bench_out/layers.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

from _common import load_tiles, machine, markdown_table, save, status_kb, time_ms  # noqa: E402

import lstainnorm  # noqa: E402
from suites.speed import torchstain_macenko_runner  # noqa: E402
from reference import ReferenceLabPreNorm, ReferenceSA3  # noqa: E402


def build(name: str) -> torch.nn.Module | None:
    import kornia

    if name.startswith("StainNorm("):
        return lstainnorm.StainNorm(name[len("StainNorm(") : -1])
    if name == "LStainNorm":
        return lstainnorm.LStainNorm()
    if name == "reference SA3 (transcription)":
        return ReferenceSA3()
    if name == "reference LabPreNorm (transcription)":
        return ReferenceLabPreNorm()
    if name == "kornia Lab round trip":
        return _Fn(lambda x: kornia.color.lab_to_rgb(kornia.color.rgb_to_lab(x)))
    raise KeyError(name)


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


LAYERS = ["StainNorm(lab)", "StainNorm(hsv)", "StainNorm(rgb)", "StainNorm(hed)", "LStainNorm"]
BASELINES = ["kornia Lab round trip", "reference LabPreNorm (transcription)", "reference SA3 (transcription)"]


def peak_memory_child(name: str, batch: int, compiled: bool) -> None:
    """Run in a subprocess: print the peak RSS growth (MB) of one forward+backward (Linux)."""
    torch.set_num_threads(2)
    x, _ = load_tiles(batch)
    m = build(name)
    trainable = any(p.requires_grad for p in m.parameters())
    if compiled:
        m.enable_compile()
        out = m(x)  # compile outside the measured peak
        if trainable:
            out.float().mean().backward()
        m.zero_grad(set_to_none=True)
        del out
    before = status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
    out = m(x)
    if trainable:
        out.float().mean().backward()
    peak = status_kb("VmHWM")
    print(json.dumps({"peak_mb": (peak - before) / 1024}))


def measure_memory(name: str, batch: int, compiled: bool) -> float | None:
    cmd = [sys.executable, __file__, "--memory-child", name, "--batch", str(batch)] + (["--compiled"] if compiled else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    for line in res.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)["peak_mb"]
    print(f"memory run failed for {name}: {res.stderr[-500:]}", file=sys.stderr)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small batch, 2 repeats, no compile, no memory (smoke test)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child, args.batch, args.compiled)
        return
    if args.quick:
        args.batch, args.repeats, args.no_memory = 4, 2, True
    torch.set_num_threads(args.threads)
    x, source = load_tiles(args.batch)
    b = x.shape[0]
    rows, data = [], []

    def record(name, mode, infer_ms, train_ms, mem):
        per = (lambda v: None if v is None else v / b)
        rows.append([name, mode, per(infer_ms), per(train_ms), mem])
        data.append({"layer": name, "mode": mode, "infer_ms_per_tile": per(infer_ms), "train_ms_per_tile": per(train_ms), "peak_mb": mem})

    for name in LAYERS + BASELINES:
        modes = ["eager"] + (["compiled"] if name in LAYERS and not args.quick else [])
        for mode in modes:
            m = build(name)
            if mode == "compiled":
                m.enable_compile()
            print(f"{name} [{mode}] ...", file=sys.stderr, flush=True)
            with torch.no_grad():
                infer = time_ms(lambda: m(x), args.repeats)
            trainable = any(p.requires_grad for p in m.parameters())

            def step():
                m.zero_grad(set_to_none=True)
                m(x).mean().backward()

            train = time_ms(step, args.repeats) if trainable else None
            mem = None if args.no_memory else measure_memory(name, b, mode == "compiled")
            record(name, mode, infer, train, mem)
    run = torchstain_macenko_runner(x)
    if run is not None:
        print("torchstain Macenko ...", file=sys.stderr, flush=True)
        record("torchstain Macenko (per tile)", "eager", time_ms(run, args.repeats), None, None)

    def ms(name, mode="eager"):
        for d in data:
            if d["layer"] == name and d["mode"] == mode:
                return d["infer_ms_per_tile"]
        return None

    best = min(v for v in (ms("LStainNorm"), ms("LStainNorm", "compiled")) if v is not None)
    table = markdown_table(
        ["layer", "mode", "inference ms/tile", "fwd+bwd ms/tile", "peak MB fwd+bwd"],
        [[r[0], r[1], r[2], r[3] if r[3] is not None else "-", r[4] if r[4] is not None else "-"] for r in rows],
    )
    checks = []
    mac = ms("torchstain Macenko (per tile)")
    ref = ms("reference SA3 (transcription)")
    kor = ms("kornia Lab round trip")
    lab = min(v for v in (ms("StainNorm(lab)"), ms("StainNorm(lab)", "compiled")) if v is not None)
    if mac:
        checks.append(("LStainNorm / torchstain Macenko", best / mac, "<= 1.0"))
    if ref:
        checks.append(("reference transcription / LStainNorm", ref / best, ">= 10"))
    if kor:
        checks.append(("StainNorm(lab) / kornia Lab round trip", lab / kor, "<= 1.0"))
    # The targets for the training cost of LStainNorm (eager: the layer without torch.compile).
    for d in data:
        if d["layer"] == "LStainNorm" and d["train_ms_per_tile"] and d["infer_ms_per_tile"]:
            checks.append((f"LStainNorm fwd+bwd / forward ({d['mode']})", d["train_ms_per_tile"] / d["infer_ms_per_tile"], "<= 3.0"))
        if d["layer"] == "LStainNorm" and d["peak_mb"] is not None:
            checks.append((f"LStainNorm fwd+bwd peak MB at batch {b} ({d['mode']})", d["peak_mb"], "<= 1024"))
    check_rows = [
        [n, v, t, "yes" if (v <= float(t.split()[1]) if t.startswith("<=") else v >= float(t.split()[1])) else "NO"]
        for n, v, t in checks
    ]
    text = (
        f"Batch {b} of 224 x 224 tiles ({source}); {machine()}; median of {args.repeats} runs.\n"
        f"LStainNorm's best mode: {best:.3g} ms/tile.\n\n{table}\n\n"
        + markdown_table(["ratio", "value", "target", "met"], check_rows)
    )
    print(text)
    path = save("layers", text, {"rows": data, "checks": [dict(zip(["ratio", "value", "target"], c)) for c in checks], "source": source})
    print(f"\nwritten: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
