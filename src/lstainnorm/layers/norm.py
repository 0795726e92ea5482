"""Normalisation in one colour space: ``StainNorm`` and its functional form.

method.md section 1: for a colour space ``s`` with converters ``to_s``/``from_s``::

    y      = to_s(x)
    mu, sd = mean and std of y over H, W          (per image, per channel)
    y_hat  = (y - mu) / (sd + eps) * (sigma0 + dsigma) + (mu0 + dmu)
    out    = from_s(y_hat)

``StainNorm(learnable=True)`` is the reference's ``LabPreNorm`` (in any space);
``StainNorm(learnable=False)`` its ``TemplateNorm`` (Reinhard normalisation to a fixed
template, as a layer).

Robustness (documented choice): the std is floored per space
(:attr:`ColorSpace.std_floor`, e.g. 0.5 L* units in Lab) before dividing. For a uniform
tile (all white, all black, one colour) ``y - mu`` is 0, so the output is the template's
mean colour; for a tile that is 95 % glass the floor bounds how much the faint
variation is stretched. The floor acts on the variance, so gradients stay finite
(``torch.std`` has a 0/0 gradient on a uniform image). With ``tissue_stats=True`` the
statistics are taken over tissue pixels only (:func:`lstainnorm.tissue.tissue_mask`) and
glass passes through unchanged (:func:`lstainnorm.tissue.tissue_weight`).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import Tensor, nn

from .checks import check_image, check_rgb_range, compute_dtype
from .closed_form import closed_form_backward, closed_form_enabled
from .color import ColorSpace, get_space
from .registry import register_norm
from .stain import StainConcentrationNorm
from .template import Template
from .tissue import TISSUE_MIN_PIXELS, centred_mean_var, channel_stats, tissue_mask, tissue_weight

__all__ = [
    "StainNorm",
    "stain_norm",
    "space_stats",
    "strip_stats",
    "PooledStats",
    "StandardiseFunction",
    "closed_form_backward",
    "DEFAULT_EPS",
    "LARGE_IMAGE_PIXELS",
]

DEFAULT_EPS = 1e-7


def _triple(values: Sequence[float] | Tensor | None, default: Sequence[float], name: str) -> Tensor:
    if values is None:
        values = default
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() != 3:
        raise ValueError(f"{name} must have 3 values (one per channel), got {t.numel()}: {values!r}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    return t


def space_stats(
    y: Tensor, space: ColorSpace, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-image channel mean and floored std of ``y`` (already in ``space``), shapes (B, 3, 1, 1)."""
    floor = torch.tensor(space.std_floor, dtype=y.dtype, device=y.device)
    return channel_stats(y, weight=mask, std_floor=floor)


