"""The shared pieces of the new layout: run loading, image conversion, the picker, the registry,
the resumable loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lstainnorm
from lstainnorm.data.io import image_to_tensor, tensor_to_image
from lstainnorm.data.tiles import round_robin
from lstainnorm.experiments.runner import benchmark_methods, method_overrides, run_resumable
from lstainnorm.files import atomic_path, sweep_stale_temps, temp_prefix
from lstainnorm.layers import registry


def test_image_tensor_round_trip():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    t = image_to_tensor(img)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32 and float(t.max()) <= 1.0
    assert np.array_equal(tensor_to_image(t), img)
    batch = image_to_tensor(np.stack([img, img]))
    assert batch.shape == (2, 3, 5, 7)
    # out-of-range values are clipped, and rounding is to nearest
    assert tensor_to_image(torch.full((3, 1, 1), 1.5))[0, 0, 0] == 255
    assert tensor_to_image(torch.full((3, 1, 1), 0.5 / 255 + 1e-6))[0, 0, 0] == 1
    ro = img.copy()
    ro.flags.writeable = False
    assert torch.equal(image_to_tensor(ro), t)


def test_round_robin():
    assert round_robin([[1, 2, 3], [4], [5, 6]], 10) == [1, 4, 5, 2, 6, 3]
    assert round_robin([[1, 2, 3], [4], [5, 6]], 4) == [1, 4, 5, 2]
    assert round_robin([], 3) == [] and round_robin([[1]], 0) == []


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert p.read_bytes() == b"old" and [q.name for q in tmp_path.iterdir()] == ["x.bin"]


@pytest.mark.skipif(os.name != "posix", reason="stale temporary files are only swept on POSIX (pid liveness check)")
def test_sweep_removes_only_temps_of_dead_writers_on_this_host(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid now names no process (reuse within this test is vanishingly unlikely)
    dead_prefix = temp_prefix().replace(f"-{os.getpid()}-", f"-{child.pid}-")
    (tmp_path / "sub").mkdir()
    dead_file = tmp_path / "sub" / f"{dead_prefix}x.png"
    dead_dir = tmp_path / f"{dead_prefix}levels-y"
    live = tmp_path / f"{temp_prefix()}z.png"
    other_host = tmp_path / f".tmp-00000000-{child.pid}-w.png"
    legacy = tmp_path / ".tmp-abc123.png"  # made before names carried a pid: owner unknown, kept
    for p in (dead_file, live, other_host, legacy):
        p.write_bytes(b"x")
    dead_dir.mkdir()
    (dead_dir / "level1.npy").write_bytes(b"x")
    removed = sweep_stale_temps(tmp_path)
    assert sorted(removed) == sorted([dead_file, dead_dir])
    assert not dead_file.exists() and not dead_dir.exists()
    assert live.exists() and other_host.exists() and legacy.exists()
    assert sweep_stale_temps(tmp_path / "missing") == []
    # Not recursive: the folder's own entries only.
    dead_file.write_bytes(b"x")
    top = tmp_path / f"{dead_prefix}top.onnx"
    top.write_bytes(b"x")
    assert sweep_stale_temps(tmp_path, recursive=False) == [top]
    assert dead_file.exists() and not top.exists()


def test_registry_lists_plugins_without_importing_them(monkeypatch):
    names = lstainnorm.list_norms()
    assert {"none", "template", "learnable", "lstainnorm", "reinhard", "macenko", "vahadane"} <= set(names)
    monkeypatch.delitem(registry._REGISTRY, "macenko", raising=False)
    assert "macenko" in lstainnorm.list_norms()  # known by its entry point alone
    norm = lstainnorm.create_norm("macenko")  # loaded on first use
    assert type(norm).__name__ == "ClassicalNorm" and norm.method == "macenko"
    assert isinstance(lstainnorm.create_norm("sa3"), lstainnorm.LStainNorm)  # the reference's alias
    with pytest.raises(ValueError, match="unknown normalisation 'nope'"):
        lstainnorm.create_norm("nope")


def test_benchmark_methods_follow_the_registries():
    methods = benchmark_methods()
    assert methods[0] == "none" and methods[-1] == "lstainnorm"
    assert {"macenko", "randstainna", "hed-jitter", "template", "learnable-lab", "learnable-hed"} <= set(methods)
    for m in methods:
        method_overrides(m, tmp := __import__("pathlib").Path("cache"))  # every listed method is runnable
    assert method_overrides("learnable-hsv", tmp) == ["norm.mode=learnable", "norm.space=hsv"]
    with pytest.raises(ValueError, match="unknown benchmark method"):
        method_overrides("learnable-xyz", tmp)


def test_run_resumable_runs_each_job_once(tmp_path):
    calls = []

    def run(job):
        calls.append(job["seed"])
        if job["seed"] == 2 and len(calls) == 2:
            raise KeyboardInterrupt  # interrupted during the second job
        return {"score": job["seed"] * 10}

    jobs = [{"method": "a", "seed": s, "overrides": ["x=1"]} for s in (1, 2)]
    with pytest.raises(KeyboardInterrupt):
        run_resumable(tmp_path, jobs, run, "t", progress=False)
    recs = run_resumable(tmp_path, jobs, run, "t", progress=False)
    assert calls == [1, 2, 2]  # the finished job was not rerun
    assert [r["score"] for r in recs] == [10, 20]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["seed"] for x in lines] == [1, 2]


def test_run_resumable_counts_a_repeated_job_once(tmp_path):
    """`--methods none none` (a method given twice) trains once and tables one record, not two."""
    calls = []
    jobs = [{"method": "none", "seed": 0}, {"method": "none", "seed": 0}, {"method": "b", "seed": 0}]
    recs = run_resumable(tmp_path, jobs, lambda j: calls.append(j["method"]) or {"score": 1}, "t", progress=False)
    assert calls == ["none", "b"] and [r["method"] for r in recs] == ["none", "b"]


def test_ablations_are_runnable_and_change_one_thing():
    from pathlib import Path

    from lstainnorm.config import make_config
    from lstainnorm.experiments.runner import ABLATION_METHODS, ABLATIONS

    cache = Path("cache")
    base, _ = make_config({}, method_overrides("lstainnorm", cache))
    for m in ABLATION_METHODS:
        ov = method_overrides(m, cache, image="tile.png")
        cfg, _ = make_config({}, ov)
        if m in ABLATIONS:  # LStainNorm with exactly one norm.* key changed
            diff = {k for k in base.norm if base.norm[k] != cfg.norm[k]}
            assert len(diff) == 1, (m, diff)
    assert method_overrides("lstainnorm-init-image", cache, image="t.png")[-1] == "norm.templates=t.png"
    with pytest.raises(ValueError, match="needs the image"):
        method_overrides("lstainnorm-init-image", cache)


def test_init_image_is_the_first_training_tile_of_tissue(tmp_path):
    from pathlib import Path

    from PIL import Image

    from suites.accuracy import first_training_tile

    glass = np.full((16, 16, 3), 245, np.uint8)                 # first by path, but no tissue
    fat = glass.copy(); fat[:4] = (200, 120, 170)               # 25 % tissue
    tissue = np.full((16, 16, 3), (180, 90, 150), np.uint8)
    rows = ["path,class,centre,split"]
    for name, img, centre, split in [("a_glass.png", glass, "A", "train"), ("b_fat.png", fat, "A", "train"),
                                     ("c_other_centre.png", tissue, "B", "train"), ("d_test.png", tissue, "A", "test"),
                                     ("e_tissue.png", tissue, "A", "train"), ("f_tissue.png", tissue, "A", "train")]:
        Image.fromarray(img).save(tmp_path / name)
        rows.append(f"{name},x,{centre},{split}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    assert Path(first_training_tile(tmp_path / "m.csv")).name == "e_tissue.png"
    assert Path(first_training_tile(tmp_path / "m.csv", min_tissue=0.2)).name == "b_fat.png"
    with pytest.raises(ValueError, match="at least 101% tissue"):
        first_training_tile(tmp_path / "m.csv", min_tissue=1.01)


def test_paired_table_compares_seed_by_seed():
    from lstainnorm.experiments.runner import paired_table

    recs = [{"method": "lstainnorm", "seed": s, "acc": a} for s, a in ((0, 0.90), (1, 0.80), (2, 0.70))]
    recs += [{"method": "better", "seed": s, "acc": a + 0.05 + 0.001 * s} for s, a in ((0, 0.90), (1, 0.80), (2, 0.70))]
    recs += [{"method": "noisy", "seed": s, "acc": a + d} for (s, a), d in zip(((0, 0.90), (1, 0.80), (2, 0.70)), (0.1, -0.1, 0.02))]
    text = paired_table(recs, "acc", scale=100)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()[2:]}
    # a constant +5 points on every seed exceeds the noise even though the methods' spread (10 points) is larger
    assert "+5.1" in rows["better"] and rows["better"].rstrip(" |").endswith("better")
    assert "+5.0 / +5.1 / +5.2" in rows["better"]
    assert rows["noisy"].rstrip(" |").endswith("within noise")
    assert paired_table(recs, "acc", reference="absent") == ""


def test_mean_std_claims_no_spread_for_one_seed():
    from lstainnorm.experiments.runner import mean_std

    assert mean_std([0.70, 0.74], digits=3) == "0.720 ± 0.028"
    assert mean_std([0.764], digits=3) == "0.764 (1 seed)"
    assert mean_std([0.5], scale=100) == "50.0 (1 seed)"


def test_per_seed_lists_values_in_seed_order():
    from lstainnorm.experiments.runner import per_seed

    recs = [{"seed": 2, "dice": 0.7771, "best_epoch": 40}, {"seed": 0, "dice": 0.7349, "best_epoch": None}, {"seed": 1, "dice": 0.76}]
    assert per_seed(recs, "dice", "{:.3f}") == "0.735 / 0.760 / 0.777"
    assert per_seed(recs, "best_epoch") == "- / - / 40"
