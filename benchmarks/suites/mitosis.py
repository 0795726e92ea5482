"""``python benchmarks/bench.py mitosis``: atypical vs normal mitotic figures across scanners (AMi-Br).

Reads the data where it lies (``metadata.csv`` with its own column names, via ``data.columns`` of the
config) and trains every method once per protocol and seed:

- ``p1``: the published split (``authors_split``: train on ``train``, test on the ``test`` crops of
  other slides), every domain in both;
- ``p2-midog-to-tupac``: train on the training rows of the three MIDOG 2021 scanners, test on every
  TUPAC16 crop (a domain never trained on);
- ``p2-tupac-to-midog``: train on the TUPAC16 training rows, test on every crop of each MIDOG 2021
  scanner.

Balanced accuracy and AUROC per test domain, mean ± std over seeds, and paired comparisons against
``lstainnorm`` and ``template``: per-seed differences with a paired-t interval, and a 95 % interval from
a bootstrap that resamples *slides* (crops of a slide are not independent) of the seed-mean difference.
A difference is called resolved only when both intervals exclude 0. With both P2 directions, a last
table sets them side by side (advice should hold in both). Every run is a job of ``lstainnorm compare``'s
engine (resumable, local workers or a cluster); the tables are the command's own output, and
``--tables-only --records FILE`` regenerates them from committed records.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from lstainnorm.config import load_config
from lstainnorm.files import atomic_write_bytes
from lstainnorm.runs import RUN_DIR_ENV, write_json
from lstainnorm.tasks.train import train
from lstainnorm.compare.stats import BOOTSTRAP_SAMPLES, counts_by_group, group_bootstrap, paired_t, verdict
from suites.common import Job, engine_records
from lstainnorm.experiments.runner import commits_line, markdown_table, mean_std, method_overrides, per_seed
from suites.stress import stress_runs

__all__ = ["mitosis_benchmark", "MITOSIS_METHODS", "COMBO", "choose_combo", "best_on_validation", "STAIN_AWARE", "PROTOCOLS", "slide_bootstrap", "counts_by_group", "protocol_tables", "stain_aware_tables", "both_directions_table", "suite_record", "PROTOCOL_SPECS", "paired_rows"]

MIDOG = ["midog21-hamamatsu-xr", "midog21-hamamatsu-s360", "midog21-aperio-cs2"]
TUPAC = ["tupac16"]


def _centres(names: Sequence[str]) -> str:
    return "[" + ",".join(names) + "]"


# Protocol -> (what it tests, config overrides).
PROTOCOLS: dict[str, tuple[str, list[str]]] = {
    "p1": ("published split: authors' train rows train, their test rows (other slides) test", []),
    "p2-midog-to-tupac": (
        "scanner shift: the three MIDOG 2021 scanners' training rows train, every TUPAC16 crop tests",
        [f"data.train_centres={_centres(MIDOG)}", f"data.test_centres={_centres(TUPAC)}", "data.test_split=null"],
    ),
    "p2-tupac-to-midog": (
        "scanner shift: TUPAC16's training rows train, every crop of each MIDOG 2021 scanner tests",
        [f"data.train_centres={_centres(TUPAC)}", f"data.test_centres={_centres(MIDOG)}", "data.test_split=null"],
    ),
}

# The same protocols as ``lstainnorm compare --protocol`` names them (benchmarks/evidence.sh runs them so):
# records of either name table alike.
PROTOCOL_SPECS = {"p1": "split", "p2-midog-to-tupac": f"{','.join(MIDOG)}->{','.join(TUPAC)}",
                  "p2-tupac-to-midog": f"{','.join(TUPAC)}->{','.join(MIDOG)}"}
_NAME_OF_SPEC = {v: k for k, v in PROTOCOL_SPECS.items()}

# The best normalisation combined with the best augmentation, each chosen per protocol on the mean
# validation balanced accuracy of its runs (never the test crops), run once both are known as
# ``NORM+AUGMENT`` (e.g. ``macenko+hed-jitter``).
COMBO = "best-norm+best-augment"
NORM_CANDIDATES = ("template", "learnable-lab", "lstainnorm", "lstainnorm-frozen", "macenko", "reinhard", "stain",
                   "lstainnorm-stain")
AUGMENT_CANDIDATES = ("hed-jitter", "randstainna")
# The methods compared, the stain-aware options among them: ``stain`` (StainConcentrationNorm alone: each image's own stain vectors,
# each stain's amount scaled to a template), ``lstainnorm-stain`` (that stage first) and the layers with
# statistics pooled per scanner (``@centre``). The pooled ones are not combination candidates: the
# combination was chosen (and run) before they existed. (``lstainnorm-stain-consistency``, the staged layer
# with the consistency term, was measured and then removed with the term: CHANGELOG.md; its records stay
# in benchmarks/results/mitosis/results.jsonl.)
MITOSIS_METHODS = ("none", "template", "learnable-lab", "lstainnorm", "lstainnorm-frozen", "macenko", "reinhard",
                   "stain", "lstainnorm-stain", "template@centre", "lstainnorm@centre", "hed-jitter", "randstainna", COMBO)


def _val_bal_acc(record: dict) -> float | None:
    """A run's validation balanced accuracy: in the record, else its run folder's ``best_val`` (the first
    runs of the benchmark predate the record field)."""
    if record.get("val_bal_acc") is not None:
        return float(record["val_bal_acc"])
    metrics = Path(record.get("run_dir", "")) / "metrics.json"
    if record.get("run_dir") and metrics.is_file():
        import json

        best = json.loads(metrics.read_text()).get("best_val")
        return None if best is None else float(best)
    return None


def _val_scores(recs: Sequence[dict], candidates: Sequence[str]) -> dict[str, list[float | None]]:
    """``{candidate: [validation balanced accuracy of each of its runs in recs]}`` (None where a run has none)."""
    return {m: [_val_bal_acc(d) for d in recs if d["method"] == m] for m in candidates}


def choose_combo(sel: Sequence[dict], protocol: str, seeds: Sequence[int], methods: Sequence[str]) -> tuple[str | None, str]:
    """``(NORM+AUGMENT, why)``: the candidates of ``methods`` with the highest mean validation balanced
    accuracy over ``seeds`` on ``protocol``, or ``(None, why not)`` while a candidate's runs are missing."""
    best = {}
    recs = [d for d in sel if d["protocol"] == protocol and d["seed"] in seeds]
    for kind, candidates in (("normalisation", NORM_CANDIDATES), ("augmentation", AUGMENT_CANDIDATES)):
        scores = {}
        for m, vals in _val_scores(recs, [c for c in candidates if c in methods]).items():
            if len(vals) < len(seeds) or any(v is None for v in vals):
                return None, f"waits for every seed of {m} (with its validation balanced accuracy)"
            scores[m] = float(np.mean(vals))
        if not scores:
            return None, f"no {kind} among the methods"
        pick = max(scores, key=scores.get)
        best[kind] = (pick, scores)
    (norm, ns), (aug, ags) = best["normalisation"], best["augmentation"]
    why = ("chosen on mean validation balanced accuracy: " + ", ".join(f"{m} {v:.3f}" for m, v in sorted(ns.items(), key=lambda t: -t[1]))
           + "; " + ", ".join(f"{m} {v:.3f}" for m, v in sorted(ags.items(), key=lambda t: -t[1])))
    return f"{norm}+{aug}", why



