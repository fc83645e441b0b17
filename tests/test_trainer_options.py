"""Trainer options on CPU: accumulation, clipping, mixed precision, channels_last, compile, LR schedulers,
and the torchvision data path with workers. CUDA-only paths skip without CUDA."""

import copy
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from base import BaseDataLoader
from config.parser import ConfigParser
from conftest import BASE_CONFIG, ROOT, make_config, run, run_dirs
from data_loader.data_loaders import MnistDataLoader
from data_loader.datasets import MNIST_FILES, InMemoryImages
from runs.run import Run
from trainer.trainer import Trainer
from utils import checkpoint
from utils.device import select_device
from utils.errors import UserError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_model() -> torch.nn.Module:
    """A conv and a linear layer, no dropout or batch norm: accumulation must equal a bigger batch exactly."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16, 3))


def tiny_loader(batch_size: int, n: int = 64) -> BaseDataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=generator)
    targets = torch.randint(0, 3, (n,), generator=generator)
    return BaseDataLoader(InMemoryImages(images, targets, 0.5, 0.25), batch_size=batch_size, shuffle=False)


def make_trainer(tmp_path, options: dict, batch_size: int = 8, lr: float = 0.1, scheduler: dict | None = None,
                 device: str = "cpu", model: torch.nn.Module | None = None) -> Trainer:
    """A Trainer on random 3x4x4 images built as train.py builds one; `options` are trainer keys."""
    raw = copy.deepcopy(BASE_CONFIG)
    raw["trainer"].update({"epochs": 1, "save_dir": str(tmp_path), "tensorboard": False, "monitor": "off",
                           "verbosity": 0, **options})
    raw["lr_scheduler"] = scheduler
    config = ConfigParser.from_dict(raw, "test")
    device = torch.device(device)
    model = (model or tiny_model()).to(device)
    if options.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    lr_schedulers = {"model": config.build("lr_scheduler", optimizer)} if scheduler else {}
    run_dir = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    run_dir.mkdir()
    return Trainer(config, device, {"model": model}, F.cross_entropy, {}, {"model": optimizer}, lr_schedulers,
                   tiny_loader(batch_size).to(device), run=Run(config, device, run_dir))


def weights(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten().cpu() for p in trainer.model.parameters()])


def record_grad_norms(trainer: Trainer) -> list[float]:
    """The global gradient norm seen by each optimizer step (after clipping)."""
    norms = []
    params = list(trainer.model.parameters())
    trainer.optimizer.register_step_pre_hook(
        lambda *_: norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()))
    return norms


def record_inputs(module: torch.nn.Module) -> list[torch.Tensor]:
    seen = []
    module.register_forward_hook(lambda _, inputs, output: seen.append((inputs[0], output)))
    return seen


# ---- accumulation and clipping -------------------------------------------------------------------------
def test_accumulation_equals_one_step_with_a_larger_batch(tmp_path):
    accumulated = make_trainer(tmp_path, {"accum_steps": 4}, batch_size=8)
    large = make_trainer(tmp_path, {}, batch_size=32)
    small = make_trainer(tmp_path, {}, batch_size=8)
    for trainer in (accumulated, large, small):
        trainer.train()
    assert accumulated.global_step == large.global_step == 2  # 64 samples: 2 steps of 4 x 8 or of 32
    torch.testing.assert_close(weights(accumulated), weights(large), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(weights(accumulated), weights(small), atol=1e-4)  # the comparison can tell


def test_accumulation_steps_at_the_end_of_an_epoch(tmp_path):
    trainer = make_trainer(tmp_path, {"accum_steps": 3}, batch_size=8)  # 8 batches: steps after 3, 6 and 8
    trainer.train()
    assert trainer.global_step == 3
    assert all(p.grad is None for p in trainer.model.parameters())  # nothing left over for the next epoch


def test_grad_clip_bounds_the_global_norm(tmp_path):
    clipped = make_trainer(tmp_path, {"grad_clip": 0.05, "epochs": 2}, lr=0.5)
    free = make_trainer(tmp_path, {"epochs": 2}, lr=0.5)
    clipped_norms, free_norms = record_grad_norms(clipped), record_grad_norms(free)
    clipped.train()
    free.train()
    assert len(clipped_norms) == 16 and max(clipped_norms) <= 0.05 * (1 + 1e-4)
    assert max(free_norms) > 0.05  # without the option the bound is exceeded: the test can tell


# ---- mixed precision, memory format, compile ---------------------------------------------------------------
def test_bf16_autocast_runs_on_cpu(tmp_path):
    trainer = make_trainer(tmp_path, {"amp": "bf16"})
    seen = record_inputs(trainer.model[3])
    before = weights(trainer)
    result = trainer.train()
    assert seen and all(output.dtype == torch.bfloat16 for _, output in seen)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # weights stay fp32
    assert torch.isfinite(torch.tensor(result["loss"])) and not torch.equal(before, weights(trainer))


def test_fp16_with_grad_scaler(tmp_path):
    """fp16 autocast and the GradScaler run on CPU too (torch >= 2.3); the scale is saved with the run."""
    trainer = make_trainer(tmp_path, {"amp": "fp16"})
    seen = record_inputs(trainer.model[3])
    trainer.train()
    assert all(output.dtype == torch.float16 for _, output in seen)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() > 1
    state = checkpoint.load(trainer.run.dir / "latest.pth")
    assert state["scaler"]["scale"] == trainer.scaler.get_scale()


def test_channels_last_feeds_nhwc_inputs(tmp_path):
    nhwc = make_trainer(tmp_path, {"channels_last": True})
    nchw = make_trainer(tmp_path, {})
    seen_nhwc, seen_nchw = record_inputs(nhwc.model[0]), record_inputs(nchw.model[0])
    nhwc.train()
    nchw.train()
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in seen_nhwc)
    assert not any(x.is_contiguous(memory_format=torch.channels_last) for x, _ in seen_nchw)
    torch.testing.assert_close(weights(nhwc), weights(nchw), rtol=1e-4, atol=1e-5)


def test_compile_trains_like_eager(tmp_path, monkeypatch):
    """torch.compile through AOTAutograd without code generation (seconds, not a minute of C++ builds)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="aot_eager"))
    compiled = make_trainer(tmp_path, {"compile": True})
    eager = make_trainer(tmp_path, {})
    compiled.train()
    eager.train()
    assert compiled.forward_model is not compiled.model and hasattr(compiled.forward_model, "_orig_mod")
    torch.testing.assert_close(weights(compiled), weights(eager), rtol=1e-4, atol=1e-5)
    assert compiled.state_dict()["model"].keys() == eager.state_dict()["model"].keys()  # no _orig_mod. prefix


