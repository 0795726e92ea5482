"""LStainNorm in front of a timm classifier, in a plain PyTorch training loop.

    python docs/examples/plain_pytorch_timm.py --data /path/to/tiles/train      # ImageFolder: CLASS/*.png
    python docs/examples/plain_pytorch_timm.py                                  # synthetic tiles, to try it

The layer sits inside the network, so it trains with the task: its template parameters go in
their own optimiser groups (``lstainnorm.norm_param_groups``: lr 5e-3 relative to each space's
template std; the network keeps its own lr, here AdamW 5e-4, the values ``lstainnorm train`` uses).
Images go in as RGB in [0, 1]: no ImageNet mean/std normalisation before the layer.
"""

import argparse
import tempfile
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

import lstainnorm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, help="ImageFolder root (CLASS/*.png); default: synthetic tiles")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:  # synthetic tiles, removed afterwards
        if a.data is None:  # a small synthetic multi-centre set, centre A's training split
            from lstainnorm.data.synthetic import write_synthetic

            write_synthetic(Path(tmp), centres=1, per_class=10, size=a.size, classes=3, workers=1, progress=False)
            a.data = Path(tmp) / "A" / "train"
        train(a)


def train(a: argparse.Namespace) -> None:
    # RGB in [0, 1]; the stain-normalisation layer does the colour standardisation.
    tf = v2.Compose([v2.ToImage(), v2.Resize((a.size, a.size), antialias=True), v2.ToDtype(torch.float32, scale=True)])
    data = datasets.ImageFolder(a.data, transform=tf)
    loader = DataLoader(data, batch_size=a.batch_size, shuffle=True, num_workers=0)

    backbone = timm.create_model(a.backbone, pretrained=False, num_classes=len(data.classes))
    net = lstainnorm.with_stain_norm(backbone, "lstainnorm")  # Lab + HSV + RGB, fused by attention
    groups = [{"params": net.model.parameters(), "lr": 5e-4}] + lstainnorm.norm_param_groups(net.norm, lr=5e-3)
    opt = torch.optim.AdamW(groups)

    for epoch in range(a.epochs):
        net.train()
        total, correct, loss_sum = 0, 0, 0.0
        for x, y in loader:
            logits = net(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
        print(f"epoch {epoch + 1}: loss {loss_sum / total:.4f}, train accuracy {correct / total:.3f}")
    print("learned template:", net.norm.template().natural())


if __name__ == "__main__":
    main()
