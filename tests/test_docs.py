"""The documentation site builds strictly (no broken link, no docstring the API pages cannot read), its
generated references match the code, and every public name of the package is documented."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the [docs] extra is not installed")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    site = tmp_path / "site"
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "lstainnorm compare" in cli and "--protocol" in cli
    config = (site / "reference" / "config" / "index.html").read_text()
    assert "optim.ema_decay" in config and "trainer.threshold" in config
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "estimate_template" in api and "LStainNorm" in api


def test_every_public_name_is_documented():
    import lstainnorm

    api = (REPO / "docs" / "reference" / "api.md").read_text()
    missing = []
    for name in lstainnorm.__all__:
        if name == "__version__":
            continue
        obj = getattr(lstainnorm, name)
        if not (getattr(obj, "__doc__", None) or "").strip():
            missing.append(f"{name}: no docstring")
        if name not in api:
            missing.append(f"{name}: not on docs/reference/api.md")
    for mod in ("lstainnorm.transforms", "lstainnorm.compare", "lstainnorm.runs", "lstainnorm.config"):
        m = importlib.import_module(mod)
        for name in getattr(m, "__all__", []):
            obj = getattr(m, name)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not (obj.__doc__ or "").strip():
                missing.append(f"{mod}.{name}: no docstring")
    assert not missing, "\n".join(missing)
