"""The fault matrix: bad and unlucky input, per command and public function.

Every test is named ``test_<command>_...`` (``test_security_...`` cases are parametrised by
command): RELIABILITY.md is the table of these cases, per command
(``python benchmarks/reliability_table.py``). Each case asserts the
expected outcome (the exact output, a named error or a reported skip), that nothing crashed with
a traceback or produced NaN, and that no input file changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import killed_writer_temp
from PIL import Image

import lstainnorm
from lstainnorm.apply.predict import predict_folder
from lstainnorm.cli import main
from lstainnorm.config import make_config
from lstainnorm.data.synthetic import SyntheticHE, write_synthetic
from lstainnorm.files import confined, unique_names
from lstainnorm.layers.template import Template, estimate_template
from lstainnorm.runs import RUN_DIR_ENV, CheckpointError, load_checkpoint
from lstainnorm.tasks.train import train

REPO = Path(__file__).resolve().parents[1]


# -- helpers ---------------------------------------------------------------------------------------
def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (symlinks not followed twice)."""
    out = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = Path(dirpath) / f
                if p.is_file():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tiles(folder: Path, n: int = 4, size: int = 48, seed: int = 0, ext: str = ".png") -> list[Path]:
    gen = SyntheticHE(size=size, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"tile_{i}{ext}"
        Image.fromarray(gen.render(i % 6, i % 4, i)[0]).save(p)
        out.append(p)
    return out


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def template_yaml(path: Path, mu=(65.0, 20.0, -10.0), sigma=(12.0, 7.0, 5.0)) -> Path:
    path.write_text(yaml.safe_dump({"mu0_lab": list(mu), "sigma0_lab": list(sigma)}))
    return path


class _Boom:
    """Unpickling this calls Path.touch(marker): proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def malicious_run(tmp: Path) -> tuple[Path, Path]:
    run = tmp / "evil_run"
    (run / "checkpoints").mkdir(parents=True)
    marker = tmp / "CODE_RAN"
    ckpt = {"state_dict": {}, "hyper_parameters": {"config": {"task": "classification"}, "classes": ["a"]}, "x": _Boom(marker)}
    torch.save(ckpt, run / "checkpoints" / "best.ckpt")
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    (run / "config.yaml").write_text("task: classification\n")
    return run, marker


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained classification run (test_resnet, 1 epoch) and its synthetic data."""
    tmp = tmp_path_factory.mktemp("faults")
    synth = write_synthetic(tmp / "synth", centres=2, per_class=5, size=32, seed=0, classes=2, workers=1, progress=False).parent
    os.environ.pop(RUN_DIR_ENV, None)
    cfg, notes = make_config({
        "seed": 0, "output_path": str(tmp / "runs"), "postfix": "f",
        "data": {"manifest": str(synth / "manifest.csv"), "train_centres": ["A"], "batch_size": 8},
        "norm": {"mode": "lstainnorm"}, "model": {"backbone": "test_resnet"},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "progress": False},
    })
    res = train(cfg, notes)
    os.environ.pop(RUN_DIR_ENV, None)
    return Path(res["run_dir"]), synth


@pytest.fixture(autouse=True)
def _fresh_env():
    os.environ.pop(RUN_DIR_ENV, None)
    yield
    os.environ.pop(RUN_DIR_ENV, None)


# -- security: model files are data -----------------------------------------------------------------
SECURITY_COMMANDS = {
    "evaluate": lambda run, tmp: ["evaluate", run, "--data", tmp / "in"],
    "normalize": lambda run, tmp: ["normalize", "--run", run, tmp / "in", tmp / "out"],
    "export": lambda run, tmp: ["export", run, "-o", tmp / "n.onnx"],
    "report": lambda run, tmp: ["report", run, "-o", tmp / "rep", "--images", tmp / "in"],
    "predict": lambda run, tmp: ["predict", run, tmp / "in", tmp / "out"],
    "train": lambda run, tmp: ["train", "--resume", run],
    "stress": lambda run, tmp: ["stress", run, "--data", tmp / "in"],
}


