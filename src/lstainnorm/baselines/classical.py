"""Classical stain normalisers (Reinhard, Macenko, Vahadane) behind one small interface.

The algorithms come from the field's libraries: torch-staintools (batched torch Reinhard,
Macenko and Vahadane) by default, torchstain (per-image Macenko and Reinhard) as an
alternative backend. What this module adds is what their users ask for most:

- **No crash, no NaN on background tiles.** A tile with too little tissue, or one the
  algorithm fails on or returns non-finite values for, passes through unnormalised; the
  number of such fallbacks is counted (:attr:`ClassicalNorm.fallbacks`).
- **Fit to a template image or to a training set**: Macenko and Vahadane to a mosaic of training
  tiles (stain vectors are estimated best on many pixels), Reinhard to the mean of the tiles'
  own Lab statistics (:meth:`ClassicalNorm.fit_tiles`). Reinhard's statistics are taken over all
  pixels, as in Reinhard et al. (2001): torch-staintools' tissue-only statistics, applied to every
  pixel, shift pale tiles (mucus, fat), and a mosaic's std includes the variation between tiles,
  which over-stretches each tile's contrast (``benchmarks/reinhard_gap.py`` measures both).
- **A cache** for training: classical normalisation is a fixed pre-processing step, so a
  tile seen again (next epoch) is not normalised again.

``ClassicalNorm`` is an ``nn.Module`` without parameters (``preprocessing = True``): the
training pipeline applies it before augmentation, like the separate pre-processing step it is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import warnings
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..data.io import image_to_tensor, read_rgb
from ..data.tiles import round_robin
from ..extras import missing_extra
from ..files import atomic_write_bytes
from ..layers.checks import check_image, check_rgb_range
from ..layers.color import rgb_to_lab
from ..layers.tissue import tissue_mask

__all__ = ["ClassicalNorm", "tissue_fraction", "training_mosaic", "mosaic_indices", "METHODS", "reinhard", "macenko", "vahadane"]

log = logging.getLogger("lstainnorm")
METHODS = ("reinhard", "macenko", "vahadane")


def tissue_fraction(x: Tensor, luminosity_threshold: float = 0.8) -> Tensor:
    """Fraction of tissue pixels per image, (B,): darker than ``luminosity_threshold`` (Lab L* / 100)
    and not black (:func:`lstainnorm.layers.tissue.tissue_mask`)."""
    lum = rgb_to_lab(x)[:, 0] / 100.0
    return ((lum < luminosity_threshold) & tissue_mask(x)[:, 0]).float().mean(dim=(1, 2))


def mosaic_indices(labels: Sequence[int], n: int = 16, seed: int = 0) -> list[int]:
    """Up to ``n`` tile indices, taken round-robin over the classes (each class shuffled by ``seed``)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    groups = [rng.permutation(np.flatnonzero(labels == c)).tolist()[::-1] for c in np.unique(labels)]
    return round_robin(groups, n)


def training_mosaic(images: Sequence[Tensor], labels: Sequence[int] | None = None, n: int = 16, seed: int = 0) -> Tensor:
    """A square mosaic of up to ``n`` training tiles (stratified by label), the target that
    fits a classical normaliser "to the training set"; shape (1, 3, H, W)."""
    if labels is not None and len(labels) == len(images):
        order = mosaic_indices(labels, n, seed)
    else:
        order = np.random.default_rng(seed).permutation(len(images))[:n].tolist()
    tiles = [images[i] for i in order]
    size = min(min(t.shape[-2:]) for t in tiles)
    tiles = [t[..., :size, :size] for t in tiles]
    side = int(math.ceil(math.sqrt(len(tiles))))
    while len(tiles) < side * side:
        tiles.append(tiles[len(tiles) % len(order)])
    rows = [torch.cat(tiles[r * side : (r + 1) * side], dim=-1) for r in range(side)]
    return torch.cat(rows, dim=-2).unsqueeze(0)


