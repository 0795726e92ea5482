"""The report of a comparison: markdown and CSV tables, and an HTML page with plots.

Written from the records alone (``results.jsonl``; run folders add learning curves and sample tiles
where they still exist), so a report can be made again at any time without training.
"""

from __future__ import annotations

import csv
import html
import io
import math
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..files import atomic_write_bytes
from ..experiments.runner import commits_line, markdown_table, mean_std
from .stats import Scores, auroc, group_bootstrap, paired_t, power_line, verdict

__all__ = ["metric_of", "summary_rows", "pair_rows", "write_report"]


def metric_of(records: Sequence[dict]) -> str:
    """The headline metric: balanced accuracy for classification runs, Dice for segmentation."""
    keys = set().union(*(r.get("metrics", {}).keys() for r in records)) if records else set()
    return "bal_acc" if "bal_acc" in keys else "dice" if "dice" in keys else sorted(keys)[0] if keys else "bal_acc"


def _fmt(v: float | None, digits: int = 3, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _mean_std(vals: Sequence[float]) -> str:
    return mean_std(vals, digits=3) if vals else "-"


def _methods(records: Sequence[dict], order: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(r["method"] for r in records))
    return [m for m in order if m in seen] + [m for m in seen if m not in order]


def summary_rows(records: Sequence[dict], protocol: str, methods: Sequence[str], metric: str) -> list[list[Any]]:
    rows = []
    for m in _methods([r for r in records if r["protocol"] == protocol], methods):
        rs = sorted((r for r in records if r["protocol"] == protocol and r["method"] == m), key=lambda r: r["seed"])
        vals = [r["metrics"][metric] for r in rs if metric in r["metrics"]]
        auroc = [r["metrics"]["auroc"] for r in rs if "auroc" in r["metrics"]]
        rows.append([m, _mean_std(vals), _mean_std(auroc) if auroc else "-", len(rs), " / ".join(_fmt(v) for v in vals),
                     " / ".join(str(r.get("best_epoch", "-")) for r in rs), f"{np.mean([r.get('minutes') or 0 for r in rs]):.1f}"])
    return rows


def _scores(r: dict) -> Scores | None:
    s = r.get("scores")
    return Scores(s["label"], s["score"], s["group"]) if s else None


def pair_rows(records: Sequence[dict], protocol: str, methods: Sequence[str], baseline: str, metric: str) -> list[dict]:
    """Each method minus ``baseline`` on the same seeds: mean difference, paired-t and group-bootstrap
    intervals, verdict, and the power line (smallest resolvable difference; seeds for one point).
    ``metric="auroc"``: from the records' per-tile scores (two-class runs), every seed's AUROC and its
    bootstrap computed from the same scores."""
    sel = [r for r in records if r["protocol"] == protocol]
    if metric == "auroc":
        sel = [{**r, "metrics": {"auroc": auroc(sc)}, "groups": sc} for r in sel if (sc := _scores(r)) is not None]
    ref = {r["seed"]: r for r in sel if r["method"] == baseline}
    out = []
    for m in _methods(sel, methods):
        if m == baseline:
            continue
        own = {r["seed"]: r for r in sel if r["method"] == m and r["seed"] in ref}
        if not own:
            continue
        seeds = sorted(own)
        diffs = [own[s]["metrics"][metric] - ref[s]["metrics"][metric] for s in seeds]
        t = paired_t(diffs)
        boot = None
        if all(own[s].get("groups") and ref[s].get("groups") for s in seeds):
            _, lo, hi = group_bootstrap({s: own[s]["groups"] for s in seeds}, {s: ref[s]["groups"] for s in seeds})
            boot = (lo, hi)
        resolvable, needed = power_line(diffs)
        out.append({"method": m, "baseline": baseline, "seeds": len(seeds), "diff": float(np.mean(diffs)), "per_seed": diffs,
                    "t_low": t[1] if t else None, "t_high": t[2] if t else None,
                    "boot_low": boot[0] if boot else None, "boot_high": boot[1] if boot else None,
                    "verdict": verdict((t[1], t[2]) if t else None, boot), "resolvable": resolvable, "seeds_for_1pt": needed})
    return out


def pair_table(pairs: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "difference", "95 % CI (paired t)", "95 % CI (group bootstrap)", "per seed", "verdict", "resolvable with these seeds", "seeds for 1 point"]
    rows = [[p["method"], _fmt(p["diff"], sign=True),
             f"[{_fmt(p['t_low'], sign=True)}, {_fmt(p['t_high'], sign=True)}]" if p["t_low"] is not None else "-",
             f"[{_fmt(p['boot_low'], sign=True)}, {_fmt(p['boot_high'], sign=True)}]" if p["boot_low"] is not None else "-",
             " / ".join(_fmt(v, sign=True) for v in p["per_seed"]), p["verdict"],
             f"±{p['resolvable']:.3f}" if p["resolvable"] is not None else "-",
             str(p["seeds_for_1pt"]) if p["seeds_for_1pt"] is not None else ("-" if p["resolvable"] is None else "> 1000")]
            for p in pairs]
    return header, rows


def _centre_rows(records: Sequence[dict], protocol: str, methods: Sequence[str], metric: str) -> tuple[list[str], list[list[str]]]:
    sel = [r for r in records if r["protocol"] == protocol]
    centres = sorted({c for r in sel for c in r.get("per_centre", {}) if c})
    rows = []
    for m in _methods(sel, methods):
        rs = [r for r in sel if r["method"] == m]
        rows.append([m] + [_mean_std([r["per_centre"][c][metric] for r in rs if metric in r.get("per_centre", {}).get(c, {})]) for c in centres])
    return ["method", *centres], rows


def _plots(records: Sequence[dict], protocols: Sequence[str], methods: Sequence[str], baseline: str, metric: str,
           pairs: dict[str, list[dict]], out: Path) -> dict[str, list[tuple[str, str]]]:
    """PNG plots per protocol: per-centre scores with 95 % intervals, the forest plot of the paired
    differences, every run's validation curve, and sample tiles (each method's first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .stats import t_quantile

    figs: dict[str, list[tuple[str, str]]] = {}
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for p in protocols:
        sel = [r for r in records if r["protocol"] == p]
        if not sel:
            continue
        slug = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in p)
        items: list[tuple[str, str]] = []
        ms = _methods(sel, methods)
        centres = sorted({c for r in sel for c in r.get("per_centre", {}) if c}) or ["all"]
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(centres) * max(1, len(ms)) / 2), 3.6))
        width = 0.8 / max(1, len(ms))
        for i, m in enumerate(ms):
            rs = [r for r in sel if r["method"] == m]
            means, halves = [], []
            for c in centres:
                v = [r["metrics"][metric] if c == "all" else r["per_centre"].get(c, {}).get(metric) for r in rs]
                v = [x for x in v if x is not None]
                means.append(np.mean(v) if v else np.nan)
                halves.append(t_quantile(len(v) - 1) * np.std(v, ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0)
            ax.errorbar(np.arange(len(centres)) + (i - (len(ms) - 1) / 2) * width, means, yerr=halves, fmt="o", capsize=3, label=m)
        ax.set_xticks(range(len(centres)), centres, rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(centres) - 0.4)
        ax.set_ylabel(metric)
        ax.set_title(f"{p}: {metric} per test centre (mean, 95 % t interval over seeds)", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = fig_dir / f"{slug}_centres.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        items.append(("Scores per test centre", str(path.relative_to(out))))
        pr = pairs.get(p, [])
        if pr:
            fig, ax = plt.subplots(figsize=(6, 1.6 + 0.45 * len(pr)))
            for i, row in enumerate(pr):
                if row["t_low"] is not None:
                    ax.plot([row["t_low"], row["t_high"]], [i + 0.1] * 2, color="tab:blue", lw=2, label="paired t" if i == 0 else None)
                if row["boot_low"] is not None:
                    ax.plot([row["boot_low"], row["boot_high"]], [i - 0.1] * 2, color="tab:orange", lw=2, label="group bootstrap" if i == 0 else None)
                ax.plot([row["diff"]], [i], "ko", ms=4)
            ax.axvline(0, color="grey", lw=1)
            ax.set_ylim(-0.7, len(pr) - 0.3)
            ax.set_yticks(range(len(pr)), [r["method"] for r in pr], fontsize=8)
            ax.set_xlabel(f"{metric} minus {baseline} (95 % intervals)")
            ax.legend(fontsize=7, loc="best")
            fig.tight_layout()
            path = fig_dir / f"{slug}_forest.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            items.append((f"Paired differences against {baseline}", str(path.relative_to(out))))
        curves = [(r, Path(r["run_dir"]) / "history.csv") for r in sel if r.get("run_dir")]
        curves = [(r, h) for r, h in curves if h.is_file()]
        if curves:
            fig, ax = plt.subplots(figsize=(6.5, 3.6))
            colours = {m: f"C{i % 10}" for i, m in enumerate(ms)}
            for r, h in curves:
                with open(h, newline="") as fh:
                    rows = list(csv.DictReader(fh))
                mon = r.get("monitor") or ("val/" + metric)
                ys = [float(x[mon]) for x in rows if x.get(mon) not in (None, "")]
                ax.plot(range(1, len(ys) + 1), ys, color=colours.get(r["method"], "k"), alpha=0.7, lw=1,
                        label=r["method"] if r["seed"] == min(x["seed"] for x in sel if x["method"] == r["method"]) else None)
            ax.set_xlabel("epoch")
            ax.set_ylabel(curves[0][0].get("monitor") or metric)
            ax.set_title(f"{p}: validation curve of every run", fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = fig_dir / f"{slug}_curves.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            items.append(("Learning curves (the monitored validation metric)", str(path.relative_to(out))))
        for m in ms:
            first = min((r for r in sel if r["method"] == m), key=lambda r: r["seed"])
            grid = Path(first.get("run_dir", "")) / "normalization.png"
            if first.get("run_dir") and grid.is_file():
                dst = fig_dir / f"{slug}_tiles_{''.join(ch if ch.isalnum() or ch in '-_' else '_' for ch in m)}.png"
                shutil.copyfile(grid, dst)
                items.append((f"Sample tiles, {m} (seed {first['seed']}): before (top), after (bottom)", str(dst.relative_to(out))))
        figs[p] = items
    return figs


def write_report(records: Sequence[dict], failures: Sequence[dict], out: Path, protocols: Sequence[str], methods: Sequence[str],
                 baseline: str, title: str = "Comparison", plots: bool = True) -> dict[str, Any]:
    """``OUT/compare.md``, ``runs.csv``, ``summary.csv``, ``pairs.csv`` and (``plots``) ``report.html``
    with its figures. Returns ``{"text", "pairs", "metric"}``."""
    out = Path(out)
    metric = metric_of(records)
    parts = [f"# {title}\n", f"Metric: {metric} on each protocol's test tiles; mean ± std over seeds; "
             f"paired differences against `{baseline}` (a verdict only where the paired t over seeds and the bootstrap "
             "over test groups both exclude 0).\n"]
    if records:
        parts.append(commits_line(records) + "\n")
    pairs: dict[str, list[dict]] = {}
    summary_csv, pair_csv = [], []
    for p in protocols:
        sel = [r for r in records if r["protocol"] == p]
        if not sel:
            parts.append(f"## {p}\n\nNo finished runs yet.\n")
            continue
        rows = summary_rows(records, p, methods, metric)
        summary_csv += [[p, *r] for r in rows]
        parts.append(f"## {p}\n\n" + markdown_table([ "method", metric, "AUROC", "seeds", "per seed", "best epoch per seed", "min / run"], rows) + "\n")
        head, crow = _centre_rows(records, p, methods, metric)
        if len(head) > 2:
            parts.append(f"Per test centre ({metric}, mean ± std over seeds):\n\n" + markdown_table(head, crow) + "\n")
        pr = pairs[p] = pair_rows(records, p, methods, baseline, metric)
        if pr:
            h, prow = pair_table(pr)
            parts.append(f"Each method minus `{baseline}`, paired by seed:\n\n" + markdown_table(h, prow) + "\n")
            parts.append("*resolvable with these seeds*: the smallest mean difference whose paired-t interval would exclude 0 "
                         "at the spread these seeds show; *seeds for 1 point*: how many seeds a difference of 0.01 would need.\n")
            pair_csv += [[p, metric, *r] for r in prow]
        if metric != "auroc" and (pa := pair_rows(records, p, methods, baseline, "auroc")):
            h, prow = pair_table(pa)
            pair_csv += [[p, "auroc", *r] for r in prow]
            parts.append(f"The same pairs in AUROC (threshold-free: how well each network ranks the tiles, whatever decision "
                         f"point {metric} is measured at):\n\n" + markdown_table(h, prow) + "\n")
    if failures:
        parts.append("## Failed runs\n\n" + markdown_table(["protocol", "method", "seed", "exit code", "log"],
                                                      [[f["protocol"], f["method"], f["seed"], f["returncode"], f["log"]] for f in failures])
                     + "\n\nRetry them with `--retry-failed`.\n")
    text = "\n".join(parts)
    atomic_write_bytes(out / "compare.md", text.encode())
    _csv(out / "summary.csv", ["protocol", "method", metric, "auroc", "seeds", "per_seed", "best_epoch_per_seed", "minutes_per_run"], summary_csv)
    _csv(out / "pairs.csv", ["protocol", "metric", "method", "difference", "t_ci", "bootstrap_ci", "per_seed", "verdict", "resolvable", "seeds_for_1pt"], pair_csv)
    _csv(out / "runs.csv", ["protocol", "method", "seed", *sorted({k for r in records for k in r.get("metrics", {})}), "best_epoch", "run_dir"],
         [[r["protocol"], r["method"], r["seed"], *(r["metrics"].get(k) for k in sorted({k for x in records for k in x.get("metrics", {})})),
           r.get("best_epoch"), r.get("run_dir")] for r in records])
    if plots:
        figs = _plots(records, protocols, methods, baseline, metric, pairs, out) if records else {}
        atomic_write_bytes(out / "report.html", _html(title, text, figs, protocols).encode())
    return {"text": text, "pairs": pairs, "metric": metric}


def _csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def _html(title: str, markdown_text: str, figs: dict[str, list[tuple[str, str]]], protocols: Sequence[str]) -> str:
    """A self-contained page: the tables (markdown tables turned into HTML tables) and each protocol's figures."""
    body: list[str] = []
    section = None
    table: list[list[str]] = []

    def flush() -> None:
        nonlocal table
        if table:
            head, *rest = table
            body.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest) + "</tbody></table>")
            table = []

    def add_figs(p: str | None) -> None:
        for caption, src in figs.get(p or "", []):
            body.append(f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>')

    for line in markdown_text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                table.append(cells)
            continue
        flush()
        if line.startswith("## "):
            add_figs(section)
            section = line[3:].strip()
            body.append(f"<h2>{html.escape(section)}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    add_figs(section)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:collapse;margin:1em 0;"
             "font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
             "figure{margin:1em 0}img{max-width:100%}figcaption{font-size:12px;color:#555}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n"
            f"<style>{style}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")
