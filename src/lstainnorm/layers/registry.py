"""A registry of normalisation layers by name, in the style of timm's model registry.

Layers register their constructors with :func:`register_norm` where they are defined
(``none``, ``template``, ``learnable``, ``lstainnorm`` in :mod:`lstainnorm.layers`). Layers
that live elsewhere, such as the classical baselines, are *plugins*: they are declared as
entry points of the group ``lstainnorm.norms`` (see ``pyproject.toml``) and imported on
first use, so their optional dependencies (torch-staintools, torchstain) load only when a
user asks for them. The registry itself imports no layer and no plugin.

A third-party package adds a layer the same way::

    [project.entry-points."lstainnorm.norms"]
    mynorm = "mypackage.norms:create_mynorm"
"""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from typing import Callable

from torch import nn

from ..extras import needs_extra

__all__ = ["create_norm", "register_norm", "list_norms", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "lstainnorm.norms"

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# The reference implementation's names for the same layers.
_ALIASES = {"prenorm": "learnable", "temnorm": "template", "sa3": "lstainnorm", "lstain": "lstainnorm"}


def register_norm(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a constructor available as ``create_norm(name, ...)``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name.lower()] = fn
        return fn

    return deco


@lru_cache(maxsize=1)
def _plugins() -> dict[str, EntryPoint]:
    return {ep.name.lower(): ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def list_norms() -> list[str]:
    """Names accepted by :func:`create_norm` (registered layers and declared plugins), sorted.

    Listing imports nothing: plugins are known by their entry-point names.
    """
    return sorted(set(_REGISTRY) | set(_plugins()))


def _constructor(name: str) -> Callable[..., nn.Module]:
    if not isinstance(name, str):
        raise TypeError(f"norm name must be a str, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        ep = _plugins().get(key)
        if ep is None:
            raise ValueError(f"unknown normalisation {name!r}; choose one of {list_norms()}")
        with needs_extra(f"normalisation {name!r}"):
            _REGISTRY[key] = ep.load()
    return _REGISTRY[key]


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
    build = _constructor(name)
    with needs_extra(f"normalisation {name!r}"):  # plugins import their backends when built
        return build(**kwargs)
