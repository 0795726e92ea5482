"""The ``lstainnorm`` command line."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Callable, Sequence

from .allocator import keep_freed_pages

__all__ = ["main", "build_parser"]

# The names of lstainnorm.data.restain.AXES (and the trainer.tta views), spelled out so that parsing never imports torch (~3 s);
# a test keeps the two equal.
TTA_CHOICES = ("none", "flips", "dihedral")  # lstainnorm.config.TTA_VIEWS, likewise
STRESS_AXES = ("hematoxylin-hue", "eosin-hue", "stain-amount", "he-ratio", "white-point", "gamma", "saturation", "jpeg", "combined")

_COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help_: str, examples: str):
    """Register a subcommand: the decorated function adds arguments and returns the runner."""

    def deco(fn):
        _COMMANDS[name] = (help_, examples, fn, None)  # type: ignore[assignment]
        return fn

    return deco


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, else a clear error naming the value."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def severity(text: str) -> float:
    """argparse type: a stress severity, a number in (0, 1] (0, the unstressed data, is always run)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < v <= 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (0 is always run), got {text}")
    return v


def int_range(lo: int, hi: int):
    def parse(text: str) -> int:
        v = positive_int(text) if lo >= 1 else int(text)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {v}")
        return v

    return parse


def _report_skipped(skipped: Sequence[str], produced: int, what: str) -> int:
    """Name every skipped input; exit status 1 when nothing could be produced at all."""
    for p in skipped:
        print(f"  skipped (unreadable): {p}")
    if produced == 0 and skipped:
        print(f"error: no {what} could be produced: every input was unreadable", file=sys.stderr)
        return 1
    return 0


def _fmt(examples: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  ")


# --- synth ------------------------------------------------------------------------------------------
@command(
    "synth",
    "write the synthetic multi-centre H&E tile set",
    """
    lstainnorm synth data/synth --centres 4 --per-class 200 --size 96 --seed 0
    lstainnorm synth data/synth --montage docs/images/synthetic_montage.png
    lstainnorm synth data/synth-monuseg --preset monuseg     # centres measured on real hospitals
    """,
)
def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="output folder: OUT/<centre>/<split>/<class>/*.png + OUT/manifest.csv")
    p.add_argument("--centres", type=int_range(1, 4), default=4, help="number of centres (hospitals), 1-4 (default 4)")
    p.add_argument("--per-class", type=positive_int, default=200, help="tiles per class and centre, split 60/20/20 train/val/test (default 200)")
    p.add_argument("--classes", type=int_range(2, 6), default=6, help="number of tissue classes, 2-6 (default 6)")
    p.add_argument("--size", type=int_range(16, 4096), default=96, help="tile side in pixels (default 96)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed writes the same bytes (default 0)")
    p.add_argument("--workers", type=positive_int, default=2, help="worker processes (default 2)")
    p.add_argument("--montage", type=Path, help="also write a PNG grid (rows: classes, columns: centres)")
    p.add_argument("--preset", choices=["default", "monuseg"], default="default",
                   help="centres: hand-made (default, the demo's) or measured on MoNuSeg hospitals (monuseg: H/E ratios 1.3-3.0)")


def _synth_run(a: argparse.Namespace) -> int:
    from .data.synthetic import CENTRE_PRESETS, SyntheticHE, write_synthetic

    if a.montage:
        import io

        from PIL import Image

        from .files import atomic_write_bytes

        gen = SyntheticHE(n_classes=a.classes, n_centres=a.centres, size=a.size, seed=a.seed, centres=CENTRE_PRESETS[a.preset])
        buf = io.BytesIO()  # a 256-colour PNG: small enough for a README
        Image.fromarray(gen.montage()).quantize(256, dither=Image.Dither.NONE).save(buf, format="PNG", optimize=True)
        atomic_write_bytes(a.montage, buf.getvalue())
        print(f"montage: {a.montage}")
    manifest = write_synthetic(
        a.out, centres=a.centres, per_class=a.per_class, size=a.size, seed=a.seed, classes=a.classes, workers=a.workers, preset=a.preset
    )
    print(f"wrote {a.out} ({a.centres} centres x {a.classes} classes x {a.per_class} tiles); manifest: {manifest}")
    return 0


