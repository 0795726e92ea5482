"""Stain augmentation baselines, batched in torch: RandStainNA and HED colour jitter.

Both are train-time transforms on a batch ``(B, 3, H, W)`` in [0, 1], reproducible from a seed
(the training loop passes ``(seed, epoch, batch)``), applied before the normalisation layer.

- **RandStainNA** (Shen et al., MICCAI 2022): for each image, draw a *virtual template* from
  the training set's distribution of per-image channel statistics in a colour space (Lab, HSV
  or HED, picked at random per image) and Reinhard-normalise the image to it.
- **HED jitter** (Tellez et al. 2018): in haematoxylin/eosin/DAB optical density, scale each
  channel by ``U(1 - s, 1 + s)`` and shift it by ``U(-s, s)``, per image.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..layers.color import get_space
from ..layers.norm import _normalize
from ..layers.template import _iter_image_batches, _to_float_image
from ..layers.tissue import channel_stats, tissue_mask

__all__ = ["RandStainNA", "HEDJitter", "stain_statistics", "create_augmentation", "AUGMENT_MODES"]

# ``data.augment`` values (``none``: no stain augmentation).
AUGMENT_MODES = ("none", "randstainna", "hed-jitter")


def _generator(seed: Any) -> torch.Generator:
    if isinstance(seed, (tuple, list)):
        seed = int(np.random.SeedSequence([int(s) for s in seed]).generate_state(1)[0])
    return torch.Generator().manual_seed(int(seed))


@torch.no_grad()
def stain_statistics(source: Any, spaces: Sequence[str] = ("lab", "hsv", "hed"), max_images: int | None = None, progress: bool = False) -> dict:
    """Distribution of per-image channel statistics over a training set.

    For each space: the mean and std over images of each image's channel mean (``mu_mean``,
    ``mu_std``) and of its channel std (``sigma_mean``, ``sigma_std``), tissue pixels only.
    ``source`` is anything :func:`lstainnorm.estimate_template` accepts.
    """
    from tqdm.auto import tqdm

    batches, total = _iter_image_batches(source, 64)
    per: dict[str, list[list[Tensor]]] = {s: [[], []] for s in spaces}
    n = 0
    for batch in tqdm(batches, total=total, desc="stain statistics", disable=not progress):
        if isinstance(batch, Tensor) and batch.dim() == 4:
            xs = [batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()]
        else:
            imgs = [_to_float_image(im, "image") for im in batch if im is not None]
            xs = [im.unsqueeze(0) for im in imgs]
        for x in xs:
            mask = tissue_mask(x)
            for s in spaces:
                mean, sd = channel_stats(get_space(s).to_space(x), weight=mask)
                per[s][0].append(mean.flatten(1))
                per[s][1].append(sd.flatten(1))
            n += x.shape[0]
        if max_images is not None and n >= max_images:
            break
    if n < 2:
        raise ValueError(f"stain statistics need at least 2 images, got {n}")
    out: dict = {"n_images": n}
    for s in spaces:
        mu = torch.cat(per[s][0]).double()
        sd = torch.cat(per[s][1]).double()
        out[s] = {
            "mu_mean": mu.mean(0).tolist(), "mu_std": mu.std(0).tolist(),
            "sigma_mean": sd.mean(0).tolist(), "sigma_std": sd.std(0).tolist(),
        }
    return out


class RandStainNA(nn.Module):
    """Random virtual-template stain normalisation (augmentation).

    Args:
        stats: from :func:`stain_statistics`.
        spaces: spaces to draw from, one picked at random per image.
        strength: scales the spread of the sampled templates (RandStainNA's std hyper-parameter).
        p: probability of augmenting an image.
    """

    def __init__(self, stats: dict, spaces: Sequence[str] = ("lab", "hsv", "hed"), strength: float = 1.0, p: float = 1.0) -> None:
        super().__init__()
        missing = [s for s in spaces if s not in stats]
        if missing:
            raise ValueError(f"RandStainNA statistics lack spaces {missing}; have {[k for k in stats if k != 'n_images']}")
        self.spaces = [get_space(s) for s in spaces]
        self.stats = stats
        self.strength = float(strength)
        self.p = float(p)

    def forward(self, x: Tensor, seed: Any = 0) -> Tensor:
        g = _generator(seed)
        b = x.shape[0]
        which = torch.randint(0, len(self.spaces), (b,), generator=g)
        apply = torch.rand(b, generator=g) < self.p
        out = x.clone()
        for k, sp in enumerate(self.spaces):
            idx = torch.nonzero((which == k) & apply).flatten()
            if len(idx) == 0:
                continue
            st = self.stats[sp.name]
            mu = torch.tensor(st["mu_mean"]) + self.strength * torch.tensor(st["mu_std"]) * torch.randn(len(idx), 3, generator=g)
            sd = torch.tensor(st["sigma_mean"]) + self.strength * torch.tensor(st["sigma_std"]) * torch.randn(len(idx), 3, generator=g)
            sd = sd.clamp(min=torch.tensor(sp.std_floor))
            xi = x[idx].float()
            # Tissue-pixel statistics, as in stain_statistics: normalising with all-pixel
            # statistics to a tissue-only template pushes glass-rich tiles far off-distribution.
            res = _normalize(xi, sp, mu.to(xi).view(-1, 3, 1, 1), sd.to(xi).view(-1, 3, 1, 1), 1e-7, True, None)
            out[idx] = res.clamp(0, 1).to(out.dtype)
        return out


class HEDJitter(nn.Module):
    """HED colour jitter: per image and channel, ``hed * U(1-s, 1+s) + U(-s, s)`` in optical density."""

    def __init__(self, sigma: float = 0.05) -> None:
        super().__init__()
        if not 0 <= sigma < 1:
            raise ValueError(f"HED jitter sigma must be in [0, 1), got {sigma}")
        self.sigma = float(sigma)

    def forward(self, x: Tensor, seed: Any = 0) -> Tensor:
        g = _generator(seed)
        b = x.shape[0]
        alpha = 1.0 + (torch.rand(b, 3, 1, 1, generator=g) * 2 - 1) * self.sigma
        beta = (torch.rand(b, 3, 1, 1, generator=g) * 2 - 1) * self.sigma
        sp = get_space("hed")
        hed = sp.to_space(x.float())
        out = sp.from_space(hed * alpha.to(hed) + beta.to(hed))
        return out.clamp(0, 1).to(x.dtype)


def create_augmentation(mode: str, strength: float = 1.0, stats: dict | None = None) -> nn.Module:
    """The augmentation named ``mode`` (``data.augment``); ``randstainna`` needs training-set ``stats``."""
    if mode == "hed-jitter":
        return HEDJitter(0.05 * strength)
    if mode == "randstainna":
        if stats is None:
            raise ValueError("RandStainNA needs the training set's stain statistics (computed by lstainnorm train)")
        return RandStainNA(stats, strength=strength)
    raise ValueError(f"unknown augmentation {mode!r}; choose one of {[m for m in AUGMENT_MODES if m != 'none']}")
