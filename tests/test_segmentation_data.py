import numpy as np
import pytest
import tifffile
from PIL import Image

from lstainnorm.data.segmentation import (
    SegmentationDataset,
    collate_segmentation,
    load_pair,
    monuseg_records,
    pair_images_masks,
    read_split_file,
    split_records,
)


def _pairs(root, n=3, size=40, binary=True):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"t{i}.png")
        m = np.zeros((size, size), np.uint16)
        m[5:12, 5:12] = 1
        m[20:30, 22:28] = 2
        if binary:
            Image.fromarray(((m > 0) * 255).astype(np.uint8)).save(root / "masks" / f"t{i}.png")
        else:
            tifffile.imwrite(root / "masks" / f"t{i}.tif", m)
    return root


def test_pairs_by_stem_binary_and_instance(tmp_path):
    root = _pairs(tmp_path / "b")
    recs = pair_images_masks(root / "images", root / "masks")
    assert [r.name for r in recs] == ["t0", "t1", "t2"]
    img, lab = load_pair(recs[0])
    assert img.shape == (40, 40, 3) and lab.max() == 2  # binary mask labelled into 2 instances
    root2 = _pairs(tmp_path / "i", binary=False)
    recs2 = pair_images_masks(root2 / "images", root2 / "masks")
    assert load_pair(recs2[0])[1].max() == 2 and recs2[0].mask.endswith(".tif")


def test_missing_mask_names_both(tmp_path):
    root = _pairs(tmp_path / "p")
    (root / "masks" / "t1.png").unlink()
    with pytest.raises(ValueError, match=r"t1.png has no mask: expected .*masks/t1.png"):
        pair_images_masks(root / "images", root / "masks")


def test_size_mismatch_names_both(tmp_path):
    root = _pairs(tmp_path / "p")
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(root / "masks" / "t0.png")
    recs = pair_images_masks(root / "images", root / "masks")
    with pytest.raises(ValueError, match=r"40x20 of .*masks/t0.png does not match image size 40x40 of .*images/t0.png"):
        load_pair(recs[0])


def test_training_crops_and_eval_whole(tmp_path):
    root = _pairs(tmp_path / "p")
    recs = pair_images_masks(root / "images", root / "masks")
    train = SegmentationDataset(recs, crop=16, augment=True, samples_per_image=4)
    assert len(train) == 12
    batch = collate_segmentation([train[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 1, 16, 16)
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    ev = SegmentationDataset(recs)
    assert len(ev) == 3 and ev[0]["image"].shape == (3, 40, 40)
    with pytest.raises(ValueError, match="crop 64 is larger"):
        SegmentationDataset(recs, crop=64)


def test_split_file_and_column(tmp_path):
    root = _pairs(tmp_path / "p")
    recs = pair_images_masks(root / "images", root / "masks")
    (tmp_path / "s.csv").write_text("name,split\nt0,train\nt1,val\nt2,test\n")
    assert [r.name for r in split_records(recs, "test", split_file=tmp_path / "s.csv")] == ["t2"]
    (tmp_path / "bad.csv").write_text("name,split\nt0,dev\n")
    with pytest.raises(ValueError, match="unknown splits"):
        read_split_file(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="no metadata column 'tss_code'"):
        split_records(recs, "train", column="tss_code")


def test_monuseg_real_data(shared_data):
    recs = monuseg_records(shared_data / "monuseg-train")
    assert len(recs) == 30
    assert all(r.centre for r in recs)
    assert len({r.centre for r in recs}) == 18
    img, lab = load_pair(recs[0])
    assert img.shape == (1000, 1000, 3) and lab.max() > 10
    held = sorted({r.centre for r in recs})[:3]
    test = split_records(recs, "test", column="tss_code", test_values=held)
    train = split_records(recs, "train", column="tss_code", test_values=held)
    assert test and train and not ({r.centre for r in test} & {r.centre for r in train})
