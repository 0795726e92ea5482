"""trainer.tta: a classifier's probabilities averaged over flipped (and transposed) tiles at test time."""

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from lstainnorm.config import TTA_VIEWS, ConfigError, make_config
from lstainnorm.tasks.classify import VIEW_COUNTS, ClassificationTask, view_probs


class _Corner(nn.Module):
    """Logits from the top-left pixel: every flip or transpose changes them."""

    def forward(self, x):
        return torch.stack([x[:, 0, 0, 0], x[:, 1, 0, 0]], -1) * 3.0


class _Pooled(nn.Module):
    """Logits from the channel means: blind to flips and transposes."""

    def forward(self, x):
        return x.mean((-2, -1))[:, :2] * 3.0


def _views(x):
    flips = [x, x.flip(-1), x.flip(-2), x.flip(-2).flip(-1)]
    return flips, flips + [f.transpose(-1, -2) for f in flips]


def test_view_probs_average_the_views_probabilities():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 6, 6)
    m = _Corner()
    flips, dihedral = _views(x)
    assert torch.allclose(view_probs(m, x, "none"), m(x).softmax(-1))
    assert torch.allclose(view_probs(m, x, "flips"), torch.stack([m(v).softmax(-1) for v in flips]).mean(0), atol=1e-6)
    # The transposes of the 4 flips are the 4 other elements of the dihedral group.
    assert torch.allclose(view_probs(m, x, "dihedral"), torch.stack([m(v).softmax(-1) for v in dihedral]).mean(0), atol=1e-6)
    assert not torch.allclose(view_probs(m, x, "flips"), view_probs(m, x, "none"))
    p = view_probs(m, x, "dihedral")
    assert p.shape == (5, 2) and torch.allclose(p.sum(-1), torch.ones(5))
    per = view_probs(m, x, "dihedral", per_view=True)  # the modes average prefixes of the 8 views
    assert per.shape == (8, 5, 2)
    for mode, n in VIEW_COUNTS.items():
        assert torch.allclose(per[:n].mean(0), view_probs(m, x, mode), atol=1e-6), mode
    for mode in TTA_VIEWS:  # a model that cannot see the views: every mode is the plain prediction
        assert torch.allclose(view_probs(_Pooled(), x, mode), _Pooled()(x).softmax(-1), atol=1e-6)


def test_view_probs_errors():
    with pytest.raises(ValueError, match="tta must be one of"):
        view_probs(_Corner(), torch.rand(1, 3, 4, 4), "rot90")
    with pytest.raises(ValueError, match="square"):
        view_probs(_Corner(), torch.rand(1, 3, 4, 6), "dihedral")
    assert view_probs(_Corner(), torch.rand(2, 3, 4, 6), "flips").shape == (2, 2)  # flips keep the shape


def test_task_predict_uses_the_config_views_unless_told_not_to():
    cfg, _ = make_config({}, ["trainer.tta=flips"])
    task = ClassificationTask(cfg, ["a", "b"], ["A"])
    x = torch.rand(4, 3, 8, 8)
    m = _Corner()
    assert torch.allclose(task.predict(m, x, tta=False), m(x))  # the per-epoch validation: one view
    assert torch.allclose(task.predict(m, x).softmax(-1), view_probs(m, x, "flips"), atol=1e-6)


def test_tta_config_errors():
    with pytest.raises(ConfigError, match="trainer.tta"):
        make_config({}, ["trainer.tta=rot90"])
    with pytest.raises(ConfigError, match="trainer.tta"):
        make_config({"task": "segmentation"}, ["trainer.tta=flips"])


def test_cli_tta_choices_match_the_config():
    from lstainnorm.cli import TTA_CHOICES

    assert TTA_CHOICES == TTA_VIEWS


