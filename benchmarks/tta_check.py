"""Does test-time augmentation (``trainer.tta``) help, and does it steady the seeds? Chosen on validation.

For each finished run of a records file (``bench.py`` or ``lstainnorm compare`` records): the chosen
checkpoint's class-1 probabilities on its own validation crops (the split the run carved) and on its
test crops, from the tile as it is (``none``) and averaged over 4 flips (``flips``) and the 8
rotations and reflections (``dihedral``): what the run would have reported with ``trainer.tta`` set
(the views never touch training or the choice of checkpoint). Then balanced accuracy (argmax) per
view, mean ± std over seeds, validation first: the validation table chooses, the test table reports.

    python benchmarks/tta_check.py --records benchmarks/results/steady/p1/results.jsonl --save benchmarks/results/steady/p1/tta_probs
    python benchmarks/tta_check.py --probs benchmarks/results/steady/p1/tta_probs        # tables only
    python benchmarks/tta_check.py --probs DIR1 DIR2      # runs of several folders in one table

``--metric auroc``: the overview and the method-against-method tables in test AUROC instead (threshold-free:
it ranks the crops, so unlike balanced accuracy it does not move with where argmax puts the decision).

A variant of a method (the same method trained with another setting, e.g. an ablation of the recipe) is
saved under its own name with ``--label``: ``--records R --save D --label "no EMA"`` names its runs
``lstainnorm (no EMA)``; ``--refs lstainnorm`` then pairs every row with the method as configured.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from lstainnorm.compare.stats import BOOTSTRAP_SAMPLES, Scores, auroc, balanced_accuracy, counts_of
from lstainnorm.experiments.runner import markdown_table, mean_std
from lstainnorm.tasks.classify import VIEW_COUNTS, decide, view_probs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suites.mitosis import PROTOCOL_SPECS, paired_rows  # noqa: E402

# compare's protocol (``A,B->C``) as the AMi-Br suite names it; records of either name table alike.
_NAMES = {spec: name for name, spec in PROTOCOL_SPECS.items()}
VIEWS = tuple(VIEW_COUNTS)


def run_probs(run_dir: Path) -> dict:
    """``{split: {"label", "group", view: class-1 probabilities}}`` of the run's chosen checkpoint."""
    from lstainnorm.data.tiles import stack_stats
    from lstainnorm.tasks.evaluate import load_module
    from lstainnorm.tasks.group_stats import with_group_stats
    from lstainnorm.tasks.loaders import build_classification_data

    module = load_module(run_dir)
    cfg = module.cfg
    data = build_classification_data(cfg, cfg.seed)
    out: dict = {}
    for split in ("val", "test"):
        # norm.stats_by: each split's tiles carry their centre's statistics pooled over that split, as in the
        # run; a centre's pooled mean and std do not change when its tiles are flipped or rotated.
        ds = with_group_stats(getattr(data, split), module.norm, cfg.norm.stats_by, tissue=cfg.norm.tissue_stats)
        rec: dict = {"label": [], "group": [], **{v: [] for v in VIEW_COUNTS}}
        with torch.no_grad():
            for i0 in range(0, len(ds), 256):
                items = [ds[i] for i in range(i0, min(len(ds), i0 + 256))]
                model = module.model_for({"stats": stack_stats(items)})
                per_view = view_probs(model, torch.stack([it["image"] for it in items]), "dihedral", per_view=True)
                for v, n in VIEW_COUNTS.items():  # each mode averages a prefix of the 8 views
                    rec[v] += [round(p, 5) for p in per_view[:n].mean(0)[:, 1].tolist()]
                rec["label"] += [int(it["label"]) for it in items]
                rec["group"] += [it["group"] or it["path"] for it in items]
        out[split] = rec
    return out


# A saved run's file name: its protocol, method and seed, without the characters of compare's protocols
# (``A,B->C``) and of a variant's label.
_FILE_NAME = str.maketrans({"/": "_", ",": "+", ">": None, " ": "_", "(": None, ")": None})


def variant(method: str, label: str | None) -> str:
    """The name a labelled variant of ``method`` is saved and tabled under (``base_method`` reverses it)."""
    return f"{method} ({label})" if label else method


def base_method(name: str) -> str:
    return name.split(" (")[0]


