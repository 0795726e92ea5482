"""What the experiments share: the resumable loop over training runs, method names, tables.

:func:`run_resumable` is the loop behind ``lstainnorm demo`` and the in-process benchmarks: each job
(a dict of the settings that identify it) is trained unless ``out/results.jsonl`` already holds a record with those settings; each record is appended as
soon as its run ends (atomic rewrite), so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..baselines.augment import AUGMENT_MODES
from ..files import atomic_write_bytes
from ..layers.color import list_spaces
from ..layers.registry import list_norms
from ..runs import RUN_DIR_ENV, code_version

__all__ = [
    "run_resumable", "commits_line", "benchmark_methods", "method_overrides", "markdown_table", "median_ms", "mean_std", "paired_table",
    "per_seed",
    "LAYER_MODES", "ABLATIONS", "ABLATION_METHODS", "OPTIONS",
]

# The method's own layers; every other registered norm is a baseline plugin (fixed pre-processing).
LAYER_MODES = ("none", "template", "learnable", "lstainnorm", "stain")

# LStainNorm with one thing changed (the ablations); each is compared with ``lstainnorm``
# as the config trains it (templates estimated on the training set, learned, attention fusion).
ABLATIONS: dict[str, list[str]] = {
    "lstainnorm-frozen": ["norm.learn_template=false"],             # templates fixed at their estimate
    "lstainnorm-init-reference": ["norm.templates=reference"],      # starts from the reference's numbers
    "lstainnorm-init-image": [],                                    # starts from one training image (the benchmark names it)
    "lstainnorm-mean": ["norm.fusion=mean"],                        # plain mean of the branches, no attention
    "lstainnorm-tissue": ["norm.tissue_stats=true"],                # statistics over tissue pixels only
}
# LStainNorm with a stain-aware option on (not an ablation: something added, measured where named).
OPTIONS: dict[str, list[str]] = {
    "lstainnorm-stain": ["norm.stain_first=true"],                  # a StainConcentrationNorm stage before the branches
}
# Any layer with its statistics pooled per centre: ``METHOD@centre`` (e.g. ``template@centre``).
POOLED = "@centre"
# The benchmarks' ``--ablation``: the ablations, each single space, and the frozen Lab template.
ABLATION_METHODS = ("lstainnorm", *ABLATIONS, "learnable-lab", "learnable-hsv", "learnable-rgb", "template")


def benchmark_methods() -> list[str]:
    """Every method a benchmark can train, derived from the registries: ``none``, each baseline
    plugin, each stain augmentation, ``template``, ``learnable-<space>`` per colour space, ``lstainnorm``."""
    plugins = [m for m in list_norms() if m not in LAYER_MODES]
    augments = [m for m in AUGMENT_MODES if m != "none"]
    return ["none", *plugins, *augments, "template", *(f"learnable-{s}" for s in list_spaces()), "lstainnorm"]


def method_overrides(method: str, cache: Path, image: str | Path | None = None) -> list[str]:
    """Config overrides that select ``method`` (a name of :func:`benchmark_methods` or of
    :data:`ABLATIONS`; ``lstainnorm-init-image`` needs ``image``, the one image to start from).
    ``NORM+AUGMENT`` combines a normalisation with a stain augmentation (e.g. ``macenko+hed-jitter``):
    the augmentation is applied to the tiles before the layer, in training only."""
    if "+" in method:
        norm, aug = method.split("+", 1)
        if aug not in AUGMENT_MODES or aug == "none" or norm in AUGMENT_MODES:
            raise ValueError(f"{method!r}: NORM+AUGMENT takes a normalisation and one of {[m for m in AUGMENT_MODES if m != 'none']}")
        return method_overrides(norm, cache, image) + [f"data.augment={aug}"]
    if method.endswith(POOLED):
        base = method[: -len(POOLED)]
        if base not in ("template", "lstainnorm", "lstainnorm-frozen") and not base.startswith("learnable-"):
            raise ValueError(f"{method!r}: {POOLED} pools the statistics of the layers template, learnable-SPACE, lstainnorm "
                             "and lstainnorm-frozen")
        return method_overrides(base, cache, image) + ["norm.stats_by=centre"]
    if method in OPTIONS:
        return ["norm.mode=lstainnorm", *OPTIONS[method]]
    if method in ABLATIONS:
        if method == "lstainnorm-init-image":
            if image is None:
                raise ValueError("lstainnorm-init-image needs the image to estimate its template on")
            return ["norm.mode=lstainnorm", f"norm.templates={image}"]
        return ["norm.mode=lstainnorm", *ABLATIONS[method]]
    if method in AUGMENT_MODES and method != "none":
        return ["norm.mode=none", f"data.augment={method}"]
    if method.startswith("learnable-") and method.split("-", 1)[1] in list_spaces():
        return ["norm.mode=learnable", f"norm.space={method.split('-', 1)[1]}"]
    if method in LAYER_MODES:
        return [f"norm.mode={method}"]
    if method in list_norms():  # a baseline plugin: normalised tiles are cached between seeds
        return [f"norm.mode={method}", f"norm.cache_dir={cache / method}"]
    raise ValueError(f"unknown benchmark method {method!r}; choose from {benchmark_methods() + list(ABLATIONS) + list(OPTIONS)}")


def run_resumable(
    out: Path, jobs: Sequence[dict[str, Any]], run: Callable[[dict[str, Any]], dict[str, Any]], label: str, progress: bool = True,
    train: bool = True,
) -> list[dict[str, Any]]:
    """Run every job not yet in ``out/results.jsonl``; return the records of ``jobs``, in order.

    A record is the job's settings, what ``run(job)`` returned, ``minutes`` and ``code``
    (:func:`~lstainnorm.runs.code_version`: the commit it ran). Job values
    must be JSON values (lists, not tuples) so that a reloaded record matches its job.
    ``train=False`` runs nothing: the records so far (the tables of a benchmark in progress).
    A job given twice (``--methods none none``) runs and counts once.
    """
    jobs = list({json.dumps(j, sort_keys=True): j for j in jobs}.values())
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def record_of(job: dict) -> dict | None:
        return next((d for d in done if all(d.get(k) == v for k, v in job.items())), None)

    code = None
    for job in jobs:
        if record_of(job) is not None or not train:
            continue
        os.environ.pop(RUN_DIR_ENV, None)  # each run gets a new run folder
        if progress:
            print(f"[{label}] " + ", ".join(f"{k} {job[k]}" for k in ("method", "seed") if k in job), flush=True)
        t = time.time()
        rec = {**job, **run(job)}
        rec["minutes"] = (time.time() - t) / 60
        code = code or code_version()
        rec["code"] = code  # tables say which commits their rows come from
        done.append(rec)
        atomic_write_bytes(path, ("\n".join(json.dumps(d) for d in done) + "\n").encode())
    return [r for r in (record_of(job) for job in jobs) if r is not None]


def commits_line(records: Sequence[dict]) -> str:
    """Which code the records come from: ``commit (n runs)`` per commit, ``+changes`` where tracked
    files differed from it, ``unrecorded`` for records older than the field. One commit is what a table
    that ranks methods needs; more than one is said, never hidden."""
    counts: dict[str, int] = {}
    for d in records:
        c = d.get("code") or {}
        key = (c["commit"][:10] + ("+changes" if c.get("dirty") else "")) if c.get("commit") else ("unrecorded" if not c else f"lstainnorm {c.get('lstainnorm')} (no git)")
        counts[key] = counts.get(key, 0) + 1
    parts = ", ".join(f"{k} ({n} run{'s' if n != 1 else ''})" for k, n in sorted(counts.items(), key=lambda t: -t[1]))
    warn = "" if len(counts) <= 1 else "; **rows mix code versions**: rerun them on one commit before ranking methods"
    return f"Code: {parts}{warn}."


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std`` (sample std) of ``values * scale``; one value alone, marked ``(1 seed)``: it has no
    spread to show, and ``± 0.0`` would claim one."""
    m = scale * float(np.mean(values))
    if len(values) == 1:
        return f"{m:.{digits}f} (1 seed)"
    return f"{m:.{digits}f} ± {scale * float(np.std(values, ddof=1)):.{digits}f}"


