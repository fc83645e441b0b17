"""No save replaces a good file with a worse one (issue 27, points 5-8): NaN state is never written, a resume
from an older checkpoint keeps the run's best, save_top_k keeps the k best epochs across resumes, and a run
left with model_best.pth alone resumes from it or says it is finished. Real train.py processes, files on disk."""

import shutil
from pathlib import Path

import pytest
import torch

from config.parser import ConfigParser
from conftest import make_config, run, run_dirs
from runs.run import candidates
from test_bad_input import ENV, EPOCH_CALLS, FIRST_CALLS, flaky_loss
from utils import checkpoint
from utils.errors import UserError

QUICK = {"trainer.tensorboard": False, "trainer.epochs": 3}
KEPT = {**QUICK, "trainer.save_top_k": 2, "trainer.keep_last": 2}


def state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def tops(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.glob("top-epoch*.pth"))}


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """The run copied into tmp_path/saved/tiny as the newest run of config 'tiny' there (for -r auto)."""
    return Path(shutil.copytree(run_dir, tmp_path / "saved" / "tiny" / "20990101-000000"))


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory, tiny_mnist) -> Path:
    """A 3-epoch run keeping its 2 best epochs (val_loss falls every epoch here) and its 2 last periodic files."""
    tmp_path = tmp_path_factory.mktemp("three_epochs")
    result = run("train.py", "-c", make_config(tmp_path, tiny_mnist, KEPT))
    assert result.returncode == 0, result.stderr
    return run_dirs(tmp_path / "saved")[0]


@pytest.mark.quick
def test_optimizer_state_counts_in_the_finiteness_check():
    weights = {"w": torch.ones(3, dtype=torch.bfloat16), "steps": torch.arange(3)}
    optimizer = {"state": {0: {"step": torch.tensor(5.0), "exp_avg_sq": torch.tensor([1.0, float("inf")])}}}
    assert checkpoint.all_finite(weights) and checkpoint.all_finite({}, {"state": {}})
    assert not checkpoint.all_finite(weights, optimizer)
    assert not checkpoint.all_finite({"w": torch.tensor([0.0, float("nan")])})


@pytest.mark.parametrize("fault", ["nan loss", "nan gradients"])
def test_a_nan_between_saves_never_replaces_the_last_good_checkpoint(tmp_path, tiny_mnist, fault):
    """save_step 5 and no log interval before the epoch's end (log_step 50). A NaN loss from step 31 (epoch 2's
    batch 3) is found by the save at step 35; a finite loss with NaN gradients at step 35 (batch 7) leaves NaN
    weights, which that save refuses. Either way the run stops in one line naming latest.pth, still step 30's."""
    if fault == "nan loss":
        loss = flaky_loss(nan_from=FIRST_CALLS + EPOCH_CALLS + 2, nan_to=10**9)
        why = "loss is NaN or Inf at epoch 2, batch 3: stopping"
    else:
        loss = flaky_loss(nan_grad_at=FIRST_CALLS + EPOCH_CALLS + 6)
        why = "model weights or optimizer state are NaN or Inf in epoch 2 at step 35: not saved, stopping"
    config = make_config(tmp_path, tiny_mnist, {**QUICK, "trainer.log_step": 50, "trainer.save_step": 5,
                                                "loss": loss})
    result = run("train.py", "-c", config, env=ENV)
    (run_dir,) = run_dirs(tmp_path / "saved")
    line = (f"error: {why}; the last good checkpoint is kept: {run_dir / 'latest.pth'} (lower the learning rate or "
            "clip gradients)")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [line], result.stderr
    assert line in (run_dir / "train.log").read_text()
    latest = state(run_dir / "latest.pth")
    assert (latest["epoch"], latest["global_step"]) == (1, 30)
    assert checkpoint.all_finite(latest["model"], latest["optimizer"])
    assert state(run_dir / "model_best.pth")["epoch"] == 1


def test_top_k_keeps_the_best_epochs_by_their_recorded_values(three_epochs):
    files = {name: state(three_epochs / name) for name in tops(three_epochs)}
    names = [f"top-epoch{s['epoch']}-val_loss={s['monitor_value']:.6g}.pth" for s in files.values()]
    assert sorted(files) == sorted(names)
    assert sorted(s["epoch"] for s in files.values()) == [2, 3]
    best = next(name for name, s in files.items() if s["epoch"] == 3)
    assert (three_epochs / "model_best.pth").read_bytes() == (three_epochs / best).read_bytes()
    assert sorted(p.name for p in three_epochs.glob("checkpoint-epoch*.pth")) == [
        "checkpoint-epoch2.pth", "checkpoint-epoch3.pth"]  # keep_last, on its own


