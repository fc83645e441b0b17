"""Shared test helpers: a tiny real MNIST folder, config files, and running train.py/test.py."""

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_loader.datasets import read_idx, write_idx  # noqa: E402

BASE_CONFIG = {
    "name": "tiny",
    "seed": 1,
    "arch": {"type": "MnistModel", "args": {}},
    "data_loader": {"type": "MnistDataLoader",
                    "args": {"data_dir": "", "batch_size": 32, "shuffle": True, "validation_split": 128}},
    "optimizer": {"type": "Adam", "args": {"lr": 0.002}},
    "loss": "nll_loss",
    "metrics": ["accuracy"],
    "trainer": {"epochs": 2, "save_dir": "", "log_step": 5, "monitor": "min val_loss", "verbosity": 2},
}


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked slow run only with RUN_SLOW=1 (before an issue is called resolved), so CI stays short."""
    if os.environ.get("RUN_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow: set RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> Path:
    """1,024 training and 256 test images of real MNIST (from the bundled subset), as a data_dir."""
    src = ROOT / "data" / "mnist_small" / "MNIST" / "raw"
    root = tmp_path_factory.mktemp("mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, count in (("train", 1024), ("t10k", 256)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{split}-{kind}-ubyte"
            write_idx(raw / f"{name}.gz", read_idx(src / f"{name}.gz")[:count].contiguous())
    return root


def write_image_folder(root: Path, counts: tuple = (16, 4), size: tuple = (40, 40), jpeg: bool = False) -> Path:
    """<root>/{train,test}/{dark,light}/*.png: `counts` small RGB images per class (train, test), told apart by
    brightness; with `jpeg`, every other one a .jpg."""
    import torch
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in zip(("train", "test"), counts):
        for label, base in (("dark", 0), ("light", 128)):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(base, base + 128, (*size, 3), generator=generator, dtype=torch.uint8)
                suffix = "jpg" if jpeg and i % 2 == 0 else "png"
                Image.fromarray(pixels.numpy()).save(root / split / label / f"{i}.{suffix}")
    return root


def set_key(config: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[last] = value


def make_config(tmp_path: Path, data_dir: Path, overrides: dict | None = None, name: str = "config.json") -> Path:
    """A tiny config file in tmp_path (runs go to tmp_path/saved); `overrides` maps dotted keys to values."""
    config = copy.deepcopy(BASE_CONFIG)
    config["data_loader"]["args"]["data_dir"] = str(data_dir)
    config["trainer"]["save_dir"] = str(tmp_path / "saved")
    for key, value in (overrides or {}).items():
        set_key(config, key, value)
    path = tmp_path / name
    path.write_text(json.dumps(config, indent=2))
    return path


def run(script: str, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run train.py/test.py (or any script in the repo) as a real process; never raises on failure."""
    # one thread per process: tests start several processes at once on few cores
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "CI": "true", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def read_test_results(folder: Path) -> list[dict]:
    """test.py's results for the checkpoints in `folder`, oldest first."""
    return [json.loads(line) for line in (folder / "test-results.jsonl").read_text().splitlines()]


def run_dirs(save_dir: Path, name: str = "tiny") -> list[Path]:
    """Run directories of config `name`, oldest first."""
    return sorted(p for p in (Path(save_dir) / name).glob("*") if p.is_dir())


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server for the session (initdb + pg_ctl in a temporary folder, on a free port), as the
    unprivileged user `nobody` when the tests run as root (the server refuses root); its URL."""
    import shutil
    import socket
    import tempfile

    if not all(shutil.which(tool) for tool in ("initdb", "pg_ctl", "postgres")):
        pytest.skip("PostgreSQL's binaries (initdb, pg_ctl, postgres) are not on PATH")
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="postgres-"))  # not under pytest's root-only tmp folders
    if as_user:
        shutil.chown(folder, "nobody")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = folder / "data"
    subprocess.run([*as_user, "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"], check=True,
                   capture_output=True, timeout=120)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_user, "pg_ctl", "-D", data, "-o", options, "-l", folder / "log", "-w", "start"], check=True,
                   capture_output=True, timeout=120)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
