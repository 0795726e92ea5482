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

from .layers import (
    LStainNorm,
    StainNorm,
    StainNormalized,
    Template,
    color,
    create_norm,
    estimate_template,
    list_norms,
    load_template,
    register_norm,
    stain_norm,
    tissue_mask,
    norm_param_groups,
    with_stain_norm,
)

__version__ = "0.1.0"

__all__ = [
    "color",
    "StainNorm",
    "LStainNorm",
    "stain_norm",
    "with_stain_norm",
    "norm_param_groups",
    "StainNormalized",
    "estimate_template",
    "Template",
    "load_template",
    "create_norm",
    "list_norms",
    "register_norm",
    "tissue_mask",
    "__version__",
]
