"""``lstainnorm train``: one run from a config to a run directory.

Run directory ``output_path/<YYYYmmdd_HHMMSS>_<postfix>/``::

    config.yaml              the resolved config (rerun with `lstainnorm train config.yaml`)
    train.log                the log
    classes.json             class names and indices
    template_init.yaml       the initial template (estimated when norm.templates=auto)
    checkpoints/best.ckpt    best validation epoch;  checkpoints/last.ckpt  for --resume
    history.csv              per epoch: losses, metrics, learning rates, the learned template
    template_history.jsonl   the template (natural units) and fusion weights per epoch
    metrics.json             best epoch, validation and test metrics (overall and per centre)
    normalization.png        validation tiles before (top) and after (bottom) normalisation
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import shutil
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
import yaml
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ..baselines.augment import stain_statistics
from ..baselines.classical import mosaic_indices, training_mosaic
from ..config import Config, ConfigError, to_dict
from ..data.io import tensor_to_image, write_image
from ..data.tiles import save_class_map
from ..files import atomic_write_bytes, sweep_stale_temps
from ..layers.stain import StainConcentrationNorm
from ..layers.template import Template, estimate_template
from ..runs import AUTO_COMPILE_MIN_STEPS, RUN_DIR_ENV, code_version, compile_norm, load_checkpoint, new_run_dir, resolve_template_setting, write_json
from .base import monitored_metric
from .callbacks import STOPPED_EXIT, AtomicCheckpointIO, DDPConsistencyCallback, HistoryCallback, InterruptAfterEpochs, SignalAtBatch, StopAndSave
from .classify import best_threshold, in_cross_summary, write_predictions
from .evaluate import load_module, quiet_lightning
from .group_stats import with_group_stats
from .loggers import ExperimentLogCallback, build_loggers, check_logger_extras, logger_names
from .loaders import ClassificationData, SegmentationData, build_data, class_weights, sample_tiles
from .module import TASKS, StainNormModule
from .seeding import derive_seed

__all__ = ["train", "RUN_DIR_ENV"]

log = logging.getLogger("lstainnorm")
Data = ClassificationData | SegmentationData


def _rank() -> int:
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if key in os.environ:
            try:
                return int(os.environ[key])
            except ValueError:
                pass
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each message (as logging's last-resort handler does),
    not to the stream of the first run: a caller that redirects stderr between runs keeps its output."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(run_dir: Path) -> None:
    quiet_lightning()
    log.setLevel(logging.INFO)
    _close_log()
    fh = logging.FileHandler(run_dir / "train.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(fh)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in log.handlers):
        sh = _StderrHandler()
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)
    log.propagate = False


def _close_log() -> None:
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler):
            h.close()
            log.removeHandler(h)


def _template_spaces(cfg: Config) -> list[str]:
    return [cfg.norm.space] if cfg.norm.mode in ("template", "learnable") else list(cfg.norm.spaces)


def _image_loader(cfg: Config, data: Data) -> DataLoader:
    """The training images in order, for template and stain statistics (whole images for segmentation)."""
    bs = cfg.data.batch_size if cfg.task == "classification" else 1
    return DataLoader(data.template_source(), batch_size=bs, shuffle=False, num_workers=cfg.data.num_workers, collate_fn=data.collate)


def resolve_initial_template(cfg: Config, data: Data, run_dir: Path) -> Template | str | None:
    """The template the run starts from; ``auto`` estimates it on the training split (once: a
    resumed run reads ``template_init.yaml``)."""
    path = run_dir / "template_init.yaml"
    if cfg.norm.templates == "auto" and not cfg.norm.template_values and cfg.norm.mode in ("template", "learnable", "lstainnorm"):
        if path.is_file():
            return Template.load(path)
        # With a stain stage the branches see stain-normalised tiles: the template describes those.
        stage = StainConcentrationNorm(cfg.norm.stains, learnable=False) if cfg.norm.stain_first else None
        tpl = estimate_template(_image_loader(cfg, data), spaces=_template_spaces(cfg), tissue_mask=True,
                                progress=cfg.trainer.progress, transform=stage)
        tpl.meta["source"] = "training split"
        if _rank() == 0:
            tpl.save(path)
        log.info("template estimated on %d training tiles: %s", tpl.meta.get("n_images", 0), path)
        return tpl
    tpl = resolve_template_setting(cfg.norm)
    if isinstance(tpl, Template) and _rank() == 0:
        tpl.save(path)
    return tpl


def resolve_augment_stats(cfg: Config, data: Data, run_dir: Path) -> dict | None:
    """RandStainNA's training-set stain statistics (saved as randstainna.yaml, reused on resume)."""
    if cfg.data.augment != "randstainna":
        return None
    path = run_dir / "randstainna.yaml"
    if path.is_file():
        return yaml.safe_load(path.read_text())
    stats = stain_statistics(_image_loader(cfg, data), progress=cfg.trainer.progress)
    if _rank() == 0:
        atomic_write_bytes(path, yaml.safe_dump(stats, sort_keys=False).encode())
    log.info("RandStainNA statistics of %d training tiles: %s", stats["n_images"], path)
    return stats