# --- template ---------------------------------------------------------------------------------------
@command(
    "template",
    "estimate the initial stain template from a set of images",
    """
    lstainnorm template data/train -o template.yaml                 # class folders or a flat folder
    lstainnorm template data/train --spaces lab hsv rgb hed --no-tissue-mask -o t.yaml
    """,
)
def _template_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help="a folder of images: class folders (ImageFolder) or a flat folder, searched recursively")
    p.add_argument("-o", "--out", "--output", dest="output", type=Path, required=True, help="template YAML to write")
    p.add_argument("--spaces", nargs="+", default=["lab", "hsv", "rgb"], help="colour spaces (default: lab hsv rgb)")
    p.add_argument("--no-tissue-mask", action="store_true", help="use all pixels, glass included")
    p.add_argument("--max-images", type=positive_int, help="stop after this many images")
    p.add_argument("--size", type=positive_int, help="resize images to SIZE x SIZE first (default: as they are)")


def _template_run(a: argparse.Namespace) -> int:
    import warnings

    from .data.tiles import ImageFiles
    from .layers.template import estimate_template

    files = ImageFiles(a.data, size=a.size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tpl = estimate_template(files, spaces=a.spaces, tissue_mask=not a.no_tissue_mask, max_images=a.max_images, batch_size=32)
        except ValueError:
            for p in files.skipped:
                print(f"  skipped (unreadable): {p}", file=sys.stderr)
            raise
    skipped = files.skipped
    tpl.meta.update({"source": str(a.data), "n_skipped": len(skipped)})
    tpl.save(a.output)
    print(tpl)
    print(f"template of {tpl.meta['n_images']} images written to {a.output}" + (f"; {len(skipped)} unreadable files skipped" if skipped else ""))
    for w in caught:
        if "unreadable" not in str(w.message):
            print(f"warning: {w.message}", file=sys.stderr)
    return _report_skipped(skipped, tpl.meta["n_images"], "template")


# --- train ------------------------------------------------------------------------------------------
@command(
    "train",
    "train a normalisation layer with a classifier (or segmenter) from a YAML config",
    """
    lstainnorm train classify data.train=tiles/train data.test=tiles/test   # a packaged config by name
    lstainnorm train configs/classify.yaml
    lstainnorm train configs/classify.yaml norm.mode=learnable norm.space=hsv trainer.max_epochs=20
    lstainnorm train configs/reference-config-SA1.yaml          # the reference's config file, unchanged
    lstainnorm train configs/classify.yaml trainer.devices=2 trainer.strategy=ddp
    lstainnorm train --resume runs/20261125_101500_demo          # continue an interrupted run
    lstainnorm train --print-schema                              # every key with its default
    """,
)
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", type=Path, help="YAML config (ours or the reference's flat config), or the name of a "
                   "packaged one (lstainnorm configs lists them)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_epochs=5")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue RUN_DIR from checkpoints/last.ckpt with its saved config")
    p.add_argument("--print-schema", action="store_true", help="print every config key with its default and exit")


def _train_run(a: argparse.Namespace) -> int:
    from .config import load_config, schema_help

    if a.print_schema:
        print(schema_help())
        return 0
    overrides = list(a.overrides)
    if a.resume is not None:
        cfg_path = a.resume / "config.yaml"
        if a.config is not None and "=" in str(a.config):
            overrides.insert(0, str(a.config))
        if not cfg_path.is_file():
            raise FileNotFoundError(f"cannot resume {a.resume}: no config.yaml in it")
        cfg, notes = load_config(cfg_path, overrides)
    else:
        if a.config is None:
            raise ValueError("give a config file (or --resume RUN_DIR); see lstainnorm train --help")
        cfg, notes = load_config(a.config, overrides)
    for n in notes:
        print(n)
    from .tasks.train import train

    train(cfg, notes, resume=a.resume)
    return 0


# --- evaluate ---------------------------------------------------------------------------------------
@command(
    "evaluate",
    "evaluate a trained run on a tile folder or a manifest",
    """
    lstainnorm evaluate runs/20261125_101500_demo --data data/other_hospital
    lstainnorm evaluate runs/.../checkpoints/best.ckpt --data synth/manifest.csv --split test --centres B C
    lstainnorm evaluate runs/20261125_101500_demo --data data/other_hospital --tta dihedral   # 8 views averaged
    """,
)
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run directory (uses checkpoints/best.ckpt) or a checkpoint file")
    p.add_argument("--data", type=Path, required=True, help="class-folder tree, manifest CSV, or (segmentation) a folder with images/ and masks/")
    p.add_argument("--split", help="the split to evaluate (train/val/test): of a manifest, or of a segmentation run's own split (split file or metadata column)")
    p.add_argument("--centres", nargs="+", help="with a manifest: only these centres")
    p.add_argument("-o", "--out", "--output", dest="output", type=Path, help="result JSON (default RUN_DIR/eval_<data>-<hash>.json, one per data set and selection)")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--tta", choices=TTA_CHOICES, help="classification: test-time augmentation instead of the run's trainer.tta "
                   "(none; flips: 4 views; dihedral: 8), class probabilities averaged over the views")


