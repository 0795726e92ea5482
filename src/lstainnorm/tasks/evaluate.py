"""``lstainnorm evaluate``: a trained run (or checkpoint) on a new tile folder or manifest."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import lightning as L
from torch.utils.data import DataLoader

from ..data.io import atomic_write_bytes
from ..data.tiles import TileFolder, collate_tiles
from .data import resize_transform
from .module import StainNormModule
from .train import _clean, _json_default, in_cross_summary

__all__ = ["find_checkpoint", "load_module", "evaluate"]


def find_checkpoint(run_or_ckpt: str | Path) -> Path:
    """``RUN_DIR`` -> ``RUN_DIR/checkpoints/best.ckpt`` (else ``last.ckpt``); a file is used as is."""
    p = Path(run_or_ckpt)
    if p.is_file():
        return p
    if p.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            c = p / "checkpoints" / name
            if c.is_file():
                return c
        raise FileNotFoundError(f"no checkpoints/best.ckpt or last.ckpt in run directory {p}")
    raise FileNotFoundError(f"run directory or checkpoint not found: {p}")


def load_module(run_or_ckpt: str | Path) -> StainNormModule:
    ckpt = find_checkpoint(run_or_ckpt)
    try:
        module = StainNormModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"cannot load checkpoint {ckpt}: {type(err).__name__}: {err}") from err
    module.eval()
    return module


def evaluate(
    run_or_ckpt: str | Path,
    data: str | Path,
    *,
    split: str | None = None,
    centres: Sequence[str] | None = None,
    out: str | Path | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate a trained classifier on ``data`` (a class-folder tree or a manifest CSV).

    Unreadable images are skipped with a warning and listed in the result. Writes the result
    JSON (default: ``RUN_DIR/eval_<data name>.json``) and returns it.
    """
    ckpt = find_checkpoint(run_or_ckpt)
    module = load_module(ckpt)
    cfg = module.cfg
    if cfg.task != "classification":
        from .segment import evaluate_segmentation

        return evaluate_segmentation(module, ckpt, data, out=out, progress=progress)
    tf = resize_transform(cfg.data.image_size)
    data = Path(data)
    if data.suffix.lower() == ".csv":
        ds = TileFolder.from_manifest(data, split=split, centres=centres, classes=module.classes, transform=tf)
    else:
        ds = TileFolder(data, classes=module.classes, transform=tf)
    if not module.centres:
        module.centres = sorted(set(ds.centres))
        module.task.centres = module.centres
    else:
        extra = sorted(set(ds.centres) - set(module.centres))
        if extra:
            module.centres = module.centres + extra
            module.task.centres = module.centres
    loader = DataLoader(ds, batch_size=batch_size or cfg.data.eval_batch_size or cfg.data.batch_size, shuffle=False, collate_fn=collate_tiles, num_workers=0)
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=progress, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.test(module, loader, verbose=False)
    res = dict(module.test_results)
    res.update(in_cross_summary(res, list(cfg.data.train_centres or [])) if cfg.data.train_centres else {})
    res["checkpoint"] = str(ckpt)
    res["data"] = str(data)
    res["skipped_files"] = sorted(module.skipped)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    out = Path(out) if out else run_dir / f"eval_{data.stem if data.suffix else data.name}.json"
    atomic_write_bytes(out, json.dumps(_clean(res), indent=2, default=_json_default).encode())
    res["output"] = str(out)
    return res
