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

import datetime as _dt
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from ..data.io import atomic_write_bytes
from ..data.tiles import save_class_map
from ..template import Template, estimate_template
from .callbacks import AtomicCheckpointIO, DDPConsistencyCallback, HistoryCallback, InterruptAfterEpochs
from .module import StainNormModule

__all__ = ["train", "run_dir_for", "RUN_DIR_ENV"]

log = logging.getLogger("lstainnorm")
RUN_DIR_ENV = "LSTAINNORM_RUN_DIR"


def _rank() -> int:
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if key in os.environ:
            try:
                return int(os.environ[key])
            except ValueError:
                pass
    return 0


def run_dir_for(cfg: DictConfig) -> Path:
    """A new run directory (shared with DDP child processes through an environment variable)."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    base = Path(cfg.output_path) / f"{stamp}_{cfg.postfix}"
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    path.mkdir(parents=True)
    os.environ[RUN_DIR_ENV] = str(path)
    return path


class _NoTips(logging.Filter):
    """Drop Lightning's advertising and device banners from the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.getMessage())
        return not (msg.startswith("💡") or " available: " in msg or msg.startswith("HPU available"))


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in lg.filters):
            lg.addFilter(_NoTips())


def _setup_logging(run_dir: Path) -> None:
    _quiet_lightning()
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler):
            log.removeHandler(h)
    fh = logging.FileHandler(run_dir / "train.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(fh)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in log.handlers):
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)
    log.propagate = False


def _template_spaces(cfg: DictConfig) -> list[str]:
    return [cfg.norm.space] if cfg.norm.mode in ("template", "learnable") else list(cfg.norm.spaces)


def resolve_initial_template(cfg: DictConfig, data, run_dir: Path):
    """The template the run starts from; ``auto`` estimates it on the training split."""
    from .build import resolve_template_setting

    path = run_dir / "template_init.yaml"
    if cfg.norm.templates == "auto" and not cfg.norm.template_values and cfg.norm.mode in ("template", "learnable", "lstainnorm"):
        if path.is_file():
            return Template.load(path)
        tpl = estimate_template_stream(cfg, data.template_source(), data.collate)
        if _rank() == 0:
            tpl.save(path)
        log.info("template estimated on %d training tiles: %s", tpl.meta.get("n_images", 0), path)
        return tpl
    tpl = resolve_template_setting(cfg.norm)
    if isinstance(tpl, Template) and _rank() == 0:
        tpl.save(path)
    return tpl


def resolve_augment_stats(cfg: DictConfig, data, run_dir: Path) -> dict | None:
    """RandStainNA's training-set stain statistics (saved as randstainna.yaml, reused on resume)."""
    if cfg.data.get("augment") != "randstainna":
        return None
    import yaml

    path = run_dir / "randstainna.yaml"
    if path.is_file():
        return yaml.safe_load(path.read_text())
    from torch.utils.data import DataLoader

    from ..augment import stain_statistics

    bs = cfg.data.batch_size if cfg.task == "classification" else 1
    loader = DataLoader(data.template_source(), batch_size=bs, shuffle=False, num_workers=cfg.data.num_workers, collate_fn=data.collate)
    stats = stain_statistics(loader, progress=cfg.trainer.progress)
    if _rank() == 0:
        atomic_write_bytes(path, yaml.safe_dump(stats, sort_keys=False).encode())
    log.info("RandStainNA statistics of %d training tiles: %s", stats["n_images"], path)
    return stats


