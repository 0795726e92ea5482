"""BENCHMARKS.md's tables, regenerated from the committed records (benchmarks/results/).

Every table that comes from records sits in BENCHMARKS.md between two markers that name the command
printing it:

    <!-- generated: python benchmarks/bench.py mitosis --tables-only --records benchmarks/results/mitosis/results.jsonl ... -->
    ...the command's output...
    <!-- end generated -->

This script runs each command (from the repository root, ``{tmp}`` a scratch folder, no training)
and puts its output between the markers. Timing tables (speed, memory, training cost) have no records
to regenerate from: each section names the command and the machine that measured it.

    python benchmarks/report.py            # rewrite BENCHMARKS.md (make bench-report)
    python benchmarks/report.py --check    # exit 1 if a block differs from its command's output
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^(<!-- generated: (?P<cmd>[^\n]+?) -->\n)(?P<body>.*?)^(<!-- end generated -->)$", re.S | re.M)


def run_block(cmd: str, tmp: Path) -> str:
    """The output of one block's command: stdout, less the ``written: FILE`` lines."""
    argv = shlex.split(cmd.replace("{tmp}", str(tmp)))
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"`{cmd}` failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("written: ")]
    return "\n".join(lines).strip() + "\n"


def render(text: str) -> tuple[str, list[str]]:
    """``text`` with every generated block replaced by its command's output; the commands whose
    output differed from what was there."""
    changed: list[str] = []
    with tempfile.TemporaryDirectory() as d:
        def sub(m: re.Match) -> str:
            tmp = Path(d) / f"b{len(changed)}_{abs(hash(m['cmd']))}"
            body = run_block(m["cmd"], tmp)
            if body != m["body"]:
                changed.append(m["cmd"])
            return m.group(1) + body + m.group(4)

        out = BLOCK.sub(sub, text)
    return out, changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is not its command's output")
    ap.add_argument("--file", type=Path, default=REPO / "BENCHMARKS.md")
    a = ap.parse_args(argv)
    text = a.file.read_text()
    if not BLOCK.search(text):
        raise SystemExit(f"{a.file}: no generated blocks")
    out, changed = render(text)
    n = len(BLOCK.findall(text))
    if a.check:
        for c in changed:
            print(f"differs from its command's output: {c}")
        print(f"{n - len(changed)} of {n} generated blocks are their command's output")
        return 1 if changed else 0
    if out != text:
        tmp = a.file.with_suffix(".md.tmp")
        tmp.write_text(out)
        tmp.replace(a.file)
    print(f"{n} generated blocks; {len(changed)} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
