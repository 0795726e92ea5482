"""``lstainnorm export``: the trained normalisation layer alone, as ONNX or TorchScript.

The export graph is :class:`ExportableNorm`: the same computation as
:class:`~lstainnorm.StainNorm` / :class:`~lstainnorm.LStainNorm`, written so that a tracer
keeps batch size and image size dynamic (counts as tensors, ceil-mode max-pooling, one
softmax over all tokens instead of cache-sized blocks, no input checks). ``export_norm``
checks that the exported file reproduces the PyTorch layer to ``tolerance`` on inputs of
several sizes before it reports success. The file carries its provenance (:func:`norm_metadata`:
lstainnorm version, layer, spaces, template values, fusion weights, the run and its config hash)
as ONNX ``metadata_props`` or a TorchScript extra file; :func:`read_metadata` reads it back as
data (``lstainnorm export --info FILE``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import warnings
import zipfile
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files import atomic_path, sweep_stale_temps
from ..layers.fusion import LStainNorm
from ..layers.identity import Identity
from ..layers.norm import StainNorm

__all__ = ["ExportableNorm", "export_norm", "check_parity", "norm_metadata", "read_metadata", "config_hash"]

# The TorchScript extra file that holds the metadata.
TORCHSCRIPT_META = "lstainnorm.json"


def _version() -> str:
    try:
        return _metadata.version("lstainnorm")
    except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def config_hash(config: dict) -> str:
    """SHA-256 of a run's config (canonical JSON): the same training setup, the same hash."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def norm_metadata(norm: nn.Module, config: dict | None = None, run: str | Path | None = None) -> dict[str, Any]:
    """What an exported layer records about itself: lstainnorm version, layer class, spaces, the
    template (internal units, as in a template YAML, and natural units), fusion weights, and,
    when it comes from a run, the run's folder name and config hash."""
    meta: dict[str, Any] = {
        "lstainnorm_version": _version(),
        "layer": type(norm).__name__,
        "exported": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if isinstance(norm, LStainNorm):
        meta["spaces"] = list(norm.spaces)
        meta["fusion"] = norm.fusion
    elif isinstance(norm, StainNorm):
        meta["spaces"] = [norm.space.name]
    if hasattr(norm, "template"):
        tpl = norm.template()
        meta["template"] = {k: v for k, v in tpl.to_config().items() if k != "fusion_weights"}
        meta["template_natural"] = tpl.natural()
        if tpl.fusion:
            meta["fusion_weights"] = {k: dict(v) for k, v in tpl.fusion.items()}
    if run is not None:
        meta["run"] = Path(run).name
    if config is not None:
        meta["config_sha256"] = config_hash(config)
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported ``.onnx`` or TorchScript file, read as data (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such exported file: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): not an exported file (an export that was cut short?)")
    if zipfile.is_zipfile(path):  # TorchScript archives are zip files; the extra file is plain JSON
        with zipfile.ZipFile(path) as zf:
            everything = zf.namelist()
            names = [n for n in everything if n.endswith("/extra/" + TORCHSCRIPT_META)]
            if not names:
                if not any("/code/" in n or n.endswith("/constants.pkl") for n in everything):
                    raise ValueError(f"{path} is a PyTorch checkpoint (e.g. a run's best.ckpt), not an exported file: "
                                     f"`lstainnorm export RUN -o norm.onnx` exports a run; --info reads what export wrote")
                raise ValueError(f"{path} is a TorchScript file without lstainnorm metadata (exported by another tool?)")
            return json.loads(zf.read(names[0]))
    with open(path, "rb") as fh:
        if fh.read(4) == b"PK\x03\x04":  # a zip's first bytes, but no readable archive: cut short
            raise ValueError(f"{path} is a truncated or damaged TorchScript/PyTorch file (a zip archive cut short); export it again")
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf errors have no common base
        raise ValueError(f"{path} is neither an ONNX nor a TorchScript file: {err}") from None
    props = {p.key: p.value for p in model.metadata_props}
    if "lstainnorm_version" not in props:
        raise ValueError(f"{path} is an ONNX file without lstainnorm metadata (exported by another tool?)")
    out: dict[str, Any] = {}
    for k, v in props.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


class _Branch(nn.Module):
    def __init__(self, norm: StainNorm, eps: float) -> None:
        super().__init__()
        self.space = norm.space
        self.register_buffer("mu", norm.mu.detach().clone().view(1, 3, 1, 1))
        self.register_buffer("sigma", norm.sigma.detach().clone().view(1, 3, 1, 1))
        self.register_buffer("floor2", torch.tensor(norm.space.std_floor).square().view(1, 3, 1, 1))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = self.space.to_space(x)
        count = torch.ones_like(y[:, :1]).sum(dim=(2, 3), keepdim=True)
        mean = y.sum(dim=(2, 3), keepdim=True) / count
        var = (y - mean).square().sum(dim=(2, 3), keepdim=True) / (count - 1.0).clamp(min=1.0)
        sd = torch.maximum(var, self.floor2).sqrt()
        return self.space.from_space((y - mean) * (self.sigma / (sd + self.eps)) + self.mu)


class ExportableNorm(nn.Module):
    """A trace-friendly copy of a trained StainNorm or LStainNorm (inference only)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        if getattr(norm, "stain_first", None) is not None:
            raise TypeError("cannot export a layer with a stain stage (norm.stain_first): Macenko's per-image "
                            "stain estimate (an eigen-decomposition and percentiles) is not exported yet")
        if isinstance(norm, StainNorm):
            if norm.tissue_stats:
                raise ValueError("export does not support tissue_stats=True (a data-dependent mask)")
            self.kind = "single"
            self.branches = nn.ModuleList([_Branch(norm, norm.eps)])
            self.clamp = norm.clamp
        elif isinstance(norm, LStainNorm):
            if norm.tissue_stats:
                raise ValueError("export does not support tissue_stats=True (a data-dependent mask)")
            self.branches = nn.ModuleList([_Branch(norm.branches[s], norm.eps) for s in norm.spaces])
            self.clamp = norm.clamp
            if norm.fusion == "mean":
                self.kind = "mean"
                return
            self.kind = "fusion"
            att = norm.attention
            w = torch.cat([att.query.weight, att.key.weight, att.value.weight]).detach().clone()  # (5, 3, 1, 1)
            b = torch.cat([att.query.bias, att.key.bias, att.value.bias]).detach().clone()
            self.register_buffer("qkv_weight", w)
            self.register_buffer("qkv_bias", b)
            self.register_buffer("delta", (1.0 + norm.delta.detach().clone()).view(-1, 1, 3, 1, 1))
            self.register_buffer("a", norm.a.detach().clone().view(-1, 1, 1, 1, 1))
            self.register_buffer("b", norm.b.detach().clone().view(-1, 1, 1, 1, 1))
            self.eps = norm.eps
            self.pool = att.pool
            self.clamp = norm.clamp
        elif isinstance(norm, Identity):
            self.kind = "identity"
            self.branches = nn.ModuleList()
            self.clamp = False
        else:
            raise TypeError(f"cannot export {type(norm).__name__}: only StainNorm, LStainNorm and 'none' are exportable")

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "identity":
            return x * 1.0
        if self.kind == "single":
            out = self.branches[0](x)
            return out.clamp(0.0, 1.0) if self.clamp else out
        xs = torch.stack([br(x).abs() for br in self.branches])  # (S, B, 3, H, W)
        if self.kind == "mean":
            out = xs.mean(dim=0)
            return out.clamp(0.0, 1.0) if self.clamp else out
        flat = xs.flatten(0, 1)
        qkv = F.max_pool2d(F.conv2d(flat, self.qkv_weight, self.qkv_bias), self.pool, self.pool, ceil_mode=True)
        q, k, v = qkv[:, 0].flatten(1), qkv[:, 1].flatten(1), qkv[:, 2:].flatten(2)
        attn = torch.softmax(q.unsqueeze(2) * k.unsqueeze(1), dim=-1)
        small = torch.bmm(v, attn).reshape(qkv[:, 2:].shape)
        up = F.interpolate(small, scale_factor=float(self.pool), mode="bilinear", align_corners=False)
        att = up[..., : x.shape[-2], : x.shape[-1]].abs().reshape(xs.shape)
        big = (self.delta * att + xs) / (xs + self.eps)
        wn = big / (big.sum(dim=0, keepdim=True) + self.eps)
        w = self.a * wn + self.b
        num, den = (w * xs).sum(dim=0), w.sum(dim=0)
        sign = torch.where(den < 0, -torch.ones_like(den), torch.ones_like(den))
        out = num / (sign * den.abs().clamp(min=1e-6))
        return out.clamp(0.0, 1.0) if self.clamp else out


def _inputs(seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [(2, 64, 64), (1, 37, 50), (3, 96, 80), (1, 224, 224)]
    return [(torch.rand(b, 3, h, w, generator=g) * 0.8 + 0.1) for b, h, w in sizes]


def check_parity(norm: nn.Module, run_exported, tolerance: float = 1e-4) -> float:
    """Largest absolute difference between the layer and an exported runner over several shapes."""
    worst = 0.0
    norm.eval()
    for x in _inputs():
        with torch.no_grad():
            ref = norm(x).float()
        got = torch.as_tensor(run_exported(x)).float()
        if got.shape != ref.shape:
            raise ValueError(f"exported model returned shape {tuple(got.shape)} for input {tuple(x.shape)}, expected {tuple(ref.shape)}")
        worst = max(worst, float((got - ref).abs().max()))
    if worst > tolerance:
        raise ValueError(f"exported model differs from the PyTorch layer by {worst:.2e} (> {tolerance:.0e})")
    return worst


def export_norm(norm: nn.Module, path: str | Path, tolerance: float = 1e-4, opset: int = 17,
                metadata: dict[str, Any] | None = None) -> dict:
    """Export ``norm`` to ``path`` (``.onnx`` or ``.pt`` TorchScript) and check its parity.

    The file is written atomically; batch size, height and width are dynamic. ``metadata``
    (default :func:`norm_metadata` of the layer) is stored in the file.
    """
    path = Path(path)
    meta = norm_metadata(norm) if metadata is None else metadata
    module = ExportableNorm(norm).eval()
    example = torch.rand(2, 3, 64, 64) * 0.8 + 0.1
    suffix = path.suffix.lower()
    if suffix not in (".onnx", ".pt", ".ts", ".torchscript"):
        raise ValueError(f"unsupported export format {suffix!r}: use .onnx or .pt (TorchScript)")
    # Written to a temporary file that becomes ``path`` only once the parity check passed; the
    # folder is the user's, so only its own entries are swept of an earlier killed export's file.
    sweep_stale_temps(path.parent, recursive=False)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = _export_onnx(module, example, tmp, opset, meta) if suffix == ".onnx" else _export_torchscript(module, example, tmp, meta)
        worst = check_parity(norm, run, tolerance)
    return {"path": str(path), "format": "onnx" if suffix == ".onnx" else "torchscript", "max_abs_difference": worst,
            "tolerance": tolerance, "metadata": meta}


def _export_onnx(module: nn.Module, example: Tensor, path: Path, opset: int, meta: dict[str, Any]):
    torch.onnx.export(
        module, (example,), str(path), input_names=["rgb"], output_names=["normalised"],
        dynamic_axes={"rgb": {0: "batch", 2: "height", 3: "width"}, "normalised": {0: "batch", 2: "height", 3: "width"}},
        opset_version=opset, dynamo=False,
    )
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    for key, value in meta.items():  # strings as they are, the rest as JSON (onnxruntime: custom_metadata_map)
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(model, str(path))

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"rgb": x.numpy()})[0]


def _export_torchscript(module: nn.Module, example: Tensor, path: Path, meta: dict[str, Any]):
    with torch.no_grad():
        traced = torch.jit.trace(module, (example,), check_trace=False)
    traced.save(str(path), _extra_files={TORCHSCRIPT_META: json.dumps(meta)})
    loaded = torch.jit.load(str(path))

    def run(x: Tensor):
        with torch.no_grad():
            return loaded(x)

    return run
