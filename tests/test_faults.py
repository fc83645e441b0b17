"""Faults a cluster or an unlucky user brings, as real processes: kills at any moment (between the files of
one save, before the first checkpoint, of one torchrun worker), the same command re-run until it succeeds,
two processes on one run, finished runs, lone checkpoints, stray files and I/O errors."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from base.data_fingerprint import data_fingerprint
from conftest import ROOT, make_config, run, run_dirs
from data_loader.datasets import read_idx, write_idx
from data_loader.pipeline import Transformed
from runs.run import data_changes
from test_checkpoints import assert_same_state
from tests.custom_data import LabelFile, Versioned
from utils.errors import UserError

ENV = {"PYTHONPATH": str(ROOT / "tests")}  # plugin_faults.py
QUICK = {"trainer.tensorboard": False, "trainer.epochs": 3, "trainer.save_step": 5}


def one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stdout[-2000:] + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_mnist) -> tuple[Path, Path]:
    """(config, run directory) of an uninterrupted 3-epoch run."""
    tmp_path = tmp_path_factory.mktemp("finished")
    config = make_config(tmp_path, tiny_mnist, QUICK)
    result = run("train.py", "-c", config)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path / "saved")
    return config, run_dir


# ---- -r auto: the run of the final config; no checkpoint yet starts it; the newest by id ---------------------
@pytest.mark.slow
def test_auto_resolves_the_run_from_the_final_config(tmp_path, tiny_mnist):
    config = make_config(tmp_path, tiny_mnist, {**QUICK, "trainer.epochs": 1})
    other = tmp_path / "elsewhere"
    for extra in ([], ["--set", "name=exp1", f"trainer.save_dir={other}"]):
        assert run("train.py", "-c", config, *extra).returncode == 0
    (tiny,), (exp1,) = run_dirs(tmp_path / "saved"), run_dirs(other, "exp1")
    result = run("train.py", "-r", "auto", "-c", config, "--set", "name=exp1", f"trainer.save_dir={other}",
                 "--epochs", "2")
    assert result.returncode == 0, result.stderr
    assert f"Resuming {exp1 / 'latest.pth'} at epoch 2" in result.stdout
    assert state(exp1 / "latest.pth")["epoch"] == 2 and state(tiny / "latest.pth")["epoch"] == 1


def test_auto_with_no_checkpoint_starts_the_run_and_a_finished_run_has_nothing_to_do(tmp_path, tiny_mnist):
    config = make_config(tmp_path, tiny_mnist, {**QUICK, "trainer.epochs": 1})
    first = run("train.py", "-r", "auto", "-c", config)
    assert first.returncode == 0, first.stderr
    (run_dir,) = run_dirs(tmp_path / "saved")
    assert f"-r auto: no checkpoint of this run yet: starting it in {run_dir}" in first.stdout
    before = files(run_dir)
    again = run("train.py", "-r", "auto", "-c", config)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"{run_dir / 'latest.pth'}: nothing to do: all 1 epochs are trained " \
                                   "(--epochs N trains further)"
    assert files(run_dir) == before and run_dirs(tmp_path / "saved") == [run_dir]


@pytest.mark.slow
def test_auto_picks_the_run_started_last_not_the_folder_touched_last(tmp_path, tiny_mnist):
    config = make_config(tmp_path, tiny_mnist, {**QUICK, "trainer.epochs": 1})
    for _ in range(2):
        assert run("train.py", "-c", config).returncode == 0
    older, newer = run_dirs(tmp_path / "saved")
    assert run("test.py", "-r", older / "latest.pth").returncode == 0  # writes a result into the older run
    os.utime(older, None)
    result = run("train.py", "-r", "auto", "-c", config, "--epochs", "2")
    assert f"Resuming {newer / 'latest.pth'}" in result.stdout, result.stdout
    assert state(older / "latest.pth")["epoch"] == 1


def test_an_early_stopped_run_has_nothing_to_do_until_more_epochs_are_asked(tmp_path, tiny_mnist):
    # val_loss falls every epoch here: 'max val_loss' with early_stop 1 stops after epoch 2 of 4
    config = make_config(tmp_path, tiny_mnist, {**QUICK, "trainer.epochs": 4, "trainer.monitor": "max val_loss",
                                                "trainer.early_stop": 1})
    assert "Early stop" in run("train.py", "-c", config).stdout
    (run_dir,) = run_dirs(tmp_path / "saved")
    result = run("train.py", "-r", run_dir)
    assert result.returncode == 0 and "nothing to do: it early-stopped ('val_loss' did not improve for 1 epochs)" \
        in result.stdout, result.stdout + result.stderr
    assert state(run_dir / "latest.pth")["epoch"] == 2
    more = run("train.py", "-r", run_dir, "--epochs", "5")
    assert more.returncode == 0 and "Resuming" in more.stdout and state(run_dir / "latest.pth")["epoch"] == 3


# ---- saves that stay consistent across files ---------------------------------------------------------------
def test_a_kill_between_the_files_of_a_save_leaves_no_stale_best(tmp_path, tiny_mnist):
    """Killed right after the first file of epoch 2's save (model_best.pth): latest.pth still says epoch 1,
    so the resume trains epoch 2 again and every file ends consistent."""
    config = make_config(tmp_path, tiny_mnist, {**QUICK, "trainer.type": "plugin_faults.DiesBetweenFiles",
                                                "trainer.die_at": 2})
    killed = run("train.py", "-c", config, env=ENV)
    assert killed.returncode == 9, killed.stderr
    (run_dir,) = run_dirs(tmp_path / "saved")
    assert state(run_dir / "latest.pth")["epoch"] == 1 and state(run_dir / "model_best.pth")["epoch"] == 2
    result = run("train.py", "-r", "auto", "-c", config, "--set", "trainer.die_at=0", env=ENV)
    assert result.returncode == 0, result.stderr
    latest, best = state(run_dir / "latest.pth"), state(run_dir / "model_best.pth")
    assert latest["epoch"] == 3 and best["monitor_best"] == latest["monitor_best"]
    assert_same_state(best["model"], state(run_dir / f"checkpoint-epoch{best['epoch']}.pth")["model"], "model")


def test_a_resume_repairs_a_best_model_left_behind(tmp_path, finished):
    """As an older version could leave it: model_best.pth of epoch 1 while the checkpoint's best is its own epoch."""
    run_dir = shutil.copytree(finished[1], tmp_path / "run")
    latest = state(run_dir / "latest.pth")
    assert latest["not_improved_count"] == 0  # epoch 3 was the best
    shutil.copy(run_dir / "checkpoint-epoch1.pth", run_dir / "model_best.pth")
    result = run("train.py", "-r", run_dir / "latest.pth", "--epochs", "4")
    assert result.returncode == 0, result.stderr
    assert "model_best.pth was behind latest.pth: written again from it" in result.stdout
    assert state(run_dir / "model_best.pth")["epoch"] >= 3


