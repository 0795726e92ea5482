"""A small registry of normalisation layers by name (timm-style ``create_norm``)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ._checks import check_image, check_rgb_range

__all__ = ["create_norm", "register_norm", "list_norms", "Identity"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_ALIASES = {"prenorm": "learnable", "temnorm": "template", "sa3": "lstainnorm", "lstain": "lstainnorm"}


class Identity(nn.Module):
    """No normalisation (``norm.mode: none``): checks the input like the other layers, returns it."""

    def __init__(self, validate: bool = True) -> None:
        super().__init__()
        self.validate = validate

    def forward(self, x: Tensor) -> Tensor:
        check_image(x)
        if self.validate:
            check_rgb_range(x)
        return x


def register_norm(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a constructor available as ``create_norm(name, ...)``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name.lower()] = fn
        return fn

    return deco


def list_norms() -> list[str]:
    """Names accepted by :func:`create_norm`."""
    _load_optional()
    return sorted(_REGISTRY)


def _load_optional() -> None:
    # Baselines register themselves on import; they need optional packages only when used.
    from . import baselines  # noqa: F401


def create_norm(name: str, **kwargs) -> nn.Module:
    """Build a normalisation layer by name.

    Names: ``none``; ``template`` (frozen :class:`StainNorm`, Reinhard to a fixed template);
    ``learnable`` (learnable :class:`StainNorm`, the reference's LabPreNorm); ``lstainnorm``
    (:class:`LStainNorm`, the fusion); and the classical baselines (``reinhard``,
    ``macenko``, ``vahadane``). Keyword arguments go to the constructor.

    Example:
        >>> create_norm("learnable", space="hsv")
        StainNorm(space='hsv', learnable=True, tissue_stats=False)
    """
    if not isinstance(name, str):
        raise TypeError(f"norm name must be a str, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    _load_optional()
    if key not in _REGISTRY:
        raise ValueError(f"unknown normalisation {name!r}; choose one of {list_norms()}")
    return _REGISTRY[key](**kwargs)


@register_norm("none")
def _none(**kwargs) -> nn.Module:
    return Identity(**kwargs)


@register_norm("template")
def _template(space: str = "lab", mu0=None, sigma0=None, **kwargs) -> nn.Module:
    from .norm import StainNorm

    return StainNorm(space, mu0, sigma0, learnable=False, **kwargs)


@register_norm("learnable")
def _learnable(space: str = "lab", mu0=None, sigma0=None, **kwargs) -> nn.Module:
    from .norm import StainNorm

    return StainNorm(space, mu0, sigma0, learnable=True, **kwargs)


@register_norm("lstainnorm")
def _lstainnorm(**kwargs) -> nn.Module:
    from .fusion import LStainNorm

    return LStainNorm(**kwargs)