@pytest.mark.parametrize("command", list(SECURITY_COMMANDS), ids=list(SECURITY_COMMANDS))
def test_security_malicious_checkpoint_never_runs_code(tmp_path, capsys, command):
    run, marker = malicious_run(tmp_path)
    tiles(tmp_path / "in" / "a")
    before = snapshot(tmp_path / "in", run)
    code, text = run_cli(capsys, *SECURITY_COMMANDS[command](run, tmp_path))
    assert code == 1
    assert "not a trusted lstainnorm checkpoint" in text
    assert not marker.exists(), "the checkpoint's code ran"
    assert snapshot(tmp_path / "in", run) == before
    assert not (tmp_path / "n.onnx").exists() and not (tmp_path / "rep" / "index.html").exists()


@pytest.mark.parametrize("kind", ["truncated", "not-a-checkpoint", "empty"])
def test_export_tampered_checkpoints_are_named_errors(tmp_path, trained, capsys, kind):
    run, _ = trained
    bad = tmp_path / "bad.ckpt"
    if kind == "truncated":
        bad.write_bytes((run / "checkpoints" / "best.ckpt").read_bytes()[:5000])
    elif kind == "not-a-checkpoint":
        torch.save({"weights": torch.zeros(3)}, bad)
    else:
        bad.write_bytes(b"")
    with pytest.raises(CheckpointError, match=str(bad)):
        load_checkpoint(bad)
    code, text = run_cli(capsys, "export", bad, "-o", tmp_path / "n.pt")
    assert code == 1 and str(bad) in text and "Traceback" not in text


def test_normalize_outputs_stay_inside_the_output_folder(tmp_path):
    out = tmp_path / "out"
    for rel in ("../x.png", "a/../../x.png", "/etc/x.png"):
        with pytest.raises(ValueError, match="outside the output folder"):
            confined(out, rel)
    assert confined(out, "a/..b/x.png") == out / "a" / "..b" / "x.png"  # a name, not a parent
    names = unique_names({Path("a.png"): Path("a"), Path("a.jpg"): Path("a"), Path("b.png"): Path("b")})
    assert names == {Path("a.png"): Path("a-png"), Path("a.jpg"): Path("a-jpg"), Path("b.png"): Path("b")}


# -- normalize ------------------------------------------------------------------------------------
def test_normalize_rerun_with_other_settings_refuses_or_redoes(tmp_path, capsys):
    tiles(tmp_path / "in")
    t1, t2 = template_yaml(tmp_path / "t1.yaml"), template_yaml(tmp_path / "t2.yaml", mu=(55.0, 25.0, -5.0))
    before = snapshot(tmp_path / "in")
    assert run_cli(capsys, "normalize", "--template", t1, tmp_path / "in", tmp_path / "out")[0] == 0
    first = snapshot(tmp_path / "out")
    code, text = run_cli(capsys, "normalize", "--template", t2, tmp_path / "in", tmp_path / "out")
    assert code == 1 and "other settings" in text and "--force" in text
    assert snapshot(tmp_path / "out") == first  # nothing mixed
    for flag in (["--no-tissue-stats"], ["--window", "16"]):
        code, text = run_cli(capsys, "normalize", "--template", t1, *flag, tmp_path / "in", tmp_path / "out")
        assert code == 1 and "other settings" in text
    assert run_cli(capsys, "normalize", "--template", t2, "--force", tmp_path / "in", tmp_path / "out")[0] == 0
    assert run_cli(capsys, "normalize", "--template", t2, tmp_path / "in", tmp_path / "fresh")[0] == 0
    redone = {Path(k).name: v for k, v in snapshot(tmp_path / "out").items()}
    fresh = {Path(k).name: v for k, v in snapshot(tmp_path / "fresh").items()}
    assert redone == fresh and redone != {Path(k).name: v for k, v in first.items()}
    assert snapshot(tmp_path / "in") == before



@pytest.mark.parametrize("args", [["--window", "0"], ["--window", "-3"], ["--tile", "0"], ["--shard", "3/2"], ["--shard", "x"]],
                         ids=lambda a: "".join(a).strip("-").replace("/", "of"))
def test_normalize_numeric_options_rejected_before_work(tmp_path, capsys, args):
    tiles(tmp_path / "in", n=1)
    t = template_yaml(tmp_path / "t.yaml")
    try:
        code, text = run_cli(capsys, "normalize", "--template", t, *args, tmp_path / "in", tmp_path / "out")
    except SystemExit as e:  # argparse: usage error, exit status 2
        code, text = e.code, capsys.readouterr().err
    assert code in (1, 2) and ("must" in text or "expected" in text)
    assert not (tmp_path / "out").exists()


