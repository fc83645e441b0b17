"""Insight while training (issue 17): the LR range test, trainer.profile, metrics.csv and k-fold runs.
Real train.py / lr_find.py / test.py processes on tiny real MNIST, plus focused unit tests."""

import csv
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from base import BaseDataLoader
from config.parser import ConfigParser
from conftest import BASE_CONFIG, make_config, run, run_dirs
from utils import checkpoint
from utils.errors import UserError

SUGGESTION = re.compile(r"^Suggested lr: (\S+) ", re.MULTILINE)


def files(root: Path) -> dict[str, int]:
    """Every file under `root` with its modification time: what 'changes nothing' compares."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_mnist) -> Path:
    """An uninterrupted 2-epoch run without trainer.profile."""
    tmp_path = tmp_path_factory.mktemp("reference")
    result = run("train.py", "-c", make_config(tmp_path, tiny_mnist))
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path / "saved")
    return run_dir


# ---- LR range test ----------------------------------------------------------------------------------
def test_lr_finder_writes_only_its_outputs_and_suggests_an_lr(tmp_path, tiny_mnist):
    config = make_config(tmp_path, tiny_mnist)
    before, data_before = files(tmp_path), files(tiny_mnist)
    out = tmp_path / "out"
    result = run("lr_find.py", "-c", config, "--steps", "40", "--start", "1e-6", "--end", "1", "--out", out)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "saved").exists()  # no run directory
    assert {k: v for k, v in files(tmp_path).items() if not k.startswith("out/")} == before
    assert files(tiny_mnist) == data_before
    (suggested,) = SUGGESTION.findall(result.stdout)
    assert 1e-6 < float(suggested) < 1
    curve = rows(out / "lr_find.csv")
    lrs = [float(row["lr"]) for row in curve]
    assert len(curve) == 40 and lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1)
    assert all(b / a == pytest.approx(lrs[1] / lrs[0]) for a, b in zip(lrs, lrs[1:]))  # exponential
    assert float(suggested) == pytest.approx(min(lrs, key=lambda lr: abs(math.log(lr / float(suggested)))), rel=1e-2)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_lr_finder_stops_when_the_loss_diverges(tmp_path, tiny_mnist):
    config = make_config(tmp_path, tiny_mnist, {"optimizer": {"type": "SGD", "args": {"lr": 0.01}}})
    result = run("lr_find.py", "-c", config, "--steps", "100", "--start", "1e-3", "--end", "1e8", "--out",
                 tmp_path / "out")
    assert "the loss diverged" in result.stdout, result.stdout + result.stderr
    assert len(rows(tmp_path / "out" / "lr_find.csv")) < 100
    assert not (tmp_path / "saved").exists()


def test_suggestion_is_the_steepest_descent_of_the_smoothed_loss():
    from lr_find import suggest_lr

    lrs = [10 ** (-6 + 6 * i / 99) for i in range(100)]  # 1e-6 .. 1
    curve = [(lr, 0.0, 2 - math.tanh(2 * (math.log10(lr) + 3))) for lr in lrs]  # falls fastest at 1e-3
    assert suggest_lr(curve) == pytest.approx(1e-3, rel=0.1)
    assert suggest_lr(curve[:2]) is None  # too few points to say


# ---- trainer.profile --------------------------------------------------------------------------------
def test_profiler_traces_exist_only_when_asked(tmp_path, tiny_mnist, reference):
    config = make_config(tmp_path, tiny_mnist, {"trainer.epochs": 1,
                                                "trainer.profile": {"wait": 1, "warmup": 1, "active": 2}})
    result = run("train.py", "-c", config)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path / "saved")
    (trace,) = (run_dir / "profile").glob("*.pt.trace.json")
    assert json.loads(trace.read_text())["traceEvents"]
    assert not (reference / "profile").exists()


@pytest.mark.parametrize("value, message", [
    ({"wait": 1, "active": 3}, "trainer.profile: expected null or a mapping"),
    ({"wait": 1, "warmup": 1, "active": 0}, "trainer.profile.active: expected an integer >= 1"),
    ({"wait": 1, "warmup": 1, "active": 2, "actve": 1}, "trainer.profile: unknown key 'actve'"),
    ("on", "trainer.profile: expected null or a mapping"),
])
def test_a_bad_profile_schedule_is_refused_at_start_up(value, message):
    raw = {**BASE_CONFIG, "trainer": {**BASE_CONFIG["trainer"], "profile": value}}
    with pytest.raises(UserError, match=re.escape(message)):
        ConfigParser.from_dict(raw, "cfg")


# ---- metrics.csv ------------------------------------------------------------------------------------
def test_metrics_csv_has_a_row_per_epoch_with_every_logged_value(reference):
    table = rows(reference / "metrics.csv")
    assert [row["epoch"] for row in table] == ["1", "2"] and [row["global_step"] for row in table] == ["28", "56"]
    assert list(table[0]) == ["epoch", "global_step", "loss", "accuracy", "val_loss", "val_accuracy", "lr"]
    log = (reference / "train.log").read_text()
    assert f"val_loss {float(table[1]['val_loss']):.6g}" in log


def test_metrics_csv_after_stop_and_resume_equals_the_uninterrupted_runs(tmp_path, tiny_mnist, reference):
    config = make_config(tmp_path, tiny_mnist)
    stopped = run("train.py", "-c", config, "--epochs", "1")  # stops after epoch 1
    assert stopped.returncode == 0, stopped.stderr
    (run_dir,) = run_dirs(tmp_path / "saved")
    resumed = run("train.py", "-r", run_dir, "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert (run_dir / "metrics.csv").read_text() == (reference / "metrics.csv").read_text()


def test_a_resume_with_more_metrics_writes_each_value_under_its_own_name(tmp_path, tiny_mnist):
    """Epochs 1-2 with accuracy, epoch 3 with top_k_acc too: every value equals a run with both from the start
    (metrics do not change training), the new columns empty before epoch 3; each lr is the epoch's own."""
    steplr = {"lr_scheduler": {"type": "StepLR", "args": {"step_size": 1, "gamma": 0.5}}}
    assert run("train.py", "-c", make_config(tmp_path, tiny_mnist, steplr)).returncode == 0
    (run_dir,) = run_dirs(tmp_path / "saved")
    resumed = run("train.py", "-r", run_dir, "--epochs", "3", "--set", "metrics=[accuracy,top_k_acc]")
    assert resumed.returncode == 0, resumed.stderr
    both = {**steplr, "name": "both", "metrics": ["accuracy", "top_k_acc"], "trainer.epochs": 3}
    assert run("train.py", "-c", make_config(tmp_path, tiny_mnist, both, "both.json")).returncode == 0
    (straight,) = run_dirs(tmp_path / "saved", "both")
    table, expected = rows(run_dir / "metrics.csv"), rows(straight / "metrics.csv")
    for epoch, (row, same) in enumerate(zip(table, expected, strict=True), start=1):
        blank = {"top_k_acc", "val_top_k_acc"} if epoch < 3 else set()
        assert row == {key: "" if key in blank else value for key, value in same.items()}
    assert [row["lr"] for row in table] == ["0.002", "0.001", "0.0005"]


