"""The ``lstainnorm`` command line."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["main", "build_parser"]

_COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help_: str, examples: str):
    """Register a subcommand: the decorated function adds arguments and returns the runner."""

    def deco(fn):
        _COMMANDS[name] = (help_, examples, fn, None)  # type: ignore[assignment]
        return fn

    return deco


def _fmt(examples: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  ")


# --- synth ------------------------------------------------------------------------------------------
@command(
    "synth",
    "write the synthetic multi-centre H&E tile set",
    """
    lstainnorm synth data/synth --centres 4 --per-class 200 --size 96 --seed 0
    lstainnorm synth data/synth --montage docs/images/synthetic_montage.png
    """,
)
def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="output folder: OUT/<centre>/<split>/<class>/*.png + OUT/manifest.csv")
    p.add_argument("--centres", type=int, default=4, help="number of centres (hospitals), 1-4 (default 4)")
    p.add_argument("--per-class", type=int, default=200, help="tiles per class and centre, split 60/20/20 train/val/test (default 200)")
    p.add_argument("--classes", type=int, default=6, help="number of tissue classes, 2-6 (default 6)")
    p.add_argument("--size", type=int, default=96, help="tile side in pixels (default 96)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed writes the same bytes (default 0)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--montage", type=Path, help="also write a PNG grid (rows: classes, columns: centres)")


def _synth_run(a: argparse.Namespace) -> int:
    from .data.synthetic import SyntheticHE, write_synthetic

    if a.montage:
        import io

        from PIL import Image

        from .data.io import atomic_write_bytes

        gen = SyntheticHE(n_classes=a.classes, n_centres=a.centres, size=a.size, seed=a.seed)
        buf = io.BytesIO()  # a 256-colour PNG: small enough for a README
        Image.fromarray(gen.montage()).quantize(256, dither=Image.Dither.NONE).save(buf, format="PNG", optimize=True)
        atomic_write_bytes(a.montage, buf.getvalue())
        print(f"montage: {a.montage}")
    manifest = write_synthetic(
        a.out, centres=a.centres, per_class=a.per_class, size=a.size, seed=a.seed, classes=a.classes, workers=a.workers
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
    p.add_argument("-o", "--output", type=Path, required=True, help="template YAML to write")
    p.add_argument("--spaces", nargs="+", default=["lab", "hsv", "rgb"], help="colour spaces (default: lab hsv rgb)")
    p.add_argument("--no-tissue-mask", action="store_true", help="use all pixels, glass included")
    p.add_argument("--max-images", type=int, help="stop after this many images")
    p.add_argument("--size", type=int, help="resize images to SIZE x SIZE first (default: as they are)")


def _template_run(a: argparse.Namespace) -> int:
    import warnings

    from .data.tiles import ImageFiles
    from .template import estimate_template

    files = ImageFiles(a.data, size=a.size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tpl = estimate_template(files, spaces=a.spaces, tissue_mask=not a.no_tissue_mask, max_images=a.max_images, batch_size=32)
    skipped = files.skipped
    tpl.meta.update({"source": str(a.data), "n_skipped": len(skipped)})
    tpl.save(a.output)
    print(tpl)
    print(f"template of {tpl.meta['n_images']} images written to {a.output}" + (f"; {len(skipped)} unreadable files skipped" if skipped else ""))
    for w in caught:
        if "unreadable" not in str(w.message):
            print(f"warning: {w.message}", file=sys.stderr)
    return 0


_RUNNERS = {"synth": _synth_run, "template": _template_run}


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


def main(argv: Sequence[str] | None = None) -> int:
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
    except (ValueError, FileNotFoundError, TypeError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"lstainnorm {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
