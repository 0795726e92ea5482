"""Classical normalisers, stain augmentation, and the benchmark commands (benchmarks/bench.py)."""

import json
import os

import numpy as np
import pytest
import torch
import yaml
from conftest import he_like
from PIL import Image

from lstainnorm import create_norm
from lstainnorm.baselines.augment import HEDJitter, RandStainNA, stain_statistics
from lstainnorm.baselines.classical import ClassicalNorm, tissue_fraction, training_mosaic
from lstainnorm.layers.color import get_space, rgb_to_lab
from lstainnorm.data.synthetic import SyntheticHE

GEN = SyntheticHE(size=48, seed=0)


def _tiles(centre, n=4, cls=None):
    return torch.stack([torch.from_numpy(GEN.render(cls if cls is not None else i % 6, centre, i)[0]).permute(2, 0, 1) for i in range(n)]).float() / 255


def _lab_mean(x):
    return rgb_to_lab(x).mean(dim=(0, 2, 3))


@pytest.mark.parametrize("method,backend", [("reinhard", "torch-staintools"), ("macenko", "torch-staintools"), ("vahadane", "torch-staintools"), ("macenko", "torchstain"), ("reinhard", "torchstain")])
def test_normalises_toward_target_and_falls_back_on_glass(method, backend):
    target = training_mosaic(list(_tiles(0, 8)), n=4)
    norm = ClassicalNorm(method, target=target, backend=backend, cache_mb=0)
    src = _tiles(3, 4, cls=0)  # tumour of centre D: both stains present
    glass = torch.full((1, 3, 48, 48), 0.95)
    black = torch.zeros(1, 3, 48, 48)
    out = norm(torch.cat([src, glass, black]))
    assert out.shape == (6, 3, 48, 48) and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out[4], glass[0]) and torch.equal(out[5], black[0])  # passed through
    assert norm.fallbacks >= 2
    # Normalisation shrinks the colour differences between centres (tumour tiles of A-D).
    per_centre = [_tiles(c, 3, cls=0) for c in range(4)]

    def spread(groups):
        means = [_lab_mean(g) for g in groups]
        return max((a - b).norm() for a in means for b in means)

    assert spread([norm(g) for g in per_centre]) < 0.6 * spread(per_centre)


def test_cache_and_disk_cache(tmp_path):
    target = training_mosaic(list(_tiles(0, 4)), n=4)
    x = _tiles(2, 3)
    a = ClassicalNorm("macenko", target=target, cache_dir=str(tmp_path / "c"))
    y1 = a(x)
    y2 = a(x)
    assert torch.equal(y1, y2) and a.calls == 3  # second call from the cache
    b = ClassicalNorm("macenko", target=target, cache_dir=str(tmp_path / "c"))
    assert torch.equal(b(x), y1) and b.calls == 0  # from disk
    c = ClassicalNorm("reinhard", target=target, cache_dir=str(tmp_path / "c"))
    c(x)
    assert c.calls == 3  # another method never reads macenko's tiles


def test_state_dict_round_trip_restores_the_fit():
    target = training_mosaic(list(_tiles(0, 4)), n=4)
    a = ClassicalNorm("reinhard", target=target)
    b = ClassicalNorm("reinhard")
    assert not b.is_fitted
    b.load_state_dict(a.state_dict())
    x = _tiles(1, 2)
    assert b.is_fitted and torch.equal(a(x), b(x))


def test_state_dict_from_before_fit_tiles_loads_strictly_and_is_left_as_given():
    """Checkpoints written before ``target_stats`` existed still load (strict), and the caller's
    state dict is not changed."""
    a = ClassicalNorm("reinhard", target=training_mosaic(list(_tiles(0, 4)), n=4))
    old = {k: v for k, v in a.state_dict().items() if k != "target_stats"}
    keys = set(old)
    b = ClassicalNorm("reinhard")
    b.load_state_dict(old)
    x = _tiles(1, 2)
    assert set(old) == keys and b.is_fitted and torch.equal(a(x), b(x))


