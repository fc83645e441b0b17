"""End to end: real train.py and test.py processes on a tiny slice of real MNIST."""

import hashlib
import json
import re
import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import make_config, read_test_results, run, run_dirs
from model.model import MnistModel


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_mnist):
    """One 2-epoch run (with a scheduler), shared by the checks below."""
    tmp_path = tmp_path_factory.mktemp("trained")
    config = make_config(tmp_path, tiny_mnist, {
        "lr_scheduler": {"type": "StepLR", "args": {"step_size": 1, "gamma": 0.5}},
        "metrics": ["accuracy", "top_k_acc"], "trainer.progress_seconds": 1e-6,  # a line at every log interval
    })
    result = run("train.py", "-c", config)
    assert result.returncode == 0, result.stdout + result.stderr
    (run_dir,) = run_dirs(tmp_path / "saved")
    return run_dir, result


def test_run_directory_holds_config_log_checkpoints_and_events(trained):
    run_dir, _ = trained
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "train.log", "latest.pth", "checkpoint-epoch1.pth", "checkpoint-epoch2.pth",
            "model_best.pth", "tensorboard"} <= names
    config = json.loads((run_dir / "config.json").read_text())
    assert config["trainer"]["amp"] == "off"  # the resolved config: defaults filled in
    log = (run_dir / "train.log").read_text()
    assert "epoch 1/2" in log and "epoch 2/2" in log and "Trainable parameters" in log


def test_console_shows_one_model_line_and_plain_progress_lines_without_a_terminal(trained):
    run_dir, result = trained  # stdout is a pipe here, as in CI, nohup or Slurm
    assert "Model MnistModel: 21,840 parameters (21,840 trainable), 0.09 MB" in result.stdout
    assert "Conv2d(" not in result.stdout and "Conv2d(" in (run_dir / "train.log").read_text()  # the repr: file only
    lines = re.findall(r"^epoch 1/2  ([\d,]+)/896 \(\d+%\)  [\d,]+ samples/s  ETA \d+:\d\d:\d\d  loss \d\.\d{4}$",
                       result.stdout, re.MULTILINE)
    assert lines[:2] == ["160", "320"]  # log_step 5 of batch 32, during the epoch: before its summary line
    assert result.stdout.index("epoch 1/2  160/896") < result.stdout.index("epoch 1/2  loss")


def test_every_checkpoint_is_plain_data(trained):
    run_dir, _ = trained
    for path in run_dir.glob("*.pth"):
        state = torch.load(path, weights_only=True)
        assert state["version"] == 1 and state["arch"] == "MnistModel"
        assert state["config"]["name"] == "tiny"
        MnistModel().load_state_dict(state["model"])
    latest = torch.load(run_dir / "latest.pth", weights_only=True)
    assert latest["epoch"] == 2 and latest["batch_in_epoch"] == 0
    assert latest["global_step"] == 2 * 28  # (1024 - 128 validation) / 32 per epoch
    assert latest["lr_scheduler"]["last_epoch"] == 2


def test_tensorboard_has_epoch_and_step_curves(trained):
    run_dir, _ = trained
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("loss", "accuracy", "top_k_acc", "val_loss", "val_accuracy", "val_top_k_acc", "lr"):
        assert f"epoch/{name}" in tags
    assert {"step/loss", "step/accuracy", "step/lr"} <= tags
    assert [e.step for e in events.Scalars("epoch/val_loss")] == [28, 56]
    assert [e.step for e in events.Scalars("step/loss")] == [5, 10, 15, 20, 25, 28, 30, 35, 40, 45, 50, 55, 56]
    assert [e.value for e in events.Scalars("epoch/lr")] == pytest.approx([0.002, 0.001])  # each epoch's own
    state = torch.load(run_dir / "latest.pth", weights_only=True)
    assert state["monitor_best"] == pytest.approx(min(e.value for e in events.Scalars("epoch/val_loss")))


def test_test_py_evaluates_the_test_split_and_writes_json(trained):
    run_dir, _ = trained
    result = run("test.py", "-r", run_dir / "model_best.pth")
    assert result.returncode == 0, result.stderr
    written = read_test_results(run_dir)[-1]
    assert written["samples"] == 256
    assert 0.0 <= written["accuracy"] <= 1.0 and written["top_k_acc"] >= written["accuracy"]
    assert f"{written['accuracy']:.6g}" in result.stdout


@pytest.mark.slow
def test_config_json_repeats_a_finetuned_run_and_records_its_source(tmp_path, tiny_mnist, trained):
    source = tmp_path / "source.pth"
    shutil.copy(trained[0] / "model_best.pth", source)
    config = make_config(tmp_path, tiny_mnist, {"trainer.epochs": 1})
    assert run("train.py", "-c", config, "--finetune", source, "--set", "optimizer.args.lr=0.001").returncode == 0
    (first,) = run_dirs(tmp_path / "saved")
    recorded = {"path": str(source.resolve()), "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    assert json.loads((first / "config.json").read_text())["finetuned_from"] == recorded
    assert all(torch.load(p, weights_only=True)["finetuned_from"] == recorded for p in first.glob("*.pth"))
    # the run directory's config.json alone (defaults, --finetune and --set in it) trains the same weights again
    result = run("train.py", "-c", first / "config.json")
    assert result.returncode == 0, result.stderr
    (_, second) = run_dirs(tmp_path / "saved")
    a, b = (torch.load(d / "latest.pth", weights_only=True)["model"] for d in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    shutil.copy(trained[0] / "checkpoint-epoch1.pth", source)  # other bytes under the recorded name: one line
    result = run("train.py", "-c", first / "config.json")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {first / 'config.json'}: finetuned_from: {source.resolve()} is not the file the config records "
        "(its SHA-256 differs)"]


def test_resume_continues_at_the_next_epoch_in_the_same_run(trained):
    run_dir, _ = trained
    result = run("train.py", "-r", run_dir, "--epochs", "3", "--lr", "0.0001")
    assert result.returncode == 0, result.stderr
    assert "Resuming" in result.stdout and "epoch 3/3" in result.stdout and "epoch 2/3" not in result.stdout
    assert "trainer.epochs: 2 -> 3" in result.stdout  # the changed keys are reported
    assert "optimizer.args.lr: 0.002 -> 0.0001" in result.stdout
    assert "lr 0.0001" in result.stdout  # epoch 3 trained with the new lr, not the restored one
    assert torch.load(run_dir / "latest.pth", weights_only=True)["epoch"] == 3
    assert len(run_dirs(run_dir.parent.parent)) == 1  # no new run directory


def test_early_stop_and_save_period(tmp_path, tiny_mnist):
    config = make_config(tmp_path, tiny_mnist, {
        "optimizer.args.lr": 0.0, "trainer.epochs": 6, "trainer.early_stop": 2, "trainer.save_period": 2,
        "trainer.monitor": "max val_accuracy",
    })
    result = run("train.py", "-c", config)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path / "saved")
    # epoch 1 sets the best; with lr 0 epochs 2 and 3 cannot improve: stop after epoch 3
    assert "Early stop" in result.stdout and "epoch 3/6" in result.stdout and "epoch 4/6" not in result.stdout
    assert sorted(p.name for p in run_dir.glob("checkpoint-*.pth")) == ["checkpoint-epoch2.pth"]
    assert torch.load(run_dir / "model_best.pth", weights_only=True)["epoch"] == 1