def test_normalize_python_api_rejects_bad_window(tmp_path):
    tiles(tmp_path / "in", n=1)
    from lstainnorm.apply.folders import normalize_path

    with pytest.raises(ValueError, match="window must be a positive"):
        normalize_path(lstainnorm.StainNorm("lab"), tmp_path / "in", tmp_path / "out", window=0, progress=False)
    norm = lstainnorm.LStainNorm()  # the caller's layer keeps its own setting afterwards
    normalize_path(norm, tmp_path / "in", tmp_path / "out", tissue_stats=True, progress=False)
    assert not norm.tissue_stats and not any(b.tissue_stats for b in norm.branches.values())


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n-truncated", b"GIF89a not really", b"plain text"], ids=["empty", "truncated", "mislabeled", "text"])
def test_normalize_all_unreadable_exits_nonzero_and_names_files(tmp_path, capsys, content):
    (tmp_path / "in").mkdir()
    bad = tmp_path / "in" / "bad file ü.png"
    bad.write_bytes(content)
    with pytest.warns(UserWarning, match="skipping unreadable input") as caught:
        code, text = run_cli(capsys, "normalize", "--template", template_yaml(tmp_path / "t.yaml"), tmp_path / "in", tmp_path / "out")
    assert code == 1 and str(bad) in text and "every input was unreadable" in text
    assert all("skipping unreadable input" in str(w.message) and str(bad) in str(w.message) for w in caught)
    assert bad.read_bytes() == content


@pytest.mark.parametrize("value", [255, 0], ids=["white", "black"])
def test_normalize_glass_and_black_stay_as_they_are(tmp_path, capsys, value):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(tmp_path / "in" / "blank.png")
    assert run_cli(capsys, "normalize", "--template", template_yaml(tmp_path / "t.yaml"), tmp_path / "in", tmp_path / "out")[0] == 0
    out = np.asarray(Image.open(tmp_path / "out" / "blank.png"))
    assert (out == value).all()


def test_normalize_run_keeps_glass_border(tmp_path, trained, capsys):
    run, _ = trained
    img = np.full((160, 160, 3), 245, np.uint8)
    gen = SyntheticHE(size=96, seed=1)
    img[32:128, 32:128] = gen.render(0, 1, 0)[0]
    (tmp_path / "in").mkdir()
    Image.fromarray(img).save(tmp_path / "in" / "region.png")
    assert run_cli(capsys, "normalize", "--run", run, tmp_path / "in", tmp_path / "out")[0] == 0
    out = np.asarray(Image.open(tmp_path / "out" / "region.png")).astype(int)
    assert np.abs(out[:16] - 245).max() <= 1  # the glass border is still glass
    assert np.abs(out[40:120, 40:120] - img[40:120, 40:120]).mean() > 1  # the tissue was normalised



def _odd_image(kind: str) -> Image.Image:
    rgb = SyntheticHE(size=48, seed=2).render(1, 2, 0)[0]
    if kind in ("L", "LA", "RGBA", "P", "1", "CMYK"):
        return Image.fromarray(rgb).convert(kind)
    if kind == "I;16":
        return Image.fromarray((rgb[..., 0].astype(np.uint16) * 257))
    if kind == "1x1":
        return Image.fromarray(rgb[:1, :1])
    if kind == "1x3000":
        return Image.fromarray(np.tile(rgb[:1], (1, 63, 1))[:, :3000])
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["L", "LA", "RGBA", "P", "1", "CMYK", "I;16", "1x1", "1x3000"])
def test_normalize_unusual_modes_depths_and_sizes(tmp_path, capsys, kind):
    (tmp_path / "in").mkdir()
    im = _odd_image(kind)
    name = "odd.jpg" if kind == "CMYK" else "odd.png"
    im.save(tmp_path / "in" / name)
    before = snapshot(tmp_path / "in")
    code, text = run_cli(capsys, "normalize", "--template", template_yaml(tmp_path / "t.yaml"), tmp_path / "in", tmp_path / "out")
    assert code == 0, text
    out = np.asarray(Image.open(tmp_path / "out" / name))
    assert out.shape == (im.size[1], im.size[0], 3) and out.dtype == np.uint8
    assert snapshot(tmp_path / "in") == before


