"""norm.stats_by: colour statistics pooled per centre or group instead of per tile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_mitosis import COLUMNS, write_amibr

from lstainnorm import LStainNorm, StainNorm
from lstainnorm.config import ConfigError, make_config
from lstainnorm.data.tiles import TileFolder, collate_tiles
from lstainnorm.layers.norm import PooledStats, space_stats
from lstainnorm.layers.tissue import tissue_mask
from lstainnorm.layers.fusion import norm_spaces
from lstainnorm.tasks.group_stats import WithGroupStats, group_statistics, with_group_stats


def _images(n: int = 3, size: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.6 * torch.rand(n, 3, size, size, generator=g)
    x[:, :, :, :4] = 0.95  # some glass
    return x


@pytest.mark.parametrize("tissue", [False, True])
def test_pooled_stats_are_the_statistics_of_all_pixels_together(tissue):
    """Pooling several images equals the layer's statistics of one image holding all their pixels."""
    x = _images()
    norm = LStainNorm()
    pooled = PooledStats(norm_spaces(norm), tissue=tissue)
    pooled.add(x[:2])
    pooled.add(x[2:])
    together = torch.cat(list(x), dim=-1).unsqueeze(0)  # (1, 3, H, 3W)
    got = pooled.result()
    for sp in norm_spaces(norm):
        mask = tissue_mask(together) if tissue else None
        mean, sd = space_stats(sp.to_space(together), sp, mask)
        assert torch.allclose(got[sp.name][0], mean, atol=1e-4, rtol=1e-5), sp.name
        assert torch.allclose(got[sp.name][1], sd, atol=1e-4, rtol=1e-5), sp.name
    assert (0.0 < pooled.tissue_fraction < 1.0) if tissue else pooled.tissue_fraction == 0.0  # glass is not tissue
    with pytest.raises(ValueError, match="no pixels"):
        PooledStats(norm_spaces(norm)).result()


def test_one_image_pooled_is_the_layers_own_statistics():
    x = _images(1)
    layer = StainNorm("lab")
    pooled = PooledStats(norm_spaces(layer), tissue=False)
    pooled.add(x)
    mean, sd = layer.image_stats(x)
    assert torch.allclose(pooled.result()["lab"][0], mean, atol=1e-4)
    assert torch.allclose(pooled.result()["lab"][1], sd, atol=1e-4)
    assert torch.allclose(layer(x, stats=pooled.result()["lab"]), layer(x), atol=1e-5)


def test_pooled_statistics_keep_the_differences_between_tiles_of_a_centre():
    """Per-tile standardisation erases a tile being darker than its centre's others; statistics pooled
    over the centre keep it (the point of the option: a mitotic figure darkens its own crop)."""
    x = _images(1)
    pair = torch.cat([x, x * 0.7])  # the same tile, and a darker copy, from one centre
    layer = StainNorm("lab", learnable=False)
    own = layer(pair)
    assert (own[0] - own[1]).abs().mean() < 0.02  # per tile: nearly the same image
    pooled = PooledStats(norm_spaces(layer), tissue=False)
    pooled.add(pair)
    mean, sd = pooled.result()["lab"]
    out = layer(pair, stats=(mean.expand(2, 3, 1, 1), sd.expand(2, 3, 1, 1)))
    assert out[1].mean() < out[0].mean() - 0.05  # the darker tile stays darker


@pytest.fixture(scope="module")
def amibr(tmp_path_factory) -> Path:
    return write_amibr(tmp_path_factory.mktemp("amibr_stats"), crops_per_slide=3, size=24)


