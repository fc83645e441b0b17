"""Experiment tracking with MLflow, as real processes on the shipped config: the embedded store across kills after
and during a save, a real `mlflow server` across a resume, a server killed mid-run, k-fold children; the
config's checks and a missing mlflow package."""

import contextlib
import csv
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from config.parser import ConfigParser
from conftest import BASE_CONFIG, ROOT, run, run_dirs
from utils.errors import UserError

SHIPPED = ROOT / "configs" / "mnist_mlflow.json"
ENV = {"PYTHONPATH": str(ROOT / "tests")}  # plugin_tracking.py
needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason="mlflow is not installed: pip install -r requirements-tracking.txt")


def shipped_config(tmp_path: Path, data_dir: Path) -> Path:
    """The shipped config on the tiny data, its runs in tmp_path/saved, with a trainer that can die after a save."""
    config = json.loads(SHIPPED.read_text())
    config["data_loader"]["args"]["data_dir"] = str(data_dir)
    config["trainer"].update(save_dir=str(tmp_path / "saved"), tensorboard=False, type="plugin_tracking.DiesAfterSave")
    path = tmp_path / "mnist_mlflow.json"
    path.write_text(json.dumps(config))
    return path


def latest(run_dir: Path) -> dict:
    return torch.load(run_dir / "latest.pth", weights_only=True)


def assert_tracked(uri: str, run_dir: Path, epochs: int) -> None:
    """The store holds one finished run, the checkpoint's, whose history of every metrics.csv column has each epoch
    once, with metrics.csv's value; and its config, tags and artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (tracked,) = client.search_runs([client.get_experiment_by_name("mnist_mlflow").experiment_id])
    run_id = tracked.info.run_id
    assert run_id == latest(run_dir)["tracking_run_id"] and tracked.info.status == "FINISHED"
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == list(range(1, epochs + 1))
    for key in [key for key in rows[0] if key not in ("epoch", "global_step")]:
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), key  # no step twice, none missing
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == [float(row[key]) for row in rows], key
    assert {"val_accuracy", "val_loss", "lr"} <= set(rows[0])
    assert tracked.data.params["trainer.monitor"] == "max val_accuracy" and tracked.data.params["seed"] == "1"
    assert tracked.data.tags["run_dir"] == str(run_dir.resolve()) and tracked.data.tags["world_size"] == "1"
    assert tracked.data.tags["torch_version"] == torch.__version__
    assert {artifact.path for artifact in client.list_artifacts(run_id)} == {"config.json", "metrics.csv"}


@pytest.mark.slow
@needs_mlflow
def test_kills_around_saves_leave_one_tracked_run_with_each_epoch_once(tmp_path, tiny_mnist):
    """Killed right after epoch 1's checkpoint (before epoch 1 was tracked), then resumed to 3 epochs and killed
    between the files of epoch 2's save (so epoch 2 is trained again), then resumed again: the embedded store has
    epochs 1, 2, 3 once each."""
    config = shipped_config(tmp_path, tiny_mnist)
    first = run("train.py", "-c", config, "--epochs", "2", "--set", "trainer.die_after_epoch=1", env=ENV)
    assert first.returncode == 9, first.stdout[-2000:] + first.stderr
    (run_dir,) = run_dirs(tmp_path / "saved", "mnist_mlflow")
    second = run("train.py", "-r", "auto", "-c", config, "--epochs", "3", "--set", "trainer.die_at=2", env=ENV)
    assert second.returncode == 9 and latest(run_dir)["epoch"] == 1, second.stdout[-2000:] + second.stderr
    third = run("train.py", "-r", "auto", "-c", config, "--epochs", "3", env=ENV)
    assert third.returncode == 0 and "Resuming" in third.stdout, third.stderr
    assert "tracking" not in first.stdout + second.stdout + third.stdout + third.stderr  # no warning
    assert_tracked(f"sqlite:///{tmp_path / 'saved' / 'mlflow.db'}", run_dir, 3)
    assert {path.name for path in (tmp_path / "saved").iterdir()} == {"mlflow.db", "mlflow-artifacts", "mnist_mlflow"}


@contextlib.contextmanager
def mlflow_server(folder: Path):
    """A real `mlflow server` on a free local port (SQLite store and artifacts in `folder`): (its URI, its process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder.mkdir()
    log = open(folder / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                               "--artifacts-destination", str(folder / "artifacts")],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # start-up takes about 10 s on an idle 2-core machine
        while True:
            assert server.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            time.sleep(0.5)
        yield uri, server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # the server and its workers
        server.wait()
        log.close()


@needs_mlflow
def test_a_real_server_gets_a_run_and_its_resume_and_its_loss_mid_run_costs_one_warning(tmp_path, tiny_mnist):
    """2 epochs and a resume to 3 go to a real `mlflow server` (MLFLOW_TRACKING_URI, then tracking.args.uri), read
    back with MlflowClient; then the server is killed in the middle of another run, which finishes all the same."""
    config = shipped_config(tmp_path, tiny_mnist)
    with mlflow_server(tmp_path / "server") as (uri, server):
        first = run("train.py", "-c", config, "--epochs", "2", env={**ENV, "MLFLOW_TRACKING_URI": uri})
        assert first.returncode == 0, first.stderr
        resumed = run("train.py", "-r", "auto", "-c", config, "--epochs", "3", "--set", f"tracking.args.uri={uri}",
                      env=ENV)
        assert resumed.returncode == 0, resumed.stderr
        (run_dir,) = run_dirs(tmp_path / "saved", "mnist_mlflow")
        assert_tracked(uri, run_dir, 3)
        assert not (tmp_path / "saved" / "mlflow.db").exists()
        output = train_killing_the_server(config, uri, server)
    (warning,) = [line for line in output.splitlines() if "tracking" in line]  # one warning, nothing else
    assert "Retrying" not in output and "Traceback" not in output, output
    assert warning.startswith(f"tracking: {uri}: ") and \
        warning.endswith("tracking is off for the rest of this run (metrics.csv has every epoch)"), warning
    (_, killed_dir) = run_dirs(tmp_path / "saved", "mnist_mlflow")
    with open(killed_dir / "metrics.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2", "3", "4"]


def train_killing_the_server(config: Path, uri: str, server: subprocess.Popen) -> str:
    """A new run of 4 epochs tracked by the server at `uri`, which is killed once epoch 1 is trained: its output."""
    training = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-c", str(config), "--epochs", "4",
                                 "--set", f"tracking.args.uri={uri}"], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, **ENV, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    output = []
    for line in training.stdout:
        output.append(line)
        if line.startswith("epoch 1/4  loss"):  # epoch 1's results: the server goes before they are sent
            os.killpg(server.pid, signal.SIGKILL)
            break
    output.append(training.stdout.read())
    assert training.wait(timeout=300) == 0, "".join(output)
    return "".join(output)


