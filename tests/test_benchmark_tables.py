"""BENCHMARKS.md's tables of training runs are their commands' output on the committed records
(benchmarks/results/): benchmarks/report.py regenerates every marked block; --check says which differ."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"), *args], capture_output=True, text=True, cwd=REPO)


def test_report_rewrites_each_block_with_its_commands_output_and_check_finds_a_stale_one(tmp_path):
    doc = tmp_path / "B.md"
    cmd = "python -c \"print('| a | b |'); print('written: somewhere')\""
    doc.write_text(f"# T\n\nprose `<!-- generated: not a block -->` stays\n\n<!-- generated: {cmd} -->\nstale\n<!-- end generated -->\n\nafter\n")
    r = _report("--check", "--file", str(doc))
    assert r.returncode == 1 and "differs" in r.stdout and "stale" in doc.read_text()
    assert _report("--file", str(doc)).returncode == 0
    text = doc.read_text()
    assert f"<!-- generated: {cmd} -->\n| a | b |\n<!-- end generated -->\n\nafter\n" in text  # the written: line dropped
    assert "prose `<!-- generated: not a block -->` stays" in text
    assert _report("--check", "--file", str(doc)).returncode == 0


def test_a_failing_command_is_named(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text("<!-- generated: python -c \"raise SystemExit(3)\" -->\nx\n<!-- end generated -->\n")
    r = _report("--file", str(doc))
    assert r.returncode != 0 and "failed (exit 3)" in r.stderr and doc.read_text().endswith("x\n<!-- end generated -->\n")


@pytest.mark.heavy
def test_benchmarks_md_is_its_commands_output_on_the_committed_records():
    r = _report("--check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "generated blocks are their command's output" in r.stdout


def test_records_need_tables_only(tmp_path):
    from bench import main  # benchmarks/bench.py

    with pytest.raises(SystemExit, match="--tables-only"):
        main(["mitosis", "--records", str(tmp_path / "r.jsonl"), "--out", str(tmp_path)])


def test_tables_of_committed_records_leave_outs_own_records_alone(tmp_path, capsys):
    from bench import main

    own = tmp_path / "segmentation" / "results.jsonl"
    own.parent.mkdir()
    own.write_text('{"method": "template", "seed": 9, "dice": 0.5}\n')
    records = REPO / "benchmarks" / "results" / "segmentation" / "results.jsonl"
    assert main(["segmentation", "--tables-only", "--records", str(records), "--out", str(tmp_path), "--methods", "template",
                 "stain", "--seeds", "0", "1", "2", "--set", "trainer.max_epochs=50", "--set", "trainer.patience=10",
                 "--set", "optim.T_max=50"]) == 0
    assert own.read_text() == '{"method": "template", "seed": 9, "dice": 0.5}\n'
    assert "| template | 0.768 ± 0.006 |" in (tmp_path / "segmentation" / "segmentation.md").read_text()
    with pytest.raises(SystemExit, match="no such file"):
        main(["segmentation", "--tables-only", "--records", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path)])


def test_steadiness_curves_of_compare_records(tmp_path):
    """steadiness.py reads compare records and their histories: the largest fall of validation balanced
    accuracy after the first fifth, the best epochs, and how many peak in the first fifth."""
    import json

    import steadiness

    folder = tmp_path / "recipe"
    (folder / "histories").mkdir(parents=True)
    curves = {0: [0.5, 0.9, 0.6, 0.7, 0.72, 0.8, 0.81, 0.79, 0.8, 0.82], 1: [0.5, 0.6, 0.65, 0.7, 0.7, 0.72, 0.74, 0.75, 0.76, 0.77]}
    with open(folder / "results.jsonl", "w") as fh:
        for seed, c in curves.items():
            best = max(range(len(c)), key=c.__getitem__) + 1
            fh.write(json.dumps({"protocol": "split", "method": "none", "seed": seed, "best_epoch": best,
                                 "metrics": {"bal_acc": 0.7, "auroc": 0.8}, "val": {"bal_acc": max(c)}}) + "\n")
            rows = "\n".join(f"{e + 1},{v}" for e, v in enumerate(c))
            (folder / "histories" / f"p1_none_s{seed}.csv").write_text("epoch,val/bal_acc\n" + rows + "\n")
    full = steadiness.table({"r": folder})
    assert "test bal. acc." in full
    out = steadiness.table({"r": folder}, curves_only=True)
    assert "test" not in out.splitlines()[0]
    row = out.splitlines()[2].split(" | ")
    # Seed 0 falls 0.3 after its peak at epoch 2, seed 1 never falls: median 0.15, max 0.3.
    assert row[3] == "0.150 / 0.300" and row[5] == "2 / 10" and row[6].rstrip(" |") == "1"
    assert len(steadiness.table({"r": folder}, methods=["template"]).splitlines()) == 2  # header only


def test_steadiness_collect_names_files_by_task(tmp_path):
    """--collect copies each run's history and predictions: an AMi-Br run under the suite's protocol name
    (split -> p1), a segmentation run under its own (split), and never a checkpoint; the tables read them
    back under the same names (a segmentation run's curve: val/dice)."""
    import json

    import steadiness

    src = tmp_path / "out"
    src.mkdir()
    recs = [({"bal_acc": 0.7}, "cls"), ({"dice": 0.7}, "seg")]
    with open(src / "results.jsonl", "w") as fh:
        for metrics, name in recs:
            run = src / "runs" / name
            (run / "checkpoints").mkdir(parents=True)
            curve = "val/dice" if name == "seg" else "val/bal_acc"
            (run / "history.csv").write_text(f"epoch,{curve}\n1,0.5\n2,0.9\n3,0.7\n4,0.8\n5,0.85\n")
            (run / "test_predictions.csv").write_text("tile\n")
            (run / "checkpoints" / "best.ckpt").write_bytes(b"x")
            fh.write(json.dumps({"protocol": "split", "method": name, "seed": 0, "metrics": metrics, "run_dir": str(run)}) + "\n")
    steadiness.collect(src, tmp_path / "dest")
    assert sorted(p.name for p in (tmp_path / "dest" / "histories").iterdir()) == ["p1_cls_s0.csv", "split_seg_s0.csv"]
    assert (tmp_path / "dest" / "predictions" / "split_seg_s0.csv").is_file()
    assert not list((tmp_path / "dest").rglob("*.ckpt"))
    seg = steadiness.table({"r": tmp_path / "dest"}, "split", curves_only=True, curve="val/dice").splitlines()
    assert "val. Dice" in seg[0] and seg[2].split(" | ")[3] == "0.200 / 0.200"  # 0.9 -> 0.7 after the first fifth
    cls = steadiness.table({"r": tmp_path / "dest"}, "p1", curves_only=True).splitlines()
    assert len(cls) == 3 and cls[2].split(" | ")[1] == "cls"
