"""LStainNorm: normalisation in several colour spaces fused by self-attention.

method.md section 2 (the reference's ``SA3``). Each branch ``s`` normalises the
input in its own space with its own learnable template (a :class:`StainNorm`) and
maps it back to RGB; ``x_s = |branch_s(x)|`` as in the reference. One attention
module, shared by the branches, gives a map per branch::

    q = maxpool8(conv1x1_{3->1}(x_s)),  k = maxpool8(conv1x1_{3->1}(x_s)),  v = maxpool8(conv1x1_{3->3}(x_s))
    attn = softmax(q^T k, over the last axis)                 # B x N x N, N = ceil(H/8) ceil(W/8)
    A_s  = upsample_bilinear_x8(v @ attn)                     # B x 3 x H x W

then pixel-wise and space-wise weights::

    W_s  = (delta_s * |A_s| + x_s) / (x_s + eps)              # delta_s = 1 + learnable offset (3,)
    Wn_s = W_s / (sum_s W_s + eps)
    w_s  = a_s * Wn_s + b_s                                   # a_s, b_s learnable scalars, init 1
    out  = sum_s(w_s * x_s) / sum_s(w_s)

Any H, W >= 1 works: the pooling pads the image (replicating its edge) to a multiple
of 8, which is what a ceil-mode max-pool does, and the upsampled map is cropped back
to H x W. For multiples of 8 this is exactly the reference (a test checks it against
the literal transcription in :mod:`lstainnorm.reference`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .color import get_space
from .norm import DEFAULT_EPS, StainNorm, _CompilableNorm, _normalize, backward_rows, closed_form_enabled, strip_stats
from .registry import register_norm
from .template import Template, resolve_templates

__all__ = ["LStainNorm", "norm_spaces", "SharedAttention", "FusionFunction", "PoolFunction", "POOL", "FUSIONS", "attend", "lowrank_error"]

POOL = 8
FUSIONS = ("attention", "mean")  # how LStainNorm combines its branches


def _pad_to_multiple(x: Tensor, k: int) -> Tensor:
    """Pad H and W up to a multiple of ``k`` by replicating the last row/column.

    A max-pool over the padded image equals a ceil-mode max-pool over the original,
    and padding the input of a 1x1 convolution equals padding its output.
    """
    ph, pw = (-x.shape[-2]) % k, (-x.shape[-1]) % k
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x


def _maxpool(x: Tensor, k: int) -> Tensor:
    """Max-pool a ``(B, H, W)`` map by ``k`` (H, W multiples of ``k``).

    ``max_pool2d`` saves the index of each cell's maximum for the backward, like the reference's
    ``nn.MaxPool2d``. A pool built from ``amax`` finds its maxima in the backward by comparing
    the input with the result: compiled for CUDA, that gave NaN gradients from the first
    training step (seen on an H100, BENCHMARKS.md).
    """
    return F.max_pool2d(x.unsqueeze(1), k, k).squeeze(1)


def _linear_weights(n: int, k: int, dtype: torch.dtype, device: torch.device):
    """Source indices and weights of PyTorch's bilinear upsampling by ``k`` (align_corners=False)."""
    o = torch.arange(n * k, device=device, dtype=torch.float64)
    src = ((o + 0.5) / k - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n - 1)
    i1 = (i0 + 1).clamp(max=n - 1)
    w1 = (src - i0.to(torch.float64)).to(dtype)
    return i0, i1, 1.0 - w1, w1


def _upsample(a: Tensor, k: int, rows: tuple[int, int] | None = None) -> Tensor:
    """``F.interpolate(a, scale_factor=k, mode="bilinear", align_corners=False)``, separably.

    Along W a small matrix product, along H a gather of whole rows: both vectorise, where
    the generic kernel gathers four scattered values per output pixel (10x slower under
    torch.compile on a CPU). Equal to ``F.interpolate`` up to float rounding (tested).
    """
    _, _, h, w = a.shape
    j0, j1, v0, v1 = _linear_weights(w, k, a.dtype, a.device)
    cols = torch.arange(w, device=a.device).unsqueeze(1)
    mat = (cols == j0).to(a.dtype) * v0 + (cols == j1).to(a.dtype) * v1  # (w, w*k)
    aw = torch.matmul(a, mat)  # (B, C, h, w*k)
    i0, i1, u0, u1 = _linear_weights(h, k, a.dtype, a.device)
    if rows is not None:  # only output rows r0 <= o < r1
        sl = slice(*rows)
        i0, i1, u0, u1 = i0[sl], i1[sl], u0[sl], u1[sl]
    return aw[:, :, i0] * u0.view(-1, 1) + aw[:, :, i1] * u1.view(-1, 1)