def per_seed(records: Sequence[dict], key: str, fmt: str = "{}") -> str:
    """``records``' ``key`` in seed order, ``" / "``-joined (``-`` where a record lacks it)."""
    return " / ".join("-" if d.get(key) is None else fmt.format(d[key]) for d in sorted(records, key=lambda d: d["seed"]))


def paired_table(records: Sequence[dict], metric: str, reference: str = "lstainnorm", scale: float = 1.0, digits: int = 1) -> str:
    """Each method against ``reference`` on the same seeds: the per-seed differences of ``metric``,
    their mean and the 95 % confidence interval of the mean (paired t, n - 1 degrees of freedom).
    A difference "exceeds the noise" when its interval excludes 0. Empty if ``reference`` has no runs."""
    from scipy import stats

    ref = {d["seed"]: d[metric] for d in records if d["method"] == reference}
    if not ref:
        return ""
    rows = []
    for method in dict.fromkeys(d["method"] for d in records):
        if method == reference:
            continue
        diffs = [scale * (d[metric] - ref[d["seed"]]) for d in records if d["method"] == method and d["seed"] in ref]
        if not diffs:
            continue
        mean = float(np.mean(diffs))
        if len(diffs) > 1:
            half = float(stats.t.ppf(0.975, len(diffs) - 1) * np.std(diffs, ddof=1) / math.sqrt(len(diffs)))
            ci, verdict = f"[{mean - half:+.{digits}f}, {mean + half:+.{digits}f}]", ("better" if mean - half > 0 else "worse" if mean + half < 0 else "within noise")
        else:
            ci, verdict = "-", "one seed"
        rows.append([method, f"{mean:+.{digits}f}", ci, " / ".join(f"{v:+.{digits}f}" for v in diffs), verdict])
    return markdown_table(["method", f"{metric} - {reference} (mean)", "95 % CI (paired t)", "per seed", "vs reference"], rows)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)