def pool_statistics(cfg: Config, module: StainNormModule, data: Data) -> None:
    """norm.stats_by: each split's tiles carry the colour statistics pooled over their centre (group) in that split."""
    by, tissue = cfg.norm.stats_by, cfg.norm.tissue_stats
    for split in ("train", "val", "test"):
        ds = getattr(data, split)
        if ds is not None:
            setattr(data, split, with_group_stats(ds, module.norm, by, tissue=tissue))
    log.info("norm.stats_by=%s: tiles standardised by the statistics of their %s (train %d, validation %d, test %d of them), "
             "each split's from its own tiles", by, by, *(len(getattr(data, s).table) if getattr(data, s) is not None else 0
                                                          for s in ("train", "val", "test")))


def fit_classical(cfg: Config, module: StainNormModule, data: Data, run_dir: Path) -> None:
    """Fit a classical normaliser without a target image to the training tiles: Reinhard to the
    mean of their Lab statistics (as the layers' templates), Macenko and Vahadane to a mosaic."""
    norm = module.norm
    if not getattr(norm, "preprocessing", False) or norm.is_fitted:
        return
    if cfg.norm.mode == "reinhard" and getattr(norm, "backend", "") == "torch-staintools":
        n = 0

        def batches():
            nonlocal n
            for b in _image_loader(cfg, data):
                x = b.get("image")
                if x is not None and x.shape[0]:
                    n += x.shape[0]
                    yield x

        norm.fit_tiles(batches())
        st = norm.target_stats.tolist()
        if _rank() == 0:
            atomic_write_bytes(run_dir / "classical_target.yaml", yaml.safe_dump({"lab_mean": st[0], "lab_std": st[1], "n_tiles": n}).encode())
        log.info("reinhard fitted to the mean Lab statistics of %d training tiles (classical_target.yaml)", n)
        return
    source = data.template_source()
    # The target depends on the training set only (not on the run's seed): runs that differ in
    # seed compare networks, not templates, and share the normalised-tile cache.
    imgs = [source[i]["image"] for i in mosaic_indices(data.labels, 16, 0)]
    imgs = [im for im in imgs if im is not None]
    if cfg.task == "segmentation":  # whole images: take a tile-sized crop of each
        size = min(256, *(min(im.shape[-2:]) for im in imgs))
        imgs = [im[:, :size, :size] for im in imgs]
    mosaic = training_mosaic(imgs, n=len(imgs), seed=0)
    norm.fit(mosaic)
    if _rank() == 0:
        write_image(run_dir / "classical_target.png", tensor_to_image(mosaic[0]))
    log.info("%s fitted to a mosaic of %d training tiles (classical_target.png)", cfg.norm.mode, len(imgs))


def save_normalization_grid(module: StainNormModule, data: Data, path: Path, n: int = 8) -> Path | None:
    """Tiles before (top row) and after (bottom row) normalisation: validation tiles, and test
    tiles of other centres when there are any, taken round-robin over (class, centre)."""
    picked = sample_tiles(data, n, with_stats=True)
    if picked is None:
        return None
    x, stats = picked  # stats: with norm.stats_by, the tiles' centres' (as the network saw them)
    module.eval()
    with torch.no_grad():
        st = None if stats is None else {s: (m.to(module.device), v.to(module.device)) for s, (m, v) in stats.items()}
        y = module.normalize(x.to(module.device), st).float().cpu()
    gap, size = 2, x.shape[-1]
    rows = []
    for t in (x, y):
        row = np.full((size, len(t) * (size + gap) - gap, 3), 255, np.uint8)
        for j, tile in enumerate(tensor_to_image(t)):
            row[:, j * (size + gap) : j * (size + gap) + size] = tile
        rows.append(row)
    grid = np.concatenate([rows[0], np.full((gap, rows[0].shape[1], 3), 255, np.uint8), rows[1]])
    return write_image(path, grid)


