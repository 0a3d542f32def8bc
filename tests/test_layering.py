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


# The rooms of the house and what each may import (DESIGN §8, docs/architecture.md). A request
# flows down this list: http -> runtime -> engine; a room never imports one above it. A room not
# listed here may import nothing of genserve outside itself (the engine: nothing at all).
SERVER_VOCAB = ("genserve.server.requests", "genserve.server.status")
ROOMS: dict[str, tuple[str, ...]] = {
    "genserve.engine.policies": ("genserve.engine.types",),
    "genserve.engine": (),
    "genserve.storage": (),
    "genserve.backends": ("genserve.storage",),
    "genserve.workers": ("genserve.backends", "genserve.storage", "genserve.engine.types",
                         "genserve.engine.policies.liveness"),
    "genserve.config": ("genserve.engine", "genserve.backends.families"),
    "genserve.sim": ("genserve.engine", "genserve.config"),
    # the job request and status: the vocabulary every server room speaks
    "genserve.server.requests": ("genserve.config", "genserve.engine", "genserve.backends"),
    "genserve.server.status": (),
    "genserve.server.security": ("genserve.config", *SERVER_VOCAB),
    "genserve.server.jobs": ("genserve.server.security", "genserve.config", "genserve.engine", "genserve.backends",
                             "genserve.storage", *SERVER_VOCAB),
    "genserve.server.observe": ("genserve.server.jobs", "genserve.server.security", "genserve.config",
                                *SERVER_VOCAB),
    "genserve.server.runtime": ("genserve.server.jobs", "genserve.server.observe", "genserve.server.security",
                                "genserve.engine", "genserve.workers", "genserve.storage", "genserve.config",
                                *SERVER_VOCAB),
    "genserve.server.http": ("genserve.server.runtime", "genserve.server.jobs", "genserve.server.observe",
                             "genserve.server.security", "genserve.engine", "genserve.backends", "genserve.storage",
                             "genserve.config", *SERVER_VOCAB),
    # clients of a running server: they speak its vocabulary and reuse its pure statistics
    "genserve.bench": ("genserve.server.status", "genserve.server.observe.stats"),
    "genserve.cli": ("genserve",),  # the entry point wires everything together
}


def _room(module: str) -> str:
    return max((r for r in ROOMS if module == r or module.startswith(r + ".")), key=len)


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_layers_import_only_what_they_may():
    graph = _imports()
    unplaced = [m for m in graph if m != PKG and not any(m == r or m.startswith(r + ".") for r in ROOMS)
                and m != "genserve.server"]
    assert not unplaced, f"modules in no room (add them to ROOMS): {unplaced}"
    wrong = []
    for m, deps in graph.items():
        if m in (PKG, "genserve.server"):
            continue
        room = _room(m)
        for d in deps:
            if not _within(d, (room,) + ROOMS[room]):
                wrong.append(f"{m} -> {d}")
    assert not wrong, "imports across rooms that the layering does not allow:\n" + "\n".join(sorted(wrong))


def test_the_rules_catch_a_forbidden_import():
    # the check itself: a security module importing a route, or the engine importing the server, is refused
    assert not _within("genserve.server.http.app", (_room("genserve.server.security.auth"),)
                       + ROOMS[_room("genserve.server.security.auth")])
    assert not _within("genserve.server.runtime", ROOMS["genserve.engine"])
    assert _room("genserve.engine.policies.retry") == "genserve.engine.policies"


def test_folders_stay_small():
    """At most 12 modules side by side in any folder, none over 500 lines, no class over 300 (DESIGN §8)."""
    import collections

    per_folder = collections.Counter(p.parent for p in SRC.joinpath(PKG).rglob("*.py")
                                     if p.name not in ("__init__.py", "__main__.py"))
    assert not {str(d.relative_to(SRC)): n for d, n in per_folder.items() if n > 12}
    for path in SRC.joinpath(PKG).rglob("*.py"):
        text = path.read_text()
        assert text.count("\n") <= 500, (path.relative_to(SRC), text.count("\n"))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno - node.lineno < 300, (path.relative_to(SRC), node.name)


def test_every_package_says_what_it_owns():
    for init in SRC.joinpath(PKG).rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init.relative_to(SRC)} has no docstring saying what it owns"


def test_the_engine_is_sans_io():
    forbidden = {"asyncio", "threading", "time", "torch", "socket", "subprocess", "sqlite3", "httpx", "os"}
    for path in SRC.joinpath(PKG, "engine").rglob("*.py"):
        assert not (_external_imports(path) & forbidden), (path.name, _external_imports(path) & forbidden)
