import warnings

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lstainnorm.data.io import ImageReadError, read_mask, read_rgb, to_uint8_rgb, write_image
from lstainnorm.data.tiles import TileFolder, collate_tiles, load_class_map, save_class_map, stratified_split


def _tree(root, classes=("ADI", "TUM"), n=3, size=16):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{c}_{i}.png")
    return root


def test_decodes_every_kind_of_image(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent: glass
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((4, 4), 100, np.uint8), "L").save(tmp_path / "grey.png")
    Image.fromarray(np.full((4, 4), 3, np.uint8), "L").convert("P").save(tmp_path / "pal.png")
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "grey16.png")
    tifffile.imwrite(tmp_path / "rgb16.tif", np.full((4, 4, 3), 32896, np.uint16), photometric="rgb")
    Image.fromarray(np.full((4, 4, 3), 50, np.uint8)).save(tmp_path / "x.jpg")
    Image.fromarray(np.full((4, 4, 3), 70, np.uint8)).save(tmp_path / "x.bmp")
    assert (read_rgb(tmp_path / "rgba.png") == 255).all()  # composited on white
    assert (read_rgb(tmp_path / "grey.png") == 100).all()
    assert read_rgb(tmp_path / "pal.png").shape == (4, 4, 3)
    assert (read_rgb(tmp_path / "grey16.png") == 255).all()
    assert (read_rgb(tmp_path / "rgb16.tif") == 128).all()
    assert abs(int(read_rgb(tmp_path / "x.jpg").mean()) - 50) <= 2
    assert (read_rgb(tmp_path / "x.bmp") == 70).all()


def test_half_transparent_rgba_blends_with_white():
    a = np.zeros((1, 1, 4), np.uint8)
    a[..., 3] = 128
    assert to_uint8_rgb(a)[0, 0, 0] == 127


def test_corrupt_file_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageReadError, match="broken.png"):
        read_rgb(bad)


def test_tree_with_corrupt_file_skips_and_counts(tmp_path):
    root = _tree(tmp_path / "train")
    (root / "TUM" / "zz_corrupt.png").write_bytes(b"garbage")
    ds = TileFolder(root)
    assert ds.classes == ["ADI", "TUM"] and len(ds) == 7
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_tiles))
    skipped = [p for b in batches for p in b["skipped"]]
    assert len(skipped) == 1 and skipped[0].endswith("zz_corrupt.png")
    assert any("zz_corrupt.png" in str(x.message) for x in w)
    assert sum(len(b["label"]) for b in batches) == 6
    strict = TileFolder(root, strict=True)
    with pytest.raises(ImageReadError, match="zz_corrupt.png"):
        [strict[i] for i in range(len(strict))]


def test_mixed_formats_in_a_tree(tmp_path):
    root = _tree(tmp_path / "t", n=1)
    Image.fromarray(np.zeros((16, 16, 4), np.uint8), "RGBA").save(root / "ADI" / "a.png")
    Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(root / "ADI" / "b.tif")
    tifffile.imwrite(root / "TUM" / "c.tiff", np.zeros((16, 16, 3), np.uint16), photometric="rgb")
    ds = TileFolder(root)
    items = [ds[i] for i in range(len(ds))]
    assert all(it["image"].shape == (3, 16, 16) for it in items)


def test_structure_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        TileFolder(tmp_path / "missing")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(flat / "a.png")
    with pytest.raises(ValueError, match="no class folders.*one folder per class"):
        TileFolder(flat)
    root = _tree(tmp_path / "t")
    (root / "EMPTY").mkdir()
    with pytest.raises(ValueError, match="EMPTY holds no images"):
        TileFolder(root)


def test_train_test_class_mismatch(tmp_path):
    train = TileFolder(_tree(tmp_path / "train", ("ADI", "TUM")))
    test_root = _tree(tmp_path / "test", ("ADI", "STR"))
    with pytest.raises(ValueError, match=r"missing \['TUM'\], unexpected \['STR'\]"):
        TileFolder(test_root, classes=train.classes)


def test_manifest_adds_centres(tmp_path):
    root = _tree(tmp_path / "t", n=2)
    (tmp_path / "m.csv").write_text(
        "path,class,centre\n" + "".join(f"t/{c}/{c}_{i}.png,{c},H{i}\n" for c in ("ADI", "TUM") for i in range(2))
    )
    ds = TileFolder(root, manifest=tmp_path / "m.csv")
    assert sorted(set(ds.centres)) == ["H0", "H1"]
    ds2 = TileFolder.from_manifest(tmp_path / "m.csv", centres=["H1"])
    assert len(ds2) == 2 and ds2.classes == ["ADI", "TUM"]
    with pytest.raises(ValueError, match="no 'split' column"):
        TileFolder.from_manifest(tmp_path / "m.csv", split="train")


def test_stratified_split_is_seeded_and_stratified():
    labels = [0] * 10 + [1] * 20 + [2] * 2
    a_tr, a_va = stratified_split(labels, 0.2, seed=1)
    b_tr, b_va = stratified_split(labels, 0.2, seed=1)
    c_tr, c_va = stratified_split(labels, 0.2, seed=2)
    assert a_va == b_va and a_va != c_va
    assert sorted(a_tr + a_va) == list(range(32))
    per = [sum(1 for i in a_va if labels[i] == k) for k in range(3)]
    assert per == [2, 4, 1]
    with pytest.raises(ValueError):
        stratified_split(labels, 1.5)


def test_class_map_round_trip(tmp_path):
    save_class_map(tmp_path / "classes.json", ["a", "b"])
    assert load_class_map(tmp_path / "classes.json") == ["a", "b"]


def test_masks(tmp_path):
    Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).save(tmp_path / "bin.png")
    tifffile.imwrite(tmp_path / "inst.tif", np.array([[0, 7], [300, 0]], np.uint16))
    tifffile.imwrite(tmp_path / "float.tif", np.array([[0, 0.5], [1, 0]], np.float32))
    assert read_mask(tmp_path / "bin.png").max() == 255
    assert read_mask(tmp_path / "inst.tif").max() == 300
    with pytest.raises(ImageReadError, match="non-integer labels"):
        read_mask(tmp_path / "float.tif")


def test_write_image_atomic_png_tiff(tmp_path):
    arr = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    write_image(tmp_path / "a.png", arr)
    write_image(tmp_path / "a.tif", arr)
    write_image(tmp_path / "l.png", np.array([[0, 1000]], np.uint16))
    assert (read_rgb(tmp_path / "a.png") == arr).all() and (read_rgb(tmp_path / "a.tif") == arr).all()
    assert read_mask(tmp_path / "l.png").max() == 1000
    assert not list(tmp_path.glob(".tmp-*"))


def test_real_images_decode(shared_data):
    files = sorted((shared_data / "nct-crc-he-sample").glob("*.tif")) + sorted((shared_data / "stain-examples").glob("*.png"))
    assert files
    for f in files:
        a = read_rgb(f)
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3, f
