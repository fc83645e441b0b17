"""The code's shape, checked: no import cycle among the project's modules, and short functions where
the training loop lives (a reader should see each one whole)."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("base", "data_loader", "logger", "model", "trainer", "utils")
SCRIPTS = ("train.py", "test.py", "new_project.py")


def project_modules() -> dict[str, Path]:
    modules = {path.stem: ROOT / path for path in map(Path, SCRIPTS)}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imports(name: str, path: Path, modules: dict) -> set[str]:
    """The project modules module `name` imports anywhere (inside functions too), with their packages'
    __init__, except its own package's (which is loading already when a sibling is imported)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for imported in names:
            parts = imported.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()
    return {m for m in found if not name.startswith(m + ".")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for other in sorted(graph[node]):
            if state.get(other) == "open":
                return stack[stack.index(other):] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_among_the_project_modules():
    modules = project_modules()
    graph = {name: imports(name, path, modules) - {name} for name, path in modules.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_can_find_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_functions_in_the_training_loop_fit_on_a_screen():
    """At most 35 lines each in trainer/ and base/ (docstrings included)."""
    long = []
    for path in [*(ROOT / "trainer").glob("*.py"), *(ROOT / "base").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 35:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long
