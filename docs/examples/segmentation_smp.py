"""A segmentation-models-pytorch U-Net with LStainNorm in front, trained on image/mask pairs.

    python docs/examples/segmentation_smp.py --images DIR --masks DIR     # same file names in both
    python docs/examples/segmentation_smp.py                              # synthetic nuclei, to try it

Any H x W works for the layer; the U-Net wants multiples of 32, so crops are used here.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
from PIL import Image

import lstainnorm


def load_pairs(images: Path, masks: Path, crop: int):
    xs, ys = [], []
    for img in sorted(images.glob("*.png")):
        rgb = np.asarray(Image.open(img).convert("RGB"), dtype=np.float32)[:crop, :crop] / 255.0
        mask = np.asarray(Image.open(masks / img.name))[:crop, :crop] > 0  # instance labels -> foreground
        xs.append(torch.from_numpy(rgb).permute(2, 0, 1))
        ys.append(torch.from_numpy(mask.astype(np.float32))[None])
    return torch.stack(xs), torch.stack(ys)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=Path)
    ap.add_argument("--masks", type=Path)
    ap.add_argument("--encoder", default="resnet34")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:  # synthetic images, removed afterwards
        if a.images is None:
            from lstainnorm.data.synthetic import write_synthetic_segmentation

            root = write_synthetic_segmentation(Path(tmp), n_images=6, size=max(64, a.crop))
            a.images, a.masks = root / "images", root / "masks"
        x, y = load_pairs(a.images, a.masks, a.crop)
    train(a, x, y)


def train(a: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> None:

    unet = smp.Unet(encoder_name=a.encoder, encoder_weights=None, in_channels=3, classes=1)
    net = lstainnorm.with_stain_norm(unet, "lstainnorm")
    opt = torch.optim.AdamW([{"params": net.model.parameters(), "lr": 5e-4}] + lstainnorm.norm_param_groups(net.norm))
    dice_loss = smp.losses.DiceLoss("binary")
    for epoch in range(a.epochs):
        for i in range(0, len(x), 4):
            logits = net(x[i : i + 4])
            loss = dice_loss(logits, y[i : i + 4]) + torch.nn.functional.binary_cross_entropy_with_logits(logits, y[i : i + 4])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}")
    with torch.no_grad():
        pred = net(x).sigmoid() > 0.5
    dice = 2 * (pred * y).sum() / (pred.sum() + y.sum()).clamp(min=1)
    print(f"training-set Dice {dice.item():.3f}")


if __name__ == "__main__":
    main()
