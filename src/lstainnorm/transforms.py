"""Stain normalisation as a data-pipeline transform (torchvision ``transforms.v2`` style).

For users who want normalisation as pre-processing in a ``Dataset`` rather than as a layer in
the network: :class:`StainNormalize` wraps a frozen layer (a template, or a trained run's layer)
and maps an image to the same type it was given (PIL image -> PIL image, ``uint8`` tensor ->
``uint8`` tensor, float tensor -> float tensor of the same dtype, ``tv_tensors.Image`` ->
``tv_tensors.Image``). Inside ``v2.Compose`` it changes images only: masks, boxes and labels of a
sample pass through untouched.

Workers: in a ``DataLoader`` each worker process gets its own copy of the (small) layer and
PyTorch runs it on one thread per worker, so throughput grows with ``num_workers``. Batched on
a GPU: skip the transform and apply ``transform.norm`` (a plain ``nn.Module``) to the collated
batch on the device instead; the transform also takes a ``(B, 3, H, W)`` batch directly.

Without torchvision (the core install) it is a plain ``nn.Module`` on tensors (and PIL images where
Pillow is installed): ``StainNormalize.from_template(None)(x)``.

Example:
    >>> from torchvision.transforms import v2
    >>> t = v2.Compose([StainNormalize.from_template(None), v2.ToDtype(torch.float32, scale=True)])
    >>> t(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)).dtype
    torch.float32
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .layers.norm import StainNorm
from .layers.template import Template

try:
    from PIL import Image
except ModuleNotFoundError:  # the core install: tensors only
    Image = None  # type: ignore[assignment]
try:
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    from torchvision.transforms.v2._utils import is_pure_tensor

    _Base: type = v2.Transform
    _TYPES: tuple = (tv_tensors.Image, is_pure_tensor) + ((Image.Image,) if Image is not None else ())
except ModuleNotFoundError:  # the core install: a plain module on tensors (and PIL images with Pillow)
    tv_tensors = None

    class _Base(nn.Module):  # type: ignore[no-redef]
        def forward(self, inpt: Any) -> Any:
            return self.transform(inpt, {})

    _TYPES = ()

__all__ = ["StainNormalize"]


class StainNormalize(_Base):
    """Normalise images with a frozen stain-normalisation layer (any of lstainnorm's layers).

    Args:
        norm: the layer, e.g. ``lstainnorm.StainNorm("lab", mu0, sigma0, learnable=False)``,
            ``lstainnorm.runs.load_norm(RUN).norm`` or ``create_norm("macenko", target=...)``.
            It is put in eval mode and its parameters frozen.

    Input: a PIL image, a ``(3, H, W)`` or ``(B, 3, H, W)`` tensor (``uint8`` in [0, 255] or
    float in [0, 1]) or a ``tv_tensors.Image``; the output has the input's type, shape and dtype.
    """

    _transformed_types = _TYPES

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        if not isinstance(norm, nn.Module):
            raise TypeError(f"norm must be a torch.nn.Module (a stain-normalisation layer), got {type(norm).__name__}")
        self.norm = norm.eval().requires_grad_(False)

    @classmethod
    def from_template(cls, template: Template | str | Path | None, space: str = "lab") -> "StainNormalize":
        """Reinhard normalisation to a template (a :class:`Template`, a template YAML, or None for
        the space's default) in one colour space, as a transform."""
        if template is None:
            return cls(StainNorm(space, learnable=False))
        tpl = template if isinstance(template, Template) else Template.load(template)
        if space not in tpl:
            raise ValueError(f"template has no {space!r} statistics; it has {list(tpl.stats)}")
        mu, sigma = tpl[space]
        return cls(StainNorm(space, mu, sigma, learnable=False))

    @classmethod
    def from_run(cls, run: str | Path) -> "StainNormalize":
        """The trained normalisation layer of a ``lstainnorm train`` run (loaded as data only)."""
        from .runs import load_norm

        return cls(load_norm(run).norm)

    @torch.no_grad()
    def _apply(self, x: Tensor) -> Tensor:
        if x.ndim not in (3, 4) or x.shape[-3] != 3:
            raise ValueError(f"expected an RGB image of shape (3, H, W) or (B, 3, H, W), got {tuple(x.shape)}")
        dtype = x.dtype
        xf = x.float() / 255.0 if dtype == torch.uint8 else x
        if not xf.is_floating_point():
            raise TypeError(f"expected a uint8 or float tensor, got {dtype}")
        y = self.norm(xf if xf.ndim == 4 else xf.unsqueeze(0)).clamp(0.0, 1.0)
        y = y if x.ndim == 4 else y.squeeze(0)
        if dtype == torch.uint8:
            return (y * 255.0).round().to(torch.uint8)
        return y.to(dtype)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if Image is not None and isinstance(inpt, Image.Image):
            if inpt.mode != "RGB":
                raise ValueError(f"expected an RGB PIL image, got mode {inpt.mode!r} (use .convert('RGB'))")
            x = torch.from_numpy(np.asarray(inpt, dtype=np.uint8).copy()).permute(2, 0, 1)
            return Image.fromarray(self._apply(x).permute(1, 2, 0).numpy(), mode="RGB")
        wrapped = tv_tensors is not None and isinstance(inpt, tv_tensors.Image)
        if not isinstance(inpt, Tensor):
            raise TypeError(f"expected a tensor or a PIL image, got {type(inpt).__name__}")
        out = self._apply(inpt.as_subclass(Tensor) if wrapped else inpt)
        return tv_tensors.wrap(out, like=inpt) if wrapped else out

    def extra_repr(self) -> str:
        return f"norm={type(self.norm).__name__}"
