"""The CPU part of the GPU check: its benchmark script runs and writes both tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], check=True)


@pytest.mark.heavy
def test_bench_gpu_quick_on_cpu(tmp_path):
    env = {**os.environ, "LSTAINNORM_SHARED_DATA": str(tmp_path / "absent")}  # synthetic tiles: fast, no data needed
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_tables.json").read_text())
    assert {(r["layer"], r["precision"]) for r in data["layers"]} == {(n, p) for n in ("StainNorm(lab)", "LStainNorm, exact attention", "LStainNorm") for p in ("fp32", "bf16")}
    assert all(r["infer_ms_per_tile"] > 0 and r["train_ms_per_tile"] > 0 for r in data["layers"])
    steps = {(r["precision"], r["pipeline"]): r for r in data["training_step"]}
    assert steps[("fp32", "ResNet-18 alone")]["overhead_pct"] == 0.0
    assert "overhead_pct" in steps[("bf16", "with LStainNorm (eager)")]
    assert "overhead_pct" in steps[("fp32", "with LStainNorm (eager, autograd backward)")]  # the baseline of the closed form
    assert "Training step" in (tmp_path / "gpu_tables.md").read_text()
    assert len((tmp_path / "gpu_rows.jsonl").read_text().splitlines()) == 6 + 2 * 4  # layer rows + step rows


def test_bench_tile_size_runs(tmp_path):
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_tile_size.py"), "--small", "32", "--large", "64", "--memory-side", "64", "--repeats", "1",
         "--region", "96", "--no-compile"],  # a smoke test: the compiled path is tests/test_compile.py's
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ratio to small tiles" in res.stdout and "peak RSS growth" in res.stdout