def one_parent(store: Path) -> tuple:
    """The embedded store's client, its one run without a parent, the names of that run's children, and all runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("mnist_mlflow").experiment_id])
    (parent,) = [tracked for tracked in runs if "mlflow.parentRunId" not in tracked.data.tags]
    children = sorted(tracked.info.run_name for tracked in runs if
                      tracked.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    return client, parent, children, runs


@needs_mlflow
def test_k_fold_folds_are_children_of_one_tracked_run(tmp_path, tiny_mnist):
    config = shipped_config(tmp_path, tiny_mnist)
    result = run("train.py", "-c", config, "--folds", "2", "--epochs", "1", env=ENV)
    assert result.returncode == 0, result.stderr
    client, parent, children, runs = one_parent(tmp_path / "saved" / "mlflow.db")
    assert children == ["fold_0", "fold_1"] and len(runs) == 3
    folds = json.loads((Path(parent.data.tags["run_dir"]) / "folds.json").read_text())
    assert folds["tracking_run_id"] == parent.info.run_id and parent.info.status == "FINISHED"
    assert parent.data.metrics["val_accuracy_mean"] == folds["summary"]["val_accuracy"]["mean"]


@needs_mlflow
@pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="Optuna is not installed")
def test_sweep_processes_started_together_make_one_tracked_run_of_the_study(tmp_path, tiny_mnist):
    """Two sweep.py processes started at once on a new study (and a new MLflow store) make one parent run, and a
    third one later adds to it: every trial is a child of it (the study keeps its id)."""
    config = json.loads(shipped_config(tmp_path, tiny_mnist).read_text())
    config["trainer"].update(epochs=1, type="Trainer")
    config["sweep"] = {"optimizer.args.lr": {"float": [1e-3, 1e-2], "log": True}}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(config))
    command = [sys.executable, "sweep.py", "-c", str(path), "--trials", "2", "--pruner", "none"]
    env = {**os.environ, **ENV, "CI": "true", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    later = run("sweep.py", "-c", path, "--trials", "3", "--pruner", "none", env=ENV)
    assert later.returncode == 0, later.stderr
    client, parent, children, runs = one_parent(tmp_path / "saved" / "mlflow.db")
    assert children == ["trial-0", "trial-1", "trial-2"] and len(runs) == 4 and parent.info.status == "FINISHED"
    assert "trials.csv" in {artifact.path for artifact in client.list_artifacts(parent.info.run_id)}


@pytest.mark.quick
@pytest.mark.parametrize("tracking, message", [
    ({"type": "mlflw"}, "tracking.type: expected one of mlflow, got 'mlflw' (did you mean 'mlflow'?)"),
    ({"type": "mlflow", "args": {"url": "x"}}, "tracking.args: unknown key 'url' (did you mean 'uri'?)"),
    ({"type": "mlflow", "args": {"uri": ""}}, "tracking.args.uri: expected null or a non-empty string, got ''"),
    ({"type": "mlflow", "args": {"checkpoints": "yes"}}, "tracking.args.checkpoints: expected true or false"),
    ("mlflow", "tracking: expected null or {type: mlflow, args: {...}}, got 'mlflow'"),
])
def test_the_tracking_key_is_checked(tracking, message):
    with pytest.raises(UserError) as error:
        ConfigParser.from_dict({**BASE_CONFIG, "tracking": tracking}, "c.json")
    assert message in str(error.value)


def test_without_mlflow_a_config_that_tracks_stops_in_one_line_naming_the_requirements(tmp_path, tiny_mnist):
    config = shipped_config(tmp_path, tiny_mnist)
    code = ("import runpy, sys; sys.modules['mlflow'] = None; "  # what an environment without mlflow imports
            f"sys.argv = ['train.py', '-c', {str(config)!r}]; runpy.run_path('train.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **ENV, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and result.stderr == "error: tracking.type 'mlflow' needs the mlflow package: " \
                                                       "pip install -r requirements-tracking.txt\n", result.stderr
    assert not (tmp_path / "saved").exists()  # nothing written
