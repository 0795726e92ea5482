"""How much of a stain or scanner shift each normaliser undoes, without training.

    python benchmarks/invariance.py [--tiles 24] [--severities 0.5 1]   # ~3 minutes on 2 CPU cores

For real tiles ``x`` (224 x 224 crops of the MoNuSeg images) and each stress axis of
``lstainnorm stress`` (:mod:`lstainnorm.data.restain`), the re-stained copy ``x'`` is normalised
along with ``x``; the table gives the shift left after normalisation as a fraction of the shift
before it, ``mean dE(N(x), N(x')) / mean dE(x, x')`` (CIE76 colour difference per pixel): 0 undoes
the shift completely, 1 leaves it as it was. The layers run with their default templates and
initial parameters (what a per-image standardisation does before any learning; training changes
templates and fusion weights, not the per-image statistics, so the branch rows show what
standardising in that space undoes at all); Macenko (torch-staintools) is fitted to one other tile. Writes bench_out/invariance.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

from _common import load_tiles, machine, markdown_table, save  # noqa: E402

import lstainnorm  # noqa: E402
from lstainnorm.baselines.classical import ClassicalNorm  # noqa: E402
from lstainnorm.data.restain import AXES, restain  # noqa: E402
from lstainnorm.layers.color import rgb_to_lab  # noqa: E402

NORMALISERS = {
    "none": lambda: None,
    "StainNorm(lab) (Reinhard as a layer)": lambda: lstainnorm.StainNorm("lab", learnable=False),
    "StainNorm(hsv)": lambda: lstainnorm.StainNorm("hsv", learnable=False),
    "StainNorm(rgb)": lambda: lstainnorm.StainNorm("rgb", learnable=False),
    "StainNorm(hed)": lambda: lstainnorm.StainNorm("hed", learnable=False),
    "LStainNorm (lab, hsv, rgb), initial": lambda: lstainnorm.LStainNorm(),
    "LStainNorm (lab, hsv, rgb, hed), initial": lambda: lstainnorm.LStainNorm(spaces=("lab", "hsv", "rgb", "hed")),
    "StainConcentrationNorm (each image's Macenko vectors)": lambda: lstainnorm.StainConcentrationNorm("estimate", learnable=False),
    "StainConcentrationNorm (Ruifrok's vectors)": lambda: lstainnorm.StainConcentrationNorm("ruifrok", learnable=False),
    "StainNorm(rgb) after a StainConcentrationNorm stage": lambda: lstainnorm.StainNorm("rgb", learnable=False, stain_first="estimate"),
    "LStainNorm after a StainConcentrationNorm stage (stain_first), initial": lambda: lstainnorm.LStainNorm(stain_first="estimate"),
}


def delta_e(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((rgb_to_lab(a.clamp(0, 1)) - rgb_to_lab(b.clamp(0, 1))).norm(dim=-3).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=24)
    ap.add_argument("--severities", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--axes", nargs="+", default=[a for a in AXES if a != "combined"], choices=list(AXES))
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x, source = load_tiles(args.tiles + 1, 224)
    x, target = x[:-1], x[-1]  # Macenko's target: a tile outside the measured ones
    layers = {name: make() for name, make in NORMALISERS.items()}
    layers["Macenko (per image, torch-staintools)"] = ClassicalNorm("macenko", target=target, cache_mb=0)
    with torch.no_grad():
        base = {name: (x if m is None else m(x)) for name, m in layers.items()}
        rows, data = [], {}
        for axis in args.axes:
            for s in args.severities:
                shifted = torch.stack([restain(t, axis, s, seed=i) for i, t in enumerate(x)])
                before = delta_e(x, shifted)
                fracs = {}
                for name, m in layers.items():
                    after = delta_e(base[name], shifted if m is None else m(shifted))
                    fracs[name] = after / before if before > 0 else float("nan")
                data[f"{axis}@{s}"] = {"dE_before": before, **fracs}
                rows.append([axis, s, f"{before:.1f}"] + [f"{fracs[n]:.2f}" for n in layers if n != "none"])
                print(f"[invariance] {axis} {s}: dE {before:.1f}", file=sys.stderr, flush=True)
    header = ["axis", "severity", "dE of the shift"] + [n for n in layers if n != "none"]
    text = (f"Tiles: {source} (the last is Macenko's target, the other {args.tiles} are measured); {machine()}. Shift left after normalisation, as a fraction of the shift "
            "(mean CIE76 dE between the normalised tile and its normalised re-stained copy over the same between "
            "the tiles; 0 = undone, 1 = untouched):\n\n" + markdown_table(header, rows))
    print(text)
    print(f"\nwritten: {save('invariance', text, data)}")


if __name__ == "__main__":
    main()
