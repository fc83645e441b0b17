"""Checkpoints you can trust (issue 3): exact resume, atomic and bounded saves, safe loading, signals.

Most tests run real train.py processes on tiny real MNIST; the crash test forks train.py's main()
from one driver process so that 50+ SIGKILLs do not each pay torch's import time.
"""

import errno
import fcntl
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from base.base_trainer import Interrupted
from config.parser import ConfigParser
from conftest import ROOT, make_config, run, run_dirs
from model import metric
from runs.run import Run, load_newest, newest_run
from trainer.trainer import MetricTracker, Trainer
from utils import checkpoint
from utils.errors import TrainingError, UserError

STEPS_PER_EPOCH = 112  # 1024 images - 128 for validation, in batches of 8
# Shuffle, dropout (MnistModel) and a LR scheduler are all in play; every step is logged to TensorBoard.
RESUME = {"data_loader.args.batch_size": 8, "lr_scheduler": {"type": "StepLR", "args": {"step_size": 1, "gamma": 0.5}},
          "trainer.epochs": 2, "trainer.log_step": 1, "trainer.save_step": 4}


# One thread per process: on a few shared cores, more threads make a small model's step ~40x slower.
ENV = {"OMP_NUM_THREADS": "1"}


def train(*args: str) -> subprocess.CompletedProcess:
    return run("train.py", *args, env=ENV)


def start(*args: str, **popen) -> subprocess.Popen:
    """train.py as a background process (conftest.run waits for it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CI": "true", **ENV}
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env=env,
                            text=True, **popen)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's view of a run's step/ and epoch/ scalars (purged points hidden, as TensorBoard shows them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if tag.startswith(("step/", "epoch/"))}


def leftovers(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.glob(f".*{checkpoint.TMP_MARK}*")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_mnist) -> Path:
    """An uninterrupted 2-epoch run: what every resumed run must reproduce exactly."""
    tmp_path = tmp_path_factory.mktemp("reference")
    result = train("-c", make_config(tmp_path, tiny_mnist, RESUME))
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path / "saved")
    return run_dir


# ---- exact resume ---------------------------------------------------------------------------------
def test_resume_after_sigterm_mid_epoch_is_exact(tmp_path, tiny_mnist, reference):
    config = make_config(tmp_path, tiny_mnist, RESUME)
    proc = start("-c", config)
    latest = None
    while proc.poll() is None and latest is None:  # the first latest.pth is written at step 4
        latest = next((tmp_path / "saved").glob("tiny/*/latest.pth"), None)
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    run_dir = latest.parent
    assert f"stopped by SIGTERM; resume with: python train.py -r {run_dir / 'latest.pth'}" in stderr
    assert not leftovers(run_dir)
    stopped = checkpoint.load(latest)
    assert stopped["epoch"] == 0 and 4 <= stopped["batch_in_epoch"] < STEPS_PER_EPOCH  # mid-epoch

    resumed = train("-r", "auto", "-c", config)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at epoch 1, batch {stopped['batch_in_epoch']} " in resumed.stdout
    assert "Config changed" not in resumed.stdout
    final, expected = checkpoint.load(run_dir / "latest.pth"), checkpoint.load(reference / "latest.pth")
    assert_same_tensors(final["model"], expected["model"])
    assert final["global_step"] == expected["global_step"]
    got, want = scalars(run_dir), scalars(reference)
    assert {tag: [s for s, _ in points] for tag, points in got.items()} == \
        {tag: [s for s, _ in points] for tag, points in want.items()}  # every step once, none missing
    assert got["epoch/loss"] == want["epoch/loss"] and got["epoch/val_loss"] == want["epoch/val_loss"]
    log = (run_dir / "train.log").read_text()
    assert log.index("SIGTERM received") < log.index("Resuming") < log.index("epoch 2/2")


# ---- falling back, config changes, finetuning -------------------------------------------------------
class Payload:
    """Unpickling this runs a shell command, as a malicious checkpoint would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_from_run_dir_skips_damaged_and_unsafe_checkpoints_and_is_exact(tmp_path, reference):
    """A crash left the two newest files of the reference run bad: resuming the run directory falls
    back to epoch 1's checkpoint and trains epoch 2 again, to the very same result."""
    run_dir = shutil.copytree(reference, tmp_path / "run")
    epoch2 = run_dir / "checkpoint-epoch2.pth"
    epoch2.write_bytes(epoch2.read_bytes()[:5000])  # truncated
    marker = tmp_path / "payload-ran"
    torch.save({"model": Payload(marker), "config": {}}, run_dir / "latest.pth")
    newest = time.time_ns()  # file times are as coarse as the kernel's tick: set the order explicitly
    os.utime(epoch2, ns=(newest - 10**9, newest - 10**9))
    os.utime(run_dir / "latest.pth", ns=(newest, newest))
    result = train("-r", run_dir, "--set", "trainer.save_step=8")
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    warnings = [line for line in result.stderr.splitlines() if "skipping" in line]
    assert len(warnings) == 2, result.stderr
    assert "latest.pth: not a loadable checkpoint" in warnings[0] and "refused for safety" in warnings[0]
    assert "checkpoint-epoch2.pth: not a loadable checkpoint" in warnings[1]
    assert f"Resuming {run_dir / 'checkpoint-epoch1.pth'} at epoch 2, batch 0" in result.stdout
    assert "Config changed since the checkpoint: trainer.save_step: 4 -> 8" in result.stdout

    final, expected = checkpoint.load(run_dir / "latest.pth"), checkpoint.load(reference / "latest.pth")
    assert_same_tensors(final["model"], expected["model"])
    assert final["global_step"] == 2 * STEPS_PER_EPOCH
    assert final["lr_scheduler"] == expected["lr_scheduler"]
    # TensorBoard hides what the first run logged after step 112 and shows the resumed run's points instead
    assert scalars(run_dir) == scalars(reference)
    log = (run_dir / "train.log").read_text()
    assert log.index("Run directory") < log.index("epoch 2/2") < log.index("Resuming")  # appended
    assert log.count("epoch 2/2") == 2


