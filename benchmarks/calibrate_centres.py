"""Measure real hospitals' stains for the synthetic ``monuseg`` centre preset.

For each MoNuSeg tile (at 1/4 resolution): Macenko's H and E optical-density vectors
(torch-staintools, Ruifrok fallback, as ``lstainnorm stress``) and the 99th percentile of each
stain's concentration; then the median per hospital (TCGA tissue-source site). The four hospitals
of ``lstainnorm.data.synthetic.MONUSEG_CENTRES`` are printed first; the numbers there come from here.

    .venv/bin/python benchmarks/calibrate_centres.py [--root ../shared/data/monuseg-train]
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lstainnorm.data.restain import _stains, stain_matrices

PRESET_SITES = ("G9", "A7", "DK", "49")  # centres A-D of the monuseg preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("../shared/data/monuseg-train"))
    a = ap.parse_args()
    meta = a.root / "metadata.csv"
    if not meta.is_file():
        raise SystemExit(f"{meta} not found: this script needs the MoNuSeg tiles (../shared/data)")
    rows = list(csv.DictReader(open(meta, newline="")))
    imgs = []
    for r in rows:
        im = Image.open(a.root / "images" / f"{r['name']}.png").convert("RGB")
        im = im.resize((im.width // 4, im.height // 4), Image.Resampling.BOX)
        imgs.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255)
    x = torch.stack(imgs)
    per_site: dict[str, list] = defaultdict(list)
    for r, xi, si in zip(rows, x, stain_matrices(x)):
        _, conc, s = _stains(xi, si)
        per_site[r["tss_code"]].append((s.numpy(), float(conc[0].quantile(0.99)), float(conc[1].quantile(0.99))))
    all_h = np.median([v[1] for vs in per_site.values() for v in vs])
    all_e = np.median([v[2] for vs in per_site.values() for v in vs])
    print(f"all {len(rows)} tiles: median H99 {all_h:.2f}, E99 {all_e:.2f}")
    print("| site | tiles | H vector | E vector | H99 | E99 | H/E |")
    print("|---|---|---|---|---|---|---|")
    order = list(PRESET_SITES) + sorted(set(per_site) - set(PRESET_SITES))
    for site in order:
        vs = per_site[site]
        s = np.median(np.stack([v[0] for v in vs]), axis=0)
        h99, e99 = float(np.median([v[1] for v in vs])), float(np.median([v[2] for v in vs]))
        fmt = lambda v: "[" + ", ".join(f"{c:.3f}" for c in v) + "]"  # noqa: E731
        print(f"| {site} | {len(vs)} | {fmt(s[0])} | {fmt(s[1])} | {h99:.2f} | {e99:.2f} | {h99 / e99:.2f} |")


if __name__ == "__main__":
    main()
