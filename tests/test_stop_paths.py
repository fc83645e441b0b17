"""The ways a run is stopped from outside or by its data, as real processes: a scheduler's SIGTERM to the whole
process group with DataLoader workers (alone and under torchrun), a damaged file in the middle of an epoch, and a
torchrun agent killed alone. Each ends with a save (or none needed), a documented exit and a run that goes on."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from base.base_data_loader import SeededSamples
from conftest import ROOT, make_config, run, run_dirs, write_image_folder
from data_loader.data_loaders import ImageFolderDataLoader
from test_distributed import finish, launch
from utils.errors import SampleError

ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CI": "true"}
WORKERS = {"data_loader.args.in_memory": False, "data_loader.args.num_workers": 2, "trainer.tensorboard": False,
           "trainer.save_step": 5}
TIMEOUT = 240


def state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < deadline, f"{what} never happened"
        time.sleep(0.02)


def last_save(run_dir: Path) -> tuple[int, int]:
    """(epoch, step) of the last 'Saved ... latest.pth at epoch E, step S' line of train.log."""
    saves = re.findall(r"Saved .*latest\.pth at epoch (\d+), step (\d+)", (run_dir / "train.log").read_text())
    return tuple(map(int, saves[-1]))


def assert_consistent(run_dir: Path, steps_per_epoch: int) -> dict:
    """latest.pth is the state of the last save train.log reports, whole epochs plus batches into the next."""
    latest = state(run_dir / "latest.pth")
    assert (latest["epoch"], latest["global_step"]) == last_save(run_dir)
    assert latest["global_step"] == latest["epoch"] * steps_per_epoch + latest["batch_in_epoch"], latest["epoch"]
    return latest


# ---- SIGTERM to the whole process group: the workers leave the decision to the main process ----------------
@pytest.mark.parametrize("persistent", [False, True])
def test_sigterm_to_the_process_group_with_workers_saves_the_last_step_and_resumes(tmp_path, tiny_mnist, persistent):
    config = make_config(tmp_path, tiny_mnist, {**WORKERS, "data_loader.args.persistent_workers": persistent,
                                                "trainer.epochs": 30})
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-c", str(config)], cwd=ROOT,
                            env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    saved = tmp_path / "saved" / "tiny"
    wait_for(lambda: any(saved.glob("*/latest.pth")), proc, "a first save")
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: the main process and its DataLoader workers
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:] + err
    assert "Traceback" not in err and err.strip().startswith("stopped by SIGTERM; resume with: "), err
    (run_dir,) = run_dirs(tmp_path / "saved")
    latest = assert_consistent(run_dir, 28)  # 1,024 images less 128 for validation, batches of 32
    resumed = run("train.py", "-r", "auto", "-c", config, "--epochs", str(latest["epoch"] + 1), env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert state(run_dir / "latest.pth")["epoch"] == latest["epoch"] + 1


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on loopback")
def test_sigterm_to_torchrun_with_workers_saves_the_last_step(tmp_path, tiny_mnist):
    """torchrun forwards a SIGTERM to each rank's process group, DataLoader workers included."""
    config = make_config(tmp_path, tiny_mnist, {**WORKERS, "data_loader.args.batch_size": 16, "trainer.epochs": 30})
    proc = launch("--standalone", "--nproc_per_node=2", "train.py", "-d", "cpu", "-c", config)
    saved = tmp_path / "saved" / "tiny"
    wait_for(lambda: any(saved.glob("*/latest.pth")), proc, "a first save")
    os.killpg(proc.pid, signal.SIGTERM)
    code, out = finish(proc)
    assert code != 0 and out.count("stopped by SIGTERM; resume with: torchrun") == 2, out[-3000:]
    # torchrun's own traceback (its SignalException) is torchrun's; the ranks' and their workers' would say "rank"
    assert not re.search(r"\[rank\d\]: Traceback|DataLoader worker", out), out[-3000:]
    (run_dir,) = run_dirs(tmp_path / "saved")
    assert_consistent(run_dir, 28)


