"""Callbacks and plugins of a run: per-epoch history and template trajectory, atomic
checkpoints, a DDP consistency check, and a test hook for simulated interruptions."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..files import atomic_path, atomic_write_bytes
from .loggers import template_scalars

__all__ = ["HistoryCallback", "AtomicCheckpointIO", "DDPConsistencyCallback", "InterruptAfterEpochs", "StopAndSave",
           "SignalAtBatch", "epoch_line", "STOPPED_EXIT"]

# Exit codes of a run stopped by a signal (128 + its number, as shells report them).
STOPPED_EXIT = {"SIGTERM": 143, "SIGINT": 130}

log = logging.getLogger("lstainnorm")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the same folder, then renamed: a crash
    mid-write leaves the previous checkpoint intact, never a truncated one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().cpu()
        return float(v) if v.numel() == 1 else None
    return v


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def epoch_line(row: dict, max_epochs: int | None, record: dict | None, seconds: float) -> str:
    """The one line per epoch of ``train.log``: losses, validation metrics, the learned template
    (mean per channel, natural units) and the epoch's seconds, progress bar or not."""
    metrics = [f"{k} {_fmt(v)}" for k, v in row.items() if k.startswith(("train/", "val/"))]
    parts = [f"epoch {row['epoch'] + 1}/{max_epochs}", ", ".join(metrics)]
    if record is not None:
        tpl = [f"{space} mu ({', '.join(f'{m:.3g}' for m in d['mu'])})" for space, d in record["natural"].items()]
        parts.append("template " + "; ".join(tpl))
    parts.append(f"{seconds:.1f} s")
    return " | ".join(p for p in parts if p)


class HistoryCallback(L.Callback):
    """Writes ``history.csv`` (one row per epoch: losses, metrics, learning rates, template),
    ``template_history.jsonl`` (the template in natural units and the fusion weights) and one
    line per epoch to ``train.log`` (:func:`epoch_line`)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.rows: list[dict] = []

    def _read_existing(self) -> None:
        path = self.run_dir / "history.csv"
        if path.is_file() and not self.rows:
            with open(path, newline="") as fh:
                self.rows = list(csv.DictReader(fh))

    def on_train_start(self, trainer, pl_module) -> None:  # after a resume has restored the epoch
        self._read_existing()
        # A resumed run replays from its last checkpoint: drop rows of epochs it will redo.
        start = trainer.current_epoch
        self.rows = [r for r in self.rows if int(r["epoch"]) < start]
        if trainer.is_global_zero and start == 0:
            rec = pl_module.template_record()
            if rec is not None:
                atomic_write_bytes(self.run_dir / "template_history.jsonl", (json.dumps({"epoch": -1, **rec}) + "\n").encode())

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        # The learning rates used during this epoch (the scheduler steps at its end).
        self._lrs = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(trainer.optimizers[0].param_groups)}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Runs after the epoch's validation, so the row holds this epoch's validation metrics.
        if not trainer.is_global_zero:
            return
        row: dict[str, Any] = {"epoch": trainer.current_epoch}
        for k, v in trainer.callback_metrics.items():
            s = _scalar(v)
            if s is not None:
                row[k] = s
        row.update(getattr(self, "_lrs", {}))
        rec = pl_module.template_record()
        row.update(template_scalars(rec))
        if rec is not None:
            self._append_jsonl({"epoch": trainer.current_epoch, **rec})
        self.rows = [r for r in self.rows if int(r["epoch"]) != trainer.current_epoch] + [row]
        self._write_csv()
        log.info(epoch_line(row, trainer.max_epochs, rec, time.perf_counter() - getattr(self, "_t0", time.perf_counter())))

    def _append_jsonl(self, rec: dict) -> None:
        path = self.run_dir / "template_history.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        lines = [ln for ln in lines if ln.strip() and json.loads(ln)["epoch"] < rec["epoch"]]
        lines.append(json.dumps(rec))
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())

    def _write_csv(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if (isinstance(v, float) and math.isnan(v)) else v) for k, v in r.items()})
        atomic_write_bytes(self.run_dir / "history.csv", buf.getvalue().encode())


class DDPConsistencyCallback(L.Callback):
    """At the end of fitting, gathers the normalisation parameters of every rank and records
    whether they are identical (``ddp_check.json``): DDP must keep the learned template in sync."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def on_fit_end(self, trainer, pl_module) -> None:
        vec = pl_module.learnable_norm_vector().float()
        if vec.numel() == 0:
            return
        gathered = pl_module.all_gather(vec) if trainer.world_size > 1 else vec.unsqueeze(0)
        if trainer.is_global_zero:
            g = gathered.reshape(trainer.world_size, -1).cpu()
            diff = float((g - g[0]).abs().max())
            rec = {"world_size": trainer.world_size, "max_abs_difference": diff, "identical": diff == 0.0, "template_per_rank": g[:, :12].tolist()}
            atomic_write_bytes(self.run_dir / "ddp_check.json", json.dumps(rec, indent=2).encode())


