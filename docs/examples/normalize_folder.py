"""A trained run's normalisation layer alone, applied to a folder of images in Python, and the same
layer as a torchvision transform in a Dataset.

    lstainnorm train configs/classify.yaml                 # makes a run folder
    python docs/examples/normalize_folder.py --run runs/<RUN> --input tiles/ --output normalised/

``load_norm`` reads the checkpoint as data only (``torch.load(weights_only=True)``) and rebuilds
the layer without the network. For whole slides and resumable batch jobs use the CLI instead
(``lstainnorm normalize --run RUN INPUT OUTPUT``).
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lstainnorm.runs import load_norm
from lstainnorm.transforms import StainNormalize


class Tiles(Dataset):
    """Images of a folder, normalised by a transform as they are read (in the DataLoader's workers)."""

    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(Image.open(self.files[i]).convert("RGB"))  # PIL in, PIL out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, required=True, help="a run folder of lstainnorm train")
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--output", type=Path, required=True)
    a = ap.parse_args()
    files = sorted(p for p in a.input.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"))

    # 1. The layer itself: a float batch in [0, 1], shape (B, 3, H, W).
    trained = load_norm(a.run)
    norm = trained.norm  # eval mode, frozen
    print(f"{type(norm).__name__} from {a.run}, trained on {trained.window} px tiles")
    with torch.no_grad():
        for f in files:
            x = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
            y = norm(x[None])[0].clamp(0, 1)
            out = (y.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            dst = a.output / f.relative_to(a.input).with_suffix(".png")  # the folder layout is kept
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(out).save(dst)
    print(f"wrote {len(files)} images to {a.output}")

    # 2. The same layer as a data-pipeline transform (PIL in, PIL out; tensors keep their dtype).
    transform = StainNormalize.from_run(a.run)
    loader = DataLoader(Tiles(files, transform), batch_size=4, num_workers=2, collate_fn=list)
    first = next(iter(loader))
    print(f"transform in a DataLoader: {len(first)} PIL images of size {first[0].size}")


if __name__ == "__main__":
    main()
