"""lstainnorm: learnable stain normalisation for computational pathology.

The method lives in :mod:`lstainnorm.layers`; this package re-exports its public API.

The tiny public API::

    import lstainnorm
    norm = lstainnorm.LStainNorm()                       # Lab + HSV + RGB, fused by attention
    net = lstainnorm.with_stain_norm(backbone, norm)     # normalise, then classify/segment
    tpl = lstainnorm.estimate_template(train_loader)     # initial templates from your data
    norm = lstainnorm.LStainNorm(templates=tpl)
    print(norm.template())                               # what it learned, in natural units
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .layers import (
        LStainNorm,
        StainNorm,
        NormalizedNetwork,
        StainConcentrationNorm,
        Template,
        color,
        create_norm,
        estimate_template,
        list_norms,
        load_template,
        norm_param_groups,
        register_norm,
        stain_norm,
        tissue_mask,
        with_stain_norm,
    )

__version__ = "0.2.0"

__all__ = [
    "color",
    "StainNorm",
    "LStainNorm",
    "StainConcentrationNorm",
    "stain_norm",
    "with_stain_norm",
    "norm_param_groups",
    "NormalizedNetwork",
    "estimate_template",
    "Template",
    "load_template",
    "create_norm",
    "list_norms",
    "register_norm",
    "tissue_mask",
    "__version__",
]


def __getattr__(name: str):
    # The layers (and torch, ~3 s) load on first use, so that ``lstainnorm --help`` and the CLI's
    # argument errors answer at once.
    if name in __all__ and name != "__version__":
        from . import layers

        value = getattr(layers, name)
        globals()[name] = value
        return value
    from .layers._deprecated import RENAMED, renamed

    if name in RENAMED:  # the names before the rename, for one release
        from . import layers

        return renamed(name, {RENAMED[name]: getattr(layers, RENAMED[name])}, "lstainnorm")
    raise AttributeError(f"module 'lstainnorm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
