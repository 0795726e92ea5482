"""Running a comparison's training runs: one ``lstainnorm train`` process per run, on local workers or
a cluster (submitit), resumable from the records.

Every run is a job ``(protocol, method, seed)``. Its run folder is ``OUT/runs/<protocol>/<method>/s<seed>/``
and its log ``OUT/logs/<job>.log``. When a run ends, its record (the job, the test metrics, what the
statistics need, the code it ran) is appended to ``OUT/results.jsonl`` by this process alone (atomic
rewrite), so parallel workers never write the same file. A later call skips recorded jobs, resumes a
run folder left without ``metrics.json`` (a killed worker) from its last checkpoint, and reports failed
runs (``OUT/failures.jsonl``: the job, its exit code, its log) without retrying them unless asked.
A recorded run keeps its best checkpoint; its ``last.ckpt``, which only resumes an unfinished run, is
deleted unless ``keep_last`` (a comparison of a hundred runs otherwise holds twice the disk it needs).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..executors import EXECUTORS, Command, run_commands, threads_per_worker
from ..files import atomic_write_bytes
from .stats import summarise_predictions

__all__ = ["Job", "EXECUTORS", "run_jobs", "load_records", "load_failures", "job_command", "record_of_run"]

@dataclass(frozen=True)
class Job:
    protocol: str
    method: str
    seed: int
    overrides: tuple[str, ...] = field(default=(), compare=False)

    @property
    def key(self) -> str:
        return f"{self.protocol}|{self.method}|{self.seed}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9@+.=-]+", "_", f"{self.protocol}__{self.method}__s{self.seed}")

    def run_root(self, out: Path) -> Path:
        return out / "runs" / re.sub(r"[^A-Za-z0-9@+.=,-]+", "_", self.protocol) / re.sub(r"[^A-Za-z0-9@+.=-]+", "_", self.method) / f"s{self.seed}"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_records(out: Path) -> list[dict]:
    return _read_jsonl(Path(out) / "results.jsonl")


def load_failures(out: Path) -> list[dict]:
    return _read_jsonl(Path(out) / "failures.jsonl")


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    atomic_write_bytes(path, ("".join(json.dumps(r) + "\n" for r in rows)).encode())


def _run_folder(root: Path) -> Path | None:
    runs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return runs[-1] if runs else None


def job_command(config: Path, job: Job, out: Path, threads: int | None) -> list[str]:
    """The ``lstainnorm train`` command of a job: a new run, or ``--resume`` of its unfinished folder."""
    root = job.run_root(out)
    run = _run_folder(root)
    if run is not None and not (run / "metrics.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file():
        return [sys.executable, "-m", "lstainnorm.cli", "train", "--resume", str(run)]
    ov = [*job.overrides, f"seed={job.seed}", f"output_path={root}", "postfix=run", "trainer.progress=false"]
    if threads:
        ov.append(f"trainer.threads={threads}")
    return [sys.executable, "-m", "lstainnorm.cli", "train", str(config), *ov]


def record_of_run(job: Job, run_dir: Path) -> dict[str, Any]:
    """A finished run's record: the job, test and validation metrics, per-centre metrics and what the
    group bootstrap needs (classification: right/total per class per group; segmentation: Dice per image)."""
    from ..runs import code_version

    m = json.loads((run_dir / "metrics.json").read_text())
    test = m.get("test", {})
    overall = {k: v for k, v in test.get("overall", {}).items() if isinstance(v, (int, float))}
    rec: dict[str, Any] = {
        "protocol": job.protocol, "method": job.method, "seed": job.seed, "overrides": list(job.overrides),
        "metrics": overall, "val": {k: v for k, v in m.get("val", {}).get("overall", {}).items() if isinstance(v, (int, float))},
        "per_centre": {c: {k: v for k, v in d.items() if isinstance(v, (int, float))} for c, d in test.get("per_centre", {}).items()},
        "best_epoch": m.get("best_epoch"), "epochs_run": m.get("epochs_run"), "monitor": m.get("monitor"),
        "threshold": m.get("threshold"), "run_dir": str(run_dir), "seconds": m.get("seconds"),
        "code": m.get("code") or code_version(),
    }
    for part in ("in_centre", "cross_centre"):  # tile-weighted over the training centres and the others
        if isinstance(m.get(part), dict):
            rec[part] = {k: v for k, v in m[part].items() if isinstance(v, (int, float))}
    if m.get("norm_fallbacks"):
        rec["norm_fallbacks"] = m["norm_fallbacks"]
    if m.get("test_predictions") and Path(m["test_predictions"]).is_file():
        rec["predictions"] = str(m["test_predictions"])
        rec["groups"], scores = summarise_predictions(m["test_predictions"])
        if scores is not None:  # two classes: AUROC's pairs too
            rec["scores"] = scores
    elif test.get("per_image"):
        rec["groups"] = {str(r.get("name", r.get("index"))): float(r["dice"]) for r in test["per_image"] if "dice" in r}
    return rec


def run_jobs(
    config: Path, jobs: Iterable[Job], out: Path, workers: int = 1, executor: str = "local",
    executor_options: Sequence[str] = (), retry_failed: bool = False, progress: Callable[[str], None] | None = print,
    keep_last: bool = False,
) -> tuple[list[dict], list[dict]]:
    """Run every job without a record; returns ``(records, failures)`` of ``jobs``.

    ``workers``: runs at once (local: processes on this machine, each with ``cores / workers`` threads
    and, with as many GPUs as workers, one GPU each; submitit: jobs in flight). A job that failed before
    is skipped (and reported) unless ``retry_failed``. ``keep_last``: keep each recorded run's
    ``last.ckpt`` too (by default only its best checkpoint stays).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {list(EXECUTORS)}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = list(dict.fromkeys(jobs))
    records = load_records(out)
    failures = load_failures(out)
    done = {f"{r['protocol']}|{r['method']}|{r['seed']}" for r in records}
    failed = {f["key"] for f in failures}
    if retry_failed:
        failures = [f for f in failures if f["key"] not in {j.key for j in jobs}]
        _write_jsonl(out / "failures.jsonl", failures)
        failed = set()
    todo = [j for j in jobs if j.key not in done and j.key not in failed]
    threads = threads_per_worker(workers) if executor == "local" else None
    say = progress or (lambda s: None)
    if todo:
        say(f"compare: {len(todo)} run(s) to do ({len(jobs) - len(todo)} recorded or failed before), {workers} at a time, {executor} executor")
    commands = [Command(job_command(config, j, out, threads), out / "logs" / f"{j.slug}.log",
                        {"OMP_NUM_THREADS": str(threads)} if threads else {}, payload=(j, time.time())) for j in todo]
    n_done = 0

    def started(c: Command) -> None:
        j = c.payload[0]
        c.payload = (j, time.time())
        say(f"[{j.protocol} | {j.method} | seed {j.seed}] started (log: {c.log})")

    def done(c: Command, code: int, err: str) -> None:
        nonlocal n_done
        job, t0 = c.payload
        n_done += 1
        run = _run_folder(job.run_root(out))
        if code == 0 and run is not None and (run / "metrics.json").is_file():
            rec = record_of_run(job, run)
            rec["minutes"] = (time.time() - t0) / 60
            records.append(rec)
            _write_jsonl(out / "results.jsonl", records)
            ckpts = run / "checkpoints"
            if not keep_last and (ckpts / "best.ckpt").is_file():  # recorded: nothing will resume it
                (ckpts / "last.ckpt").unlink(missing_ok=True)
            say(f"[{job.protocol} | {job.method} | seed {job.seed}] done in {rec['minutes']:.1f} min ({n_done}/{len(todo)})")
        else:
            tail = c.log.read_text(errors="replace")[-2000:] if c.log.is_file() else err
            failures.append({"key": job.key, "protocol": job.protocol, "method": job.method, "seed": job.seed,
                             "returncode": code, "log": str(c.log), "tail": tail or err, "run_dir": str(run) if run else None})
            _write_jsonl(out / "failures.jsonl", failures)
            say(f"[{job.protocol} | {job.method} | seed {job.seed}] FAILED (exit {code}); log: {c.log}")

    run_commands(commands, workers, executor, executor_options, out, on_start=started, on_done=done)
    keys = {j.key for j in jobs}
    return [r for r in records if f"{r['protocol']}|{r['method']}|{r['seed']}" in keys], [f for f in failures if f["key"] in keys]