def test_arch_change_is_refused_and_finetune_loads_only_the_weights(tmp_path, tiny_mnist, reference):
    result = train("-r", reference, "--set", "arch.args.num_classes=5")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "arch differs from the checkpoint's" in result.stderr and "--finetune" in result.stderr

    # lr 0: finetuned weights stay the loaded ones, while optimizer and counters start afresh
    config = make_config(tmp_path, tiny_mnist, {**RESUME, "trainer.epochs": 1, "optimizer.args.lr": 0.0})
    result = train("-c", config, "--finetune", reference / "model_best.pth")
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path / "saved")
    state = checkpoint.load(run_dir / "latest.pth")
    assert state["epoch"] == 1 and state["global_step"] == STEPS_PER_EPOCH
    assert state["optimizer"]["state"][0]["step"].item() == STEPS_PER_EPOCH
    assert_same_tensors(state["model"], checkpoint.load(reference / "model_best.pth")["model"])


# ---- saves that fail -------------------------------------------------------------------------------
def test_unwritable_checkpoint_stops_the_run_and_keeps_earlier_ones(tmp_path, reference):
    run_dir = shutil.copytree(reference, tmp_path / "run")
    blocker = run_dir / "checkpoint-epoch3.pth"
    blocker.mkdir()  # chmod does not stop root; a directory in the way stops anyone
    os.utime(blocker, ns=(0, 0))  # the oldest entry: it is not what -r picks
    before = {p.name: p.read_bytes() for p in run_dir.glob("checkpoint-epoch*.pth") if p.is_file()}
    result = train("-r", run_dir, "--epochs", "3")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"error: cannot write checkpoint {blocker}: Is a directory"
    assert "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in run_dir.glob("checkpoint-epoch*.pth") if p.is_file()} == before
    assert not leftovers(run_dir)


@pytest.mark.quick
def test_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "latest.pth"
    checkpoint.save_atomic(b"old", target)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(TrainingError, match=f"cannot write checkpoint {target}: No space left on device"):
        checkpoint.save_atomic(b"new", target)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["latest.pth"]


