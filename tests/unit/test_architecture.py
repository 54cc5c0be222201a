"""The package's shape: imports run one way (jobs/serve -> pipeline -> encoders -> platform), no cycles.

Read from the source with :mod:`ast` (nothing is imported), so the test is fast
and sees imports inside functions too: a lazy import that dodges a cycle is
still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "medray"

#: Floors from the bottom up; a module may import its own floor and the ones below.
FLOORS = {
    "platform": 0,
    "config": 1,
    "encoders": 1,
    "testing": 1,
    "pipeline": 2,
    "serve": 3,
    "jobs": 4,
    "cli": 5,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported medray module, line, at module top) for each import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    found: list[tuple[str, int, bool]] = []
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if name == "medray" or name.startswith("medray."):
                found.append((name, node.lineno, id(node) in top or _under_type_checking(tree, node)))
    return found


def _under_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for stmt in tree.body:
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            if any(n is node for n in ast.walk(stmt)):
                return True
    return False


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The medray module ``name`` refers to (``from pkg import mod`` names a module or a symbol)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name, _, _ in _imports(path):
            target = _resolve(name, modules)
            if target and target != module and target != "medray":
                graph[module].add(target)
    return graph


def test_imports_run_downward_only() -> None:
    """platform imports no encoders/pipeline/serve/jobs; pipeline no serve/jobs; and so on."""
    modules = _modules()
    wrong = []
    for module, path in sorted(modules.items()):
        here = _floor(module)
        if here is None:
            continue
        for name, line, _ in _imports(path):
            target = _resolve(name, modules)
            there = _floor(target) if target else None
            if there is not None and there > here:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    assert not wrong, "imports that run upward:\n" + "\n".join(wrong)


def test_platform_knows_no_model_code() -> None:
    """The floor everything shares imports nothing from the floors above it, not even lazily."""
    modules = _modules()
    for module, path in modules.items():
        if not module.startswith("medray.platform"):
            continue
        for name, line, _ in _imports(path):
            assert not name.startswith(
                ("medray.encoders", "medray.pipeline", "medray.jobs", "medray.serve", "medray.testing", "medray.config")
            ), f"{module}:{line} imports {name}"


def test_no_import_cycles() -> None:
    """No cycle among medray modules, counting imports inside functions too."""
    graph = _graph()
    # Package __init__ files re-export their submodules: an edge from a submodule to its own
    # package face (``from medray.encoders import x`` inside medray.encoders.*) is a cycle too.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_private_names_cross_modules() -> None:
    """``from medray.x import _name`` from another module: make the name public or keep it home."""
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medray"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        wrong.append(f"{module}:{node.lineno} imports {node.module}.{alias.name}")
    assert not wrong, "\n".join(wrong)
