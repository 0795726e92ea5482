"""Putting a normalisation layer in front of a network."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .registry import create_norm

__all__ = ["NormalizedNetwork", "with_stain_norm", "norm_param_groups"]


class NormalizedNetwork(nn.Module):
    """``model(norm(x))``, keeping the normalised image at hand.

    The reference returns ``(model(out), out)``; here ``forward(x)`` returns the task
    output only (so the wrapper drops into any training loop), and
    ``forward(x, return_normalized=True)`` returns ``(output, normalised_image)``.

    Attributes:
        norm: the normalisation layer.
        model: the task network.
    """

    def __init__(self, model: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(norm, nn.Module):
            raise TypeError(f"norm must be an nn.Module, got {type(norm).__name__}")
        self.norm = norm
        self.model = model

    def normalize(self, x: Tensor) -> Tensor:
        """The normalised image alone."""
        return self.norm(x)

    def forward(self, x: Tensor, return_normalized: bool = False):
        z = self.norm(x)
        y = self.model(z)
        return (y, z) if return_normalized else y


def with_stain_norm(model: nn.Module, norm: nn.Module | str = "lstainnorm", **norm_kwargs: Any) -> NormalizedNetwork:
    """Wrap ``model`` so that its input is stain-normalised first.

    Args:
        model: any network taking ``(B, 3, H, W)`` RGB.
        norm: a normalisation module, or a name for :func:`lstainnorm.create_norm`.
        **norm_kwargs: passed to :func:`lstainnorm.create_norm` when ``norm`` is a name.

    Example:
        >>> import timm, lstainnorm
        >>> net = lstainnorm.with_stain_norm(timm.create_model("resnet18", num_classes=8), "lstainnorm")
        >>> logits, normalised = net(torch.rand(2, 3, 224, 224), return_normalized=True)
    """
    if isinstance(norm, str):
        norm = create_norm(norm, **norm_kwargs)
    elif norm_kwargs:
        raise TypeError("norm_kwargs are only used when norm is given by name")
    return NormalizedNetwork(model, norm)


def norm_param_groups(norm: nn.Module, lr: float = 5e-3, weight_decay: float = 0.0) -> list[dict]:
    """Optimiser groups for a normalisation layer, to add to your network's own groups.

    Each colour-space branch gets ``lr * mean(sigma0)``: Adam steps are in parameter units,
    and a template offset in Lab (std ~10) must move ~100x further than one in RGB (std ~0.1).
    The remaining parameters (attention, fusion weights) get ``lr``. The default ``lr=5e-3`` is
    what ``lstainnorm train`` uses (``norm.lr``), with AdamW at 5e-4 for the network.

    Example:
        >>> net = with_stain_norm(torch.nn.Conv2d(3, 4, 1), "lstainnorm")
        >>> groups = [{"params": net.model.parameters(), "lr": 5e-4}] + norm_param_groups(net.norm)
        >>> opt = torch.optim.AdamW(groups)
    """
    # Imported here: fusion imports norm, and model sits beside both.
    from .fusion import LStainNorm
    from .norm import StainNorm

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


def __getattr__(name: str):  # the names before the rename, for one release
    from ._deprecated import renamed

    return renamed(name, globals(), 'lstainnorm.layers.model')
