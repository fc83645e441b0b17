"""The code's shape, checked: no import cycle among the project's modules, folders that depend one way,
one owner for a run directory's files, scripts that use the trainer's public interface, and short
functions where the training loop lives (a reader should see each one whole)."""

import ast
import re
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.quick  # the whole module: see README, Development

PACKAGES = ("base", "config", "data_loader", "logger", "model", "runs", "trainer", "utils")
SCRIPTS = tuple(path.name for path in ROOT.glob("*.py"))


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


def folder_imports() -> set[tuple[str, str]]:
    """(importing folder, imported folder) for every import between two of the project's folders."""
    modules = project_modules()
    return {(name.split(".")[0], other.split(".")[0]) for name, path in modules.items() if name.split(".")[0] in
            PACKAGES for other in imports(name, path, modules) if other.split(".")[0] in PACKAGES} - \
        {(p, p) for p in PACKAGES}


def test_folders_depend_one_way_and_utils_is_a_leaf():
    pairs = folder_imports()
    assert ("trainer", "base") in pairs  # the finder sees imports at all
    assert not [(a, b) for a, b in pairs if (b, a) in pairs], sorted(pairs)
    assert not [b for a, b in pairs if a == "utils"], sorted(pairs)


def code_strings(path: Path) -> list[str]:
    """The string constants of a file's code (docstrings and other bare strings left out)."""
    tree = ast.parse(path.read_text())
    bare = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare]


def test_only_the_runs_module_names_checkpoint_files_and_the_lock():
    names = ("latest.pth", "model_best.pth", "checkpoint-epoch", "run.lock")
    found = {str(path.relative_to(ROOT)): [s for s in code_strings(path) if any(n in s for n in names)]
             for path in project_modules().values()}
    assert found["runs/run.py"]  # the check sees the names where they are
    assert not {path: strings for path, strings in found.items() if strings and not path.startswith("runs/")}


def test_scripts_use_only_the_trainers_public_interface():
    private = {name: re.findall(r"trainer\._\w+", (ROOT / name).read_text()) for name in SCRIPTS}
    assert not {name: found for name, found in private.items() if found}


def test_an_older_python_is_refused_in_one_line_before_a_script_imports_anything_else():
    from utils import python_version

    with pytest.raises(SystemExit) as refused:
        python_version.check((3, 9, 18, "final", 0))
    assert str(refused.value).startswith("error: this project needs Python") and "\n" not in str(refused.value)
    python_version.check((*python_version.MINIMUM, 0))
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">={}.{}".format(*python_version.MINIMUM)
    for script in ("train.py", "test.py", "predict.py", "export.py", "lr_find.py", "sweep.py"):
        first = ast.parse((ROOT / script).read_text()).body[1]
        assert isinstance(first, ast.Import) and first.names[0].name == "utils.python_version", script