# ---- a damaged file deep in the data: one line naming it, after a save; fixed, the run goes on ---------------
@pytest.mark.quick
def test_a_failing_sample_is_named_by_index_and_file():
    class Listed(Dataset):
        files = ["a.png", "b.png"]

        def __len__(self):
            return 2

        def __getitem__(self, index):
            raise ValueError("bad pixel")

    with pytest.raises(SampleError, match=r"^ValueError: bad pixel \(sample 1, b\.png\)$"):
        SeededSamples(Listed(), 0).__getitems__([(0, 1)])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_truncated_image_mid_epoch_saves_names_it_and_resumes_once_fixed(tmp_path, num_workers):
    root = write_image_folder(tmp_path / "images", counts=(20, 2), size=(28, 28))
    eval_transforms = [{"type": "Grayscale"}, {"type": "ToImage"},
                       {"type": "ToDtype", "args": {"dtype": "float32", "scale": True}}]
    args = {"data_dir": str(root), "batch_size": 4, "validation_split": 8, "num_workers": num_workers,
            "transforms": {"train": eval_transforms, "eval": eval_transforms}}
    config = make_config(tmp_path, root, {"data_loader": {"type": "ImageFolderDataLoader", "args": args},
                                          "arch.args.num_classes": 2, "trainer.tensorboard": False})
    # a sample of epoch 1's third batch or later, that start-up does not read: not in the first batch the
    # first-batch check reads (epoch 0's order) nor among those the data fingerprint reads (every fifth)
    loader = ImageFolderDataLoader(**{**args, "seed": 1})
    first_checked = loader.epoch_indices()[:4].tolist()
    loader.set_epoch(1)
    order = loader.epoch_indices().tolist()
    position = next(p for p in range(8, len(order)) if order[p] % 5 and order[p] not in first_checked)
    index, step = order[position], position // 4
    damaged = Path(loader.dataset.samples[index][0])
    intact = damaged.read_bytes()
    damaged.write_bytes(intact[: len(intact) // 2])

    result = run("train.py", "-c", config, env=ENV)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (run_dir,) = run_dirs(tmp_path / "saved")
    assert result.stderr.strip() == (
        f"error: {damaged}: cannot read image: image file is truncated (sample {index}): in epoch 1, after step "
        f"{step}; saved {run_dir / 'latest.pth'} at this step; fix or remove the file, then resume with -r")
    latest = state(run_dir / "latest.pth")
    assert (latest["epoch"], latest["batch_in_epoch"], latest["global_step"]) == (0, step, step)

    damaged.write_bytes(intact)
    resumed = run("train.py", "-r", "auto", "-c", config, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming {run_dir / 'latest.pth'} at epoch 1, batch {step}" in resumed.stdout
    assert state(run_dir / "latest.pth")["epoch"] == 2


# ---- the torchrun agent killed alone: its workers follow it within seconds -----------------------------------
def children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_the_workers_of_a_killed_torchrun_agent_end_and_the_same_command_finishes_the_run(tmp_path, tiny_mnist):
    """kill -9 on torchrun alone, once in start-up (the run directory exists, training has not begun) and once in
    training (it saved): each time within 30 s none of its processes is left (ranks and their DataLoader workers,
    which would otherwise train on holding the run lock); then the same command finishes the run."""
    # epochs enough that unsupervised workers would still be training after 30 s; the last command trains one more
    config = make_config(tmp_path, tiny_mnist, {**WORKERS, "data_loader.args.batch_size": 16, "trainer.epochs": 1000})
    command = ("--standalone", "--nproc_per_node=2", "train.py", "-d", "cpu", "-r", "auto", "-c", config)
    saved = tmp_path / "saved" / "tiny"

    def save_time() -> int | None:
        return next((p.stat().st_mtime_ns for p in saved.glob("*/latest.pth")), None)

    for when in ("start-up", "training"):
        agent, before = launch(*command), save_time()
        if when == "start-up":
            wait_for(lambda: any(saved.glob("*/config.json")), agent, "the run directory")
        else:  # a save of this attempt (the first may have saved on its way out)
            wait_for(lambda before=before: save_time() not in (None, before), agent, "a save")
        ranks = children(agent.pid)
        processes = ranks + [worker for rank in ranks for worker in children(rank)]
        assert len(ranks) == 2, when
        agent.kill()
        agent.wait()
        deadline = time.time() + 30
        while any(map(alive, processes)) and time.time() < deadline:
            time.sleep(0.1)
        agent.stdout.close()
        assert not any(map(alive, processes)), f"left after a kill in {when}: {list(filter(alive, processes))}"
    (run_dir,) = run_dirs(tmp_path / "saved")
    epochs = state(run_dir / "latest.pth")["epoch"] + 1
    code, out = finish(launch(*command, "--epochs", str(epochs)))
    assert code == 0, out[-3000:]
    assert state(run_dir / "latest.pth")["epoch"] == epochs