def test_reinhard_fit_tiles_matches_the_frozen_lab_layer():
    """Fitted to the mean of per-tile statistics over all pixels, Reinhard is the frozen Lab
    template layer up to the two libraries' Lab conversions; the fit survives a state-dict round trip."""
    from lstainnorm import StainNorm
    from torch_staintools.functional.conversion.lab import rgb_to_lab as ts_lab

    train = _tiles(0, 12)
    norm = ClassicalNorm("reinhard", cache_mb=0, min_tissue=0.0).fit_tiles(iter([train[:5], train[5:]]))
    lab = ts_lab(train)
    expected = torch.stack([lab.mean(dim=(2, 3)).mean(0), lab.flatten(2).std(dim=2).mean(0)])
    torch.testing.assert_close(norm.target_stats, expected, rtol=1e-4, atol=1e-4)
    x = _tiles(3, 4)
    out = norm(x)
    layer = StainNorm("lab", *expected.tolist(), learnable=False).eval()
    with torch.no_grad():
        ref = layer(x)
    assert (out - ref).abs().mean() < 2e-3  # 8-bit output; the Lab conversions differ slightly
    b = ClassicalNorm("reinhard", cache_mb=0, min_tissue=0.0)
    b.load_state_dict(norm.state_dict())
    assert torch.equal(b(x), out)
    with pytest.raises(ValueError, match="fit_tiles fits Reinhard"):
        ClassicalNorm("macenko").fit_tiles(train)
    with pytest.raises(ValueError, match="no images"):
        ClassicalNorm("reinhard").fit_tiles([])


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown classical method"):
        ClassicalNorm("foo")
    with pytest.raises(ValueError, match="no Vahadane"):
        ClassicalNorm("vahadane", backend="torchstain")
    with pytest.raises(RuntimeError, match="not fitted"):
        ClassicalNorm("macenko")(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="too little tissue"):
        ClassicalNorm("macenko", target=torch.full((3, 32, 32), 0.97))
    with pytest.raises(ValueError, match="observed range"):
        ClassicalNorm("reinhard", target=_tiles(0, 1)[0])(torch.full((1, 3, 8, 8), 3.0))


def test_factory_with_template_image(tmp_path):
    img = (_tiles(0, 1)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "t.png")
    norm = create_norm("macenko", target=str(tmp_path / "t.png"))
    assert isinstance(norm, ClassicalNorm) and norm.is_fitted


def test_mosaic_and_tissue_fraction():
    tiles = list(_tiles(0, 5))
    m = training_mosaic(tiles, labels=[0, 1, 2, 0, 1], n=4)
    assert m.shape == (1, 3, 96, 96)
    assert tissue_fraction(torch.full((1, 3, 8, 8), 0.96)).item() == 0.0
    assert tissue_fraction(_tiles(0, 1, cls=2)).item() > 0.5


def test_real_tiles_macenko(shared_data):
    from lstainnorm.data.io import read_rgb

    files = sorted((shared_data / "monuseg-train" / "images").glob("*.png"))[:4]
    crops = [torch.from_numpy(read_rgb(f)[:128, :128].copy()).permute(2, 0, 1).float() / 255 for f in files]
    norm = ClassicalNorm("macenko", target=crops[0].unsqueeze(0))
    out = norm(torch.stack(crops[1:]))
    assert torch.isfinite(out).all() and norm.fallbacks == 0
    ref = _lab_mean(crops[0].unsqueeze(0))
    assert (_lab_mean(out) - ref).norm() < (_lab_mean(torch.stack(crops[1:])) - ref).norm()


