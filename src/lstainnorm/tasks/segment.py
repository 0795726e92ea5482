"""Nuclei segmentation: a segmentation-models-pytorch U-Net behind the normalisation layer.

Same LightningModule, config and commands as classification (``task: segmentation``); this
module supplies the network, the BCE + Dice loss, sliding-window inference and the
metrics: pixel Dice and IoU (torchmetrics) and the instance metrics AJI and PQ after
post-processing (:mod:`lstainnorm.tasks.instances`), per image, per hospital and mean.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.io import atomic_write_bytes
from ..data.segmentation import (
    SegmentationDataset,
    collate_segmentation,
    monuseg_records,
    pair_images_masks,
    split_records,
)
from .instances import aji, panoptic_quality, postprocess

__all__ = ["SegmentationTask", "sliding_window", "build_segmentation_data", "segmentation_metrics", "evaluate_segmentation", "predict_folder"]


def _pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    return x, (h, w)


def _starts(size: int, window: int, step: int) -> list[int]:
    if size <= window:
        return [0]
    s = list(range(0, size - window + 1, step))
    if s[-1] != size - window:
        s.append(size - window)
    return s


@torch.no_grad()
def sliding_window(model: nn.Module, x: torch.Tensor, window: int = 256, overlap: float = 0.25, batch: int = 4) -> torch.Tensor:
    """Logits of ``model`` over a (B, 3, H, W) image of any size, window by window.

    Windows overlap by ``overlap``; their logits are averaged with weights that fall off
    towards the window's edge (less context there). An image no larger than one window is
    passed whole. H and W are padded (reflect) to a multiple of 32 for the U-Net.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    b, _, h, w = x.shape
    if h <= window and w <= window:
        xp, _ = _pad_to(x, 32)
        return model(xp)[..., :h, :w]
    xp = x
    if h < window or w < window:  # one side shorter than a window: pad it up
        xp = F.pad(x, (0, max(0, window - w), 0, max(0, window - h)), mode="replicate")
    hp, wp = xp.shape[-2:]
    step = max(1, int(round(window * (1.0 - overlap))))
    ramp = torch.minimum(torch.arange(window, dtype=torch.float32) + 1, torch.arange(window, 0, -1, dtype=torch.float32))
    ramp = (ramp / ramp.max()).clamp(min=1e-3)
    weight = (ramp[:, None] * ramp[None, :]).to(x.device)
    out = torch.zeros(b, 1, hp, wp, device=x.device)
    norm = torch.zeros(1, 1, hp, wp, device=x.device)
    coords = [(i, j) for i in _starts(hp, window, step) for j in _starts(wp, window, step)]
    for k in range(0, len(coords), batch):
        chunk = coords[k : k + batch]
        tiles = torch.cat([xp[..., i : i + window, j : j + window] for i, j in chunk])
        tiles, _ = _pad_to(tiles, 32)
        logits = model(tiles)[..., :window, :window].float()
        for n, (i, j) in enumerate(chunk):
            out[..., i : i + window, j : j + window] += logits[n * b : (n + 1) * b] * weight
            norm[..., i : i + window, j : j + window] += weight
    return (out / norm)[..., :h, :w]


def segmentation_metrics(prob: np.ndarray, gt_instances: np.ndarray, post: dict) -> dict[str, float]:
    """Dice, IoU (pixels) and AJI, PQ, DQ, SQ (instances) of one image."""
    from torchmetrics.functional.classification import binary_f1_score, binary_jaccard_index

    pred_fg = torch.from_numpy(prob > post.get("threshold", 0.5)).flatten()
    gt_fg = torch.from_numpy(gt_instances > 0).flatten()
    if gt_fg.any() or pred_fg.any():
        dice = float(binary_f1_score(pred_fg.long(), gt_fg.long()))
        iou = float(binary_jaccard_index(pred_fg.long(), gt_fg.long()))
    else:
        dice = iou = 1.0
    inst = postprocess(prob, post.get("threshold", 0.5), post.get("watershed", True), post.get("min_size", 10))
    pq = panoptic_quality(gt_instances, inst)
    return {"dice": dice, "iou": iou, "aji": aji(gt_instances, inst), "pq": pq["pq"], "dq": pq["dq"], "sq": pq["sq"], "n_pred": int(inst.max()), "n_true": int(np.unique(gt_instances[gt_instances > 0]).size)}


