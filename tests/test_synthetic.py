import csv
import json

import numpy as np
import pytest
import torch

from lstainnorm.layers.color import rgb_to_lab
from lstainnorm.data.synthetic import CLASSES, SyntheticHE, SyntheticTiles, split_counts, write_synthetic


def test_deterministic_same_seed_same_bytes():
    a = SyntheticHE(seed=3).render(2, 1, 5)
    b = SyntheticHE(seed=3).render(2, 1, 5)
    c = SyntheticHE(seed=4).render(2, 1, 5)
    assert a[0].tobytes() == b[0].tobytes() and np.array_equal(a[1], b[1])
    assert a[0].tobytes() != c[0].tobytes()


def test_shapes_dtypes_ranges():
    gen = SyntheticHE(size=64)
    for k in range(gen.n_classes):
        rgb, nuc = gen.render(k, 0, 0)
        assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
        assert nuc.shape == (64, 64) and nuc.dtype == bool
        assert 20 < rgb.mean() < 250  # neither black nor blank
    assert len(gen.classes) == 6 and gen.classes[0] == "tumour"
    assert [c for c, _ in CLASSES][:3] == ["tumour", "stroma", "lymphocytes"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_classes"):
        SyntheticHE(n_classes=9)
    with pytest.raises(ValueError, match="n_centres"):
        SyntheticHE(n_centres=0)
    with pytest.raises(ValueError, match="cls must be"):
        SyntheticHE().render(7, 0, 0)
    with pytest.raises(ValueError, match="per_class"):
        split_counts(2)


def _lab_means(gen, centre, n=6):
    out = []
    for k in range(gen.n_classes):
        for i in range(n):
            rgb = gen.render(k, centre, i, "test")[0]
            x = torch.from_numpy(rgb).permute(2, 0, 1).float().unsqueeze(0) / 255
            out.append(rgb_to_lab(x).mean(dim=(2, 3))[0])
    return torch.stack(out).mean(0)


def test_centres_differ_in_colour():
    """Every pair of centres differs by more than 8 Delta-E (CIE76) in mean tissue colour."""
    gen = SyntheticHE(size=64)
    means = [_lab_means(gen, c) for c in range(gen.n_centres)]
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            assert (means[i] - means[j]).norm() > 8.0, (gen.centre_names[i], gen.centre_names[j])


def test_morphology_independent_of_centre():
    """Nuclear area fraction per class: separated between classes, the same at every centre."""
    gen = SyntheticHE(size=96)
    frac = np.zeros((gen.n_centres, gen.n_classes))
    for c in range(gen.n_centres):
        for k in range(gen.n_classes):
            frac[c, k] = np.mean([gen.render(k, c, i, "train")[1].mean() for i in range(8)])
    spread = frac.max(0) - frac.min(0)
    assert (spread < 0.05).all(), spread  # tolerance across centres
    means = frac.mean(0)
    name = dict(zip(gen.classes, means))
    assert name["lymphocytes"] > 3 * name["stroma"]
    assert name["tumour"] > 3 * name["adipose"] + 0.1


def test_in_memory_dataset():
    gen = SyntheticHE(size=48)
    ds = SyntheticTiles(gen, "val", per_class=10, centres=["B", 2])
    assert len(ds) == 2 * 6 * split_counts(10)["val"]
    item = ds[0]
    assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert set(ds.centres) == {"B", "C"}
    with pytest.raises(ValueError, match="unknown centre 'Z'"):
        SyntheticTiles(gen, "val", per_class=10, centres=["Z"])


def test_write_synthetic_tree_manifest_and_resume(tmp_path):
    out = tmp_path / "synth"
    manifest = write_synthetic(out, centres=2, per_class=5, size=32, seed=1, workers=1, progress=False)
    rows = list(csv.DictReader(open(manifest)))
    assert len(rows) == 2 * 6 * 5
    assert set(rows[0]) == {"path", "class", "centre", "split"}
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    first = out / rows[0]["path"]
    assert first.is_file() and first.parts[-4:-1] == ("A", rows[0]["split"], rows[0]["class"])
    before = first.read_bytes()
    mtime = first.stat().st_mtime_ns
    first.with_name("partial.png").write_bytes(b"")  # unrelated junk is left alone
    (out / rows[1]["path"]).unlink()  # an interrupted run: one tile missing
    write_synthetic(out, centres=2, per_class=5, size=32, seed=1, workers=2, progress=False)
    assert (out / rows[1]["path"]).is_file()
    assert first.stat().st_mtime_ns == mtime and first.read_bytes() == before  # kept, not rewritten
    assert not list(out.rglob(".tmp-*"))


def test_monuseg_preset_centres_differ_like_real_hospitals(tmp_path):
    """The measured preset: the H/E ratio (scale_h / scale_e) varies over 2x between centres,
    the hand-made centres by less than 1.2x; the preset is recorded and a wrong name is refused."""
    from lstainnorm.data.synthetic import CENTRE_PRESETS, DEFAULT_CENTRES, MONUSEG_CENTRES

    ratio = lambda cs: [c.scale_h / c.scale_e for c in cs]  # noqa: E731
    assert max(ratio(MONUSEG_CENTRES)) / min(ratio(MONUSEG_CENTRES)) > 2.0
    assert max(ratio(DEFAULT_CENTRES)) / min(ratio(DEFAULT_CENTRES)) < 1.2
    assert [c.name for c in MONUSEG_CENTRES] == ["A", "B", "C", "D"] and CENTRE_PRESETS["monuseg"] is MONUSEG_CENTRES
    write_synthetic(tmp_path / "m", centres=2, per_class=3, size=32, classes=2, workers=1, progress=False, preset="monuseg")
    assert json.loads((tmp_path / "m" / "synthetic.json").read_text())["preset"] == "monuseg"
    gen_d, gen_m = SyntheticHE(n_classes=2, size=32), SyntheticHE(n_classes=2, size=32, centres=MONUSEG_CENTRES)
    assert not np.array_equal(gen_d.render(0, 1, 0)[0], gen_m.render(0, 1, 0)[0])  # same morphology, other colours
    with pytest.raises(ValueError, match="preset must be one of"):
        write_synthetic(tmp_path / "x", preset="real", progress=False)
