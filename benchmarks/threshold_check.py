"""Which decision rule transfers better from validation to unseen slides, judged on validation alone.

For each finished run of a ``bench mitosis`` folder: the chosen checkpoint's probabilities on its own
validation crops (the same carved split the run used). Then, many times, the validation slides are
split in two halves: the threshold is fitted on one half (``trainer.threshold: val``) and balanced
accuracy measured on the other, beside argmax on that other half. The test crops never enter.

    python benchmarks/threshold_check.py --runs OUT/mitosis --save benchmarks/results/steady/val_probs
    python benchmarks/threshold_check.py --probs benchmarks/results/steady/val_probs     # tables only
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch


def val_probs(run_dir: Path) -> list[dict]:
    """Class-1 probabilities of the run's best checkpoint on its validation crops, with slide and label."""
    from lstainnorm.tasks.evaluate import load_module
    from lstainnorm.tasks.loaders import build_classification_data

    module = load_module(run_dir)
    cfg = module.cfg
    data = build_classification_data(cfg, cfg.seed)
    ds = data.val
    out = []
    with torch.no_grad():
        for i0 in range(0, len(ds), 128):
            items = [ds[i] for i in range(i0, min(len(ds), i0 + 128))]
            x = torch.stack([it["image"] for it in items])
            p = module(x).float().softmax(-1)[:, 1]
            for it, pi in zip(items, p.tolist()):
                out.append({"group": it["group"] or it["path"], "label": int(it["label"]), "p1": pi})
    return out


def _bal(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([np.mean(pred[y == c] == c) for c in (0, 1) if np.any(y == c)]))


def _fit(p: np.ndarray, y: np.ndarray) -> float:
    from lstainnorm.tasks.classify import best_threshold

    t = best_threshold(torch.tensor(np.stack([1 - p, p], 1)), torch.tensor(y))
    return 0.5 if t is None else t


def split_half(rows: list[dict], repeats: int = 200, seed: int = 0) -> dict[str, float]:
    """Mean balanced accuracy on held-out validation halves: argmax, and the threshold fitted on the other half."""
    groups = sorted({r["group"] for r in rows})
    g = np.array([groups.index(r["group"]) for r in rows])
    p = np.array([r["p1"] for r in rows])
    y = np.array([r["label"] for r in rows])
    rng = np.random.default_rng(seed)
    arg, fit = [], []
    for _ in range(repeats):
        half = rng.permutation(len(groups))[: len(groups) // 2]
        a = np.isin(g, half)
        b = ~a
        if len(set(y[a])) < 2 or len(set(y[b])) < 2:
            continue
        arg.append(_bal((p[b] >= 0.5).astype(int), y[b]))
        fit.append(_bal((p[b] >= _fit(p[a], y[a])).astype(int), y[b]))
    return {"argmax": float(np.mean(arg)), "fitted": float(np.mean(fit)), "n": len(arg)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, help="a bench mitosis folder (its results.jsonl and run folders)")
    ap.add_argument("--save", type=Path, help="where to keep each run's validation probabilities (CSV)")
    ap.add_argument("--probs", type=Path, help="a folder of saved validation probabilities")
    a = ap.parse_args()
    table: dict[tuple[str, int], list[dict]] = {}
    if a.runs:
        for line in (a.runs / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            rows = val_probs(Path(r["run_dir"]))
            table[(r["method"], r["seed"])] = rows
            if a.save:
                a.save.mkdir(parents=True, exist_ok=True)
                with open(a.save / f"{r['protocol']}_{r['method']}_s{r['seed']}.csv", "w", newline="") as fh:
                    w = csv.DictWriter(fh, ["group", "label", "p1"])
                    w.writeheader()
                    w.writerows(rows)
    if a.probs:
        for f in sorted(a.probs.glob("*.csv")):
            _, method, s = f.stem.rsplit("_", 2)
            with open(f, newline="") as fh:
                table[(method, int(s[1:]))] = [{"group": r["group"], "label": int(r["label"]), "p1": float(r["p1"])} for r in csv.DictReader(fh)]
    print("| method | seeds | argmax: mean ± std over seeds | threshold fitted on the other half: mean ± std | per seed (argmax / fitted) |")
    print("|---|---|---|---|---|")
    for m in dict.fromkeys(k[0] for k in sorted(table)):
        res = [split_half(table[k]) for k in sorted(table) if k[0] == m]
        arg = [r["argmax"] for r in res]
        fit = [r["fitted"] for r in res]
        sd = (lambda v: np.std(v, ddof=1) if len(v) > 1 else float("nan"))
        print(f"| {m} | {len(res)} | {np.mean(arg):.3f} ± {sd(arg):.3f} | {np.mean(fit):.3f} ± {sd(fit):.3f} | "
              + " ; ".join(f"{x:.3f} / {y:.3f}" for x, y in zip(arg, fit)) + " |")


if __name__ == "__main__":
    main()