def _aggregate(per_image: list[dict]) -> dict[str, Any]:
    keys = ("dice", "iou", "aji", "pq", "dq", "sq")
    out: dict[str, Any] = {"n": len(per_image)}
    for k in keys:
        vals = [r[k] for r in per_image]
        out[k] = float(np.mean(vals)) if vals else float("nan")
        out[f"{k}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return out


class SegmentationTask:
    monitor = "val/dice"
    mode = "max"

    def __init__(self, cfg: Any, classes: Sequence[str], centres: Sequence[str]) -> None:
        self.cfg = cfg
        self.classes = list(classes)
        self.centres = list(centres)
        self._val: list[dict] = []
        self._collected: list[dict] = []
        import segmentation_models_pytorch as smp

        self.dice_loss = smp.losses.DiceLoss(mode="binary", from_logits=True)

    @property
    def post(self) -> dict:
        s = self.cfg.segmentation
        return {"threshold": s.threshold, "watershed": s.watershed, "min_size": s.min_size}

    def build_net(self) -> nn.Module:
        import segmentation_models_pytorch as smp

        m = self.cfg.model
        if m.pretrained and not m.weights:
            raise ValueError("model.pretrained for segmentation needs model.weights: a local encoder weights file (no downloads)")
        extra = {"decoder_channels": list(m.decoder_channels)} if m.get("decoder_channels") else {}
        net = smp.Unet(encoder_name=m.backbone, encoder_weights=None, in_channels=3, classes=1, **extra)
        if m.weights:
            state = torch.load(m.weights, map_location="cpu", weights_only=True)
            missing = net.encoder.load_state_dict(state, strict=False)
            if len(missing.missing_keys) == len(list(net.encoder.state_dict())):
                raise ValueError(f"model.weights {m.weights}: no encoder weights matched '{m.backbone}'")
        return net

    def target(self, batch: dict) -> torch.Tensor:
        return batch["mask"]

    def augment_pair(self, x: torch.Tensor, batch: dict, seed: int, epoch: int, batch_idx: int):
        return x, batch["mask"]  # crops are flipped and rotated, with the mask, by the dataset

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = out.float()
        return F.binary_cross_entropy_with_logits(out, target) + self.dice_loss(out, target)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        s = self.cfg.segmentation
        return sliding_window(model, x, s.window, s.overlap)

    def update(self, out: torch.Tensor, batch: dict, stage: str) -> None:
        prob = torch.sigmoid(out.float()).cpu().numpy()
        for i in range(prob.shape[0]):
            fg = prob[i, 0] > self.cfg.segmentation.threshold
            gt = batch["mask"][i, 0].cpu().numpy() > 0
            inter = float((fg & gt).sum())
            self._val.append({"inter": inter, "sum": float(fg.sum() + gt.sum()), "union": float((fg | gt).sum())})

    def compute(self, stage: str) -> dict[str, float]:
        dices = [2 * v["inter"] / v["sum"] if v["sum"] else 1.0 for v in self._val]
        ious = [v["inter"] / v["union"] if v["union"] else 1.0 for v in self._val]
        self._val = []
        return {"dice": float(np.mean(dices)) if dices else 0.0, "iou": float(np.mean(ious)) if ious else 0.0}

    def reset_collect(self) -> None:
        self._collected = []

    def collect(self, out: torch.Tensor, batch: dict) -> None:
        prob = torch.sigmoid(out.float()).cpu().numpy()
        for i in range(prob.shape[0]):
            rec = segmentation_metrics(prob[i, 0], batch["instances"][i].cpu().numpy(), self.post)
            rec.update(name=batch["name"][i], centre=batch["centre"][i], index=int(batch["index"][i]))
            self._collected.append(rec)

    def finish_collect(self, module) -> dict:
        recs = self._collected
        if module.trainer is not None and module.trainer.world_size > 1:
            import torch.distributed as dist

            lists: list = [None] * module.trainer.world_size
            dist.all_gather_object(lists, recs)
            seen, recs = set(), []
            for lst in lists:
                for r in lst:
                    if r["index"] not in seen:
                        seen.add(r["index"])
                        recs.append(r)
        recs = sorted(recs, key=lambda r: r["index"])
        res: dict[str, Any] = {"overall": _aggregate(recs), "per_centre": {}, "per_image": recs}
        for c in sorted({r["centre"] for r in recs}):
            res["per_centre"][c] = _aggregate([r for r in recs if r["centre"] == c])
        return res


class EpochSeededCropSampler(Sampler):
    """Yields ``(index, epoch)`` so each crop's position and flips derive from (seed, epoch, index):
    a resumed run draws the same crops as an uninterrupted one."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator:
        rng = np.random.default_rng([self.seed, self.epoch])
        return iter([(int(i), self.epoch) for i in rng.permutation(self.n)])

    def __len__(self) -> int:
        return self.n


class _SeededCrops(Dataset):
    def __init__(self, ds: SegmentationDataset, seed: int) -> None:
        self.ds, self.seed = ds, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0]))
        return self.ds.get(i, generator=g)


@dataclass
class SegmentationData:
    train: SegmentationDataset
    val: SegmentationDataset
    test: SegmentationDataset | None
    classes: list[str] = field(default_factory=lambda: ["nucleus"])
    centres: list[str] = field(default_factory=list)
    train_centres: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    collate = staticmethod(collate_segmentation)

    def template_source(self) -> Dataset:
        """Whole training images (not random crops) for template and stain statistics."""
        return SegmentationDataset(self.train.records, scale=self.train.scale)

    @property
    def labels(self) -> list[int]:
        return [0] * len(self.train.records)

    def loaders(self, cfg: Any, seed: int):
        d = cfg.data
        kw = {"num_workers": d.num_workers, "collate_fn": collate_segmentation, "persistent_workers": d.num_workers > 0}
        train = DataLoader(_SeededCrops(self.train, seed), batch_size=d.batch_size, sampler=EpochSeededCropSampler(len(self.train), seed), **kw)
        val = DataLoader(self.val, batch_size=1, shuffle=False, **kw)
        test = DataLoader(self.test, batch_size=1, shuffle=False, **kw) if self.test is not None else None
        return train, val, test


def build_segmentation_data(cfg: Any) -> SegmentationData:
    """Train/val/test image-mask pairs from ``segmentation.root`` and a split file or metadata column."""
    s = cfg.segmentation
    if not s.root:
        raise ValueError("segmentation.root is required: a folder with images/ and masks/ (or MoNuSeg's masks_instance/)")
    root = Path(s.root)
    if not root.is_dir():
        raise FileNotFoundError(f"segmentation.root not found: {root}")
    masks = s.masks if (root / s.masks).is_dir() else "masks"
    if (root / "metadata.csv").is_file():
        records = monuseg_records(root, masks=masks)  # centres from the tss_code column
    else:
        records = pair_images_masks(root / s.images, root / masks)
    notes = []
    if s.split_file or s.split_column:
        kw = {"split_file": s.split_file} if s.split_file else {"column": s.split_column, "test_values": list(s.test_values), "val_values": list(s.val_values)}
        train = split_records(records, "train", **kw)
        val = split_records(records, "val", **kw)
        test = split_records(records, "test", **kw)
    else:
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(len(records)).tolist()
        n_test = max(1, len(records) // 5)
        n_val = max(1, len(records) // 5)
        test = [records[i] for i in order[:n_test]]
        val = [records[i] for i in order[n_test : n_test + n_val]]
        train = [records[i] for i in order[n_test + n_val :]]
        notes.append(f"no split given: {len(train)}/{len(val)}/{len(test)} images for train/val/test (seeded)")
    if not val:
        rng = np.random.default_rng(cfg.seed)
        k = max(1, int(round(len(train) * cfg.data.val_fraction)))
        pick = set(rng.permutation(len(train))[:k].tolist())
        val = [r for i, r in enumerate(train) if i in pick]
        train = [r for i, r in enumerate(train) if i not in pick]
        notes.append(f"validation: {len(val)} images held out of the training images (seeded)")
    if not train:
        raise ValueError("no training images in the segmentation split")
    tr = SegmentationDataset(train, crop=s.crop, augment=True, samples_per_image=s.samples_per_image, scale=s.scale)
    va = SegmentationDataset(val, scale=s.scale)
    te = SegmentationDataset(test, scale=s.scale) if test else None
    centres = sorted({r.centre for r in records})
    notes.append(f"segmentation: {len(train)} training, {len(val)} validation, {len(test)} test images")
    return SegmentationData(tr, va, te, ["nucleus"], centres, sorted({r.centre for r in train}), notes)


def evaluate_segmentation(module, ckpt: Path, data: str | Path, out: str | Path | None = None, progress: bool = True) -> dict:
    """Evaluate a segmentation run on a folder with ``images/`` and ``masks/`` (or MoNuSeg's layout)."""
    import lightning as L

    data = Path(data)
    masks = module.cfg.segmentation.masks if (data / module.cfg.segmentation.masks).is_dir() else "masks"
    if (data / "metadata.csv").is_file():
        recs = monuseg_records(data, masks=masks)
    else:
        recs = pair_images_masks(data / "images", data / masks)
    ds = SegmentationDataset(recs, scale=module.cfg.segmentation.scale)
    module.centres = sorted({r.centre for r in recs})
    module.task.centres = module.centres
    loader = DataLoader(ds, batch_size=1, shuffle=False, collate_fn=collate_segmentation)
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=progress, enable_model_summary=False)
    trainer.test(module, loader, verbose=False)
    res = dict(module.test_results)
    res["checkpoint"] = str(ckpt)
    res["data"] = str(data)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    out = Path(out) if out else run_dir / f"eval_{data.name}.json"
    atomic_write_bytes(out, json.dumps(res, indent=2, default=str).encode())
    res["output"] = str(out)
    return res


def overlay(image: np.ndarray, labels: np.ndarray, colour=(0, 255, 0)) -> np.ndarray:
    """The image with instance contours drawn in ``colour``."""
    from skimage.segmentation import find_boundaries

    out = image.copy()
    out[find_boundaries(labels, mode="inner")] = colour
    return out


def predict_folder(run: str | Path, inp: str | Path, output: str | Path, progress: bool = True) -> dict:
    """Segment every image of ``inp`` (a file or a folder) with a trained run; write, per image,
    ``<name>_mask.png`` (0/255), ``<name>_instances.png`` (16-bit labels) and ``<name>_overlay.png``.
    Finished outputs are kept (resumable); unreadable inputs are reported and skipped."""
    from tqdm.auto import tqdm

    from ..data.io import ImageReadError, read_rgb, write_image
    from ..data.tiles import find_images
    from .evaluate import load_module

    module = load_module(run)
    if module.cfg.task != "segmentation":
        raise ValueError(f"{run} is a {module.cfg.task} run; lstainnorm predict needs a segmentation run")
    inp, output = Path(inp), Path(output)
    if output.resolve() == inp.resolve():
        raise ValueError("OUTPUT must differ from INPUT (inputs are never overwritten)")
    files = find_images(inp)
    base = inp if inp.is_dir() else inp.parent
    done, skipped, written = 0, [], []
    for f in tqdm(files, desc="segmenting", unit="image", disable=not progress):
        rel = f.relative_to(base).with_suffix("")
        outs = [output / f"{rel}_{k}.png" for k in ("mask", "instances", "overlay")]
        if all(p.is_file() for p in outs):
            done += 1
            continue
        try:
            img = read_rgb(f)
        except ImageReadError as err:
            skipped.append(str(f))
            print(f"skipping unreadable image: {err}")
            continue
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255).unsqueeze(0)
        scale = float(module.cfg.segmentation.scale)
        if scale != 1.0:  # predict at the training scale, return masks at the input's size
            x = F.interpolate(x, scale_factor=scale, mode="area" if scale < 1 else "bilinear")
        with torch.no_grad():
            logits = module.task.predict(module.model, x)
            if scale != 1.0:
                logits = F.interpolate(logits, size=img.shape[:2], mode="bilinear", align_corners=False)
            prob = torch.sigmoid(logits)[0, 0].numpy()
        inst = postprocess(prob, **module.task.post)
        write_image(outs[0], ((prob > module.task.post["threshold"]) * 255).astype(np.uint8))
        write_image(outs[1], inst.astype(np.uint16))
        write_image(outs[2], overlay(img, inst))
        written.append(str(f))
    return {"written": written, "already_done": done, "skipped": skipped}
