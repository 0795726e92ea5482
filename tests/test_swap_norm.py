"""benchmarks/swap_norm.py: every network behind every normaliser (why a run fails cross-centre)."""

import importlib.util
import os
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from lstainnorm.config import make_config
from lstainnorm.data.synthetic import write_synthetic
from lstainnorm.data.tiles import TileFolder, collate_tiles
from lstainnorm.tasks.evaluate import evaluate, load_module
from lstainnorm.tasks.train import RUN_DIR_ENV, train

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "swap_norm.py"


def _script():
    spec = importlib.util.spec_from_file_location("swap_norm", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_own_normaliser_reproduces_evaluate_and_swaps_change_only_the_input(tmp_path):
    write_synthetic(tmp_path / "s", centres=2, per_class=6, size=32, classes=2, workers=1, progress=False)
    manifest = tmp_path / "s" / "manifest.csv"
    runs = []
    for mode in ("template", "none"):
        os.environ.pop(RUN_DIR_ENV, None)
        cfg, _ = make_config({"data": {"manifest": str(manifest), "train_centres": ["A"], "batch_size": 8},
                              "norm": {"mode": mode}, "model": {"backbone": "test_resnet"},
                              "trainer": {"max_epochs": 1, "accelerator": "cpu", "progress": False},
                              "output_path": str(tmp_path / "runs"), "postfix": mode})
        runs.append(Path(train(cfg)["run_dir"]))
    os.environ.pop(RUN_DIR_ENV, None)
    mods = [load_module(r) for r in runs]
    ds = TileFolder.from_manifest(manifest, split="test", classes=mods[0].classes)
    correct, per_centre, diff, n = _script().swap(mods, DataLoader(ds, batch_size=5, collate_fn=collate_tiles))
    assert n == len(ds) and set(per_centre) == {"A", "B"}
    for i, run in enumerate(runs):  # each network behind its own normaliser is the run as evaluate sees it
        ev = evaluate(run, manifest, split="test", out=tmp_path / f"ev{i}.json", progress=False)
        assert correct[i, i].item() / n == pytest.approx(ev["overall"]["acc"], abs=1e-6)
        assert sum(per_centre[c][i, i, 1].item() for c in per_centre) == n
    # the template layer changes the tiles, the identity does not: the outputs differ, symmetrically
    assert diff[0, 0] == 0 and diff[1, 1] == 0 and diff[0, 1] == diff[1, 0] > 0