def _from_sums(s1: Tensor, s2: Tensor, n: Tensor, space: ColorSpace) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std, floored per ``space``, from float64 sums of y and y^2 over ``n``
    pixels (shared by the strip-wise and the pooled statistics, so both match the layer's)."""
    mean = s1 / n
    var = ((s2 - n * mean.square()) / (n - 1.0).clamp(min=1.0)).clamp(min=0)
    floor = torch.tensor(space.std_floor, dtype=torch.float64, device=s1.device).square()
    return mean, torch.maximum(var, floor).sqrt()


def strip_stats(x: Tensor, space: ColorSpace, tissue: bool, rows: int) -> tuple[Tensor, Tensor]:
    """:func:`space_stats` of ``to_space(x)`` (over tissue if ``tissue``), accumulated ``rows``
    rows at a time in float64, so that a large image is never converted whole.

    Equal to the whole-image statistics up to float rounding (tested); no autograd graph.
    """
    b, _, h, w = x.shape
    n = float(h * w)
    sums = torch.zeros(2, b, 3, dtype=torch.float64, device=x.device)  # sum y, sum y^2 (all pixels)
    wsums = torch.zeros(2, b, 3, dtype=torch.float64, device=x.device)  # the same over tissue
    cnt = torch.zeros(b, 1, dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for r0 in range(0, h, rows):
            xs = x[..., r0 : r0 + rows, :]
            y = space.to_space(xs).to(torch.float64)
            sums[0] += y.sum(dim=(-2, -1))
            sums[1] += y.square().sum(dim=(-2, -1))
            if tissue:
                m = tissue_mask(xs).to(torch.float64)
                cnt += m.sum(dim=(-2, -1))
                wsums[0] += (m * y).sum(dim=(-2, -1))
                wsums[1] += (m * y.square()).sum(dim=(-2, -1))
    # As channel_stats: too few tissue pixels and all pixels count.
    use = (cnt >= min(TISSUE_MIN_PIXELS, n)) if tissue else torch.zeros_like(cnt, dtype=torch.bool)
    total = torch.where(use, cnt, torch.full_like(cnt, n))
    s1 = torch.where(use, wsums[0], sums[0])
    s2 = torch.where(use, wsums[1], sums[1])
    mean, sd = _from_sums(s1, s2, total, space)
    dtype = x.dtype
    return mean.to(dtype).view(b, 3, 1, 1), sd.to(dtype).view(b, 3, 1, 1)


class PooledStats:
    """Per-space ``(mean, std)`` pooled over the pixels of many images (the tiles of a slide, the
    tiles of a centre): the statistics the layer takes as ``stats=`` in place of each image's own.

    As the layer computes one image's: over tissue pixels if ``tissue`` (all pixels where fewer
    than ``TISSUE_MIN_PIXELS`` are tissue), unbiased std floored per space. Sums in float64.
    """

    def __init__(self, spaces: Sequence[ColorSpace], tissue: bool = True) -> None:
        self.spaces = list(spaces)
        self.tissue = bool(tissue)
        # per space: sum y and sum y^2 over tissue, then over all pixels
        self._sums = {sp.name: torch.zeros(4, 3, dtype=torch.float64) for sp in self.spaces}
        self.tissue_pixels = 0
        self.pixels = 0

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """Add the pixels of ``x``, RGB in [0, 1], shape ``(B, 3, H, W)``."""
        check_image(x)
        m = tissue_mask(x).transpose(0, 1).flatten(1)[0] if self.tissue else None  # (B*H*W,)
        self.pixels += x.shape[0] * x.shape[-2] * x.shape[-1]
        if m is not None:
            self.tissue_pixels += int(m.sum())
        for sp in self.spaces:
            v = sp.to_space(x).transpose(0, 1).flatten(1).to(torch.float64).cpu()  # (3, B*H*W)
            acc = self._sums[sp.name]
            if m is not None:
                vm = v[:, m.cpu()]
                acc[0] += vm.sum(1)
                acc[1] += vm.square().sum(1)
            acc[2] += v.sum(1)
            acc[3] += v.square().sum(1)

    @property
    def tissue_fraction(self) -> float:
        """The fraction of the pixels added that are tissue (0 when ``tissue`` is off: not counted)."""
        return self.tissue_pixels / max(self.pixels, 1)

    def result(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{space name: (mean, std)}``, each ``(1, 3, 1, 1)`` float32."""
        if self.pixels == 0:
            raise ValueError("no pixels were added to the pooled statistics")
        use_tissue = self.tissue and self.tissue_pixels >= min(TISSUE_MIN_PIXELS, self.pixels)
        n = self.tissue_pixels if use_tissue else self.pixels
        out = {}
        for sp in self.spaces:
            acc = self._sums[sp.name]
            s1, s2 = (acc[0], acc[1]) if use_tissue else (acc[2], acc[3])
            mean, sd = _from_sums(s1, s2, torch.tensor(float(n), dtype=torch.float64), sp)
            out[sp.name] = (mean.float().view(1, 3, 1, 1), sd.float().view(1, 3, 1, 1))
        return out


def _standardise(x: Tensor, space: ColorSpace, mu: Tensor, sigma: Tensor, eps: float):
    """Forward of one branch without tissue statistics: ``(y - mean, yh, mean, sd, var)``
    (:func:`lstainnorm.tissue.centred_mean_var`: two passes, the centred image kept)."""
    mean, centred, var = centred_mean_var(space.to_space(x))
    floor = torch.tensor(space.std_floor, dtype=var.dtype, device=var.device).square().view(1, 3, 1, 1)
    sd = torch.maximum(var, floor).sqrt()
    yh = centred * (sigma.reshape(-1, 3, 1, 1) / (sd + eps)) + mu.reshape(-1, 3, 1, 1)
    return centred, yh, mean, sd, var


def _reduce_to(g: Tensor, like: Tensor) -> Tensor:
    """Sum a per-image ``(B, 3, 1, 1)`` gradient down to a template's shape ((3,) or per image)."""
    return (g.sum(dim=0) if like.numel() == 3 else g).reshape(like.shape)


def backward_rows(x: Tensor) -> int:
    """Rows of ``x`` (B, C, H, W) a closed-form backward handles at a time: about
    ``CPU_CHUNK_PIXELS`` pixels of the batch on a CPU (``LARGE_IMAGE_PIXELS`` on a GPU), so that
    the derivative's temporaries of a large image are a strip's, not the image's."""
    pixels = CPU_CHUNK_PIXELS if x.device.type == "cpu" else LARGE_IMAGE_PIXELS
    return max(1, pixels // (x.shape[0] * x.shape[-1]))


class StandardiseFunction(torch.autograd.Function):
    r"""One branch, ``post(from_s((to_s(x) - mean) / (sd + eps) * sigma + mu))``, with its
    backward in closed form.

    Autograd would save every intermediate of the two colour conversions (about 19 full-size
    images per branch); this saves the input and the per-image statistics. The backward
    recomputes the conversions strip by strip (:func:`backward_rows`), reusing their powers and
    roots for the derivatives (:attr:`ColorSpace.to_space_vjp` / ``from_space_vjp``). The
    standardisation's derivative, with ``c = y - mean`` and ``g`` the gradient at ``yh``::

        g_mu    = sum_pixels g,     g_sigma = sum_pixels g c / (sd + eps)
        g_y     = scale (g - mean_pixels g) + g_sd * [var > floor^2] c / ((n - 1) sd)
        g_sd    = -scale / (sd + eps) * sum_pixels g c,   scale = sigma / (sd + eps)

    Equal to autograd's gradients (tests compare them, and gradcheck in float64), including
    autograd's choices at ties (``torch.maximum`` splits the gradient). Once differentiable.
    ``post``: ``"abs"`` (LStainNorm's ``|x_s|``), ``"clamp"`` (to [0, 1]) or None.
    """

    @staticmethod
    def forward(ctx, x: Tensor, mu: Tensor, sigma: Tensor, space: ColorSpace, eps: float, post: str | None):
        _, yh, mean, sd, var = _standardise(x, space, mu, sigma, eps)
        out = space.from_space(yh)
        if post == "abs":
            out = out.abs()
        elif post == "clamp":
            out = out.clamp(0.0, 1.0)
        ctx.space, ctx.eps, ctx.post = space, eps, post
        ctx.save_for_backward(x, mu, sigma, mean, sd, var)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, mu, sigma, mean, sd, var = ctx.saved_tensors
        space, eps, post = ctx.space, ctx.eps, ctx.post
        n = x.shape[-1] * x.shape[-2]
        scale = sigma.reshape(-1, 3, 1, 1) / (sd + eps)
        muv = mu.reshape(-1, 3, 1, 1)
        rows = backward_rows(x)
        strips = [slice(r0, r0 + rows) for r0 in range(0, x.shape[-2], rows)]
        whole = len(strips) == 1
        # pass 1: the gradient at yh and its two sums (kept whole, with the centred image)
        g_full = grad if whole else torch.empty_like(grad)
        c_full = None if whole else torch.empty_like(x)
        g_sum = g_dot = 0.0
        for rs in strips:
            c = space.to_space(x[..., rs, :]) - mean
            g = space.from_space_vjp(c * scale + muv, grad[..., rs, :], post)
            if whole:
                g_full, c_full = g, c
            else:
                g_full[..., rs, :], c_full[..., rs, :] = g, c
            g_sum = g_sum + g.sum(dim=(-2, -1), keepdim=True)
            g_dot = g_dot + (g * c).sum(dim=(-2, -1), keepdim=True)
        g_mu = _reduce_to(g_sum, mu) if ctx.needs_input_grad[1] else None
        g_sigma = _reduce_to(g_dot / (sd + eps), sigma) if ctx.needs_input_grad[2] else None
        g_x = None
        if ctx.needs_input_grad[0]:
            floor = torch.tensor(space.std_floor, dtype=x.dtype, device=x.device).square().view(1, 3, 1, 1)
            # torch.maximum(var, floor^2) passes all of the gradient above the floor, half on a tie
            live = torch.where(var > floor, 1.0, torch.where(var == floor, 0.5, 0.0)).to(x.dtype)
            coef = -scale / (sd + eps) * g_dot * live / (max(n - 1, 1) * sd)
            g_x = torch.empty_like(x) if not whole else None
            for rs in strips:
                g_y = scale * (g_full[..., rs, :] - g_sum / n) + coef * c_full[..., rs, :]
                part = space.to_space_vjp(x[..., rs, :], g_y)
                if whole:
                    g_x = part
                else:
                    g_x[..., rs, :] = part
        return g_x, g_mu, g_sigma, None, None, None


def _closed_form(x: Tensor, space: ColorSpace, mu: Tensor, sigma: Tensor, tissue_stats: bool, stats) -> bool:
    """Whether a branch trains through :class:`StandardiseFunction`: eager, gradients wanted, the
    per-image statistics of the whole image (tissue masks and given statistics use autograd)."""
    return (
        stats is None
        and not tissue_stats
        and space.to_space_vjp is not None
        and space.from_space_vjp is not None
        and (x.requires_grad or mu.requires_grad or sigma.requires_grad)
        and closed_form_enabled()
    )


def _normalize(
    x: Tensor,
    space: ColorSpace,
    mu: Tensor,
    sigma: Tensor,
    eps: float,
    tissue_stats: bool,
    stats: tuple[Tensor, Tensor] | None,
    post: str | None = None,
) -> Tensor:
    """The unchecked hot path: ``post(from_s(standardise(to_s(x)) * sigma + mu))``.

    With ``tissue_stats`` the statistics come from tissue pixels and glass passes through
    unchanged (soft blend, :func:`lstainnorm.tissue.tissue_weight`). ``post`` is ``"abs"``,
    ``"clamp"`` or None. Training eagerly, the closed-form :class:`StandardiseFunction` runs.
    """
    if _closed_form(x, space, mu, sigma, tissue_stats, stats):
        return StandardiseFunction.apply(x, mu.to(x.dtype), sigma.to(x.dtype), space, eps, post)
    y = space.to_space(x)
    if stats is None:
        mask = tissue_mask(x) if tissue_stats else None
        mean, sd = space_stats(y, space, mask)
    else:
        mean, sd = stats[0].to(y.dtype), stats[1].to(y.dtype)
    # A template is (3,) for all images, or (B, 3, 1, 1) per image (RandStainNA's virtual templates).
    scale = sigma.to(y.dtype).reshape(-1, 3, 1, 1) / (sd + eps)
    y_hat = (y - mean) * scale + mu.to(y.dtype).reshape(-1, 3, 1, 1)
    out = space.from_space(y_hat)
    if tissue_stats:
        w = tissue_weight(x)
        out = w * out + (1.0 - w) * x
    if post == "abs":
        return out.abs()
    return out.clamp(0.0, 1.0) if post == "clamp" else out


def stain_norm(
    x: Tensor,
    space: str | ColorSpace = "lab",
    mu: Sequence[float] | Tensor | None = None,
    sigma: Sequence[float] | Tensor | None = None,
    *,
    eps: float = DEFAULT_EPS,
    tissue_stats: bool = False,
    clamp: bool = True,
    stats: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    r"""Normalise an RGB batch to a template in one colour space (Reinhard-style).

    Args:
        x: RGB batch of shape :math:`(B, 3, H, W)`, float, values in [0, 1].
        space: colour space name (``lab``, ``hsv``, ``rgb``, ``hed``) or a :class:`ColorSpace`.
        mu: template mean per channel, in the space's internal units (default: the space's
            default template). Tensors keep their autograd graph.
        sigma: template std per channel, likewise.
        eps: added to the std before dividing (the reference's 1e-7).
        tissue_stats: take the per-image statistics over tissue pixels only; glass passes through.
        clamp: clamp the output to [0, 1].
        stats: precomputed ``(mean, std)`` of shape (B, 3, 1, 1) in the space (e.g. of a
            whole slide) to use instead of each image's own.

    Returns:
        Normalised RGB batch of shape :math:`(B, 3, H, W)`.
    """
    check_image(x)
    check_rgb_range(x)
    sp = get_space(space)
    dtype = compute_dtype(x)
    mu_t = mu if isinstance(mu, Tensor) else _triple(mu, sp.default_mu, "mu")
    sigma_t = sigma if isinstance(sigma, Tensor) else _triple(sigma, sp.default_sigma, "sigma")
    return _normalize(
        x.to(dtype), sp, mu_t.to(x.device), sigma_t.to(x.device), eps, tissue_stats, stats,
        "clamp" if clamp else None,
    )


# On a CPU, a batch is normalised a few images at a time so that the intermediate images
# stay in cache: about 2x faster at batch 64 (eager and compiled alike); results are identical
# because every step is per image.
CPU_CHUNK_PIXELS = 1 << 19
# Training eagerly, half that: the closed-form backward's temporaries are a chunk's (the peak at
# batch 64 x 224 x 224 is benchmarks/bench_cost.py's target 2).
TRAIN_CHUNK_PIXELS = 1 << 18


# Above this many pixels per image, inference (no autograd) runs in horizontal strips: the
# result is the same, but memory and cache hold one strip of the full-size intermediates, so
# a 4000 x 4000 or 8000 x 8000 region costs what its pixels cost.
LARGE_IMAGE_PIXELS = 1 << 21


def _cpu_chunk(x: Tensor, eager_training: bool = False) -> int:
    if x.device.type != "cpu":
        return x.shape[0]
    pixels = min(TRAIN_CHUNK_PIXELS, CPU_CHUNK_PIXELS) if eager_training else CPU_CHUNK_PIXELS
    return max(1, pixels // (x.shape[-1] * x.shape[-2]))


def _strip_rows(x: Tensor, multiple: int) -> int:
    pixels = CPU_CHUNK_PIXELS if x.device.type == "cpu" else LARGE_IMAGE_PIXELS
    return max(multiple, (pixels // x.shape[-1]) // multiple * multiple)


def _slice_stats(stats, start: int, step: int):
    if stats is None:
        return None
    if isinstance(stats, dict):
        return {k: _slice_stats(v, start, step) for k, v in stats.items()}
    mean, sd = stats
    # Statistics given once for all images (batch dimension 1) apply to every chunk.
    pick = (lambda t: t if t.shape[0] == 1 else t[start : start + step])
    return pick(mean), pick(sd)


class _CompilableNorm(nn.Module, ABC):
    """Shared plumbing: input checks outside, an optionally compiled hot path inside."""

    # Strips of a large image must start on multiples of this many rows (LStainNorm's pooling).
    _strip_multiple = 1

    def __init__(self) -> None:
        super().__init__()
        self._compiled = None
        self._compile_fallback = False
        self.validate = True
        self.stain_first: StainConcentrationNorm | None = None

    def _add_stain_stage(self, stains: str | None, learnable: bool, stain_learnable: bool | None = None) -> None:
        """``stain_first``: a :class:`StainConcentrationNorm` stage before the colour spaces: each
        stain's amount is scaled to a template first, then the layer standardises as before. Its
        amounts learn as the layer's templates do unless ``stain_learnable`` says otherwise: learning
        them sends a gradient back through every colour space (about 4x the stage's own cost)."""
        if stains is not None:
            learn = learnable if stain_learnable is None else bool(stain_learnable)
            self.stain_first = StainConcentrationNorm(stains, learnable=learn, validate=False)

    def enable_compile(self, fallback: bool = False, **compile_kwargs) -> "_CompilableNorm":
        """Compile the hot path with ``torch.compile(fullgraph=True)`` (input checks stay eager).

        On a CPU this fuses the colour conversions, statistics and fusion into a few loops
        (3-5x faster than eager, see BENCHMARKS.md); the first call pays the compilation
        (tens of seconds) and each new input shape may recompile. With ``fallback``, a
        compilation that fails (no C compiler, an unsupported backend) warns once and the
        layer runs eagerly from then on. Returns ``self``.
        """
        self._compile_fallback = bool(fallback)
        import torch._dynamo

        compile_kwargs.setdefault("fullgraph", True)
        # Every layer instance, grad mode and chunk shape is a separate entry in dynamo's cache
        # of this one code object; the default limit (8) is too small for a few layers.
        cfg = torch._dynamo.config
        if hasattr(cfg, "recompile_limit"):
            cfg.recompile_limit = max(cfg.recompile_limit, 64)
        else:  # older torch
            cfg.cache_size_limit = max(cfg.cache_size_limit, 64)
        if hasattr(cfg, "accumulated_recompile_limit"):
            cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 512)
        self._compiled = torch.compile(self._compile_target(), **compile_kwargs)
        return self

    def _compile_target(self):
        """The function :meth:`enable_compile` compiles: the hot path, or a variant of it that also
        returns whether an approximation's error bound held (``(output, ok)``)."""
        return self._forward_impl

    def disable_compile(self) -> "_CompilableNorm":
        """Go back to eager execution."""
        self._compiled = None
        return self

    @property
    def is_compiled(self) -> bool:
        return self._compiled is not None

    def __getstate__(self):  # compiled functions do not pickle (DDP spawn, deepcopy)
        state = self.__dict__.copy()
        state["_compiled"] = None
        return state

    @abstractmethod
    def _forward_impl(self, x: Tensor, stats) -> Tensor:
        """The layer's computation on a validated float batch (what ``enable_compile`` compiles)."""

    @abstractmethod
    def _forward_strips(self, x: Tensor, stats, rows: int) -> Tensor:
        """The same result as :meth:`_forward_impl`, ``rows`` rows at a time (inference only)."""

    def _prepare(self, x: Tensor) -> Tensor:
        check_image(x)
        if self.validate:
            check_rgb_range(x)
        x = x.to(compute_dtype(x))
        if self.stain_first is not None and x.shape[0] > 0:  # eager, per image, before every entry point
            x = self.stain_first(x)
        return x

    def _run(self, x: Tensor, stats=None) -> Tensor:
        x = self._prepare(x)
        if x.shape[0] == 0:  # an empty batch, as PyTorch modules allow: an empty result
            return x.clone()
        # Statistics and colour conversions stay in float32 under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            call = self._call
            if x.shape[-1] * x.shape[-2] > LARGE_IMAGE_PIXELS and not torch.is_grad_enabled():
                rows = _strip_rows(x, self._strip_multiple)
                call = lambda xb, st: self._forward_strips(xb, st, rows)  # noqa: E731
            step = _cpu_chunk(x, eager_training=self._compiled is None and closed_form_enabled())
            if step >= x.shape[0]:
                return call(x, stats)
            outs = [call(x[i : i + step], _slice_stats(stats, i, step)) for i in range(0, x.shape[0], step)]
            return torch.cat(outs, dim=0)

    def _call(self, x: Tensor, stats) -> Tensor:
        # Inside a graph being traced (a user's torch.compile of a model holding the layer) the
        # user's compile owns the graph: the plain hot path, which always returns the image.
        if self._compiled is None or torch.compiler.is_compiling():
            return self._forward_impl(x, stats)
        try:
            out = self._compiled(x, stats)
        except Exception as err:  # noqa: BLE001 - any compiler failure; eager re-raises real input errors
            if not self._compile_fallback:
                raise
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                          f"{type(self).__name__} runs eagerly (set norm.compile=false to skip compiling)", stacklevel=3)
            self._compiled = None
            return self._forward_impl(x, stats)
        if isinstance(out, tuple):  # (output, whether an approximation's error bound held)
            out, ok = out
            if ok is not None and not bool(ok):
                return self._forward_impl(x, stats)  # eager: checks the bound, exact where needed
        return out


class StainNorm(_CompilableNorm):
    r"""Stain normalisation in one colour space, with a learnable or fixed template.

    ``learnable=True`` is the reference's ``LabPreNorm`` (for any space): the template
    ``mu0 + dmu``, ``sigma0 + dsigma`` is learned with the task, offsets start at 0.
    ``learnable=False`` is its ``TemplateNorm``: Reinhard normalisation to ``mu0, sigma0``.

    Args:
        space: colour space name (see :func:`lstainnorm.color.list_spaces`).
        mu0: initial template mean (3 values, the space's internal units; default: the space's
            default template). Use :func:`lstainnorm.estimate_template` to get it from your
            training data.
        sigma0: initial template std (3 values), likewise.
        learnable: learn the offsets ``dmu``, ``dsigma`` (parameters) or keep them at 0 (buffers).
        eps: added to the std before dividing.
        tissue_stats: per-image statistics over tissue pixels only; glass passes through.
        clamp: clamp the output to [0, 1] (no effect in Lab, whose conversion clips already).
        validate: check every input for NaN/Inf and the [0, 1] range (one pass over the data).
        stain_first: ``None`` or the stain vectors (``"estimate"``, ``"ruifrok"``, ``"learned"``) of a
            :class:`~lstainnorm.layers.stain.StainConcentrationNorm` stage run before the colour space (its template
            amounts learn when ``learnable``, or as ``stain_learnable`` says).
        stain_learnable: ``None`` (as ``learnable``), or whether the stage's amounts learn.

    Shape:
        - Input: :math:`(B, 3, H, W)`, RGB in [0, 1], any H, W >= 1, float32/float64/half.
        - Output: :math:`(B, 3, H, W)`, RGB (float64 for float64 input, float32 otherwise).

    Example:
        >>> norm = StainNorm("lab")
        >>> norm(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 3, 64, 64])
    """

    def __init__(
        self,
        space: str = "lab",
        mu0: Sequence[float] | Tensor | None = None,
        sigma0: Sequence[float] | Tensor | None = None,
        learnable: bool = True,
        *,
        eps: float = DEFAULT_EPS,
        tissue_stats: bool = False,
        clamp: bool = True,
        validate: bool = True,
        stain_first: str | None = None,
        stain_learnable: bool | None = None,
    ) -> None:
        super().__init__()
        self.space = get_space(space)
        self.learnable = bool(learnable)
        self.eps = float(eps)
        self.tissue_stats = bool(tissue_stats)
        self.clamp = bool(clamp)
        self.validate = bool(validate)
        self.register_buffer("mu0", _triple(mu0, self.space.default_mu, "mu0"))
        self.register_buffer("sigma0", _triple(sigma0, self.space.default_sigma, "sigma0"))
        if self.learnable:
            self.dmu = nn.Parameter(torch.zeros(3))
            self.dsigma = nn.Parameter(torch.zeros(3))
        else:
            self.register_buffer("dmu", torch.zeros(3))
            self.register_buffer("dsigma", torch.zeros(3))
        self._add_stain_stage(stain_first, self.learnable, stain_learnable)

    @property
    def mu(self) -> Tensor:
        """Current template mean (internal units), shape (3,)."""
        return self.mu0 + self.dmu

    @property
    def sigma(self) -> Tensor:
        """Current template std (internal units), shape (3,)."""
        return self.sigma0 + self.dsigma

    def extra_repr(self) -> str:
        return f"space={self.space.name!r}, learnable={self.learnable}, tissue_stats={self.tissue_stats}"

    def image_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-image ``(mean, std)`` of ``x`` in this layer's space, each (B, 3, 1, 1)."""
        x = self._prepare(x)
        mask = tissue_mask(x) if self.tissue_stats else None
        return space_stats(self.space.to_space(x), self.space, mask)

    def _forward_impl(self, x: Tensor, stats) -> Tensor:
        post = "clamp" if self.clamp else None
        return _normalize(x, self.space, self.mu, self.sigma, self.eps, self.tissue_stats, stats, post)

    def _forward_strips(self, x: Tensor, stats, rows: int) -> Tensor:
        if stats is None:
            stats = strip_stats(x, self.space, self.tissue_stats, rows)
        out = torch.empty_like(x)
        for r0 in range(0, x.shape[-2], rows):
            out[..., r0 : r0 + rows, :] = self._forward_impl(x[..., r0 : r0 + rows, :], stats)
        return out

    def forward(self, x: Tensor, stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Normalise ``x``; ``stats`` optionally replaces the per-image (mean, std)."""
        return self._run(x, stats)

    def template(self) -> Template:
        """The current (learned) template, as a :class:`lstainnorm.Template`."""
        return Template({self.space.name: (self.mu.detach().tolist(), self.sigma.detach().tolist())})


@register_norm("template")
def _template(space: str = "lab", mu0=None, sigma0=None, **kwargs) -> StainNorm:
    return StainNorm(space, mu0, sigma0, learnable=False, **kwargs)


@register_norm("learnable")
def _learnable(space: str = "lab", mu0=None, sigma0=None, **kwargs) -> StainNorm:
    return StainNorm(space, mu0, sigma0, learnable=True, **kwargs)
