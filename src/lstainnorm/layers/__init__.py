"""The method alone: colour spaces, per-space normalisation, the attention fusion, templates.

Nothing here imports from the application (data loading, tasks, apply, the CLI):

- :mod:`.color`     colour conversions (functions + thin modules) and the space registry
- :mod:`.tissue`    tissue masks and masked channel statistics
- :mod:`.checks`    input validation shared by every public entry point
- :mod:`.template`  templates: YAML files, estimation from data
- :mod:`.norm`      :class:`StainNorm`, normalisation in one colour space (method.md section 1)
- :mod:`.fusion`    :class:`LStainNorm`, branches fused by self-attention (method.md section 2)
- :mod:`.stain`     :class:`StainOD`, stain-aware normalisation in optical density
- :mod:`.identity`  the ``none`` layer
- :mod:`.registry`  ``create_norm`` / ``register_norm`` / ``list_norms``
- :mod:`.model`     ``with_stain_norm``: a layer in front of any network; ``norm_param_groups``
"""

from . import color
from .fusion import LStainNorm, SharedAttention
from .identity import Identity
from .model import StainNormalized, norm_param_groups, with_stain_norm
from .norm import StainNorm, stain_norm
from .stain import StainOD
from .registry import create_norm, list_norms, register_norm
from .template import Template, estimate_template, load_template
from .tissue import tissue_mask

__all__ = [
    "color",
    "StainNorm",
    "LStainNorm",
    "SharedAttention",
    "Identity",
    "StainOD",
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
]