def test_group_statistics_per_centre_and_per_group_reach_the_batch(amibr):
    ds = TileFolder.from_manifest(amibr, split="train", columns=COLUMNS)
    norm = LStainNorm()
    by_centre = group_statistics(ds, norm, "centre")
    assert set(by_centre) == set(ds.centres) and len(by_centre) == 4
    centre = ds.centres[0]
    own = PooledStats(norm_spaces(norm), tissue=False)
    own.add(torch.stack([ds[i]["image"] for i in range(len(ds)) if ds.centres[i] == centre]))
    for s, (m, sd) in own.result().items():
        assert torch.allclose(by_centre[centre][s][0], m) and torch.allclose(by_centre[centre][s][1], sd)
    assert len(group_statistics(ds, norm, "group")) == len(set(ds.groups)) == 12
    wrapped = with_group_stats(ds, norm, "centre")
    assert isinstance(wrapped, WithGroupStats) and wrapped.centres == ds.centres and len(wrapped) == len(ds)
    assert with_group_stats(ds, norm, None) is ds
    batch = collate_tiles([wrapped[i] for i in range(5)])
    assert set(batch["stats"]) == {"lab", "hsv", "rgb"}
    assert batch["stats"]["lab"][0].shape == (5, 3, 1, 1)
    out = norm(batch["image"], stats=batch["stats"])
    assert out.shape == batch["image"].shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="invalid value 'slide'"):
        group_statistics(ds, norm, "slide")
    with pytest.raises(TypeError, match="StainNorm or LStainNorm"):
        norm_spaces(torch.nn.Identity())


def test_a_tile_without_a_group_is_a_clear_error(amibr):
    no_group = {k: v for k, v in COLUMNS.items() if k != "group"}
    ds = TileFolder.from_manifest(amibr, split="train", columns=no_group)
    with pytest.raises(ValueError, match=r"crop_\d+\.png has no group"):
        group_statistics(ds, StainNorm("lab"), "group")


@pytest.mark.parametrize("overrides, match", [
    (["norm.stats_by=slide"], "norm.stats_by: invalid value"),
    (["norm.mode=none", "norm.stats_by=centre"], "norm.mode template, learnable or lstainnorm"),
    (["norm.mode=lstainnorm", "norm.stain_first=true", "norm.stats_by=centre"], "without norm.stain_first"),
    (["task=segmentation", "norm.mode=template", "norm.stats_by=centre"], "for classification tiles"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        make_config({}, overrides)


def test_method_names_pool_per_centre():
    from lstainnorm.experiments.runner import method_overrides

    assert method_overrides("template@centre", Path("c")) == ["norm.mode=template", "norm.stats_by=centre"]
    assert method_overrides("lstainnorm-frozen@centre", Path("c"))[-1] == "norm.stats_by=centre"
    with pytest.raises(ValueError, match="@centre pools"):
        method_overrides("macenko@centre", Path("c"))


def test_train_and_evaluate_with_statistics_per_centre(amibr, tmp_path, monkeypatch, capsys):
    """A run with norm.stats_by=centre trains, tests per centre, and `evaluate` pools the evaluated tiles' own statistics."""
    from lstainnorm.runs import RUN_DIR_ENV
    from lstainnorm.tasks.evaluate import evaluate
    from lstainnorm.tasks.train import train

    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    raw = {"output_path": str(tmp_path / "runs"), "data": {"manifest": str(amibr), "columns": dict(COLUMNS), "batch_size": 8},
           "model": {"backbone": "test_resnet"}, "norm": {"mode": "template", "stats_by": "centre"},
           "trainer": {"max_epochs": 1, "accelerator": "cpu", "progress": False, "monitor": "val/bal_acc"}}
    cfg, notes = make_config(raw, [])
    res = train(cfg, notes)
    run = Path(res["run_dir"])
    log = (run / "train.log").read_text()
    assert "norm.stats_by=centre: tiles standardised by the statistics of their centre (train 4, validation" in log
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["test"]["per_centre"]) == 4
    assert (run / "normalization.png").is_file()  # drawn with the tiles' pooled statistics
    ev = evaluate(run, amibr, split="test", progress=False)
    assert ev["overall"]["bal_acc"] == pytest.approx(metrics["test"]["overall"]["bal_acc"])
    # the module runs its layer on the batch's pooled statistics, not on each tile's own
    from lstainnorm.runs import load_norm
    from lstainnorm.tasks.evaluate import evaluation_data, load_module

    module = load_module(run).eval()
    ds, collate, _ = evaluation_data(module, amibr, split="test")
    batch = collate([with_group_stats(ds, module.norm, "centre")[i] for i in range(6)])
    with torch.no_grad():
        pooled_out, own_out = module.model_for(batch)(batch["image"]), module.model(batch["image"])
        expected = module.net(module.norm(batch["image"], stats=batch["stats"]["lab"]))
    assert torch.allclose(pooled_out, expected) and not torch.allclose(pooled_out, own_out)
    with pytest.warns(UserWarning, match="trained with norm.stats_by=centre"):
        load_norm(run)
