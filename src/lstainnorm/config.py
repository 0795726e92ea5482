"""Run configuration: a documented schema with defaults (OmegaConf structured config).

Load a YAML file with :func:`load_config`, apply ``key=value`` overrides, and get a
validated config. Unknown or misspelt keys, wrong types and invalid choices are errors
that name the key and list the valid choices. The reference implementation's flat
config files (``train_root``, ``prenorm``, ``SA3``, ``mu0_lab``, ...) are recognised and
mapped onto this schema (:func:`map_reference_config`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, cast, get_args

try:
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError
except ModuleNotFoundError:  # the core install: configs are read and validated with the [train] extra;
    OmegaConf = None  # a trained run's saved config still loads (config_from_dict), as plain dataclasses
    DictConfig = ListConfig = ConfigKeyError = OmegaConfBaseException = ValidationError = type("_Absent", (Exception,), {})

from .baselines.augment import AUGMENT_MODES
from .layers.color import list_spaces
from .layers.fusion import FUSIONS
from .layers.registry import list_norms
from .layers.stain import STAIN_MODES

__all__ = [
    "Config",
    "DataConfig",
    "NormConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainerConfig",
    "SegmentationConfig",
    "ConfigError",
    "load_config",
    "resolve_config",
    "packaged_configs",
    "make_config",
    "map_reference_config",
    "config_from_dict",
    "to_dict",
    "REFERENCE_KEYS",
    "TaskName",
    "TASKS",
    "LOGGER_CHOICES",
    "TTA_VIEWS",
    "logger_names",
]

# Closed choices are Literals; open ones come from their registries (norm.mode from
# lstainnorm.layers.registry, spaces from lstainnorm.layers.color), so a plugin extends them.
# OmegaConf types the fields as str; _check_choices validates them against these.
TaskName = Literal["classification", "segmentation"]
TASKS: tuple[str, ...] = get_args(TaskName)
# trainer.logger: Lightning's experiment loggers (lstainnorm.tasks.loggers builds them).
LOGGER_CHOICES = ("csv", "tensorboard", "mlflow", "wandb")


def logger_names(setting: Any) -> list[str]:
    """``trainer.logger`` (a name, a comma-separated string, a list, ``none`` or null) as a list."""
    if setting is None:
        return []
    items = [setting] if isinstance(setting, str) else list(setting)
    names: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip().lower()
            if name and name not in ("none", "false") and name not in names:
                names.append(name)
    return names


# data.balance: how the training loop treats class imbalance.
BALANCE_CHOICES = ("none", "sampler", "loss")

# norm.compile: "auto" compiles the layer for long training runs where torch.compile works (eager otherwise).
COMPILE_CHOICES = ("auto", "true", "false")

# trainer.tta: the views a classifier's probabilities are averaged over at test time (tasks.classify).
TTA_VIEWS = ("none", "flips", "dihedral")


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key and the valid choices."""


