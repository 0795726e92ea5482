"""The layout's rules, read from the source with ``ast`` (no extra dependency).

- no import circle between modules of the package (function-local imports included);
- ``lstainnorm.layers`` (the method) imports nothing from the rest of the package but
  ``lstainnorm.files`` and ``lstainnorm.extras``;
- ``lstainnorm.apply`` never imports ``lstainnorm.tasks``, nor ``tasks`` ``apply``;
- every import goes down the layer order of docs/architecture.md, never up;
- dev-only code stays out of the package; ``py.typed`` ships.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lstainnorm"

# docs/architecture.md: a module may import modules of its own layer or of lower layers.
LAYERS = [
    ["files", "allocator", "extras", "executors"],
    ["layers"],
    ["data"],
    ["baselines"],
    ["config"],
    ["runs"],
    ["apply", "transforms"],
    ["tasks"],
    ["experiments", "compare"],
    ["cli", "__init__", "__main__"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every lstainnorm module ``path`` imports, anywhere in the file, as dotted names."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lstainnorm"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lstainnorm":
                continue
            # ``from pkg import sub`` imports the submodule when there is one.
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if _exists(sub) else target)
    found.discard(mod)
    return found


def _exists(dotted: str) -> bool:
    p = SRC.parent.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def _top(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_graph_is_read():
    g = _graph()
    assert "lstainnorm.layers.fusion" in g and "lstainnorm.layers.norm" in g["lstainnorm.layers.fusion"]
    assert "lstainnorm.runs" in g["lstainnorm.apply.folders"]


def test_no_import_circle():
    g = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            # A package's __init__ re-exports its modules: importing a submodule runs it first,
            # but that edge is the package's own business, not a circle between modules.
            if m.startswith(n + "."):
                continue
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n in g and not state.get(n):
                visit(n)
        stack.pop()
        state[m] = 2

    for m in g:
        if not state.get(m):
            visit(m)


def test_layers_import_only_the_method():
    for m, deps in _graph().items():
        if m.startswith("lstainnorm.layers"):
            bad = [d for d in deps if not (d.startswith("lstainnorm.layers") or d in ("lstainnorm.files", "lstainnorm.extras"))]
            assert not bad, f"{m} imports {bad}: lstainnorm.layers must not depend on the application"


def test_apply_never_imports_tasks():
    for m, deps in _graph().items():
        if m.startswith("lstainnorm.apply"):
            bad = [d for d in deps if d.startswith("lstainnorm.tasks")]
            assert not bad, f"{m} imports {bad}: apply/ must not depend on training code"


def test_tasks_never_import_apply():
    """Training does not depend on the application layer: what both need (instance metrics
    and post-processing) lives in data/, and the predict command's wiring in cli.py."""
    for m, deps in _graph().items():
        if m.startswith("lstainnorm.tasks"):
            bad = [d for d in deps if d.startswith("lstainnorm.apply")]
            assert not bad, f"{m} imports {bad}: tasks/ must not depend on the application layer"


def test_imports_go_down_the_layers():
    for m, deps in _graph().items():
        here = _top(m)
        if here not in RANK:
            pytest.fail(f"{m}: top-level module '{here}' is not in the layer list of this test and docs/architecture.md")
        for d in deps:
            there = _top(d)
            assert RANK[there] <= RANK[here], f"{m} ({here}) imports {d} ({there}), a higher layer"


def test_package_ships_no_dev_code_and_is_typed():
    names = {p.name for p in SRC.rglob("*.py")}
    assert "reference.py" not in names  # the transcription lives in tests/
    assert (SRC / "py.typed").is_file()
    for p in SRC.rglob("*.py"):
        tree = ast.parse(p.read_text())
        for node in tree.body:  # module level only: warning filters are scoped where they are needed
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                f = node.value.func
                name = getattr(f, "attr", getattr(f, "id", ""))
                assert name not in ("filterwarnings", "simplefilter"), f"{p}: module-level warning filter"


def test_every_public_name_exists():
    """Each module's ``__all__`` names only what it defines (``from m import *`` works)."""
    import importlib
    import pkgutil

    import lstainnorm

    missing = []
    for info in pkgutil.walk_packages(lstainnorm.__path__, "lstainnorm."):
        mod = importlib.import_module(info.name)
        missing += [f"{info.name}.{n}" for n in getattr(mod, "__all__", []) if not hasattr(mod, n)]
    assert not missing, f"named in __all__ but not defined: {missing}"
