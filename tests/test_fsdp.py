"""trainer.strategy fsdp under torchrun on CPU (gloo), as real processes on tiny real MNIST: FSDP2 training, sharded
DCP checkpoints resumed exactly on as many processes and on another number, read by test.py and the conversion
command, refused when their metadata would run code, and safe from a kill in the middle of a save.

Every run: 896 training images in global batches of 32 (16 a rank), 8 batches an epoch (len_epoch), 128 validation
images (64 a rank)."""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from config.parser import ConfigParser
from conftest import ROOT, make_config, run, run_dirs
from runs import sharded
from test_distributed import ENV, finish, launch
from utils.errors import UserError

FSDP = {"trainer.strategy": "fsdp", "data_loader.args.batch_size": 16, "trainer.len_epoch": 8,
        "trainer.tensorboard": False, "trainer.log_step": 4}
TIMEOUT = 240


def torchrun(*train_args, nproc: int = 2, env: dict | None = None) -> tuple[int, str]:
    return finish(launch("--standalone", f"--nproc_per_node={nproc}", "train.py", "-d", "cpu", *train_args, env=env))


def trained(*args, nproc: int = 2, env: dict | None = None) -> str:
    code, out = torchrun(*args, nproc=nproc, env=env)
    assert code == 0, out[-3000:]
    return out


