"""sweep.py as real processes on tiny data: a study of one-epoch trials, each an ordinary run; the same command
again trains nothing; a trial killed by SIGKILL resumes in its own folder to the weights of its config trained
straight; two processes share one study on a real PostgreSQL server; bad spaces and storages are one line."""

import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config.parser import ConfigParser
from conftest import ROOT, make_config, run, run_dirs
from runs.sweep import Sweep, TrialPruned, check_space
from test_faults import one_line_error
from utils.cli import Request
from utils.errors import UserError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("optuna") is None,
                                reason="Optuna is not installed (pip install -r requirements-sweep.txt)")

LR = "optimizer.args.lr"
SPACE = {LR: {"float": [1e-3, 1e-2], "log": True}, "data_loader.args.batch_size": {"choice": [32, 64]}}
FAST = {"trainer.epochs": 1, "trainer.tensorboard": False, "sweep": SPACE}


def trials_csv(config: Path) -> list[dict]:
    with open(config.parent / "saved" / "tiny" / "sweep" / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def trial_dir(config: Path, number: int) -> Path:
    return config.parent / "saved" / "tiny" / "sweep" / f"trial-{number}"


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def test_a_study_of_ordinary_runs_and_the_same_command_again_trains_nothing(tmp_path, tiny_mnist):
    config = make_config(tmp_path, tiny_mnist, FAST)
    result = run("sweep.py", "-c", config, "--trials", "4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    rows = trials_csv(config)
    assert [row["number"] for row in rows] == ["0", "1", "2", "3"]
    assert {row["state"] for row in rows} == {"COMPLETE"}
    assert all((config.parent / "saved" / "tiny" / "sweep" / name).stat().st_size for name in
               ("history.png", "importances.png"))
    for row in rows:  # each trial a run with its own parameters
        trained = json.loads((trial_dir(config, int(row["number"])) / "config.json").read_text())
        assert trained["optimizer"]["args"]["lr"] == float(row["optimizer.args.lr"])
        assert trained["data_loader"]["args"]["batch_size"] == int(row["data_loader.args.batch_size"])
        assert torch.load(Path(row["run_dir"]) / "latest.pth", weights_only=True)["epoch"] == 1
    assert "python test.py -r" in result.stdout
    tested = run("test.py", "-r", trial_dir(config, 2))
    assert tested.returncode == 0, tested.stderr
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "saved").rglob("*.pth")}
    again = run("sweep.py", "-c", config, "--trials", "4")
    assert again.returncode == 0, again.stderr
    assert "has its 4 trials: nothing to train" in again.stdout and "Run directory" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "saved").rglob("*.pth")} == before
    assert [row["number"] for row in trials_csv(config)] == ["0", "1", "2", "3"]
    report = run("sweep.py", "-c", config, "--report")
    assert report.returncode == 0 and "sweep: best trial" in report.stdout and "Run directory" not in report.stdout


