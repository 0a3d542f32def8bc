"""The package's shape: no import cycles, and each layer imports only what it may (DESIGN: the
engine is pure; workers, backends and storage never import the server)."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "genserve"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every genserve module -> the genserve modules it imports (anywhere in the file, including
    function bodies and TYPE_CHECKING blocks: a cycle there is still a cycle in the design)."""
    mods = {_module_name(p): p for p in SRC.joinpath(PKG).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for c in candidates:
                while c and c not in mods:
                    c = c.rpartition(".")[0]
                if c and c != name and c.startswith(PKG):
                    deps.add(c)
        graph[name] = deps
    return graph


def _external_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_no_import_cycles():
    graph = _imports()
    # Package __init__ files re-export their own submodules; an edge from a package to its own
    # children is not a cycle of the design.
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert len(graph) > 40  # the walk saw the whole package


def test_layers_import_only_what_they_may():
    graph = _imports()
    for m, deps in graph.items():
        if m.startswith("genserve.engine"):
            assert all(d.startswith("genserve.engine") for d in deps), (m, deps)
        if m.startswith(("genserve.workers", "genserve.backends", "genserve.storage")):
            assert not any(d.startswith("genserve.server") for d in deps), (m, deps)


def test_the_engine_is_sans_io():
    forbidden = {"asyncio", "threading", "time", "torch", "socket", "subprocess", "sqlite3", "httpx", "os"}
    for path in SRC.joinpath(PKG, "engine").rglob("*.py"):
        assert not (_external_imports(path) & forbidden), (path.name, _external_imports(path) & forbidden)
