"""The closed-form backward: StandardiseFunction, FusionFunction and the colour
conversions' vector-Jacobian products, each against autograd and with gradcheck in float64."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lstainnorm
from lstainnorm.allocator import keep_freed_pages
from lstainnorm.layers import color
from lstainnorm.layers import norm as norm_module
from lstainnorm.layers.fusion import FusionFunction, PoolFunction, _fusion_forward
from lstainnorm.layers.norm import StandardiseFunction, _normalize, closed_form_backward

SPACES = ["lab", "hsv", "rgb", "hed"]
POSTS = [None, "abs", "clamp"]


def _tiles(dtype=torch.float64, seed=0, shape=(3, 3, 11, 9)) -> torch.Tensor:
    """Random RGB with the cases that matter: quantised values (ties between channels), white,
    black, a grey pixel and a uniform image (its std is at the floor)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, 256, shape, generator=g) / 255.0).to(dtype)
    x[0, :, 0, 0] = 1.0
    x[0, :, 1, 1] = 0.0
    x[0, :, 2, 2] = 0.5
    x[1, 0, 3, 3] = x[1, 1, 3, 3]
    x[2] = 0.4
    return x


@pytest.mark.parametrize("name", SPACES)
def test_vjp_functions_match_autograd(name):
    space = color.get_space(name)
    x = _tiles().requires_grad_(True)
    g = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    (ref,) = torch.autograd.grad(space.to_space(x), x, g)
    torch.testing.assert_close(space.to_space_vjp(x.detach(), g), ref, rtol=1e-9, atol=1e-9)
    y = (space.to_space(x.detach()) * 1.3 + 0.05).requires_grad_(True)  # pushes some values out of range
    for post in POSTS:
        out = space.from_space(y)
        out = out.abs() if post == "abs" else out.clamp(0.0, 1.0) if post == "clamp" else out
        (ref,) = torch.autograd.grad(out, y, g)
        torch.testing.assert_close(space.from_space_vjp(y.detach(), g, post), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("post", POSTS)
def test_standardise_function_equals_autograd(name, post):
    space = color.get_space(name)
    x = _tiles().requires_grad_(True)
    mu = torch.tensor(space.default_mu, dtype=x.dtype, requires_grad=True)
    sigma = torch.tensor(space.default_sigma, dtype=x.dtype, requires_grad=True)
    g = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(2))
    out = StandardiseFunction.apply(x, mu, sigma, space, 1e-7, post)
    got = torch.autograd.grad(out, (x, mu, sigma), g)
    with closed_form_backward(False):
        ref_out = _normalize(x, space, mu, sigma, 1e-7, False, None, post)
    ref = torch.autograd.grad(ref_out, (x, mu, sigma), g)
    assert torch.equal(out, ref_out)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", SPACES)
def test_standardise_function_gradcheck_float64(name):
    space = color.get_space(name)
    x = torch.rand(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    mu = torch.tensor(space.default_mu, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(space.default_sigma, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: StandardiseFunction.apply(*t, space, 1e-7, "abs"), (x, mu, sigma), eps=1e-6, atol=1e-4
    )


def test_per_image_templates_get_per_image_gradients():
    """RandStainNA-style templates of shape (B, 3, 1, 1): the gradient keeps that shape."""
    space = color.get_space("lab")
    x = _tiles()
    mu = torch.tensor(space.default_mu, dtype=x.dtype).view(1, 3, 1, 1).repeat(3, 1, 1, 1).requires_grad_(True)
    sigma = torch.tensor(space.default_sigma, dtype=x.dtype).view(1, 3, 1, 1).repeat(3, 1, 1, 1).requires_grad_(True)
    got = torch.autograd.grad(StandardiseFunction.apply(x, mu, sigma, space, 1e-7, None).sum(), (mu, sigma))
    with closed_form_backward(False):
        ref = torch.autograd.grad(_normalize(x, space, mu, sigma, 1e-7, False, None).sum(), (mu, sigma))
    for a, b in zip(got, ref):
        assert a.shape == (3, 3, 1, 1)
        torch.testing.assert_close(a, b)


def test_fusion_function_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    xs = [torch.rand(1, 3, 4, 5, dtype=torch.float64, generator=g).requires_grad_(True) for _ in range(3)]
    maps = [(torch.rand(1, 3, 4, 5, dtype=torch.float64, generator=g) - 0.5).requires_grad_(True) for _ in range(3)]
    delta = (1.0 + 0.1 * torch.randn(3, 3, dtype=torch.float64, generator=g)).requires_grad_(True)
    a = torch.tensor([1.0, 0.8, 1.2], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([1.0, 0.9, 1.1], dtype=torch.float64, requires_grad=True)
    for clamp in (False, True):
        assert torch.autograd.gradcheck(
            lambda d, aa, bb, *t: FusionFunction.apply(d, aa, bb, 1e-7, clamp, *t), (delta, a, b, *xs, *maps), eps=1e-6, atol=1e-5
        )
    out = FusionFunction.apply(delta, a, b, 1e-7, False, *xs, *maps)
    torch.testing.assert_close(out, _fusion_forward(xs, maps, delta, a, b, 1e-7)[0])


def test_pool_function_equals_autograd_and_gradchecks():
    att = lstainnorm.LStainNorm().double().attention
    x = torch.rand(2, 3, 16, 24, dtype=torch.float64, requires_grad=True)
    got = att.pooled(x)
    with closed_form_backward(False):
        ref = att.pooled(x)
    assert torch.equal(got, ref)
    assert "PoolFunction" in type(got.grad_fn).__name__
    g = torch.randn(got.shape, dtype=got.dtype)
    params = [x, *att.parameters()]
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: PoolFunction.apply(*t, 8), (x[:1, :, :8, :16].detach().requires_grad_(True), w, bias))


@pytest.mark.parametrize("clamp", [False, True])
def test_strip_wise_backward_equals_whole(monkeypatch, clamp):
    """Large images: the closed-form backward runs strip by strip; the gradients are the same."""
    torch.manual_seed(0)
    norm = lstainnorm.LStainNorm(clamp=clamp).double()
    x = _tiles(shape=(3, 3, 40, 24)).requires_grad_(True)
    params = [x, *norm.parameters()]
    g = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(5))
    whole = torch.autograd.grad(norm(x), params, g)
    monkeypatch.setattr(norm_module, "CPU_CHUNK_PIXELS", 3 * 24 * 7)  # strips of 7 rows, 6 strips
    assert norm_module.backward_rows(x) == 7
    strips = torch.autograd.grad(norm(x), params, g)
    for a, b in zip(strips, whole):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("clamp", [False, True])
def test_lstainnorm_closed_form_equals_autograd(clamp):
    """The whole layer, every parameter and the input, float64: the same outputs and gradients."""
    torch.manual_seed(0)
    norm = lstainnorm.LStainNorm(spaces=("lab", "hsv", "rgb", "hed"), clamp=clamp).double()
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = _tiles(shape=(3, 3, 21, 19)).requires_grad_(True)
    params = [x, *norm.parameters()]
    g = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(4))
    out = norm(x)
    got = torch.autograd.grad(out, params, g)
    with closed_form_backward(False):
        ref_out = norm(x)
        ref = torch.autograd.grad(ref_out, params, g)
    assert torch.equal(out, ref_out)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_float32_gradients_are_as_accurate_as_autograds():
    """In float32 the closed form is as close to the float64 formulas as autograd's float32 is."""
    torch.manual_seed(0)
    norm = lstainnorm.LStainNorm()
    x = torch.rand(2, 3, 32, 32)
    g = torch.randn(x.shape)

    def grads(module, inp, closed):
        inp = inp.clone().requires_grad_(True)
        with closed_form_backward(closed):
            return torch.autograd.grad(module(inp), [inp, *module.branches.parameters()], g.to(inp.dtype))

    closed, auto = grads(norm, x, True), grads(norm, x, False)
    exact = grads(norm.double(), x.double(), False)
    for c, a, r in zip(closed, auto, exact):
        scale = float(r.abs().max())
        assert float((c.double() - r).abs().max()) <= float((a.double() - r).abs().max()) + 1e-5 * scale