@pytest.mark.slow
def test_a_killed_trial_resumes_in_its_own_folder_to_the_weights_of_its_config_trained_straight(tmp_path, tiny_mnist):
    """The sweep process dies by SIGKILL in trial 0's 20th training forward pass (28 steps of 32 samples; its
    checkpoint: step 16); the same command resumes trial 0 there, then runs trial 1."""
    config = make_config(tmp_path, tiny_mnist, {**FAST, "arch.type": "tests.models.Deterministic",
                                                "trainer.save_step": 8, "sweep": {"optimizer.args.lr": SPACE[LR]}})
    killed = run("sweep.py", "-c", config, "--trials", "2", env={"TEST_SIGKILL": f"0:20:{tmp_path / 'marker'}"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr
    assert (trial_dir(config, 0) / "latest.pth").exists() and not trial_dir(config, 1).exists()
    result = run("sweep.py", "-c", config, "--trials", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "trial 0 was left unfinished by a process that ended: resuming it" in result.stdout
    assert [(row["number"], row["state"]) for row in trials_csv(config)] == [("0", "COMPLETE"), ("1", "COMPLETE")]
    assert "at epoch 1, batch 16 (global step 16)" in (trial_dir(config, 0) / "train.log").read_text()
    straight = run("train.py", "-c", trial_dir(config, 0) / "config.json")
    assert straight.returncode == 0, straight.stderr
    (straight_dir,) = [d for d in run_dirs(tmp_path / "saved") if d.name != "sweep"]
    resumed, uninterrupted = weights(trial_dir(config, 0) / "latest.pth"), weights(straight_dir / "latest.pth")
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted)


def test_two_processes_share_one_study_on_postgresql(tmp_path, tiny_mnist, postgres_url):
    """Each process's first trial waits for the other's (plugin_sweep.py): both work at once, whichever starts first."""
    config = make_config(tmp_path, tiny_mnist, {**FAST, "trainer.type": "plugin_sweep.WaitsForAnotherTrial"})
    command = [sys.executable, str(ROOT / "sweep.py"), "-c", str(config), "--trials", "4", "--storage", postgres_url]
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [(proc.returncode, out[-1500:], err[-3000:])
                                                           for proc, (out, err) in zip(procs, outputs)]
    trained = [set(re.findall(r"^sweep: trial (\d+): .* in ", out, re.M)) for out, _ in outputs]
    assert trained[0] and trained[1] and not trained[0] & trained[1], trained  # both worked, never on one trial
    import optuna

    study = optuna.load_study(study_name="tiny", storage=postgres_url.replace("postgresql:", "postgresql+psycopg2:"))
    counted = [t for t in study.trials if "over" not in t.user_attrs]
    assert sorted(t.number for t in counted) == [0, 1, 2, 3] and {t.state.name for t in counted} == {"COMPLETE"}
    assert len({json.dumps(t.params, sort_keys=True) for t in counted}) == 4
    for t in counted:  # each trained once, in its own folder
        assert (trial_dir(config, t.number) / "train.log").read_text().count("Run directory:") == 1


def test_a_trial_worse_than_the_median_is_pruned_but_never_after_its_last_epoch(tmp_path):
    import optuna

    config = make_config(tmp_path, tmp_path, {**FAST, "trainer.epochs": 2})
    sweep = Sweep(Request(str(config)), None, "median")
    lr = optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True)
    for _ in range(5):  # MedianPruner's startup trials, finished
        sweep.study.add_trial(optuna.trial.create_trial(params={LR: 0.005}, distributions={LR: lr}, value=0.1,
                                                        intermediate_values={1: 0.1, 2: 0.1}))
    trial = next(sweep.trials(7))
    assert trial.number == 5 and trial.run_dir == trial_dir(config, 5)
    trial.report(2, {"val_loss": 9.0})  # the last epoch: the trial completes whatever its value
    with pytest.raises(TrialPruned, match="pruned after epoch 1"):
        trial.report(1, {"val_loss": 9.0})
    sweep.pruned(trial, TrialPruned("pruned"))
    assert sweep.study.trials[5].state.name == "PRUNED" and trial.run_dir.is_dir()


def test_the_study_lock_is_given_back_and_one_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    import optuna

    config = make_config(tmp_path, tmp_path, FAST)
    sweep = Sweep(Request(str(config)), None, "median")
    names = lambda: set(optuna.get_all_study_names(sweep.storage))  # noqa: E731
    with sweep.study_lock():
        assert names() == {"tiny", "tiny:lock"}
    assert names() == {"tiny"}
    optuna.create_study(storage=sweep.storage, study_name="tiny:lock")  # as a process killed holding it leaves it
    with sweep.study_lock(timeout=0.5):
        assert "sweep: took over the lock 'tiny:lock'" in capsys.readouterr().out
    assert names() == {"tiny"}


BAD_SPACES = [
    ({"optimizer.arg.lr": {"float": [0.1, 1]}}, "sweep.optimizer.arg.lr: unknown key 'optimizer.arg' (did you mean "
                                                "'args'?)"),
    ({"optimizer.args.lrr": {"float": [0.1, 1]}}, "unknown argument 'lrr' (did you mean 'lr'?)"),
    ({"optimizer.args.lr": {"float": [0.1, 0.01]}}, "sweep.optimizer.args.lr: float: expected [low, high]"),
    ({"optimizer.args.lr": {"float": [0, 0.1], "log": True}}, "a log range needs low > 0"),
    ({"optimizer.args.lr": {"floatt": [0, 0.1]}}, 'expected one of {"float": [low, high]}'),
    ({"trainer.epochs": {"float": [1, 3]}}, "sweep.trainer.epochs: the config has an integer here"),
    ({"trainer.epochs": {"choice": ["a"]}}, "trainer.epochs: expected an integer, got 'a'"),
    ({"data_loader.args.batch_size": {"choice": []}}, "choice: expected a non-empty list"),
    ({"data_loader.args.batch_size": {"int": [16, 64], "step": 0}}, "step: expected a positive integer"),
    ({}, "sweep: empty"),
]


@pytest.mark.quick
@pytest.mark.parametrize("space, message", BAD_SPACES)
def test_a_bad_search_space_is_named(tmp_path, space, message):
    config = make_config(tmp_path, tmp_path, {"sweep": space})
    with pytest.raises(UserError, match=None) as error:
        check_space(ConfigParser.from_file(config))
    assert message in str(error.value) and str(config) in str(error.value)


def test_a_bad_space_or_an_unreachable_storage_is_one_line_before_any_trial(tmp_path, tiny_mnist):
    config = make_config(tmp_path, tiny_mnist, {**FAST, "sweep": {"optimizer.args.lr": {"float": [0.1, 0.01]}}})
    one_line_error(run("sweep.py", "-c", config, "--trials", "2"), 2, "sweep.optimizer.args.lr: float")
    config = make_config(tmp_path, tiny_mnist, FAST)
    one_line_error(run("sweep.py", "-c", config, "--trials", "2", "--storage", "postgresql://u:secret@127.0.0.1:1/x"),
                   2, "--storage postgresql+psycopg2://u:***@127.0.0.1:1/x: cannot open it")
    assert not (tmp_path / "saved").exists()