@dataclass
class DataConfig:
    """Where the tiles come from.

    Either folders (``train``/``val``/``test``: ImageFolder trees ``root/CLASS/*.png``), or a
    ``manifest`` CSV (``path, class, centre, split, group``) with centre selections. ``columns`` maps
    those names onto a CSV's own headers (e.g. ``{path: file, class: label, centre: domain, split:
    authors_split, group: slide}``), so a CSV is read as it is. Rows whose split is ``train_split``
    train, ``val_split`` validate, ``test_split`` test; ``test_split: null`` tests every row of
    ``test_centres`` (centres never trained on: a held-out scanner or hospital). Without validation
    rows, ``val_fraction`` of the training tiles is held out, seeded: whole groups (slides) when the
    manifest has a group column, so crops of one slide never straddle training and validation;
    stratified by class otherwise. ``balance`` handles class imbalance: ``sampler`` (each epoch
    draws the training tiles with class-balanced probabilities), ``loss`` (cross-entropy weighted by
    inverse class frequency) or ``none``. ``center_crop`` keeps the central square of each tile
    (before ``image_size`` resizes it). ``split_seed`` seeds that held-out validation split (default
    null: the run's ``seed``); a fixed value keeps one validation split across seeds, so that seeds
    differ in the network's randomness only, not also in which slides train. The grouped split keeps
    each centre's share of every class (stratified by class and centre). ``epoch_size`` (classification):
    training tiles per epoch (default null: the training set's size); a fixed number gives every protocol
    the same number of steps whatever its training set (a held-out-scanner protocol trains on fewer
    tiles), so one schedule in epochs fits all.
    """

    train: Optional[str] = None
    val: Optional[str] = None
    test: Optional[str] = None
    manifest: Optional[str] = None
    columns: Optional[dict[str, str]] = None
    train_split: str = "train"
    val_split: str = "val"
    test_split: Optional[str] = "test"
    train_centres: Optional[list[str]] = None
    val_centres: Optional[list[str]] = None
    test_centres: Optional[list[str]] = None
    val_fraction: float = 0.2
    image_size: Optional[int] = None
    center_crop: Optional[int] = None
    batch_size: int = 64
    eval_batch_size: Optional[int] = None
    num_workers: int = 0
    strict: bool = False
    hflip: bool = True
    vflip: bool = True
    augment: str = "none"
    augment_strength: float = 1.0
    balance: str = "none"
    split_seed: Optional[int] = None
    epoch_size: Optional[int] = None


@dataclass
class NormConfig:
    """The normalisation layer in front of the network.

    ``mode``: none | template | learnable | lstainnorm | stain | reinhard | macenko | vahadane.
    ``templates``: null (each space's default), ``auto`` (estimated on the training split
    before training), ``reference`` (the reference implementation's numbers), the path
    of a template YAML, or the path of one image (estimated on its tissue, as a classical
    normaliser's target); ``template_values`` gives numbers directly (``mu0_lab: [...]``,
    ``sigma0_lab: [...]``, ...), and ``mu0``/``sigma0`` the template of a single-space
    layer. Classical modes (reinhard, macenko, vahadane) fit to the image ``target`` or, when it
    is null, to the training tiles (Reinhard: the mean of their Lab statistics, as ``template``;
    Macenko, Vahadane: a mosaic of 16 tiles); ``cache_dir`` keeps their normalised tiles between runs.
    ``fusion`` (lstainnorm): ``attention`` (the method) or ``mean`` (the plain mean of the branches,
    an ablation); ``learn_template: false`` freezes LStainNorm's branch templates (fusion still learns).
    ``lr`` is relative: each branch's learning rate is ``lr`` times its
    template's mean std, so one value suits Lab (units ~10) and RGB (units ~0.1) alike.
    ``compile``: ``auto`` (default) runs the layer through ``torch.compile`` in training runs of at
    least 500 steps, where the one-off compilation pays for itself (1.7x faster forward+backward
    and a fraction of the memory on a CPU, BENCHMARKS.md), and falls back to eager with a warning
    where compilation fails; ``true`` compiles every run and the apply commands; ``false`` never.
    ``LSTAINNORM_COMPILE=0`` turns ``auto`` off for a whole session.
    ``stains`` (mode ``stain``, :class:`lstainnorm.layers.stain.StainConcentrationNorm`): the H and E
    vectors of the optical-density normalisation: ``estimate`` (each image's own, Macenko),
    ``ruifrok`` (fixed standard vectors) or ``learned`` (learned from Ruifrok's); its template
    amounts learn unless ``learn_template: false``. ``stain_first: true`` (modes template, learnable,
    lstainnorm) runs that normalisation as a first stage, before the colour spaces: it undoes a
    change of the H/E ratio, which no per-channel standardisation does (BENCHMARKS.md);
    ``stain_learnable`` (default: as the layer's templates) whether that stage's amounts learn:
    ``false`` spares the gradient back through every colour space, most of the stage's cost.
    ``stats_by`` (default null: each tile's own statistics; modes template, learnable, lstainnorm,
    classification): ``centre`` or ``group`` (the manifest's group column, e.g. the slide)
    standardises every tile by the colour statistics pooled over its centre's (group's) tiles
    in its split, each split's from its own tiles (:mod:`lstainnorm.tasks.group_stats`).
    """

    mode: str = "lstainnorm"
    space: str = "lab"
    spaces: list[str] = field(default_factory=lambda: ["lab", "hsv", "rgb"])
    templates: Optional[str] = None
    template_values: Optional[dict[str, list[float]]] = None
    mu0: Optional[list[float]] = None
    sigma0: Optional[list[float]] = None
    tissue_stats: bool = False
    fusion: str = "attention"
    learn_template: bool = True
    lr: float = 5e-3
    weight_decay: float = 0.0
    schedule: str = "step"
    step_size: int = 2
    gamma: float = 0.9
    compile: str = "auto"
    target: Optional[str] = None
    cache_dir: Optional[str] = None
    stains: str = "estimate"
    stain_first: bool = False
    stain_learnable: Optional[bool] = None
    stats_by: Optional[str] = None