def _evaluate_run(a: argparse.Namespace) -> int:
    from .tasks.evaluate import evaluate

    res = evaluate(a.run, a.data, split=a.split, centres=a.centres, out=a.output, batch_size=a.batch_size, tta=a.tta)
    ov = res.get("overall", {})
    keys = [k for k in ("acc", "bal_acc", "f1", "auroc", "dice", "iou", "aji", "pq") if k in ov]
    print("overall: " + "  ".join(f"{k} {ov[k]:.4f}" for k in keys if ov[k] is not None) + f"  (n={ov.get('n')})")
    for c, v in res.get("per_centre", {}).items():
        print(f"  centre {c}: " + "  ".join(f"{k} {v[k]:.4f}" for k in keys if v.get(k) is not None) + f"  (n={v.get('n')})")
    print(f"skipped files: {len(res.get('skipped_files', []))}")
    print(f"written: {res['output']}")
    return _report_skipped(res.get("skipped_files", []), int(ov.get("n") or 0), "evaluation")


# --- predict ----------------------------------------------------------------------------------------
@command(
    "predict",
    "segment nuclei in images with a trained segmentation run (masks, instance labels, overlays)",
    """
    lstainnorm predict runs/segmentation/20261125_monuseg_cpu slides/tiles/ out/nuclei/
    lstainnorm predict runs/segmentation/20261125_monuseg_cpu tile.png out/
    """,
)
def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="segmentation run directory or checkpoint")
    p.add_argument("input", type=Path, help="an image or a folder of images (searched recursively)")
    p.add_argument("output", type=Path, help="output folder: <name>_mask.png, <name>_instances.png (16-bit), <name>_overlay.png")


def predict(run: Path, inp: Path, output: Path, progress: bool = True) -> dict:
    """Segment every image of ``inp`` with a trained segmentation run: the run's model (``tasks``)
    wired into :func:`lstainnorm.apply.predict.predict_folder` (``apply``), which writes the outputs.
    Here, above both, so that training never depends on the application layer."""
    from .apply.predict import predict_folder
    from .tasks.evaluate import load_module

    module = load_module(run)
    if module.cfg.task != "segmentation":
        raise ValueError(f"{run} is a {module.cfg.task} run; lstainnorm predict needs a segmentation run")
    s = module.cfg.segmentation
    return predict_folder(
        lambda x: module.task.predict(module.model, x), inp, output,
        scale=s.scale, threshold=s.threshold, watershed=s.watershed, min_size=s.min_size, progress=progress,
    )


def _predict_run(a: argparse.Namespace) -> int:
    res = predict(a.run, a.input, a.output)
    print(f"segmented {len(res['written'])} images ({res['already_done']} already done, {len(res['skipped'])} unreadable skipped) into {a.output}")
    return _report_skipped(res["skipped"], len(res["written"]) + res["already_done"], "segmentation")


