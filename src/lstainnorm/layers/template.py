"""Stain templates: the per-space target mean and std, their YAML files and their estimation.

A template file uses the reference's config keys (``mu0_lab``, ``sigma0_lab``,
``mu0_hsv`` ...; internal units, see :mod:`lstainnorm.color`), so it can be merged
into a training config as it is::

    # lstainnorm template: mean over images of each image's channel mean / std
    mu0_lab: [70.51, 21.96, -13.80]
    sigma0_lab: [12.71, 8.72, 6.02]
    n_images: 5000
    tissue_mask: true
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import yaml
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..files import atomic_write_bytes
from .color import get_space
from .tissue import TISSUE_MIN_PIXELS, channel_stats
from .tissue import tissue_mask as _tissue_mask_fn

__all__ = ["Template", "estimate_template", "resolve_templates", "REFERENCE_TEMPLATES", "load_template"]

Pair = tuple[list[float], list[float]]

# The numbers hard-coded in the reference implementation (NCT-CRC-HE-100K, method.md section 3).
REFERENCE_TEMPLATES: dict[str, dict[str, Pair]] = {
    "single": {"lab": ([70.5085, 21.9641, -13.7990], [12.7103, 8.7185, 6.0168])},
    "fusion": {
        "lab": ([19.5645, 20.6909, -16.7789], [16.3662, 7.3791, 7.2138]),
        "hsv": ([5.0052, 0.6096, 0.3046], [0.4368, 0.1728, 0.1720]),
        "rgb": ([0.2604, 0.1451, 0.2891], [0.1810, 0.1400, 0.1534]),
    },
}


def _as_triple(v: Any, what: str) -> list[float]:
    if isinstance(v, Tensor):
        v = v.detach().flatten().tolist()
    try:
        vals = [float(t) for t in v]
    except TypeError as err:
        raise ValueError(f"{what} must be a list of 3 numbers, got {v!r}") from err
    if len(vals) != 3 or not all(math.isfinite(t) for t in vals):
        raise ValueError(f"{what} must be 3 finite numbers, got {v!r}")
    return vals


class Template:
    """Template mean and std per colour space (internal units), plus optional fusion weights.

    Args:
        stats: ``{space: (mu, sigma)}``, 3 values each.
        fusion: optional ``{space: {"a": float, "b": float, "delta": [3 floats]}}``.
        meta: free-form information saved with the YAML (number of images, source ...).
    """

    def __init__(
        self,
        stats: Mapping[str, tuple[Sequence[float], Sequence[float]]],
        fusion: Mapping[str, Mapping[str, Any]] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.stats: dict[str, Pair] = {}
        for name, pair in stats.items():
            sp = get_space(name)
            if isinstance(pair, Mapping):
                pair = (pair["mu"], pair["sigma"])
            mu, sigma = pair
            self.stats[sp.name] = (_as_triple(mu, f"mu0_{sp.name}"), _as_triple(sigma, f"sigma0_{sp.name}"))
        self.fusion = {k: dict(v) for k, v in (fusion or {}).items()}
        self.meta = dict(meta or {})

    @property
    def spaces(self) -> list[str]:
        return list(self.stats)

    def __getitem__(self, space: str) -> Pair:
        return self.stats[get_space(space).name]

    def __contains__(self, space: str) -> bool:
        return get_space(space).name in self.stats

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and self.stats == other.stats and self.fusion == other.fusion

    def natural(self) -> dict[str, dict[str, Any]]:
        """The template in natural units: Lab as is, HSV hue in degrees, RGB 0-255, HED OD."""
        out: dict[str, dict[str, Any]] = {}
        for name, (mu, sigma) in self.stats.items():
            sp = get_space(name)
            out[name] = {
                "channels": list(sp.channels),
                "units": list(sp.natural_units),
                "mu": sp.to_natural(mu),
                "sigma": sp.to_natural(sigma),
            }
        return out

    def __repr__(self) -> str:
        lines = ["Template("]
        for name, d in self.natural().items():
            mu = ", ".join(f"{c}={v:.3f}" for c, v in zip(d["channels"], d["mu"]))
            sd = ", ".join(f"{v:.3f}" for v in d["sigma"])
            lines.append(f"  {name}: mu [{mu}]  sigma [{sd}]  ({'/'.join(d['units'])})")
        for name, f in self.fusion.items():
            lines.append(f"  fusion {name}: a={f.get('a', float('nan')):.4f} b={f.get('b', float('nan')):.4f}")
        lines.append(")")
        return "\n".join(lines)

    # -- YAML in the reference config's format -------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """Flat dict with the reference's keys (``mu0_lab``, ``sigma0_lab``, ...)."""
        cfg: dict[str, Any] = {}
        for name, (mu, sigma) in self.stats.items():
            cfg[f"mu0_{name}"] = [float(v) for v in mu]
            cfg[f"sigma0_{name}"] = [float(v) for v in sigma]
        if self.fusion:
            cfg["fusion_weights"] = {k: dict(v) for k, v in self.fusion.items()}
        cfg.update(self.meta)
        return cfg

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Template":
        """Read ``mu0_<space>``/``sigma0_<space>`` keys (and the reference's bare ``mu0``/``sigma0``,
        which its single-space Lab layers use) from a mapping."""
        stats: dict[str, tuple] = {}
        keys = set(cfg)
        for key in sorted(keys):
            if key.startswith("mu0_"):
                space = key[4:]
                skey = f"sigma0_{space}"
                if skey not in cfg:
                    raise ValueError(f"template has {key} but no {skey}")
                stats[space] = (cfg[key], cfg[skey])
            elif key.startswith("sigma0_") and f"mu0_{key[7:]}" not in keys:
                raise ValueError(f"template has {key} but no mu0_{key[7:]}")
        if "mu0" in cfg and "lab" not in stats and cfg.get("mu0") is not None:
            stats["lab"] = (cfg["mu0"], cfg["sigma0"])
        if not stats:
            raise ValueError("no template found: expected keys like mu0_lab / sigma0_lab")
        meta = {k: v for k, v in cfg.items() if k in ("n_images", "tissue_mask", "source", "n_skipped", "n_without_tissue")}
        tpl = cls(stats, fusion=cfg.get("fusion_weights"), meta=meta)
        tpl.check_sigma()
        return tpl

    def check_sigma(self) -> "Template":
        """Raise ValueError unless every std is > 0: a zero or negative std would turn every
        image into one flat colour (or invert its contrast)."""
        for name, (_, sigma) in self.stats.items():
            bad = [v for v in sigma if not v > 0]
            if bad:
                raise ValueError(f"sigma0_{name} must be > 0 in every channel (a template std), got {sigma}")
        return self

    def save(self, path: str | Path) -> Path:
        """Write the template as YAML (atomically: a temporary file, then a rename)."""
        path = Path(path)
        header = (
            "# lstainnorm template: per colour space, the mean over images of each image's channel\n"
            "# mean (mu0_*) and std (sigma0_*), in internal units: Lab L*a*b*; HSV hue in radians,\n"
            "# S and V 0-1; RGB 0-1; HED optical density. Usable as a training config fragment.\n"
        )
        text = header + yaml.safe_dump(self.to_config(), sort_keys=False, default_flow_style=None)
        return atomic_write_bytes(path, text.encode())

    @classmethod
    def load(cls, path: str | Path) -> "Template":
        """Read a template YAML written by :meth:`save` (or a config file holding template keys)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"template file not found: {path}")
        not_yaml = f"{path} is not a template YAML (write one with `lstainnorm template IMAGES -o {path.stem}.yaml`)"
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:  # an image or other binary file
            raise ValueError(not_yaml) from None
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{not_yaml}: expected a mapping of template keys, got {type(cfg).__name__}")
        try:
            return cls.from_config(cfg)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


def load_template(path: str | Path) -> Template:
    """Shorthand for :meth:`Template.load`."""
    return Template.load(path)


def resolve_templates(
    templates: Template | Mapping | str | Path | None, spaces: Sequence[str], fusion: bool = False
) -> dict[str, Pair]:
    """Turn the ``templates`` argument of the layers into ``{space: (mu0, sigma0)}``.

    Spaces a template does not cover fall back to the space's default.
    """
    if templates is None:
        tpl = Template({})
    elif isinstance(templates, Template):
        tpl = templates
    elif isinstance(templates, str) and templates == "reference":
        ref = REFERENCE_TEMPLATES["fusion" if fusion else "single"]
        tpl = Template({k: v for k, v in ref.items()})
    elif isinstance(templates, (str, Path)):
        tpl = Template.load(templates)
    elif isinstance(templates, Mapping):
        if any(str(k).startswith("mu0") for k in templates):
            tpl = Template.from_config(templates)
        else:
            tpl = Template(templates)
    else:
        raise TypeError(
            "templates must be None, 'reference', a Template, a {space: (mu0, sigma0)} mapping "
            f"or a YAML path, got {type(templates).__name__}"
        )
    out = {}
    for s in spaces:
        sp = get_space(s)
        out[sp.name] = tpl[sp.name] if sp.name in tpl else (list(sp.default_mu), list(sp.default_sigma))
    return out


# -- estimation -------------------------------------------------------------------------------------
def _to_float_image(img: Any, where: str) -> Tensor:
    """Accept a float tensor in [0, 1], a uint8 tensor / array or a PIL image; return (3, H, W) float."""
    if not isinstance(img, Tensor):
        if hasattr(img, "convert") and hasattr(img, "size"):  # PIL
            img = np.asarray(img.convert("RGB"))
        if isinstance(img, np.ndarray):
            arr = img
            if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] not in (3,):
                arr = arr[..., :3].transpose(2, 0, 1)
            img = torch.from_numpy(np.ascontiguousarray(arr))
        else:
            raise TypeError(f"{where}: expected an image tensor, array or PIL image, got {type(img).__name__}")
    if img.dtype == torch.uint8:
        img = img.float() / 255.0
    if not torch.is_floating_point(img):
        raise TypeError(f"{where}: images must be float in [0, 1] or uint8, got {img.dtype}")
    if img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"{where}: expected an image of shape (3, H, W), got {tuple(img.shape)}")
    return img.float()


def _image_of(item: Any) -> Any:
    """The image of a Dataset item or DataLoader batch: ``(image, label, ...)``, a dict, or the image."""
    if isinstance(item, Mapping):
        for key in ("image", "img", "x", "input"):
            if key in item:
                return item[key]
        raise ValueError(f"item dict has no image key (tried image/img/x/input): {list(item)}")
    if isinstance(item, tuple) and item:
        return item[0]
    if isinstance(item, list) and len(item) == 2 and isinstance(item[0], Tensor) and item[0].dim() == 4:
        return item[0]  # default_collate turns (image, label) pairs into [images, labels]
    return item


def _iter_image_batches(source: Any, batch_size: int) -> tuple[Iterable[Any], int | None]:
    if isinstance(source, Tensor):
        if source.dim() == 3:
            source = source.unsqueeze(0)
        if source.dim() != 4:
            raise ValueError(f"source tensor must be (B, 3, H, W) or (3, H, W), got {tuple(source.shape)}")
        return (source[i : i + batch_size] for i in range(0, len(source), batch_size)), math.ceil(
            len(source) / batch_size
        )
    if isinstance(source, DataLoader):
        try:
            total = len(source)
        except TypeError:
            total = None
        return (_image_of(b) for b in source), total
    if isinstance(source, Dataset):
        loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=list)
        return ([_image_of(item) for item in b] for b in loader), len(loader)
    if isinstance(source, (list, tuple)):
        return (source[i : i + batch_size] for i in range(0, len(source), batch_size)), math.ceil(
            len(source) / batch_size
        )
    raise TypeError(
        f"source must be a tensor batch, a Dataset, a DataLoader or a list of images, got {type(source).__name__}"
    )


@torch.no_grad()
def estimate_template(
    source: Any,
    spaces: Sequence[str] = ("lab", "hsv", "rgb"),
    tissue_mask: bool = True,
    *,
    batch_size: int = 64,
    max_images: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Template:
    """Estimate the initial template of each colour space from training images.

    The template is the mean over images of each image's per-channel mean and (unbiased)
    std, as the reference computed its hard-coded numbers (method.md section 3).

    Args:
        source: a tensor batch ``(B, 3, H, W)`` (float in [0, 1] or uint8), a ``Dataset``
            returning images or ``(image, label)`` pairs, a ``DataLoader`` (streamed batch by
            batch), or a list of images.
        spaces: colour spaces to estimate.
        tissue_mask: take each image's statistics over tissue only (near-white background
            and black pixels left out; images without enough tissue use all pixels).
        batch_size: images per step for tensors and Datasets.
        max_images: stop after this many images.
        progress: show a progress bar.
        device: where to compute.
        transform: applied to each float batch first (e.g. a layer's stain stage, so that the
            template describes what the branches will see).

    Returns:
        A :class:`Template` with ``meta["n_images"]``.
    """
    sps = [get_space(s) for s in spaces]
    if not sps:
        raise ValueError("spaces must name at least one colour space")
    batches, total = _iter_image_batches(source, batch_size)
    sums = {sp.name: torch.zeros(2, 3, dtype=torch.float64) for sp in sps}
    n = n_glass = 0
    bar = batches
    if progress:
        try:  # a progress bar where tqdm is installed (the [train] extra); none in the core install
            from tqdm.auto import tqdm

            bar = tqdm(batches, total=total, desc="estimating template", unit="batch")
        except ModuleNotFoundError:
            pass
    for bi, batch in enumerate(bar):
        if isinstance(batch, Tensor) and batch.dim() == 4:
            if batch.dtype == torch.uint8:
                batch = batch.float() / 255.0
            groups = [batch.float()]
        else:
            imgs = [_to_float_image(im, f"batch {bi} image {j}") for j, im in enumerate(batch) if im is not None]
            # Same-size images go through together; others one by one.
            groups = []
            by_size: dict[tuple, list[Tensor]] = {}
            for im in imgs:
                by_size.setdefault(tuple(im.shape), []).append(im)
            groups = [torch.stack(v) for v in by_size.values()]
            if not groups:
                continue
        for x in groups:
            if max_images is not None and n >= max_images:
                break
            if max_images is not None:
                x = x[: max_images - n]
            x = x.to(device)
            if not torch.isfinite(x).all() or x.min() < -1e-4 or x.max() > 1 + 1e-4:
                raise ValueError(
                    f"batch {bi}: image values must be finite and in [0, 1], observed "
                    f"[{float(x.min()):.4g}, {float(x.max()):.4g}]; scale to [0, 1]"
                )
            if transform is not None:
                with torch.no_grad():
                    x = transform(x)
            mask = _tissue_mask_fn(x) if tissue_mask else None
            if mask is not None:
                # Images (nearly) without tissue would pull the template towards glass: left out.
                has = mask.flatten(1).sum(1) >= min(TISSUE_MIN_PIXELS, x.shape[-1] * x.shape[-2])
                n_glass += int((~has).sum())
                x, mask = x[has], mask[has]
                if x.shape[0] == 0:
                    continue
            for sp in sps:
                mean, sd = channel_stats(sp.to_space(x), weight=mask)
                sums[sp.name][0] += mean.flatten(1).double().sum(0).cpu()
                sums[sp.name][1] += sd.flatten(1).double().sum(0).cpu()
            n += x.shape[0]
        if max_images is not None and n >= max_images:
            break
    if hasattr(bar, "close"):
        bar.close()
    if n == 0 and n_glass:
        raise ValueError(
            f"none of the {n_glass} images holds tissue (all glass or black): a template estimated from them would "
            "paint every tile one colour; estimate it from images with tissue"
        )
    if n == 0:
        raise ValueError("no images found in source: cannot estimate a template")
    stats = {name: ((s[0] / n).tolist(), (s[1] / n).tolist()) for name, s in sums.items()}
    meta = {"n_images": n, "tissue_mask": bool(tissue_mask)}
    if n_glass:
        meta["n_without_tissue"] = n_glass
    return Template(stats, meta=meta).check_sigma()
