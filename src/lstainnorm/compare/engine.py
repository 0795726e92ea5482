"""Running a comparison's training runs: one ``lstainnorm train`` process per run, on local workers or
a cluster (submitit), resumable from the records.

Every run is a job ``(protocol, method, seed)``. Its run folder is ``OUT/runs/<protocol>/<method>/s<seed>/``
and its log ``OUT/logs/<job>.log``. When a run ends, its record (the job, the test metrics, what the
statistics need, the code it ran) is appended to ``OUT/results.jsonl`` by this process alone (atomic
rewrite), so parallel workers never write the same file. A later call skips recorded jobs, resumes a
run folder left without ``metrics.json`` (a killed worker) from its last checkpoint, and reports failed
runs (``OUT/failures.jsonl``: the job, its exit code, its log) without retrying them unless asked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..extras import missing_extra
from ..files import atomic_write_bytes
from .stats import counts_by_group

__all__ = ["Job", "EXECUTORS", "run_jobs", "load_records", "load_failures", "job_command", "record_of_run"]

EXECUTORS = ("local", "submitit")


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


def _execute(cmd: list[str], log: str, env: dict[str, str] | None = None) -> int:
    """Run one command with its output in ``log`` (also what a submitit job runs)."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(("$ " + shlex.join(cmd) + "\n").encode())
        fh.flush()
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}).returncode


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
    if m.get("test_predictions") and Path(m["test_predictions"]).is_file():
        rec["groups"] = counts_by_group(m["test_predictions"])
    elif test.get("per_image"):
        rec["groups"] = {str(r.get("name", r.get("index"))): float(r["dice"]) for r in test["per_image"] if "dice" in r}
    return rec


def _submitit_executor(out: Path, options: Sequence[str]):
    try:
        import submitit
    except ModuleNotFoundError:
        raise missing_extra(ModuleNotFoundError(name="submitit"), "--executor submitit") from None  # type: ignore[misc]
    ex = submitit.AutoExecutor(folder=str(out / "submitit"))
    params: dict[str, Any] = {}
    for opt in options:
        k, sep, v = opt.partition("=")
        if not sep:
            raise ValueError(f"--executor-option {opt!r} must look like key=value (e.g. slurm_partition=gpu)")
        try:
            params[k] = json.loads(v)
        except ValueError:
            params[k] = v
    params.setdefault("timeout_min", 24 * 60)
    ex.update_parameters(**params)
    return ex


def run_jobs(
    config: Path, jobs: Iterable[Job], out: Path, workers: int = 1, executor: str = "local",
    executor_options: Sequence[str] = (), retry_failed: bool = False, progress: Callable[[str], None] | None = print,
) -> tuple[list[dict], list[dict]]:
    """Run every job without a record; returns ``(records, failures)`` of ``jobs``.

    ``workers``: runs at once (local: processes on this machine, each with ``cores / workers`` threads
    and, with as many GPUs as workers, one GPU each; submitit: jobs in flight). A job that failed before
    is skipped (and reported) unless ``retry_failed``.
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
    threads = max(1, (os.cpu_count() or 1) // workers) if executor == "local" else None
    gpus = _gpu_count() if executor == "local" else 0
    say = progress or (lambda s: None)
    if todo:
        say(f"compare: {len(todo)} run(s) to do ({len(jobs) - len(todo)} recorded or failed before), {workers} at a time, {executor} executor")
    ex = _submitit_executor(out, executor_options) if executor == "submitit" and todo else None

    def start(job: Job, slot: int):
        cmd = job_command(config, job, out, threads)
        log = str(out / "logs" / f"{job.slug}.log")
        env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        if gpus >= workers and gpus > 0:
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        if ex is not None:
            return ex.submit(_execute, cmd, log, env), log
        return pool.submit(_execute, cmd, log, env), log

    pool = ThreadPoolExecutor(max_workers=workers)
    running: dict[Future | Any, tuple[Job, str, int, float]] = {}
    queue = list(todo)
    free = list(range(workers))
    n_done = 0
    try:
        while queue or running:
            while queue and free:
                job, slot = queue.pop(0), free.pop(0)
                fut, log = start(job, slot)
                running[fut] = (job, log, slot, time.time())
                say(f"[{job.protocol} | {job.method} | seed {job.seed}] started (log: {log})")
            finished = _wait_any(running)
            for fut in finished:
                job, log, slot, t0 = running.pop(fut)
                free.append(slot)
                n_done += 1
                try:
                    code = fut.result()
                except Exception as err:  # noqa: BLE001 - a cluster job that died: recorded as a failure
                    code, err_text = -1, f"{type(err).__name__}: {err}"
                else:
                    err_text = ""
                run = _run_folder(job.run_root(out))
                if code == 0 and run is not None and (run / "metrics.json").is_file():
                    rec = record_of_run(job, run)
                    rec["minutes"] = (time.time() - t0) / 60
                    records.append(rec)
                    _write_jsonl(out / "results.jsonl", records)
                    say(f"[{job.protocol} | {job.method} | seed {job.seed}] done in {rec['minutes']:.1f} min ({n_done}/{len(todo)})")
                else:
                    tail = Path(log).read_text(errors="replace")[-2000:] if Path(log).is_file() else err_text
                    failures.append({"key": job.key, "protocol": job.protocol, "method": job.method, "seed": job.seed,
                                     "returncode": code, "log": log, "tail": tail, "run_dir": str(run) if run else None})
                    _write_jsonl(out / "failures.jsonl", failures)
                    say(f"[{job.protocol} | {job.method} | seed {job.seed}] FAILED (exit {code}); log: {log}")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    keys = {j.key for j in jobs}
    return [r for r in records if f"{r['protocol']}|{r['method']}|{r['seed']}" in keys], [f for f in failures if f["key"] in keys]


def _wait_any(running: dict) -> list:
    """The futures (local or submitit jobs) of ``running`` that have finished; waits for at least one."""
    local = [f for f in running if isinstance(f, Future)]
    while True:
        if local and len(local) == len(running):
            return list(wait(local, return_when=FIRST_COMPLETED).done)
        ready = [f for f in running if (f.done() if hasattr(f, "done") else True)]
        if ready:
            return ready
        time.sleep(2.0)


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0