# ---- a run is trained by one process at a time ---------------------------------------------------------------
def test_a_second_process_on_a_run_gets_one_line_and_a_dead_holder_is_taken_over(tmp_path, finished):
    run_dir = shutil.copytree(finished[1], tmp_path / "run")
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-r", run_dir, "--epochs", "60"], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while "Resuming" not in (run_dir / "train.log").read_text().split("Done.")[-1]:
            assert time.time() < deadline and first.poll() is None, "the first process did not start"
            time.sleep(0.2)
        second = run("train.py", "-r", run_dir, "--epochs", "60")
        one_line_error(second, 2, f"{run_dir}: in use by process {first.pid} on ", "(run.lock)")
    finally:
        first.kill()
        first.communicate()
    epoch = state(run_dir / "latest.pth")["epoch"]
    third = run("train.py", "-r", run_dir, "--epochs", str(epoch + 1))  # the lock died with its process
    assert third.returncode == 0, third.stderr


# ---- a lone checkpoint, stray files, I/O errors -------------------------------------------------------------
def test_a_lone_checkpoint_resumes_into_a_new_run_directory(tmp_path, finished):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    shutil.copy(finished[1] / "checkpoint-epoch2.pth", downloads / "model.pth")
    (downloads / "config.json").write_text("{}\n")
    (downloads / ".notes.txt.tmp-1").write_text("someone else's\n")
    before = files(downloads)
    result = run("train.py", "-r", downloads / "model.pth", "--set", f"trainer.save_dir={tmp_path / 'saved'}")
    assert result.returncode == 0, result.stderr
    assert files(downloads) == before
    (run_dir,) = run_dirs(tmp_path / "saved")
    assert f"Resuming {downloads / 'model.pth'} at epoch 3, batch 0 (global step 56) in {run_dir}" in result.stdout
    assert_same_state(state(run_dir / "latest.pth")["model"], state(finished[1] / "latest.pth")["model"], "model")


