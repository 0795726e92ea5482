"""The method alone: colour spaces, per-space normalisation, the attention fusion, templates.

Nothing here imports from the application (data loading, tasks, apply, the CLI):

- :mod:`.color`     colour conversions (functions + thin modules) and the space registry
- :mod:`.tissue`    tissue masks and masked channel statistics
- :mod:`.checks`    input validation shared by every public entry point
- :mod:`.template`  templates: YAML files, estimation from data
- :mod:`.norm`      :class:`StainNorm`, normalisation in one colour space (method.md section 1)
- :mod:`.fusion`    :class:`LStainNorm`, branches fused by self-attention (method.md section 2)
- :mod:`.stain`     :class:`StainConcentrationNorm`, stain-aware normalisation in optical density
- :mod:`.identity`  the ``none`` layer
- :mod:`.registry`  ``create_norm`` / ``register_norm`` / ``list_norms``
- :mod:`.model`     ``with_stain_norm``: a layer in front of any network; ``norm_param_groups``
"""

from . import color
from .fusion import LStainNorm, SharedAttention
from .identity import Identity
from .model import NormalizedNetwork, norm_param_groups, with_stain_norm
from .norm import StainNorm, stain_norm
from .stain import StainConcentrationNorm
from .registry import create_norm, list_norms, register_norm
from .template import Template, estimate_template, load_template
from .tissue import tissue_mask

__all__ = [
    "color",
    "StainNorm",
    "LStainNorm",
    "SharedAttention",
    "Identity",
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
]


def __getattr__(name: str):  # the names before the rename, for one release
    from ._deprecated import renamed

    return renamed(name, globals(), 'lstainnorm.layers')
