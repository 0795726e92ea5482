"""How steady is one training run? The AMi-Br P1 runs of two recipes side by side: test balanced
accuracy over seeds, and within each run the validation curve after its first fifth: the largest fall
of validation balanced accuracy from one epoch to the next (a rise is learning; a fall is what makes
the chosen epoch a matter of luck), and where the best epoch falls.

    python benchmarks/steadiness.py --recipe steady=benchmarks/results/steady/p1 --recipe previous=benchmarks/results/steady/p1-previous

Each folder holds a ``results.jsonl`` (of ``benchmarks/bench.py mitosis`` or ``lstainnorm compare``) and
``histories/<protocol>_<method>_s<seed>.csv`` (the runs' ``history.csv``; ``--collect OUT DEST`` copies
them there, with the test predictions, from a live ``bench.py mitosis --out OUT`` or ``compare -o OUT``).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import numpy as np

from lstainnorm.compare.stats import balanced_accuracy, counts_of, group_bootstrap, paired_t
from lstainnorm.experiments.runner import mean_std

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suites.common import read_records  # noqa: E402
from suites.mitosis import suite_record  # noqa: E402


def _name(r: dict) -> str:
    return f"{r['protocol']}_{r['method']}_s{r['seed']}.csv"


def _records(folder: Path) -> list[dict]:
    """A folder's records in the tables' form: AMi-Br runs (``bench.py mitosis`` or ``lstainnorm compare``
    records) under the suite's protocol names (``p1``...); a segmentation run as recorded, under its own
    protocol (``split``), which is not AMi-Br's P1."""
    return [r if "dice" in r.get("metrics", {}) else suite_record(r) for r in read_records(folder / "results.jsonl")]


def collect(src: Path, dest: Path) -> None:
    """Copy the records of a ``bench.py mitosis --out SRC`` or ``lstainnorm compare -o SRC`` folder and each
    run's history.csv and test_predictions.csv into ``dest`` (no checkpoints): what the tables need."""
    results = src / "mitosis" / "results.jsonl" if (src / "mitosis" / "results.jsonl").is_file() else src / "results.jsonl"
    if not results.is_file():
        raise SystemExit(f"{src}: no results.jsonl (nor mitosis/results.jsonl)")
    (dest / "histories").mkdir(parents=True, exist_ok=True)
    (dest / "predictions").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(results, dest / "results.jsonl")
    for r in _records(dest):
        for src_file, sub in ((Path(r["run_dir"]) / "history.csv", "histories"), (Path(r["run_dir"]) / "test_predictions.csv", "predictions")):
            if src_file.is_file():
                shutil.copyfile(src_file, dest / sub / _name(r))
    failures = results.parent / "failures.jsonl"
    if failures.is_file():
        shutil.copyfile(failures, dest / "failures.jsonl")


def argmax_bal_acc(folder: Path, r: dict) -> float | None:
    """The run's test balanced accuracy had it decided by argmax (from its per-crop probabilities)."""
    counts = _argmax_counts(folder, r)
    if counts is None:
        return None
    return balanced_accuracy(counts)


def _curve(folder: Path, r: dict, key: str = "val/bal_acc") -> list[float]:
    h = folder / "histories" / _name(r)
    if not h.is_file():
        return []
    with open(h, newline="") as fh:
        return [float(x[key]) for x in csv.DictReader(fh) if x.get(key) not in (None, "")]