def test_a_stray_copy_of_a_checkpoint_is_left_alone_by_keep_last(tmp_path, finished):
    run_dir = shutil.copytree(finished[1], tmp_path / "run")
    stray = run_dir / "checkpoint-epoch1 (copy).pth"
    shutil.copy(run_dir / "checkpoint-epoch1.pth", stray)
    result = run("train.py", "-r", run_dir / "latest.pth", "--epochs", "4", "--set", "trainer.keep_last=1")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in run_dir.glob("checkpoint-epoch*.pth")) == [stray.name, "checkpoint-epoch4.pth"]


def test_io_errors_outside_checkpoints_are_one_line(tmp_path, finished):
    run_dir = shutil.copytree(finished[1], tmp_path / "run")
    (run_dir / "tensorboard").mkdir(exist_ok=True)
    shutil.rmtree(run_dir / "tensorboard")
    (run_dir / "tensorboard").write_text("a file where the event folder goes\n")
    result = run("train.py", "-r", run_dir / "latest.pth", "--epochs", "4", "--set", "trainer.tensorboard=true")
    one_line_error(result, 1, f"{run_dir / 'tensorboard'}")
    (run_dir / "test-results.jsonl").mkdir()
    result = run("test.py", "-r", run_dir / "latest.pth")
    one_line_error(result, 1, f"{run_dir / 'test-results.jsonl'}")


def test_save_atomic_reports_the_write_error_even_when_the_clean_up_fails(tmp_path, monkeypatch):
    from utils import checkpoint
    from utils.errors import TrainingError

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: fail())
    with pytest.raises(TrainingError, match="cannot write checkpoint .*latest.pth: No space left on device"):
        checkpoint.save_atomic(b"data", tmp_path / "latest.pth")


def test_an_epoch_where_every_step_was_skipped_is_an_error(tmp_path, tiny_mnist):
    config = make_config(tmp_path, tiny_mnist, {**QUICK, "trainer.on_nonfinite": "skip",
                                                "loss": {"type": "test_bad_input.flaky_nll_loss",
                                                         "args": {"nan_from": 2, "nan_to": 10**9}}})
    result = run("train.py", "-c", config, env=ENV)
    one_line_error(result, 1, "epoch 1 trained no step (every step had a NaN/Inf loss and was skipped)",
                   "no checkpoint was written yet")


# ---- time-based saves and the data fingerprint ---------------------------------------------------------------
def test_save_minutes_writes_latest_at_log_intervals(tmp_path, tiny_mnist):
    saves = {}
    for minutes in (0, 1e-6):
        (tmp_path / str(minutes)).mkdir()
        config = make_config(tmp_path / str(minutes), tiny_mnist,
                             {**QUICK, "trainer.save_step": 0, "trainer.epochs": 1, "trainer.save_minutes": minutes})
        assert run("train.py", "-c", config).returncode == 0
        (run_dir,) = run_dirs(tmp_path / str(minutes) / "saved")
        saves[minutes] = (run_dir / "train.log").read_text().count("Saved latest.pth at epoch 0, step")
    assert saves == {0: 0, 1e-6: 5}  # steps 5, 10, 15, 20, 25 of 28