def test_normalize_colliding_names_get_one_output_each(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    gen = SyntheticHE(size=48, seed=0)
    for i, name in enumerate(("x.tif", "x.svs")):  # a small .svs is an image; both would become x.tif
        Image.fromarray(gen.render(i, i, i)[0]).save(tmp_path / "in" / name, format="TIFF")
    assert run_cli(capsys, "normalize", "--template", template_yaml(tmp_path / "t.yaml"), tmp_path / "in", tmp_path / "out")[0] == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == ["x-svs.tif", "x-tif.tif"]


def test_normalize_symlinked_folders_and_loops(tmp_path, capsys):
    tiles(tmp_path / "data" / "real", n=2)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "data" / "real", target_is_directory=True)
    (tmp_path / "data" / "real" / "loop").symlink_to(tmp_path / "in", target_is_directory=True)
    before = snapshot(tmp_path / "data")
    code, _ = run_cli(capsys, "normalize", "--template", template_yaml(tmp_path / "t.yaml"), tmp_path / "in", tmp_path / "out")
    assert code == 0
    outs = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png"))
    assert outs == ["linked/tile_0.png", "linked/tile_1.png"]
    assert snapshot(tmp_path / "data") == before


def test_normalize_unicode_and_spaces_in_paths(tmp_path, capsys):
    src = tmp_path / "in put ß" / "Klasse é"
    tiles(src, n=2)
    out = tmp_path / "aus gabe ✓"
    assert run_cli(capsys, "normalize", "--template", template_yaml(tmp_path / "t ü.yaml"), tmp_path / "in put ß", out)[0] == 0
    assert sorted(p.name for p in (out / "Klasse é").iterdir()) == ["tile_0.png", "tile_1.png"]


def test_normalize_output_inside_input_refused(tmp_path, capsys):
    tiles(tmp_path / "in", n=2)
    before = snapshot(tmp_path / "in")
    code, text = run_cli(capsys, "normalize", "--template", template_yaml(tmp_path / "t.yaml"), tmp_path / "in", tmp_path / "in" / "out")
    assert code == 1 and "must not be INPUT or lie inside it" in text
    assert snapshot(tmp_path / "in") == before


def _normalize_cmd(inp: Path, out: Path, t: Path) -> list[str]:
    return [sys.executable, "-c", "import sys; from lstainnorm.cli import main; sys.exit(main(sys.argv[1:]))",
            "normalize", "--template", str(t), str(inp), str(out)]


_INTERRUPTED_N = 200  # enough that the signal lands mid-run on a fast or a busy machine


@pytest.fixture(scope="module")
def normalized_reference(tmp_path_factory):
    """Tiles, a template and an uninterrupted run's outputs, shared by both signals' tests."""
    root = tmp_path_factory.mktemp("interrupted")
    tiles(root / "in", n=_INTERRUPTED_N, size=128)
    t = template_yaml(root / "t.yaml")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_normalize_cmd(root / "in", root / "ref", t), check=True, capture_output=True, env=env)
    return root, t


@pytest.mark.heavy
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_normalize_interrupted_then_rerun_is_byte_identical(tmp_path, sig, normalized_reference):
    n = _INTERRUPTED_N
    root, t = normalized_reference
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Ctrl-C as a user's shell delivers it: a child inherits an ignored SIGINT from its parent (a
    # test run, a CI shell), and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen(
        _normalize_cmd(root / "in", tmp_path / "out", t), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "out").glob("*.png"))) < 5:
        time.sleep(0.02)
    proc.send_signal(sig)
    code = proc.wait(60)
    assert code != 0  # it was stopped mid-run
    partial = len(list((tmp_path / "out").glob("*.png")))
    assert partial < n
    assert subprocess.run(_normalize_cmd(root / "in", tmp_path / "out", t), capture_output=True, env=env).returncode == 0
    ref = {p.name: p.read_bytes() for p in (root / "ref").glob("*.png")}
    got = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.png")}
    assert got == ref
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp-")]  # no half-written files


def test_normalize_rerun_removes_half_files_of_a_killed_run_only(tmp_path, capsys):
    from lstainnorm.files import temp_prefix

    tiles(tmp_path / "in", n=2)
    out = tmp_path / "out"
    out.mkdir()
    dead = killed_writer_temp(out, "tile_0.png")
    live = out / f"{temp_prefix()}abc.png"  # a shard of the same job still writing (this process is alive)
    live.write_bytes(b"busy")
    assert run_cli(capsys, "normalize", "--template", template_yaml(tmp_path / "t.yaml"), tmp_path / "in", out)[0] == 0
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in out.iterdir() if p != live) == [".lstainnorm-normalize.json", "tile_0.png", "tile_1.png"]


