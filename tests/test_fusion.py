import pytest
import torch
from conftest import he_like

from lstainnorm import LStainNorm, StainNorm, Template, create_norm, with_stain_norm
from lstainnorm.layers.fusion import attend
from reference import ReferenceSA3


def _perturbed(norm, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return norm


@pytest.mark.parametrize("shape", [(2, 3, 64, 48), (1, 3, 16, 16), (3, 3, 8, 40)])
def test_matches_literal_transcription(shape):
    """For H, W multiples of 8 the layer computes exactly method.md section 2."""
    ours = _perturbed(LStainNorm())
    ref = ReferenceSA3()
    ref.load_state_dict(ours.state_dict())
    x = he_like(shape[0], shape[2], shape[3], seed=1)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_matches_transcription_with_reference_templates():
    ours = _perturbed(LStainNorm(templates="reference"), seed=2)
    ref = ReferenceSA3(templates="reference")
    ref.load_state_dict(ours.state_dict())
    x = he_like(2, 32, 24, seed=3)
    assert torch.allclose(ours(x), ref(x), atol=1e-4)


@pytest.mark.parametrize("hw", [(1, 1), (1, 9), (7, 5), (13, 8), (9, 17), (33, 31)])
def test_any_size(hw):
    x = he_like(1, *hw)
    out = LStainNorm()(x)
    assert out.shape == (1, 3, *hw)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("hw", [(20, 20), (9, 30), (3, 5)])
def test_pooling_is_ceil_mode_max_pool(hw):
    """For H, W that are not multiples of 8, the attention pools like a ceil-mode max-pool."""
    att = _perturbed(LStainNorm(), seed=4).attention
    x = he_like(2, *hw, seed=5)
    convs = torch.cat([att.query(x), att.key(x), att.value(x)], dim=1)
    expected = torch.nn.functional.max_pool2d(convs, 8, ceil_mode=True) if min(hw) >= 8 else convs.amax(dim=(2, 3), keepdim=True).expand(-1, -1, -(-hw[0] // 8), -(-hw[1] // 8))
    assert torch.allclose(att.pooled(x), expected, atol=1e-6)
    assert att(x).shape == x.shape


def test_pooling_gradient_follows_the_maximum_like_the_reference():
    """Ties in a pooling cell: the gradient goes to one maximum, as with the reference's
    nn.MaxPool2d (saved indices), not split by comparing values again in the backward
    (that comparison gave NaN gradients once compiled for CUDA)."""
    from lstainnorm.layers.fusion import _maxpool

    x = torch.zeros(2, 16, 16)
    x[:, :8, :8] = 1.0  # one cell of tied maxima
    x.requires_grad_(True)
    ref = x.detach().clone().requires_grad_(True)
    _maxpool(x, 8).sum().backward()
    torch.nn.MaxPool2d(8)(ref.unsqueeze(1)).squeeze(1).sum().backward()
    assert torch.equal(x.grad, ref.grad)
    assert x.grad.sum() == 2 * 4  # one unit of gradient per cell and image


@pytest.mark.parametrize("spaces", [("lab",), ("hsv", "rgb"), ("lab", "hsv", "rgb", "hed")])
def test_subsets_and_hed(spaces):
    norm = LStainNorm(spaces=spaces)
    assert tuple(norm.branches) == spaces
    assert norm.a.shape == (len(spaces),)
    out = norm(he_like(2, 16, 16))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def test_bad_spaces():
    with pytest.raises(ValueError, match="must not repeat"):
        LStainNorm(spaces=("lab", "lab"))
    with pytest.raises(ValueError, match="at least one"):
        LStainNorm(spaces=())


def test_float64_and_batch_one():
    x = he_like(1, 16, 16).double()
    out = LStainNorm()(x)
    assert out.dtype == torch.float64 and out.shape == (1, 3, 16, 16)


def test_autocast_keeps_float32():
    x = he_like(2, 16, 16)
    norm = LStainNorm()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, norm(x))


def test_gradcheck_float64_all_parameters():
    norm = _perturbed(LStainNorm(), seed=6, scale=0.02)
    x = he_like(1, 8, 8, seed=7).double().requires_grad_()
    names = [n for n, _ in norm.named_parameters()]
    params = tuple(p.detach().double().requires_grad_() for _, p in norm.named_parameters())

    def f(x, *ps):
        return torch.func.functional_call(norm, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-4, rtol=1e-3)


def test_every_parameter_gets_a_gradient():
    norm = LStainNorm()
    norm(he_like(2, 16, 16)).square().mean().backward()
    for name, p in norm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name == "attention.key.bias":
            # softmax_j(q_i (k_j + b)) does not depend on b: the method gives the key bias no gradient
            # (the exact N x N path showed float rounding there; the linear-time path gives 0).
            assert float(p.grad.abs().sum()) < 1e-6
            continue
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_fusion_maps_reconstruct_output():
    norm = _perturbed(LStainNorm(), seed=8)
    x = he_like(2, 24, 16, seed=9)
    maps = norm.fusion_maps(x)
    branches = norm.branch_images(x)
    assert set(maps) == {"lab", "hsv", "rgb"}
    total = sum(maps.values())
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    recon = sum(maps[s] * branches[s] for s in maps)
    assert torch.allclose(recon, norm(x), atol=1e-5)


def test_template_reports_learned_values_and_fusion_weights():
    norm = LStainNorm()
    with torch.no_grad():
        norm.branches["rgb"].dmu.fill_(0.01)
        norm.a[1] = 2.0
    t = norm.template()
    assert isinstance(t, Template)
    rgb = t.natural()["rgb"]
    default_rgb = StainNorm("rgb").mu0
    assert rgb["mu"][0] == pytest.approx((default_rgb[0].item() + 0.01) * 255, rel=1e-5)
    assert t.fusion["hsv"]["a"] == pytest.approx(2.0)
    assert t.fusion["lab"]["b"] == pytest.approx(1.0)


def test_templates_argument_forms(tmp_path):
    t = Template({"lab": ([60.0, 20.0, -10.0], [10.0, 6.0, 5.0])})
    assert LStainNorm(templates=t).branches["lab"].mu0.tolist() == pytest.approx([60.0, 20.0, -10.0])
    assert LStainNorm(templates={"hsv": ([4.0, 0.5, 0.6], [0.3, 0.1, 0.1])}).branches["hsv"].mu0[0] == pytest.approx(4.0)
    path = t.save(tmp_path / "t.yaml")
    assert LStainNorm(templates=path).branches["lab"].sigma0.tolist() == pytest.approx([10.0, 6.0, 5.0])
    assert LStainNorm(templates="reference").branches["lab"].mu0[0] == pytest.approx(19.5645)
    with pytest.raises(TypeError, match="templates must be"):
        LStainNorm(templates=3)


def test_attend_blocks_equal_full_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 300, generator=g), torch.randn(3, 300, generator=g), torch.randn(3, 3, 300, generator=g)
    full = torch.bmm(v, torch.softmax(q.unsqueeze(2) * k.unsqueeze(1), dim=-1))
    for block in (300 * 300 * 3, 300 * 7, 1):
        assert torch.allclose(attend(q, k, v, block=block), full, atol=1e-5)


def test_state_dict_round_trip(tmp_path):
    a = _perturbed(LStainNorm(spaces=("lab", "hed")), seed=10)
    torch.save(a.state_dict(), tmp_path / "n.pt")
    b = LStainNorm(spaces=("lab", "hed"))
    b.load_state_dict(torch.load(tmp_path / "n.pt"))
    x = he_like()
    assert torch.equal(a(x), b(x))


def test_with_stain_norm_returns_output_and_image():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model = with_stain_norm(net, LStainNorm())
    x = he_like(2, 16, 16)
    y = model(x)
    y2, z = model(x, return_normalized=True)
    assert y.shape == (2, 4) and torch.equal(y, y2)
    assert torch.equal(z, model.norm(x))
    by_name = with_stain_norm(net, "learnable", space="hsv")
    assert isinstance(by_name.norm, StainNorm) and by_name.norm.space.name == "hsv"
    with pytest.raises(TypeError):
        with_stain_norm(net, LStainNorm(), space="lab")
    assert isinstance(create_norm("sa3"), LStainNorm)


def test_large_batch_chunking_is_exact():
    norm = _perturbed(LStainNorm(), seed=11)
    x = he_like(12, 224, 224, seed=12)  # > one CPU chunk
    whole = norm(x)
    single = torch.cat([norm(x[i : i + 1]) for i in range(12)])
    assert torch.allclose(whole, single, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    norm = _perturbed(LStainNorm(), seed=13)
    x = he_like(2, 40, 24)
    assert torch.allclose(norm.cuda()(x.cuda()).cpu(), norm.cpu()(x), atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_compiled_training_keeps_gradients_finite():
    """Compiled for CUDA, a few optimiser steps on 224 x 224 tiles keep every gradient finite and
    equal to the eager ones (the amax-based pooling gave NaN gradients from the first step)."""
    torch.manual_seed(0)
    x = he_like(16, 224, 224, seed=14).cuda()
    eager = LStainNorm().cuda()
    compiled = LStainNorm().cuda()
    compiled.load_state_dict(eager.state_dict())
    compiled.enable_compile()
    opt = torch.optim.AdamW(compiled.parameters(), lr=1e-3)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        compiled(x).square().mean().backward()
        for name, p in compiled.named_parameters():
            assert torch.isfinite(p.grad).all(), f"step {step}: non-finite gradient of {name}"
        if step == 0:
            eager(x).square().mean().backward()
            for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
                assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-6), name
        opt.step()


@pytest.mark.parametrize("hw", [(1, 1), (5, 3), (28, 28), (7, 30)])
def test_upsample_equals_interpolate(hw):
    from lstainnorm.layers.fusion import _upsample

    a = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.interpolate(a, scale_factor=8, mode="bilinear", align_corners=False)
    assert torch.allclose(_upsample(a, 8), ref, atol=1e-6)


# -- the attention in linear time ---------------------------------------------------------------------
from lstainnorm.layers import fusion as _fusion  # noqa: E402


def _qkv(n, scale, b=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, n, generator=g, dtype=dtype) * scale for _ in range(2))
    return q, k, torch.randn(b, 3, n, generator=g, dtype=dtype)


@pytest.mark.parametrize("n,scale", [(49, 0.01), (784, 0.1), (784, 1.0), (2048, 0.5), (3, 2.0)])
def test_linear_attention_equals_exact(n, scale):
    q, k, v = _qkv(n, scale)
    r = _fusion.attention_rank(q, k)
    assert r is not None
    exact = _fusion._attend_exact(q, k, v)
    assert torch.allclose(_fusion.attend(q, k, v), exact, rtol=0, atol=1e-9 * float(exact.abs().max()))
    q32, k32, v32 = q.float(), k.float(), v.float()
    got = _fusion.attend(q32, k32, v32).double()
    assert float((got - exact).abs().max() / exact.abs().max()) < 1e-5


def test_linear_attention_error_bound_holds():
    for scale in (0.3, 1.0, 2.0):
        q, k, v = _qkv(500, scale, seed=3)
        rho = float(_fusion._rho(q, k))
        exact = _fusion._attend_exact(q, k, v)
        for r in (8, 16, 24):
            # Each output is a sum over rows i of v_i-weighted softmax rows, each exact to the bound
            # relative to its row sum (>= 1): the error is at most about bound * sum_i |v_i|.
            err = float((_fusion._attend_lowrank(q, k, v, r) - exact).abs().max())
            bound = _fusion.lowrank_error(rho, 500, r)
            assert err <= 4 * bound * float(v.abs().sum(dim=2).max()) + 1e-12, (scale, r, err, bound)


def test_linear_attention_gradcheck_float64():
    q, k, v = (t.requires_grad_() for t in _qkv(30, 1.0, b=1))
    assert torch.autograd.gradcheck(lambda q, k, v: _fusion._attend_lowrank(q, k, v, 40), (q, k, v))
    out = _fusion.attend(q, k, v)
    g = torch.autograd.grad(out.square().sum(), (q, k, v))
    g_exact = torch.autograd.grad(_fusion._attend_exact(q, k, v).square().sum(), (q, k, v))
    for a, b in zip(g, g_exact):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-8


def test_attention_falls_back_to_exact_beyond_the_bound():
    q, k, v = _qkv(784, 30.0)  # logits spread over thousands: no rank meets the bound
    assert _fusion.attention_rank(q, k) is None
    assert torch.equal(_fusion.attend(q, k, v), _fusion._attend_exact(q, k, v))


def test_layer_with_linear_attention_equals_exact_layer():
    torch.manual_seed(0)
    norm = LStainNorm()
    with torch.no_grad():
        for p in norm.attention.parameters():
            p.mul_(8.0)  # a trained-looking, less uniform attention
    x = torch.rand(2, 3, 256, 192, dtype=torch.float64) * 0.8 + 0.1
    norm = norm.double()
    fast = norm(x)
    saved, _fusion.MAX_RANK = _fusion.MAX_RANK, 0
    try:
        exact = norm(x)
    finally:
        _fusion.MAX_RANK = saved
    assert float((fast - exact).detach().abs().max() / exact.detach().abs().max()) < 1e-8


# -- ablation options ----------------------------------------------------------------
def test_mean_fusion_is_the_plain_mean_of_the_branches():
    norm = LStainNorm(fusion="mean")
    x = torch.rand(2, 3, 40, 33) * 0.8 + 0.1
    xs = norm.branch_images(x)
    torch.testing.assert_close(norm(x), sum(xs.values()) / 3)
    # no attention and no fusion weights: only the branch templates learn
    names = {n for n, _ in norm.named_parameters()}
    assert names and all(n.startswith("branches.") for n in names)
    assert norm.template().fusion == {}
    maps = norm.fusion_maps(x)
    assert all(torch.allclose(m, torch.full_like(m, 1 / 3)) for m in maps.values())


def test_mean_fusion_strips_equal_whole_image():
    norm = LStainNorm(fusion="mean").eval()
    x = torch.rand(1, 3, 70, 40) * 0.8 + 0.1
    with torch.no_grad():
        whole = norm._forward_impl(norm._prepare(x), None)
        strips = norm._forward_strips(norm._prepare(x), None, rows=16)
    torch.testing.assert_close(strips, whole)


def test_frozen_templates_keep_fusion_learnable():
    norm = LStainNorm(learnable=False)
    names = {n for n, p in norm.named_parameters() if p.requires_grad}
    assert not any(n.startswith("branches.") for n in names)
    assert {"delta", "a", "b"} <= names and any(n.startswith("attention.") for n in names)


def test_bad_fusion_is_a_clear_error():
    with pytest.raises(ValueError, match="fusion must be one of"):
        LStainNorm(fusion="max")