def test_a_resume_on_other_data_stops_unless_told(tmp_path, tiny_mnist, finished):
    changed = shutil.copytree(tiny_mnist, tmp_path / "data")
    labels_file = changed / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    labels = read_idx(labels_file).clone()
    labels[0] = (labels[0] + 1) % 10
    write_idx(labels_file, labels)
    run_dir = shutil.copytree(finished[1], tmp_path / "run")
    same = run("train.py", "-r", run_dir / "checkpoint-epoch2.pth")
    assert same.returncode == 0 and "differ" not in same.stdout
    other = ("train.py", "-r", run_dir / "checkpoint-epoch2.pth", "--set", f"data_loader.args.data_dir={changed}")
    one_line_error(run(*other), 2, "the training data differ from the checkpoint's: labels changed",
                   "to resume anyway (not exact), add --data-changed")
    told = run(*other, "--data-changed")
    assert told.returncode == 0, told.stderr
    warning = [line for line in told.stdout.splitlines() if "The training data differ" in line]
    assert len(warning) == 1 and "(labels changed, items changed): the resume is not exact" in warning[0], told.stdout


@pytest.mark.slow
def test_a_resume_on_a_custom_dataset_that_changed_stops_before_writing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "labels.txt").write_text(" ".join(str(i % 10) for i in range(96)))
    loader = {"type": "TorchvisionDataLoader", "args": {"dataset": "tests.custom_data.LabelFile", "data_dir": str(data),
                                                        "batch_size": 32, "validation_split": 32, "num_workers": 0}}
    config = make_config(tmp_path, data, {"data_loader": loader, "trainer.epochs": 1, "trainer.tensorboard": False})
    assert run("train.py", "-c", config).returncode == 0
    (run_dir,) = run_dirs(tmp_path / "saved")
    (data / "labels.txt").write_text(" ".join(str(i % 7) for i in range(80)))
    before = files(run_dir)
    resume = ("train.py", "-r", run_dir, "--epochs", "2", "--trust-config")  # the config names tests.custom_data
    one_line_error(run(*resume), 2, "the training data differ from the checkpoint's: samples 96 -> 80, labels changed")
    assert files(run_dir) == before
    told = run(*resume, "--data-changed")
    assert told.returncode == 0, told.stderr
    assert state(run_dir / "latest.pth")["epoch"] == 2 and state(run_dir / "latest.pth")["data"]["samples"] == 80
    assert "The training data differ from the checkpoint's (samples 96 -> 80, labels changed" in \
        (run_dir / "train.log").read_text()


def test_the_default_data_fingerprint_is_deterministic_and_says_what_changed(tmp_path):
    (tmp_path / "labels.txt").write_text(" ".join(str(i % 10) for i in range(40)))
    indices, generators = torch.arange(32), (torch.get_rng_state(), random.getstate())
    first = data_fingerprint(LabelFile(str(tmp_path)), indices)
    assert data_fingerprint(LabelFile(str(tmp_path)), indices) == first  # its images are random
    assert torch.equal(torch.get_rng_state(), generators[0]) and random.getstate() == generators[1]
    assert first.keys() == {"samples", "labels", "items", "split"} and first["samples"] == 40
    wrapped = data_fingerprint(Transformed(LabelFile(str(tmp_path)), lambda x: x + 1), indices)
    assert wrapped == first  # what a wrapper holds counts, read before its transform
    (tmp_path / "labels.txt").write_text(" ".join(["9", *(str(i % 10) for i in range(1, 40))]))  # was 0
    other = data_fingerprint(LabelFile(str(tmp_path)), indices)
    assert other["labels"] != first["labels"] and other["samples"] == 40 and other["split"] == first["split"]
    assert data_changes(first, other) == ["labels changed", "items changed"]
    assert data_changes({"samples": 40, "crc": "0"}, first) == []  # an older checkpoint's form
    assert data_changes({"samples": 39, "crc": "0"}, first) == ["samples 39 -> 40"]
    for own, entries in (("v1", {"dataset": "v1"}), ({"version": 2, "shards": "a-f"}, {"version": 2, "shards": "a-f"})):
        assert data_fingerprint(Versioned(str(tmp_path), own), indices) == \
            {"samples": 40, **entries, "split": first["split"]}
    with pytest.raises(UserError, match="fingerprint\\(\\) must return a str or a dict of str to str or int, got"):
        data_fingerprint(Versioned(str(tmp_path), [1]), indices)