def test_a_resume_with_another_monitor_starts_its_best_afresh(tmp_path, reference):
    run_dir = shutil.copytree(reference, tmp_path / "run")
    result = run("train.py", "-r", run_dir, "--epochs", "3", "--set", "trainer.monitor=max val_accuracy")
    assert result.returncode == 0, result.stderr
    assert "trainer.monitor changed since the checkpoint (min val_loss -> max val_accuracy)" in result.stdout
    latest, best = (checkpoint.load(run_dir / name) for name in ("latest.pth", "model_best.pth"))
    assert latest["monitor"] == "max val_accuracy" and latest["not_improved_count"] == 0 and best["epoch"] == 3
    assert latest["monitor_best"] == float(rows(run_dir / "metrics.csv")[2]["val_accuracy"])


def test_an_epoch_trained_again_after_an_interruption_is_written_once(tmp_path, reference):
    """Epoch 2 was logged but its checkpoints are lost: the resume trains it again; one row, the same."""
    run_dir = shutil.copytree(reference, tmp_path / "run")
    for name in ("latest.pth", "checkpoint-epoch2.pth"):
        (run_dir / name).unlink()
    result = run("train.py", "-r", run_dir)
    assert result.returncode == 0, result.stderr
    assert "Resuming" in result.stdout and "epoch 2/2" in result.stdout
    assert (run_dir / "metrics.csv").read_text() == (reference / "metrics.csv").read_text()


# ---- k-fold -----------------------------------------------------------------------------------------
def test_folds_partition_the_data_by_seed():
    dataset = torch.utils.data.TensorDataset(torch.arange(100))
    loaders = [BaseDataLoader(dataset, batch_size=8, folds=3, fold=i, seed=5) for i in range(3)]
    valid = [set(loader.valid_indices.tolist()) for loader in loaders]
    assert sorted(map(len, valid)) == [33, 33, 34] and set().union(*valid) == set(range(100))
    for loader, held_out in zip(loaders, valid):
        assert set(loader.indices.tolist()) == set(range(100)) - held_out
    again = BaseDataLoader(dataset, batch_size=8, folds=3, fold=0, seed=5).valid_indices
    other = BaseDataLoader(dataset, batch_size=8, folds=3, fold=0, seed=6).valid_indices
    assert torch.equal(again, loaders[0].valid_indices) and not torch.equal(other, again)
    with pytest.raises(ValueError, match="exclude each other"):
        BaseDataLoader(dataset, batch_size=8, folds=3, fold=0, validation_split=0.1)
    with pytest.raises(ValueError, match="fold must be"):
        BaseDataLoader(dataset, batch_size=8, folds=3, fold=3)


