"""The extension contract, as users meet it: a trainer class chosen by the config, batches of any
structure, steps that return what they log, stateful losses, several models and optimizers (the GAN
and VAE examples), iteration-based epochs. Each trains as a real process, `test.py -r` evaluates it, and
stop-at-epoch-1 + resume gives the uninterrupted run's state exactly."""

import pytest
import torch

from config.parser import ConfigParser
from conftest import ROOT, make_config, run, run_dirs
from test_checkpoints import assert_same_state
from test_examples import tensorboard_contents
from utils.errors import UserError

ENV = {"PYTHONPATH": str(ROOT / "tests")}  # plugin_indexed.py: a project outside this one

GAN = {
    "arch": {"generator": {"type": "model.gan.Generator", "args": {"latent_dim": 16}},
             "discriminator": {"type": "model.gan.Discriminator", "args": {}}},
    "data_loader.args.normalize": False, "data_loader.args.batch_size": 64,
    "optimizer": {"generator": {"type": "Adam", "args": {"lr": 0.0002, "betas": [0.5, 0.999]}},
                  "discriminator": {"type": "Adam", "args": {"lr": 0.0002, "betas": [0.5, 0.999]}}},
    "lr_scheduler": {"generator": {"type": "StepLR", "args": {"step_size": 1, "gamma": 0.5}}},
    "loss": "BCEWithLogitsLoss", "metrics": [],
    "trainer": {"type": "GanTrainer", "monitor": "min val_loss_d", "log_step": 5, "samples": 16},
}
VAE = {"arch": {"type": "model.vae.VAE", "args": {"latent_dim": 4, "hidden": 64}},
       "data_loader.args.normalize": False, "loss": "model.vae.VAELoss", "metrics": [],
       "trainer": {"type": "VaeTrainer", "monitor": "min val_recon", "log_step": 5}}
PLUGIN = {"data_loader": {"type": "plugin_indexed.IndexedDataLoader", "args": {"batch_size": 64}},
          "loss": {"type": "plugin_indexed.HistoryLoss", "args": {"num_samples": 1024}},
          "trainer": {"type": "plugin_indexed.IndexedTrainer", "monitor": "max val_agreement", "log_step": 5}}
EXAMPLES = {"gan": GAN, "vae": VAE, "plugin": PLUGIN}


def config_for(tmp_path, tiny_mnist, example: str, epochs: int, name: str = "config.json", **extra):
    overrides = dict(EXAMPLES[example])
    if example == "plugin":
        overrides["data_loader"] = {**PLUGIN["data_loader"], "args": {**PLUGIN["data_loader"]["args"],
                                                                      "data_dir": str(tiny_mnist)}}
    overrides["trainer"] = {**overrides["trainer"], "epochs": epochs, "save_dir": str(tmp_path / "saved"), **extra}
    tmp_path.mkdir(parents=True, exist_ok=True)
    return make_config(tmp_path, tiny_mnist, overrides, name)


