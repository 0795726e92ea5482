"""mkdocs hook: the command-line and configuration references are generated at build time, from the
parser and from the config schema, so they cannot drift from the code."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import textwrap

from mkdocs.structure.files import File


def cli_reference() -> str:
    from lstainnorm.cli import build_parser

    parser = build_parser()
    parts = ["# Command line\n", "Generated from `lstainnorm --help` and each command's `--help`.\n",
             "```text\n" + parser.format_help() + "```\n"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                parts.append(f"## lstainnorm {name}\n\n```text\n{sub.format_help()}```\n")
    return "\n".join(parts)


def config_reference() -> str:
    from lstainnorm.config import Config

    parts = ["# Configuration\n",
             "Every key of a run's YAML config with its default, generated from the schema "
             "(`lstainnorm train --print-schema` prints the same). Any key can be overridden on the command "
             "line as `section.key=value`; a misspelt key or a wrong type is an error naming it.\n"]
    for f in dataclasses.fields(Config):
        cls = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
        if cls is None:
            continue
        parts.append(f"## `{f.name}`\n\n" + textwrap.dedent(inspect.getdoc(cls) or "") + "\n")
        rows = ["| key | type | default |", "|---|---|---|"]
        for g in dataclasses.fields(cls):
            default = g.default if g.default is not dataclasses.MISSING else (g.default_factory() if g.default_factory is not dataclasses.MISSING else "")
            typ = str(g.type).replace("Optional[", "").replace("]", "").replace("|", "or")
            rows.append(f"| `{f.name}.{g.name}` | {typ} | `{default!r}` |")
        parts.append("\n".join(rows) + "\n")
    top = [g for g in dataclasses.fields(Config) if not dataclasses.is_dataclass(g.default_factory)]
    parts.append("## Top level\n\n| key | default |\n|---|---|\n" + "\n".join(f"| `{g.name}` | `{g.default!r}` |" for g in top) + "\n")
    return "\n".join(parts)


def on_files(files, config):
    for uri, content in (("reference/cli.md", cli_reference()), ("reference/config.md", config_reference())):
        files.append(File.generated(config, uri, content=content))
    return files