# --- normalize --------------------------------------------------------------------------------------
@command(
    "normalize",
    "normalise images, folders or whole slides with a trained layer or a template",
    """
    lstainnorm normalize --run runs/20261125_101500_demo tiles/ tiles_normalised/
    lstainnorm normalize --template template.yaml --space lab image.png out/
    lstainnorm normalize --run runs/... slides/ out/ --shard 2/4        # the second of four workers
    lstainnorm normalize --run runs/... slides/ out/ --workers 4        # four shards at once on this machine
    lstainnorm normalize --run runs/... slides/ out/ --workers 8 --executor submitit --executor-option slurm_partition=cpu
    """,
)
def _normalize_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a training run (its trained normalisation layer)")
    src.add_argument("--template", type=Path, help="a template YAML: Reinhard normalisation in --space")
    p.add_argument("--space", default="lab", help="colour space of --template (default lab)")
    p.add_argument("input", type=Path, help="an image, a slide (SVS, NDPI, tiled TIFF, ...), or a folder tree")
    p.add_argument("output", type=Path, help="output folder (layout and names preserved; slides become pyramidal .tif)")
    p.add_argument("--shard", help="K/N: process every N-th file starting with the K-th (split work over N processes)")
    p.add_argument("--window", type=positive_int, help="normalise regular images window by window above this size (default: whole)")
    p.add_argument("--tile", type=positive_int, default=2048, help="slide processing tile (rounded to a multiple of 256; default 2048)")
    p.add_argument("--tissue-stats", action=argparse.BooleanOptionalAction, default=True,
                   help="statistics over tissue, glass and black left as they are (default); --no-tissue-stats: all pixels, as inside a trained network")
    p.add_argument("--force", action="store_true", help="redo every output, also those made with other settings")
    _executor_args(p, "split the files into this many shards, run at once (each shard's log in OUTPUT/.lstainnorm-logs/); default 1",
                   "slurm_partition=cpu, timeout_min=240")


def _executor_args(p: argparse.ArgumentParser, workers_help: str, option_example: str) -> None:
    """--workers, --executor and --executor-option (lstainnorm.executors), shared by compare and normalize."""
    p.add_argument("--workers", type=positive_int, default=1, help=workers_help)
    p.add_argument("--executor", choices=["local", "submitit"], default="local",
                   help="local processes on this machine (default) or submitit jobs (SLURM where available, else submitit's local executor)")
    p.add_argument("--executor-option", dest="executor_options", action="append", default=[], metavar="KEY=VALUE",
                   help=f"submitit parameter, e.g. {option_example}")


def _normalize_shards(a: argparse.Namespace) -> int:
    """``--workers N``: the files split into N shards, each an ``lstainnorm normalize --shard k/N`` process
    (local or submitit); every shard resumable as a single run is."""
    from .executors import Command, run_commands

    if a.shard:
        raise ValueError("--shard and --workers split the files both: give one of them")
    base = [sys.executable, "-m", "lstainnorm.cli", "normalize"]
    base += ["--run", str(a.run)] if a.run is not None else ["--template", str(a.template), "--space", a.space]
    base += [str(a.input), str(a.output), "--tile", str(a.tile), "--tissue-stats" if a.tissue_stats else "--no-tissue-stats"]
    base += ["--window", str(a.window)] if a.window else []
    base += ["--force"] if a.force else []
    logs = a.output / ".lstainnorm-logs"
    n = a.workers
    cmds = [Command(base + ["--shard", f"{k}/{n}"], logs / f"shard-{k}-of-{n}.log") for k in range(1, n + 1)]
    codes = run_commands(cmds, workers=n, executor=a.executor, options=a.executor_options, folder=logs,
                         on_done=lambda c, code, err: print(f"{c.argv[-1]}: exit {code}{' (' + err + ')' if err else ''}; log {c.log}"))
    for c in cmds:  # each shard's own summary line
        lines = [ln for ln in c.log.read_text(errors="replace").splitlines() if ln.startswith("normalised ")] if c.log.is_file() else []
        if lines:
            print(f"shard {c.argv[-1]}: {lines[-1]}")
    failed = [c.argv[-1] for c, code in zip(cmds, codes) if code != 0]
    if failed:
        print(f"lstainnorm normalize: shards {failed} did not finish cleanly; see their logs in {logs} (rerun to resume)", file=sys.stderr)
        return 1
    return 0


def _normalize_run(a: argparse.Namespace) -> int:
    from .apply.folders import norm_from_run, norm_from_template, normalize_path, parse_shard

    if a.workers > 1 or a.executor != "local":
        return _normalize_shards(a)
    shard = parse_shard(a.shard)
    if a.run is not None:
        norm, window = norm_from_run(a.run)
    else:
        norm, window = norm_from_template(a.template, a.space), None
    res = normalize_path(norm, a.input, a.output, window=a.window, slide_window=window, shard=shard, tile=a.tile,
                         tissue_stats=a.tissue_stats, force=a.force)
    print(
        f"normalised {len(res['written'])} of {res['files']} files ({len(res['slides'])} slides) into {a.output}; "
        f"{res['already_done']} already done, {len(res['skipped'])} unreadable skipped"
    )
    return _report_skipped(res["skipped"], len(res["written"]) + res["already_done"], "output")


