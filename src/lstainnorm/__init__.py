"""lstainnorm: learnable stain normalisation for computational pathology.

The tiny public API::

    import lstainnorm
    norm = lstainnorm.LStainNorm()                       # Lab + HSV + RGB, fused by attention
    net = lstainnorm.with_stain_norm(backbone, norm)     # normalise, then classify/segment
    tpl = lstainnorm.estimate_template(train_loader)     # initial templates from your data
    norm = lstainnorm.LStainNorm(templates=tpl)
    print(norm.template())                               # what it learned, in natural units
"""

from . import color
from .factory import create_norm, list_norms, register_norm
from .fusion import LStainNorm
from .model import StainNormalized, with_stain_norm
from .norm import StainNorm, stain_norm
from .template import Template, estimate_template, load_template
from .tissue import tissue_mask

__version__ = "0.1.0"

__all__ = [
    "color",
    "StainNorm",
    "LStainNorm",
    "stain_norm",
    "with_stain_norm",
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
