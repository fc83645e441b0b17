"""No save replaces a good file with a worse one (issue 27): NaN state is never written. Real train.py
processes, files on disk."""

from pathlib import Path

import pytest
import torch

from conftest import make_config, run, run_dirs
from test_bad_input import ENV, EPOCH_CALLS, FIRST_CALLS, flaky_loss
from utils import checkpoint

QUICK = {"trainer.tensorboard": False, "trainer.epochs": 3}


def state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


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
