"""What users read carries no tracker numbers: the package's code, docstrings and messages, the
configs they start from, the README, the documentation, the benchmarks, the changelog, the Makefile
and every command's --help. (Users have no issue tracker.)"""

import argparse
import re
from pathlib import Path

import pytest

from lstainnorm.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
TRACKER = re.compile(r"\bissues?\s?-?#?\d+|\bissue's\b", re.IGNORECASE)


def _files():
    pkg = REPO / "src" / "lstainnorm"
    yield from sorted(p for p in pkg.rglob("*") if p.suffix in (".py", ".yaml", ".yml", ".md", ".txt") and p.is_file())
    yield from sorted((REPO / "configs").rglob("*.yaml"))
    yield from sorted((REPO / "docs").rglob("*.md"))
    yield from sorted((REPO / "docs").rglob("*.py"))
    yield from sorted((REPO / "benchmarks").rglob("*.py"))  # they print the tables BENCHMARKS.md shows
    yield from (REPO / name for name in ("Makefile", "README.md", "RELIABILITY.md", "CHANGELOG.md", "BENCHMARKS.md", "mkdocs.yml"))


@pytest.mark.parametrize("path", list(_files()), ids=lambda p: str(p.relative_to(REPO)))
def test_no_tracker_numbers_in_shipped_text(path):
    text = path.read_text()
    hits = [f"{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1) if TRACKER.search(line)]
    hits += [f"across lines: ...{m.group(0)}..." for m in TRACKER.finditer(" ".join(text.split())) if "\n" not in m.group(0)][: 0 if hits else 5]
    assert not hits, f"{path.relative_to(REPO)} names tracker issues:\n" + "\n".join(hits)


def test_no_tracker_numbers_in_command_help():
    parser = build_parser()
    texts = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            texts += [p.format_help() for p in action.choices.values()]
    assert len(texts) > 5
    for text in texts:
        assert not TRACKER.search(text), TRACKER.search(text).group(0)