@dataclass
class ModelConfig:
    """The task network: a timm backbone (classification) or an smp U-Net encoder (segmentation;
    ``decoder_channels`` sets the U-Net decoder's widths, default smp's (256, 128, 64, 32, 16))."""

    backbone: str = "resnet18"
    pretrained: bool = False
    weights: Optional[str] = None
    drop_rate: float = 0.0
    decoder_channels: Optional[list[int]] = None


@dataclass
class OptimConfig:
    """AdamW for the network; cosine annealing as the reference (lr 5e-4 to 5e-6, T_max 10).

    ``warmup_epochs`` (default 0: none, as the reference) ramps every group's learning rate linearly
    over that many epochs' optimiser steps (fractions allowed); the schedules then step per optimiser
    step, keeping their per-epoch values. ``ema_decay`` (default null: off) keeps an exponential
    moving average of all weights, the layer's included, updated every step (Lightning's
    ``EMAWeightAveraging``): validation, the best checkpoint and the test use the averaged weights,
    which move less from one epoch to the next than the raw ones. Its horizon is about
    ``1 / (1 - ema_decay)`` steps: 0.99 averages about the last 100.
    """

    lr: float = 5e-4
    weight_decay: float = 1e-5
    scheduler: str = "cosine"
    T_max: int = 10
    min_lr: float = 5e-6
    warmup_epochs: float = 0.0
    ema_decay: Optional[float] = None


@dataclass
class TrainerConfig:
    """Lightning Trainer settings (``devices=2 strategy=ddp`` for multi-GPU or multi-process).

    ``logger``: Lightning experiment loggers, one name or a list of ``csv`` (default; ``history.csv``
    is written whatever this says), ``tensorboard``, ``mlflow``, ``wandb``, or ``none``; each writes
    under ``RUN/logs/`` and works offline (the last three need ``pip install 'lstainnorm[NAME]'``).

    ``threshold`` (classification, two classes): ``argmax`` (default) decides for the more probable
    class; ``val`` decides by the threshold on class 1's probability that maximises the best
    checkpoint's validation balanced accuracy, then applies it to the test tiles (and to ``evaluate``
    and ``stress`` of the run): balanced accuracy then no longer hinges on how the network's
    probabilities happen to be calibrated at the chosen epoch. ``metrics.json`` records it.

    ``tta`` (classification): test-time augmentation of the chosen checkpoint. ``none`` (default)
    predicts from the tile as it is; ``flips`` averages the class probabilities over the tile and its
    horizontal, vertical and double flips (4 views); ``dihedral`` over those and their transposes (all
    8 rotations and reflections). It applies to the chosen checkpoint's validation and test metrics,
    to ``evaluate``, ``stress`` and the run's predictions; the validation of every epoch, which picks
    the checkpoint, sees one view (so training, and the checkpoint chosen, do not depend on it).
    Inference costs 4x or 8x.
    """

    max_epochs: int = 100
    patience: int = 8
    monitor: str = "val/acc"
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    deterministic: bool = False
    log_every_n_steps: int = 10
    limit_train_batches: Optional[float] = None
    limit_val_batches: Optional[float] = None
    progress: bool = True
    threads: Optional[int] = None
    logger: Any = "csv"
    threshold: str = "argmax"
    tta: str = "none"


