"""Building the pieces of a run from its config: the classifier and the optimiser groups and schedules.

(The normalisation layer is built by :func:`lstainnorm.runs.build_norm`, shared with the apply commands.)"""

from __future__ import annotations

import math
import os

from torch import nn

from ..config import Config, ModelConfig

__all__ = ["build_classifier", "lr_lambdas", "warmup_lambdas"]


def build_classifier(mcfg: ModelConfig, n_classes: int) -> nn.Module:
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


def lr_lambdas(cfg: Config, groups: list[dict]) -> list:
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


def warmup_lambdas(epoch_lambdas: list, steps_per_epoch: int, warmup_steps: int) -> list:
    """The per-epoch factors of :func:`lr_lambdas` as per-step factors, times a linear warmup over the
    first ``warmup_steps`` optimiser steps (every group alike, the layer's included): the first steps
    of a network from scratch, with the layer's statistics still moving, are where a run can collapse."""
    spe, warm = max(1, int(steps_per_epoch)), max(1, int(warmup_steps))
    return [lambda step, f=f: f(step // spe) * min(1.0, (step + 1) / warm) for f in epoch_lambdas]
