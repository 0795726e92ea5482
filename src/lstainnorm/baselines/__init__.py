"""What LStainNorm is compared against, behind the same interfaces as the layers.

- :mod:`.classical`: Reinhard, Macenko and Vahadane (torch-staintools / torchstain) as a
  parameter-free ``nn.Module`` with background fallback and a cache. They are plugins of the
  layer registry: ``create_norm("macenko", target=image)`` imports them on first use.
- :mod:`.augment`: stain augmentation, RandStainNA and HED jitter (train-time transforms).
"""

from .augment import AUGMENT_MODES, HEDJitter, RandStainNA, create_augmentation, stain_statistics
from .classical import METHODS, ClassicalNorm, tissue_fraction, training_mosaic

__all__ = [
    "ClassicalNorm",
    "METHODS",
    "tissue_fraction",
    "training_mosaic",
    "RandStainNA",
    "HEDJitter",
    "AUGMENT_MODES",
    "stain_statistics",
    "create_augmentation",
]