def test_randstainna_statistics_and_reproducibility():
    x = torch.cat([_tiles(c, 4) for c in range(4)])
    st = stain_statistics(x)
    assert st["n_images"] == 16
    lab = get_space("lab").to_space(x)
    from lstainnorm.layers.tissue import channel_stats, tissue_mask

    mean, _ = channel_stats(lab, weight=tissue_mask(x))
    assert st["lab"]["mu_mean"] == pytest.approx(mean.flatten(1).mean(0).tolist(), rel=1e-4)
    aug = RandStainNA(st)
    a, b, c = aug(x[:4], seed=(0, 1, 2)), aug(x[:4], seed=(0, 1, 2)), aug(x[:4], seed=(0, 1, 3))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    assert (a - x[:4]).abs().mean() > 0.01
    # Statistics over tissue, as the template's: glass stays glass.
    glass = torch.ones(2, 3, 48, 48) * 0.94
    glass[:, :, 20:28, 20:28] = torch.tensor([0.5, 0.2, 0.5]).view(1, 3, 1, 1)
    g = aug(glass, seed=0)
    assert (g - glass)[:, :, :10, :10].abs().max() < 0.02


def test_hed_jitter():
    x = _tiles(0, 4)
    j = HEDJitter(0.05)
    a, b = j(x, seed=5), j(x, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, j(x, seed=6))
    assert 0.0 < (a - x).abs().mean() < 0.1
    with pytest.raises(ValueError):
        HEDJitter(1.5)


@pytest.mark.slow
def test_training_with_macenko_and_randstainna(tmp_path):
    from lstainnorm.config import make_config
    from lstainnorm.data.synthetic import write_synthetic
    from lstainnorm.tasks.train import RUN_DIR_ENV, train

    synth = tmp_path / "s"
    write_synthetic(synth, centres=2, per_class=6, size=32, classes=2, workers=1, progress=False)
    base = {"data": {"manifest": str(synth / "manifest.csv"), "train_centres": ["A"], "batch_size": 8}, "model": {"backbone": "test_resnet"}, "trainer": {"max_epochs": 1, "accelerator": "cpu", "progress": False}, "output_path": str(tmp_path / "runs")}
    os.environ.pop(RUN_DIR_ENV, None)
    cfg, _ = make_config(base, ["norm.mode=macenko"])
    res = train(cfg)
    assert (tmp_path / "runs").exists() and res["norm_fallbacks"]["train"]["method"] == "macenko"
    assert os.path.isfile(os.path.join(res["run_dir"], "classical_target.png"))
    os.environ.pop(RUN_DIR_ENV, None)
    cfg, _ = make_config(base, ["norm.mode=reinhard"])  # fitted to the training tiles' statistics
    res = train(cfg)
    fitted = yaml.safe_load(open(os.path.join(res["run_dir"], "classical_target.yaml")))
    assert fitted["n_tiles"] > 0 and len(fitted["lab_mean"]) == 3
    os.environ.pop(RUN_DIR_ENV, None)
    cfg, _ = make_config(base, ["norm.mode=none", "data.augment=randstainna"])
    res = train(cfg)
    assert os.path.isfile(os.path.join(res["run_dir"], "randstainna.yaml"))
    os.environ.pop(RUN_DIR_ENV, None)


@pytest.mark.slow
def test_bench_commands_produce_tables(tmp_path):
    from bench import main  # benchmarks/bench.py

    assert main(["speed", "--n", "4", "--size", "32", "--repeats", "1", "--no-compile", "--slow-n", "1", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "speed.md").read_text()
    assert "| LStainNorm | eager |" in text and "torchstain Macenko" in text and "End to end" in text
    data = json.loads((tmp_path / "speed.json").read_text())
    assert any(r["method"] == "torch-staintools Vahadane" and r["ms_per_tile"] for r in data["rows"])
    assert main(["accuracy", "--out", str(tmp_path), "--methods", "none", "reinhard", "--seeds", "0", "--epochs", "1", "--per-class", "4", "--size", "32", "--backbone", "test_resnet"]) == 0
    acc = (tmp_path / "accuracy" / "accuracy.md").read_text()
    assert "| none |" in acc and "| reinhard |" in acc