# ---- safe loading -----------------------------------------------------------------------------------
@pytest.mark.quick
def test_pickled_callable_is_refused_and_does_not_run(tmp_path):
    marker, path = tmp_path / "payload-ran", tmp_path / "evil.pth"
    torch.save({"model": Payload(marker), "config": {}}, path)
    with pytest.raises(UserError, match="refused for safety"):
        checkpoint.load(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # proof that the payload is live: never do this
    assert marker.exists()


@pytest.mark.quick
def test_nothing_loads_checkpoints_unsafely():
    converter = ROOT / "scripts" / "convert_classic_checkpoint.py"  # its own restricted unpickler: test_convert_classic
    text = converter.read_text()
    assert text.count("weights_only=False") == text.count("pickle_module=RESTRICTED_PICKLE, weights_only=False") == 1
    for path in ROOT.rglob("*.py"):
        if "tests" in path.relative_to(ROOT).parts or path == converter:
            continue
        text = path.read_text()
        assert "weights_only=False" not in text, path
        assert "torch.load(" not in text or path == ROOT / "utils" / "checkpoint.py", path


# ---- in-process: the run state and the signal handler ------------------------------------------------
@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_trainer(run_dir: Path, config_file: Path, trainer_class: type = Trainer) -> Trainer:
    config, device = ConfigParser.from_file(config_file), torch.device("cpu")
    config.callables["trainer"] = trainer_class
    run_dir.mkdir()
    return config.build_trainer(device, config.build_data_loader(device), run=Run(config, device, run_dir))


def assert_same_state(a, b, where: str = "state") -> None:
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.quick
def test_run_state_round_trips_through_a_safe_load(tmp_path, tiny_mnist, one_thread):
    config = make_config(tmp_path, tiny_mnist, {**RESUME, "data_loader.args.batch_size": 128, "trainer.epochs": 1,
                                                "trainer.tensorboard": False})
    trainer = make_trainer(tmp_path / "a", config)
    trainer.train()
    state = trainer.state_dict()
    loaded = torch.load(io.BytesIO(checkpoint.serialize(state)), weights_only=True)
    fresh = make_trainer(tmp_path / "b", config)
    fresh.load_state_dict(loaded)
    assert_same_state(fresh.state_dict(), state)


def test_a_mid_epoch_resume_takes_the_running_sums_by_name():
    result = {"loss": torch.tensor(0.5), "output": torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]),
              "target": torch.tensor([0, 0])}  # accuracy 0.5, top-3 accuracy 1
    saved = MetricTracker({"accuracy": metric.accuracy, "top_k_acc": metric.top_k_acc}, torch.device("cpu"))
    saved.update(result, 2)
    fewer = MetricTracker({"top_k_acc": metric.top_k_acc}, torch.device("cpu"))
    fewer.load_state_dict(saved.state_dict())
    fewer.update(result, 2)
    assert fewer.result() == {"loss": 0.5, "top_k_acc": 1.0}


def test_a_mid_epoch_resume_with_a_new_metric_is_refused_before_training(tmp_path, tiny_mnist, one_thread):
    options = {"data_loader.args.batch_size": 128, "trainer.epochs": 1, "trainer.tensorboard": False}
    trainer = make_trainer(tmp_path / "a", make_config(tmp_path, tiny_mnist, options))
    trainer.train()
    state = {**trainer.state_dict(), "batch_in_epoch": 3}  # as if saved in the middle of epoch 2
    more = make_config(tmp_path, tiny_mnist, {**options, "metrics": ["accuracy", "top_k_acc"]}, "more.json")
    resumed = make_trainer(tmp_path / "b", more)
    resumed.load_state_dict(state)
    with pytest.raises(UserError, match="middle of an epoch and has no running sum of top_k_acc: resume from an"):
        resumed.check_first_batches()


@pytest.mark.quick
def test_signal_during_validation_stops_after_that_epochs_checkpoint(tmp_path, tiny_mnist, one_thread):
    class SignalInValidation(Trainer):
        def _valid_epoch(self, epoch: int) -> dict[str, float]:
            os.kill(os.getpid(), signal.SIGTERM)
            return super()._valid_epoch(epoch)

    config = make_config(tmp_path, tiny_mnist, {**RESUME, "data_loader.args.batch_size": 128,
                                                "trainer.tensorboard": False})
    trainer = make_trainer(tmp_path / "run", config, SignalInValidation)
    with pytest.raises(Interrupted, match="stopped by SIGTERM"):
        trainer.train()
    state = checkpoint.load(tmp_path / "run" / "latest.pth")
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 0  # not a step into epoch 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is handed back


