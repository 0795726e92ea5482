"""``norm.mode: none``: no normalisation, with the same input checks as the other layers."""

from __future__ import annotations

from torch import Tensor, nn

from .checks import check_image, check_rgb_range
from .registry import register_norm

__all__ = ["Identity"]


class Identity(nn.Module):
    """Returns its input unchanged after checking it like the other layers do.

    Shape:
        - Input: :math:`(B, 3, H, W)`, RGB in [0, 1].
        - Output: the input itself.
    """

    def __init__(self, validate: bool = True) -> None:
        super().__init__()
        self.validate = validate

    def forward(self, x: Tensor) -> Tensor:
        check_image(x)
        if self.validate:
            check_rgb_range(x)
        return x


@register_norm("none")
def _none(**kwargs) -> nn.Module:
    return Identity(**kwargs)