class ClassicalNorm(nn.Module):
    """Reinhard, Macenko or Vahadane normalisation with background fallback.

    Args:
        method: ``reinhard``, ``macenko`` or ``vahadane``.
        target: template image (3, H, W) or (1, 3, H, W) in [0, 1]; fit later with :meth:`fit` if None.
        backend: ``torch-staintools`` (batched; all three methods) or ``torchstain`` (per image;
            macenko and reinhard).
        min_tissue: tiles with a smaller tissue fraction are passed through unchanged (default
            0.05 for Macenko and Vahadane, whose stain-vector estimate needs tissue; 0.01 for
            Reinhard, which only needs some contrast: fat tiles have 2-8 % tissue by this measure).
        luminosity_threshold: L* / 100 below which a pixel counts as tissue.
        cache_mb: size of the in-memory result cache (0 disables it).
        cache_dir: optional folder that keeps normalised tiles between runs (keyed by method,
            template and tile content), for benchmarks that train several seeds.
        seed: seed of the randomised solvers.
    """

    preprocessing = True

    def __init__(
        self,
        method: str = "macenko",
        target: Tensor | None = None,
        backend: str = "torch-staintools",
        min_tissue: float | None = None,
        luminosity_threshold: float = 0.8,
        cache_mb: float = 512.0,
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown classical method {method!r}; choose one of {list(METHODS)}")
        if backend not in ("torch-staintools", "torchstain"):
            raise ValueError(f"backend must be 'torch-staintools' or 'torchstain', got {backend!r}")
        if backend == "torchstain" and method == "vahadane":
            raise ValueError("torchstain has no Vahadane; use backend='torch-staintools'")
        module = backend.replace("-", "_")
        if importlib.util.find_spec(module) is None:  # say so now, not at the first tile
            raise missing_extra(ModuleNotFoundError(name=module), f"normalisation {method!r}")  # type: ignore[misc]
        self.method, self.backend = method, backend
        if min_tissue is None:
            min_tissue = 0.01 if method == "reinhard" else 0.05
        self.min_tissue, self.luminosity_threshold = float(min_tissue), float(luminosity_threshold)
        self.seed = int(seed)
        self.fallbacks = 0
        self.calls = 0
        self._cache: OrderedDict[bytes, Tensor] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = int(cache_mb * 2**20)
        # The backend object is kept out of the module tree: its buffers are not ours to save
        # (the fitted template is; the backend is rebuilt from it on load).
        object.__setattr__(self, "_impl", None)
        self.cache_dir = cache_dir
        self._salt = b""
        self.register_buffer("target", torch.zeros(0))
        self.register_buffer("target_stats", torch.zeros(0))  # Reinhard fitted to tiles: Lab means, stds (2, 3)
        if target is not None:
            self.fit(target)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, backend={self.backend!r}, fitted={self.is_fitted}, fallbacks={self.fallbacks}"

    @property
    def is_fitted(self) -> bool:
        return self._impl is not None

    # -- fitting ---------------------------------------------------------------------------------
    def fit(self, target: Tensor) -> "ClassicalNorm":
        """Fit to a template image (3, H, W) / (1, 3, H, W), float in [0, 1]."""
        if target.dim() == 3:
            target = target.unsqueeze(0)
        check_image(target, "target")
        check_rgb_range(target, "target")
        if target.shape[0] != 1:
            raise ValueError(f"fit to one template image (batch 1), got batch {target.shape[0]}; use training_mosaic() for several")
        frac = float(tissue_fraction(target.float(), self.luminosity_threshold)[0])
        if frac < self.min_tissue:
            raise ValueError(f"the template image has too little tissue ({100 * frac:.1f} % of pixels); choose another")
        self.target = target.detach().float().cpu()
        self.target_stats = torch.zeros(0)
        object.__setattr__(self, "_impl", self._build(self.target))
        self._fitted(self.target)
        return self

    @torch.no_grad()
    def fit_tiles(self, batches) -> "ClassicalNorm":
        """Reinhard: fit to the mean of per-tile Lab means and stds of a training set (``batches``:
        a (B, 3, H, W) tensor or an iterable of them, RGB in [0, 1]), the rule by which
        :func:`~lstainnorm.layers.template.estimate_template` estimates the layers' templates."""
        if self.method != "reinhard" or self.backend != "torch-staintools":
            raise ValueError("fit_tiles fits Reinhard (torch-staintools backend); fit Macenko/Vahadane to an image or a mosaic")
        from torch_staintools.functional.conversion.lab import rgb_to_lab as ts_lab

        sums, n = torch.zeros(2, 3, dtype=torch.float64), 0
        for x in [batches] if isinstance(batches, Tensor) else batches:
            check_image(x)
            check_rgb_range(x)
            lab = ts_lab(x.float().cpu())
            sums[0] += lab.mean(dim=(2, 3)).double().sum(0)
            sums[1] += lab.flatten(2).std(dim=2).double().sum(0)
            n += x.shape[0]
        if n == 0:
            raise ValueError("fit_tiles got no images")
        self.target = torch.zeros(0)
        self.target_stats = (sums / n).float()
        object.__setattr__(self, "_impl", self._build_from_stats(self.target_stats))
        self._fitted(self.target_stats)
        return self

    def _fitted(self, key: Tensor) -> None:
        self._salt = hashlib.blake2b(self.method.encode() + key.numpy().tobytes(), digest_size=16).digest()
        self._cache.clear()
        self._cache_bytes = 0

    def _build_from_stats(self, stats: Tensor):
        from torch_staintools.normalizer.reinhard import ReinhardNormalizer

        impl = ReinhardNormalizer(luminosity_threshold=None)
        impl.register_buffer("target_means", stats[0].view(1, 3, 1, 1).clone())
        impl.register_buffer("target_stds", stats[1].view(1, 3, 1, 1).clone())
        return impl

    def _build(self, target: Tensor):
        if self.backend == "torchstain":
            import torchstain

            cls = {"macenko": torchstain.normalizers.MacenkoNormalizer, "reinhard": torchstain.normalizers.ReinhardNormalizer}[self.method]
            impl = cls(backend="torch")
            impl.fit((target[0] * 255).round().to(torch.uint8))
            return impl
        from torch_staintools.normalizer import NormalizerBuilder

        logging.getLogger("torch_staintools").setLevel(logging.ERROR)
        # Reinhard over all pixels (see the module docstring); the stain methods over tissue.
        threshold = None if self.method == "reinhard" else self.luminosity_threshold
        impl = NormalizerBuilder.build(self.method, concentration_solver="qr", luminosity_threshold=threshold, rng=self.seed)
        impl.fit(target)
        return impl

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key, skey = prefix + "target", prefix + "target_stats"
        if key in state_dict:
            self.target = torch.empty_like(state_dict[key])  # the fitted template's shape
        if skey in state_dict:
            self.target_stats = torch.empty_like(state_dict[skey])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if skey not in state_dict and skey in missing_keys:  # checkpoints from before fit_tiles: not missing
            missing_keys.remove(skey)
        if key in state_dict and state_dict[key].numel():
            self.fit(state_dict[key].float())
        elif skey in state_dict and state_dict[skey].numel():
            self.target_stats = state_dict[skey].float()
            object.__setattr__(self, "_impl", self._build_from_stats(self.target_stats))
            self._fitted(self.target_stats)

    # -- normalising --------------------------------------------------------------------------------
    def _run_impl(self, x: Tensor) -> Tensor:
        if self.backend == "torchstain":
            outs = []
            for t in x:
                with torch.no_grad():
                    res = self._impl.normalize(I=(t * 255).round().to(torch.uint8), **({"stains": False} if self.method == "macenko" else {}))
                img = res[0] if isinstance(res, tuple) else res
                outs.append(img.permute(2, 0, 1).float() / 255.0 if img.shape[-1] == 3 else img.float() / 255.0)
            return torch.stack(outs)
        with torch.no_grad():
            if self.method == "reinhard":
                return self._impl.transform(x.contiguous())
            # torch-staintools' stain separation is faster tile by tile than batched on a CPU.
            return torch.cat([self._impl.transform(x[i : i + 1].contiguous()) for i in range(x.shape[0])])

    def _normalize_some(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalise a batch; returns (output, fallback mask)."""
        ok = tissue_fraction(x, self.luminosity_threshold) >= self.min_tissue
        out = x.clone()
        idx = torch.nonzero(ok).flatten()
        if len(idx):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = self._run_impl(x[idx])
                good = torch.isfinite(res).flatten(1).all(dim=1)
                out[idx[good]] = res[good].clamp(0, 1).to(out.dtype)
                ok[idx[~good]] = False
            except Exception:
                # One bad tile fails a batched solver: retry the tiles one by one.
                for i in idx.tolist():
                    try:
                        r = self._run_impl(x[i : i + 1])
                        if torch.isfinite(r).all():
                            out[i] = r[0].clamp(0, 1).to(out.dtype)
                        else:
                            ok[i] = False
                    except Exception:
                        ok[i] = False
        return out, ~ok

    def _key(self, t: Tensor) -> bytes:
        return hashlib.blake2b(self._salt + t.contiguous().numpy().tobytes(), digest_size=16).digest()

    def _disk_get(self, key: bytes) -> Tensor | None:
        if not self.cache_dir:
            return None
        from pathlib import Path

        p = Path(self.cache_dir) / f"{key.hex()}.npy"
        if p.is_file():
            try:
                return torch.from_numpy(np.load(p))
            except Exception:
                return None
        return None

    def _disk_put(self, key: bytes, q: Tensor) -> None:
        if not self.cache_dir:
            return
        import io
        from pathlib import Path

        buf = io.BytesIO()
        np.save(buf, q.numpy())
        atomic_write_bytes(Path(self.cache_dir) / f"{key.hex()}.npy", buf.getvalue())

    def forward(self, x: Tensor) -> Tensor:
        """Normalise (B, 3, H, W) RGB in [0, 1]; tiles without enough tissue pass through unchanged."""
        check_image(x)
        check_rgb_range(x)
        if not self.is_fitted:
            raise RuntimeError(f"{self.method} normaliser is not fitted: call .fit(template_image) first")
        device, dtype = x.device, x.dtype
        xc = x.detach().float().cpu()
        out = xc.clone()
        todo, keys = [], []
        for i in range(xc.shape[0]):
            k = self._key(xc[i]) if (self._cache_limit > 0 or self.cache_dir) else None
            keys.append(k)
            hit = None
            if k is not None:
                if k in self._cache:
                    self._cache.move_to_end(k)
                    hit = self._cache[k]
                else:
                    hit = self._disk_get(k)
                    if hit is not None:
                        self._remember(k, hit)
            if hit is None:
                todo.append(i)
            elif hit.numel():  # an empty entry marks a tile that passes through
                out[i] = hit.float() / 255.0
        if todo:
            res, fell = self._normalize_some(xc[todo])
            self.fallbacks += int(fell.sum())
            self.calls += len(todo)
            for j, i in enumerate(todo):
                # Normalised tiles are 8-bit images, on every call alike; fallbacks stay exact.
                q = torch.zeros(0, dtype=torch.uint8) if fell[j] else (res[j].clamp(0, 1) * 255.0).round().to(torch.uint8)
                if q.numel():
                    out[i] = q.float() / 255.0
                if keys[i] is not None:
                    self._remember(keys[i], q)
                    self._disk_put(keys[i], q)
        return out.to(device=device, dtype=dtype if dtype in (torch.float32, torch.float64) else torch.float32)

    def _remember(self, key: bytes, q: Tensor) -> None:
        # Cached as uint8: 1/4 of the memory; classical normalisers' outputs are 8-bit images anyway.
        if self._cache_limit <= 0:
            return
        self._cache[key] = q
        self._cache_bytes += q.numel()
        while self._cache_bytes > self._cache_limit and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.numel()

    def stats(self) -> dict:
        return {"method": self.method, "normalised": self.calls, "fallbacks": self.fallbacks}


def _create(method: str, target: Tensor | str | None = None, **kwargs) -> ClassicalNorm:
    if isinstance(target, str):
        target = image_to_tensor(read_rgb(target))
    return ClassicalNorm(method, target=target, **kwargs)


# Entry points of the ``lstainnorm.norms`` group (pyproject.toml): ``create_norm("macenko", target=...)``.
def reinhard(target: Tensor | str | None = None, **kwargs) -> ClassicalNorm:
    """Reinhard normalisation fitted to ``target`` (an image tensor or file); see :class:`ClassicalNorm`."""
    return _create("reinhard", target, **kwargs)


def macenko(target: Tensor | str | None = None, **kwargs) -> ClassicalNorm:
    """Macenko normalisation fitted to ``target`` (an image tensor or file); see :class:`ClassicalNorm`."""
    return _create("macenko", target, **kwargs)


def vahadane(target: Tensor | str | None = None, **kwargs) -> ClassicalNorm:
    """Vahadane normalisation fitted to ``target`` (an image tensor or file); see :class:`ClassicalNorm`."""
    return _create("vahadane", target, **kwargs)