@dataclass
class SegmentationConfig:
    """Nuclei segmentation (``task: segmentation``): data layout, crops, sliding window, post-processing."""

    root: Optional[str] = None
    images: str = "images"
    masks: str = "masks_instance"
    split_file: Optional[str] = None
    split_column: Optional[str] = None
    test_values: list[str] = field(default_factory=list)
    val_values: list[str] = field(default_factory=list)
    scale: float = 1.0
    crop: int = 256
    samples_per_image: int = 8
    window: int = 256
    overlap: float = 0.25
    threshold: float = 0.5
    watershed: bool = True
    min_size: int = 10


@dataclass
class Config:
    """A training run. See each section's docstring; ``lstainnorm train --help`` prints them all."""

    task: str = "classification"
    seed: int = 42
    output_path: str = "runs"
    postfix: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)


# --- the reference implementation's flat keys ----------------------------------------------------
REFERENCE_KEYS = (
    "seed", "device", "train_root", "test_root", "output_path", "postfix", "model", "pretrained",
    "prenorm", "temnorm", "SA3", "num_workers", "batch_size", "learning_rate", "weight_decay",
    "min_learning_rate", "T_max", "gamma", "epochs", "patience", "scheduler", "scheduler_norm",
    "mu0", "sigma0", "mu0_hsv", "sigma0_hsv", "mu0_lab", "sigma0_lab", "mu0_rgb", "sigma0_rgb",
)
_REFERENCE_ONLY = {"device", "train_root", "test_root", "prenorm", "temnorm", "SA3", "learning_rate",
                   "min_learning_rate", "epochs", "scheduler_norm"}


def is_reference_config(raw: dict) -> bool:
    return any(k in raw for k in _REFERENCE_ONLY) and not any(
        isinstance(raw.get(s), dict) for s in ("data", "norm", "optim", "trainer")
    )