def test_k_fold_prints_mean_and_sd_and_a_rerun_skips_finished_folds(tmp_path, tiny_mnist):
    config = make_config(tmp_path, tiny_mnist, {"trainer.epochs": 1})
    first = run("train.py", "-c", config, "--folds", "3")
    assert first.returncode == 0, first.stderr
    (parent,) = run_dirs(tmp_path / "saved")
    assert re.search(r"^k-fold: best val_loss \S+ ± \S+ \(mean ± sd over 3 folds\)$", first.stdout, re.MULTILINE)
    assert first.stdout.count("epoch 1/1") == 3
    record = json.loads((parent / "folds.json").read_text())
    losses = [record["runs"][str(i)]["best"]["val_loss"] for i in range(3)]
    assert record["summary"]["best val_loss"]["mean"] == pytest.approx(sum(losses) / 3)
    assert record["summary"]["best val_loss"]["sd"] > 0 and "val_accuracy" in record["summary"]
    for fold in range(3):  # the fold is in the config, inside every checkpoint of its run
        state = checkpoint.load(parent / f"fold_{fold}" / "latest.pth")
        assert state["config"]["data_loader"]["args"]["fold"] == fold
    valid_sizes = re.findall(r"(\d+) training samples, (\d+) validation samples", first.stdout)
    assert valid_sizes == [("682", "342"), ("683", "341"), ("683", "341")]

    summary = record["summary"]
    # Fold 1 finished but was not recorded (a crash just then); fold 2 was killed before its first checkpoint.
    del record["runs"]["1"], record["runs"]["2"], record["summary"]
    (parent / "folds.json").write_text(json.dumps(record))
    shutil.rmtree(parent / "fold_2")
    again = run("train.py", "-c", config, "--folds", "3")
    assert again.returncode == 0, again.stderr
    assert "fold 0 finished before, skipped" in again.stdout
    assert f"{parent / 'fold_1' / 'latest.pth'}: nothing to do: all 1 epochs are trained" in again.stdout
    assert again.stdout.count("epoch 1/1") == 1  # fold 2 only
    assert json.loads((parent / "folds.json").read_text())["summary"] == summary  # the same folds, the same result
    rerun = run("train.py", "-c", config, "--folds", "3")
    assert rerun.stdout.count("finished before, skipped") == 3 and "epoch 1/1" not in rerun.stdout
    assert run_dirs(tmp_path / "saved") == [parent]  # the same parent each time


@pytest.mark.slow
def test_test_py_and_predict_py_on_a_fold_checkpoint_use_every_test_sample(tmp_path, tiny_mnist):
    config = make_config(tmp_path, tiny_mnist, {"trainer.epochs": 1, "data_loader.args.validation_split": 0.0,
                                                "data_loader.args.folds": 4, "data_loader.args.fold": 1})
    assert run("train.py", "-c", config).returncode == 0
    (run_dir,) = run_dirs(tmp_path / "saved")
    result = run("test.py", "-r", run_dir / "latest.pth")
    assert result.returncode == 0, result.stderr
    assert re.search(r"samples: 256$", result.stdout, re.MULTILINE)
    result = run("predict.py", "-r", run_dir / "latest.pth", "-o", tmp_path / "predictions.csv")
    assert result.returncode == 0, result.stderr
    assert "256 predictions written" in result.stdout


def test_run_dir_must_be_an_existing_directory_without_checkpoints(tmp_path, tiny_mnist, reference):
    config = make_config(tmp_path, tiny_mnist)
    for run_dir in (reference, tmp_path / "missing"):
        result = run("train.py", "-c", config, "--run-dir", run_dir)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "--run-dir needs an existing directory without checkpoints" in result.stderr
    assert not (tmp_path / "missing").exists() and not (tmp_path / "saved").exists()


@pytest.mark.slow
def test_a_fold_stopped_after_epoch_1_resumes_to_the_uninterrupted_folds_weights(tmp_path, tiny_mnist):
    """The fold is run state (in the checkpoint's config): a resumed fold trains on the same split, exactly."""
    fold = {"trainer.tensorboard": False, "data_loader.args.validation_split": 0.0, "data_loader.args.folds": 3,
            "data_loader.args.fold": 2}
    runs = {}
    for label, epochs in (("full", 2), ("stopped", 1)):
        (tmp_path / label).mkdir()
        config = make_config(tmp_path / label, tiny_mnist, {**fold, "trainer.epochs": epochs})
        assert run("train.py", "-c", config).returncode == 0
        (runs[label],) = run_dirs(tmp_path / label / "saved")
    resumed = run("train.py", "-r", runs["stopped"], "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr
    a, b = (checkpoint.load(d / "latest.pth") for d in runs.values())
    assert b["config"]["data_loader"]["args"]["fold"] == 2 and a["data"] == b["data"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
