"""Running many ``lstainnorm`` commands at once: on this machine (N worker processes, the cores split
between them, one GPU each where there are as many) or on a cluster through submitit (SLURM where it
is available, else submitit's local executor). ``lstainnorm compare`` runs its training runs here,
``lstainnorm normalize --workers`` its shards.

Why submitit: it submits a Python callable as a SLURM job (or a local process) and needs nothing on the
cluster beyond SLURM; Ray and Dask need a cluster of their own to be started and kept running, which a
pathology lab's shared SLURM machine does not give a user.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .extras import missing_extra

__all__ = ["EXECUTORS", "Command", "run_commands", "execute"]

EXECUTORS = ("local", "submitit")


@dataclass
class Command:
    """One process to run: its argument list, the log file of its output, extra environment variables."""

    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    payload: Any = None  # whatever the caller needs back in ``on_done``


def execute(argv: list[str], log: str, env: dict[str, str] | None = None) -> int:
    """Run one command with its output appended to ``log``; its exit code (what a submitit job runs)."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(("$ " + shlex.join(argv) + "\n").encode())
        fh.flush()
        return subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}).returncode


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch, no GPU
        return 0


def _submitit(folder: Path, options: Sequence[str]):
    try:
        import submitit
    except ModuleNotFoundError:
        raise missing_extra(ModuleNotFoundError(name="submitit"), "--executor submitit") from None  # type: ignore[misc]
    ex = submitit.AutoExecutor(folder=str(folder))
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


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def run_commands(
    commands: Sequence[Command], workers: int = 1, executor: str = "local", options: Sequence[str] = (), folder: Path | None = None,
    on_start: Callable[[Command], None] | None = None, on_done: Callable[[Command, int, str], None] | None = None,
) -> list[int]:
    """Run ``commands``, ``workers`` at a time; returns their exit codes in order. ``on_done(command,
    code, error)`` is called in this process as each ends (so one process writes any shared file); a
    submitit job that died gives code -1 and its error text. Local workers get ``OMP_NUM_THREADS`` =
    cores / workers and, with at least as many GPUs as workers, ``CUDA_VISIBLE_DEVICES`` = their slot."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {list(EXECUTORS)}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    codes: list[int | None] = [None] * len(commands)
    if not commands:
        return []
    ex = _submitit(Path(folder or ".") / "submitit", options) if executor == "submitit" else None
    gpus = _gpu_count() if ex is None else 0
    pool = ThreadPoolExecutor(max_workers=workers)
    running: dict[Any, tuple[int, int]] = {}
    queue = list(range(len(commands)))
    free = list(range(workers))
    try:
        while queue or running:
            while queue and free:
                i, slot = queue.pop(0), free.pop(0)
                c = commands[i]
                env = dict(c.env)
                if ex is None:
                    env.setdefault("OMP_NUM_THREADS", str(threads_per_worker(workers)))
                    if gpus >= workers:
                        env["CUDA_VISIBLE_DEVICES"] = str(slot)
                fut = ex.submit(execute, c.argv, str(c.log), env) if ex is not None else pool.submit(execute, c.argv, str(c.log), env)
                running[fut] = (i, slot)
                if on_start:
                    on_start(c)
            for fut in _finished(running):
                i, slot = running.pop(fut)
                free.append(slot)
                try:
                    code, err = int(fut.result()), ""
                except Exception as e:  # noqa: BLE001 - a cluster job that died is a failure, reported
                    code, err = -1, f"{type(e).__name__}: {e}"
                codes[i] = code
                if on_done:
                    on_done(commands[i], code, err)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [c if c is not None else -1 for c in codes]


def _finished(running: dict) -> list:
    """The futures (local threads or submitit jobs) that have ended; waits for at least one."""
    if all(isinstance(f, Future) for f in running):
        return list(wait(list(running), return_when=FIRST_COMPLETED).done)
    while True:
        ready = [f for f in running if f.done()]
        if ready:
            return ready
        time.sleep(2.0)
