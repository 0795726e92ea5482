"""Applying a layer: slides tile by tile, folders (resume, shards, bad inputs), export, report."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from lstainnorm import LStainNorm, StainNorm
from lstainnorm.apply.export import export_norm, norm_metadata
from lstainnorm.apply.folders import list_inputs, normalize_path, shard_files
from lstainnorm.apply.slides import SlideReader, iter_normalized_tiles, normalize_slide, normalize_windowed, slide_statistics
from lstainnorm.cli import main
from lstainnorm.data.synthetic import SyntheticHE


def _big_image(h=300, w=260, seed=0):
    gen = SyntheticHE(size=96, seed=seed)
    tiles = [gen.render(k % 6, k % 4, k)[0] for k in range(16)]
    rows = [np.concatenate(tiles[r * 4 : r * 4 + 4], axis=1) for r in range(4)]
    mosaic = np.concatenate(rows, axis=0)  # 384 x 384
    img = np.tile(mosaic, (h // 384 + 1, w // 384 + 1, 1))[:h, :w].copy()
    img[:40, :60] = 242  # some glass
    return img


def _perturbed(norm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return norm.eval()


@pytest.mark.parametrize("make", [lambda: StainNorm("lab"), lambda: LStainNorm()])
def test_tile_by_tile_equals_whole_with_slide_statistics(make):
    norm = _perturbed(make())
    img = _big_image()
    reader = SlideReader(array=img)
    stats = slide_statistics(norm, reader, tile=128)
    whole = normalize_windowed(norm, torch.from_numpy(img).permute(2, 0, 1).float().div(255)[None], stats, window=64)
    assembled = torch.empty_like(whole)
    for x, y, t in iter_normalized_tiles(norm, reader, stats, tile=128, window=64):
        assembled[..., y : y + t.shape[-2], x : x + t.shape[-1]] = t
    assert torch.allclose(assembled, whole, atol=1e-5)
    # The slide statistics are the tissue pixels' statistics of the whole image.
    x = torch.from_numpy(img).permute(2, 0, 1).float().div(255)[None]
    from lstainnorm.layers.tissue import channel_stats, tissue_mask

    sp = norm.space if isinstance(norm, StainNorm) else norm.branches["lab"].space
    mean, _ = channel_stats(sp.to_space(x), weight=tissue_mask(x))
    assert torch.allclose(stats[sp.name][0], mean, atol=1e-3)


def test_tile_must_hold_whole_windows():
    with pytest.raises(ValueError, match="multiple of the window"):
        list(iter_normalized_tiles(LStainNorm(), SlideReader(array=_big_image()), {}, tile=100, window=64))


def test_slide_to_pyramidal_tiff(tmp_path):
    norm = _perturbed(LStainNorm())
    img = _big_image(700, 600)
    src = tmp_path / "slide.tif"
    tifffile.imwrite(src, img, tile=(256, 256), photometric="rgb")
    info = normalize_slide(norm, src, tmp_path / "out.tif", tile=512, window=64, compression="zlib", stats_downsample=1.0, progress=False)
    assert info["levels"] >= 2
    with tifffile.TiffFile(tmp_path / "out.tif") as tf:
        page = tf.pages[0]
        assert page.is_tiled and page.shape == (700, 600, 3)
        assert len(tf.pages) == info["levels"] and tf.pages[1].shape == (350, 300, 3)  # the pyramid
        level0 = page.asarray()
    with SlideReader(src) as r:
        stats = slide_statistics(norm, r, tile=512)
    ref = normalize_windowed(norm, torch.from_numpy(img).permute(2, 0, 1).float().div(255)[None], stats, window=64)
    ref8 = (ref[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.abs(level0.astype(int) - ref8.astype(int)).max() <= 1
    import openslide

    with openslide.OpenSlide(str(tmp_path / "out.tif")) as s:
        assert s.dimensions == (600, 700) and s.level_count >= 2
    assert not list(tmp_path.glob(".tmp-*"))


def _folder(tmp_path):
    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    gen = SyntheticHE(size=40)
    for i in range(5):
        Image.fromarray(gen.render(i % 6, i % 4, i)[0]).save(root / ("a" if i % 2 else "a/b") / f"t{i}.png")
    rgba = np.dstack([gen.render(0, 1, 9)[0], np.full((40, 40), 255, np.uint8)])
    rgba[:10, :10, 3] = 0
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG broken")
    return root


def test_folder_layout_rgba_corrupt_and_never_overwrite(tmp_path):
    root = _folder(tmp_path)
    norm = StainNorm("lab", learnable=False)
    with pytest.warns(UserWarning, match="broken.png"):
        res = normalize_path(norm, root, tmp_path / "out", progress=False)
    assert len(res["written"]) == 6 and len(res["skipped"]) == 1
    assert (tmp_path / "out" / "a" / "b" / "t0.png").is_file() and (tmp_path / "out" / "rgba.png").is_file()
    out = np.asarray(Image.open(tmp_path / "out" / "rgba.png"))
    assert out.shape == (40, 40, 3)
    with pytest.raises(ValueError, match="must not be INPUT or lie inside it"):
        normalize_path(norm, root, root / "sub", progress=False)
    with pytest.raises(ValueError, match="must not be INPUT"):
        normalize_path(norm, root, root, progress=False)


class _Interrupting(torch.nn.Module):
    def __init__(self, norm, after):
        super().__init__()
        self.norm, self.after, self.calls = norm, after, 0

    def forward(self, x, **kw):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt("simulated")
        return self.norm(x, **kw)


def test_resume_after_interruption_leaves_valid_outputs(tmp_path):
    root = _folder(tmp_path)
    (root / "a" / "broken.png").unlink()
    norm = StainNorm("hsv", learnable=False)
    with pytest.raises(KeyboardInterrupt):
        normalize_path(_Interrupting(norm, 3), root, tmp_path / "out", progress=False)
    first = sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != ".lstainnorm-normalize.json")
    assert len(first) == 3 and not [p for p in first if p.name.startswith(".tmp-")]
    for p in first:
        Image.open(p).load()  # complete, valid images
    mtimes = {p: p.stat().st_mtime_ns for p in first}
    res = normalize_path(_Interrupting(norm, 10**6), root, tmp_path / "out", progress=False)  # the same settings
    assert res["already_done"] == 3 and len(res["written"]) == 3
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert len([p for p in (tmp_path / "out").rglob("*.png")]) == 6


def test_shards_cover_every_file_exactly_once(tmp_path):
    root = _folder(tmp_path)
    files = list_inputs(root)
    parts = [shard_files(files, (k, 3)) for k in (1, 2, 3)]
    flat = [f for p in parts for f in p]
    assert sorted(flat) == sorted(files) and len(flat) == len(set(flat))
    norm = StainNorm("rgb", learnable=False)
    with pytest.warns(UserWarning, match="skipping unreadable input.*broken.png") as caught:
        for k in (1, 2, 3):
            assert main(["normalize", "--template", str(_template(tmp_path)), "--space", "rgb", str(root), str(tmp_path / "o"), "--shard", f"{k}/3"]) == 0
    assert len(caught) == 1  # the unreadable file is in one shard only
    assert len(list((tmp_path / "o").rglob("*.png"))) == 6  # 7 files, one unreadable
    with pytest.raises(ValueError, match="K/N"):
        shard_files(files, (4, 3))
    del norm


def _template(tmp_path):
    from lstainnorm import Template

    p = tmp_path / "t.yaml"
    if not p.is_file():
        Template({"rgb": ([0.7, 0.5, 0.65], [0.1, 0.1, 0.1]), "lab": ([60, 20, -8], [12, 6, 5])}).save(p)
    return p


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
@pytest.mark.parametrize(
    "make", [lambda: LStainNorm(spaces=("lab", "hsv", "rgb", "hed")), lambda: StainNorm("hsv"), lambda: LStainNorm(fusion="mean")]
)
def test_export_parity(tmp_path, suffix, make):
    norm = _perturbed(make(), seed=3)
    info = export_norm(norm, tmp_path / f"n{suffix}")
    assert info["max_abs_difference"] < 1e-4
    x = torch.rand(3, 3, 45, 61) * 0.8 + 0.1
    with torch.no_grad():
        ref = norm(x)
    if suffix == ".onnx":
        import onnxruntime as ort

        got = torch.from_numpy(ort.InferenceSession(str(tmp_path / "n.onnx")).run(None, {"rgb": x.numpy()})[0])
    else:
        got = torch.jit.load(str(tmp_path / "n.pt"))(x)
    assert torch.allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_exported_files_carry_their_provenance(tmp_path, suffix):
    from lstainnorm.apply.export import config_hash, read_metadata

    norm = _perturbed(LStainNorm(), seed=5)
    cfg = {"norm": {"mode": "lstainnorm"}, "seed": 3}
    meta = norm_metadata(norm, cfg, run=tmp_path / "runs" / "20261126_000000_x")
    export_norm(norm, tmp_path / f"n{suffix}", metadata=meta)
    got = read_metadata(tmp_path / f"n{suffix}")
    assert got["layer"] == "LStainNorm" and got["spaces"] == ["lab", "hsv", "rgb"]
    assert got["run"] == "20261126_000000_x" and got["config_sha256"] == config_hash(cfg) != config_hash({**cfg, "seed": 4})
    assert got["lstainnorm_version"] and got["lstainnorm_version"] != "unknown"
    tpl = norm.template()
    for space, (mu, sigma) in tpl.stats.items():
        assert got["template"][f"mu0_{space}"] == pytest.approx(list(mu))
        assert got["template"][f"sigma0_{space}"] == pytest.approx(list(sigma))
    assert got["fusion_weights"]["hsv"]["a"] == pytest.approx(tpl.fusion["hsv"]["a"])
    if suffix == ".onnx":  # what onnxruntime users see
        import onnxruntime as ort

        custom = ort.InferenceSession(str(tmp_path / "n.onnx")).get_modelmeta().custom_metadata_map
        assert custom["layer"] == "LStainNorm" and "template" in custom


def test_read_metadata_refuses_foreign_files(tmp_path):
    from lstainnorm.apply.export import read_metadata

    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="without lstainnorm metadata"):
        read_metadata(tmp_path / "other.pt")
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="neither an ONNX nor a TorchScript"):
        read_metadata(tmp_path / "junk.onnx")
    with pytest.raises(FileNotFoundError, match="no such exported file"):
        read_metadata(tmp_path / "missing.onnx")


@pytest.mark.skipif(os.name != "posix", reason="stale temporary files are only swept on POSIX (pid liveness check)")
def test_export_removes_what_a_killed_export_left_beside_it(tmp_path):
    from conftest import killed_writer_temp

    left = killed_writer_temp(tmp_path, "n.onnx")
    (tmp_path / "sub").mkdir()
    deeper = killed_writer_temp(tmp_path / "sub", "m.onnx")
    export_norm(StainNorm(), tmp_path / "n.onnx")
    assert not left.exists() and (tmp_path / "n.onnx").is_file()
    assert deeper.exists()  # the user's folder is not walked


def test_export_rejects_what_it_cannot_export(tmp_path):
    with pytest.raises(ValueError, match="tissue_stats"):
        export_norm(LStainNorm(tissue_stats=True), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="unsupported export format"):
        export_norm(StainNorm(), tmp_path / "x.zip")


@pytest.mark.slow
def test_cli_export_report_and_normalize_from_a_run(tmp_path, capsys):
    from lstainnorm.config import make_config
    from lstainnorm.data.synthetic import write_synthetic
    from lstainnorm.tasks.train import RUN_DIR_ENV, train

    synth = tmp_path / "s"
    write_synthetic(synth, centres=2, per_class=6, size=32, classes=3, workers=1, progress=False)
    os.environ.pop(RUN_DIR_ENV, None)
    cfg, _ = make_config({"data": {"manifest": str(synth / "manifest.csv"), "train_centres": ["A"], "batch_size": 8}, "model": {"backbone": "test_resnet"}, "norm": {"lr": 0.05}, "trainer": {"max_epochs": 2, "accelerator": "cpu", "progress": False}, "output_path": str(tmp_path / "runs")})
    run = train(cfg)["run_dir"]
    os.environ.pop(RUN_DIR_ENV, None)
    assert main(["export", run, "-o", str(tmp_path / "norm.onnx")]) == 0
    assert main(["export", run, "-o", str(tmp_path / "norm.pt")]) == 0
    capsys.readouterr()
    assert main(["export", "--info", str(tmp_path / "norm.onnx")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["run"] == Path(run).name and len(info["config_sha256"]) == 64 and info["spaces"] == ["lab", "hsv", "rgb"]
    assert main(["report", run]) == 0
    report = Path(run) / "report"
    page = (report / "index.html").read_text()
    for name in ("template_bars.png", "template_swatches.png", "template_trajectory.png", "fusion_weights.png", "sample_tiles.png", "curves.png"):
        assert name in page and (report / name).is_file()
        arr = np.asarray(Image.open(report / name).convert("L"), dtype=float)
        assert arr.std() > 5, f"{name} looks blank"
    assert main(["normalize", "--run", run, str(synth / "B"), str(tmp_path / "nb")]) == 0
    assert len(list((tmp_path / "nb").rglob("*.png"))) == len(list((synth / "B").rglob("*.png")))
