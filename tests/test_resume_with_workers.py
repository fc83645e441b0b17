"""Exact resume with randomness in a user's own Dataset, read by DataLoader workers or not: every sample's
draws (torch, `random`, NumPy) are seeded from (seed, epoch, index), so stopping at an epoch's end or in the
middle of one and resuming gives the checkpoint of a run never stopped, for any num_workers."""

import pytest
import torch
from torch.utils.data import IterableDataset

from base import BaseDataLoader
from conftest import make_config, run, run_dirs
from runs import sharded
from test_distributed import finish, launch

ENV = {"OMP_NUM_THREADS": "1"}
STEPS_PER_EPOCH = 14  # 256 samples less 32 for validation, batches of 16


def config(folder, num_workers: int, persistent: bool, overrides: dict | None = None):
    folder.mkdir()
    loader = {"type": "tests.noisy_data.NoisyDataLoader",
              "args": {"batch_size": 16, "validation_split": 32, "num_workers": num_workers,
                       "persistent_workers": persistent}}
    return make_config(folder, "", {"data_loader": loader, "arch.type": "tests.models.Deterministic",
                                    "trainer.epochs": 3, "trainer.monitor": "min val_loss", **(overrides or {})})


def train(*args, env: dict | None = None, code: int = 0):
    result = run("train.py", *args, env={**ENV, **(env or {})})
    assert result.returncode == code, result.stderr[-2000:]


def assert_same_state(a, b, where: str = "") -> None:
    """Every entry but the generator states (which differ by design: see the module docstring) and the config."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a.keys() - {"rng", "config"}:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_stopped_and_resumed_equals_never_stopped_with_any_workers(tmp_path):
    """For each worker setting: SIGTERM in the 6th step of epoch 2, then a resume to the end of epoch 3 (its
    workers start mid-epoch, then for a fresh epoch). The dataset draws from torch's, Python's and NumPy's
    generators: each must be restored right."""
    straight = config(tmp_path / "straight", 0, False)
    train("-c", straight)
    (reference,) = run_dirs(tmp_path / "straight" / "saved")
    expected = torch.load(reference / "latest.pth", weights_only=True)
    for num_workers, persistent in ((0, False), (2, False), (2, True)):
        folder = tmp_path / f"{num_workers}-{persistent}"
        # the checkpoint is taken after the step; the first-batch check's training forward is call 1
        train("-c", config(folder, num_workers, persistent), env={"TEST_SIGTERM": f"0:{STEPS_PER_EPOCH + 7}"},
              code=128 + 15)
        (run_dir,) = run_dirs(folder / "saved")
        assert progress(run_dir) == (1, 6)
        train("-r", run_dir, "--trust-config")  # tests.noisy_data
        assert_same_state(torch.load(run_dir / "latest.pth", weights_only=True), expected,
                          f"num_workers {num_workers}, persistent {persistent}")


def progress(run_dir) -> tuple[int, int]:
    state = torch.load(run_dir / "latest.pth", weights_only=True)
    return state["epoch"], state["batch_in_epoch"]


@pytest.mark.slow
def test_a_loss_with_sample_indices_the_epoch_and_epoch_hooks_resumes_exactly(tmp_path):
    """tests/hooked.py's loss: its per-sample estimates (updated in every training step, by index), its annealed
    weight (set by on_epoch_start, also when a run resumes mid-epoch) and its epoch count (on_epoch_end) give the
    never-stopped checkpoint after a SIGTERM in epoch 2 and a resume, with two workers."""
    loss = {"loss": {"type": "tests.hooked.EstimateLoss", "args": {"num_samples": 256}}}
    train("-c", config(tmp_path / "straight", 2, False, loss))
    (reference,) = run_dirs(tmp_path / "straight" / "saved")
    expected = torch.load(reference / "latest.pth", weights_only=True)
    train("-c", config(tmp_path / "stopped", 2, False, loss), env={"TEST_SIGTERM": f"0:{STEPS_PER_EPOCH + 7}"},
          code=128 + 15)
    (run_dir,) = run_dirs(tmp_path / "stopped" / "saved")
    train("-r", run_dir, "--trust-config")  # tests.hooked
    resumed = torch.load(run_dir / "latest.pth", weights_only=True)
    assert_same_state(resumed, expected)
    assert resumed["criterion"]["epochs_done"] == 3
    assert int((resumed["criterion"]["estimate"].sum(1) > 0).sum()) == 224  # every training sample, by its index


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_with_workers_stopped_and_resumed_equal_never_stopped(tmp_path, strategy):
    """Under torchrun (2 ranks on the CPU, 2 workers each): rank 1 takes SIGTERM in epoch 2, both stop at the log
    interval that agrees on it, and the resume trains to the never-stopped run's weights, optimizer state and each
    rank's running sums: every draw is seeded from its sample's key, whichever rank's worker reads it."""
    def torchrun(*args, env=None) -> tuple[int, str]:
        return finish(launch("--standalone", "--nproc_per_node=2", "train.py", "-d", "cpu", *args, env=env))

    def latest(run_dir):
        if strategy == "fsdp":
            return sharded.load_whole(run_dir / "latest.dcp")
        return torch.load(run_dir / "latest.pth", weights_only=True)

    overrides = {"trainer.strategy": strategy, "trainer.log_step": 2, "trainer.tensorboard": False}
    code, out = torchrun("-c", config(tmp_path / "straight", 2, False, overrides))
    assert code == 0, out[-3000:]
    code, out = torchrun("-c", config(tmp_path / "stopped", 2, False, overrides), env={"TEST_SIGTERM": "1:10"})
    assert code != 0 and "stopped by SIGTERM" in out, out[-3000:]
    (run_dir,) = run_dirs(tmp_path / "stopped" / "saved")
    stopped = latest(run_dir)
    assert (stopped["epoch"], stopped["batch_in_epoch"]) == (1, 3)  # 7 steps an epoch; the log interval after step 2
    code, out = torchrun("-r", run_dir, "--trust-config")  # tests.noisy_data
    assert code == 0, out[-3000:]
    (reference,) = run_dirs(tmp_path / "straight" / "saved")
    assert_same_state(latest(run_dir), latest(reference), strategy)


def test_an_iterable_dataset_is_refused_in_one_line():
    """Its order is its own state: no exact resume, so no silent difference either."""
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(4))

    with pytest.raises(ValueError, match="Stream is an IterableDataset: give a map-style Dataset"):
        BaseDataLoader(Stream(), batch_size=2)