# --- export -----------------------------------------------------------------------------------------
@command(
    "export",
    "export the trained normalisation layer alone as ONNX or TorchScript",
    """
    lstainnorm export runs/20261125_101500_demo -o norm.onnx
    lstainnorm export runs/20261125_101500_demo -o norm.pt        # TorchScript
    lstainnorm export --info norm.onnx                            # provenance stored in the file
    """,
)
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, nargs="?", help="run directory or checkpoint")
    p.add_argument("-o", "--out", "--output", dest="output", type=Path,
                   help="norm.onnx or norm.pt (missing folders on the way are created)")
    p.add_argument("--tolerance", type=positive_float, default=1e-4, help="largest allowed difference to the PyTorch layer (default 1e-4)")
    p.add_argument("--info", type=Path, metavar="FILE", help="print the metadata of an exported file (version, template, run, config hash) and exit")


def _export_run(a: argparse.Namespace) -> int:
    import json

    from .apply.export import export_norm, norm_metadata, read_metadata
    from .config import to_dict
    from .runs import load_norm

    if a.info is not None:
        print(json.dumps(read_metadata(a.info), indent=2))
        return 0
    if a.run is None or a.output is None:
        raise SystemExit("lstainnorm export: give a RUN and -o OUTPUT (or --info FILE)")
    trained = load_norm(a.run)
    meta = norm_metadata(trained.norm, to_dict(trained.config), trained.checkpoint.parent.parent if trained.checkpoint.parent.name == "checkpoints" else a.run)
    res = export_norm(trained.norm, a.output, tolerance=a.tolerance, metadata=meta)
    print(f"exported {res['format']} to {res['path']}: batch, height and width dynamic; max difference to PyTorch {res['max_abs_difference']:.1e}")
    return 0


# --- report -----------------------------------------------------------------------------------------
@command(
    "report",
    "write an HTML report of what a run's layer learned (templates, fusion weights and maps, curves)",
    """
    lstainnorm report runs/20261125_101500_demo                 # -> RUN_DIR/report/index.html
    lstainnorm report runs/20261125_101500_demo --images some_tiles/ -o report/
    """,
)
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("-o", "--out", "--output", dest="output", type=Path, help="output folder (default RUN_DIR/report)")
    p.add_argument("--images", type=Path, help="sample tiles to show (default: the run's validation tiles, when reachable)")


def _report_run(a: argparse.Namespace) -> int:
    from .apply.report import write_report

    tiles = None
    if a.images is None:  # the run's own validation and test tiles, when its data is reachable
        from .runs import load_norm
        from .tasks.loaders import build_data, sample_tiles

        try:
            tiles = sample_tiles(build_data(load_norm(a.run).config), 6)
        except (OSError, ValueError) as err:
            print(f"note: the run's validation data is not reachable ({err}); pass --images DIR for sample tiles", file=sys.stderr)
    path = write_report(a.run, a.output, a.images, tiles=tiles)
    print(f"report: {path}")
    return 0


# --- stress -----------------------------------------------------------------------------------------
@command(
    "stress",
    "robustness curves: evaluate a trained run on re-stained copies of its data at graded severities",
    """
    lstainnorm stress runs/20261125_101500_demo --data data/synth/manifest.csv --split test
    lstainnorm stress runs/<seg run> --data monuseg-test/ --axes hematoxylin-hue he-ratio jpeg
    lstainnorm stress runs/<run> --data tiles/ --levels 0.5 1 --out stress_out/

    Axes (severity 1 = the maximum): hematoxylin-hue, eosin-hue (25 degrees), stain-amount (2x),
    he-ratio (4x), white-point, gamma, saturation, jpeg (quality 10), combined. Writes
    stress.csv, stress.png, index.html and stress.json; resumes where it stopped.
    """,
)
def _stress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run directory or checkpoint")
    p.add_argument("--data", type=Path, required=True, help="what `lstainnorm evaluate` takes: class folders, a manifest CSV, or a segmentation folder")
    p.add_argument("--split", help="the split to stress (e.g. test): of a manifest, or of a segmentation run's own split")
    p.add_argument("--centres", nargs="+", help="manifest centres to use")
    p.add_argument("--axes", nargs="+", choices=STRESS_AXES, help="axes to run (default: all)")
    p.add_argument("--levels", nargs="+", type=severity, default=None, help="severities in (0, 1] (default 0.25 0.5 0.75 1); 0 is always run")
    p.add_argument("-o", "--out", type=Path, help="output folder (default RUN/stress_<data>-<hash>)")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=0, help="random draws of the combined axis")