# ---- signals and kills on real processes -------------------------------------------------------------
def test_second_ctrl_c_exits_at_once(tmp_path, tiny_mnist):
    config = make_config(tmp_path, tiny_mnist, {"data_loader.args.batch_size": 64, "trainer.epochs": 1000,
                                                "trainer.save_step": 1, "trainer.tensorboard": False})
    # A small stdout pipe that nobody reads: the run logs a line per save and soon blocks writing one.
    # The first Ctrl-C then waits for that step to finish; only the second can end the process.
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    proc = start("-c", config, stdout=write_end)
    os.close(write_end)
    blocked_for, last = 0.0, None
    while blocked_for < 1.5:  # no new checkpoint for 1.5 s, and asleep (not merely waiting for a CPU)
        assert proc.poll() is None, proc.stderr.read()
        latest = next((tmp_path / "saved").glob("tiny/*/latest.pth"), None)
        mtime = latest.stat().st_mtime_ns if latest else None
        asleep = Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] == "S"
        blocked_for = blocked_for + 0.1 if mtime is not None and mtime == last and asleep else 0.0
        last = mtime
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    with os.fdopen(read_end) as stdout:
        stdout.read()
    assert proc.wait(timeout=30) == 130
    stderr = proc.stderr.read()
    assert stderr.splitlines()[-1] == "error: interrupted" and "resume with" not in stderr, stderr
    assert not leftovers(latest.parent)
    checkpoint.load(latest)


CRASH_DRIVER = """
import os, random, signal, sys, time
from pathlib import Path

sys.path.insert(0, os.getcwd())
# imported once (torch.optim imports torch._dynamo lazily, seconds): the forked runs start at once
import torch, torch._dynamo, torch.utils.tensorboard, train, trainer.trainer
from utils.cli import run_main


def loads(path):
    try:
        torch.load(path, weights_only=True)
        return True
    except Exception:
        return False


config, save_dir, kills = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
rng = random.Random(0)
exited = damaged = 0
temporaries = set()  # one per kill while writing a checkpoint (named by pid)
for _ in range(kills):
    args = ["-r", "auto", "-c", config] if any(save_dir.glob("*/*.pth")) else ["-c", config]
    pid = os.fork()
    if pid == 0:  # the child is train.py, started with `args`
        real_fsync = os.fsync

        def slow_fsync(fd):  # widen the save path (in this child only) so random kills often land inside it
            time.sleep(0.02)
            real_fsync(fd)

        os.fsync = slow_fsync
        try:
            run_main(lambda: train.main(args))
        finally:
            os._exit(1)
    time.sleep(rng.uniform(0.1, 0.5))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    exited += not os.WIFSIGNALED(status)
    temporaries.update(path.name for path in save_dir.glob("*/.*.tmp-*"))
    damaged += sum(not loads(path) for path in save_dir.glob("*/*.pth"))
print(f"exited={exited} mid_write={len(temporaries)} damaged={damaged}")
"""


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_damaged_checkpoint(tmp_path, tiny_mnist):
    config = make_config(tmp_path, tiny_mnist, {"data_loader.args.batch_size": 16, "trainer.epochs": 1000,
                                                "trainer.save_step": 1, "trainer.keep_last": 2,
                                                "trainer.verbosity": 1})
    driver = tmp_path / "crash_driver.py"
    driver.write_text(CRASH_DRIVER)
    save_dir = tmp_path / "saved" / "tiny"
    result = run(driver, config, save_dir, 50, env=ENV)
    assert result.returncode == 0, result.stderr
    stats = {key: int(value) for key, value in (item.split("=") for item in result.stdout.split()[-3:])}
    assert stats["exited"] == 0, result.stdout[-3000:]  # every run was killed, none stopped on its own
    assert stats["mid_write"] >= 2, stats  # some kills hit a checkpoint being written
    assert stats["damaged"] == 0, stats  # after every kill, every checkpoint loads with weights_only=True

    run_dir = newest_run(tmp_path / "saved", "tiny")
    epoch = load_newest(run_dir)[1]["epoch"]
    periodic = sorted(int(p.stem[16:]) for p in run_dir.glob("checkpoint-epoch*.pth"))

    result = train("-r", "auto", "-c", config, "--epochs", str(epoch + 1))
    assert result.returncode == 0, result.stderr
    assert "skipping" not in result.stderr
    assert f"Resuming {run_dir}" in result.stdout
    assert checkpoint.load(run_dir / "latest.pth")["epoch"] == epoch + 1
    assert not leftovers(run_dir)
    kept = sorted(int(p.stem[16:]) for p in run_dir.glob("checkpoint-epoch*.pth"))
    assert kept == sorted({*periodic, epoch + 1})[-2:]  # keep_last: 2