def table(recipes: dict[str, Path], protocol: str = "p1", curves_only: bool = False, methods: list[str] | None = None,
          curve: str = "val/bal_acc") -> str:
    """Per recipe and method: the test scores as run, then the validation curves (of the history column
    ``curve``: ``val/dice`` for a segmentation run, whose table is ``curves_only``). ``curves_only``: the
    curves alone (recipes whose runs were scored differently, e.g. with and without test-time views,
    have no comparable "as run" column; ``tta_check.py`` scores them alike)."""
    rows = []
    for name, folder in recipes.items():
        recs = [r for r in _records(folder) if r["protocol"] == protocol]
        for m in dict.fromkeys(r["method"] for r in recs):
            if methods and m not in methods:
                continue
            rs = sorted((r for r in recs if r["method"] == m), key=lambda r: r["seed"])
            falls, swings, firsts = [], [], 0
            for r in rs:
                c = _curve(folder, r, curve)
                if len(c) > 1:
                    # After the first fifth of training: the largest fall of the validation curve from one
                    # epoch to the next (a rise is learning; a fall is what makes the chosen epoch a matter of
                    # luck), and the largest move either way.
                    tail = c[max(0, len(c) // 5 - 1):]
                    falls.append(max(0.0, max(a - b for a, b in zip(tail, tail[1:]))))
                    swings.append(max(abs(b - a) for a, b in zip(tail, tail[1:])))
                if r.get("best_epoch") is not None and r["best_epoch"] <= max(1, len(c)) / 5:
                    firsts += 1
            test = []
            if not curves_only:  # the test columns (and the predictions read for argmax) only where shown
                bal = [r["bal_acc"] for r in rs]
                am = [v for v in (argmax_bal_acc(folder, r) for r in rs) if v is not None]
                test = [mean_std(bal, digits=3), mean_std(am, digits=3) if am else "-", " / ".join(f"{v:.3f}" for v in bal),
                        mean_std([r["auroc"] for r in rs], digits=3)]
            rows.append([name, m, len(rs), *test,
                         f"{np.median(falls):.3f} / {max(falls):.3f}" if falls else "-",
                         f"{np.median(swings):.3f}" if swings else "-",
                         " / ".join(str(r.get("best_epoch")) for r in rs), firsts])
    test_head = [] if curves_only else ["test bal. acc. (mean ± std)", "the same runs decided by argmax", "per seed", "test AUROC (mean ± std)"]
    label = {"val/bal_acc": "val. bal. acc.", "val/dice": "val. Dice"}.get(curve, curve)
    head = ["recipe", "method", "seeds", *test_head, f"largest epoch-to-epoch fall of {label} (median / max over seeds)",
            "largest move either way (median)", "best epoch per seed", "best in first fifth"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def _argmax_counts(folder: Path, r: dict) -> dict[str, dict[str, list[int]]] | None:
    """``{slide: {class: [right, total]}}`` of the run's test crops decided by argmax (for the slide bootstrap)."""
    f = folder / "predictions" / _name(r)
    if not f.is_file():
        return None
    with open(f, newline="") as fh:
        rows = list(csv.DictReader(fh))
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    preds = [max(classes, key=lambda c: float(x["p_" + c])) for x in rows]
    return counts_of([x["label"] for x in rows], preds, [x["group"] or x["path"] for x in rows])


def pairs(recipes: dict[str, Path], reference: str, protocol: str = "p1") -> str:
    """Within each recipe, each method minus ``reference`` paired by seed: as run, and decided by argmax
    (paired t over seeds; for argmax also the bootstrap over test slides)."""
    lines = []
    for name, folder in recipes.items():
        recs = [r for r in _records(folder) if r["protocol"] == protocol]
        ref = {r["seed"]: r for r in recs if r["method"] == reference}
        for m in dict.fromkeys(r["method"] for r in recs):
            own = {r["seed"]: r for r in recs if r["method"] == m and r["seed"] in ref}
            if m == reference or not own:
                continue
            seeds = sorted(own)
            for rule in ("as run", "argmax"):
                if rule == "as run":
                    d = [own[s]["bal_acc"] - ref[s]["bal_acc"] for s in seeds]
                    boot = "-"
                else:
                    a = {s: argmax_bal_acc(folder, own[s]) for s in seeds}
                    b = {s: argmax_bal_acc(folder, ref[s]) for s in seeds}
                    if any(v is None for v in (*a.values(), *b.values())):
                        continue
                    d = [a[s] - b[s] for s in seeds]
                    _, lo, hi = group_bootstrap({s: _argmax_counts(folder, own[s]) for s in seeds}, {s: _argmax_counts(folder, ref[s]) for s in seeds})
                    boot = f"[{lo:+.3f}, {hi:+.3f}]"
                t = paired_t(d)
                ci = f"[{t[1]:+.3f}, {t[2]:+.3f}]" if t else "-"
                lines.append(f"| {name} | {m} - {reference} | {rule} | {len(d)} | {np.mean(d):+.3f} | {ci} | {boot} | {' / '.join(f'{v:+.3f}' for v in d)} |")
    head = "| recipe | pair | decision | seeds | difference | 95 % CI (paired t) | 95 % CI (slide bootstrap) | per seed |\n|---|---|---|---|---|---|---|---|\n"
    return head + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", action="append", default=[], metavar="NAME=FOLDER")
    ap.add_argument("--collect", nargs=2, metavar=("BENCH_OUT", "DEST"), help="copy a bench mitosis folder's records and histories")
    ap.add_argument("--reference", default="template")
    ap.add_argument("--protocol", action="append", default=[], help="p1 (default), p2-midog-to-tupac, p2-tupac-to-midog; repeatable")
    ap.add_argument("--curves-only", action="store_true", help="the validation curves alone, no test scores nor pairs")
    ap.add_argument("--method", action="append", default=[], help="only these methods' rows (repeatable; default all)")
    ap.add_argument("--curve", default="val/bal_acc", help="the history column whose falls are tabled (val/dice for "
                    "segmentation runs, with --protocol split --curves-only)")
    a = ap.parse_args()
    if a.collect:
        collect(Path(a.collect[0]), Path(a.collect[1]))
    recipes = dict(r.split("=", 1) for r in a.recipe)
    if recipes:
        recipes = {k: Path(v) for k, v in recipes.items()}
        for i, p in enumerate(a.protocol or ["p1"]):
            if len(a.protocol) > 1:
                print(("\n" if i else "") + f"{p}:\n")
            print(table(recipes, p, a.curves_only, a.method, a.curve))
            if not a.curves_only:
                print()
                print(pairs(recipes, a.reference, p))


if __name__ == "__main__":
    main()