def _start(cfg: Config, resume: str | Path | None) -> tuple[Path, Path | None]:
    """The run folder and, when resuming, the checkpoint to continue from."""
    if resume is None:
        return new_run_dir(cfg.output_path, cfg.postfix), None
    run_dir = Path(resume)
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(f"cannot resume {run_dir}: no checkpoints/last.ckpt (nothing to resume)")
    sweep_stale_temps(run_dir)  # half-written checkpoints and tables of the run that was killed
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir, last


def _make_trainer(cfg: Config, run_dir: Path, monitor: str, extra_callbacks: Sequence[L.Callback]) -> tuple[L.Trainer, Any, Any]:
    """The Lightning Trainer of a run; returns it with its best-checkpoint and early-stopping callbacks."""
    mode = "min" if "loss" in monitor else "max"
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", monitor=monitor, mode=mode, save_top_k=1,
        save_last=False, auto_insert_metric_name=False, enable_version_counter=False,
    )
    # A separate, unmonitored checkpoint rewritten after every epoch: what --resume continues from
    # (Lightning's save_last only follows improvements of the monitored metric).
    last_ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
        auto_insert_metric_name=False, enable_version_counter=False,
    )
    stop = L.pytorch.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=cfg.trainer.patience)
    callbacks: list[L.Callback] = [ckpt, last_ckpt, stop, HistoryCallback(run_dir), DDPConsistencyCallback(run_dir), *extra_callbacks]
    if cfg.optim.ema_decay:
        # Before the checkpoints: they save the averaged weights it puts into the state dict.
        callbacks.insert(0, L.pytorch.callbacks.EMAWeightAveraging(decay=float(cfg.optim.ema_decay)))
    loggers = build_loggers(logger_names(cfg.trainer.logger), run_dir)
    if loggers:
        callbacks += [L.pytorch.callbacks.LearningRateMonitor(logging_interval="epoch"), ExperimentLogCallback()]
    if os.environ.get("LSTAINNORM_INTERRUPT_AFTER_EPOCHS"):
        callbacks.append(InterruptAfterEpochs(int(os.environ["LSTAINNORM_INTERRUPT_AFTER_EPOCHS"])))
    if os.environ.get("LSTAINNORM_SIGNAL_AT"):  # tests: a real signal at a given step
        callbacks.append(SignalAtBatch(os.environ["LSTAINNORM_SIGNAL_AT"]))
    tr = cfg.trainer
    trainer = L.Trainer(
        max_epochs=tr.max_epochs,
        accelerator=tr.accelerator,
        devices=tr.devices,
        strategy=tr.strategy,
        num_nodes=tr.num_nodes,
        precision=tr.precision,
        deterministic=tr.deterministic,
        log_every_n_steps=tr.log_every_n_steps,
        limit_train_batches=tr.limit_train_batches,
        limit_val_batches=tr.limit_val_batches,
        callbacks=callbacks,
        logger=loggers or False,
        enable_progress_bar=tr.progress,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
        num_sanity_val_steps=0,
    )
    return trainer, ckpt, stop


def _all_skipped(trainer: L.Trainer, *modules: StainNormModule) -> list[str]:
    """Unreadable files met by any module on any DDP rank."""
    skipped = sorted(set().union(*(m.skipped for m in modules)))
    if trainer.world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            lists: list = [None] * trainer.world_size
            dist.all_gather_object(lists, skipped)
            skipped = sorted({p for lst in lists for p in lst})
    return skipped


