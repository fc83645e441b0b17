"""Start a new project from this one: a clean copy that trains as is.

    python new_project.py ../MyProject

Copied: the code, configs, tests, CI script and the bundled data/mnist_small. Left out: saved
runs (saved/ keeps its .gitkeep), caches, other data (downloads, extracted files) and .git.
Then replace the MNIST example with your own data loader, model, loss and metrics."""

import os
import shutil
from pathlib import Path

from utils.cli import ArgumentParser, run_main, text
from utils.errors import UserError

SOURCE = Path(__file__).resolve().parent
CACHES = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".ipynb_checkpoints"}
NOT_TEMPLATE = {".git", ".venv", "venv", ".whl", ".benchmarks"}  # top-level folders of this checkout only
KEEP_ONLY = {"saved": {".gitkeep"}, "data": {"mnist_small"}}  # folders whose other entries are run outputs


def ignored(source: Path, folder: str, names: list[str]) -> set[str]:
    """The entries of `folder` to leave out (shutil.copytree's `ignore`); mirrors .gitignore."""
    where = Path(folder).relative_to(source).as_posix()
    skip = {n for n in names if n in CACHES or n.endswith(".pyc")}
    if where == ".":
        skip |= NOT_TEMPLATE & set(names)
    elif where in KEEP_ONLY:
        skip |= set(names) - KEEP_ONLY[where]
    elif where == "data/mnist_small/MNIST/raw":
        skip |= {n for n in names if n.endswith("-ubyte")}  # extracted by torchvision; the .gz files stay
    return skip


def copy_project(source: Path, target: Path) -> None:
    """Copy `source` into `target`, which must not exist or be an empty folder outside `source`."""
    source, target = source.resolve(), Path(os.path.realpath(target))  # Path.resolve raises on a symlink loop
    if target.is_relative_to(source):
        raise UserError(f"{target}: the new project must be outside this one ({source})")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target}: already exists and is not an empty folder; choose a new path")
    try:
        shutil.copytree(source, target, ignore=lambda folder, names: ignored(source, folder, names), dirs_exist_ok=True)
    except (OSError, shutil.Error) as e:
        raise UserError(f"{target}: cannot copy the project: {e}") from None


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=text, help="folder for the new project (must not exist, or be empty)")
    target = Path(parser.parse_args(argv).target)
    copy_project(SOURCE, target)
    print(f"Created {target}. Next:\n  cd {target}\n  python train.py -c configs/mnist.json")
    return 0


if __name__ == "__main__":
    run_main(main)