def fit_classical(cfg: DictConfig, module: StainNormModule, data, run_dir: Path) -> None:
    """Fit a classical normaliser without a target image to a mosaic of training tiles."""
    norm = module.norm
    if not getattr(norm, "preprocessing", False) or norm.is_fitted:
        return
    from ..baselines import training_mosaic

    source = data.template_source()
    # The target depends on the training set only (not on the run's seed): runs that differ in
    # seed compare networks, not templates, and share the normalised-tile cache.
    picks = training_mosaic_indices(data.labels, 16, 0)
    imgs = [source[i]["image"] for i in picks]
    if cfg.task == "segmentation":  # whole images: take a tile-sized crop of each
        size = min(256, *(min(im.shape[-2:]) for im in imgs))
        imgs = [im[:, :size, :size] for im in imgs]
    imgs = [im for im in imgs if im is not None]
    mosaic = training_mosaic(imgs, n=len(imgs), seed=0)
    norm.fit(mosaic)
    from ..data.io import write_image

    if _rank() == 0:
        write_image(run_dir / "classical_target.png", (mosaic[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8"))
    log.info("%s fitted to a mosaic of %d training tiles (classical_target.png)", cfg.norm.mode, len(imgs))


def training_mosaic_indices(labels, n: int, seed: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    per = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
    out: list[int] = []
    while len(out) < min(n, len(labels)) and any(per):
        for p in per:
            if p and len(out) < n:
                out.append(p.pop())
    return out


def estimate_template_stream(cfg: DictConfig, train_ds, collate) -> Template:
    """Stream the training tiles through :func:`estimate_template` (batched, progress bar)."""
    from torch.utils.data import DataLoader

    bs = cfg.data.batch_size if cfg.task == "classification" else 1
    loader = DataLoader(train_ds, batch_size=bs, shuffle=False, num_workers=cfg.data.num_workers, collate_fn=collate)
    tpl = estimate_template(loader, spaces=_template_spaces(cfg), tissue_mask=True, progress=cfg.trainer.progress)
    tpl.meta["source"] = "training split"
    return tpl


def _json_default(o: Any):
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, (Path,)):
        return str(o)
    return str(o)


def _clean(o: Any) -> Any:
    if isinstance(o, float):
        return None if math.isnan(o) or math.isinf(o) else o
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def in_cross_summary(test: dict, train_centres: Sequence[str]) -> dict:
    """Tile-weighted accuracy over training centres (in-centre) and over the others (cross-centre)."""
    out = {}
    for name, sel in (("in_centre", lambda c: c in train_centres), ("cross_centre", lambda c: c not in train_centres)):
        parts = [(v["n"], v) for c, v in test.get("per_centre", {}).items() if sel(c) and v.get("n")]
        n = sum(p[0] for p in parts)
        if n:
            out[name] = {
                "n": n,
                "centres": [c for c, v in test["per_centre"].items() if sel(c)],
                **{m: sum(k * v[m] for k, v in parts) / n for m in ("acc", "bal_acc", "f1")},
            }
    return out


def save_normalization_grid(module: StainNormModule, datasets, path: Path, n: int = 8) -> Path | None:
    """Tiles before (top row) and after (bottom row) normalisation: validation tiles, and test
    tiles of other centres when there are any, taken round-robin over (centre, class)."""
    import numpy as np

    from ..data.io import write_image

    pools: dict[tuple, list] = {}
    for ds in datasets:
        if ds is None:
            continue
        centres = getattr(ds, "centres", None) or [""] * len(ds)
        labels = getattr(ds, "labels", None) or [0] * len(ds)
        for i in range(len(ds)):
            pools.setdefault((centres[i], labels[i]), []).append((ds, i))
    keys = sorted(pools, key=lambda k: (k[1], k[0]))
    picks: list = []
    while len(picks) < n and any(pools[k] for k in keys):
        for k in keys:
            if pools[k] and len(picks) < n:
                picks.append(pools[k].pop(0))
    items = [ds[i] for ds, i in picks]
    imgs = [it["image"] for it in items if it["image"] is not None]
    if not imgs:
        return None
    size = min(256, *(min(im.shape[-2:]) for im in imgs))  # whole segmentation images: a 256 crop each
    x = torch.stack([im[:, :size, :size] for im in imgs])
    module.eval()
    with torch.no_grad():
        y = module.normalize(x.to(module.device)).float().clamp(0, 1).cpu()
    gap = 2
    rows = []
    for t in (x, y):
        tiles = [(im.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8) for im in t]
        row = np.full((size, len(tiles) * (size + gap) - gap, 3), 255, np.uint8)
        for j, tile in enumerate(tiles):
            row[:, j * (size + gap) : j * (size + gap) + size] = tile
        rows.append(row)
    grid = np.concatenate([rows[0], np.full((gap, rows[0].shape[1], 3), 255, np.uint8), rows[1]])
    return write_image(path, grid)


def train(
    cfg: DictConfig,
    notes: Sequence[str] = (),
    resume: str | Path | None = None,
    extra_callbacks: Sequence[L.Callback] = (),
) -> dict:
    """Train (and test) one run; returns the content of ``metrics.json`` plus ``run_dir``."""
    t0 = time.time()
    if resume is not None:
        run_dir = Path(resume)
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"cannot resume {run_dir}: no checkpoints/last.ckpt (nothing to resume)")
        os.environ[RUN_DIR_ENV] = str(run_dir)
    else:
        run_dir = run_dir_for(cfg)
        last = None
    _setup_logging(run_dir)
    for n in notes:
        log.info(n)
    if cfg.trainer.threads:
        torch.set_num_threads(int(cfg.trainer.threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    if cfg.task == "segmentation":
        from .segment import build_segmentation_data

        data = build_segmentation_data(cfg)
    else:
        from .data import build_classification_data

        data = build_classification_data(cfg, cfg.seed)
    for n in data.notes:
        log.info(n)
    template = resolve_initial_template(cfg, data, run_dir)
    tpl_arg = template.to_config() if isinstance(template, Template) else template
    augment_stats = resolve_augment_stats(cfg, data, run_dir)
    container = OmegaConf.to_container(cfg, resolve=True)
    module = StainNormModule(container, data.classes, data.centres, tpl_arg, augment_stats)
    fit_classical(cfg, module, data, run_dir)
    if _rank() == 0:
        atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
        save_class_map(run_dir / "classes.json", data.classes)
    train_loader, val_loader, test_loader = data.loaders(cfg, cfg.seed)

    monitor = cfg.trainer.monitor if cfg.task == "classification" or cfg.trainer.monitor != "val/acc" else module.task.monitor
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
    if os.environ.get("LSTAINNORM_INTERRUPT_AFTER_EPOCHS"):
        callbacks.append(InterruptAfterEpochs(int(os.environ["LSTAINNORM_INTERRUPT_AFTER_EPOCHS"])))
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
        logger=False,
        enable_progress_bar=tr.progress,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
        num_sanity_val_steps=0,
    )
    log.info("run directory: %s", run_dir)
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(last) if last else None)

    best_path = ckpt.best_model_path or str(run_dir / "checkpoints" / "last.ckpt")
    best_score = ckpt.best_model_score
    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "best_checkpoint": best_path,
        "best_epoch": _best_epoch(run_dir, monitor, mode),
        "monitor": monitor,
        "best_val": float(best_score) if best_score is not None else None,
        "epochs_run": trainer.current_epoch,
        "stopped_early": bool(stop.stopped_epoch),
    }
    best = StainNormModule.load_from_checkpoint(best_path, map_location="cpu", weights_only=False)
    val_results = _evaluate_loader(trainer, best, val_loader)
    results["val"] = val_results
    if test_loader is not None:
        test = _evaluate_loader(trainer, best, test_loader)
        results["test"] = test
        if cfg.task == "classification":
            results.update(in_cross_summary(test, data.train_centres))
    skipped = sorted(set(module.skipped) | set(best.skipped))
    if trainer.world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            lists: list = [None] * trainer.world_size
            dist.all_gather_object(lists, skipped)
            skipped = sorted({p for lst in lists for p in lst})
    results["skipped_files"] = skipped
    if hasattr(module.norm, "stats"):
        results["norm_fallbacks"] = {"train": module.norm.stats(), "evaluation": best.norm.stats()}
    results["template"] = best.template_record()
    results["train_centres"] = list(data.train_centres)
    results["seconds"] = round(time.time() - t0, 1)
    if trainer.is_global_zero:
        grid = save_normalization_grid(best, [data.val, data.test], run_dir / "normalization.png")
        results["normalization_grid"] = str(grid) if grid else None
        atomic_write_bytes(run_dir / "metrics.json", json.dumps(_clean(results), indent=2, default=_json_default).encode())
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
    import csv

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
                best, epoch = v, int(row["epoch"])
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
        key = "acc" if "acc" in v else "dice"
        lines.append(f"  centre {c:<8}: {key} {_f(v.get(key))} (n={v.get('n')})")
    for name in ("in_centre", "cross_centre"):
        if name in res:
            lines.append(f"{name.replace('_', '-'):<14}: acc {_f(res[name]['acc'])} over centres {res[name]['centres']}")
    lines.append(f"skipped files : {len(res.get('skipped_files', []))}")
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