# -- predict (any segmenter as a function) --------------------------------------------------------------
def _zeros(x):
    logits = torch.full((x.shape[0], 1, *x.shape[-2:]), -5.0)
    logits[..., 8:16, 8:16] = 5.0
    return logits


def test_predict_output_inside_input_is_not_read_back(tmp_path):
    tiles(tmp_path / "in", n=2)
    out = tmp_path / "in" / "out"
    r1 = predict_folder(_zeros, tmp_path / "in", out, progress=False)
    r2 = predict_folder(_zeros, tmp_path / "in", out, progress=False)
    assert len(r1["written"]) == 2 and r2["already_done"] == 2 and not r2["written"]
    assert not list(out.rglob("*_mask_mask.png"))



def test_predict_same_stem_inputs_get_their_own_outputs(tmp_path):
    tiles(tmp_path / "in", n=1, ext=".png")
    tiles(tmp_path / "in", n=1, ext=".jpg")
    res = predict_folder(_zeros, tmp_path / "in", tmp_path / "out", progress=False)
    assert len(res["written"]) == 2
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(f"tile_0-{e}_{k}.png" for e in ("png", "jpg") for k in ("mask", "instances", "overlay"))


def test_predict_unreadable_named(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="broken.png"):
        res = predict_folder(_zeros, tmp_path / "in", tmp_path / "out", progress=False)
    assert res["skipped"] == [str(tmp_path / "in" / "broken.png")] and not res["written"]


# -- templates ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [(0.0, 7.0, 5.0), (12.0, -1.0, 5.0), (12.0, float("nan"), 5.0), (12.0, 7.0, float("inf"))],
                         ids=["zero", "negative", "nan", "inf"])
def test_template_bad_sigma_is_an_error(tmp_path, capsys, sigma):
    t = tmp_path / "t.yaml"
    t.write_text(f"mu0_lab: [65, 20, -10]\nsigma0_lab: [{', '.join(str(s) for s in sigma)}]\n")
    with pytest.raises(ValueError, match="sigma0_lab"):
        Template.load(t)
    tiles(tmp_path / "in", n=1)
    code, text = run_cli(capsys, "normalize", "--template", t, tmp_path / "in", tmp_path / "out")
    assert code == 1 and "sigma0_lab" in text
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize("value", [255, 250, 0], ids=["white", "glass", "black"])
def test_template_from_images_without_tissue_is_an_error(tmp_path, capsys, value):
    (tmp_path / "in").mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(tmp_path / "in" / f"g{i}.png")
    with pytest.raises(ValueError, match="holds tissue"):
        estimate_template(torch.full((3, 3, 32, 32), value / 255.0))
    code, text = run_cli(capsys, "template", tmp_path / "in", "-o", tmp_path / "t.yaml")
    assert code == 1 and "none of the 3 images holds tissue" in text and not (tmp_path / "t.yaml").exists()


def test_template_all_unreadable_names_files(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"junk")
    code, text = run_cli(capsys, "template", tmp_path / "in", "-o", tmp_path / "t.yaml")
    assert code == 1 and "a.png" in text



