"""`lstainnorm synth` and `lstainnorm template` from the command line."""

import csv

import numpy as np
import yaml
from PIL import Image

from lstainnorm.cli import main


def test_synth_cli_writes_tree_manifest_and_montage(tmp_path, capsys):
    rc = main(["synth", str(tmp_path / "s"), "--centres", "2", "--per-class", "3", "--size", "32", "--classes", "2", "--workers", "1", "--montage", str(tmp_path / "m.png")])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "s" / "manifest.csv")))
    assert len(rows) == 2 * 2 * 3
    assert Image.open(tmp_path / "m.png").size == (2 * 32 + 2, 2 * 32 + 2)


def test_template_cli_flat_folder_and_class_tree_with_corrupt_file(tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((20, 20, 3)) * 120 + 80).astype(np.uint8)).save(flat / f"t{i}.png")
    (flat / "bad.png").write_bytes(b"nope")
    assert main(["template", str(flat), "-o", str(tmp_path / "t.yaml"), "--spaces", "lab", "hed"]) == 0
    t = yaml.safe_load((tmp_path / "t.yaml").read_text())
    assert t["n_images"] == 4 and t["n_skipped"] == 1 and len(t["mu0_hed"]) == 3
    assert "1 unreadable files skipped" in capsys.readouterr().out
    tree = tmp_path / "tree" / "A"
    tree.mkdir(parents=True)
    for f in flat.glob("t*.png"):
        (tree / f.name).write_bytes(f.read_bytes())
    assert main(["template", str(tmp_path / "tree"), "-o", str(tmp_path / "t2.yaml"), "--size", "16"]) == 0
    assert yaml.safe_load((tmp_path / "t2.yaml").read_text())["n_images"] == 4


def test_template_cli_errors(tmp_path, capsys):
    assert main(["template", str(tmp_path / "missing"), "-o", str(tmp_path / "t.yaml")]) == 1
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["template", str(tmp_path / "empty"), "-o", str(tmp_path / "t.yaml")]) == 1
    assert "no images found" in capsys.readouterr().err


def test_cli_parsing_never_imports_torch():
    """``lstainnorm --help`` and argument errors answer at once: the parser and the package's top
    level load no torch (the layers load on first use)."""
    import subprocess
    import sys

    code = (
        "import sys, lstainnorm\n"
        "from lstainnorm.cli import build_parser\n"
        "build_parser()\n"
        "assert 'torch' not in sys.modules, 'torch imported while parsing'\n"
        "assert lstainnorm.LStainNorm.__name__ == 'LStainNorm' and 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stress_axes_in_the_cli_match_the_restainer():
    from lstainnorm.cli import STRESS_AXES
    from lstainnorm.data.restain import AXES

    assert STRESS_AXES == tuple(AXES)
