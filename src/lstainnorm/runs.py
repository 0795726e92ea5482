"""Run folders and checkpoints: the one place that reads and writes them.

A run folder (``output_path/<YYYYmmdd_HHMMSS>_<postfix>/``, made by ``lstainnorm train``)
holds ``config.yaml``, ``checkpoints/best.ckpt`` and ``last.ckpt``, ``metrics.json``,
``history.csv`` and the other files listed in :mod:`lstainnorm.tasks.train`. This module:

- finds a run's checkpoint (:func:`find_checkpoint`) and loads it as data only
  (:func:`load_checkpoint`: ``torch.load(weights_only=True)``, so a file cannot run code);
- builds the normalisation layer of a config (:func:`build_norm`) and loads a run's trained
  layer alone, without the Lightning module or the task network (:func:`load_norm`);
- makes new run folders (:func:`new_run_dir`) and writes result JSON (:func:`write_json`).

Everything that uses a trained run (``evaluate``, ``normalize --run``, ``export``, ``report``,
``predict``) goes through here.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .config import Config, NormConfig, config_from_dict
from .files import atomic_write_bytes
from .layers.registry import create_norm
from .data.io import is_image_file, read_rgb
from .layers.template import REFERENCE_TEMPLATES, Template, estimate_template

__all__ = [
    "RUN_DIR_ENV",
    "TrainedNorm",
    "find_checkpoint",
    "run_dir_of",
    "load_checkpoint",
    "resolve_template_setting",
    "build_norm",
    "compile_mode",
    "compile_norm",
    "COMPILE_ENV",
    "AUTO_COMPILE_MIN_STEPS",
    "load_norm",
    "new_run_dir",
    "write_json",
    "CheckpointError",
]

# Shared with DDP child processes, so that every rank writes into the same run folder.
RUN_DIR_ENV = "LSTAINNORM_RUN_DIR"


class CheckpointError(ValueError):
    """A file is not a checkpoint lstainnorm can load as data; the message names it."""


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


def run_dir_of(ckpt: Path) -> Path:
    """The run folder a checkpoint belongs to (its parent's parent for ``checkpoints/*.ckpt``)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's content as plain data: tensors, numbers, strings, lists and dicts.

    Loaded with ``torch.load(weights_only=True)``: a file whose pickle would construct other
    objects (and so could run code) is refused with :class:`CheckpointError`, never executed.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any content (junk text ends in KeyError/IndexError): plain data or refused
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, (KeyError, IndexError, UnicodeDecodeError)):  # what pickle makes of plain text
            reason = "not a PyTorch checkpoint file"
        raise CheckpointError(
            f"{path} is not a trusted lstainnorm checkpoint: it cannot be loaded as plain data ({reason})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt.get("hyper_parameters", {}):
        raise CheckpointError(f"{path} is not an lstainnorm checkpoint (no state_dict and run config in it)")
    return ckpt


def resolve_template_setting(ncfg: NormConfig) -> Template | str | None:
    """The template a config asks for, except ``auto`` (estimated later on the training data)."""
    if ncfg.template_values:
        return Template.from_config(dict(ncfg.template_values))
    t = ncfg.templates
    if t in (None, "", "auto"):
        return None
    if t == "reference":
        return "reference"
    if is_image_file(t):  # one target image, as for a classical normaliser
        return template_from_image(t, spaces=_template_spaces_of(ncfg))
    return Template.load(t)


def _template_spaces_of(ncfg: NormConfig) -> list[str]:
    return list(ncfg.spaces) if ncfg.mode == "lstainnorm" else [ncfg.space]


def template_from_image(path: str | Path, spaces: Sequence[str]) -> Template:
    """The template of one image's tissue (what a classical normaliser fits to: one target image)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"norm.templates: image not found: {path}")
    tpl = estimate_template([read_rgb(path)], spaces=spaces, tissue_mask=True, progress=False)
    tpl.meta["source"] = f"image {path.name}"
    return tpl


def _norm_kwargs(ncfg: NormConfig, template: Template | str | None) -> dict[str, Any]:
    mode = ncfg.mode
    if mode == "none":
        return {}
    if mode in ("template", "learnable"):
        mu0, sigma0 = None, None
        if isinstance(template, Template) and ncfg.space in template:
            mu0, sigma0 = template[ncfg.space]
        elif template == "reference" and ncfg.space == "lab":
            mu0, sigma0 = REFERENCE_TEMPLATES["single"]["lab"]
        if ncfg.mu0 is not None:
            mu0 = list(ncfg.mu0)
        if ncfg.sigma0 is not None:
            sigma0 = list(ncfg.sigma0)
        return {"space": ncfg.space, "mu0": mu0, "sigma0": sigma0, "tissue_stats": ncfg.tissue_stats,
                "stain_first": ncfg.stains if ncfg.stain_first else None, "stain_learnable": ncfg.stain_learnable}
    if mode == "lstainnorm":
        return {
            "spaces": tuple(ncfg.spaces), "templates": template, "tissue_stats": ncfg.tissue_stats,
            "fusion": ncfg.fusion, "learnable": ncfg.learn_template,
            "stain_first": ncfg.stains if ncfg.stain_first else None, "stain_learnable": ncfg.stain_learnable,
        }
    if mode == "stain":
        return {"stains": ncfg.stains, "learnable": ncfg.learn_template}
    # Plugins (the classical baselines): fitted to a target image or, later, a training mosaic.
    return {"target": ncfg.target, "cache_dir": ncfg.cache_dir}


def build_norm(ncfg: NormConfig, template: Template | str | None = None, training: bool = False) -> nn.Module:
    """The normalisation layer of ``norm.mode`` (from the registry) with the resolved template,
    compiled as ``norm.compile`` says (see :func:`compile_mode`)."""
    return compile_norm(create_norm(ncfg.mode, **_norm_kwargs(ncfg, template)), ncfg.compile, training)


def compile_norm(norm: nn.Module, setting: str | bool, training: bool, steps: int | None = None) -> nn.Module:
    """Compile ``norm`` (in place) if ``setting`` (``norm.compile``) asks for it; returns it."""
    mode = compile_mode(setting, training, steps)
    if mode != "eager" and hasattr(norm, "enable_compile") and not norm.is_compiled:
        norm.enable_compile(fallback=mode == "fallback")
    return norm


COMPILE_ENV = "LSTAINNORM_COMPILE"
# ``auto`` compiles a training run of at least this many steps: compiling LStainNorm's forward and
# backward takes 1-4 minutes on a CPU and saves about 0.4 s per batch of 64 there (BENCHMARKS.md),
# so a shorter run (the demo: about 100 steps) would finish later compiled than eager.
AUTO_COMPILE_MIN_STEPS = 500


def compile_mode(setting: str | bool, training: bool, steps: int | None = None) -> str:
    """``eager``, ``compile`` (errors raise) or ``fallback`` (compile, eager with a warning if
    compilation fails) for a ``norm.compile`` setting.

    ``auto`` compiles for a training run of at least :data:`AUTO_COMPILE_MIN_STEPS` optimiser
    ``steps`` (unknown: compiled), where the batch shape is fixed and the compilation pays for
    itself, and not for the apply commands, whose images of varying size would each recompile.
    ``$LSTAINNORM_COMPILE=0`` turns ``auto`` off; ``1`` makes it compile always."""
    value = str(setting).lower()
    if value == "auto":
        env = os.environ.get(COMPILE_ENV, "").strip().lower()
        if env in ("0", "false", "no", "off"):
            return "eager"
        if env in ("1", "true", "yes", "on"):
            return "fallback"
        long_enough = steps is None or steps >= AUTO_COMPILE_MIN_STEPS
        return "fallback" if training and long_enough else "eager"
    return "compile" if value == "true" else "eager"


@dataclass
class TrainedNorm:
    """A run's trained normalisation layer (in eval mode) and the run's config."""

    norm: nn.Module
    config: Config
    checkpoint: Path

    @property
    def window(self) -> int:
        """The tile size the layer was trained on: the attention window for large images."""
        c = self.config
        size = c.segmentation.crop if c.task == "segmentation" else c.data.image_size
        return int(size or 224)


def load_norm(run_or_ckpt: str | Path) -> TrainedNorm:
    """Load a run's normalisation layer alone: its config and the ``norm.*`` weights."""
    path = find_checkpoint(run_or_ckpt)
    ckpt = load_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    cfg = config_from_dict(hp["config"])
    template = hp.get("template")
    tpl = Template.from_config(template) if isinstance(template, dict) else template
    norm = build_norm(cfg.norm, tpl if tpl is not None else resolve_template_setting(cfg.norm))
    state = {k[len("norm."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("norm.")}
    try:
        norm.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its normalisation weights do not match norm.mode={cfg.norm.mode} ({err})") from None
    if cfg.norm.stats_by:
        warnings.warn(f"{path} was trained with norm.stats_by={cfg.norm.stats_by} (statistics pooled per {cfg.norm.stats_by}); "
                      "the layer alone standardises each image by its own statistics (a whole slide by the slide's). "
                      "`lstainnorm evaluate` and `stress` pool them as training did; in code pass "
                      "stats= from lstainnorm.tasks.group_stats.group_statistics", stacklevel=2)
    return TrainedNorm(norm.eval(), cfg, path)


def new_run_dir(output_path: str | Path, postfix: str) -> Path:
    """A new, empty run folder ``output_path/<YYYYmmdd_HHMMSS>_<postfix>`` (DDP ranks share it
    through :data:`RUN_DIR_ENV`)."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    base = Path(output_path) / f"{stamp}_{postfix}"
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    path.mkdir(parents=True)
    os.environ[RUN_DIR_ENV] = str(path)
    return path


def _clean(o: Any) -> Any:
    """JSON-safe: NaN and Inf become null, paths strings."""
    if isinstance(o, float):
        return None if math.isnan(o) or math.isinf(o) else o
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_json(path: str | Path, obj: Any) -> Path:
    """Write a result as indented JSON, atomically; NaN becomes null, other objects their str()."""
    return atomic_write_bytes(path, json.dumps(_clean(obj), indent=2, default=str).encode())


def code_version() -> dict[str, Any]:
    """What code produced a result: the package version, torch's, and (from a git checkout) the commit
    and whether tracked files differed from it. Saved with every run and benchmark record, so a table
    can say which commits its rows come from."""
    import importlib.metadata
    import subprocess

    try:
        version = importlib.metadata.version("lstainnorm")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        version = None
    out: dict[str, Any] = {"lstainnorm": version, "torch": torch.__version__, "commit": None, "dirty": None}
    here = Path(__file__).resolve().parent
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()

        if Path(git("rev-parse", "--show-toplevel")) in here.parents:
            out["commit"] = git("rev-parse", "HEAD")
            out["dirty"] = bool(git("status", "--porcelain", "--untracked-files=no", "--", ":/src", ":/configs"))
    except (OSError, subprocess.SubprocessError, ValueError):
        pass  # an installed wheel, or no git: the version alone
    return out
