"""DistributedDataParallel under torchrun on CPU (gloo): real processes on tiny real MNIST.

Every run uses one layout. 1,024 images less 127 for validation leave 897 for training; drop_last
makes that 28 global batches of 32 whether one process takes 32 or two take 16 each (no padding).
The 127 validation samples split 64/63 over two ranks, so a sample dropped or counted twice would
show in the validation metrics. With 'max val_loss' and early_stop 1 every run stops after epoch 2
of 4 (val_loss falls after epoch 1), so early stopping is decided on rank 0 in every DDP run.
"""

import concurrent.futures
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_config, read_test_results, run, run_dirs
from data_loader.data_loaders import MnistDataLoader
from tests.models import Deterministic

TIMEOUT = 240  # seconds per launch: a hung rank fails the test instead of blocking it
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CI": "true"}
LAYOUT = {"arch.type": "tests.models.Deterministic", "data_loader.args.validation_split": 127,
          "data_loader.args.drop_last": True, "trainer.epochs": 4, "trainer.monitor": "max val_loss",
          "trainer.early_stop": 1}


def launch(*torchrun_args: str, env: dict | None = None) -> subprocess.Popen:
    """`python -m torch.distributed.run <args>` in its own process group (so a timeout kills the workers too)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *map(str, torchrun_args)]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """(exit code, output) of a launch; fails the test if it does not end within TIMEOUT."""
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT} s (a rank hangs?):\n{out[-3000:]}")
    return proc.returncode, out


def torchrun(*train_args: str, env: dict | None = None) -> tuple[int, str]:
    """train.py with two processes on this machine (--standalone picks a free port)."""
    return finish(launch("--standalone", "--nproc_per_node=2", "train.py", "-d", "cpu", *train_args, env=env))


def single(*train_args: str) -> str:
    """train.py in one process; its output."""
    result = run("train.py", "-d", "cpu", *train_args, timeout=TIMEOUT, env=ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def progress(path: Path) -> tuple[int, int, int]:
    """(completed epochs, batches into the next, optimizer steps) of a checkpoint."""
    state = torch.load(path, weights_only=True)
    return state["epoch"], state["batch_in_epoch"], state["global_step"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert not any(key.startswith("module.") for key in wa), "a DDP wrapper prefix leaked into the checkpoint"
    for key in wa:
        assert torch.allclose(wa[key], wb[key], rtol=0, atol=1e-5), f"{key} differs: {a} vs {b}"


def epoch_results(run_dir: Path) -> dict[int, dict[str, float]]:
    """{epoch: {metric: value}} from the 'epoch N/M  key value ...' lines of train.log (the last one wins)."""
    results = {}
    for match in re.finditer(r"epoch (\d+)/\d+  (.*?)  \(", (run_dir / "train.log").read_text()):
        pairs = match[2].split()
        results[int(match[1])] = {k: float(v) for k, v in zip(pairs[::2], pairs[1::2])}
    return results


def assert_same_results(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a, (a, b)
    for epoch in a:
        assert a[epoch] == pytest.approx(b[epoch], rel=1e-4), f"epoch {epoch}: {a[epoch]} vs {b[epoch]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_mnist) -> dict[str, Path]:
    """Uninterrupted runs in one process with batch 32 and in two with batch 16: their run directories."""
    runs = {}
    for name, batch_size in (("single", 32), ("ddp", 16)):
        folder = tmp_path_factory.mktemp(name)
        config = make_config(folder, tiny_mnist, {**LAYOUT, "data_loader.args.batch_size": batch_size})
        if name == "single":
            out = single("-c", config)
        else:
            code, out = torchrun("-c", config)
            assert code == 0, out[-3000:]
            assert "Training on cpu (2 processes)" in out
        assert "Early stop" in out
        (runs[name],) = run_dirs(folder / "saved")
        assert progress(runs[name] / "latest.pth") == (2, 0, 56)
    return runs


def test_two_processes_match_one_with_twice_the_batch(reference):
    assert_same_weights(reference["ddp"] / "latest.pth", reference["single"] / "latest.pth")
    # validation (and training) metrics are reduced over ranks: the same as one process's
    assert_same_results(epoch_results(reference["ddp"]), epoch_results(reference["single"]))
    best = [torch.load(reference[n] / "model_best.pth", weights_only=True)["monitor_best"] for n in reference]
    assert best[0] == pytest.approx(best[1], rel=1e-5)


def test_only_rank_zero_writes(reference):
    run_dir = reference["ddp"]
    assert {p.name for p in run_dir.iterdir()} == {"config.json", "train.log", "metrics.csv", "tensorboard",
                                                   "latest.pth", "model_best.pth", "checkpoint-epoch1.pth",
                                                   "checkpoint-epoch2.pth", "run.lock"}
    # one writer process: TensorBoard names its files events.out.tfevents.<time>.<host>.<pid>.<n>
    pids = {p.name.split(".")[-2] for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    assert len(pids) == 1
    log = (run_dir / "train.log").read_text()
    assert log.count("epoch 1/4 ") == 1 and "[rank 1]" not in log
    # ... yet the checkpoint holds every rank's RNG state, each rank seeded differently
    rngs = torch.load(run_dir / "latest.pth", weights_only=True)["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])


@pytest.mark.slow
def test_test_py_in_two_processes_counts_every_test_sample_once(reference):
    """256 test images with --bs 48 (and drop_last in the training config): one process, two processes
    and a direct evaluation of the model must agree."""
    checkpoint_path = reference["ddp"] / "model_best.pth"
    args = ("test.py", "-d", "cpu", "-r", checkpoint_path, "--bs", "48", "--trust-config")  # tests.models
    result = run(*args, timeout=TIMEOUT, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    code, out = finish(launch("--standalone", "--nproc_per_node=2", *args))
    assert code == 0, out[-3000:]
    assert out.count("results written to") == 1, out  # rank 0 reports
    results = read_test_results(reference["ddp"])
    assert len(results) == 2  # one line per evaluation
    state = torch.load(checkpoint_path, weights_only=True)
    model = Deterministic()
    model.load_state_dict(state["model"])
    loader = MnistDataLoader(state["config"]["data_loader"]["args"]["data_dir"], 256, shuffle=False, training=False)
    ((data, targets),) = list(loader)
    with torch.no_grad():
        output = model.eval()(data)
    expected = {"samples": 256, "loss": torch.nn.functional.nll_loss(output, targets).item(),
                "accuracy": (output.argmax(1) == targets).float().mean().item()}
    for result in results:
        assert {key: result[key] for key in expected} == pytest.approx(expected, rel=1e-5), result


def test_sigterm_then_resume_in_two_processes_then_in_one(tmp_path, tiny_mnist, reference):
    config = make_config(tmp_path, tiny_mnist, {**LAYOUT, "data_loader.args.batch_size": 16})
    # rank 1 alone is signalled in step 12; the ranks agree at the next log interval (log_step 5)
    code, out = torchrun("-c", config, env={"TEST_SIGTERM": "1:12"})
    assert code != 0 and "stopped by SIGTERM" in out, out[-3000:]
    (run_dir,) = run_dirs(tmp_path / "saved")
    assert progress(run_dir / "latest.pth") == (0, 15, 15)

    # resume in two processes; now rank 0 is signalled, in step 15 + 22 (epoch 2, 28 steps an epoch)
    code, out = torchrun("-r", run_dir, "--trust-config", env={"TEST_SIGTERM": "0:22"})  # tests.models
    assert code != 0 and "stopped by SIGTERM" in out, out[-3000:]
    assert progress(run_dir / "latest.pth") == (1, 12, 40)

    # finish in one process with the same global batch: as if never interrupted
    single("-r", run_dir, "--bs", "32", "--trust-config")
    assert_same_weights(run_dir / "latest.pth", reference["ddp"] / "latest.pth")
    assert_same_results(epoch_results(run_dir), epoch_results(reference["ddp"]))


@pytest.mark.slow
def test_stopped_mid_epoch_and_resumed_in_two_processes_logs_what_the_run_never_stopped_logs(tmp_path, tiny_mnist,
                                                                                             reference):
    """Each rank's running sums are saved and taken back by that rank: the epoch's values are added up in the
    order of the run never stopped, so metrics.csv is the same byte for byte (rank 0 taking the total of both
    made epoch 1's loss differ in its last digits with this stop)."""
    config = make_config(tmp_path, tiny_mnist, {**LAYOUT, "data_loader.args.batch_size": 16})
    # signalled in step 3 (the first-batch check is call 1), stopped at step 5, the log interval: a running sum of
    # accuracy measured on one of the 5 batches (train_metrics)
    code, out = torchrun("-c", config, env={"TEST_SIGTERM": "1:4"})
    assert code != 0 and "stopped by SIGTERM" in out, out[-3000:]
    (run_dir,) = run_dirs(tmp_path / "saved")
    code, out = torchrun("-r", run_dir, "--trust-config")  # tests.models
    assert code == 0, out[-3000:]
    assert (run_dir / "metrics.csv").read_text() == (reference["ddp"] / "metrics.csv").read_text()


def free_port() -> int:
    """A free port below the kernel's ephemeral range: no outgoing connection (another process's, or node 1's own
    attempts to reach node 0 before it listens, which could connect to themselves) can take it before node 0 binds
    it. bind(0) would pick one inside that range."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random().sample(range(low // 2, low), 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low // 2}, {low})")


def test_two_nodes_on_loopback_resume_a_single_process_checkpoint(tmp_path, reference):
    # each node takes batches of 8 and accumulates 2 (gradients all-reduced only on the step): 32 a step again
    checkpoint = tmp_path / "run" / "checkpoint-epoch1.pth"
    checkpoint.parent.mkdir()
    shutil.copy(reference["single"] / "checkpoint-epoch1.pth", checkpoint)
    port = free_port()
    nodes = [launch("--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}", "--master_addr=127.0.0.1",
                    f"--master_port={port}", "train.py", "-d", "cpu", "-r", checkpoint, "--bs", "8", "--trust-config",
                    "--set", "trainer.accum_steps=2", f"trainer.save_dir={tmp_path / 'saved'}")
             for rank in (0, 1)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both outputs at once: a full pipe blocks a node
        reads = [pool.submit(node.communicate, timeout=TIMEOUT) for node in nodes]
        concurrent.futures.wait(reads, timeout=TIMEOUT + 5)
        for node in nodes:  # a hung node: kill both, so that the failure shows what each printed
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
        (out0, _), (out1, _) = (read.result() if not read.exception() else node.communicate()
                                for read, node in zip(reads, nodes))
    code0, code1 = (node.returncode for node in nodes)
    assert code0 == 0 and code1 == 0, f"node 0 ({code0}):\n{out0[-3000:]}\nnode 1 ({code1}):\n{out1[-3000:]}"
    assert "Training on cpu (2 processes)" in out0 and "Early stop" in out0
    (run_dir,) = run_dirs(tmp_path / "saved")  # a lone checkpoint continues in a new run directory
    assert_same_weights(run_dir / "latest.pth", reference["single"] / "latest.pth")


def test_rank_0_that_cannot_create_the_run_directory_stops_every_rank_in_one_line(tmp_path, tiny_mnist):
    """Only rank 0 makes the folder: its error reaches rank 1, which would otherwise wait for the folder's name."""
    (tmp_path / "a_file").write_text("")
    config = make_config(tmp_path, tiny_mnist, {**LAYOUT, "trainer.save_dir": str(tmp_path / "a_file" / "saved")})
    code, out = torchrun("-c", config)
    assert code != 0, out
    assert "trainer.save_dir: cannot create a run directory" in out, out[-3000:]
    # rank 1 learns it from rank 0 (it says so, unless torchrun stopped it first) instead of failing in the
    # broadcast of the folder's name when rank 0 is gone ("RuntimeError: ... Connection closed by peer")
    assert "RuntimeError" not in out and "broadcast_object_list" not in out, out[-3000:]
