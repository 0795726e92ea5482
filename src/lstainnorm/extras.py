"""Which optional extra a missing module belongs to, and the one sentence that says so.

``pip install lstainnorm`` is the layer alone (torch, numpy, PyYAML); training, segmentation, slides,
the classical baselines, export, plots and experiment loggers are extras. Code that reaches a module
the install left out gets a :class:`ModuleNotFoundError` naming the ``pip install`` to run, not a bare
``No module named 'lightning'``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

__all__ = ["EXTRA_OF", "missing_extra", "needs_extra"]

# Top-level import name -> the extra that installs it (pyproject.toml's optional-dependencies).
EXTRA_OF = {
    "lightning": "train", "timm": "train", "torchmetrics": "train", "omegaconf": "train", "torchvision": "train",
    "sklearn": "train", "tqdm": "train", "PIL": "train", "scipy": "train",
    "segmentation_models_pytorch": "seg", "skimage": "seg",
    "openslide": "slides", "tifffile": "slides", "imagecodecs": "slides",
    "torchstain": "baselines", "torch_staintools": "baselines",
    "onnx": "export", "onnxruntime": "export", "onnxscript": "export",
    "matplotlib": "report",
    "tensorboard": "loggers", "mlflow": "loggers", "wandb": "loggers",
    "submitit": "cluster",
}


def missing_extra(err: ModuleNotFoundError, what: str = "this") -> ModuleNotFoundError | None:
    """The error to raise instead of ``err`` when its module belongs to an extra, else None."""
    name = (getattr(err, "name", None) or "").split(".")[0]
    extra = EXTRA_OF.get(name)
    if extra is None:
        return None
    return ModuleNotFoundError(f"{what} needs {name}, which this install leaves out: pip install 'lstainnorm[{extra}]'", name=name)


@contextmanager
def needs_extra(what: str) -> Iterator[None]:
    """Re-raise a missing optional module inside the block as :func:`missing_extra`'s sentence."""
    try:
        yield
    except ModuleNotFoundError as err:
        better = missing_extra(err, what)
        if better is None:
            raise
        raise better from None
