"""Exact resume with randomness in a user's own Dataset, read by DataLoader workers or not: every sample's
draws (torch, `random`, NumPy) are seeded from (seed, epoch, index), so stopping at an epoch's end or in the
middle of one and resuming gives the checkpoint of a run never stopped, for any num_workers."""

import pytest
import torch

from conftest import make_config, run, run_dirs

ENV = {"OMP_NUM_THREADS": "1"}
STEPS_PER_EPOCH = 14  # 256 samples less 32 for validation, batches of 16


def config(folder, source: str, num_workers: int, persistent: bool):
    folder.mkdir()
    loader = {"type": "tests.noisy_data.NoisyDataLoader",
              "args": {"source": source, "batch_size": 16, "validation_split": 32, "num_workers": num_workers,
                       "persistent_workers": persistent}}
    return make_config(folder, "", {"data_loader": loader, "arch.type": "tests.models.Deterministic",
                                    "trainer.epochs": 3, "trainer.monitor": "min val_loss"})


def train(*args, env: dict | None = None, code: int = 0):
    result = run("train.py", *args, env={**ENV, **(env or {})})
    assert result.returncode == code, result.stderr[-2000:]


def assert_same_state(a: dict, b: dict, where: str = "") -> None:
    """Every entry but the generator states (which differ by design: see the module docstring) and the config."""
    assert a.keys() == b.keys(), where
    for key in a.keys() - {"rng", "config"}:
        if isinstance(a[key], dict):
            assert_same_state(a[key], b[key], f"{where}.{key}")
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{where}.{key} differs"
        else:
            assert a[key] == b[key], f"{where}.{key}: {a[key]!r} != {b[key]!r}"


@pytest.mark.parametrize("source", ["torch", "random", "numpy"])
def test_stopped_and_resumed_equals_never_stopped_with_any_workers(tmp_path, source):
    straight = config(tmp_path / "straight", source, 0, False)
    train("-c", straight)
    (reference,) = run_dirs(tmp_path / "straight" / "saved")
    expected = torch.load(reference / "latest.pth", weights_only=True)
    for num_workers, persistent, stop in ((0, False, "sigterm"), (2, False, "sigterm"), (2, True, "epoch")):
        folder = tmp_path / f"{num_workers}-{persistent}"
        if stop == "sigterm":  # in the 6th step of epoch 2 (the checkpoint is taken after the step)
            train("-c", config(folder, source, num_workers, persistent),
                  env={"TEST_SIGTERM": f"0:{STEPS_PER_EPOCH + 6}"}, code=128 + 15)
        else:
            train("-c", config(folder, source, num_workers, persistent), "--epochs", "2")
        (run_dir,) = run_dirs(folder / "saved")
        stopped = torch.load(run_dir / "latest.pth", weights_only=True)
        assert (stopped["epoch"], stopped["batch_in_epoch"]) == ((1, 6) if stop == "sigterm" else (2, 0))
        train("-r", run_dir, "--epochs", "3", "--trust-config")  # tests.noisy_data
        assert_same_state(torch.load(run_dir / "latest.pth", weights_only=True), expected,
                          f"num_workers {num_workers}, persistent {persistent}, stopped at {stop}")