def collect(records: Path, save: Path, label: str | None = None) -> None:
    """Score every run of ``records`` and save its probabilities in ``save`` (resumable); with ``label``
    each run's method is saved as ``METHOD (LABEL)``: a variant tabled beside the method itself."""
    save.mkdir(parents=True, exist_ok=True)
    for line in records.read_text().splitlines():
        r = json.loads(line)
        protocol = _NAMES.get(r.get("protocol", "p1"), r.get("protocol", "p1"))
        method = variant(r["method"], label)
        name = f"{protocol}_{method}_s{r['seed']}".translate(_FILE_NAME)
        dst = save / f"{name}.json.gz"
        if dst.exists():
            continue
        rec = {"protocol": protocol, "method": method, "seed": r["seed"], "run": Path(r["run_dir"]).name,
               **run_probs(Path(r["run_dir"]))}
        tmp = dst.with_suffix(".tmp")
        tmp.write_bytes(gzip.compress(json.dumps(rec).encode(), mtime=0))
        tmp.replace(dst)
        print(f"{name}: saved", flush=True)


def _counts(r: dict, split: str, view: str) -> dict:
    """``{slide: {class: [right, total]}}`` of the argmax decisions of one view."""
    p = torch.tensor(r[split][view])
    pred = decide(torch.stack([1 - p, p], 1))
    return counts_of(r[split]["label"], pred.tolist(), r[split]["group"])


REFS = ("none", "template")
# Each metric's name in the tables and what its slide bootstrap resamples (see paired_rows).
METRICS = {"bal_acc": ("balanced accuracy", "by_group"), "auroc": ("AUROC", "scores")}


def paired(sel: list[dict], refs: tuple[str, ...] = REFS, metric: str = "bal_acc") -> dict[tuple[str, str], list[list]]:
    """``{(protocol, reference): rows}``: each method minus each of ``refs``, paired by seed (the AMi-Br
    tables' paired t and slide bootstrap), computed once for the overview and the tables."""
    out = {}
    for protocol in sorted({r["protocol"] for r in sel}):
        recs = [r for r in sel if r["protocol"] == protocol]
        methods = sorted({r["method"] for r in recs})
        for ref in refs:
            if ref in methods:
                out[(protocol, ref)] = paired_rows(recs, methods, ref, metric, METRICS[metric][1])
    return out


def pairs(rows_by: dict[tuple[str, str], list[list]], view: str, metric: str = "bal_acc") -> list[str]:
    """The tables of :func:`paired`, one per protocol and reference."""
    out = []
    for (protocol, ref), rows in rows_by.items():
        if rows:
            out += [f"{protocol}, test crops, `tta: {view}`: {METRICS[metric][0]}, each method minus `{ref}` (paired by seed; "
                    f"slide bootstrap {BOOTSTRAP_SAMPLES} resamples)", "",
                    markdown_table(["method", "difference", "95 % CI (paired t)", "95 % CI (slide bootstrap)", "per seed", "verdict"], rows), ""]
    return out


def load_probs(folders: list[Path]) -> list[dict]:
    """The saved runs of ``folders``; a run saved in two of them counts once if its probabilities agree
    (a rerun that reproduced it, e.g. on another commit), else it is an error."""
    seen: dict = {}
    for folder in folders:
        for f in sorted(folder.glob("*.json.gz")):
            r = json.loads(gzip.decompress(f.read_bytes()))
            key = (r["protocol"], r["method"], r["seed"])
            if key in seen:
                # Saved to 5 decimals: a last-bit difference in a view average may round the other way.
                if any(not np.allclose(seen[key][0][s][v], r[s][v], rtol=0, atol=2e-5) for s in ("val", "test") for v in VIEWS):
                    raise SystemExit(f"{f}: {key} is also in {seen[key][1]} with other probabilities")
                continue
            seen[key] = (r, f)
    return [r for r, _ in seen.values()]


# The overview's row order: the reference, the layers, then the rest by name.
_FIRST = ("none", "template", "template@centre", "lstainnorm", "lstainnorm@centre", "macenko")


def overview(sel: list[dict], rows_by: dict[tuple[str, str], list[list]], ref: str = "none", metric: str = "bal_acc") -> str:
    """One table of every method and protocol: the test ``metric``, mean ± std over seeds, and the
    difference from ``ref`` on the same seeds with its verdict (``rows_by``: :func:`paired`)."""
    protocols = sorted({r["protocol"] for r in sel})
    first = (ref, *(m for m in _FIRST if m != ref))
    methods = sorted({r["method"] for r in sel}, key=lambda m: (first.index(m) if m in first else len(first), m))
    rows = []
    for m in methods:
        row = [m]
        for protocol in protocols:
            own = sorted((r for r in sel if r["protocol"] == protocol and r["method"] == m), key=lambda r: r["seed"])
            if not own:
                row.append("-")
                continue
            cell = mean_std([r[metric] for r in own], digits=3) + (f" ({len(own)})" if len(own) > 1 else "")  # one: "(1 seed)"
            vs = next((x for x in rows_by.get((protocol, ref), []) if x[0] == m), None)
            if vs:
                cell += f"; {vs[1]} {vs[-1]}"
            row.append(cell)
        rows.append(row)
    return markdown_table(["method", *protocols], rows)