@pytest.fixture(scope="module", params=["gan", pytest.param("vae", marks=pytest.mark.slow), "plugin"])
def example(request, tmp_path_factory, tiny_mnist):
    """(name, uninterrupted 2-epoch run, the same run stopped after epoch 1 and resumed, their outputs)."""
    name, tmp_path = request.param, tmp_path_factory.mktemp(request.param)
    full = run("train.py", "-c", config_for(tmp_path / "full", tiny_mnist, name, 2), env=ENV)
    assert full.returncode == 0, full.stderr
    first = run("train.py", "-c", config_for(tmp_path / "stopped", tiny_mnist, name, 1), env=ENV)
    assert first.returncode == 0, first.stderr
    (stopped,) = run_dirs(tmp_path / "stopped" / "saved")
    resumed = run("train.py", "-r", stopped, "--epochs", "2", "--trust-config", env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    (uninterrupted,) = run_dirs(tmp_path / "full" / "saved")
    return name, uninterrupted, stopped, full.stdout


def test_stop_and_resume_gives_the_uninterrupted_state(example):
    """Every model, optimizer, scheduler and the loss's own state: torch.equal."""
    name, uninterrupted, resumed, _ = example
    a, b = (torch.load(d / "latest.pth", weights_only=True) for d in (uninterrupted, resumed))
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"] > 0
    for key in a.keys() - {"config"}:
        assert_same_state(a[key], b[key], key)
    if name == "plugin":
        history = a["criterion"]["history"]
        assert not torch.allclose(history, torch.full_like(history, 0.1))  # the loss's state moved: it is tested
    if name == "gan":
        assert a["optimizer"].keys() == {"generator", "discriminator"} and a["lr_scheduler"].keys() == {"generator"}


def test_each_logs_what_its_step_returns(example):
    name, run_dir, _, stdout = example
    logged = {"gan": ["loss_d", "loss_g", "val_loss_d", "lr_generator", "lr_discriminator"],
              "vae": ["recon", "kl", "val_recon", "val_kl"],
              "plugin": ["agreement", "brightness", "accuracy", "val_agreement", "val_brightness", "val_accuracy"]}
    epoch_line = next(line for line in stdout.splitlines() if line.startswith("epoch 2/2"))
    for key in logged[name]:
        assert f" {key} " in epoch_line, (key, epoch_line)
    shown = tensorboard_contents(run_dir)
    assert shown["hparams"]["trainer.type"].string_value == {"gan": "GanTrainer", "vae": "VaeTrainer",
                                                             "plugin": "plugin_indexed.IndexedTrainer"}[name]
    if name == "gan":
        assert shown["images"] == {"samples": 2}  # a grid of generated images each epoch


def test_test_py_evaluates_with_the_trainers_valid_step(example):
    name, run_dir, _, _ = example
    result = run("test.py", "-r", run_dir / "latest.pth", "--trust-config", env=ENV)
    assert result.returncode == 0, result.stderr
    expected = {"gan": ["loss_d:", "loss_g:"], "vae": ["recon:", "kl:"], "plugin": ["agreement:", "accuracy:"]}
    for fragment in expected[name]:
        assert fragment in result.stdout, result.stdout


# ---- iteration-based epochs and the validation period ---------------------------------------------------
def test_len_epoch_draws_from_an_endless_stream_and_resumes_exactly(tmp_path, tiny_mnist):
    """28 batches a pass, 10 an epoch: epoch 3 crosses into the second pass; stopped after epoch 1 it resumes
    to the same weights."""
    options = {"trainer.len_epoch": 10, "trainer.tensorboard": False, "trainer.valid_period": 2}
    runs = {}
    for label, epochs in (("full", 3), ("stopped", 1)):
        config = make_config(tmp_path, tiny_mnist, {**options, "trainer.epochs": epochs,
                                                    "trainer.save_dir": str(tmp_path / label)}, f"{label}.json")
        result = run("train.py", "-c", config)
        assert result.returncode == 0, result.stderr
        (runs[label],) = run_dirs(tmp_path / label)
    result = run("train.py", "-r", runs["stopped"], "--epochs", "3")
    assert result.returncode == 0, result.stderr
    a, b = (torch.load(d / "latest.pth", weights_only=True) for d in runs.values())
    assert a["global_step"] == b["global_step"] == 30
    assert_same_state(a["model"], b["model"], "model")
    log = (runs["full"] / "train.log").read_text().splitlines()
    epochs = [line.partition("epoch ")[2] for line in log if " epoch " in line and "/3 " in line]
    assert ["val_loss" in line for line in epochs] == [False, True, True]  # every 2nd epoch, and the last


# ---- what goes wrong gets one line, at the first batch ------------------------------------------------------
def build(tmp_path, tiny_mnist, overrides: dict, trainer_class=None):
    config = ConfigParser.from_file(make_config(tmp_path, tiny_mnist, {"trainer.epochs": 1, "trainer.tensorboard":
                                                                       False, **overrides}))
    from runs.run import Run

    device = torch.device("cpu")
    config.callables["trainer"] = trainer_class or config.callables["trainer"]
    return config.build_trainer(device, config.build("data_loader", seed=1), run=Run(config, device, tmp_path))


def float_accuracy(output, target):
    return (output.argmax(1) == target).float().mean().item()


@pytest.mark.parametrize("change, message", [
    ({"metrics": [{"type": "test_extensions.float_accuracy"}]},
     "metric 'float_accuracy' returned float"),
])
def test_a_metric_of_the_wrong_kind_stops_at_the_first_batch(tmp_path, tiny_mnist, change, message):
    trainer = build(tmp_path, tiny_mnist, {**change, "trainer.monitor": "off"})
    with pytest.raises(UserError, match=message):
        trainer.train()
    assert trainer.global_step == 0


@pytest.mark.parametrize("returned, message", [
    (lambda result: (result["loss"], result["output"]), "Wrong.train_step returned tuple"),
    (lambda result: {"output": result["output"]}, "expected a mapping with a 'loss' tensor"),
    (lambda result: {**result, "loss": 1.5}, "expected a mapping with a 'loss' tensor"),
    (lambda result: {**result, "extra": result["output"]}, "Wrong.train_step['extra'] returned a tensor of shape"),
])
def test_a_step_that_returns_the_wrong_kind_stops_at_the_first_batch(tmp_path, tiny_mnist, returned, message):
    from trainer.trainer import Trainer

    class Wrong(Trainer):
        def train_step(self, batch):
            return returned(super().train_step(batch))

    trainer = build(tmp_path, tiny_mnist, {}, Wrong)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        trainer.train()


def test_old_and_classic_overrides_are_refused_with_the_fix(tmp_path, tiny_mnist):
    from trainer.trainer import Trainer

    class OldStep(Trainer):
        def train_step(self, data, target):
            return super().train_step((data, target))

    class ClassicEpoch(Trainer):
        def _train_epoch(self, epoch):
            return {}

    with pytest.raises(UserError, match="OldStep.train_step must take one argument, the batch"):
        build(tmp_path, tiny_mnist, {}, OldStep)
    with pytest.raises(UserError, match="ClassicEpoch overrides _train_epoch: the loop validates"):
        build(tmp_path, tiny_mnist, {}, ClassicEpoch)


def test_batches_of_any_structure_reach_the_device_whole():
    from trainer.trainer import to_device

    batch = {"x": torch.zeros(2, 3, 4, 4), "pair": (torch.ones(2), [torch.zeros(1)]), "name": "a"}
    moved = to_device(batch, torch.device("cpu"), torch.channels_last)
    assert moved["x"].is_contiguous(memory_format=torch.channels_last)
    assert isinstance(moved["pair"], tuple) and isinstance(moved["pair"][1], list) and moved["name"] == "a"
