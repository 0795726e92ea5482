"""The data-set benchmarks behind BENCHMARKS.md (not part of the package: they read the repository's
configs and ../shared/data). Every training run goes through ``lstainnorm compare``'s engine.

    python benchmarks/bench.py speed                          # our layers vs torchstain, torch-staintools, StainTools
    python benchmarks/bench.py speed --tiles /data/tiles --n 128 --no-compile
    python benchmarks/bench.py accuracy --seeds 0 1 2         # synthetic centres, every method (about an hour on 2 cores)
    python benchmarks/bench.py accuracy --ablation            # LStainNorm's ablations, paired by seed
    python benchmarks/bench.py segmentation --seeds 0 1 2     # MoNuSeg nuclei, held-out hospitals
    python benchmarks/bench.py organ --seeds 0 1 2            # organ of origin on MoNuSeg crops, held-out hospitals
    python benchmarks/bench.py mitosis --seeds 0 1 2          # atypical mitoses across scanners (AMi-Br)
    python benchmarks/bench.py mitosis --protocols p1 --methods none lstainnorm --workers 2
    python benchmarks/bench.py mitosis --tables-only --records benchmarks/results/mitosis/results.jsonl   # committed tables
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the suites package beside this script

from lstainnorm.cli import _executor_args, int_range, positive_int  # noqa: E402

REPO = HERE.parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("kind", choices=["speed", "accuracy", "segmentation", "organ", "mitosis"])
    p.add_argument("-o", "--out", type=Path, default=Path("bench_out"), help="folder for the tables (speed.md, accuracy/accuracy.md, ...)")
    g = p.add_argument_group("speed")
    g.add_argument("--tiles", type=Path, help="folder of images to crop tiles from (default: $LSTAINNORM_SHARED_DATA/monuseg-train/images if set, else synthetic)")
    g.add_argument("--n", type=positive_int, default=64, help="tiles (default 64)")
    g.add_argument("--size", type=int_range(16, 4096), default=None, help="tile side (default 224 for speed, 96 for accuracy)")
    g.add_argument("--threads", type=positive_int, default=2)
    g.add_argument("--repeats", type=positive_int, default=3)
    g.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    g.add_argument("--slow-n", type=positive_int, default=8, help="tiles for the slow per-tile methods (Vahadane)")
    g = p.add_argument_group("accuracy, segmentation, organ and mitosis")
    g.add_argument("--methods", nargs="+", help="subset of: none, each baseline of lstainnorm.list_norms() (reinhard, macenko, vahadane), "
                   "randstainna, hed-jitter, template, learnable-<space> for each colour space, lstainnorm, "
                   "the ablations lstainnorm-frozen, -init-reference, -init-image, -mean, -tissue, and NORM+AUGMENT "
                   "(e.g. macenko+hed-jitter) (default: all for accuracy; none template learnable-lab lstainnorm macenko "
                   "for segmentation; fourteen methods and best-norm+best-augment, chosen on validation, for mitosis)")
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    g.add_argument("--epochs", type=positive_int, help="training epochs (default 8 for accuracy, 20 for organ)")
    g.add_argument("--per-class", type=positive_int, default=200)
    g.add_argument("--backbone", default="resnet18")
    g.add_argument("--preset", choices=["default", "monuseg"], default="default", help="accuracy: the synthetic centres (see lstainnorm synth --preset)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    g.add_argument("--stress", action="store_true", help="then `lstainnorm stress` every trained run on its test split (severities 0, 0.5, 1)")
    g.add_argument("--ablation", action="store_true", help="the ablations of LStainNorm instead of the methods: frozen templates, "
                   "initial template from the reference / one training image, mean fusion, tissue statistics, each single "
                   "space, the frozen Lab template; each compared with lstainnorm seed by seed")
    g = p.add_argument_group("organ")
    g.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "monuseg-train",
                   help="MoNuSeg folder with metadata.csv (organ, tss_code) and images/ (default ../shared/data/monuseg-train)")
    _executor_args(g, "runs at once (local processes sharing this machine's cores, or jobs in flight on a cluster)", "slurm_partition=gpu")
    g = p.add_argument_group("segmentation and mitosis")
    g.add_argument("--config", type=Path, default=None, help="the run config (default: configs/segment_monuseg_cpu.yaml for "
                   "segmentation, configs/mitosis_amibr_cpu.yaml for mitosis)")
    g.add_argument("--tables-only", action="store_true", help="train nothing: the tables of the runs recorded so far")
    g.add_argument("--records", type=Path, help="with --tables-only: table this results file (e.g. the committed "
                   "benchmarks/results/mitosis/results.jsonl) instead of OUT's (OUT's own records are left as they are)")
    g = p.add_argument_group("mitosis")
    g.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ami-br",
                   help="the AMi-Br folder: metadata.csv and images/ (default ../shared/data/ami-br)")
    g.add_argument("--protocols", nargs="+", choices=["p1", "p2-midog-to-tupac", "p2-tupac-to-midog"],
                   default=["p1", "p2-midog-to-tupac", "p2-tupac-to-midog"],
                   help="p1: the published split; p2-*: train on some scanners, test on every crop of the others (default: all three)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.records is not None and not a.tables_only:
        raise SystemExit("error: --records tables committed records: give --tables-only too")
    if a.records is not None and not a.records.is_file():
        raise SystemExit(f"error: --records {a.records}: no such file")
    if a.kind == "speed":
        from suites.speed import run_speed_cli

        res = run_speed_cli(a.out, n=a.n, size=a.size or 224, threads=a.threads, repeats=a.repeats, compile=not a.no_compile, tiles=a.tiles, slow_n=a.slow_n)
        print(res["text"])
        print(f"written: {a.out / 'speed.md'}")
        return 0
    report = "ablation" if a.ablation else a.kind
    if a.ablation:
        from lstainnorm.experiments.runner import ABLATION_METHODS

        a.methods = a.methods or list(ABLATION_METHODS)
    run = dict(workers=a.workers, executor=a.executor, executor_options=a.executor_options)
    tables = dict(run_missing=not a.tables_only, records=a.records)
    if a.kind == "segmentation":
        from suites.segmentation import SEGMENTATION_METHODS, segmentation_benchmark

        out = a.out / "segmentation"
        res = segmentation_benchmark(a.config or REPO / "configs" / "segment_monuseg_cpu.yaml", out, methods=a.methods or SEGMENTATION_METHODS,
                                     seeds=a.seeds, overrides=a.overrides, stress=a.stress, report=report, **tables, **run)
        print(res["text"])
        print(f"written: {out / (report + '.md')}")
        return 0
    if a.kind == "mitosis":
        from suites.mitosis import MITOSIS_METHODS, mitosis_benchmark

        out = a.out / "mitosis"
        res = mitosis_benchmark(a.config or REPO / "configs" / "mitosis_amibr_cpu.yaml", a.data, out,
                                methods=a.methods or MITOSIS_METHODS, seeds=a.seeds, protocols=a.protocols,
                                overrides=a.overrides, stress=a.stress, **tables, **run)
        print(res["text"])
        print(f"written: {out / 'mitosis.md'}")
        return 0
    if a.kind == "organ":
        from suites.organ import ORGAN_METHODS, organ_benchmark

        res = organ_benchmark(a.root, a.out / "organ", methods=a.methods or ORGAN_METHODS, seeds=a.seeds, epochs=a.epochs or 20,
                              backbone=a.backbone, overrides=a.overrides, run=run)
        print(res["text"])
        print(f"written: {a.out / 'organ' / 'organ.md'}")
        return 0
    from suites.accuracy import accuracy_benchmark

    res = accuracy_benchmark(
        a.out / "accuracy", methods=a.methods, seeds=a.seeds, epochs=a.epochs or 8,
        per_class=a.per_class, backbone=a.backbone, size=a.size or 96, overrides=a.overrides, stress=a.stress, report=report, preset=a.preset, run=run,
    )
    print(res["text"])
    print(f"written: {a.out / 'accuracy' / (report + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