def tables(probs: Path | list[Path], view: str = "dihedral", refs: tuple[str, ...] = REFS, methods: list[str] | None = None,
           metric: str = "bal_acc") -> str:
    """The tables of the saved runs; ``methods``: only those methods and their labelled variants;
    ``metric="auroc"``: the overview and the paired tables in test AUROC (the per-view tables are of
    balanced accuracy)."""
    rows: dict = defaultdict(lambda: defaultdict(dict))
    sel = []
    for r in load_probs(probs if isinstance(probs, list) else [probs]):
        if methods and base_method(r["method"]) not in methods:
            continue
        for split in ("val", "test"):
            for v in VIEWS:
                rows[(r["protocol"], split)][(r["method"], v)][r["seed"]] = balanced_accuracy(_counts(r, split, v))
        c = _counts(r, "test", view)
        scores = Scores(r["test"]["label"], r["test"][view], r["test"]["group"])
        sel.append({"protocol": r["protocol"], "method": r["method"], "seed": r["seed"], "bal_acc": balanced_accuracy(c), "by_group": c,
                    "scores": scores, **({"auroc": auroc(scores)} if metric == "auroc" else {})})
    rows_by = paired(sel, refs, metric)
    name = "balanced accuracy (argmax)" if metric == "bal_acc" else "AUROC"
    out = [f"Test crops, `tta: {view}`: {name}, mean ± std over seeds (seeds); then the difference "
           f"from `{refs[0]}` on the same seeds and its verdict (resolved only when the paired t and the slide bootstrap "
           "intervals both exclude 0; tables below)", "", overview(sel, rows_by, refs[0], metric), ""]
    if metric == "auroc":
        return "\n".join(out + pairs(rows_by, view, metric)).rstrip() + "\n"
    for (protocol, split), by in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] != "val")):
        out += [f"{protocol}, {split} crops: balanced accuracy (argmax) of the chosen checkpoint, per `trainer.tta`", "",
                "| method | tta | seeds | mean ± std over seeds | minus `tta: none` (mean; per seed) | per seed |",
                "|---|---|---|---|---|---|"]
        for (method, v), seeds in sorted(by.items(), key=lambda kv: (kv[0][0], VIEWS.index(kv[0][1]))):
            s = sorted(seeds)
            b = [seeds[k] for k in s]
            base = by[(method, "none")]
            d = np.array([seeds[k] - base[k] for k in s])
            diff = "-" if v == "none" else f"{d.mean():+.3f}; " + " / ".join(f"{x:+.3f}" for x in d)
            out.append(f"| {method} | {v} | {len(b)} | {mean_std(b, digits=3)} | {diff} | " + " / ".join(f"{x:.3f}" for x in b) + " |")
        out.append("")
    out += pairs(rows_by, view)
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=Path, help="results.jsonl whose runs (run_dir with checkpoints) to evaluate")
    ap.add_argument("--save", type=Path, help="with --records: where the probabilities go (resumable)")
    ap.add_argument("--probs", type=Path, nargs="+", help="tables from saved probabilities only (one or more folders)")
    ap.add_argument("--view", choices=VIEWS, default="dihedral", help="the views of the method-against-method table (default dihedral)")
    ap.add_argument("--label", help="with --records: save each run's method as 'METHOD (LABEL)', a variant beside the method")
    ap.add_argument("--method", action="append", default=[], help="only this method and its labelled variants (repeatable)")
    ap.add_argument("--metric", choices=tuple(METRICS), default="bal_acc",
                    help="the overview's and the paired tables' test metric (default bal_acc; auroc: threshold-free)")
    ap.add_argument("--refs", nargs="+", default=list(REFS), help="the methods every row is paired with; the first in the overview "
                    "(default: none template)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for scoring runs (default 1: beside a training run)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.records:
        if not a.save:
            ap.error("--records needs --save DIR")
        collect(a.records, a.save, a.label)
    elif a.label:
        ap.error("--label names the runs of --records")
    src = a.probs or ([a.save] if a.save else None)
    if not src:
        ap.error("give --records with --save, or --probs")
    print(tables(src, a.view, tuple(a.refs), a.method, a.metric), end="")


if __name__ == "__main__":
    main()