# -- train and config ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override,match",
    [
        ("model.backbone=resnet1B", "did you mean 'resnet18'"),
        ("data.image_size=0", "data.image_size must be at least 1"),
        ("trainer.monitor=val/dice", "classification logs no metric 'val/dice'"),
        ("task=segmentation model.backbone=resnet18", "segmentation.root is required"),
        ("data.batch_size=0", "data.batch_size must be at least 1"),
    ],
    ids=["unknown-backbone", "image-size-0", "unknown-monitor", "segmentation-without-root", "batch-size-0"],
)
def test_train_bad_configs_fail_before_any_run_folder(tmp_path, trained, capsys, override, match):
    _, synth = trained
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"output_path": str(tmp_path / "runs"), "data": {"manifest": str(synth / "manifest.csv")},
                                   "model": {"backbone": "test_resnet"}, "trainer": {"max_epochs": 1, "accelerator": "cpu"}}))
    code, text = run_cli(capsys, "train", cfg, *override.split())
    assert code == 1 and match in text and "Traceback" not in text
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_train_failure_after_the_run_folder_removes_it(tmp_path, trained, capsys):
    _, synth = trained
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"output_path": str(tmp_path / "runs"), "data": {"manifest": str(synth / "manifest.csv")},
                                   "norm": {"mode": "lstainnorm", "template_values": {"mu0_lab": [65, 20, -10], "sigma0_lab": [12, 0, 5]}},
                                   "model": {"backbone": "test_resnet"}, "trainer": {"max_epochs": 1, "accelerator": "cpu"}}))
    code, text = run_cli(capsys, "train", cfg)
    assert code == 1 and "sigma0_lab must be > 0" in text
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_train_non_finite_loss_stops_with_a_named_error(tmp_path, trained, capsys):
    """A run whose loss turns NaN stops with an error that names the epoch and batch, instead
    of training on NaN weights to the end (an absurd learning rate overflows the weights)."""
    _, synth = trained
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"output_path": str(tmp_path / "runs"), "data": {"manifest": str(synth / "manifest.csv"), "batch_size": 4},
                                   "norm": {"mode": "none"}, "model": {"backbone": "test_resnet"},
                                   "trainer": {"max_epochs": 3, "accelerator": "cpu", "progress": False}}))
    code, text = run_cli(capsys, "train", cfg, "optim.lr=1e30")
    assert code == 1 and "non-finite training loss" in text and "epoch" in text and "Traceback" not in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_train_gpu_without_gpu(tmp_path, trained, capsys):
    _, synth = trained
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"output_path": str(tmp_path / "runs"), "data": {"manifest": str(synth / "manifest.csv")},
                                   "model": {"backbone": "test_resnet"}}))
    code, text = run_cli(capsys, "train", cfg, "trainer.accelerator=gpu")
    assert code == 1 and "no CUDA GPU" in text and not (tmp_path / "runs").exists()



def test_train_resume_of_a_finished_run_changes_nothing(trained, capsys):
    run, _ = trained
    before = snapshot(run)
    code, text = run_cli(capsys, "train", "--resume", run)
    assert code == 0 and "already finished" in text
    assert snapshot(run) == before



def test_stress_bad_levels_data_and_settings_are_named_errors(tmp_path, trained, capsys):
    run, _ = trained
    tiles(tmp_path / "in" / "a")
    with pytest.raises(SystemExit):  # the parser: one range, (0, 1], for 1.5, 0 and nan alike
        run_cli(capsys, "stress", run, "--data", tmp_path / "in", "--levels", "1.5")
    assert "must be in (0, 1]" in capsys.readouterr().err
    from lstainnorm.tasks.stress import stress

    for bad in ([1.5], [0.0], [float("nan")], []):
        with pytest.raises(ValueError, match=r"severity levels must be in \(0, 1\]"):
            stress(run, tmp_path / "in", levels=bad, progress=False)
    code, text = "", ""
    for bad in ("0", "nan"):
        with pytest.raises(SystemExit):
            run_cli(capsys, "stress", run, "--data", tmp_path / "in", "--levels", bad)
        err = capsys.readouterr().err
        assert "must be in (0, 1]" in err and "Traceback" not in err
    code, text = 1, "severity levels must be in (0, 1]"
    assert code == 1 and "severity levels must be in (0, 1]" in text and "Traceback" not in text
    code, text = run_cli(capsys, "stress", run, "--data", tmp_path / "missing")
    assert code == 1 and "missing" in text and "Traceback" not in text
    with pytest.raises(SystemExit):  # argparse names the valid axes
        run_cli(capsys, "stress", run, "--data", tmp_path / "in", "--axes", "blur")
    assert "invalid choice: 'blur'" in capsys.readouterr().err


def test_evaluate_outputs_unique_per_data_set(tmp_path, trained, capsys):
    run, synth = trained
    outs = []
    for split in ("val", "test"):
        code, text = run_cli(capsys, "evaluate", run, "--data", synth / "manifest.csv", "--split", split)
        assert code == 0
        outs.append(text.strip().splitlines()[-1])
    assert outs[0] != outs[1]
    classes = json.loads((run / "classes.json").read_text())["classes"]
    written = []
    for d in ("a", "b"):  # two folders of the same name in different places
        for i, c in enumerate(classes):
            tiles(tmp_path / d / "same" / c, n=1, size=32, seed=i)
        code, text = run_cli(capsys, "evaluate", run, "--data", tmp_path / d / "same")
        assert code == 0, text
        written.append(text.strip().splitlines()[-1].split("written: ")[1])
    assert written[0] != written[1]
    assert [json.loads(Path(w).read_text())["data"] for w in written] == [str(tmp_path / d / "same") for d in ("a", "b")]



