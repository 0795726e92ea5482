"""Stress scores of the stain-aware options on the demo's synthetic centres.

    python benchmarks/stress_stain.py --out /tmp/stress_stain --seeds 0 1 2     # ~1 h on 2 CPU cores

For each seed and variant: ``lstainnorm demo`` trains the variant on centre A (the demo's config),
then ``lstainnorm stress`` re-stains the demo's test tiles (all four centres) along the H/E-ratio,
JPEG and combined axes at severities 0.5 and 1. The table gives each axis's robustness score (area
under accuracy-vs-severity over the accuracy at 0; 1 = no loss), mean +- sd over seeds, and the
accuracy at severity 0. The target: an H/E-ratio score >= 0.9 (LStainNorm ~0.75 in the
first stress curves). Resumable: a finished demo or stress folder is reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, save  # noqa: E402

# variant -> (demo norm mode, extra config overrides)
VARIANTS = {
    "template": ("template", []),
    "lstainnorm": ("lstainnorm", []),
    "stain": ("stain", []),
    "lstainnorm-stain": ("lstainnorm", ["norm.stain_first=true"]),
}
AXES = ("he-ratio", "jpeg", "combined")
LEVELS = ("0.5", "1")


def _lstainnorm() -> str:
    return str(Path(sys.executable).with_name("lstainnorm"))


def run_variant(out: Path, variant: str, seed: int) -> dict:
    mode, overrides = VARIANTS[variant]
    folder = out / f"{variant}_s{seed}"
    runs = sorted((folder / "runs").glob(f"*_demo_{mode}")) if (folder / "runs").is_dir() else []
    finished = [r for r in runs if (r / "metrics.json").is_file()]
    if not finished:
        cmd = [_lstainnorm(), "demo", "--out", str(folder), "--methods", mode, "--seed", str(seed), "--set", "trainer.progress=false"]
        for o in overrides:
            cmd += ["--set", o]
        print(f"[stress_stain] {variant} seed {seed}: training", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        finished = [r for r in sorted((folder / "runs").glob(f"*_demo_{mode}")) if (r / "metrics.json").is_file()]
    run = finished[-1]
    stress_out = folder / "stress"
    if not (stress_out / "stress.json").is_file():
        print(f"[stress_stain] {variant} seed {seed}: stress", file=sys.stderr, flush=True)
        manifest = next(folder.glob("synth*/manifest.csv"))  # the demo names its data folder by tile size
        subprocess.run([_lstainnorm(), "stress", str(run), "--data", str(manifest), "--split", "test",
                        "--axes", *AXES, "--levels", *LEVELS, "--out", str(stress_out)], check=True, stdout=subprocess.DEVNULL)
    res = json.loads((stress_out / "stress.json").read_text())
    rows = [json.loads(line) for line in (stress_out / "results.jsonl").read_text().splitlines() if line.strip()]
    res["baseline"] = next(r[res["metric"]] for r in rows if r["axis"] == "none")
    res["at_1"] = {r["axis"]: r[res["metric"]] for r in rows if r["severity"] == 1.0}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench_out/stress_stain"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for seed in args.seeds:
        for v in args.variants:
            results[v].append(run_variant(args.out, v, seed))

    def cell(vals: list[float], fmt: str = ".3f") -> str:
        if len(vals) < 2:
            return format(vals[0], fmt)
        return f"{format(statistics.mean(vals), fmt)} ± {format(statistics.stdev(vals), fmt)}"

    rows = []
    for v, recs in results.items():
        scores = [[float(r["scores"][a]) for r in recs] for a in AXES]
        acc0 = [100.0 * float(r["baseline"]) for r in recs]
        he1 = [100.0 * float(r["at_1"]["he-ratio"]) for r in recs]
        rows.append([v, *(cell(s) for s in scores), cell(acc0, ".1f"), cell(he1, ".1f"), " / ".join(f"{s:.3f}" for s in scores[0]), len(recs)])
    header = ["variant", *(f"{a} score" for a in AXES), "accuracy at severity 0 (%)", "at he-ratio 1 (%)", "he-ratio score per seed", "seeds"]
    text = ("Demo runs (synthetic centres, trained on centre A), stress on the test tiles of all four centres at severities "
            f"0, {', '.join(LEVELS)}; robustness score mean ± sd over seeds:\n\n" + markdown_table(header, rows))
    print(text)
    print(f"\nwritten: {save('stress_stain', text, {v: recs for v, recs in results.items()})}")


if __name__ == "__main__":
    main()
