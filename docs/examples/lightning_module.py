"""LStainNorm inside your own LightningModule, with the normalisation parameters in their own
optimiser groups.

    python docs/examples/lightning_module.py --data /path/to/tiles/train
    python docs/examples/lightning_module.py                     # synthetic tiles, to try it

Recommended learning rates (what ``lstainnorm train`` uses): AdamW 5e-4 for the network and
``lstainnorm.norm_param_groups(norm, lr=5e-3)`` for the layer (each colour space's template
offsets get 5e-3 times that space's template std, the attention and fusion weights 5e-3).
"""

import argparse
import tempfile
from pathlib import Path

import lightning as L
import timm
import torch
from torch.utils.data import DataLoader, random_split
from torchvision import datasets
from torchvision.transforms import v2

import lstainnorm


class Classifier(L.LightningModule):
    def __init__(self, backbone: str, n_classes: int, lr: float = 5e-4, norm_lr: float = 5e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.norm = lstainnorm.LStainNorm()
        self.net = timm.create_model(backbone, pretrained=False, num_classes=n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True)

    def configure_optimizers(self):
        groups = [{"params": self.net.parameters(), "lr": self.hparams.lr, "name": "net"}]
        groups += lstainnorm.norm_param_groups(self.norm, lr=self.hparams.norm_lr)
        return torch.optim.AdamW(groups)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, help="ImageFolder root (CLASS/*.png); default: synthetic tiles")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("lightning_example"))
    a = ap.parse_args()
    if a.data is None:
        from lstainnorm.data.synthetic import write_synthetic

        tmp = Path(tempfile.mkdtemp())
        write_synthetic(tmp, centres=1, per_class=10, size=a.size, classes=3, workers=1, progress=False)
        a.data = tmp / "A" / "train"
    tf = v2.Compose([v2.ToImage(), v2.Resize((a.size, a.size), antialias=True), v2.ToDtype(torch.float32, scale=True)])
    data = datasets.ImageFolder(a.data, transform=tf)
    train, val = random_split(data, [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    model = Classifier(a.backbone, len(data.classes))
    trainer = L.Trainer(max_epochs=a.epochs, accelerator="auto", default_root_dir=a.out, enable_progress_bar=False,
                        logger=L.pytorch.loggers.CSVLogger(a.out), enable_model_summary=False)
    trainer.fit(model, DataLoader(train, batch_size=16, shuffle=True), DataLoader(val, batch_size=16))
    print("validation:", {k: float(v) for k, v in trainer.callback_metrics.items()})
    print("learned template:", model.norm.template().natural())


if __name__ == "__main__":
    main()