def map_reference_config(raw: dict) -> tuple[dict, list[str]]:
    """Map a reference ``config-*.yaml`` onto the schema. Returns (config dict, notes)."""
    unknown = [k for k in raw if k not in REFERENCE_KEYS]
    if unknown:
        raise ConfigError(_unknown_message(unknown[0], list(REFERENCE_KEYS), "reference config"))
    out: dict = {"data": {}, "norm": {}, "model": {}, "optim": {}, "trainer": {}}
    notes = []
    simple = {
        "seed": ("seed",), "output_path": ("output_path",), "postfix": ("postfix",),
        "model": ("model", "backbone"), "pretrained": ("model", "pretrained"),
        "num_workers": ("data", "num_workers"), "batch_size": ("data", "batch_size"),
        "learning_rate": ("optim", "lr"), "weight_decay": ("optim", "weight_decay"),
        "min_learning_rate": ("optim", "min_lr"), "T_max": ("optim", "T_max"),
        "gamma": ("norm", "gamma"), "epochs": ("trainer", "max_epochs"), "patience": ("trainer", "patience"),
        "train_root": ("data", "train"), "test_root": ("data", "test"),
    }
    for key, path in simple.items():
        if key in raw and raw[key] is not None:
            d = out
            for p in path[:-1]:
                d = d.setdefault(p, {})
            d[path[-1]] = raw[key]
    if "device" in raw:
        dev = str(raw["device"]).lower()
        # "cuda" becomes "auto": the GPU when there is one, else the CPU (with Lightning's notice).
        out["trainer"]["accelerator"] = "cpu" if dev == "cpu" else "auto"
    sched = raw.get("scheduler")
    if sched is not None:
        s = str(sched).lower()
        out["optim"]["scheduler"] = "cosine" if "cos" in s else "none" if s in ("none", "false", "0") else "cosine"
    sn = raw.get("scheduler_norm")
    if sn is not None:
        s = str(sn).lower()
        out["norm"]["schedule"] = "step" if "step" in s or s in ("true", "1") else "none" if s in ("none", "false", "0") else "step"
    flags = [k for k in ("SA3", "prenorm", "temnorm") if raw.get(k)]
    if len(flags) > 1:
        raise ConfigError(f"reference config sets {flags} together; choose one of SA3, prenorm, temnorm")
    mode = {"SA3": "lstainnorm", "prenorm": "learnable", "temnorm": "template"}.get(flags[0] if flags else "", "none")
    out["norm"]["mode"] = mode
    if mode in ("learnable", "template"):
        out["norm"]["space"] = "lab"
        mu = raw.get("mu0_lab", raw.get("mu0"))
        sd = raw.get("sigma0_lab", raw.get("sigma0"))
        if mu is not None:
            out["norm"]["mu0"] = list(mu)
        if sd is not None:
            out["norm"]["sigma0"] = list(sd)
    elif mode == "lstainnorm":
        tpl = {k: list(raw[k]) for k in ("mu0_lab", "sigma0_lab", "mu0_hsv", "sigma0_hsv", "mu0_rgb", "sigma0_rgb") if raw.get(k) is not None}
        if tpl:
            out["norm"]["template_values"] = tpl
    notes.append(
        f"reference config detected: mapped {len([k for k in raw if k in REFERENCE_KEYS])} keys onto the "
        f"lstainnorm schema (norm.mode={mode}); the best checkpoint is chosen on a validation split carved "
        "from train_root, not on test_root"
    )
    return out, notes


