"""RELIABILITY.md's table: the fault matrix (tests/test_faults.py) run and counted per command.

    python benchmarks/reliability_table.py            # runs the matrix, prints the table

Each case of the matrix asserts the expected outcome (exact output, a named error, a reported
skip), no traceback, no NaN and unchanged inputs; a case that breaks any of these fails. The
table counts, per command, the cases tried, passed, failed and skipped (with the skip's reason
given by pytest, e.g. a GPU-only case on a machine with a GPU).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def command_of(name: str) -> str:
    """``test_<command>_...``; ``test_security_...[command]`` counts for that command."""
    m = re.match(r"test_security_\w+\[(\w+)\]", name)
    if m:
        return m.group(1)
    return name.split("_")[1]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "faults.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_faults.py"),
                        f"--junitxml={xml}"], cwd=REPO, check=False)
        cases = ET.parse(xml).getroot().iter("testcase")
        tried, failed, skipped = Counter(), Counter(), Counter()
        for c in cases:
            cmd = command_of(c.get("name", ""))
            tried[cmd] += 1
            if c.find("failure") is not None or c.find("error") is not None:
                failed[cmd] += 1
            elif c.find("skipped") is not None:
                skipped[cmd] += 1
    lines = ["| command | cases tried | passed | failed (crash, NaN, input changed, wrong output or unclear message) | skipped |",
             "|---|---|---|---|---|"]
    for cmd in sorted(tried):
        lines.append(f"| {cmd} | {tried[cmd]} | {tried[cmd] - failed[cmd] - skipped[cmd]} | {failed[cmd]} | {skipped[cmd]} |")
    total = sum(tried.values())
    lines.append(f"| **all** | {total} | {total - sum(failed.values()) - sum(skipped.values())} | {sum(failed.values())} | {sum(skipped.values())} |")
    print("\n".join(lines))
    return 1 if sum(failed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
