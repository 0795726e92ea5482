"""The README's Python examples run as written."""

import re

import pytest
from conftest import REPO


def _blocks():
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _blocks()[index]
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "__readme__"})


def test_readme_layer_example_is_the_core_example():
    """The README's first snippet is docs/examples/core_layer.py (run by the core-install test in a venv
    with torch alone), so what a new user copies is what that test proves."""
    example = (REPO / "docs" / "examples" / "core_layer.py").read_text().split('"""', 2)[2].strip()
    assert example in _blocks()[0]


def test_readme_is_one_screen_to_the_first_result():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    head = "\n".join(text.splitlines()[:40])
    assert "pip install lstainnorm" in head and "make demo" in head and "make test" in head
