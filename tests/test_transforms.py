"""lstainnorm.transforms.StainNormalize: same type out as in, images only, frozen layer."""

import numpy as np
import pytest
import torch
from conftest import he_like
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from lstainnorm import LStainNorm, StainNorm, Template
from lstainnorm.transforms import StainNormalize


def _pil(seed=0, size=(40, 32)):
    x = he_like(1, size[1], size[0], seed=seed)[0]
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), mode="RGB")


def test_pil_in_pil_out_equals_the_layer_on_the_tensor():
    norm = StainNorm("lab", [55.0, 25.0, -10.0], [12.0, 6.0, 5.0], learnable=False)
    t = StainNormalize(norm)
    img = _pil()
    out = t(img)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == img.size
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        ref = (norm(x)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(np.asarray(out, dtype=np.float32) - ref).max() <= 1.0
    assert not np.array_equal(np.asarray(out), np.asarray(img))  # it did change the colours


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
@pytest.mark.parametrize("batched", [False, True])
def test_tensors_keep_dtype_and_shape(dtype, batched):
    x = he_like(2, 24, 20)
    x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    x = x if batched else x[0]
    out = StainNormalize(LStainNorm())(x)
    assert out.dtype == dtype and out.shape == x.shape
    if dtype.is_floating_point:
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_in_a_v2_pipeline_only_images_change():
    t = v2.Compose([v2.RandomHorizontalFlip(p=1.0), StainNormalize(StainNorm("hsv", learnable=False))])
    img = tv_tensors.Image((he_like(1, 16, 16)[0] * 255).round().to(torch.uint8))
    mask = tv_tensors.Mask(torch.arange(256).view(16, 16) % 3)
    sample = {"image": img, "mask": mask, "label": 4}
    out = t(sample)
    assert isinstance(out["image"], tv_tensors.Image) and out["image"].dtype == torch.uint8
    assert torch.equal(out["mask"], mask.flip(-1)) and out["label"] == 4


def test_layer_is_frozen_and_in_eval_mode():
    norm = LStainNorm()
    t = StainNormalize(norm)
    assert not norm.training and not any(p.requires_grad for p in norm.parameters())
    assert "LStainNorm" in repr(t)


def test_from_template_uses_the_templates_values(tmp_path):
    path = tmp_path / "t.yaml"
    Template({"lab": ([58.0, 22.0, -9.0], [11.0, 6.0, 4.0])}).save(path)
    t = StainNormalize.from_template(path)
    assert torch.allclose(t.norm.mu, torch.tensor([58.0, 22.0, -9.0]))
    with pytest.raises(ValueError, match="no 'hsv' statistics"):
        StainNormalize.from_template(path, space="hsv")
    assert StainNormalize.from_template(None, space="rgb").norm.space.name == "rgb"


def test_bad_inputs_are_named_errors():
    t = StainNormalize(StainNorm())
    with pytest.raises(ValueError, match="RGB PIL image"):
        t(Image.new("L", (8, 8)))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        t(torch.rand(4, 8, 8))
    with pytest.raises(TypeError, match="uint8 or float"):
        t(torch.ones(3, 8, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="nn.Module"):
        StainNormalize("lab")


class _Tiles(Dataset):
    def __init__(self, t):
        self.t = t

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return self.t(he_like(1, 16, 16, seed=i)[0])


def test_dataloader_workers_give_the_same_tiles_as_the_main_process():
    t = StainNormalize(LStainNorm())
    inline = torch.stack([_Tiles(t)[i] for i in range(6)])
    batches = list(DataLoader(_Tiles(t), batch_size=3, num_workers=2))
    assert torch.allclose(torch.cat(batches), inline, atol=1e-6)
