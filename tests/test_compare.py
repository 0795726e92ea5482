"""``lstainnorm compare``: protocols from the data's centres, runs on local workers, resume, failures,
statistics with power lines, and the report (markdown, CSV, HTML with its figures)."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from lstainnorm.compare import compare
from lstainnorm.compare.engine import Job, job_command
from lstainnorm.compare.protocols import expand_protocols
from lstainnorm.compare.stats import Scores, _auroc, auroc, group_bootstrap, paired_t, power_line, verdict
from lstainnorm.config import load_config, make_config
from lstainnorm.data.synthetic import write_synthetic
from lstainnorm.tasks.train import RUN_DIR_ENV


@pytest.fixture(scope="module")
def three_centres(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    write_synthetic(root / "data", centres=3, per_class=4, size=32, seed=0, classes=2, workers=1, progress=False)
    cfg = {"task": "classification", "data": {"manifest": str(root / "data" / "manifest.csv"), "batch_size": 8},
           "norm": {"templates": "auto", "compile": "false"}, "model": {"backbone": "test_resnet"},
           "trainer": {"max_epochs": 1, "accelerator": "cpu", "logger": "none"}}
    (root / "my.yaml").write_text(yaml.safe_dump(cfg))
    return root / "my.yaml"


@pytest.fixture(autouse=True)
def _fresh_run_dir_env():
    os.environ.pop(RUN_DIR_ENV, None)
    yield
    os.environ.pop(RUN_DIR_ENV, None)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.images, self.tables = [], [], 0

    def handle_starttag(self, tag, attrs):
        if tag not in ("meta", "img", "br", "link"):
            self.stack.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self.tables += tag == "table"

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


@pytest.mark.heavy
@pytest.mark.slow
def test_leave_one_centre_out_two_methods_two_seeds_two_workers_end_to_end(three_centres, tmp_path):
    out = tmp_path / "cmp"
    res = compare(three_centres, out, methods=["none", "template"], seeds=[0, 1], protocols=["leave-one-centre-out"],
                  workers=2, progress=False)
    assert res["protocols"] == ["loco:A", "loco:B", "loco:C"]
    assert len(res["records"]) == 12 and not res["failures"]
    for r in res["records"]:  # each held-out centre tests, and only it
        assert set(r["per_centre"]) == {r["protocol"].split(":")[1]}
        assert r["groups"] and r["code"]["lstainnorm"]
        assert Path(r["run_dir"]).parent == out / "runs" / r["protocol"].replace(":", "_") / r["method"] / f"s{r['seed']}"
    text = (out / "compare.md").read_text()
    for p in res["protocols"]:
        assert f"## {p}" in text
    assert "resolvable with these seeds" in text and "seeds for 1 point" in text
    pairs = (out / "pairs.csv").read_text().splitlines()
    assert pairs[0].startswith("protocol,metric,method,difference") and len(pairs) == 7  # 3 protocols, in bal_acc and AUROC
    assert sorted(line.split(",")[1] for line in pairs[1:]) == ["auroc"] * 3 + ["bal_acc"] * 3
    page = _Page()
    page.feed((out / "report.html").read_text())
    page.close()
    assert not page.stack and page.tables >= 6
    assert len(page.images) >= 3 * 3 and all((out / src).is_file() and (out / src).stat().st_size > 1000 for src in page.images)
    # A second call trains nothing and gives the same tables.
    again = compare(three_centres, out, methods=["none", "template"], seeds=[0, 1], protocols=["leave-one-centre-out"], progress=False)
    assert [r["run_dir"] for r in again["records"]] == [r["run_dir"] for r in res["records"]]
    assert (out / "compare.md").read_text() == text
    with pytest.raises(ValueError, match="another -o"):
        compare(three_centres, out, methods=["none"], seeds=[0], overrides=["trainer.max_epochs=2"], progress=False)
    # The same config from another checkout resumes the comparison; a changed config is refused.
    moved = tmp_path / "elsewhere" / Path(three_centres).name
    moved.parent.mkdir()
    moved.write_bytes(Path(three_centres).read_bytes())
    assert len(compare(moved, out, methods=["none", "template"], seeds=[0, 1], protocols=["leave-one-centre-out"],
                       train=False, plots=False, progress=False)["records"]) == len(res["records"])
    moved.write_text("# reworded comment\n" + moved.read_text())
    compare(moved, out, methods=["none"], seeds=[0], train=False, plots=False, progress=False)
    moved.write_text(moved.read_text().replace("batch_size: 8", "batch_size: 4"))
    with pytest.raises(ValueError, match="another -o"):
        compare(moved, out, methods=["none"], seeds=[0], train=False, progress=False)


def _pairwise_auroc(y, p):
    pos, neg = p[y == 1], p[y != 1]
    return np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])


def test_auroc_and_its_bootstrap_over_groups():
    from torchmetrics.functional.classification import binary_auroc
    import torch

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p = np.round(rng.random(60) * 0.5 + 0.4 * y, 2)  # rounded: ties within and across classes
    groups = [f"slide{i % 7}" for i in range(60)]
    s = Scores(y.tolist(), p.tolist(), groups)
    assert auroc(s) == pytest.approx(_pairwise_auroc(y, p))
    assert auroc(s) == pytest.approx(float(binary_auroc(torch.tensor(p), torch.tensor(y))), abs=1e-6)
    # A resample's weights count each tile as often as its slide was drawn: the AUROC of the repeated tiles.
    names = sorted(set(groups))
    w = rng.integers(0, 3, (4, len(names))).astype(float)
    for row in w:
        rep = np.array([int(row[names.index(g)]) for g in groups])
        assert _auroc(s, names, row[None])[0] == pytest.approx(_pairwise_auroc(np.repeat(y, rep), np.repeat(p, rep)))
    assert auroc(Scores([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], ["a"] * 4)) == pytest.approx(0.75)
    # Bootstrap of the difference: a method that ranks every positive above every negative against chance.
    perfect = Scores(y.tolist(), (y + 0.1 * p).tolist(), groups)
    d, lo, hi = group_bootstrap({0: perfect, 1: perfect}, {0: s, 1: s})
    assert d == pytest.approx(1 - auroc(s)) and 0 < lo <= d <= hi


def test_a_two_class_comparison_pairs_auroc_too(tmp_path):
    """Records of two-class runs carry each test tile's score; the report pairs the methods in AUROC
    beside the headline metric (a method that ranks perfectly against one that does not)."""
    from lstainnorm.compare.report import write_report
    from lstainnorm.compare.stats import counts_of, scores_by_tile

    csv_path = tmp_path / "test_predictions.csv"
    csv_path.write_text("path,centre,group,label,prediction,probability,p_atypical,p_normal\n"
                        "a.png,A,s1,atypical,atypical,0.9,0.9,0.1\nb.png,A,,normal,normal,0.7,0.3,0.7\n")
    assert scores_by_tile(csv_path) == {"positive": "normal", "label": [0, 1], "score": [0.1, 0.7], "group": ["s1", "b.png"]}
    three = tmp_path / "three.csv"
    three.write_text("path,centre,group,label,prediction,probability,p_a,p_b,p_c\nx.png,A,s,a,a,0.5,0.5,0.3,0.2\n")
    assert scores_by_tile(three) is None

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40)
    groups = [f"s{i % 8}" for i in range(40)]
    records = []
    for method, good in (("none", False), ("template", True)):
        for seed in (0, 1, 2):
            p = (0.6 * y + 0.3 * rng.random(40)) if good else rng.random(40)
            pred = (p > 0.5).astype(int)
            records.append({"protocol": "p", "method": method, "seed": seed, "minutes": 1.0,
                            "metrics": {"bal_acc": float(np.mean([np.mean(pred[y == c] == c) for c in (0, 1)])), "auroc": 0.5},
                            "groups": counts_of(y.tolist(), pred.tolist(), groups),
                            "scores": {"positive": "1", "label": y.tolist(), "score": p.tolist(), "group": groups}})
    text = write_report(records, [], tmp_path, ["p"], ["none", "template"], "none", plots=False)["text"]
    auroc_part = text.split("The same pairs in AUROC")[1]
    row = next(line for line in auroc_part.splitlines() if line.startswith("| template |"))
    assert "better" in row and float(row.split("|")[2]) > 0.3  # ranks every tile right, against chance
    csv_rows = list(csv.DictReader((tmp_path / "pairs.csv").read_text().splitlines()))  # both metrics' pairs, named
    assert [(r["metric"], r["method"]) for r in csv_rows] == [("bal_acc", "template"), ("auroc", "template")]
    assert csv_rows[1]["verdict"] == "better"
    without = [{k: v for k, v in r.items() if k != "scores"} for r in records]  # older records: no AUROC pairs
    assert "The same pairs in AUROC" not in write_report(without, [], tmp_path, ["p"], ["none", "template"], "none", plots=False)["text"]


@pytest.mark.slow
def test_a_killed_run_resumes_and_a_failed_run_is_reported_then_retried(three_centres, tmp_path):
    out = tmp_path / "cmp"
    # A worker killed after its first epoch: the run folder holds last.ckpt, no metrics.json.
    os.environ["LSTAINNORM_INTERRUPT_AFTER_EPOCHS"] = "1"
    try:
        res = compare(three_centres, out, methods=["none"], seeds=[0], protocols=["A->B"], overrides=["trainer.max_epochs=2"], progress=False)
    finally:
        del os.environ["LSTAINNORM_INTERRUPT_AFTER_EPOCHS"]
    assert not res["records"] and len(res["failures"]) == 1
    fail = res["failures"][0]
    assert fail["returncode"] != 0 and Path(fail["log"]).is_file() and "Failed runs" in (out / "compare.md").read_text()
    run = Path(fail["run_dir"])
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "metrics.json").exists()
    # Not retried unless asked; then resumed from its checkpoint, in the same folder.
    res = compare(three_centres, out, methods=["none"], seeds=[0], protocols=["A->B"], overrides=["trainer.max_epochs=2"], progress=False)
    assert not res["records"] and len(res["failures"]) == 1
    cmd = job_command(three_centres, Job("A->B", "none", 0), out, None)
    assert cmd[-2:] == ["--resume", str(run)]
    res = compare(three_centres, out, methods=["none"], seeds=[0], protocols=["A->B"], overrides=["trainer.max_epochs=2"],
                  retry_failed=True, progress=False)
    assert len(res["records"]) == 1 and not res["failures"]
    assert res["records"][0]["run_dir"] == str(run) and res["records"][0]["epochs_run"] == 2
    assert (run / "checkpoints" / "best.ckpt").is_file() and not (run / "checkpoints" / "last.ckpt").exists()
    assert "resumed" in Path(fail["log"]).read_text() or "--resume" in Path(fail["log"]).read_text()


def _browser() -> str | None:
    return next((b for b in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if b), None)


# Added to a copy of the page: once loaded, the body says how many images the browser could decode.
_COUNT_IMAGES = ('<script>window.addEventListener("load", () => {const i = [...document.images];'
                 'document.body.setAttribute("data-images", i.length);'
                 'document.body.setAttribute("data-loaded", i.filter(x => x.complete && x.naturalWidth > 0).length);});</script>')


@pytest.mark.heavy
@pytest.mark.slow
@pytest.mark.skipif(_browser() is None, reason="no headless browser here (make browser installs Debian's chromium)")
def test_the_report_opens_in_a_headless_browser_with_every_image_shown(three_centres, tmp_path):
    out = tmp_path / "cmp"
    compare(three_centres, out, methods=["none", "template"], seeds=[0], protocols=["A->C"], overrides=["trainer.max_epochs=1"], progress=False)
    page = out / "report.html"
    probe = out / "report.probe.html"  # beside it, so that its relative image paths resolve alike
    probe.write_text(page.read_text().replace("</body>", _COUNT_IMAGES + "</body>"))
    common = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000"]
    dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180).stdout
    body = re.search(r'<body[^>]*data-images="(\d+)"[^>]*data-loaded="(\d+)"', dom)
    assert body, "the browser did not load the page to its end"
    assert int(body[1]) >= 3 and body[1] == body[2], f"{body[2]} of {body[1]} images shown"
    assert dom.count("<table") == page.read_text().count("<table")
    shot = tmp_path / "shot.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()], capture_output=True, timeout=180)
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.std() > 5  # something drawn, not a blank page


@pytest.mark.heavy
@pytest.mark.slow
def test_segmentation_compare_on_its_split(tmp_path):
    from lstainnorm.data.synthetic import write_synthetic_segmentation

    root = write_synthetic_segmentation(tmp_path / "seg", n_images=6, size=64, centres=2, seed=1)
    cfg = {"task": "segmentation", "data": {"batch_size": 4}, "norm": {"templates": "auto", "compile": "false"},
           "model": {"backbone": "resnet18", "decoder_channels": [16, 8, 8, 8, 8]},
           "segmentation": {"root": str(root), "split_column": "tss_code", "test_values": ["B"], "crop": 32,
                            "samples_per_image": 1, "window": 64, "min_size": 4},
           "trainer": {"max_epochs": 1, "accelerator": "cpu", "logger": "none"}}
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(cfg))
    res = compare(tmp_path / "seg.yaml", tmp_path / "out", methods=["none", "template"], seeds=[0, 1], progress=False, plots=False)
    assert res["metric"] == "dice" and len(res["records"]) == 4
    assert all(isinstance(v, float) for r in res["records"] for v in r["groups"].values())  # Dice per image: the bootstrap's groups
    (pair,) = res["pairs"]["split"]
    assert pair["boot_low"] is not None and pair["boot_low"] <= pair["diff"] <= pair["boot_high"]
    with pytest.raises(ValueError, match="centre protocols are for classification"):
        compare(tmp_path / "seg.yaml", tmp_path / "out2", protocols=["leave-one-centre-out"], progress=False)


def test_protocols_come_from_the_manifest_centres(three_centres):
    cfg, _ = load_config(three_centres)
    got = expand_protocols(["split", "leave-one-centre-out", "A,B->C"], cfg)
    assert list(got) == ["split", "loco:A", "loco:B", "loco:C", "A,B->C"]
    assert got["loco:B"] == ["data.train_centres=[A,C]", "data.test_centres=[B]", "data.test_split=null"]
    for bad, msg in (("A->Z", "unknown centre"), ("A->A", "both train and test"), ("bogus", "unknown protocol"), ("->C", "name training")):
        with pytest.raises(ValueError, match=msg):
            expand_protocols([bad], cfg)
    for ov in got.values():  # every protocol is a valid config
        make_config(yaml.safe_load(three_centres.read_text()), ov)


def test_paired_statistics_and_the_power_line():
    assert paired_t([0.01]) is None
    m, lo, hi = paired_t([0.02, 0.03, 0.025])
    assert m == pytest.approx(0.025) and lo > 0 and hi < 0.05
    res, need = power_line([0.01, 0.03, 0.02, 0.0, 0.04])
    sd = np.std([0.01, 0.03, 0.02, 0.0, 0.04], ddof=1)
    assert res == pytest.approx(2.776445 * sd / np.sqrt(5), rel=1e-4)
    assert need is not None and need > 5  # a 1-point difference needs more seeds at this spread
    assert power_line([0.001, 0.002, 0.0015])[1] <= 3  # a steady difference: few seeds
    assert power_line([0.05]) == (None, None)
    assert verdict((0.01, 0.03), (0.005, 0.02)) == "better"
    assert verdict((-0.01, 0.03), (0.005, 0.02)) == "not resolved (the seeds' interval includes 0)"
    assert verdict((0.01, 0.03), (-0.005, 0.02)) == "not resolved"
    assert verdict(None, (-0.03, -0.01)) == "one seed only (below on the test groups)"
    assert verdict(None, (0.01, 0.03), groups="slides") == "one seed only (above on the slides)"
    assert verdict((-0.03, -0.01), (-0.02, -0.001)) == "worse"
    assert verdict((0.01, 0.03), (-0.03, -0.01)) == "not resolved (the intervals disagree)"
    assert verdict((0.01, 0.03), None) == "better (seeds only)"
    # Bootstrap over groups: scores per image (segmentation) and counts per class (classification).
    d, lo, hi = group_bootstrap({0: {"a": 0.8, "b": 0.6}}, {0: {"a": 0.7, "b": 0.5}})
    assert d == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    counts = {0: {"s1": {"x": [2, 2], "y": [1, 2]}, "s2": {"x": [1, 1], "y": [2, 2]}}}
    ref = {0: {"s1": {"x": [1, 2], "y": [1, 2]}, "s2": {"x": [0, 1], "y": [2, 2]}}}
    d, lo, hi = group_bootstrap(counts, ref)
    assert d == pytest.approx((1.0 + 0.75) / 2 - (1 / 3 + 0.75) / 2) and lo <= d <= hi


@pytest.mark.slow
def test_normalize_workers_split_a_folder_into_shards_with_the_same_outputs(tmp_path):
    """The executor that runs a comparison's runs also runs `normalize` shards: the same files as one process."""
    from PIL import Image

    from lstainnorm.cli import main

    rng = np.random.default_rng(0)
    inp = tmp_path / "in"
    (inp / "sub").mkdir(parents=True)
    for i in range(5):
        img = (rng.random((24, 24, 3)) * 120 + 100).astype(np.uint8)
        Image.fromarray(img).save(inp / ("sub" if i % 2 else ".") / f"t{i}.png")
    import torch

    from lstainnorm.layers.template import estimate_template

    tpl = tmp_path / "t.yaml"
    estimate_template(torch.rand(2, 3, 16, 16), spaces=("lab",), progress=False).save(tpl)
    assert main(["normalize", "--template", str(tpl), str(inp), str(tmp_path / "one")]) == 0
    assert main(["normalize", "--template", str(tpl), str(inp), str(tmp_path / "many"), "--workers", "2"]) == 0
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    many = sorted(p.relative_to(tmp_path / "many") for p in (tmp_path / "many").rglob("*.png"))
    assert one == many and len(one) == 5
    for rel in one:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "many" / rel).read_bytes()
    logs = sorted((tmp_path / "many" / ".lstainnorm-logs").glob("shard-*.log"))
    assert [p.name for p in logs] == ["shard-1-of-2.log", "shard-2-of-2.log"]
    with pytest.raises(ValueError, match="--shard and --workers"):
        from lstainnorm.cli import _normalize_shards, build_parser

        _normalize_shards(build_parser().parse_args(["normalize", "--template", str(tpl), str(inp), str(tmp_path / "x"), "--workers", "2", "--shard", "1/2"]))