# Elements of one attention block (B_chunk x rows x N): ~8 MB of float32, so that the
# N x N attention matrix of a batch is never materialised whole (at 224 x 224 and batch 64
# the whole matrix of three branches would be 470 MB; blocks that stay in cache run ~6x faster).
ATTENTION_BLOCK = 1 << 21
# The attention in linear time (see attend): largest interpolation error allowed, as a fraction
# of a softmax row's normaliser, and the ranks tried.
LOWRANK_TOL = 1e-7
MAX_RANK = 64
COMPILED_RANK = 48


def lowrank_error(rho: float, n: int, r: int) -> float:
    """Bound on the error of :func:`attend`'s rank-``r`` path relative to each softmax row's sum:
    ``n * 2 (rho / 2)^r / r!``, with ``rho = max_i |q_i| * (max k - min k) / 2``.

    It is the Chebyshev interpolation bound of ``k -> exp(q k - max_j q k_j)`` (r-th derivative at
    most ``|q|^r``, the function at most 1) summed over the ``n`` keys; every row's sum is >= 1.
    """
    if rho <= 0.0:
        return 0.0
    return n * 2.0 * math.exp(r * math.log(rho / 2.0) - math.lgamma(r + 1))


def _rho_limit(n: int, r: int, tol: float = LOWRANK_TOL) -> float:
    """The largest ``rho`` for which :func:`lowrank_error` stays below ``tol``."""
    return 2.0 * math.exp((math.log(tol / (2.0 * n)) + math.lgamma(r + 1)) / r)


def _rho(q: Tensor, k: Tensor) -> Tensor:
    return (q.abs() * (k.amax(dim=1, keepdim=True) - k.amin(dim=1, keepdim=True)) / 2).amax()


def attention_rank(q: Tensor, k: Tensor, tol: float = LOWRANK_TOL, max_rank: int | None = None) -> int | None:
    """The smallest rank (a multiple of 4, at most ``max_rank``, default :data:`MAX_RANK`) whose
    error bound meets ``tol``, or None (use the exact path)."""
    rho, n = float(_rho(q.detach(), k.detach())), q.shape[1]
    for r in range(4, (MAX_RANK if max_rank is None else max_rank) + 1, 4):
        if lowrank_error(rho, n, r) <= tol:
            return r
    return None


def _attend_lowrank(q: Tensor, k: Tensor, v: Tensor, r: int) -> Tensor:
    """``bmm(v, softmax(q^T k))`` in O(N r).

    ``exp(q_i k_j)`` is interpolated in ``k`` at ``r`` Chebyshev points ``k_l`` of each image's key
    range: ``exp(q_i k_j) ~ sum_l exp(q_i k_l) L_l(k_j)`` (Lagrange basis in barycentric form:
    stable, and elementwise, so torch.compile fuses it). Both the row sums ``Z_i`` and
    ``sum_i v_i exp(q_i k_j) / Z_i`` then factor through the ``r`` nodes. The interpolated part
    is the deviation from the value at the range's centre (``expm1``), so that a nearly uniform
    attention keeps its small gradients accurate. Autograd's backward is the same kind of sum:
    memory O(N r).
    """
    n = k.shape[1]
    kmax = k.amax(dim=1, keepdim=True)
    kmin = k.amin(dim=1, keepdim=True)
    centre, half = (kmax + kmin) / 2, (kmax - kmin) / 2
    t = ((k - centre) / half.clamp(min=torch.finfo(k.dtype).tiny)).clamp(-1.0, 1.0)
    idx = torch.arange(r, device=q.device, dtype=q.dtype)
    angle = (2.0 * idx + 1.0) * (math.pi / (2 * r))
    nodes = torch.cos(angle)  # Chebyshev points of the first kind on [-1, 1]
    bary = torch.where(idx % 2 == 0, 1.0, -1.0) * torch.sin(angle)  # their barycentric weights
    diff = t.unsqueeze(2) - nodes
    tiny = torch.finfo(q.dtype).eps ** 2  # a key exactly on a node: its basis function is 1 there
    diff = torch.where(diff.abs() < tiny, torch.full_like(diff, tiny), diff)
    c = bary / diff
    lag = c / c.sum(dim=2, keepdim=True)  # (B, N, r): L_l(t_j)
    rowmax = q * torch.where(q > 0, kmax, kmin)  # max_j q_i k_j, in closed form
    base = torch.exp(q * centre - rowmax)  # (B, N): exp(q_i c - m_i)
    dev = base.unsqueeze(2) * torch.expm1(q.unsqueeze(2) * (half * nodes).unsqueeze(1))  # exp(q_i k_l - m_i) - base
    z = n * base + (dev * lag.sum(dim=1, keepdim=True)).sum(dim=2)  # softmax denominators
    vz = v / z.unsqueeze(1)
    const = (vz * base.unsqueeze(1)).sum(dim=2, keepdim=True)
    return const + torch.bmm(torch.bmm(vz, dev), lag.transpose(1, 2))


