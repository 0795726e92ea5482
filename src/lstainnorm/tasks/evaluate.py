"""``lstainnorm evaluate`` and ``lstainnorm predict``: a trained run on new data.

Checkpoints are read through :mod:`lstainnorm.runs` (as data only); the whole module
(normalisation layer and task network) is rebuilt from the run's config and weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from torch.utils.data import DataLoader, Dataset

from ..config import TTA_VIEWS
from ..data.segmentation import SegmentationDataset, collate_segmentation, split_records
from ..data.tiles import TileFolder, collate_tiles
from ..runs import find_checkpoint, load_checkpoint, run_dir_of, write_json
from .classify import in_cross_summary, write_predictions
from .group_stats import with_group_stats
from .loaders import resize_transform, segmentation_records
from .module import StainNormModule

__all__ = ["load_module", "evaluate", "evaluation_data"]


def load_module(run_or_ckpt: str | Path) -> StainNormModule:
    """The trained module of a run (or checkpoint file), in eval mode, on the CPU.

    The checkpoint is loaded as plain data (:func:`lstainnorm.runs.load_checkpoint`); the module
    is rebuilt from the hyper-parameters stored in it, then given its weights.
    """
    ckpt_path = find_checkpoint(run_or_ckpt)
    ckpt = load_checkpoint(ckpt_path)
    try:
        module = StainNormModule(**ckpt["hyper_parameters"])
        module.load_state_dict(ckpt["state_dict"])
    except (TypeError, KeyError, RuntimeError) as err:
        raise ValueError(f"cannot load checkpoint {ckpt_path}: {type(err).__name__}: {err}") from err
    # trainer.threshold=val: the run's decision threshold (fitted on its validation tiles) decides here too.
    metrics = run_dir_of(ckpt_path) / "metrics.json"
    if module.cfg.task == "classification" and module.cfg.trainer.threshold == "val" and metrics.is_file():
        try:
            t = json.loads(metrics.read_text()).get("threshold")
        except ValueError:
            t = None
        if isinstance(t, (int, float)):
            module.task.threshold = float(t)  # type: ignore[attr-defined]
    return module.eval()


class _NoTips(logging.Filter):
    """Drop Lightning's advertising and device banners from the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.getMessage())
        return not (msg.startswith("💡") or " available: " in msg or msg.startswith("HPU available"))


def quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in lg.filters):
            lg.addFilter(_NoTips())


def _test(module: StainNormModule, ds: Dataset, collate, batch_size: int, progress: bool) -> dict:
    quiet_lightning()
    n = module.cfg.norm
    ds = with_group_stats(ds, module.norm, n.stats_by, tissue=n.tissue_stats)  # the evaluated tiles' own statistics
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=0)
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=progress, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.test(module, loader, verbose=False)
    return dict(module.test_results)


def _with_centres(module: StainNormModule, centres: Sequence[str]) -> None:
    """Add the data's centres to the module's list (per-centre metrics), keeping its order."""
    extra = sorted(set(centres) - set(module.centres))
    module.centres = module.centres + extra
    module.task.centres = module.centres


def evaluation_data(
    module: StainNormModule, data: Path, split: str | None = None, centres: Sequence[str] | None = None,
    batch_size: int | None = None,
) -> tuple[Dataset, Any, int]:
    """``(dataset, collate, batch size)`` of ``data`` as the run's task evaluates it (tiles resized to
    the training size; segmentation images whole, one per batch); adds the data's centres to the module."""
    cfg = module.cfg
    if cfg.task == "segmentation":
        recs = segmentation_records(data, cfg)
        if split is not None:  # the run's own split (split file or metadata column)
            s = cfg.segmentation
            if not (s.split_file or s.split_column):
                raise ValueError("a split of a segmentation run needs the run's segmentation.split_file or split_column; "
                                 "without one, give a folder that holds only the images to evaluate")
            kw = {"split_file": s.split_file} if s.split_file else {"column": s.split_column, "test_values": list(s.test_values), "val_values": list(s.val_values)}
            recs = split_records(recs, split, **kw)
            if not recs:
                raise ValueError(f"no images of split {split!r} in {data}")
        _with_centres(module, [r.centre for r in recs])
        return SegmentationDataset(recs, scale=cfg.segmentation.scale), collate_segmentation, 1
    tf = resize_transform(cfg.data.image_size, cfg.data.center_crop)
    if data.suffix.lower() == ".csv":  # read with the run's column names (data.columns)
        cols = cfg.data.columns
        ds = TileFolder.from_manifest(data, split=split, centres=centres, classes=module.classes, transform=tf,
                                      columns=dict(cols) if cols else None)
    else:
        ds = TileFolder(data, classes=module.classes, transform=tf)
    _with_centres(module, ds.centres)
    return ds, collate_tiles, batch_size or cfg.data.eval_batch_size or cfg.data.batch_size


def data_name(prefix: str, data: Path, split: str | None, centres: Sequence[str] | None) -> str:
    """``<prefix>_<data name>-<hash>``: one name per data set and selection, never shared by two
    (``eval_...json`` of evaluate, ``stress_...`` folders of stress)."""
    key = json.dumps([str(data.resolve()), split, sorted(centres) if centres else None])
    return f"{prefix}_{data.stem if data.suffix else data.name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def evaluate(
    run_or_ckpt: str | Path,
    data: str | Path,
    *,
    split: str | None = None,
    centres: Sequence[str] | None = None,
    out: str | Path | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    tta: str | None = None,
) -> dict:
    """Evaluate a trained run on ``data`` and write the result JSON.

    Classification: a class-folder tree or a manifest CSV (``split``, ``centres`` select from
    it); ``tta`` (``none``, ``flips``, ``dihedral``) overrides the run's ``trainer.tta``.
    Segmentation: a folder with ``images/`` and ``masks/`` (or MoNuSeg's layout).
    Unreadable images are skipped with a warning and listed in the result. The JSON goes to
    ``out`` (default ``RUN_DIR/eval_<data name>-<hash of data, split, centres>.json``, with
    ``_tta-<views>`` where ``tta`` differs from the run's).
    """
    ckpt = find_checkpoint(run_or_ckpt)
    module = load_module(ckpt)
    cfg = module.cfg
    own_tta = cfg.trainer.tta
    if tta is not None:
        if tta not in TTA_VIEWS:
            raise ValueError(f"tta must be one of {list(TTA_VIEWS)}, got {tta!r}")
        if tta != "none" and cfg.task != "classification":
            raise ValueError(f"tta={tta!r} averages a classifier's probabilities; {run_or_ckpt} is a {cfg.task} run")
        cfg.trainer.tta = tta
    data = Path(data)
    ds, collate, bs = evaluation_data(module, data, split=split, centres=centres, batch_size=batch_size)
    res = _test(module, ds, collate, bs, progress)
    if cfg.task != "segmentation" and cfg.data.train_centres:
        res.update(in_cross_summary(res, list(cfg.data.train_centres)))
    res["checkpoint"] = str(ckpt)
    res["data"] = str(data)
    res["skipped_files"] = sorted(module.skipped)
    res["tta"] = cfg.trainer.tta
    suffix = f"_tta-{cfg.trainer.tta}" if cfg.trainer.tta != own_tta else ""
    out = Path(out) if out else run_dir_of(ckpt) / (data_name("eval", data, split, centres) + suffix + ".json")
    preds = res.pop("predictions", None)
    if preds is not None:
        res["predictions"] = str(write_predictions(out.with_name(out.stem + "_predictions.csv"), preds, ds, module.classes))
    write_json(out, res)
    res["output"] = str(out)
    return res
