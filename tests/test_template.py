import pytest
import torch
import yaml
from conftest import he_like
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lstainnorm import LStainNorm, StainNorm, Template, estimate_template, load_template
from lstainnorm.layers.color import get_space
from lstainnorm.layers.template import REFERENCE_TEMPLATES, resolve_templates
from lstainnorm.layers.tissue import tissue_mask


def _manual(x, space):
    y = get_space(space).to_space(x)
    mean = y.mean(dim=(2, 3)).mean(0)
    std = y.std(dim=(2, 3)).mean(0)
    return mean, std


def test_tensor_source_matches_definition():
    x = he_like(6, 16, 16, seed=1)
    t = estimate_template(x, spaces=("lab", "hsv", "rgb", "hed"), tissue_mask=False, progress=False, batch_size=4)
    for s in ("lab", "hsv", "rgb", "hed"):
        mean, std = _manual(x, s)
        assert t[s][0] == pytest.approx(mean.tolist(), rel=1e-4, abs=1e-5)
        assert t[s][1] == pytest.approx(std.tolist(), rel=1e-4, abs=1e-5)
    assert t.meta["n_images"] == 6


class _PairDataset(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 2


def test_dataset_loader_and_tensor_agree():
    x = he_like(7, 12, 12, seed=2)
    a = estimate_template(x, progress=False)
    b = estimate_template(_PairDataset(x), progress=False, batch_size=3)
    c = estimate_template(DataLoader(TensorDataset(x, torch.zeros(7)), batch_size=2), progress=False)
    d = estimate_template(DataLoader(_PairDataset(x), batch_size=4), progress=False)
    u8 = estimate_template((x * 255).round().to(torch.uint8), progress=False)
    for other in (b, c, d):
        for s in a.spaces:
            assert other[s][0] == pytest.approx(a[s][0], rel=1e-5, abs=1e-6)
            assert other[s][1] == pytest.approx(a[s][1], rel=1e-5, abs=1e-6)
    assert u8["lab"][0] == pytest.approx(a["lab"][0], abs=0.3)


def test_mixed_sizes_in_a_dataset():
    imgs = [he_like(1, 10 + i, 12, seed=i)[0] for i in range(5)]
    t = estimate_template(imgs, progress=False)
    assert t.meta["n_images"] == 5


def test_tissue_mask_excludes_background():
    x = he_like(2, 16, 16, seed=3)
    padded = torch.ones(2, 3, 16, 32)
    padded[..., :16] = x  # half glass
    with_mask = estimate_template(padded, progress=False, tissue_mask=True)
    without = estimate_template(padded, progress=False, tissue_mask=False)
    tissue_only = estimate_template(x, progress=False, tissue_mask=True)
    assert with_mask["lab"][0][0] == pytest.approx(tissue_only["lab"][0][0], abs=0.05)
    assert without["lab"][0][0] > with_mask["lab"][0][0] + 5  # glass raises L*


def test_tissue_mask_function():
    x = torch.tensor([[0.95, 0.95, 0.95], [0.8, 0.5, 0.7], [0.01, 0.02, 0.01], [0.9, 0.7, 0.95]]).T.reshape(1, 3, 1, 4)
    assert tissue_mask(x).flatten().tolist() == [False, True, False, True]


def test_max_images_and_errors():
    x = he_like(10, 8, 8)
    assert estimate_template(x, progress=False, max_images=4).meta["n_images"] == 4
    with pytest.raises(ValueError, match="no images"):
        estimate_template(torch.empty(0, 3, 8, 8), progress=False)
    with pytest.raises(ValueError, match=r"observed \[0, 255\]"):
        estimate_template(torch.linspace(0, 255, 3 * 64).view(1, 3, 8, 8), progress=False)
    with pytest.raises(TypeError, match="source must be"):
        estimate_template(42, progress=False)


def test_yaml_round_trip_in_config_format(tmp_path):
    t = estimate_template(he_like(3, 8, 8), spaces=("lab", "hed"), progress=False)
    path = t.save(tmp_path / "sub" / "template.yaml")
    raw = yaml.safe_load(path.read_text())
    assert set(raw) >= {"mu0_lab", "sigma0_lab", "mu0_hed", "sigma0_hed", "n_images"}
    back = load_template(path)
    assert back == t
    assert not list((tmp_path / "sub").glob(".tmp-*"))  # atomic write leaves no temp file


def test_reference_config_keys():
    cfg = {"mu0": [64, 20, -10], "sigma0": [12, 7, 5], "mu0_hsv": [5.0, 0.6, 0.3], "sigma0_hsv": [0.4, 0.2, 0.2], "batch_size": 64}
    t = Template.from_config(cfg)
    assert t["lab"] == ([64.0, 20.0, -10.0], [12.0, 7.0, 5.0])
    assert t["hsv"][0] == [5.0, 0.6, 0.3]
    with pytest.raises(ValueError, match="no sigma0_rgb"):
        Template.from_config({"mu0_rgb": [1, 2, 3]})


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="template file not found"):
        load_template(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mu0_lab: [1, 2]\nsigma0_lab: [1, 2, 3]\n")
    with pytest.raises(ValueError, match="bad.yaml: mu0_lab must be 3 finite numbers"):
        load_template(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_template(bad)


def test_estimated_template_initialises_layers():
    x = he_like(4, 16, 16, seed=5)
    t = estimate_template(x, progress=False)
    norm = LStainNorm(templates=t)
    assert norm.branches["lab"].mu0.tolist() == pytest.approx(t["lab"][0])
    s = StainNorm("hsv", *t["hsv"])
    assert s.sigma0.tolist() == pytest.approx(t["hsv"][1])


def test_resolve_reference_and_defaults():
    single = resolve_templates("reference", ["lab", "hed"])
    assert single["lab"] == REFERENCE_TEMPLATES["single"]["lab"]
    assert single["hed"][0] == pytest.approx(list(get_space("hed").default_mu))


def test_repr_shows_natural_units():
    text = repr(Template({"hsv": ([3.14159265, 0.5, 0.5], [0.1, 0.1, 0.1])}))
    assert "H=180.000" in text and "deg" in text
