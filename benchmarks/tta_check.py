"""Does test-time augmentation (``trainer.tta``) help, and does it steady the seeds? Chosen on validation.

For each finished run of a records file (``bench.py`` or ``lstainnorm compare`` records): the chosen
checkpoint's class-1 probabilities on its own validation crops (the split the run carved) and on its
test crops, from the tile as it is (``none``) and averaged over 4 flips (``flips``) and the 8
rotations and reflections (``dihedral``): what the run would have reported with ``trainer.tta`` set
(the views never touch training or the choice of checkpoint). Then balanced accuracy (argmax) per
view, mean ± std over seeds, validation first: the validation table chooses, the test table reports.

    python benchmarks/tta_check.py --records benchmarks/results/steady/p1/results.jsonl --save benchmarks/results/steady/p1/tta_probs
    python benchmarks/tta_check.py --probs benchmarks/results/steady/p1/tta_probs        # tables only
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suites.mitosis import PROTOCOL_SPECS  # noqa: E402

# compare's protocol (``A,B->C``) as the AMi-Br suite names it; records of either name table alike.
_NAMES = {spec: name for name, spec in PROTOCOL_SPECS.items()}
VIEWS = ("none", "flips", "dihedral")


def run_probs(run_dir: Path) -> dict:
    """``{split: {"label", "group", view: class-1 probabilities}}`` of the run's chosen checkpoint."""
    from lstainnorm.tasks.classify import view_probs
    from lstainnorm.tasks.evaluate import load_module
    from lstainnorm.tasks.loaders import build_classification_data

    module = load_module(run_dir)
    cfg = module.cfg
    if cfg.norm.stats_by:
        raise ValueError(f"{run_dir}: norm.stats_by={cfg.norm.stats_by} pools statistics per batch of a centre; not supported here")
    data = build_classification_data(cfg, cfg.seed)
    out: dict = {}
    for split in ("val", "test"):
        ds = getattr(data, split)
        rec: dict = {"label": [], "group": [], **{v: [] for v in VIEWS}}
        with torch.no_grad():
            for i0 in range(0, len(ds), 256):
                items = [ds[i] for i in range(i0, min(len(ds), i0 + 256))]
                x = torch.stack([it["image"] for it in items])
                views = {"none": view_probs(module.model, x, "none"), "flips": view_probs(module.model, x, "flips")}
                # The 8 rotations and reflections are the 4 flips of the tile and of its transpose.
                views["dihedral"] = (views["flips"] + view_probs(module.model, x.transpose(-1, -2), "flips")) / 2
                for v in VIEWS:
                    rec[v] += [round(p, 5) for p in views[v][:, 1].tolist()]
                rec["label"] += [int(it["label"]) for it in items]
                rec["group"] += [it["group"] or it["path"] for it in items]
        out[split] = rec
    return out


def collect(records: Path, save: Path) -> None:
    save.mkdir(parents=True, exist_ok=True)
    for line in records.read_text().splitlines():
        r = json.loads(line)
        protocol = _NAMES.get(r.get("protocol", "p1"), r.get("protocol", "p1"))
        name = f"{protocol}_{r['method']}_s{r['seed']}".replace("/", "_").replace(",", "+").replace(">", "")
        dst = save / f"{name}.json.gz"
        if dst.exists():
            continue
        try:
            rec = {"protocol": protocol, "method": r["method"], "seed": r["seed"], "run": Path(r["run_dir"]).name,
                   **run_probs(Path(r["run_dir"]))}
        except ValueError as err:  # norm.stats_by runs
            print(f"{name}: skipped: {err}", flush=True)
            continue
        tmp = dst.with_suffix(".tmp")
        tmp.write_bytes(gzip.compress(json.dumps(rec).encode(), mtime=0))
        tmp.replace(dst)
        print(f"{name}: saved", flush=True)


def _bal(p: np.ndarray, y: np.ndarray) -> float:
    pred = (p >= 0.5).astype(int)  # argmax of two classes
    return float(np.mean([np.mean(pred[y == c] == c) for c in (0, 1) if np.any(y == c)]))


def _counts(p: np.ndarray, y: np.ndarray, groups: list[str]) -> dict:
    """``{slide: {class: [right, total]}}`` of argmax decisions: what the slide bootstrap resamples."""
    out: dict = {}
    for pi, yi, g in zip((p >= 0.5).astype(int), y, groups):
        cell = out.setdefault(g, {}).setdefault(str(yi), [0, 0])
        cell[0] += int(pi == yi)
        cell[1] += 1
    return out