def _stress_run(a: argparse.Namespace) -> int:
    from .tasks.stress import DEFAULT_LEVELS, stress

    res = stress(a.run, a.data, axes=a.axes, levels=a.levels or DEFAULT_LEVELS, split=a.split, centres=a.centres,
                 out=a.out, batch_size=a.batch_size, seed=a.seed)
    width = max(len(k) for k in res["scores"])
    print(f"robustness ({res['metric']}: area under the curve / value at severity 0; 1 = no loss):")
    for axis, score in res["scores"].items():
        print(f"  {axis:<{width}}  {score:.3f}")
    print(f"written: {res['output']}/index.html")
    return 0


# --- demo -------------------------------------------------------------------------------------------
@command(
    "demo",
    "the main job: synthetic multi-centre set, train on one centre, test on all, per method",
    """
    lstainnorm demo --out demo_out                 # about 5 minutes on 2 CPU cores
    lstainnorm demo --out demo_full --full         # every layer, more and larger tiles (about 15 minutes)
    lstainnorm demo --out demo_out --methods none lstainnorm --epochs 4
    lstainnorm demo --out demo_out --set model.backbone=test_resnet --set trainer.progress=false
    """,
)
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", type=Path, default=Path("demo_out"), help="output folder (data, runs, results.md)")
    p.add_argument("--methods", nargs="+", default=None, help="norm modes to compare (default: none template lstainnorm; "
                   "with --full also learnable)")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs per method (default 8, from configs/demo.yaml with --full)")
    p.add_argument("--per-class", type=positive_int, default=None, help="synthetic tiles per class and centre (default 80; --full 200)")
    p.add_argument("--full", action="store_true", help="the longer demo: 96 x 96 tiles, 200 per class and centre, every layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override for every method, repeatable (e.g. --set trainer.progress=false)")


def _demo_run(a: argparse.Namespace) -> int:
    from .experiments.demo import run_demo

    run_demo(a.out, methods=a.methods, epochs=a.epochs, per_class=a.per_class, seed=a.seed, overrides=a.overrides, full=a.full)
    return 0


@command(
    "compare",
    "compare normalisations on your own centres: every method, protocol and seed trained, then paired statistics and a report",
    """
    lstainnorm compare my.yaml --methods none template lstainnorm --seeds 0 1 2 -o cmp
    lstainnorm compare my.yaml --protocol leave-one-centre-out --workers 2        # two runs at a time
    lstainnorm compare my.yaml --protocol "A,B->C" --methods none macenko template+hed-jitter template@centre
    lstainnorm compare my.yaml --executor submitit --executor-option slurm_partition=gpu --executor-option gpus_per_node=1
    lstainnorm compare my.yaml -o cmp --report-only                              # tables of the runs so far
    Resumable: a second call skips the runs recorded in OUT/results.jsonl and resumes unfinished ones;
    failed runs are listed with their logs and retried with --retry-failed.
    """,
)
def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="the training config (YAML): its data (a manifest with a centre column, or a "
                   "segmentation split), network and recipe")
    p.add_argument("--methods", nargs="+", default=["none", "template", "lstainnorm"],
                   help="methods by name: none, template, learnable-<space>, lstainnorm, stain, the baselines (reinhard, macenko, "
                   "vahadane), augmentations (hed-jitter, randstainna), NORM+AUGMENT, METHOD@centre (statistics pooled per "
                   "centre), the ablations lstainnorm-frozen, -mean, -tissue (default: none template lstainnorm)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--protocol", dest="protocols", nargs="+", default=["split"], metavar="PROTOCOL",
                   help="split (the data's own split; default), leave-one-centre-out (each centre held out in turn), or "
                   "TRAIN->TEST with comma-separated centres (e.g. 'A,B->C'); several may be given")
    p.add_argument("--baseline", help="the method every other is paired against (default: the first of --methods)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    _executor_args(p, "runs at once (local: processes sharing this machine's cores, one GPU each where there are as many; "
                   "submitit: jobs in flight; default 1)", "slurm_partition=gpu, timeout_min=240, gpus_per_node=1")
    p.add_argument("--retry-failed", action="store_true", help="run the jobs that failed before again")
    p.add_argument("--report-only", action="store_true", help="train nothing: the report of the runs recorded so far")
    p.add_argument("--keep-last", action="store_true", help="keep each finished run's checkpoints/last.ckpt (default: only "
                   "best.ckpt stays; last.ckpt only resumes an unfinished run)")
    p.add_argument("-o", "--out", type=Path, default=Path("compare_out"), help="folder for runs, records and the report (default compare_out)")


def _compare_run(a: argparse.Namespace) -> int:
    from .compare import compare

    res = compare(a.config, a.out, methods=a.methods, seeds=a.seeds, protocols=a.protocols, baseline=a.baseline,
                  overrides=a.overrides, workers=a.workers, executor=a.executor, executor_options=a.executor_options,
                  retry_failed=a.retry_failed, train=not a.report_only, keep_last=a.keep_last)
    print(res["text"])
    print(f"written: {a.out / 'compare.md'}, {a.out / 'report.html'}, summary.csv, pairs.csv, runs.csv")
    if res["failures"]:
        print(f"{len(res['failures'])} run(s) failed; their logs are listed above (--retry-failed runs them again)", file=sys.stderr)
        return 1
    return 0


@command(
    "configs",
    "list the configs that ship with lstainnorm (train them by name), or print one",
    """
    lstainnorm configs                      # the packaged configs, one line each
    lstainnorm configs classify > my.yaml   # a copy to edit
    lstainnorm train classify data.train=tiles/train data.test=tiles/test
    """,
)
def _configs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="print this config (e.g. classify)")