def test_closed_form_saves_few_tensors():
    """What the backward keeps, in images' worth of distinct storage (saved_tensors_hooks): autograd
    kept ~69 for LStainNorm, the closed form ~16 (input, centred images, branch images, attention
    maps, the pooling's inputs)."""
    norm = lstainnorm.LStainNorm()
    x = torch.rand(2, 3, 64, 64, requires_grad=True)

    def count(closed):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
            return t

        with closed_form_backward(closed), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            norm(x)
        return sum(storages.values()) / x.numel()

    closed, auto = count(True), count(False)
    assert closed < 20 and auto > 3 * closed, (closed, auto)


def test_closed_form_switch_restores_and_tissue_stats_use_autograd():
    from lstainnorm.layers import norm as norm_mod

    with closed_form_backward(False):
        assert not norm_mod.closed_form_enabled()
        with closed_form_backward(True):
            assert norm_mod.closed_form_enabled()
        assert not norm_mod.closed_form_enabled()
    assert norm_mod.closed_form_enabled()
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    out = lstainnorm.StainNorm("lab", tissue_stats=True)(x)
    assert "StandardiseFunction" not in type(out.grad_fn).__name__
    out = lstainnorm.StainNorm("lab")(x)
    assert "StandardiseFunction" in type(out.grad_fn).__name__
    with torch.no_grad():
        assert lstainnorm.StainNorm("lab")(x).grad_fn is None


def test_keep_freed_pages_is_idempotent():
    first = keep_freed_pages()
    assert isinstance(first, bool)
    assert keep_freed_pages() is first


_FREED_PAGES_PROBE = """
import os
from lstainnorm.allocator import keep_freed_pages
ok = keep_freed_pages()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
b = bytearray(16 << 20)
for i in range(0, len(b), 4096):
    b[i] = 1
before = rss()
del b
print(ok, before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_pages_keeps_a_freed_image_sized_buffer():
    """With the setting a freed 16 MB buffer stays with the process (no page faults when the next
    image-sized temporary takes it); without it (LSTAINNORM_MALLOC=default) glibc returns it."""
    def probe(env: dict) -> tuple[bool, int]:
        out = subprocess.run([sys.executable, "-c", _FREED_PAGES_PROBE], env={**os.environ, **env},
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0] == "True", int(out[1])

    ok, kept_drop = probe({})
    if not ok:
        pytest.skip("mallopt unavailable (not glibc)")
    off, default_drop = probe({"LSTAINNORM_MALLOC": "default"})
    assert not off
    assert default_drop > 12 << 20  # returned to the system on free
    assert kept_drop < 4 << 20      # kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_closed_form_equals_autograd():
    """On a GPU the closed form gives autograd's gradients too (float32, to rounding)."""
    torch.manual_seed(0)
    norm = lstainnorm.LStainNorm().cuda()
    x = torch.rand(4, 3, 64, 64, device="cuda", requires_grad=True)
    params = [x, *norm.parameters()]
    got = torch.autograd.grad(norm(x).square().sum(), params)
    with closed_form_backward(False):
        ref = torch.autograd.grad(norm(x).square().sum(), params)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) + 1e-7)
