"""Building the pieces of a run from its config: normalisation layer, networks, optimiser groups."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from ..factory import Identity, create_norm
from ..fusion import LStainNorm
from ..norm import StainNorm
from ..template import Template

__all__ = ["build_norm", "build_classifier", "norm_param_groups", "lr_lambdas", "resolve_template_setting"]


def resolve_template_setting(ncfg: Any) -> Template | str | None:
    """The template a config asks for, except ``auto`` (estimated later on the training data)."""
    if ncfg.template_values:
        return Template.from_config(dict(ncfg.template_values))
    t = ncfg.templates
    if t in (None, "", "auto"):
        return None
    if t == "reference":
        return "reference"
    return Template.load(t)


def build_norm(ncfg: Any, template: Template | str | None = None) -> nn.Module:
    """The normalisation layer of ``norm.mode`` with the resolved template."""
    mode = ncfg.mode
    if mode == "none":
        return Identity()
    if mode in ("template", "learnable"):
        space = ncfg.space
        mu0, sigma0 = None, None
        if isinstance(template, Template) and space in template:
            mu0, sigma0 = template[space]
        elif template == "reference" and space == "lab":
            from ..template import REFERENCE_TEMPLATES

            mu0, sigma0 = REFERENCE_TEMPLATES["single"]["lab"]
        if ncfg.mu0 is not None:
            mu0 = list(ncfg.mu0)
        if ncfg.sigma0 is not None:
            sigma0 = list(ncfg.sigma0)
        norm: nn.Module = StainNorm(space, mu0, sigma0, learnable=mode == "learnable", tissue_stats=ncfg.tissue_stats)
    elif mode == "lstainnorm":
        norm = LStainNorm(spaces=tuple(ncfg.spaces), templates=template, tissue_stats=ncfg.tissue_stats)
    else:
        norm = create_norm(mode, target=ncfg.target, cache_dir=ncfg.get("cache_dir"))
    if ncfg.compile and hasattr(norm, "enable_compile"):
        norm.enable_compile()
    return norm


def build_classifier(mcfg: Any, n_classes: int) -> nn.Module:
    """A timm classifier; pretrained weights only from a local file or the local cache."""
    import timm

    kwargs: dict = {"num_classes": n_classes, "drop_rate": mcfg.drop_rate}
    if not mcfg.pretrained:
        return timm.create_model(mcfg.backbone, pretrained=False, **kwargs)
    if mcfg.weights:
        if not os.path.isfile(mcfg.weights):
            raise FileNotFoundError(f"model.weights: file not found: {mcfg.weights}")
        return timm.create_model(mcfg.backbone, pretrained=True, pretrained_cfg_overlay={"file": mcfg.weights}, **kwargs)
    # Never wait on a download: only weights already in the local Hugging Face / torch cache.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True
    except Exception:  # pragma: no cover
        pass
    try:
        return timm.create_model(mcfg.backbone, pretrained=True, **kwargs)
    except Exception as err:
        raise ValueError(
            f"pretrained weights for '{mcfg.backbone}' are not available locally ({type(err).__name__}); "
            "set model.weights to a local weights file, or model.pretrained=false"
        ) from None


def norm_param_groups(norm: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Optimiser groups for the normalisation layer.

    Each colour-space branch gets ``lr * mean(sigma0)``: Adam steps are in parameter units,
    and a template offset in Lab (std ~10) must move ~100x further than one in RGB (std ~0.1).
    The remaining parameters (attention, fusion weights) get ``lr``.
    """
    groups, seen = [], set()
    branches = [norm] if isinstance(norm, StainNorm) else list(norm.branches.values()) if isinstance(norm, LStainNorm) else []
    for br in branches:
        params = [p for p in (br.dmu, br.dsigma) if isinstance(p, nn.Parameter) and p.requires_grad]
        if not params:
            continue
        scale = float(br.sigma0.abs().mean().clamp(min=1e-3))
        groups.append({"params": params, "lr": lr * scale, "weight_decay": 0.0, "name": f"norm.{br.space.name}"})
        seen.update(id(p) for p in params)
    rest = [p for p in norm.parameters() if p.requires_grad and id(p) not in seen]
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "norm.fusion"})
    return groups


def lr_lambdas(cfg: Any, groups: list[dict]) -> list:
    """One learning-rate factor per group and epoch: cosine for the network (the reference's
    CosineAnnealingLR, periodic in 2 T_max), the norm schedule for the normalisation groups."""
    o, n = cfg.optim, cfg.norm

    def cosine(base: float, min_lr: float, t_max: int):
        ratio = min_lr / base if base > 0 else 0.0
        return lambda e: ratio + (1.0 - ratio) * (1.0 + math.cos(math.pi * e / t_max)) / 2.0

    out = []
    for g in groups:
        if g["name"] == "net":
            out.append(cosine(g["lr"], o.min_lr, o.T_max) if o.scheduler == "cosine" else (lambda e: 1.0))
        elif n.schedule == "step":
            out.append(lambda e, s=n.step_size, gm=n.gamma: gm ** (e // s))
        elif n.schedule == "cosine":
            out.append(cosine(1.0, 0.01, o.T_max))
        else:
            out.append(lambda e: 1.0)
    return out


def trainable(module: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