def pairs(counts: dict, view: str, refs: tuple[str, ...] = ("none", "template")) -> list[str]:
    """Test balanced accuracy with ``view``: each method minus each of ``refs``, paired by seed (paired t
    and a bootstrap over test slides, as the benchmark tables)."""
    from lstainnorm.compare.stats import group_bootstrap, paired_t, verdict

    out = []
    for protocol in sorted({k[0] for k in counts}):
        methods = sorted({k[1] for k in counts if k[0] == protocol})
        out += [f"{protocol}, test crops, `tta: {view}`: balanced accuracy, method minus reference (paired by seed; slide bootstrap 2000 resamples)", "",
                "| method | minus | difference | 95 % CI (paired t) | 95 % CI (slide bootstrap) | per seed | verdict |",
                "|---|---|---|---|---|---|---|"]
        for ref in refs:
            if (protocol, ref) not in counts:
                continue
            for m in methods:
                a, b = counts[(protocol, m)], counts[(protocol, ref)]
                seeds = sorted(set(a) & set(b))
                if m == ref or not seeds:
                    continue
                d = [a[s][1] - b[s][1] for s in seeds]
                t = paired_t(d)
                boot = group_bootstrap({s: a[s][0] for s in seeds}, {s: b[s][0] for s in seeds})
                tci = f"[{t[1]:+.3f}, {t[2]:+.3f}]" if t else "-"
                out.append(f"| {m} | {ref} | {np.mean(d):+.3f} | {tci} | [{boot[1]:+.3f}, {boot[2]:+.3f}] | "
                           + " / ".join(f"{x:+.3f}" for x in d) + f" | {verdict(t[1:] if t else None, boot[1:], 'slides')} |")
        out.append("")
    return out


def tables(probs: Path, view: str = "dihedral") -> str:
    rows: dict = defaultdict(lambda: defaultdict(dict))
    counts: dict = defaultdict(dict)
    for f in sorted(probs.glob("*.json.gz")):
        r = json.loads(gzip.decompress(f.read_bytes()))
        for split in ("val", "test"):
            y = np.array(r[split]["label"])
            for v in VIEWS:
                rows[(r["protocol"], split)][(r["method"], v)][r["seed"]] = _bal(np.array(r[split][v]), y)
        y = np.array(r["test"]["label"])
        counts[(r["protocol"], r["method"])][r["seed"]] = (_counts(np.array(r["test"][view]), y, r["test"]["group"]),
                                                          _bal(np.array(r["test"][view]), y))
    out = []
    for (protocol, split), by in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] != "val")):
        out += [f"{protocol}, {split} crops: balanced accuracy (argmax) of the chosen checkpoint, per `trainer.tta`", "",
                "| method | tta | seeds | mean ± std over seeds | minus `tta: none` (mean; per seed) | per seed |",
                "|---|---|---|---|---|---|"]
        for (method, v), seeds in sorted(by.items(), key=lambda kv: (kv[0][0], VIEWS.index(kv[0][1]))):
            s = sorted(seeds)
            b = np.array([seeds[k] for k in s])
            base = by[(method, "none")]
            d = np.array([seeds[k] - base[k] for k in s])
            diff = "-" if v == "none" else f"{d.mean():+.3f}; " + " / ".join(f"{x:+.3f}" for x in d)
            sd = f" ± {b.std(ddof=1):.3f}" if len(b) > 1 else ""
            out.append(f"| {method} | {v} | {len(b)} | {b.mean():.3f}{sd} | {diff} | " + " / ".join(f"{x:.3f}" for x in b) + " |")
        out.append("")
    out += pairs(counts, view)
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=Path, help="results.jsonl whose runs (run_dir with checkpoints) to evaluate")
    ap.add_argument("--save", type=Path, help="with --records: where the probabilities go (resumable)")
    ap.add_argument("--probs", type=Path, help="tables from saved probabilities only")
    ap.add_argument("--view", choices=VIEWS, default="dihedral", help="the views of the method-against-method table (default dihedral)")
    a = ap.parse_args()
    if a.records:
        if not a.save:
            ap.error("--records needs --save DIR")
        collect(a.records, a.save)
    src = a.probs or a.save
    if not src:
        ap.error("give --records with --save, or --probs")
    print(tables(src, a.view), end="")


if __name__ == "__main__":
    main()