@pytest.mark.slow
def test_compile_with_inductor(tmp_path):
    compiled = make_trainer(tmp_path, {"compile": True})
    eager = make_trainer(tmp_path, {})
    compiled.train()
    eager.train()
    torch.testing.assert_close(weights(compiled), weights(eager), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["cuda", "auto"])
def test_cuda_without_an_index_is_the_current_device(monkeypatch, name):
    """torch.cuda.set_device refuses a device without an index (torch 2.11 on a GPU machine: every `device: cuda`
    run failed), so 'cuda' and 'auto' become the current CUDA device; CUDA is faked so this runs anywhere."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert select_device(name) == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]


@needs_cuda
def test_cuda_fp16_channels_last_and_in_memory_data_on_the_device(tmp_path):
    trainer = make_trainer(tmp_path, {"amp": "fp16", "channels_last": True, "accum_steps": 2}, device="cuda")
    seen = record_inputs(trainer.model[3])
    result = trainer.train()
    assert trainer.data_loader.dataset.device.type == "cuda"
    assert all(output.dtype == torch.float16 and output.is_cuda for _, output in seen)
    assert torch.isfinite(torch.tensor(result["loss"])) and trainer.global_step == 4


@needs_cuda
def test_cuda_bf16(tmp_path):
    trainer = make_trainer(tmp_path, {"amp": "bf16"}, device="cuda")
    seen = record_inputs(trainer.model[3])
    trainer.train()
    assert all(output.dtype == torch.bfloat16 for _, output in seen)


# ---- learning-rate schedulers ------------------------------------------------------------------------------
def test_scheduler_stepped_per_epoch(tmp_path):
    trainer = make_trainer(tmp_path, {"epochs": 3}, lr=0.1,
                           scheduler={"type": "StepLR", "args": {"step_size": 1, "gamma": 0.5}})
    result = trainer.train()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert result["lr"] == pytest.approx(0.1 * 0.5**2)  # what the last epoch trained with


def test_one_cycle_stepped_per_optimizer_step(tmp_path):
    scheduler = {"type": "OneCycleLR", "interval": "step", "args": {"max_lr": 0.1, "total_steps": 12}}
    trainer = make_trainer(tmp_path, {"epochs": 2, "accum_steps": 2}, scheduler=scheduler)  # 4 steps per epoch
    lrs = []
    trainer.optimizer.register_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    trainer.train()
    assert trainer.global_step == 8 and trainer.lr_scheduler.last_epoch == 8  # once per step, not per epoch
    assert len(set(lrs)) == 8 and lrs[:3] == sorted(lrs[:3])  # a new rate each step, warming up


def test_plateau_scheduler_gets_the_monitored_metric(tmp_path, monkeypatch):
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
    values, step = [], plateau.step
    monkeypatch.setattr(plateau, "step", lambda self, metric: (values.append(metric), step(self, metric)))
    scheduler = {"type": "ReduceLROnPlateau", "args": {"mode": "min", "patience": 0, "threshold": 0.0}}
    trainer = make_trainer(tmp_path, {"epochs": 3, "monitor": "min loss"}, scheduler=scheduler)
    result = trainer.train()
    assert len(values) == 3 and values[-1] == result["loss"]
    assert trainer.lr_scheduler.best == min(values)


@pytest.mark.parametrize("trainer, interval", [({"monitor": "off"}, "epoch"), ({}, "step")])
def test_plateau_scheduler_needs_a_monitor_and_epochs(tmp_path, trainer, interval):
    raw = copy.deepcopy(BASE_CONFIG)
    raw["trainer"].update(trainer)
    raw["lr_scheduler"] = {"type": "ReduceLROnPlateau", "interval": interval}
    with pytest.raises(UserError, match="ReduceLROnPlateau steps once per epoch on the monitored metric"):
        ConfigParser.from_dict(raw, "test")


# ---- data paths ------------------------------------------------------------------------------------------
def test_worker_path_matches_in_memory(tiny_mnist):
    """in_memory: false reads sample by sample in 2 persistent workers: same batches, same order."""
    options = {"batch_size": 100, "validation_split": 0.1, "seed": 3}
    fast = MnistDataLoader(str(tiny_mnist), in_memory=True, **options)
    workers = MnistDataLoader(str(tiny_mnist), in_memory=False, num_workers=2, persistent_workers=True,
                              prefetch_factor=2, **options)
    assert len(fast) == len(workers) == 10  # 922 training samples
    for epoch in (1, 2):
        fast.set_epoch(epoch)
        workers.set_epoch(epoch)
        for (x1, y1), (x2, y2) in zip(fast, workers, strict=True):
            torch.testing.assert_close(x1, x2, rtol=0, atol=1e-5)
            assert torch.equal(y1, y2)


def test_worker_path_reads_its_split_alone_and_writes_nothing(tmp_path, tiny_mnist):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES[True]:  # the training files only
        shutil.copy(tiny_mnist / "MNIST" / "raw" / f"{name}.gz", raw)
    assert MnistDataLoader(str(tmp_path), in_memory=False).n_samples == 1024
    assert sorted(p.name for p in raw.iterdir()) == sorted(f"{name}.gz" for name in MNIST_FILES[True])
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz"):
        MnistDataLoader(str(tmp_path), in_memory=False, training=False)


def test_train_py_with_speed_options(tmp_path, tiny_mnist):
    """One real run with bf16, channels_last, clipping, accumulation and a per-step OneCycleLR."""
    one_cycle = {"type": "OneCycleLR", "interval": "step", "args": {"max_lr": 0.01, "total_steps": 14}}
    overrides = {"trainer.amp": "bf16", "trainer.channels_last": True, "trainer.grad_clip": 1.0,
                 "trainer.accum_steps": 2, "data_loader.args.batch_size": 64, "lr_scheduler": one_cycle}
    result = run("train.py", "-c", make_config(tmp_path, tiny_mnist, overrides))
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path / "saved")
    state = checkpoint.load(run_dir / "latest.pth")
    assert state["global_step"] == 14  # 896 samples / 64 = 14 batches, 7 steps per epoch, 2 epochs
    assert state["lr_scheduler"]["last_epoch"] == 14
    assert state["config"]["trainer"]["amp"] == "bf16"


TRAINING_STEPS = """
import resource, sys, torch
import torch.nn.functional as F
from model.model import MnistModel
from utils.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
torch.manual_seed(0)
model, data, target = MnistModel(), torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
def step():
    optimizer.zero_grad()
    F.nll_loss(model(data), target).backward()
    optimizer.step()
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def python(code: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_memory_stops_page_faults_between_steps():
    """With glibc's defaults a MnistModel step usually faults its activations back in (5,000-50,000 faults
    in 20 steps, seen here, but now and then its adaptive thresholds settle at 0, hence three processes);
    kept, 0-1,500."""
    faults = [int(python(TRAINING_STEPS, "keep")) for _ in range(3)]
    assert max(faults) < 3000, faults


def test_train_py_keeps_freed_memory_on_cpu(tmp_path, tiny_mnist):
    code = ("import sys, train; calls = []; train.keep_freed_memory = lambda: calls.append(1); "
            "train.main(sys.argv[1:]); print('calls', len(calls))")
    out = python(code, "-c", str(make_config(tmp_path, tiny_mnist, {"trainer.epochs": 1})), "-d", "cpu")
    assert out.splitlines()[-1] == "calls 1"


def test_train_py_freezes_start_up_objects_for_the_garbage_collector(tmp_path, tiny_mnist):
    """A full collection during training scans only what training made, not torch's 300,000 objects."""
    code = ("import gc, sys, train; from trainer.trainer import Trainer; "
            "Trainer.train = lambda self: print('frozen', gc.get_freeze_count(), 'tracked', len(gc.get_objects())) "
            "or {}; train.main(sys.argv[1:])")
    out = python(code, "-c", str(make_config(tmp_path, tiny_mnist, {"trainer.epochs": 1})), "-d", "cpu")
    _, frozen, _, tracked = next(line for line in out.splitlines() if line.startswith("frozen")).split()
    assert int(frozen) > 10 * int(tracked), out


def test_a_short_last_accumulation_group_is_averaged_over_its_own_size(tmp_path):
    """8 batches of 8 with accum_steps 3: groups of 3, 3 and 2 batches. Each step's gradient must be the
    gradient of the group's samples as one batch (lr 0 keeps the weights, so all are taken at the same point)."""
    trainer = make_trainer(tmp_path, {"accum_steps": 3}, batch_size=8, lr=0.0)
    grads, params = [], list(trainer.model.parameters())
    trainer.optimizer.register_step_pre_hook(lambda *_: grads.append([p.grad.clone() for p in params]))
    trainer.train()
    assert len(grads) == 3
    data_loader = tiny_loader(64)
    data_loader.set_epoch(1)
    ((data, target),) = list(data_loader)
    for step, (start, end) in enumerate([(0, 24), (24, 48), (48, 64)]):
        trainer.model.zero_grad()
        F.cross_entropy(trainer.model(data[start:end]), target[start:end]).backward()
        for accumulated, param in zip(grads[step], trainer.model.parameters()):
            torch.testing.assert_close(accumulated, param.grad, rtol=1e-5, atol=1e-7)


def test_an_epoch_callback_runs_after_the_epochs_checkpoint_and_its_exception_stops_the_run_there(tmp_path):
    trainer = make_trainer(tmp_path, {"epochs": 3})
    seen = []

    def callback(epoch: int, result: dict) -> None:
        seen.append((epoch, torch.load(trainer.run.latest, weights_only=True)["epoch"], "loss" in result))
        if epoch == 2:
            raise RuntimeError("stop here")

    trainer.epoch_callbacks.append(callback)
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.train()
    assert seen == [(1, 1, True), (2, 2, True)] and trainer.epoch == 2