# ---- one command, re-run until it succeeds; torchrun restarting a group that lost a worker -------------------
def test_the_same_command_rerun_after_kills_at_any_moment_finishes_in_one_run(tmp_path, tiny_mnist, finished):
    """Killed before its run folder, before its first checkpoint, and twice after checkpoints: the same
    `-r auto` command line, re-run, finishes the run in one folder with the uninterrupted run's weights."""
    config = make_config(tmp_path, tiny_mnist, QUICK)
    command = [sys.executable, str(ROOT / "train.py"), "-r", "auto", "-c", str(config)]
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"}
    saved, rng = tmp_path / "saved" / "tiny", random.Random(0)
    kill_when = [lambda: True,  # at once: before any folder
                 lambda: any(saved.glob("*/config.json")) and not any(saved.glob("*/*.pth")),
                 lambda: any(saved.glob("*/latest.pth")), lambda: any(saved.glob("*/checkpoint-epoch1.pth"))]
    for ready in kill_when:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    for _ in range(3):
        if subprocess.run(command, cwd=ROOT, env=env, capture_output=True).returncode == 0:
            break
    (run_dir,) = run_dirs(tmp_path / "saved")
    final = state(run_dir / "latest.pth")
    assert final["epoch"] == 3
    assert_same_state(final["model"], state(finished[1] / "latest.pth")["model"], "model")


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on loopback")
def test_torchrun_restarts_a_group_that_lost_a_worker_and_resumes_from_the_newest_checkpoint(tmp_path, tiny_mnist):
    """Rank 1 dies by SIGKILL in its 30th training step (epoch 2); torchrun --max-restarts=2 restarts both
    processes with the same `-r auto` command, which resumes from step 24's checkpoint. Resume is exact,
    so the weights equal those of an uninterrupted two-process run."""
    from test_distributed import LAYOUT, finish, launch

    layout = {**LAYOUT, "data_loader.args.batch_size": 16, "trainer.save_step": 8, "trainer.tensorboard": False}
    runs = {}
    for name, env in (("uninterrupted", {}), ("killed", {"TEST_SIGKILL": f"1:30:{tmp_path / 'marker'}"})):
        (tmp_path / name).mkdir()
        config = make_config(tmp_path / name, tiny_mnist, layout)
        code, out = finish(launch("--standalone", "--nproc_per_node=2", "--max-restarts=2", "train.py", "-d", "cpu",
                                  "-r", "auto", "-c", config, env=env))
        assert code == 0, out[-4000:]
        (runs[name],) = run_dirs(tmp_path / name / "saved")
    assert (tmp_path / "marker").exists()  # the worker did die
    log = (runs["killed"] / "train.log").read_text()
    assert "at epoch 2, batch 0 (global step 28)" in log, log  # epoch 1's end: the save before the kill
    a, b = (state(d / "latest.pth") for d in runs.values())
    assert a["global_step"] == b["global_step"] == 56
    assert_same_state(a["model"], b["model"], "model")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_a_full_disk_under_the_log_file_prints_no_traceback():
    code = ("import logging; from pathlib import Path; from logger import setup_logging; "
            "setup_logging(Path('/dev/full')); logging.getLogger('train').info('epoch 1'); print('went on')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "went on" in result.stdout and result.stderr == "", result.stderr
