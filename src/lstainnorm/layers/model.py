"""Putting a normalisation layer in front of a network."""

from __future__ import annotations

from torch import Tensor, nn

from .registry import create_norm

__all__ = ["StainNormalized", "with_stain_norm"]


class StainNormalized(nn.Module):
    """``model(norm(x))``, keeping the normalised image at hand.

    The reference returns ``(model(out), out)``; here ``forward(x)`` returns the task
    output only (so the wrapper drops into any training loop), and
    ``forward(x, return_normalized=True)`` returns ``(output, normalised_image)``.

    Attributes:
        norm: the normalisation layer.
        model: the task network.
    """

    def __init__(self, model: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(norm, nn.Module):
            raise TypeError(f"norm must be an nn.Module, got {type(norm).__name__}")
        self.norm = norm
        self.model = model

    def normalize(self, x: Tensor) -> Tensor:
        """The normalised image alone."""
        return self.norm(x)

    def forward(self, x: Tensor, return_normalized: bool = False):
        z = self.norm(x)
        y = self.model(z)
        return (y, z) if return_normalized else y


def with_stain_norm(model: nn.Module, norm: nn.Module | str = "lstainnorm", **norm_kwargs) -> StainNormalized:
    """Wrap ``model`` so that its input is stain-normalised first.

    Args:
        model: any network taking ``(B, 3, H, W)`` RGB.
        norm: a normalisation module, or a name for :func:`lstainnorm.create_norm`.
        **norm_kwargs: passed to :func:`lstainnorm.create_norm` when ``norm`` is a name.

    Example:
        >>> import timm, lstainnorm
        >>> net = lstainnorm.with_stain_norm(timm.create_model("resnet18", num_classes=8), "lstainnorm")
        >>> logits, normalised = net(torch.rand(2, 3, 224, 224), return_normalized=True)
    """
    if isinstance(norm, str):
        norm = create_norm(norm, **norm_kwargs)
    elif norm_kwargs:
        raise TypeError("norm_kwargs are only used when norm is given by name")
    return StainNormalized(model, norm)
