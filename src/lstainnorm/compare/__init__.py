"""``lstainnorm compare``: which normalisation works on *your* centres.

Trains every method on every protocol with every seed (:mod:`.engine`: local workers or a cluster,
resumable), then writes tables with paired statistics, power lines and an HTML report (:mod:`.report`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from ..files import atomic_write_bytes
from .engine import EXECUTORS, Job, load_failures, load_records, run_jobs
from .protocols import PROTOCOL_HELP, expand_protocols
from .report import write_report

__all__ = ["compare", "EXECUTORS", "PROTOCOL_HELP", "DEFAULT_METHODS"]

DEFAULT_METHODS = ("none", "template", "lstainnorm")


def _settings_hash(config: Path) -> str:
    import yaml

    return hashlib.sha256(json.dumps(yaml.safe_load(config.read_text()), sort_keys=True, default=str).encode()).hexdigest()


def compare(
    config: str | Path, out: str | Path, methods: Sequence[str] = DEFAULT_METHODS, seeds: Sequence[int] = (0, 1, 2),
    protocols: Sequence[str] = ("split",), baseline: str | None = None, overrides: Sequence[str] = (), workers: int = 1,
    executor: str = "local", executor_options: Sequence[str] = (), retry_failed: bool = False, train: bool = True,
    plots: bool = True, progress: bool = True, keep_last: bool = False,
) -> dict:
    """Compare ``methods`` on ``config``'s data: every protocol x method x seed trained (unless recorded
    in ``out``), then ``out/compare.md``, CSV tables and ``out/report.html``. ``baseline``: what every
    method is paired against (default: the first method). ``train=False`` reports the runs so far.
    ``keep_last``: keep each finished run's ``last.ckpt`` beside its ``best.ckpt``."""
    from ..config import load_config, resolve_config
    from ..experiments.runner import method_overrides

    config, out = resolve_config(config), Path(out)
    cfg, _ = load_config(config, list(overrides))  # a bad config or override fails here, before any run
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ValueError("--methods: name at least one method")
    baseline = baseline or methods[0]
    if baseline not in methods:
        raise ValueError(f"--baseline {baseline!r} is not among --methods {methods}")
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    per_method = {m: method_overrides(m, out / "cache") for m in methods}  # unknown methods fail here
    expanded = expand_protocols(protocols, cfg)
    # A comparison is identified by its config's settings, not its path or comments: a checkout elsewhere
    # (or a reworded comment) resumes it, a changed setting is refused.
    settings = {"config": str(config.resolve()), "config_sha256": _settings_hash(config), "overrides": list(overrides)}
    saved = out / "compare.json"
    if saved.is_file():
        before = json.loads(saved.read_text())
        same = ("config_sha256", "overrides") if "config_sha256" in before else ("config", "overrides")
        if any(before.get(k) != settings[k] for k in same):
            raise ValueError(f"{out} holds a comparison of {before.get('config')} with overrides {before.get('overrides')}; "
                             "its records would not match this config: choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(saved, json.dumps({**settings, "methods": methods, "seeds": seeds, "protocols": list(expanded),
                                          "baseline": baseline}, indent=2).encode())
    jobs = [Job(p, m, s, tuple([*overrides, *per_method[m], *ov])) for p, ov in expanded.items() for s in seeds for m in methods]
    if train:
        records, failures = run_jobs(config, jobs, out, workers=workers, executor=executor, executor_options=executor_options,
                                     retry_failed=retry_failed, progress=print if progress else None, keep_last=keep_last)
    else:
        keys = {j.key for j in jobs}
        records = [r for r in load_records(out) if f"{r['protocol']}|{r['method']}|{r['seed']}" in keys]
        failures = [f for f in load_failures(out) if f["key"] in keys]
    title = f"Comparison on {config.name}"
    res = write_report(records, failures, out, list(expanded), methods, baseline, title=title, plots=plots)
    res.update(records=records, failures=failures, protocols=list(expanded))
    return res