def _attend_exact(q: Tensor, k: Tensor, v: Tensor, block: int = ATTENTION_BLOCK) -> Tensor:
    """The N x N attention, block by block (never materialised whole)."""
    bsz, n = q.shape
    rows = max(1, min(n, block // n))
    chunk = max(1, block // (rows * n))
    compiled = torch.compiler.is_compiling()
    if compiled:
        # The row maximum of q_i * k_j is known in closed form, so each exp is taken once
        # and the softmax normalisation moves onto v (fewer passes for the fused kernel).
        kmax = k.amax(dim=1, keepdim=True)
        kmin = k.amin(dim=1, keepdim=True)
        m = q * torch.where(q > 0, kmax, kmin)
    outs = []
    for b0 in range(0, bsz, chunk):
        bs = slice(b0, b0 + chunk)
        acc = None
        for r0 in range(0, n, rows):
            rs = slice(r0, r0 + rows)
            logits = q[bs, rs].unsqueeze(2) * k[bs].unsqueeze(1)
            if compiled:
                e = torch.exp(logits - m[bs, rs].unsqueeze(2))
                part = torch.bmm(v[bs, :, rs] / e.sum(dim=-1).unsqueeze(1), e)
            else:
                part = torch.bmm(v[bs, :, rs], torch.softmax(logits, dim=-1))
            acc = part if acc is None else acc + part
        outs.append(acc)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def attend(q: Tensor, k: Tensor, v: Tensor, block: int = ATTENTION_BLOCK, rank: int | None = None) -> Tensor:
    """``bmm(v, softmax(q^T k, dim=-1))`` for scalar tokens: the published attention, in linear time.

    The logits are rank one (``q_i * k_j``), so the attention is a one-dimensional kernel sum:
    :func:`_attend_lowrank` evaluates it in O(N r) with an error bound checked at run time
    (:func:`lowrank_error` <= :data:`LOWRANK_TOL` of each row's sum, i.e. float32 rounding); where
    no rank up to :data:`MAX_RANK` meets it (very spread logits), the exact N x N path runs,
    block by block. ``rank`` fixes the rank and skips the check: the compiled
    layer does so and checks the bound itself (:meth:`LStainNorm._fused`).

    Args:
        q, k: ``(B, N)`` query and key of each token.
        v: ``(B, C, N)`` values.

    Returns:
        ``(B, C, N)``: ``out[b, c, j] = sum_i v[b, c, i] * softmax_j(q[b, i] * k[b, :])[j]``.
    """
    if rank is None:
        rank = attention_rank(q, k)
        if rank is None:
            return _attend_exact(q, k, v, block)
    return _attend_lowrank(q, k, v, rank)


def _fusion_forward(xs, maps, delta, a, b, eps: float):
    """The fusion of method.md section 2 from the branch images ``xs`` and the upsampled attention
    maps (signed or not: their ``|A_s|`` is taken): ``(out_unclamped, w_s, W_s / (total + eps),
    total + eps, den, W_s)``. The one implementation of the formula: the layer's forward, the
    compiled path and :class:`FusionFunction`'s backward all call it."""
    big = [(delta[i].view(1, 3, 1, 1) * maps[i].abs() + xs[i]) / (xs[i] + eps) for i in range(len(xs))]
    total = big[0]
    for t in big[1:]:
        total = total + t
    tot = total + eps
    wn = [bi / tot for bi in big]
    ws = [a[i] * wn[i] + b[i] for i in range(len(xs))]
    num, den = ws[0] * xs[0], ws[0]
    for w, xi in zip(ws[1:], xs[1:]):
        num = num + w * xi
        den = den + w
    return LStainNorm._safe_div(num, den, 1e-6), ws, wn, tot, den, big


class FusionFunction(torch.autograd.Function):
    r"""The fusion ``out = sum_s w_s x_s / sum_s w_s`` with its backward in closed form.

    ``w_s = a_s W_s / (sum_t W_t + eps) + b_s``, ``W_s = (delta_s |A_s| + x_s) / (x_s + eps)``.
    Autograd keeps about seven full-size tensors per branch for this; the function saves the
    branch images and attention maps it was given and recomputes the rest. With
    ``D = sign(den) max(|den|, 1e-6)``, ``den = sum_s w_s``, ``T = sum_s W_s + eps``::

        g_num = g / D,   g_den = -g_num out [|den| >= 1e-6],   g_w_s = g_num x_s + g_den
        g_a_s = sum g_w_s W_s / T,   g_b_s = sum g_w_s,   g_Wn_s = a_s g_w_s
        g_W_s = (g_Wn_s - sum_t g_Wn_t W_t / T) / T
        g_x_s = g_num w_s + g_W_s (1 - W_s) / (x_s + eps),   g_A_s = g_W_s delta_s sign(A_s) / (x_s + eps)
        g_delta_s = sum g_W_s |A_s| / (x_s + eps)

    Inputs: ``delta`` (S, 3) (the ``1 + offset``), ``a``, ``b`` (S,), then the S branch images and
    the S signed attention maps, each (B, 3, H, W).
    """

    @staticmethod
    def forward(ctx, delta: Tensor, a: Tensor, b: Tensor, eps: float, clamp: bool, *tensors: Tensor):
        n = len(tensors) // 2
        out = _fusion_forward(tensors[:n], tensors[n:], delta, a, b, eps)[0]
        ctx.eps, ctx.clamp, ctx.n = eps, clamp, n
        ctx.save_for_backward(delta, a, b, *tensors)
        return out.clamp(0.0, 1.0) if clamp else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        delta, a, b, *tensors = ctx.saved_tensors
        n = ctx.n
        xs, maps = tensors[:n], tensors[n:]
        rows = backward_rows(grad)
        strips = [slice(r0, r0 + rows) for r0 in range(0, grad.shape[-2], rows)]
        if len(strips) == 1:
            return FusionFunction._backward_strip(ctx, grad, xs, maps, delta, a, b)
        g_x = [torch.empty_like(t) for t in xs]
        g_maps = [torch.empty_like(t) for t in maps]
        g_delta = torch.zeros_like(delta)
        ga, gb = torch.zeros_like(a), torch.zeros_like(b)
        for rs in strips:  # everything is per pixel but the parameters' sums
            part = FusionFunction._backward_strip(
                ctx, grad[..., rs, :], [t[..., rs, :] for t in xs], [t[..., rs, :] for t in maps], delta, a, b
            )
            g_delta, ga, gb = g_delta + part[0], ga + part[1], gb + part[2]
            for i in range(n):
                g_x[i][..., rs, :] = part[5 + i]
                g_maps[i][..., rs, :] = part[5 + n + i]
        return (g_delta, ga, gb, None, None, *g_x, *g_maps)

    @staticmethod
    def _backward_strip(ctx, grad, xs, maps, delta, a, b):
        n, eps = ctx.n, ctx.eps
        out, ws, wn, tot, den, big = _fusion_forward(xs, maps, delta, a, b, eps)
        if ctx.clamp:
            grad = torch.where((out >= 0.0) & (out <= 1.0), grad, 0.0)
        dd = torch.where(den < 0, -1.0, 1.0).to(den.dtype) * den.abs().clamp(min=1e-6)
        g_num = grad / dd
        g_den = torch.where(den.abs() >= 1e-6, -g_num * out, 0.0)
        g_w = [g_num * xs[i] + g_den for i in range(n)]
        ga = torch.stack([(g_w[i] * wn[i]).sum() for i in range(n)])
        gb = torch.stack([g_w[i].sum() for i in range(n)])
        g_wn = [a[i] * g_w[i] for i in range(n)]
        corr = g_wn[0] * wn[0]
        for i in range(1, n):
            corr = corr + g_wn[i] * wn[i]
        g_x, g_maps, g_delta = [], [], []
        for i in range(n):
            inv = (g_wn[i] - corr) / (tot * (xs[i] + eps))  # g_W_s / (x_s + eps)
            g_x.append(g_num * ws[i] + inv * (1.0 - big[i]))
            g_maps.append(inv * delta[i].view(1, 3, 1, 1) * torch.sign(maps[i]))
            g_delta.append((inv * maps[i].abs()).sum(dim=(0, 2, 3)))
        return (torch.stack(g_delta), ga, gb, None, None, *g_x, *g_maps)


class PoolFunction(torch.autograd.Function):
    r"""The attention's five 1x1-convolution maps of an image, each max-pooled by ``k``:
    ``pooled[:, o] = maxpool_k(sum_c w[o, c] x[:, c] + bias[o])``, with a backward that keeps
    only the pooling's indices (and ``x``, which the fusion keeps anyway): autograd would keep
    the five full-size maps. With ``i`` the index of each cell's maximum::

        g_x[:, c] at i  += w[o, c] g[:, o],   g_w[o, c] = sum g[:, o] x[:, c][i],   g_bias[o] = sum g[:, o]

    Inputs: ``x`` (B, 3, H, W) with H, W multiples of ``k``, ``weight`` (5, 3), ``bias`` (5,).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, k: int):
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        pooled, idx = [], []
        for o in range(weight.shape[0]):
            m = (r * weight[o, 0] + g * weight[o, 1] + b * weight[o, 2] + bias[o]).unsqueeze(1)
            p, i = F.max_pool2d(m, k, k, return_indices=True)
            pooled.append(p.squeeze(1))
            idx.append(i.squeeze(1))
        ctx.save_for_backward(x, weight, torch.stack(idx, dim=1))
        return torch.stack(pooled, dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight, idx = ctx.saved_tensors
        bsz, c = x.shape[:2]
        flat_x = x.flatten(2)  # (B, 3, H*W)
        flat_i = idx.flatten(2)  # (B, 5, h*w)
        flat_g = grad.flatten(2)  # (B, 5, h*w)
        g_x = torch.zeros_like(flat_x) if ctx.needs_input_grad[0] else None
        g_w = torch.empty_like(weight)
        for o in range(weight.shape[0]):
            at = flat_i[:, o].unsqueeze(1).expand(bsz, c, -1)
            go = flat_g[:, o].unsqueeze(1)
            if g_x is not None:
                g_x.scatter_add_(2, at, go * weight[o].view(1, c, 1))
            g_w[o] = (torch.gather(flat_x, 2, at) * go).sum(dim=(0, 2))
        return None if g_x is None else g_x.view_as(x), g_w, grad.sum(dim=(0, 2, 3)), None


class SharedAttention(nn.Module):
    """The SAGAN-like attention of method.md section 2, shared by all branches.

    ``forward(x)`` maps ``(B, 3, H, W)`` to the attention map ``A`` of shape ``(B, 3, H, W)``;
    :meth:`pooled` and :meth:`expand` split it so that several branches share one
    :func:`attend` call.
    """

    def __init__(self, pool: int = POOL) -> None:
        super().__init__()
        self.pool = int(pool)
        self.query = nn.Conv2d(3, 1, 1)
        self.key = nn.Conv2d(3, 1, 1)
        self.value = nn.Conv2d(3, 3, 1)

    def pooled(self, x: Tensor) -> Tensor:
        """Max-pooled ``[q, k, v]`` maps, ``(B, 5, ceil(H/8), ceil(W/8))``."""
        x = _pad_to_multiple(x, self.pool)
        weight = torch.cat((self.query.weight, self.key.weight, self.value.weight)).view(5, 3).to(x.dtype)
        bias = torch.cat((self.query.bias, self.key.bias, self.value.bias)).to(x.dtype)
        if (x.requires_grad or weight.requires_grad) and closed_form_enabled():
            return PoolFunction.apply(x, weight, bias, self.pool)
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        # Each 1x1-convolution output channel is pooled on its own: the five full-size maps are
        # never stacked into one tensor.
        maps = [_maxpool(r * weight[o, 0] + g * weight[o, 1] + b * weight[o, 2] + bias[o], self.pool) for o in range(5)]
        return torch.stack(maps, dim=1)

    def attend(self, pooled: Tensor, rank: int | None = None, exact: bool = False) -> Tensor:
        """Attention output on the pooled grid, ``(B, 3, h, w)`` (``rank``: see :func:`attend`;
        ``exact``: the N x N path whatever the bound says)."""
        b, _, hp, wp = pooled.shape
        flat = pooled.flatten(2)
        if exact:
            return _attend_exact(flat[:, 0], flat[:, 1], flat[:, 2:]).view(b, 3, hp, wp)
        return attend(flat[:, 0], flat[:, 1], flat[:, 2:], rank=rank).view(b, 3, hp, wp)

    @staticmethod
    def bound_holds(pooled: Tensor, rank: int) -> Tensor:
        """Whether the rank-``rank`` attention meets :data:`LOWRANK_TOL` on ``pooled`` (a bool tensor)."""
        flat = pooled.flatten(2)
        return _rho(flat[:, 0], flat[:, 1]) <= _rho_limit(flat.shape[-1], rank)

    def expand(self, a: Tensor, size: tuple[int, int], rows: tuple[int, int] | None = None) -> Tensor:
        """Upsample the pooled-grid output by ``pool`` (bilinear) and crop to ``size``;
        ``rows=(r0, r1)`` gives only those output rows (the same values, for strip-wise use)."""
        up = _upsample(a, self.pool, rows)
        return up[..., :, : size[1]] if rows is not None else up[..., : size[0], : size[1]]

    def forward(self, x: Tensor) -> Tensor:
        return self.expand(self.attend(self.pooled(x)), x.shape[-2:])


class LStainNorm(_CompilableNorm):
    r"""Learnable stain normalisation fused across colour spaces (the paper's LStainNorm).

    Args:
        spaces: colour spaces of the branches, any subset of the registry
            (default the paper's ``("lab", "hsv", "rgb")``; add ``"hed"`` by naming it).
        templates: initial templates: ``None`` (each space's default), ``"reference"``
            (the reference implementation's hard-coded numbers), a :class:`Template`, a
            mapping ``{space: (mu0, sigma0)}`` or the path of a template YAML.
        learnable: learn the branch templates (fusion weights and attention always learn).
        fusion: ``"attention"`` (the method: per-pixel weights from the shared self-attention) or
            ``"mean"`` (the plain mean of the branch images; no attention, no fusion weights),
            the ablation that asks what the attention adds.
        eps: the method's eps, in the std division and the fusion weights.
        tissue_stats: per-image statistics over tissue pixels only.
        clamp: clamp the fused output to [0, 1]; off by default, as in the reference (its
            weights may leave the range slightly).
        validate: check inputs for NaN/Inf and the [0, 1] range.
        stain_first: ``None`` or the stain vectors (``"estimate"``, ``"ruifrok"``, ``"learned"``) of a
            :class:`~lstainnorm.layers.stain.StainConcentrationNorm` stage run before the branches (it
            undoes a change of each stain's amount, which no branch undoes; its template amounts
            learn when ``learnable``, or as ``stain_learnable`` says).
        stain_learnable: ``None`` (as ``learnable``), or whether the stage's amounts learn: frozen,
            no gradient runs back through the branches to the stage (its cost falls about 4x).

    Shape:
        - Input: :math:`(B, 3, H, W)` RGB in [0, 1], any H, W >= 1.
        - Output: :math:`(B, 3, H, W)` fused RGB.

    Example:
        >>> norm = LStainNorm()
        >>> norm(torch.rand(1, 3, 50, 37)).shape
        torch.Size([1, 3, 50, 37])
    """

    _strip_multiple = POOL  # strips of a large image start on pooling-cell boundaries

    def __init__(
        self,
        spaces: Sequence[str] = ("lab", "hsv", "rgb"),
        templates: Template | Mapping | str | Path | None = None,
        *,
        learnable: bool = True,
        fusion: str = "attention",
        eps: float = DEFAULT_EPS,
        tissue_stats: bool = False,
        clamp: bool = False,
        validate: bool = True,
        stain_first: str | None = None,
        stain_learnable: bool | None = None,
    ) -> None:
        super().__init__()
        if isinstance(spaces, str):
            spaces = (spaces,)
        names = [get_space(s).name for s in spaces]
        if not names:
            raise ValueError("spaces must name at least one colour space")
        if len(set(names)) != len(names):
            raise ValueError(f"spaces must not repeat, got {list(spaces)}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        tpl = resolve_templates(templates, names, fusion=True)
        self.fusion = fusion
        self.spaces = tuple(names)
        self.eps = float(eps)
        self.clamp = bool(clamp)
        self.validate = bool(validate)
        self.tissue_stats = bool(tissue_stats)
        self.branches = nn.ModuleDict(
            {
                s: StainNorm(s, *tpl[s], learnable=learnable, eps=eps, tissue_stats=tissue_stats, clamp=False)
                for s in names
            }
        )
        if fusion == "attention":  # the mean has no parameters beyond the templates
            self.attention = SharedAttention()
            n = len(names)
            self.delta = nn.Parameter(torch.zeros(n, 3))  # delta_s = 1 + offset, per channel
            self.a = nn.Parameter(torch.ones(n))
            self.b = nn.Parameter(torch.ones(n))
        self._add_stain_stage(stain_first, learnable, stain_learnable)

    def extra_repr(self) -> str:
        return f"spaces={self.spaces}, fusion={self.fusion}, tissue_stats={self.tissue_stats}, clamp={self.clamp}"

    def _mean(self, xs: list[Tensor]) -> Tensor:
        out = xs[0]
        for xi in xs[1:]:
            out = out + xi
        out = out / len(xs)
        return out.clamp(0.0, 1.0) if self.clamp else out

    # -- hot path ----------------------------------------------------------------------------
    def _branch_images(self, x: Tensor, stats) -> list[Tensor]:
        outs = []
        for s in self.spaces:
            br = self.branches[s]
            st = None if stats is None else stats[s]
            outs.append(_normalize(x, br.space, br.mu, br.sigma, self.eps, self.tissue_stats, st, "abs"))
        return outs

    def _pooled(self, xs: list[Tensor]) -> Tensor:
        """Every branch's pooled maps stacked along the batch: the attention is shared, so one
        attention call serves all branches."""
        return torch.cat([self.attention.pooled(xi) for xi in xs], dim=0)

    def _attention_maps(self, xs: list[Tensor]) -> list[Tensor]:
        """The attention output of each branch on the pooled grid."""
        return list(self.attention.attend(self._pooled(xs)).chunk(len(xs), dim=0))

    def _params(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """``(delta_s, a_s, b_s)`` in ``dtype``: the fusion's parameters as :func:`_fusion_forward` takes them."""
        return (1.0 + self.delta).to(dtype), self.a.to(dtype), self.b.to(dtype)

    def _weights(self, xs: list[Tensor], att: list[Tensor]) -> list[Tensor]:
        """The fusion weights ``w_s`` from the branch images and their upsampled ``|A_s|``."""
        return _fusion_forward(xs, att, *self._params(xs[0].dtype), self.eps)[1]

    def _fuse(self, xs: list[Tensor], att: list[Tensor]) -> Tensor:
        """``sum_s w_s x_s / sum_s w_s``, clamped if asked."""
        out = _fusion_forward(xs, att, *self._params(xs[0].dtype), self.eps)[0]
        return out.clamp(0.0, 1.0) if self.clamp else out

    @staticmethod
    def _safe_div(num: Tensor, den: Tensor, eps: float) -> Tensor:
        # sum_s w_s is 3 at initialisation; learned a, b could drive it through 0, so its
        # magnitude is floored (keeping its sign) to keep the output finite.
        sign = torch.where(den < 0, -torch.ones_like(den), torch.ones_like(den))
        return num / (sign * den.abs().clamp(min=eps))

    def _forward_impl(self, x: Tensor, stats) -> Tensor:
        """The fused image. Traced by a user's ``torch.compile`` (of the layer or of a model holding
        it), the attention's rank is fixed and ``torch.cond`` takes the exact path wherever the
        rank's error bound fails: one graph, the same numbers as eager."""
        return self._fused(x, stats, fallback_outside=False)[0]

    def _compile_target(self):
        return self._forward_bounded

    def _forward_bounded(self, x: Tensor, stats) -> tuple[Tensor, Tensor | None]:
        """What :meth:`enable_compile` compiles: the fixed-rank image and whether its error bound
        held; ``_call`` recomputes eagerly (exact where needed) when it did not, so the compiled
        graph carries no exact path."""
        return self._fused(x, stats, fallback_outside=True)

    def _fused(self, x: Tensor, stats, fallback_outside: bool) -> tuple[Tensor, Tensor | None]:
        xs = self._branch_images(x, stats)
        if self.fusion == "mean":
            return self._mean(xs), None
        pooled = self._pooled(xs)
        ok = None
        if not torch.compiler.is_compiling():
            small = self.attention.attend(pooled)  # checks the bound, exact where needed
        else:
            # No data-dependent Python branch in a graph: the rank is fixed, the bound a tensor.
            ok = self.attention.bound_holds(pooled, COMPILED_RANK)
            if fallback_outside:
                small = self.attention.attend(pooled, rank=COMPILED_RANK)
            else:
                small = torch.cond(
                    ok,
                    lambda p: self.attention.attend(p, rank=COMPILED_RANK),
                    lambda p: self.attention.attend(p, exact=True),
                    (pooled,),
                )
                ok = None
        size = x.shape[-2:]
        maps = [self.attention.expand(a, size) for a in small.chunk(len(xs), dim=0)]
        if closed_form_enabled():
            # Training eagerly: the closed-form backward (a few saved images instead of ~20).
            return FusionFunction.apply(*self._params(x.dtype), self.eps, self.clamp, *xs, *maps), ok
        return self._fuse(xs, maps), ok

    def _forward_strips(self, x: Tensor, stats, rows: int) -> Tensor:
        """The same result as :meth:`_forward_impl`, ``rows`` image rows at a time (inference on
        large images: memory and cache footprint of one strip). Pass 1 collects the statistics
        and the pooled maps strip by strip, the attention runs once on the whole pooled grid,
        pass 2 recomputes each strip's branches and fuses them."""
        h, w = x.shape[-2:]
        if stats is None:
            stats = {s: strip_stats(x, self.branches[s].space, self.tissue_stats, rows) for s in self.spaces}
        if self.fusion == "mean":
            out = torch.empty_like(x)
            for r0 in range(0, h, rows):
                out[..., r0 : r0 + rows, :] = self._mean(self._branch_images(x[..., r0 : r0 + rows, :], stats))
            return out
        parts: list[list[Tensor]] = [[] for _ in self.spaces]
        for r0 in range(0, h, rows):
            for i, xi in enumerate(self._branch_images(x[..., r0 : r0 + rows, :], stats)):
                parts[i].append(self.attention.pooled(xi))
        pooled = torch.cat([torch.cat(p, dim=2) for p in parts], dim=0)
        small = self.attention.attend(pooled).chunk(len(self.spaces), dim=0)
        out = torch.empty_like(x)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            xs = self._branch_images(x[..., r0:r1, :], stats)
            att = [self.attention.expand(a, (h, w), rows=(r0, r1)).abs() for a in small]
            out[..., r0:r1, :] = self._fuse(xs, att)
        return out

    def forward(self, x: Tensor, stats: Mapping[str, tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """Normalise and fuse ``x``; ``stats`` optionally gives ``{space: (mean, std)}``."""
        return self._run(x, stats)

    # -- what it learned -----------------------------------------------------------------------
    def image_stats(self, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Per-image ``{space: (mean, std)}`` of ``x``, each (B, 3, 1, 1)."""
        return {s: self.branches[s].image_stats(x) for s in self.spaces}

    @torch.no_grad()
    def fusion_maps(self, x: Tensor) -> dict[str, Tensor]:
        """Per-pixel weight of each space in the fused image, ``{space: (B, 3, H, W)}``.

        The weights are ``w_s / sum_s w_s``: the fused output is ``sum_s map_s * x_s``.
        """
        x = self._prepare(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xs = self._branch_images(x, None)
            if self.fusion == "mean":
                return {s: torch.full_like(xs[0], 1.0 / len(xs)) for s in self.spaces}
            small = self._attention_maps(xs)
            ws = self._weights(xs, [self.attention.expand(a, x.shape[-2:]).abs() for a in small])
            den = ws[0]
            for w in ws[1:]:
                den = den + w
            return {s: self._safe_div(w, den, 1e-6) for s, w in zip(self.spaces, ws)}

    @torch.no_grad()
    def branch_images(self, x: Tensor) -> dict[str, Tensor]:
        """Each branch's normalised RGB image ``x_s`` before fusion, ``{space: (B, 3, H, W)}``."""
        x = self._prepare(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return dict(zip(self.spaces, self._branch_images(x, None)))

    def template(self) -> Template:
        """The current template per space and the space-wise fusion weights ``a_s, b_s``."""
        stats = {s: (self.branches[s].mu.detach().tolist(), self.branches[s].sigma.detach().tolist()) for s in self.spaces}
        if self.fusion == "mean":
            return Template(stats)
        fusion = {
            s: {"a": float(self.a[i].detach()), "b": float(self.b[i].detach()), "delta": (1.0 + self.delta[i].detach()).tolist()}
            for i, s in enumerate(self.spaces)
        }
        return Template(stats, fusion=fusion)


@register_norm("lstainnorm")
def _lstainnorm(**kwargs) -> LStainNorm:
    return LStainNorm(**kwargs)


def norm_spaces(norm: nn.Module, purpose: str = "pooled statistics") -> list:
    """The colour spaces whose statistics ``norm`` standardises by (what ``stats=`` must hold)."""
    if isinstance(norm, LStainNorm):
        return [norm.branches[s].space for s in norm.spaces]
    if isinstance(norm, StainNorm):
        return [norm.space]
    raise TypeError(f"{purpose} needs a StainNorm or LStainNorm layer, got {type(norm).__name__}")
