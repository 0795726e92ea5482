"""The data-set benchmarks' tables in BENCHMARKS.md are what their command prints from the committed
records (benchmarks/results/): regenerated here without training, every table row must be there."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = set((REPO / "BENCHMARKS.md").read_text().splitlines())


def _rows(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("|")]


@pytest.mark.parametrize("kind, args", [
    ("mitosis", ["--seeds", "0", "1", "2"]),
    ("segmentation", ["--methods", "template", "stain", "lstainnorm-stain", "lstainnorm", "--seeds", "0", "1", "2",
                      "--set", "trainer.max_epochs=50", "--set", "trainer.patience=10", "--set", "optim.T_max=50"]),
])
def test_committed_records_regenerate_the_published_tables(kind, args, tmp_path, capsys):
    from bench import main  # benchmarks/bench.py

    records = REPO / "benchmarks" / "results" / kind / "results.jsonl"
    assert main([kind, "--tables-only", "--records", str(records), "--out", str(tmp_path), *args]) == 0
    rows = _rows((tmp_path / kind / f"{kind}.md").read_text())
    assert len(rows) > 20
    missing = [r for r in rows if r not in BENCHMARKS]
    assert not missing, f"{len(missing)} of {len(rows)} rows of `bench.py {kind} --tables-only` are not in BENCHMARKS.md: {missing[:3]}"


def test_records_need_tables_only(tmp_path):
    from bench import main

    with pytest.raises(SystemExit, match="--tables-only"):
        main(["mitosis", "--records", str(tmp_path / "r.jsonl"), "--out", str(tmp_path)])