def _configs_run(a: argparse.Namespace) -> int:
    from .config import packaged_configs, resolve_config

    if a.name:
        print(resolve_config(a.name).read_text(), end="")
        return 0
    for name, path in packaged_configs().items():
        first = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        print(f"{name:<10} {first}")
    print("train one by name: lstainnorm train NAME [key=value ...]; print it: lstainnorm configs NAME")
    return 0


_RUNNERS = {
    "configs": _configs_run,
    "compare": _compare_run,
    "synth": _synth_run,
    "template": _template_run,
    "train": _train_run,
    "evaluate": _evaluate_run,
    "demo": _demo_run,
    "stress": _stress_run,
    "predict": _predict_run,
    "normalize": _normalize_run,
    "export": _export_run,
    "report": _report_run,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lstainnorm",
        description="Learnable stain normalisation for computational pathology.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'lstainnorm COMMAND --help' for a command's options and examples.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"lstainnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, examples, add_args, _) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, epilog=_fmt(examples), formatter_class=argparse.RawDescriptionHelpFormatter)
        add_args(p)
    return parser


# Third-party notices a user cannot act on (regexes of their messages); real warnings still show.
KNOWN_THIRD_PARTY_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning on torch >= 2.10
    r".*torch\.jit\.script.* is deprecated.*",  # timm/kornia/torchvision script helpers at import
    r".*torch\.jit\.(trace|script_method).* is deprecated.*",
)


def quiet_third_party() -> None:
    """Filter :data:`KNOWN_THIRD_PARTY_WARNINGS` and torch's "No CUDA runtime is found" log line
    (printed on CPU-only machines whenever torch.compile builds a kernel)."""
    import logging
    import warnings

    for pattern in KNOWN_THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    from .extras import missing_extra

    quiet_third_party()
    keep_freed_pages()  # eager colour-space work allocates many image-sized temporaries
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    runner = _RUNNERS[args.command]
    try:
        return int(runner(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as err:
        # Lightning turns Ctrl-C inside its loops into sys.exit(1): the same code as anywhere else.
        if isinstance(err.__context__, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return 130
        raise
    except (ValueError, FileNotFoundError, TypeError, FloatingPointError) as err:
        print(f"lstainnorm {args.command}: error: {err}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:  # an optional extra this install left out: say which to install
        better = missing_extra(err, f"lstainnorm {args.command}")
        if better is None:
            raise
        print(f"lstainnorm {args.command}: error: {better}", file=sys.stderr)
        return 1
    except (PermissionError, FileExistsError, NotADirectoryError, IsADirectoryError) as err:
        # An output folder that cannot be made or written (a file in the way, no permission).
        print(f"lstainnorm {args.command}: error: cannot write to {err.filename}: {err.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