def test_top_k_needs_a_monitor(tmp_path, tiny_mnist):
    path = make_config(tmp_path, tiny_mnist, {"trainer.monitor": "off", "trainer.save_top_k": 2})
    with pytest.raises(UserError, match="trainer.save_top_k: ranks epochs by trainer.monitor, which is off"):
        ConfigParser.from_file(path)


def test_a_resume_from_an_older_checkpoint_keeps_the_runs_best_and_top_k(tmp_path, three_epochs):
    """Resumed from epoch 2 with a tiny learning rate, epoch 3 trains worse than the run's own epoch 3 but better
    than epoch 2: model_best.pth stays, and the top 2 are the run's epoch 3 and the new one (read from the files:
    the new process drops epoch 2's). With --reset-best the checkpoint's best is the one to beat."""
    run_dir = copy_run(three_epochs, tmp_path)
    best, before = (run_dir / "model_best.pth").read_bytes(), tops(run_dir)
    result = run("train.py", "-r", run_dir / "checkpoint-epoch2.pth", "--lr", "1e-5")
    assert result.returncode == 0, result.stderr
    run_best = state(run_dir / "model_best.pth")["monitor_best"]
    assert f"model_best.pth keeps the run's best val_loss {run_best:.6g} (checkpoint-epoch2.pth records " \
        in result.stdout, result.stdout
    assert (run_dir / "model_best.pth").read_bytes() == best
    resumed = state(run_dir / "latest.pth")
    assert (resumed["epoch"], resumed["monitor_best"], resumed["not_improved_count"]) == (3, run_best, 1)
    kept, new3 = tops(run_dir), f"top-epoch3-val_loss={resumed['monitor_value']:.6g}.pth"
    old3 = next(name for name in before if "epoch3" in name)
    assert resumed["monitor_value"] > run_best and sorted(kept) == sorted([old3, new3]) and kept[old3] == before[old3]

    reset = run("train.py", "-r", run_dir / "checkpoint-epoch2.pth", "--lr", "1e-5", "--reset-best")
    assert reset.returncode == 0, reset.stderr
    worse = state(run_dir / "model_best.pth")
    assert worse["epoch"] == 3 and worse["monitor_best"] > run_best


@pytest.mark.slow
def test_a_run_left_with_model_best_alone_resumes_from_it_or_says_it_is_finished(tmp_path, tiny_mnist, three_epochs):
    run_dir = copy_run(three_epochs, tmp_path)
    config = make_config(tmp_path, tiny_mnist, KEPT)
    for path in run_dir.glob("*.pth"):
        if path.name != "model_best.pth":
            path.unlink()
    assert [p.name for p in candidates(run_dir)] == ["model_best.pth"]
    done = run("train.py", "-r", "auto", "-c", config)
    assert done.returncode == 0 and done.stdout.strip() == \
        f"{run_dir / 'model_best.pth'}: nothing to do: all 3 epochs are trained (--epochs N trains further)"

    # as if the best had been epoch 2: metrics.csv says the run went on to epoch 3
    shutil.copy(three_epochs / "checkpoint-epoch2.pth", run_dir / "model_best.pth")
    done = run("train.py", "-r", run_dir)
    assert done.returncode == 0 and "nothing to do: the run trained to epoch 3 (metrics.csv), and model_best.pth, " \
        "of epoch 2, is its only checkpoint left" in done.stdout, done.stdout + done.stderr
    assert [p.name for p in run_dir.glob("*.pth")] == ["model_best.pth"]

    # asked for a 4th epoch: model_best.pth of epoch 2 is where it goes on, and it says so
    resumed = run("train.py", "-r", "auto", "-c", config, "--epochs", "4")
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming {run_dir / 'model_best.pth'} at epoch 3" in resumed.stdout, resumed.stdout
    assert "model_best.pth (epoch 2) is the run's only checkpoint left: the epochs after it, to 3, are trained " \
        "again" in resumed.stdout
    assert state(run_dir / "latest.pth")["epoch"] == 4