@pytest.mark.slow
def test_tta_changes_the_test_only_and_evaluate_reproduces_it(tmp_path):
    """The same run with and without trainer.tta trains identically (the checkpoint is chosen on one view);
    its test metrics are what ``evaluate --tta`` gives for the run trained without it."""
    from lstainnorm.data.synthetic import write_synthetic
    from lstainnorm.tasks.evaluate import evaluate
    from lstainnorm.tasks.train import RUN_DIR_ENV, train

    synth = tmp_path / "synth"
    write_synthetic(synth, centres=2, per_class=8, size=32, seed=0, classes=2, workers=1, progress=False)
    raw = {
        "seed": 1, "postfix": "r",
        "data": {"manifest": str(synth / "manifest.csv"), "train_centres": ["A"], "batch_size": 8, "split_seed": 0},
        "norm": {"mode": "template", "templates": "auto"},
        "model": {"backbone": "test_resnet"},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "progress": False, "logger": "none", "monitor": "val/auroc"},
    }
    runs = {}
    for mode in ("none", "dihedral"):
        os.environ.pop(RUN_DIR_ENV, None)  # a run names its folder for DDP's other ranks here
        cfg, notes = make_config({**raw, "output_path": str(tmp_path / mode)}, [f"trainer.tta={mode}"])
        runs[mode] = train(cfg, notes)
    plain, tta = (Path(runs[m]["run_dir"]) for m in ("none", "dihedral"))
    assert (plain / "history.csv").read_text() == (tta / "history.csv").read_text()
    a = torch.load(plain / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tta / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = evaluate(plain, synth / "manifest.csv", split="test", tta="dihedral", progress=False)
    assert again["tta"] == "dihedral" and again["output"].endswith("_tta-dihedral.json")
    for k in ("acc", "bal_acc", "auroc"):
        assert again["overall"][k] == pytest.approx(runs["dihedral"]["test"]["overall"][k], abs=1e-6), k
    assert json.loads(Path(again["output"]).read_text())["tta"] == "dihedral"
    # ...and the views did change the test probabilities.
    assert (plain / "test_predictions.csv").read_text() != (tta / "test_predictions.csv").read_text()
    with pytest.raises(ValueError, match="tta must be one of"):
        evaluate(plain, synth / "manifest.csv", split="test", tta="rot90", progress=False)

    # benchmarks/tta_check.py scores the run without tta as the run with it reported.
    import subprocess
    import sys

    records = tmp_path / "results.jsonl"
    records.write_text(json.dumps({"method": "template", "seed": 1, "run_dir": str(plain)}) + "\n")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "tta_check.py"
    out = subprocess.run([sys.executable, str(script), "--records", str(records), "--save", str(tmp_path / "probs")],
                         capture_output=True, text=True, check=True).stdout
    test_part = out[out.index("p1, test crops"):]
    row = next(line for line in test_part.splitlines() if line.startswith("| template | dihedral |"))
    assert float(row.split("|")[4].split()[0]) == pytest.approx(runs["dihedral"]["test"]["overall"]["bal_acc"], abs=1e-3)
    assert len(list((tmp_path / "probs").glob("*.json.gz"))) == 1
    # The same run saved as a labelled variant and paired with the method itself: a difference of 0.
    out = subprocess.run([sys.executable, str(script), "--records", str(records), "--save", str(tmp_path / "variant"),
                          "--label", "no EMA"], capture_output=True, text=True, check=True).stdout
    assert "| template (no EMA) | dihedral | 1 |" in out
    out = subprocess.run([sys.executable, str(script), "--probs", str(tmp_path / "probs"), str(tmp_path / "variant"),
                          "--refs", "template"], capture_output=True, text=True, check=True).stdout
    assert "difference from `template`" in out
    assert next(line for line in out.splitlines() if line.startswith("| template (no EMA) |")).split("|")[2].split("; ")[1].startswith("+0.000")
    import tta_check

    both = [tmp_path / "probs", tmp_path / "variant"]
    assert "| template (no EMA) | dihedral |" in tta_check.tables(both, methods=["template"])  # a variant goes with its method
    assert "| template (no EMA) |" not in tta_check.tables(both, methods=["none"])


def test_tta_check_scores_pooled_statistics_runs_as_the_run_did(tmp_path):
    """norm.stats_by runs: tta_check's views use each centre's pooled statistics, as the run's test did."""
    import subprocess
    import sys

    from lstainnorm.data.synthetic import write_synthetic
    from lstainnorm.tasks.train import RUN_DIR_ENV, train

    synth = tmp_path / "synth"
    write_synthetic(synth, centres=2, per_class=8, size=32, seed=0, classes=2, workers=1, progress=False)
    os.environ.pop(RUN_DIR_ENV, None)
    cfg, notes = make_config({
        "seed": 2, "postfix": "c", "output_path": str(tmp_path / "runs"),
        "data": {"manifest": str(synth / "manifest.csv"), "train_centres": ["A"], "batch_size": 8, "split_seed": 0},
        "norm": {"mode": "template", "templates": "auto", "stats_by": "centre"},
        "model": {"backbone": "test_resnet"},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "progress": False, "logger": "none", "tta": "dihedral"},
    })
    res = train(cfg, notes)
    records = tmp_path / "results.jsonl"
    records.write_text(json.dumps({"method": "template@centre", "seed": 2, "run_dir": res["run_dir"]}) + "\n")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "tta_check.py"
    out = subprocess.run([sys.executable, str(script), "--records", str(records), "--save", str(tmp_path / "probs")],
                         capture_output=True, text=True, check=True).stdout
    test_part = out[out.index("p1, test crops"):]
    row = next(line for line in test_part.splitlines() if line.startswith("| template@centre | dihedral |"))
    assert float(row.split("|")[4].split()[0]) == pytest.approx(res["test"]["overall"]["bal_acc"], abs=1e-3)