def convert(folder: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runs.sharded", str(folder), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT)


def whole(folder: Path) -> dict:
    """A sharded checkpoint gathered into one process."""
    return sharded.load_whole(folder)


def assert_equal_states(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys() and a["model"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_mnist) -> dict[str, Path]:
    """Run directories: 'straight', 3 epochs on 2 processes; 'two', 2 epochs on 2 processes."""
    folder = tmp_path_factory.mktemp("fsdp")
    result = {}
    for name, epochs in (("straight", 3), ("two", 2)):
        (folder / name).mkdir()
        config = make_config(folder / name, tiny_mnist, {**FSDP, "trainer.epochs": epochs})
        out = trained("-c", config)
        assert "Training on cpu (2 processes)" in out
        (result[name],) = run_dirs(folder / name / "saved")
    return result


def test_two_processes_write_sharded_checkpoints_and_resume_exactly_on_two(runs, tmp_path):
    run_dir = runs["two"]
    assert {p.name for p in run_dir.glob("*.dcp")} == {"latest.dcp", "model_best.dcp", "checkpoint-epoch1.dcp",
                                                       "checkpoint-epoch2.dcp"}
    assert not list(run_dir.glob("*.pth"))
    assert {p.name for p in (run_dir / "latest.dcp").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp",
                                                                     "state.pth"}
    copy = Path(shutil.copytree(run_dir, tmp_path / run_dir.name))
    trained("-r", copy, "--epochs", "3")
    resumed, straight = whole(copy / "latest.dcp"), whole(runs["straight"] / "latest.dcp")
    assert resumed["epoch"] == straight["epoch"] == 3 and resumed["global_step"] == 24
    assert_equal_states(resumed, straight)


@pytest.mark.slow
def test_resume_on_one_process_then_test_py_and_conversion(runs, tmp_path):
    copy = Path(shutil.copytree(runs["two"], tmp_path / runs["two"].name))
    result = run("train.py", "-r", copy, "-d", "cpu", "--epochs", "3", timeout=TIMEOUT, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training on cpu (1 process)" in result.stdout and "at epoch 3, batch 0 (global step 16)" in result.stdout
    assert whole(copy / "latest.dcp")["epoch"] == 3

    tested = run("test.py", "-r", copy, "-d", "cpu", timeout=TIMEOUT, env=ENV)
    assert tested.returncode == 0 and "using model_best.dcp" in tested.stdout, tested.stderr[-3000:]

    out = tmp_path / "whole.pth"
    converted = convert(copy / "latest.dcp", out)
    assert converted.returncode == 0, converted.stderr
    plain = torch.load(out, weights_only=True)
    assert_equal_states(plain, whole(copy / "latest.dcp"))
    again = convert(copy / "latest.dcp", out)  # never replaces a file
    assert again.returncode == 2 and "give a new file name" in again.stderr


class RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_hostile_metadata_file_runs_nothing(runs, tmp_path):
    evil = Path(shutil.copytree(runs["two"] / "latest.dcp", tmp_path / "evil.dcp"))
    marker = tmp_path / "ran"
    (evil / ".metadata").write_bytes(pickle.dumps(RunsACommand(marker)))
    for script in ("train.py", "test.py"):
        result = run(script, "-r", evil, "-d", "cpu", timeout=TIMEOUT, env=ENV)
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert result.stderr.strip() == f"error: {evil / '.metadata'}: not a loadable checkpoint: it holds a Python " \
                                        "object (posix.system), refused for safety", result.stderr
        assert not marker.exists()
    # the payload is real: DCP's own reader runs it (and then fails on what os.system returned)
    with pytest.raises(AttributeError):
        FileSystemReader(str(evil)).read_metadata()
    assert marker.exists()


@pytest.mark.quick
def test_metadata_with_other_than_tensors_or_outside_files_is_refused(tmp_path):
    folder = tmp_path / "ck.dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(UserError, match="not a sharded checkpoint of this project"):
        sharded.read_metadata(folder)


@pytest.mark.quick
def test_metadata_naming_a_file_outside_its_folder_is_refused(tmp_path):
    folder = tmp_path / "outside.dcp"
    with sharded.single_process_quiet():
        dcp.save({"weight": torch.zeros(3)}, checkpoint_id=folder, no_dist=True)
    metadata = sharded.read_metadata(folder)
    next(iter(metadata.storage_data.values())).relative_path = "../../etc/passwd"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UserError, match="must name files of the folder itself"):
        sharded.read_metadata(folder)


@pytest.mark.quick
def test_optimizer_state_by_parameter_name_and_back():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optimizer = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.1}])
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    named = sharded.by_parameter_name(state, model)
    assert list(named["optimizer"]["model"]["state"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    tensors, plain = sharded.split(named)
    assert "optimizer/model/state/2.bias/exp_avg" in tensors and plain["optimizer"]["model"]["state"]["0.bias"] == {}
    weights, back = sharded.ordinary_layout(sharded.merge(plain, tensors))
    assert back["param_groups"] == state["optimizer"]["param_groups"] and weights.keys() == state["model"].keys()
    for index, entry in state["optimizer"]["state"].items():
        assert all(torch.equal(value, back["state"][index][key]) for key, value in entry.items())


@pytest.mark.quick
def test_what_fsdp_does_not_do_is_refused_at_start_up(tmp_path, tiny_mnist):
    config = make_config(tmp_path, tiny_mnist, {"trainer.strategy": "fsdp", "trainer.tb_histograms": 1})
    with pytest.raises(UserError, match="trainer.tb_histograms: needs whole parameters: not with strategy fsdp"):
        ConfigParser.from_file(config)
    gan = ConfigParser.from_file(ROOT / "configs" / "mnist_gan.json").config
    with pytest.raises(UserError, match="trainer.strategy: fsdp trains one model, and arch names several"):
        ConfigParser.from_dict(gan, "gan", ["trainer.strategy=fsdp"])


@pytest.mark.quick
def test_recover_puts_back_a_folder_left_aside(tmp_path):
    aside = tmp_path / f".latest.dcp{sharded.ASIDE}"
    aside.mkdir()
    sharded.recover(tmp_path)
    assert (tmp_path / "latest.dcp").is_dir() and not aside.exists()


@pytest.mark.slow
def test_a_kill_in_the_middle_of_a_sharded_save_leaves_a_resumable_run(runs, tmp_path, tiny_mnist):
    """Rank 0 dies by SIGKILL between the two renames of epoch 2's latest.dcp (the old folder aside, the new one
    not in place). The same command resumes from epoch 1 and ends where the uninterrupted run ends."""
    config = make_config(tmp_path, tiny_mnist, {**FSDP, "trainer.epochs": 3, "trainer.type":
                                                "plugin_faults.DiesInShardedSave", "trainer.die_at": 2,
                                                "trainer.monitor": "off", "trainer.save_period": 0})
    env = {"PYTHONPATH": str(ROOT / "tests")}
    code, out = torchrun("-r", "auto", "-c", config, env=env)
    assert code != 0, out[-3000:]
    (run_dir,) = run_dirs(tmp_path / "saved")
    assert not (run_dir / "latest.dcp").exists() and (run_dir / f".latest.dcp{sharded.ASIDE}").is_dir()
    out = trained("-r", "auto", "-c", config, "--set", "trainer.die_at=0", env=env)
    assert "at epoch 2, batch 0 (global step 8)" in out, out[-3000:]
    assert_equal_states(whole(run_dir / "latest.dcp"), whole(runs["straight"] / "latest.dcp"))


@pytest.mark.slow
def test_clipping_and_accumulation_train_as_with_ddp(tmp_path, tiny_mnist):
    """Two processes, batches of 8 accumulated twice, gradients clipped to 0.05 (every step clips): FSDP's
    weights are DDP's (tests.models.Deterministic: no dropout)."""
    results = {}
    for strategy in ("ddp", "fsdp"):
        (tmp_path / strategy).mkdir()
        config = make_config(tmp_path / strategy, tiny_mnist, {
            **FSDP, "trainer.strategy": strategy, "arch.type": "tests.models.Deterministic", "trainer.epochs": 1,
            "data_loader.args.batch_size": 8, "trainer.accum_steps": 2, "trainer.grad_clip": 0.05})
        trained("-c", config)
        (run_dir,) = run_dirs(tmp_path / strategy / "saved")
        results[strategy] = whole(run_dir / "latest.dcp") if strategy == "fsdp" else \
            torch.load(run_dir / "latest.pth", weights_only=True)
    assert results["fsdp"]["global_step"] == results["ddp"]["global_step"] == 4
    for key, value in results["ddp"]["model"].items():
        assert torch.allclose(results["fsdp"]["model"][key], value, rtol=0, atol=1e-6), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp_with_nccl_and_bf16_on_cuda_then_resumed_in_one_process(tmp_path, tiny_mnist):
    """Not run on the CI machine (no GPU): as many processes as GPUs (at most 2), NCCL, FSDP's bf16 policy."""
    config = make_config(tmp_path, tiny_mnist, {**FSDP, "trainer.amp": "bf16", "trainer.epochs": 1})
    nproc = min(2, torch.cuda.device_count())
    code, out = finish(launch("--standalone", f"--nproc_per_node={nproc}", "train.py", "-d", "cuda", "-c", config))
    assert code == 0 and f"Training on cuda:0 ({nproc} process" in out, out[-3000:]
    (run_dir,) = run_dirs(tmp_path / "saved")
    result = run("train.py", "-r", run_dir, "-d", "cuda", "--epochs", "2", timeout=TIMEOUT, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert whole(run_dir / "latest.dcp")["epoch"] == 2


@pytest.mark.slow
def test_an_ordinary_checkpoint_resumes_sharded_on_two_then_on_four_processes(tmp_path, tiny_mnist):
    """One process (ddp, .pth) for epoch 1, then fsdp on 2 processes for epoch 2 and on 4 for epoch 3, with the same
    global batch of 32: the weights of one process trained straight (tests.models.Deterministic: no dropout)."""
    layout = {**FSDP, "trainer.strategy": "ddp", "data_loader.args.batch_size": 32,
              "arch.type": "tests.models.Deterministic", "trainer.epochs": 3}
    config = make_config(tmp_path, tiny_mnist, layout)
    (tmp_path / "straight").mkdir()
    straight = make_config(tmp_path / "straight", tiny_mnist, layout)
    for args in (("-c", straight), ("-c", config, "--epochs", "1")):
        result = run("train.py", "-d", "cpu", *args, timeout=TIMEOUT, env=ENV)
        assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,), (reference,) = run_dirs(tmp_path / "saved"), run_dirs(tmp_path / "straight" / "saved")
    trained("-r", run_dir, "--trust-config", "--epochs", "2", "--bs", "16", "--set", "trainer.strategy=fsdp")
    assert whole(run_dir / "latest.dcp")["epoch"] == 2
    trained("-r", run_dir, "--trust-config", "--epochs", "3", "--bs", "8", nproc=4)
    resumed = whole(run_dir / "latest.dcp")["model"]
    expected = torch.load(reference / "latest.pth", weights_only=True)["model"]
    for key in expected:
        assert torch.allclose(resumed[key], expected[key], rtol=0, atol=1e-5), key
