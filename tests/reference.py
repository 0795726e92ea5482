"""A literal transcription of method.md section 2 (the reference's ``SA3``), for tests and benchmarks only (not part of the installed package).

It follows the published recipe line by line with kornia's converters, ``torch.std``,
full-size ``nn.Conv2d`` 1x1 convolutions, ``nn.MaxPool2d(8)``, ``torch.bmm`` and
``nn.Upsample(scale_factor=8)``. It shares :class:`lstainnorm.LStainNorm`'s parameter
names, so ``ReferenceSA3().load_state_dict(norm.state_dict())`` runs the same model:
the tests use it to show that LStainNorm computes the published method, and the
benchmarks use it as the speed baseline. Like the reference, it needs H and W to be
multiples of 8 and has no guard for uniform tiles. Not for real use.
"""

from __future__ import annotations

import kornia
import torch
from torch import Tensor, nn

from lstainnorm.layers.template import resolve_templates

__all__ = ["ReferenceSA3", "ReferenceLabPreNorm"]

_TO = {
    "lab": kornia.color.rgb_to_lab,
    "hsv": lambda x: kornia.color.rgb_to_hsv(x).abs(),
    "rgb": lambda x: x,
}
_FROM = {"lab": kornia.color.lab_to_rgb, "hsv": kornia.color.hsv_to_rgb, "rgb": lambda x: x}
EPS = 1e-7


class _Branch(nn.Module):
    def __init__(self, space: str, mu0, sigma0) -> None:
        super().__init__()
        self.space = space
        self.register_buffer("mu0", torch.tensor(mu0, dtype=torch.float32))
        self.register_buffer("sigma0", torch.tensor(sigma0, dtype=torch.float32))
        self.dmu = nn.Parameter(torch.zeros(3))
        self.dsigma = nn.Parameter(torch.zeros(3))

    def forward(self, x: Tensor) -> Tensor:
        y = _TO[self.space](x)
        mu = y.mean(dim=(2, 3), keepdim=True)
        sd = y.std(dim=(2, 3), keepdim=True)
        mu_t = (self.mu0 + self.dmu).view(1, 3, 1, 1)
        sd_t = (self.sigma0 + self.dsigma).view(1, 3, 1, 1)
        y_hat = (y - mu) / (sd + EPS) * sd_t + mu_t
        return _FROM[self.space](y_hat)


class ReferenceLabPreNorm(_Branch):
    """The reference's single-space Lab layer, transcribed."""

    def __init__(self, mu0=(70.5085, 21.9641, -13.7990), sigma0=(12.7103, 8.7185, 6.0168)) -> None:
        super().__init__("lab", mu0, sigma0)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Conv2d(3, 1, 1)
        self.key = nn.Conv2d(3, 1, 1)
        self.value = nn.Conv2d(3, 3, 1)
        self.pool = nn.MaxPool2d(8)
        self.up = nn.Upsample(scale_factor=8, mode="bilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q = self.pool(self.query(x)).view(b, -1, (h // 8) * (w // 8))
        k = self.pool(self.key(x)).view(b, -1, (h // 8) * (w // 8))
        v = self.pool(self.value(x)).view(b, -1, (h // 8) * (w // 8))
        attn = torch.softmax(torch.bmm(q.permute(0, 2, 1), k), dim=-1)
        out = torch.bmm(v, attn).view(b, c, h // 8, w // 8)
        return self.up(out)


class ReferenceSA3(nn.Module):
    """Three branches (Lab, HSV, RGB) fused by the shared attention, as in method.md section 2."""

    def __init__(self, spaces=("lab", "hsv", "rgb"), templates=None) -> None:
        super().__init__()
        tpl = resolve_templates(templates, spaces, fusion=True)
        self.spaces = tuple(spaces)
        self.branches = nn.ModuleDict({s: _Branch(s, *tpl[s]) for s in spaces})
        self.attention = _Attention()
        n = len(spaces)
        self.delta = nn.Parameter(torch.zeros(n, 3))
        self.a = nn.Parameter(torch.ones(n))
        self.b = nn.Parameter(torch.ones(n))

    def forward(self, x: Tensor) -> Tensor:
        xs = [self.branches[s](x).abs() for s in self.spaces]
        big = []
        for i, xi in enumerate(xs):
            att = self.attention(xi)
            delta = (1.0 + self.delta[i]).view(1, 3, 1, 1)
            big.append((delta * att.abs() + xi) / (xi + EPS))
        total = sum(big)
        ws = [self.a[i] * (big[i] / (total + EPS)) + self.b[i] for i in range(len(xs))]
        return sum(w * xi for w, xi in zip(ws, xs)) / sum(ws)