# --- loading and validation --------------------------------------------------------------------------
def _unknown_message(key: str, valid: Sequence[str], where: str) -> str:
    close = difflib.get_close_matches(key.split(".")[-1], list(valid), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{key}' in {where}{hint} (valid keys: {sorted(valid)})"


def _section_keys(cfg: DictConfig, dotted: str) -> tuple[str, list[str]]:
    parts = dotted.split(".")
    node: Any = cfg
    where = "config"
    for p in parts[:-1]:
        if isinstance(node, DictConfig) and p in node and isinstance(node[p], DictConfig):
            node = node[p]
            where = p if where == "config" else f"{where}.{p}"
        else:
            break
    return where, list(node.keys()) if isinstance(node, DictConfig) else []


def _check_choices(cfg: DictConfig) -> None:
    def choose(key: str, value: Any, choices: Sequence[str]) -> None:
        if value not in choices:
            raise ConfigError(f"{key}: invalid value {value!r}; choose one of {list(choices)}")

    choose("task", cfg.task, TASKS)
    choose("norm.mode", cfg.norm.mode, list_norms())
    choose("norm.space", cfg.norm.space, list_spaces())
    for s in cfg.norm.spaces:
        choose("norm.spaces", s, list_spaces())
    choose("norm.fusion", cfg.norm.fusion, FUSIONS)
    choose("norm.stains", cfg.norm.stains, STAIN_MODES)
    if cfg.norm.stain_first and cfg.norm.mode not in ("template", "learnable", "lstainnorm"):
        raise ConfigError(f"norm.stain_first adds a stain stage to the layers template, learnable and lstainnorm, "
                          f"not to norm.mode={cfg.norm.mode} (norm.mode=stain is that stage alone)")
    if cfg.norm.stain_learnable is not None and not cfg.norm.stain_first:
        raise ConfigError("norm.stain_learnable says whether the stain stage's amounts learn; it needs norm.stain_first: true "
                          "(norm.mode=stain learns its amounts unless norm.learn_template: false)")
    if cfg.norm.stats_by is not None:
        choose("norm.stats_by", cfg.norm.stats_by, ("centre", "group"))
        if cfg.norm.mode not in ("template", "learnable", "lstainnorm") or cfg.norm.stain_first:
            raise ConfigError(f"norm.stats_by standardises by pooled colour statistics: it needs norm.mode template, learnable or "
                              f"lstainnorm without norm.stain_first (got norm.mode={cfg.norm.mode}, stain_first={cfg.norm.stain_first})")
        if cfg.task != "classification":
            raise ConfigError(f"norm.stats_by is for classification tiles; task={cfg.task} standardises each image by its own statistics")
    choose("norm.schedule", cfg.norm.schedule, ("step", "cosine", "none"))
    # YAML true/false arrive as "True"/"False" in this str field.
    cfg.norm.compile = str(cfg.norm.compile).lower()
    choose("norm.compile", cfg.norm.compile, COMPILE_CHOICES)
    choose("optim.scheduler", cfg.optim.scheduler, ("cosine", "none"))
    choose("data.augment", cfg.data.augment, AUGMENT_MODES)
    choose("data.balance", cfg.data.balance, BALANCE_CHOICES)
    choose("trainer.threshold", cfg.trainer.threshold, ("argmax", "val"))
    if cfg.trainer.threshold == "val" and cfg.task != "classification":
        raise ConfigError(f"trainer.threshold=val decides between two classes; task={cfg.task} has no class threshold")
    choose("trainer.tta", cfg.trainer.tta, TTA_VIEWS)
    if cfg.trainer.tta != "none" and cfg.task != "classification":
        raise ConfigError(f"trainer.tta averages a classifier's probabilities over flipped tiles; task={cfg.task} has no such option "
                          "(set trainer.tta=none)")
    if cfg.task != "classification" and cfg.data.balance != "none":
        raise ConfigError(f"data.balance={cfg.data.balance} applies to classification only (task: {cfg.task})")
    if cfg.data.epoch_size is not None:
        if cfg.task != "classification":
            raise ConfigError(f"data.epoch_size sets the training tiles per epoch of classification; task={cfg.task} trains on its images")
        if int(cfg.data.epoch_size) < 1:
            raise ConfigError(f"data.epoch_size must be at least 1 (tiles per training epoch), got {cfg.data.epoch_size}")
    if cfg.data.columns is not None:
        from .data.tiles import MANIFEST_COLUMNS

        for name in cfg.data.columns:
            choose("data.columns", name, MANIFEST_COLUMNS)
    if cfg.data.manifest and cfg.data.test_split is None:
        if not cfg.data.test_centres:
            raise ConfigError("data.test_split: null tests every row of data.test_centres; name the held-out centres in data.test_centres")
        overlap = sorted(set(cfg.data.test_centres) & set(cfg.data.train_centres or []))
        if overlap or not cfg.data.train_centres:
            raise ConfigError(
                "data.test_split: null tests every row of data.test_centres, which must not train: "
                + (f"centres {overlap} are in both data.train_centres and data.test_centres" if overlap
                   else "set data.train_centres to the other centres")
            )
    lg = cfg.trainer.logger
    for name in logger_names(list(lg) if isinstance(lg, ListConfig) else lg):
        choose("trainer.logger", name, LOGGER_CHOICES)
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    for key in ("data.batch_size", "trainer.max_epochs", "optim.T_max", "norm.step_size"):
        sec, name = key.split(".")
        if cfg[sec][name] < 1:
            raise ConfigError(f"{key} must be at least 1, got {cfg[sec][name]}")
    if not cfg.optim.warmup_epochs >= 0:
        raise ConfigError(f"optim.warmup_epochs must be >= 0, got {cfg.optim.warmup_epochs}")
    if cfg.optim.ema_decay is not None and not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay must be in [0, 1) (0 or null: no averaging), got {cfg.optim.ema_decay}")
    for key in ("optim.lr", "norm.lr"):
        sec, name = key.split(".")
        if not cfg[sec][name] >= 0:
            raise ConfigError(f"{key} must be >= 0, got {cfg[sec][name]}")
    positive = {"data.image_size": cfg.data.image_size, "data.center_crop": cfg.data.center_crop, "data.eval_batch_size": cfg.data.eval_batch_size,
                "segmentation.crop": cfg.segmentation.crop, "segmentation.window": cfg.segmentation.window,
                "segmentation.samples_per_image": cfg.segmentation.samples_per_image}
    for key, v in positive.items():
        if v is not None and v < 1:
            raise ConfigError(f"{key} must be at least 1 (pixels or items), got {v}")
    for key, v in {"data.num_workers": cfg.data.num_workers, "trainer.patience": cfg.trainer.patience}.items():
        if v < 0:
            raise ConfigError(f"{key} must be >= 0, got {v}")
    if not 0.0 <= cfg.segmentation.overlap < 1.0:
        raise ConfigError(f"segmentation.overlap must be in [0, 1), got {cfg.segmentation.overlap}")
    if not 0.0 < cfg.segmentation.threshold < 1.0:
        raise ConfigError(f"segmentation.threshold must be in (0, 1), got {cfg.segmentation.threshold}")
    if not cfg.segmentation.scale > 0:
        raise ConfigError(f"segmentation.scale must be > 0, got {cfg.segmentation.scale}")
    if cfg.norm.mu0 is not None and len(cfg.norm.mu0) != 3:
        raise ConfigError(f"norm.mu0 must have 3 values, got {list(cfg.norm.mu0)}")
    if cfg.norm.sigma0 is not None and len(cfg.norm.sigma0) != 3:
        raise ConfigError(f"norm.sigma0 must have 3 values, got {list(cfg.norm.sigma0)}")


# Keys a release removed. Saved runs' config.yaml files still carry them: their "off" value is dropped
# with a note; asking for what was removed is an error that says why it went.
REMOVED_KEYS = {
    "norm.consistency": "the consistency term (measured in 0.1.0) was removed: on AMi-Br it moved balanced accuracy by -0.021, "
                        "+0.006 and +0.007 (three protocols, three seeds, none resolved) and it doubled the layer's "
                        "training cost; delete the key",
    "norm.consistency_strength": "it set the consistency term's re-staining, removed with the term; delete the key",
}


def _is_off(value: Any) -> bool:
    try:
        return float(value) == 0.0
    except (TypeError, ValueError):
        return False


def _drop_removed(raw: dict, overrides: Sequence[str], notes: list[str]) -> list[str]:
    """``raw`` without the keys of :data:`REMOVED_KEYS` (in place) and ``overrides`` without them."""
    kept = []
    for ov in overrides:
        key, _, value = ov.partition("=")
        if key.strip() in REMOVED_KEYS:
            if key.strip() == "norm.consistency" and not _is_off(value):
                raise ConfigError(f"override {ov!r}: {REMOVED_KEYS[key.strip()]}")
            notes.append(f"override {ov!r} ignored: {REMOVED_KEYS[key.strip()]}")
            continue
        kept.append(ov)
    norm = raw.get("norm")
    if isinstance(norm, dict):
        for key in [k for k in norm if f"norm.{k}" in REMOVED_KEYS]:
            value = norm.pop(key)
            if key == "consistency" and not _is_off(value):
                raise ConfigError(f"norm.consistency: {value!r}: {REMOVED_KEYS['norm.consistency']}")
            notes.append(f"norm.{key} ignored: {REMOVED_KEYS['norm.' + key]}")
    return kept


def make_config(raw: dict | None = None, overrides: Sequence[str] = ()) -> tuple[Config, list[str]]:
    """Build a validated config from a dict (a loaded YAML) and ``key=value`` overrides.

    Returns ``(config, notes)``; notes say, for example, that a reference config was mapped.
    """
    _need_omegaconf("reading a config")
    raw = dict(raw or {})
    notes: list[str] = []
    if is_reference_config(raw):
        raw, notes = map_reference_config(raw)
    if isinstance(raw.get("norm"), dict):
        raw["norm"] = dict(raw["norm"])  # the caller's dict stays as it was
    overrides = _drop_removed(raw, overrides, notes)
    schema = OmegaConf.structured(Config)
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.create(raw))
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as err:
        raise _rephrase(err, schema) from None
    dotlist = []
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key=value (e.g. trainer.max_epochs=5)")
        dotlist.append(ov)
    if dotlist:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
        except (ConfigKeyError, ValidationError, OmegaConfBaseException) as err:
            raise _rephrase(err, cfg) from None
    _check_choices(cfg)
    # A DictConfig backed by the Config schema: typed as Config (OmegaConf's structured-config idiom).
    return cast(Config, cfg), notes