def test_evaluate_all_unreadable_exits_nonzero(tmp_path, trained, capsys):
    run, _ = trained
    for c in json.loads((run / "classes.json").read_text())["classes"]:
        (tmp_path / "d" / c).mkdir(parents=True)
        (tmp_path / "d" / c / "x.png").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="skipping unreadable tile") as caught:
        code, text = run_cli(capsys, "evaluate", run, "--data", tmp_path / "d")
    assert code == 1 and "x.png" in text
    assert len(caught) == 2 and all("x.png" in str(w.message) for w in caught)  # one per unreadable tile



# -- layers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: lstainnorm.StainNorm(), lambda: lstainnorm.LStainNorm(), lambda: lstainnorm.create_norm("none")],
                         ids=["stainnorm", "lstainnorm", "none"])
def test_layers_degenerate_shapes(make):
    norm = make()
    assert norm(torch.zeros(0, 3, 16, 16)).shape == (0, 3, 16, 16)
    for shape in [(1, 3, 1, 1), (2, 3, 1, 7), (1, 3, 9, 1)]:
        out = norm(torch.rand(shape))
        assert out.shape == shape and torch.isfinite(out).all()


# -- every failure a clear sentence ---------------------------------------------------------------
@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_security_any_junk_checkpoint_is_one_clear_error(tmp_path, capsys, command):
    """Text files ended in KeyError / IndexError inside torch.load: any content gets the one message."""
    for content in (b"hello", b"abc", b"", b"\x80\x02junk", b"PK\x03\x04 not a zip"):
        junk = tmp_path / "notes.txt"
        junk.write_bytes(content)
        before = snapshot(tmp_path)
        args = ("evaluate", junk, "--data", tmp_path) if command == "evaluate" else ("export", junk, "-o", tmp_path / "x.onnx")
        code, text = run_cli(capsys, *args)
        assert code == 1 and "is not a trusted lstainnorm checkpoint" in text and "Traceback" not in text, (content, text)
        assert snapshot(tmp_path) == before


def test_train_one_class_folder_is_named(tmp_path, capsys):
    tiles(tmp_path / "data" / "tumour")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"train": str(tmp_path / "data")}, "model": {"backbone": "test_resnet"},
                                   "output_path": str(tmp_path / "runs")}))
    code, text = run_cli(capsys, "train", cfg)
    assert code == 1 and "only one class ('tumour')" in text and "Traceback" not in text
    assert not (tmp_path / "runs").exists()


def test_template_output_that_cannot_be_written_is_named(tmp_path, capsys):
    tiles(tmp_path / "in")
    (tmp_path / "afile").write_text("a file where a folder should be")
    before = snapshot(tmp_path)
    code, text = run_cli(capsys, "template", tmp_path / "in", "-o", tmp_path / "afile" / "t.yaml")
    assert code == 1 and f"cannot write to {tmp_path / 'afile' / 't.yaml'}" in text and "Traceback" not in text
    (tmp_path / "folder.yaml").mkdir()
    code, text = run_cli(capsys, "template", tmp_path / "in", "-o", tmp_path / "folder.yaml")
    assert code == 1 and f"cannot write to {tmp_path / 'folder.yaml'}" in text and "Traceback" not in text
    assert snapshot(tmp_path) == before and not list(tmp_path.glob(".tmp-*"))


def test_stress_rerun_with_other_axes_merges_into_the_folder(tmp_path, trained, capsys):
    run, synth = trained
    out = tmp_path / "st"
    for axes in (["gamma"], ["jpeg"]):
        code, text = run_cli(capsys, "stress", run, "--data", synth / "manifest.csv", "--split", "test",
                             "--axes", *axes, "--levels", "1", "-o", out)
        assert code == 0, text
    assert "also holds earlier results" in text and "gamma" in text and "jpeg" in text
    saved = json.loads((out / "stress.json").read_text())
    assert set(saved["scores"]) == {"gamma", "jpeg"} and saved["merged"]
    assert {r["axis"] for r in csv_rows(out / "stress.csv")} == {"gamma", "jpeg"}


def csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_stress_interrupted_inside_lightning_exits_130(tmp_path, trained, capsys, monkeypatch):
    run, synth = trained
    from lstainnorm.tasks.module import StainNormModule

    def interrupted(self, batch, batch_idx):
        raise KeyboardInterrupt

    monkeypatch.setattr(StainNormModule, "test_step", interrupted)
    code, text = run_cli(capsys, "stress", run, "--data", synth / "manifest.csv", "--split", "test", "--axes", "gamma",
                         "--levels", "1", "-o", tmp_path / "st")
    import signal as _signal

    _signal.signal(_signal.SIGINT, _signal.default_int_handler)  # Lightning ignores Ctrl-C after the first
    assert code == 130 and "interrupted" in text and "Traceback" not in text


def test_export_info_names_what_the_file_is(tmp_path, trained, capsys):
    run, _ = trained
    (tmp_path / "empty.onnx").write_bytes(b"")
    code, text = run_cli(capsys, "export", "--info", tmp_path / "empty.onnx")
    assert code == 1 and "is empty (0 bytes)" in text
    code, text = run_cli(capsys, "export", "--info", run / "checkpoints" / "best.ckpt")
    assert code == 1 and "is a PyTorch checkpoint" in text and "lstainnorm export RUN" in text
    out = tmp_path / "new" / "dir" / "norm.pt"  # missing folders are made (and --help says so)
    code, text = run_cli(capsys, "export", run, "-o", out)
    assert code == 0 and out.is_file(), text
    (tmp_path / "cut.pt").write_bytes(out.read_bytes()[: out.stat().st_size // 3])
    code, text = run_cli(capsys, "export", "--info", tmp_path / "cut.pt")
    assert code == 1 and "truncated or damaged" in text and "Traceback" not in text
    with pytest.raises(SystemExit):
        run_cli(capsys, "export", "--help")
    assert "missing folders on the way are created" in " ".join(capsys.readouterr().out.split())


def test_normalize_image_given_as_template_is_named(tmp_path, capsys):
    imgs = tiles(tmp_path / "in")
    code, text = run_cli(capsys, "normalize", "--template", imgs[0], tmp_path / "in", tmp_path / "out")
    assert code == 1 and f"{imgs[0]} is not a template YAML" in text and "lstainnorm template" in text
    assert "Traceback" not in text and "decode" not in text


def test_train_summary_of_class_folder_data_has_no_empty_centre_line(tmp_path, capsys):
    from lstainnorm.tasks.train import summary

    res = {"run_dir": "r", "best_epoch": 1, "monitor": "val/acc", "best_val": 1.0, "epochs_run": 1,
           "test": {"overall": {"acc": 1.0, "bal_acc": 1.0, "f1": 1.0, "auroc": 1.0, "n": 4},
                    "per_centre": {"": {"acc": 1.0, "bal_acc": 1.0, "auroc": 1.0, "n": 4}}}}
    assert "centre" not in summary(res)
    res["test"]["per_centre"] = {"tupac16": {"acc": 0.5, "bal_acc": 0.6, "auroc": 0.7, "n": 4}}
    assert "centre tupac16 : acc 0.5000  bal_acc 0.6000  AUROC 0.7000 (n=4)" in summary(res)


def test_layers_known_third_party_notices_are_filtered_real_warnings_kept():
    import warnings

    from lstainnorm.cli import quiet_third_party

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`", DeprecationWarning)
        warnings.warn("`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`.", DeprecationWarning)
        warnings.warn("skipping unreadable tile: a.png", UserWarning)
    assert [str(w.message) for w in caught] == ["skipping unreadable tile: a.png"]


@pytest.mark.parametrize("command", ["template", "evaluate", "export", "report", "stress", "demo"])
def test_security_every_writing_command_takes_o_and_out(command):
    """One spelling everywhere: -o/--out; the old --output still works where it was."""
    from lstainnorm.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)).choices[command]
    flags = {s for a in sub._actions for s in a.option_strings}
    assert {"-o", "--out"} <= flags
    if command in ("template", "evaluate", "export", "report"):
        assert "--output" in flags
