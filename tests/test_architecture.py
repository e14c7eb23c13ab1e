"""The shape of the code (docs/architecture.md): edgecl's imports, read from the source, form
no cycle and point down the layers. Every import counts, also those inside functions (a
lazy import is still a dependency; it only defers the cost)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "edgecl"

# Who may not import whom: the learner knows nothing of daemons, wires or users; the clients
# run in the lean install (no torch) and know nothing of the server side; only the command
# line's entry points import the command line.
FORBIDDEN = {
    "edgecl.learn": ("edgecl.serve", "edgecl.export", "edgecl.cli", "edgecl.client"),
    "edgecl.models": ("edgecl.serve", "edgecl.export", "edgecl.cli", "edgecl.client"),
    "edgecl.client": ("edgecl.serve", "edgecl.export", "edgecl.learn", "edgecl.models",
                      "edgecl.cli", "edgecl.config"),
    "edgecl.serve": ("edgecl.cli",),
    "edgecl.export": ("edgecl.cli", "edgecl.serve"),
    "edgecl.config": ("edgecl.serve", "edgecl.export", "edgecl.cli", "edgecl.client"),
    # the federation is a client of its daemons over the wire: it never touches a learner
    "edgecl.federation": ("edgecl.serve", "edgecl.export", "edgecl.learn", "edgecl.models",
                          "edgecl.cli", "edgecl.config"),
}
# ... and nothing below the command line depends on the federation (Flower is an extra)
for _low in ("edgecl.learn", "edgecl.models", "edgecl.client", "edgecl.serve",
             "edgecl.export", "edgecl.config"):
    FORBIDDEN[_low] = FORBIDDEN[_low] + ("edgecl.federation",)
# Leaves: they import no other edgecl module but these.
LEAVES = {"edgecl.errors": (), "edgecl.wire": (), "edgecl.threads": (),
          "edgecl.extras": ("edgecl.errors",), "edgecl.files": ("edgecl.errors",)}
# A shim kept so that an old import path goes on working; it re-exports, nothing more.
SHIMS = {"edgecl.export.device"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The edgecl modules `name` imports: `from edgecl.x import y` is edgecl.x.y when that is
    a module, else edgecl.x."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return {m for m in found if m in known and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_no_module_imports_one_above_it(graph):
    wrong = [f"{src} imports {dst}" for src, targets in graph.items() for dst in targets
             for low, banned in FORBIDDEN.items() if within(src, low) and src not in SHIMS
             and any(within(dst, b) for b in banned)]
    wrong += [f"{src} imports {dst}, a command module" for src, targets in graph.items()
              for dst in targets if within(dst, "edgecl.cli")
              and not (within(src, "edgecl.cli") or src == "edgecl.__main__")]
    assert not wrong, "\n".join(sorted(wrong))


def test_leaves_stay_leaves(graph):
    wrong = {leaf: sorted(graph[leaf] - set(allowed)) for leaf, allowed in LEAVES.items()
             if graph[leaf] - set(allowed)}
    assert not wrong


def test_no_import_cycles(graph):
    """A package's __init__ importing its own submodules (re-exports) is not a cycle; any
    other loop is."""
    def edges(src):
        return {dst for dst in graph[src] if not within(src, dst)}

    cycles, done = [], set()

    def visit(node, path):
        if node in path:
            cycles.append(" -> ".join(path[path.index(node):] + [node]))
            return
        if node in done:
            return
        for dst in sorted(edges(node)):
            visit(dst, path + [node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
    assert not cycles, "\n".join(cycles)


def test_every_module_says_what_it_owns():
    missing = [name for name, path in modules().items()
               if ast.get_docstring(ast.parse(path.read_text())) is None]
    assert not missing, f"no opening docstring: {missing}"