def _suggest(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _planned_steps(cfg: Config, train_loader) -> int | None:
    """Optimiser steps the run will take at most (epochs x batches per epoch), or None if unknown."""
    try:
        per_epoch = len(train_loader)
    except TypeError:
        return None
    limit = cfg.trainer.limit_train_batches
    if limit is not None:
        per_epoch = min(per_epoch, int(limit) if limit > 1 else max(1, int(per_epoch * limit)))
    return int(per_epoch * cfg.trainer.max_epochs)


def preflight(cfg: Config) -> None:
    """Checks of values the schema cannot know (backbone names, the monitored metric, the GPU),
    before anything is written: a failed start leaves no half-made run folder."""
    import timm

    name = cfg.model.backbone
    if cfg.task == "segmentation":
        import segmentation_models_pytorch as smp

        encoders = smp.encoders.get_encoder_names()
        if name not in encoders and not (name.startswith("tu-") and timm.is_model(name[3:])):
            raise ConfigError(f"model.backbone: unknown segmentation encoder {name!r}{_suggest(name, encoders)} "
                              "(any segmentation-models-pytorch encoder, or tu-<timm model>)")
    elif not timm.is_model(name):
        raise ConfigError(f"model.backbone: unknown timm model {name!r}{_suggest(name, timm.list_models())}")
    task = TASKS[cfg.task]
    monitor = monitored_metric(cfg, task)
    if monitor not in task.metrics:
        raise ConfigError(f"trainer.monitor: {cfg.task} logs no metric {monitor!r}{_suggest(monitor, task.metrics)}; choose one of {list(task.metrics)}")
    try:
        check_logger_extras(logger_names(cfg.trainer.logger))
    except ImportError as err:
        raise ConfigError(str(err)) from None
    if str(cfg.trainer.accelerator).lower() in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={cfg.trainer.accelerator} but no CUDA GPU is visible on this machine; use auto or cpu")


def _stop_start(signum, frame) -> None:
    raise SystemExit(STOPPED_EXIT["SIGTERM"])


def _on_sigterm(handler):
    """Install a SIGTERM handler (main thread only; elsewhere nothing changes); returns the previous one."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or handler is None:
        return None
    return signal.signal(signal.SIGTERM, handler)


def _finished(run_dir: Path) -> dict | None:
    """The results of a run that already ended (its metrics.json), or None."""
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None



def _remove_run_dir(run_dir: Path) -> None:
    """Remove a new run's folder that holds nothing to resume (a failed start, a stop before the first step)."""
    _close_log()
    shutil.rmtree(run_dir, ignore_errors=True)
    os.environ.pop(RUN_DIR_ENV, None)

def train(
    cfg: Config,
    notes: Sequence[str] = (),
    resume: str | Path | None = None,
    extra_callbacks: Sequence[L.Callback] = (),
) -> dict:
    """Train (and test) one run; returns the content of ``metrics.json`` plus ``run_dir``."""
    t0 = time.time()
    if resume is not None and (done := _finished(Path(resume))) is not None:
        print(f"{resume} has already finished (metrics.json): nothing to resume, nothing changed")
        return {**done, "run_dir": str(resume)}
    if resume is not None:
        last = Path(resume) / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"cannot resume {resume}: no checkpoints/last.ckpt (nothing to resume)")
        load_checkpoint(last)  # refuses a file that is not plain data before Lightning reads it
    preflight(cfg)
    data = build_data(cfg)  # before the run folder: bad data leaves nothing behind
    run_dir, last = _start(cfg, resume)
    # Until Lightning takes SIGTERM over (at fit), a SIGTERM ends the start like any failure: a new run
    # folder is removed (nothing in it to resume), a resumed one kept as it was.
    previous = _on_sigterm(_stop_start)
    try:
        _setup_logging(run_dir)
        for n in list(notes) + list(data.notes):
            log.info(n)
        if cfg.trainer.threads:
            torch.set_num_threads(int(cfg.trainer.threads))
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        template = resolve_initial_template(cfg, data, run_dir)
        tpl_arg = template.to_config() if isinstance(template, Template) else template
        weights = None
        if cfg.task == "classification" and cfg.data.balance == "loss":
            weights = class_weights(data.labels, len(data.classes))
            log.info("data.balance=loss: cross-entropy weights %s for classes %s", [round(w, 3) for w in weights], data.classes)
        elif cfg.task == "classification" and cfg.data.balance == "sampler":
            log.info("data.balance=sampler: each epoch draws the %d training tiles with class-balanced probabilities", len(data.labels))
        module = StainNormModule(to_dict(cfg), data.classes, data.centres, tpl_arg, resolve_augment_stats(cfg, data, run_dir), weights)
        fit_classical(cfg, module, data, run_dir)
        if _rank() == 0:
            atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
            save_class_map(run_dir / "classes.json", data.classes)
        if cfg.norm.stats_by:
            pool_statistics(cfg, module, data)
        train_loader, val_loader, test_loader = data.loaders(cfg, cfg.seed)
        steps = _planned_steps(cfg, train_loader)
        compile_norm(module.norm, cfg.norm.compile, training=True, steps=steps)
        if getattr(module.norm, "is_compiled", False):
            log.info("norm.compile=%s: the normalisation layer runs through torch.compile (%s training steps; the first steps compile it)",
                     cfg.norm.compile, steps if steps is not None else "unknown number of")
        elif str(cfg.norm.compile) == "auto" and hasattr(module.norm, "enable_compile"):
            log.info("norm.compile=auto: the normalisation layer runs eagerly (%s training steps, fewer than the %d where "
                     "compiling pays off; norm.compile=true compiles anyway)", steps, AUTO_COMPILE_MIN_STEPS)
        monitor = monitored_metric(cfg, module.task)
        stopper = StopAndSave(run_dir, train_loader)
        trainer, ckpt, stop = _make_trainer(cfg, run_dir, monitor, [stopper, *extra_callbacks])
    except BaseException:
        if resume is None and _rank() == 0:  # a start that failed leaves no half-made run folder
            _remove_run_dir(run_dir)
        raise
    finally:
        _on_sigterm(previous)
    log.info("run directory: %s", run_dir)
    # The training loop's own stream (dropout and anything else that draws from the global generator),
    # independent of how many numbers the set-up above drew.
    L.seed_everything(derive_seed(cfg.seed, "fit"), workers=True, verbose=False)
    try:
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(last) if last else None)
    except SystemExit:
        # Lightning ends a SIGTERM with SystemExit (code None, i.e. 0) and Ctrl-C with exit code 1.
        # StopAndSave saved the step and logged how to resume; a new run stopped before its first
        # step has nothing to resume and is removed. SIGTERM exits 128 + 15, as schedulers expect.
        if stopper.stopped and resume is None and not (run_dir / "checkpoints" / "last.ckpt").is_file() and _rank() == 0:
            _remove_run_dir(run_dir)
        if stopper.stopped == "SIGTERM":
            _close_log()
            raise SystemExit(STOPPED_EXIT["SIGTERM"]) from None
        raise

    best_path = ckpt.best_model_path or str(run_dir / "checkpoints" / "last.ckpt")
    best_score = ckpt.best_model_score
    mode = "min" if "loss" in monitor else "max"
    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "best_checkpoint": best_path,
        "best_epoch": _best_epoch(run_dir, monitor, mode),
        "monitor": monitor,
        "best_val": float(best_score) if best_score is not None else None,
        "epochs_run": trainer.current_epoch,
        "stopped_early": bool(stop.stopped_epoch),
    }
    best = load_module(best_path)
    results["val"] = _evaluate_loader(trainer, best, val_loader)
    val_predictions = results["val"].pop("predictions", None)
    if cfg.task == "classification" and cfg.trainer.threshold == "val":
        # The decision threshold of the chosen checkpoint, fitted on validation only (test never enters).
        t = best_threshold(torch.tensor(val_predictions["probs"]), torch.tensor(val_predictions["label"])) if val_predictions else None
        results["threshold"] = t
        if t is None:
            log.info("trainer.threshold=val: no threshold (validation lacks a class, or there are more than two): argmax decides")
        else:
            best.task.threshold = t
            results["val"] = _evaluate_loader(trainer, best, val_loader)
            results["val"].pop("predictions", None)
            log.info("trainer.threshold=val: %s where p(%s) >= %.4f (validation balanced accuracy %.4f)",
                     data.classes[1], data.classes[1], t, results["val"]["overall"]["bal_acc"])
    if test_loader is not None:
        results["test"] = _evaluate_loader(trainer, best, test_loader)
        preds = results["test"].pop("predictions", None)
        if preds is not None and trainer.is_global_zero:
            results["test_predictions"] = str(write_predictions(run_dir / "test_predictions.csv", preds, data.test, data.classes))
        if cfg.task == "classification":
            results.update(in_cross_summary(results["test"], data.train_centres))
    results["skipped_files"] = _all_skipped(trainer, module, best)
    if hasattr(module.norm, "stats"):
        results["norm_fallbacks"] = {"train": module.norm.stats(), "evaluation": best.norm.stats()}
    results["template"] = best.template_record()
    results["train_centres"] = list(data.train_centres)
    results["seconds"] = round(time.time() - t0, 1)
    results["code"] = code_version()
    if trainer.is_global_zero:
        grid = save_normalization_grid(best, data, run_dir / "normalization.png")
        results["normalization_grid"] = str(grid) if grid else None
        write_json(run_dir / "metrics.json", results)
        log.info(summary(results))
    return results