def _rephrase(err: Exception, cfg: DictConfig) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = str(getattr(err, "msg", "") or err).split("\n")[0]
    if isinstance(err, ConfigKeyError) or "not in" in msg:
        where, valid = _section_keys(cfg, key)
        return ConfigError(_unknown_message(key, valid, where))
    if isinstance(err, ValidationError):
        return ConfigError(f"{key}: {msg}")
    return ConfigError(f"{key or 'config'}: {msg}")


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_configs() -> dict[str, Path]:
    """The configs that ship with lstainnorm, by name (``classify``, ``segment``, ``demo``)."""
    return {p.stem: p for p in sorted(PACKAGED_CONFIGS.glob("*.yaml"))}


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file: the path if it exists, else a packaged config of that name (``classify`` or
    ``classify.yaml``). Raises FileNotFoundError naming both and the packaged names."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = packaged_configs()
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if path.parent == Path(".") and name in packaged:
        return packaged[name]
    raise FileNotFoundError(f"config file not found: {path} (and no packaged config of that name: {sorted(packaged)}; "
                            "`lstainnorm configs` lists them)")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> tuple[Config, list[str]]:
    """Read a YAML config (ours or the reference's; a path, or the name of a packaged config), apply
    overrides, validate."""
    _need_omegaconf(f"reading config {path}")
    raw: dict = {}
    if path is not None:
        path = resolve_config(path)
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception as err:
            raise ConfigError(f"{path}: not a valid YAML config ({err})") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
        raw = loaded
    try:
        return make_config(raw, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None


def config_from_dict(saved: dict) -> Config:
    """A config saved by a run (``config.yaml``, a checkpoint's hyper-parameters) back on the schema.

    Keys the schema gained since the run was saved get their defaults; keys it lost
    (:data:`REMOVED_KEYS`, training-only settings) are dropped.
    """
    if isinstance(saved.get("norm"), dict):
        saved = {**saved, "norm": {k: v for k, v in saved["norm"].items() if f"norm.{k}" not in REMOVED_KEYS}}
    if OmegaConf is None:
        return _plain_config(saved)
    try:
        return cast(Config, OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(saved)))
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as err:
        raise _rephrase(err, OmegaConf.structured(Config)) from None


def _need_omegaconf(what: str) -> None:
    if OmegaConf is None:
        raise ModuleNotFoundError(f"{what} needs omegaconf, which this install leaves out: pip install 'lstainnorm[train]'", name="omegaconf")


def _plain_config(saved: dict) -> Config:
    """A saved config as the schema's dataclasses, without OmegaConf (the core install loading a trained
    layer): known keys of each section set, the rest at their defaults, unknown keys dropped."""
    import dataclasses

    def build(cls, values: Any):
        values = values if isinstance(values, dict) else {}
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            kw[f.name] = build(f.default_factory, values[f.name]) if dataclasses.is_dataclass(f.default_factory) else values[f.name]
        return cls(**kw)

    return build(Config, saved)


def to_dict(cfg: Config) -> dict:
    """The config as plain data (what checkpoints and ``config.yaml`` store)."""
    return cast(dict, OmegaConf.to_container(cast(DictConfig, cfg), resolve=True))


def schema_help() -> str:
    """Every key with its default, for ``--help``."""
    return OmegaConf.to_yaml(OmegaConf.structured(Config))