class InterruptAfterEpochs(L.Callback):
    """Raises KeyboardInterrupt once ``n`` epochs are done (used by tests and to rehearse resuming)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch >= self.n:
            raise KeyboardInterrupt(f"simulated interruption at epoch {trainer.current_epoch}")


class StopAndSave(L.Callback):
    """On SIGTERM (what SLURM, Kubernetes and spot instances send before a kill) or Ctrl-C: save
    ``checkpoints/last.ckpt`` at the current step and say how to resume.

    Lightning stops at the end of the step in progress after a SIGTERM (``SIGTERMException``) and at
    once after Ctrl-C; both reach :meth:`on_exception`. The training loader's position (batches of the
    epoch already trained on) goes into the checkpoint (:class:`~.loaders.ResumableLoader`), so
    ``lstainnorm train --resume RUN`` continues from that step with the batches an uninterrupted run
    would see.
    """

    def __init__(self, run_dir: Path, train_loader: Any) -> None:
        self.run_dir = Path(run_dir)
        self.loader = train_loader
        self.stopped: str | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # No step of this epoch yet (a resumed epoch counts again from its first new batch; a stop
        # before that keeps the checkpoint it resumed from).
        self.loader.completed = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loader.completed = batch_idx + 1

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            self.stopped = "SIGTERM"
        elif isinstance(exception, KeyboardInterrupt):
            self.stopped = "SIGINT"
        else:
            return
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        epoch, step = trainer.current_epoch + 1, self.loader.completed
        path = self.run_dir / "checkpoints" / "last.ckpt"
        name = "SIGTERM" if self.stopped == "SIGTERM" else "Ctrl-C (SIGINT)"
        if step == 0:  # between epochs: the end-of-epoch last.ckpt (if any) already holds this state
            if path.is_file():
                log.warning("stopped by %s before epoch %d; resume with `lstainnorm train --resume %s`", name, epoch, self.run_dir)
            else:
                log.warning("stopped by %s before the first training step: nothing to resume", name)
            return
        trainer.save_checkpoint(path, weights_only=False)  # full state to resume from; explicit, so Lightning logs no default
        log.warning("stopped by %s at epoch %d step %d; checkpoint saved to %s; resume with `lstainnorm train --resume %s`",
                    name, epoch, step, path, self.run_dir)


class SignalAtBatch(L.Callback):
    """Sends this process a real signal after training batch ``batch`` of epoch ``epoch`` (counted
    from 0): how the tests rehearse a scheduler's SIGTERM (``LSTAINNORM_SIGNAL_AT=SIGTERM:EPOCH:BATCH``)."""

    def __init__(self, spec: str) -> None:
        name, epoch, batch = spec.split(":")
        self.signum, self.epoch, self.batch = getattr(__import__("signal"), name), int(epoch), int(batch)
        self.sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.sent and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            import os

            self.sent = True
            os.kill(os.getpid(), self.signum)