def _evaluate_loader(trainer: L.Trainer, module: StainNormModule, loader) -> dict:
    """Test ``module`` on ``loader`` (a fresh single-process Trainer, or the DDP trainer itself)."""
    if trainer.world_size > 1:
        ev = trainer
    else:
        ev = L.Trainer(
            accelerator=trainer.accelerator, devices=1, logger=False, precision=trainer.precision,
            enable_progress_bar=trainer.progress_bar_callback is not None, enable_model_summary=False,
        )
    ev.test(module, loader, verbose=False)
    return getattr(module, "test_results", {})


def _best_epoch(run_dir: Path, monitor: str, mode: str) -> int | None:
    """The epoch (counted from 1) whose validation ``monitor`` was best, from ``history.csv``."""
    path = run_dir / "history.csv"
    if not path.is_file():
        return None
    best, epoch = None, None
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            v = row.get(monitor)
            if v in (None, ""):
                continue
            v = float(v)
            if best is None or (v > best if mode == "max" else v < best):
                best, epoch = v, int(row["epoch"]) + 1  # counted from 1, as the log's "epoch 1/N"
    return epoch


def summary(res: dict) -> str:
    """The short end-of-run summary."""
    lines = ["", "=== lstainnorm run summary ==="]
    lines.append(f"run directory : {res['run_dir']}")
    lines.append(f"best epoch    : {res.get('best_epoch')} ({res.get('monitor')} = {_f(res.get('best_val'))}); epochs run: {res.get('epochs_run')}")
    test = res.get("test", {})
    ov = test.get("overall", {})
    if "acc" in ov:
        lines.append(f"test          : acc {_f(ov['acc'])}  bal_acc {_f(ov['bal_acc'])}  macro-F1 {_f(ov['f1'])}  AUROC {_f(ov.get('auroc'))}  (n={ov['n']})")
    elif "dice" in ov:
        lines.append(f"test          : Dice {_f(ov['dice'])}  IoU {_f(ov['iou'])}  AJI {_f(ov.get('aji'))}  PQ {_f(ov.get('pq'))}  (n={ov.get('n')})")
    for c, v in test.get("per_centre", {}).items():
        if not c:  # class-folder data has no centres
            continue
        if "acc" in v:
            lines.append(f"  centre {c:<8}: acc {_f(v['acc'])}  bal_acc {_f(v.get('bal_acc'))}  AUROC {_f(v.get('auroc'))} (n={v.get('n')})")
        else:
            lines.append(f"  centre {c:<8}: dice {_f(v.get('dice'))} (n={v.get('n')})")
    for name in ("in_centre", "cross_centre"):
        if name in res:
            lines.append(f"{name.replace('_', '-'):<14}: acc {_f(res[name]['acc'])} over centres {res[name]['centres']}")
    lines.append(f"skipped files : {len(res.get('skipped_files', []))}" + "".join(f"\n  unreadable: {p}" for p in res.get("skipped_files", [])))
    if res.get("norm_fallbacks"):
        fb = res["norm_fallbacks"]
        lines.append(
            f"{fb['train']['method']} fallbacks: {fb['train']['fallbacks']} of {fb['train']['normalised']} training tiles, "
            f"{fb['evaluation']['fallbacks']} of {fb['evaluation']['normalised']} evaluated tiles passed through unnormalised"
        )
    lines.append(f"outputs       : metrics.json, history.csv, checkpoints/best.ckpt, normalization.png in {res['run_dir']}")
    return "\n".join(lines)


def _f(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
