"""What the data-set suites share: their runs go through ``lstainnorm compare``'s engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import yaml

from lstainnorm.compare.engine import Job, run_jobs
from lstainnorm.files import atomic_write_bytes
from lstainnorm.runs import write_json

__all__ = ["Job", "engine_records", "read_records", "write_config", "finish"]


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    """A suite's generated config (the jobs' common settings) as YAML, rewritten only when it changes."""
    text = yaml.safe_dump(raw, sort_keys=True)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, text.encode())
    return path


def read_records(path: Path) -> list[dict]:
    """The records of a results.jsonl ([] if there is none)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def engine_records(
    config: Path, jobs: Sequence[Job], out: Path, run_missing: bool = True, workers: int = 1, executor: str = "local",
    executor_options: Sequence[str] = (), progress: bool = True, overrides: Sequence[str] | None = None,
    protocol_names: dict[str, str] | None = None, records: Path | None = None,
) -> list[dict]:
    """Train every job without a record in ``out/results.jsonl`` (unless ``run_missing`` is false), then
    the records of ``jobs`` in their order (a failed job has none; its log is named in failures.jsonl).

    Records written before the suites ran on the engine (no ``metrics``) are kept only where they ran
    with ``overrides`` (when given); a record without a protocol counts as ``split``. ``protocol_names``
    maps a record's protocol to the jobs' name for it (``lstainnorm compare``'s ``A,B->C`` to a suite's).
    ``records``: read that results file instead of OUT's (committed records, tabled without training)."""
    if run_missing:
        run_jobs(Path(config), list(jobs), out, workers=workers, executor=executor, executor_options=executor_options,
                 progress=print if progress else None)
    names = protocol_names or {}
    got = {(names.get(r.get("protocol", "split"), r.get("protocol", "split")), r["method"], r["seed"]): r
           for r in read_records(records or out / "results.jsonl")
           if "metrics" in r or overrides is None or r.get("overrides", []) == list(overrides)}
    return [got[k] for k in ((j.protocol, j.method, j.seed) for j in jobs) if k in got]


def finish(out: Path, report: str, result: dict, stress_data: str | Path | None = None, progress: bool = True) -> dict:
    """With ``stress_data`` (the data the runs tested on), every run of ``result["runs"]`` stressed on
    its test split and the robustness table added; then ``out/<report>.md`` and ``.json`` written."""
    if stress_data is not None and result["runs"]:
        from suites.stress import stress_runs

        st = stress_runs(result["runs"], stress_data, out / "stress", split="test", progress=progress)
        result["stress"] = st["scores"]
        result["text"] += "\n\n" + st["text"] + f"\nCurves: {st['png']}"
    atomic_write_bytes(out / f"{report}.md", (result["text"] + "\n").encode())
    write_json(out / f"{report}.json", result)
    return result
