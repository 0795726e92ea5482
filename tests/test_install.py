"""The wheel: its core install is the layer on torch alone; a missing extra says what to install.

The wheel is built from this checkout and installed without its dependencies into a fresh venv that
sees only torch, numpy and PyYAML (and what they need) from this environment: nothing is downloaded,
and lightning, timm, omegaconf, torchvision, Pillow and the rest are absent, as after
``pip install lstainnorm`` on a machine with torch.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = {"torch", "numpy", "pyyaml"}
pytestmark = pytest.mark.slow


def _closure(names: set[str]) -> set[str]:
    """The distributions ``names`` need, recursively (markers of extras ignored)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional requirement that is not installed here
        seen.add(key)
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
    return seen


def _top_levels(dist_names: set[str]) -> set[Path]:
    """Every file or folder directly in site-packages that belongs to these distributions."""
    out: set[Path] = set()
    for name in dist_names:
        dist = md.distribution(name)
        for f in dist.files or []:
            first = Path(str(f)).parts[0]
            if first not in ("..", "bin") and not first.endswith(".pth"):
                out.add(Path(dist.locate_file(first)))
    return {p for p in out if p.exists()}


@pytest.fixture(scope="module")
def core_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("core")
    dist_dir = tmp / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist_dir), str(REPO)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = dist_dir.glob("lstainnorm-*.whl")
    # Only the core's closure is visible to the new venv: symlinks in one folder on its path.
    site = tmp / "core-site"
    site.mkdir()
    for p in _top_levels(_closure(CORE)):
        (site / p.name).symlink_to(p)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    (next((venv / "lib").glob("python3*")) / "site-packages" / "core.pth").write_text(str(site) + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"wheel": wheel, "python": py, "bin": venv / "bin", "tmp": tmp}


def _run(env, code: str, *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(env["python"]), *(["-c", code] if code else []), *args], capture_output=True, text=True,
                          timeout=600, cwd=env["tmp"], env=clean)


def test_the_wheel_requires_only_the_core(core_env):
    with zipfile.ZipFile(core_env["wheel"]) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        names = z.namelist()
    reqs = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    core = {re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0].lower() for r in reqs if "extra ==" not in r}
    assert core == CORE, reqs
    assert not any(re.search(r"<=?\s*\d", r) for r in reqs), f"upper caps: {[r for r in reqs if '<' in r]}"
    assert "lstainnorm/py.typed" in names
    assert {"lstainnorm/configs/classify.yaml", "lstainnorm/configs/segment.yaml"} <= set(names)


def test_the_core_install_runs_the_layer_example_and_names_extras(core_env):
    r = _run(core_env, "import lightning")
    assert r.returncode != 0, "the core venv must not see the [train] extra"
    r = _run(core_env, "", str(REPO / "docs" / "examples" / "core_layer.py"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lab" in r.stdout
    code = """
import torch, lstainnorm
from lstainnorm.transforms import StainNormalize
t = StainNormalize.from_template(None)
y = t(torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8))
assert y.dtype == torch.uint8 and y.shape == (3, 16, 16)
assert 'macenko' in lstainnorm.list_norms()
try:
    lstainnorm.create_norm('macenko')
except ModuleNotFoundError as err:
    print('MACENKO:', err)
"""
    r = _run(core_env, code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pip install 'lstainnorm[baselines]'" in r.stdout
    r = subprocess.run([str(core_env["bin"] / "lstainnorm"), "train", "classify.yaml"], capture_output=True, text=True, timeout=300,
                       cwd=core_env["tmp"])
    assert r.returncode == 1 and "pip install 'lstainnorm[train]'" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_the_core_install_loads_a_trained_layer(core_env, tmp_path):
    """A run trained with the [train] extra; its layer loads and normalises with the core alone."""
    from lstainnorm.config import make_config
    from lstainnorm.data.synthetic import write_synthetic
    from lstainnorm.tasks.train import RUN_DIR_ENV, train

    write_synthetic(tmp_path / "d", centres=2, per_class=4, size=32, seed=0, classes=2, workers=1, progress=False)
    cfg, notes = make_config({
        "output_path": str(tmp_path / "runs"), "data": {"manifest": str(tmp_path / "d" / "manifest.csv"), "batch_size": 8},
        "norm": {"mode": "lstainnorm", "templates": "auto", "compile": "false"}, "model": {"backbone": "test_resnet"},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "progress": False, "logger": "none"}})
    os.environ.pop(RUN_DIR_ENV, None)
    run = train(cfg, notes)["run_dir"]
    os.environ.pop(RUN_DIR_ENV, None)
    code = f"""
import torch
from lstainnorm.runs import load_norm
t = load_norm({run!r})
y = t.norm(torch.rand(2, 3, 32, 32))
assert y.shape == (2, 3, 32, 32) and torch.isfinite(y).all()
print(type(t.norm).__name__, t.config.norm.mode)
"""
    r = _run(core_env, code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["LStainNorm", "lstainnorm"]


def _extras() -> dict[str, set[str]]:
    """pyproject's extras, each as the set of distributions it installs (nested extras expanded)."""
    import tomllib

    opt = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def expand(name: str) -> set[str]:
        out = set()
        for req in opt[name]:
            m = re.match(r"lstainnorm\[(.*)\]", req)
            if m:
                for sub in m.group(1).split(","):
                    out |= expand(sub.strip())
            else:
                out.add(re.sub(r"[-_.]+", "-", re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]).lower())
        return out

    return {name: expand(name) for name in opt}


@pytest.mark.parametrize("module", sorted(__import__("lstainnorm.extras", fromlist=["EXTRA_OF"]).EXTRA_OF))
def test_each_missing_module_names_the_extra_that_installs_it(module):
    """The sentence a missing module produces names an extra whose requirements install that module
    (and the module imports with the full install: the extra's smoke test)."""
    import importlib

    from lstainnorm.extras import EXTRA_OF, missing_extra

    extra = EXTRA_OF[module]
    importlib.import_module(module)
    dists = {re.sub(r"[-_.]+", "-", d).lower() for d in md.packages_distributions().get(module, [])}
    assert dists & _extras()[extra], f"{module} comes from {dists}, which [{extra}] does not install"
    assert dists & _extras()["all"]
    msg = str(missing_extra(ModuleNotFoundError(name=f"{module}.sub"), "lstainnorm train"))
    assert msg == f"lstainnorm train needs {module}, which this install leaves out: pip install 'lstainnorm[{extra}]'"
    assert missing_extra(ModuleNotFoundError(name="not_an_extra"), "x") is None