@pytest.mark.parametrize("keep_last", [False, True])
def test_a_recorded_run_keeps_its_best_checkpoint_and_drops_last_unless_asked(tmp_path, monkeypatch, keep_last):
    """last.ckpt only resumes an unfinished run: once recorded it goes (unless keep_last); best.ckpt stays.
    A stand-in for `lstainnorm train` writes a finished run folder."""
    from lstainnorm.compare import engine

    def fake_train(config, job, out, threads):
        run = job.run_root(out) / "20260101_000000_run"
        script = (f"import pathlib; r = pathlib.Path({str(run)!r}); (r / 'checkpoints').mkdir(parents=True); "
                  "[(r / 'checkpoints' / n).write_bytes(b'x') for n in ('best.ckpt', 'last.ckpt')]; "
                  "(r / 'metrics.json').write_text('{\"test\": {\"overall\": {\"bal_acc\": 0.5}}, \"epochs_run\": 1}')")
        return [sys.executable, "-c", script]

    monkeypatch.setattr(engine, "job_command", fake_train)
    records, failures = engine.run_jobs(tmp_path / "cfg.yaml", [Job("p", "none", 0)], tmp_path / "out", progress=None, keep_last=keep_last)
    assert len(records) == 1 and not failures and records[0]["metrics"] == {"bal_acc": 0.5}
    ckpts = Path(records[0]["run_dir"]) / "checkpoints"
    assert (ckpts / "best.ckpt").is_file() and (ckpts / "last.ckpt").is_file() == keep_last