def slide_bootstrap(runs: dict, ref: dict, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """Difference of the metric (method minus reference, mean over the shared seeds) and its 95 %
    percentile interval from resampling test slides with replacement (the same slides for every seed
    and both methods). ``runs``/``ref``: per seed, :func:`counts_by_group` of a run, or its ``Scores``
    for AUROC (:func:`lstainnorm.compare.stats.group_bootstrap`, which ``lstainnorm compare`` uses too)."""
    return group_bootstrap(runs, ref, samples=samples, seed=seed)


def paired_rows(sel: Sequence[dict], methods: Sequence[str], reference: str, metric: str = "bal_acc", data: str = "by_group") -> list[list]:
    """Rows of the table of each method minus ``reference`` (records with ``method``, ``seed``, the
    ``metric`` and what its slide bootstrap resamples, ``data``: ``by_group`` counts for balanced
    accuracy, ``Scores`` for AUROC): difference, paired t and slide-bootstrap intervals, per seed, verdict."""
    ref = {d["seed"]: d for d in sel if d["method"] == reference}
    rows = []
    for method in methods:
        if method == reference:
            continue
        own = {d["seed"]: d for d in sel if d["method"] == method and d["seed"] in ref}
        if not own:
            continue
        diffs = [own[s][metric] - ref[s][metric] for s in sorted(own)]
        t = paired_t(diffs)
        t_ci = None if t is None else t[1:]
        d, lo, hi = slide_bootstrap({s: own[s][data] for s in own}, {s: ref[s][data] for s in own})
        rows.append([method, f"{d:+.3f}", "-" if t_ci is None else f"[{t_ci[0]:+.3f}, {t_ci[1]:+.3f}]",
                     f"[{lo:+.3f}, {hi:+.3f}]", " / ".join(f"{v:+.3f}" for v in diffs), verdict(t_ci, (lo, hi), groups="slides")])
    return rows


# The stain-aware methods (and the combination) paired against Macenko and against the
# augmentation-only method with the best mean validation balanced accuracy, besides lstainnorm and template.
STAIN_AWARE = ("stain", "lstainnorm-stain")
# Layers standardising by statistics pooled per scanner (``norm.stats_by=centre``).
POOLED_METHODS = ("template@centre", "lstainnorm@centre")


def best_on_validation(recs: Sequence[dict], candidates: Sequence[str]) -> str | None:
    """The candidate with the highest mean validation balanced accuracy over its runs in ``recs``
    (one protocol's records; test scores never enter), or None when none has a run."""
    scores = {m: float(np.mean(got)) for m, vals in _val_scores(recs, candidates).items() if (got := [v for v in vals if v is not None])}
    return max(scores, key=scores.get) if scores else None


def protocol_tables(sel: Sequence[dict], methods: Sequence[str], protocol: str) -> str:
    """The markdown tables of one protocol: summary, per domain, paired against lstainnorm and template,
    and the stain-aware methods paired against Macenko and the best augmentation."""
    recs = [d for d in sel if d["protocol"] == protocol]
    if not recs:
        return ""
    domains = sorted({c for d in recs for c in d["per_centre"]})
    rows = []
    for m in methods:
        rs = [d for d in recs if d["method"] == m]
        if not rs:
            continue
        rows.append([m, mean_std([d["bal_acc"] for d in rs], digits=3), mean_std([d["auroc"] for d in rs], digits=3), len(rs),
                     per_seed(rs, "bal_acc", "{:.3f}"), per_seed(rs, "best_epoch"), f"{np.mean([d['minutes'] for d in rs]):.1f}"])
    text = f"### {protocol}: {PROTOCOLS[protocol][0]}\n\n"
    text += markdown_table(["method", "balanced accuracy", "AUROC", "seeds", "bal. acc. per seed", "best epoch per seed", "min / run"], rows)
    dom_rows = []
    for m in methods:
        rs = [d for d in recs if d["method"] == m]
        if rs:
            dom_rows.append([m] + [
                f"{np.mean([d['per_centre'][c]['bal_acc'] for d in rs if c in d['per_centre']]):.3f} / "
                f"{np.nanmean([d['per_centre'][c]['auroc'] for d in rs if c in d['per_centre']]):.3f}" for c in domains])
    text += "\n\nPer test domain, balanced accuracy / AUROC (mean over seeds):\n\n" + markdown_table(["method"] + domains, dom_rows)
    paired = {}
    for reference in ("lstainnorm", "template"):
        prow = paired[reference] = paired_rows(recs, methods, reference)
        if prow:
            text += (f"\n\nBalanced accuracy, each method minus `{reference}` (paired by seed; 95 % intervals: paired t over "
                     f"seeds, and a bootstrap of the seed-mean difference over test slides, {BOOTSTRAP_SAMPLES} resamples):\n\n")
            text += markdown_table(["method", "difference", "95 % CI (paired t)", "95 % CI (slide bootstrap)", "per seed", "verdict"], prow)
    stain_rows = [m for m in methods if m in STAIN_AWARE or m in POOLED_METHODS or "+" in m]
    best_aug = best_on_validation(recs, AUGMENT_CANDIDATES)
    if stain_rows:
        text += stain_aware_tables(recs, stain_rows, best_aug, paired["template"])
    return text


def stain_aware_tables(recs: Sequence[dict], candidates: Sequence[str], best_aug: str | None, template_rows: Sequence[list]) -> str:
    """The stain-aware and pooled candidates paired against `none`, Macenko and the best augmentation (`template_rows`:
    every method against `template`, the table above), then one line saying whether any is: a candidate
    resolved above all four of them."""
    text = ""
    verdicts = {"template": {r[0]: r[-1] for r in template_rows}}
    for reference, why in (("none", ""), ("macenko", ""), (best_aug, ", the augmentation with the best validation balanced accuracy")):
        prow = paired_rows(recs, candidates, reference) if reference else []
        verdicts[reference] = {r[0]: r[-1] for r in prow}
        if prow:
            text += (f"\n\nThe stain-aware methods (and those pooling statistics per centre) minus `{reference}`{why} "
                     "(paired by seed; the same intervals):\n\n")
            text += markdown_table(["method", "difference", "95 % CI (paired t)", "95 % CI (slide bootstrap)", "per seed", "verdict"], prow)
    if not best_aug or not text:
        return text
    judges = ["none", "template", "macenko", best_aug]
    met = [m for m in candidates if all(verdicts[ref].get(m) == "better" for ref in judges)]
    return text + (f"\n\nResolved above every judge (a method above `{'`, `'.join(judges)}`: paired t over seeds and the slide "
                   f"bootstrap both above 0 against each): " + (f"met by {', '.join(f'`{m}`' for m in met)}." if met else "not met by any method."))


P2 = ("p2-midog-to-tupac", "p2-tupac-to-midog")


def both_directions_table(sel: Sequence[dict], methods: Sequence[str], combos: dict[str, str]) -> str:
    """The two P2 directions side by side, for advice that holds only where both agree: each method's
    mean balanced accuracy per direction and their mean, and its paired difference against `none`
    and `template` per direction with that direction's verdict (the rows of its own tables; nothing
    is pooled across directions, whose test sets differ). ``combos``: each direction's
    ``best-norm+best-augment``, shown as one row."""
    recs = {p: [d for d in sel if d["protocol"] == p] for p in P2}
    if not all(recs.values()):
        return ""
    alias = {p: {**{m: m for m in methods}, COMBO: combos.get(p, "")} for p in P2}
    paired = {(p, ref): {r[0]: r for r in paired_rows(recs[p], [alias[p][m] for m in methods], ref)} for p in P2 for ref in ("none", "template")}

    def cell(p: str, m: str, ref: str) -> str:
        r = paired[(p, ref)].get(alias[p][m])
        return f"{r[1]} ({_short(r[-1])})" if r else "-"

    rows, ahead, resolved = [], [], []
    for m in methods:
        means = [[d["bal_acc"] for d in recs[p] if d["method"] == alias[p][m]] for p in P2]
        if not all(means):
            continue
        name = m if m != COMBO else f"{COMBO} ({' / '.join(combos[p] for p in P2)})"
        rows.append([name, *(f"{np.mean(v):.3f}" for v in means), f"{np.mean([np.mean(v) for v in means]):.3f}",
                     *(f"{cell(P2[0], m, ref)} / {cell(P2[1], m, ref)}" for ref in ("none", "template"))])
        diffs = [paired[(p, ref)].get(alias[p][m]) for p in P2 for ref in ("none", "template")]
        if m not in ("none", "template") and all(r and float(r[1]) > 0 for r in diffs):
            ahead.append(name)
            if all(r[-1] == "better" for r in diffs):
                resolved.append(name)
    text = ("\n### P2, both directions: where they agree\n\nBalanced accuracy per direction (mean over seeds) and "
            "the paired difference against `none` and `template`, MIDOG -> TUPAC16 / TUPAC16 -> MIDOG, each with its "
            "direction's verdict (b: better, w: worse, ns: not resolved; the tables above):\n\n")
    text += markdown_table(["method", "MIDOG -> TUPAC16", "TUPAC16 -> MIDOG", "mean", "minus `none`", "minus `template`"], rows)
    text += ("\n\nAhead of both `none` and `template` in both directions (seed means): "
             + (", ".join(f"`{m}`" for m in ahead) if ahead else "no method") + "; resolved above both in both directions: "
             + (", ".join(f"`{m}`" for m in resolved) if resolved else "no method") + ".\n")
    return text


def _short(verdict: str) -> str:
    return {"better": "b", "worse": "w"}.get(verdict, "ns")


def suite_record(rec: dict) -> dict:
    """A record in the form the tables read: records of this suite before it ran on the comparison
    engine (``bal_acc`` at the top) as they are; a :mod:`lstainnorm.compare` record flattened."""
    if "bal_acc" in rec:
        return rec
    m, v = rec.get("metrics", {}), rec.get("val", {})
    return {
        "protocol": _NAME_OF_SPEC.get(rec["protocol"], rec["protocol"]), "method": rec["method"], "seed": rec["seed"],
        "overrides": rec.get("overrides", []),
        **{k: m.get(k) for k in ("bal_acc", "auroc", "acc", "f1")},
        "per_centre": rec.get("per_centre", {}), "by_group": rec.get("groups", {}),
        # Validation balanced accuracy of the chosen checkpoint (whatever metric chose it): what picks
        # the best normalisation and the best augmentation to combine (never the test split).
        "val_bal_acc": v.get("bal_acc"), "val_auroc": v.get("auroc"), "monitor": rec.get("monitor"),
        "threshold": rec.get("threshold"), "epochs_run": rec.get("epochs_run"), "best_epoch": rec.get("best_epoch"),
        "minutes": (rec.get("seconds") or float("nan")) / 60, "run_dir": rec.get("run_dir"), "code": rec.get("code"),
        "predictions": rec.get("predictions"),
    }


def mitosis_benchmark(
    config: str | Path,
    data: str | Path,
    out: str | Path,
    methods: Sequence[str] = MITOSIS_METHODS,
    seeds: Sequence[int] = (0, 1, 2),
    protocols: Sequence[str] = tuple(PROTOCOLS),
    overrides: Sequence[str] = (),
    stress: bool = False,
    progress: bool = True,
    run_missing: bool = True,
    workers: int = 1,
    executor: str = "local",
    executor_options: Sequence[str] = (),
    records: str | Path | None = None,
) -> dict:
    """Train ``config`` on the AMi-Br folder ``data`` for every protocol, method and seed; write
    ``out/mitosis.md`` and ``out/mitosis.json`` (see the module docstring). Each run is a job of the
    comparison engine (:func:`lstainnorm.compare.engine.run_jobs`: an ``lstainnorm train`` process, on
    ``workers`` local workers or a submitit cluster, resumable, failures kept in ``out/failures.jsonl``).
    ``run_missing=False`` trains nothing and tables the runs recorded in ``out/results.jsonl`` (or in
    ``records``, a results file such as the committed ones)."""
    out, data = Path(out), Path(data)
    manifest = data / "metadata.csv"
    if (run_missing or stress) and not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: --data must be the AMi-Br folder (metadata.csv and images/)")
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"unknown protocol {p!r}; choose from {list(PROTOCOLS)}")
    if run_missing:
        load_config(config, [f"data.manifest={manifest}", *overrides])  # a bad config or override fails before any run

    def job(p: str, m: str, s: int) -> Job:
        return Job(p, m, s, tuple(method_overrides(m, out / "cache") + PROTOCOLS[p][1] + [f"data.manifest={manifest}", *overrides]))

    def run_all(jobs: list[Job]) -> list[dict]:
        return [suite_record(r) for r in engine_records(Path(config), jobs, out, run_missing, workers, executor, executor_options,
                                                         progress, overrides, _NAME_OF_SPEC, records and Path(records))]

    singles = [m for m in methods if m != COMBO]
    sel, parts, total, combos = [], [], 0, {}
    for p in protocols:  # a protocol's single methods, then its combination once they are known
        jobs = [job(p, m, s) for s in seeds for m in singles]
        got = run_all(jobs)
        total += len(jobs)
        shown = list(singles)
        note = ""
        if COMBO in methods:
            total += len(seeds)
            combo, why = choose_combo(got, p, seeds, methods)
            note = f"\n`{COMBO}`: " + (f"**{combo}**, {why}." if combo else f"not run yet, it {why}.") + "\n"
            if combo:
                combos[p] = combo
                got = got + run_all([job(p, combo, s) for s in seeds])
                shown.append(combo)
        sel += got
        part = protocol_tables(got, shown, p)
        if part:
            parts.append(part + "\n" + note)

    text = (f"AMi-Br ({data}), config `{config}`{' with ' + ' '.join(overrides) if overrides else ''}; seeds {list(seeds)}; "
            "balanced accuracy and AUROC on each protocol's test crops, mean ± std over seeds.\n")
    if sel:
        text += commits_line(sel) + "\n"
    if len(sel) < total:
        text += f"\n**In progress: {len(sel)} of {total} runs done**; rows list the runs done so far.\n"
    for part in parts:
        text += "\n" + part
    if all(p in protocols for p in P2):
        text += both_directions_table(sel, [m for m in methods if m != COMBO or all(p in combos for p in P2)], combos)
    result: dict = {"runs": sel, "text": text}
    if stress and sel:  # one seed of each method, on P1's test crops (the published split)
        first = min(seeds)
        chosen = [d for d in sel if d["protocol"] == "p1" and d["seed"] == first]
        if chosen:
            def rerun(r: dict) -> str:  # records copied without their run folders: train the run again for its curves
                os.environ.pop(RUN_DIR_ENV, None)  # a new run folder, not the last run's
                j = job(r["protocol"], r["method"], r["seed"])
                cfg, notes = load_config(config, [*j.overrides, f"seed={j.seed}", f"output_path={out / 'runs'}", "trainer.progress=false"])
                return train(cfg, notes)["run_dir"]

            st = stress_runs(chosen, manifest, out / "stress", split="test", progress=progress, rerun=rerun if run_missing else None)
            result["stress"] = st["scores"]
            text += (f"\nStress curves (p1, seed {first}, the test crops; {len(st['scores'])} of {len(chosen)} methods):\n\n"
                     + st["text"] + (f"\nCurves: {st['png']}\n" if st["scores"] else ""))
        else:
            text += "\nStress curves: skipped (they are drawn for p1's runs; p1 was not among the protocols)\n"
        result["text"] = text
    atomic_write_bytes(out / "mitosis.md", text.encode())
    write_json(out / "mitosis.json", result)
    return result
