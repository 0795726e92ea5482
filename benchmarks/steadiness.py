"""How steady is one training run? The AMi-Br P1 runs of two recipes side by side: test balanced
accuracy over seeds, and within each run the validation curve after its first fifth: the largest fall
of validation balanced accuracy from one epoch to the next (a rise is learning; a fall is what makes
the chosen epoch a matter of luck), and where the best epoch falls.

    python benchmarks/steadiness.py --recipe steady=benchmarks/results/steady/p1 --recipe previous=benchmarks/results/steady/p1-previous

Each folder holds a ``bench mitosis`` ``results.jsonl`` and ``histories/<method>_s<seed>.csv`` (the
runs' ``history.csv``; ``--collect OUT`` copies them there from a live ``bench mitosis --out OUT``).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np

from lstainnorm.compare.stats import paired_t


def collect(bench_out: Path, dest: Path) -> None:
    """Copy a bench mitosis folder's records and each run's history.csv into ``dest`` (no checkpoints)."""
    recs = [json.loads(x) for x in (bench_out / "mitosis" / "results.jsonl").read_text().splitlines() if x.strip()]
    (dest / "histories").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bench_out / "mitosis" / "results.jsonl", dest / "results.jsonl")
    for r in recs:
        h = Path(r["run_dir"]) / "history.csv"
        if h.is_file():
            shutil.copyfile(h, dest / "histories" / f"{r['protocol']}_{r['method']}_s{r['seed']}.csv")


def _curve(folder: Path, r: dict, key: str = "val/bal_acc") -> list[float]:
    h = folder / "histories" / f"{r['protocol']}_{r['method']}_s{r['seed']}.csv"
    if not h.is_file():
        return []
    with open(h, newline="") as fh:
        return [float(x[key]) for x in csv.DictReader(fh) if x.get(key) not in (None, "")]


def table(recipes: dict[str, Path], protocol: str = "p1") -> str:
    rows = []
    for name, folder in recipes.items():
        recs = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines() if x.strip()]
        recs = [r for r in recs if r["protocol"] == protocol]
        for m in dict.fromkeys(r["method"] for r in recs):
            rs = sorted((r for r in recs if r["method"] == m), key=lambda r: r["seed"])
            bal = [r["bal_acc"] for r in rs]
            falls, swings, firsts = [], [], 0
            for r in rs:
                c = _curve(folder, r)
                if len(c) > 1:
                    # After the first fifth of training: the largest fall of validation balanced accuracy from one
                    # epoch to the next (a rise is learning; a fall is what makes the chosen epoch a matter of
                    # luck), and the largest move either way.
                    tail = c[max(0, len(c) // 5 - 1):]
                    falls.append(max(0.0, max(a - b for a, b in zip(tail, tail[1:]))))
                    swings.append(max(abs(b - a) for a, b in zip(tail, tail[1:])))
                if r.get("best_epoch") is not None and r["best_epoch"] <= max(1, len(c)) / 5:
                    firsts += 1
            rows.append([name, m, len(rs), f"{np.mean(bal):.3f} ± {np.std(bal, ddof=1):.3f}" if len(bal) > 1 else f"{bal[0]:.3f} (1 seed)",
                         " / ".join(f"{v:.3f}" for v in bal), f"{np.mean([r['auroc'] for r in rs]):.3f}",
                         f"{np.median(falls):.3f} / {max(falls):.3f}" if falls else "-",
                         f"{np.median(swings):.3f}" if swings else "-",
                         " / ".join(str(r.get("best_epoch")) for r in rs), firsts])
    head = ["recipe", "method", "seeds", "test bal. acc. (mean ± std)", "per seed", "AUROC", "largest epoch-to-epoch fall of val. bal. acc. (median / max over seeds)",
            "largest move either way (median)", "best epoch per seed", "best in first fifth"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def pairs(recipes: dict[str, Path], reference: str, protocol: str = "p1") -> str:
    """Within each recipe, each method minus ``reference`` paired by seed (paired t interval)."""
    lines = []
    for name, folder in recipes.items():
        recs = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines() if x.strip()]
        ref = {r["seed"]: r["bal_acc"] for r in recs if r["protocol"] == protocol and r["method"] == reference}
        for m in dict.fromkeys(r["method"] for r in recs):
            if m == reference:
                continue
            d = [r["bal_acc"] - ref[r["seed"]] for r in recs if r["protocol"] == protocol and r["method"] == m and r["seed"] in ref]
            if not d:
                continue
            t = paired_t(d)
            ci = f"[{t[1]:+.3f}, {t[2]:+.3f}]" if t else "-"
            lines.append(f"| {name} | {m} - {reference} | {len(d)} | {np.mean(d):+.3f} | {ci} | {' / '.join(f'{v:+.3f}' for v in d)} |")
    return "| recipe | pair | seeds | difference | 95 % CI (paired t) | per seed |\n|---|---|---|---|---|---|\n" + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", action="append", default=[], metavar="NAME=FOLDER")
    ap.add_argument("--collect", nargs=2, metavar=("BENCH_OUT", "DEST"), help="copy a bench mitosis folder's records and histories")
    ap.add_argument("--reference", default="template")
    a = ap.parse_args()
    if a.collect:
        collect(Path(a.collect[0]), Path(a.collect[1]))
    recipes = dict(r.split("=", 1) for r in a.recipe)
    if recipes:
        recipes = {k: Path(v) for k, v in recipes.items()}
        print(table(recipes))
        print()
        print(pairs(recipes, a.reference))


if __name__ == "__main__":
    main()