def test_tta_check_counts_a_reproduced_run_once_and_refuses_a_different_one(tmp_path):
    import gzip

    import tta_check

    def save(folder, test_p):
        folder.mkdir(exist_ok=True)
        rec = {"protocol": "p1", "method": "none", "seed": 0}
        for split, p in (("val", [0.2, 0.7]), ("test", test_p)):
            rec[split] = {"label": [0, 1], "group": ["a", "b"], **{v: p for v in VIEW_COUNTS}}
        (folder / "p1_none_s0.json.gz").write_bytes(gzip.compress(json.dumps(rec).encode()))

    save(tmp_path / "a", [0.1, 0.9])
    save(tmp_path / "b", [0.1, 0.90001])  # the same run saved again (5 decimals; last bit rounded the other way)
    save(tmp_path / "c", [0.6, 0.9])
    assert len(tta_check.load_probs([tmp_path / "a", tmp_path / "b"])) == 1
    assert "| none | dihedral | 1 |" in tta_check.tables([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(SystemExit, match="with other probabilities"):
        tta_check.load_probs([tmp_path / "a", tmp_path / "c"])


def test_tta_check_overview_has_every_method_and_protocol_against_none(tmp_path):
    import gzip

    import tta_check

    for protocol in ("p1", "p2-x"):
        for method, right in (("none", 1), ("template", 2)):
            for seed in (0, 1, 2):
                labels = [0, 0, 1, 1]
                p = [0.1, 0.9, 0.9, 0.1] if right == 1 else [0.1, 0.1, 0.9, 0.9]  # template right on all 4 crops
                rec = {"protocol": protocol, "method": method, "seed": seed,
                       **{s: {"label": labels, "group": ["a", "b", "c", "d"], **{v: p for v in VIEW_COUNTS}} for s in ("val", "test")}}
                (tmp_path / f"{protocol}_{method}_s{seed}.json.gz").write_bytes(gzip.compress(json.dumps(rec).encode()))
    table = tta_check.tables([tmp_path])
    lines = table.splitlines()[2:]
    assert lines[0] == "| method | p1 | p2-x |"
    assert lines[2].startswith("| none | 0.500 ± 0.000 (3) | 0.500 ± 0.000 (3) |")
    assert lines[3].startswith("| template | 1.000 ± 0.000 (3); +0.500")
    # The same runs in AUROC: template ranks every atypical crop first (1.0), none ranks them at chance (0.5).
    table = tta_check.tables([tmp_path], metric="auroc")
    assert "AUROC" in table.splitlines()[0] and "val crops" not in table  # the per-view tables are of balanced accuracy
    assert "| none | 0.500 ± 0.000 (3) | 0.500 ± 0.000 (3) |" in table
    assert "| template | 1.000 ± 0.000 (3); +0.500" in table
