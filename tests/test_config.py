"""Unit tests of the config parser: defaults, overrides, lookups by role, building objects; a YAML config trains."""

import functools
import json

import pytest
import torch

from base.base_trainer import BaseTrainer
from config.files import load_file, parse_override
from config.parser import ConfigParser, diff_configs
from conftest import BASE_CONFIG, make_config, run, run_dirs
from model import loss as module_loss
from utils.errors import UserError

pytestmark = pytest.mark.quick  # the whole module: see README, Development


@pytest.fixture
def config_file(tmp_path, tiny_mnist):
    return make_config(tmp_path, tiny_mnist)


def test_defaults_are_filled_in(config_file):
    config = ConfigParser.from_file(config_file)
    assert config["lr_scheduler"] is None and config["device"] == "auto"
    assert set(config["trainer"]) == set(BaseTrainer.DEFAULTS)
    assert config["trainer"]["epochs"] == 2  # the file wins over the default
    assert config["trainer"]["amp"] == BaseTrainer.DEFAULTS["amp"]


def test_overrides_parse_yaml_values_and_may_add_args(config_file):
    config = ConfigParser.from_file(config_file, [
        "optimizer.args.lr=1e-2", "trainer.epochs=3", "optimizer.args.betas=[0.8, 0.9]", "trainer.amp=bf16",
        "lr_scheduler={type: StepLR, args: {step_size: 1}}",
    ])
    assert config["optimizer"]["args"] == {"lr": 0.01, "betas": [0.8, 0.9]}
    assert config["trainer"]["epochs"] == 3 and config["trainer"]["amp"] == "bf16"
    assert config["lr_scheduler"]["type"] == "StepLR"


def test_override_of_unknown_key_suggests_the_closest(config_file):
    with pytest.raises(UserError, match="unknown key 'trainer.epoch'.*did you mean 'epochs'"):
        ConfigParser.from_file(config_file, ["trainer.epoch=3"])


def test_json_and_yaml_give_the_same_config(tmp_path, config_file):
    import yaml

    yaml_file = tmp_path / "config.yaml"
    yaml_file.write_text(yaml.safe_dump(json.loads(config_file.read_text())))
    assert ConfigParser.from_file(yaml_file).config == ConfigParser.from_file(config_file).config


def test_numbers_written_as_papers_write_them_are_numbers_and_off_stays_false(config_file):
    config = ConfigParser.from_file(config_file, ["optimizer.args.lr=1e-3", "optimizer.args.weight_decay=5E-4"])
    assert config["optimizer"]["args"] == {"lr": 0.001, "weight_decay": 0.0005}
    assert parse_override("trainer.epochs=1e+3") == (["trainer", "epochs"], 1000.0)
    assert parse_override("trainer.tensorboard=off") == (["trainer", "tensorboard"], False)
    assert parse_override("name=1e") == (["name"], "1e")


def test_a_yaml_config_with_lr_1e_3_trains(tmp_path, config_file):
    import yaml

    text = yaml.safe_dump(json.loads(config_file.read_text())).replace("lr: 0.002", "lr: 1e-3")
    (yaml_file := tmp_path / "config.yaml").write_text(text)
    result = run("train.py", "-c", yaml_file, "-d", "cpu", "--epochs", "1")
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path / "saved")
    assert json.loads((run_dir / "config.json").read_text())["optimizer"]["args"]["lr"] == 0.001


def test_build_resolves_each_role(config_file):
    config = ConfigParser.from_file(config_file, ["lr_scheduler={type: StepLR, args: {step_size: 2}}"])
    model = config.build("arch")
    optimizer = config.build("optimizer", model.parameters())
    scheduler = config.build("lr_scheduler", optimizer)
    assert type(model).__name__ == "MnistModel"
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 0.002
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.step_size == 2
    assert config.build_loss() is module_loss.nll_loss
    assert list(config.build_metrics()) == ["accuracy"]


def test_loss_class_with_args_and_metric_with_args(tmp_path, tiny_mnist):
    path = make_config(tmp_path, tiny_mnist, {
        "loss": {"type": "CrossEntropyLoss", "args": {"label_smoothing": 0.1}},
        "metrics": ["accuracy", {"type": "top_k_acc", "args": {"k": 2}}],
    })
    config = ConfigParser.from_file(path)
    loss = config.build_loss()
    assert isinstance(loss, torch.nn.CrossEntropyLoss) and loss.label_smoothing == 0.1
    metrics = config.build_metrics()
    assert isinstance(metrics["top_k_acc"], functools.partial) and metrics["top_k_acc"].keywords == {"k": 2}
    output, target = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.0, 0.1]]), torch.tensor([2, 1])
    assert metrics["top_k_acc"](output, target).item() == 0.5  # 2 is in row 0's top 2, 1 is not in row 1's


def test_dotted_path_names_any_importable_callable(tmp_path, tiny_mnist):
    path = make_config(tmp_path, tiny_mnist, {"optimizer": {"type": "torch.optim.SGD", "args": {"lr": 0.1}}})
    config = ConfigParser.from_file(path)
    assert isinstance(config.build("optimizer", torch.nn.Linear(2, 2).parameters()), torch.optim.SGD)


def test_unknown_type_lists_the_closest_names(tmp_path, tiny_mnist):
    path = make_config(tmp_path, tiny_mnist, {"optimizer": {"type": "Adma", "args": {}}})
    with pytest.raises(UserError, match=r"optimizer.type: unknown optimizer type 'Adma' \(did you mean 'Adam'\?\)"):
        ConfigParser.from_file(path)


def test_args_are_checked_against_the_signature(tmp_path, tiny_mnist):
    path = make_config(tmp_path, tiny_mnist, {"data_loader.args.batch_sise": 3})
    with pytest.raises(UserError, match="unknown argument 'batch_sise'.*did you mean 'batch_size'"):
        ConfigParser.from_file(path)


def test_monitor_must_name_a_logged_metric(tmp_path, tiny_mnist):
    path = make_config(tmp_path, tiny_mnist, {"trainer.monitor": "max val_acuracy"})
    with pytest.raises(UserError, match="'val_acuracy' is never logged.*did you mean 'val_accuracy'"):
        ConfigParser.from_file(path)


def test_diff_configs_lists_changed_leaves():
    old = {"a": 1, "b": {"c": 2, "d": 3}}
    new = {"a": 1, "b": {"c": 5, "d": 3}, "e": True}
    assert diff_configs(old, new) == ["b.c: 2 -> 5", "e: '<absent>' -> True"]


def test_shipped_configs_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "configs").glob("*.json")) + sorted((root / "configs").glob("*.yaml"))
    assert files
    for path in files:
        raw = load_file(path)
        assert raw["name"], path
        ConfigParser.from_dict(raw, str(path))  # raises on any problem


def test_base_config_has_every_required_top_level_key():
    from config.schema import REQUIRED, TOP_LEVEL

    assert {k for k, v in TOP_LEVEL.items() if v is REQUIRED} <= set(BASE_CONFIG)


# ---- kinds: what a role's `type` may name, checked before anything is called ------------------------------
@pytest.mark.parametrize("role,spec,message", [
    ("arch", {"type": "os.system", "args": {"command": "true"}}, "'os.system' is not a model (an nn.Module)"),
    ("arch", {"type": "torch.optim.SGD", "args": {}}, "'torch.optim.SGD' is not a model (an nn.Module)"),
    ("optimizer", {"type": "torch.nn.Linear", "args": {}}, "is not an optimizer (a torch.optim.Optimizer)"),
    ("data_loader.type", "read_image", "unknown data_loader type 'read_image'"),
    ("lr_scheduler", {"type": "torch.optim.Adam", "args": {}}, "is not an LR scheduler"),
    ("loss", {"type": "builtins.len"}, "'builtins.len' is not a function or class"),
    ("loss", {"type": "data_loader.datasets.read_idx"}, "cannot be called with (output, target)"),
    ("metrics", [{"type": "collections.OrderedDict"}], "is a class whose objects cannot be called"),
])
def test_a_type_of_the_wrong_kind_is_refused_before_it_is_called(tmp_path, tiny_mnist, role, spec, message):
    path = make_config(tmp_path, tiny_mnist, {role: spec})
    with pytest.raises(UserError, match=re_escape(message)):
        ConfigParser.from_file(path)


def test_a_function_result_of_the_wrong_kind_is_refused_after_the_call(tmp_path, tiny_mnist):
    path = make_config(tmp_path, tiny_mnist, {"arch": {"type": "copy.deepcopy", "args": {"x": 1}}})
    config = ConfigParser.from_file(path)
    with pytest.raises(UserError, match="arch: copy.deepcopy returned int, not a model"):
        config.build("arch")


def test_a_model_factory_in_model_py_is_found_when_annotated(monkeypatch, tmp_path, tiny_mnist):
    """`def resnet34(...) -> nn.Module` in a role module is a type; an unannotated helper is not listed."""
    import model.model as models

    def tiny_net(width: int = 4) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, width))

    def helper(x):
        return x

    tiny_net.__module__ = helper.__module__ = "model.model"
    monkeypatch.setattr(models, "tiny_net", tiny_net, raising=False)
    monkeypatch.setattr(models, "helper", helper, raising=False)
    config = ConfigParser.from_file(make_config(tmp_path, tiny_mnist, {"arch": {"type": "tiny_net", "args": {}}}))
    assert isinstance(config.build("arch"), torch.nn.Sequential)
    with pytest.raises(UserError, match=r"unknown arch type 'helper'; available: MnistModel, tiny_net \('helper' in "
                                         r"model.model is not listed for arch: .* dotted path, 'model.model.helper'"):
        ConfigParser.from_file(make_config(tmp_path, tiny_mnist, {"arch": {"type": "helper", "args": {}}}))


def test_restricted_configs_name_only_trusted_modules(tmp_path, tiny_mnist):
    raw = json.loads(make_config(tmp_path, tiny_mnist).read_text())
    for spec in ({"type": "torchvision.models.resnet18", "args": {"num_classes": 10}},
                 {"type": "torch.nn.Linear", "args": {"in_features": 784, "out_features": 10}}):
        ConfigParser.from_dict({**raw, "arch": spec}, "ckpt", restricted=True)
    for name in ("collections.OrderedDict", "json.JSONDecoder", "nosuch.Module"):
        with pytest.raises(UserError, match=f"'{name}' is not trusted in a checkpoint's config"):
            ConfigParser.from_dict({**raw, "arch": {"type": name}}, "ckpt", restricted=True)
    with pytest.raises(UserError, match="'torch.optim.optimizer.deepcopy' is not trusted in a checkpoint's config: "
                                         "it is a function of copy; optimizer may name only: a class of"):
        ConfigParser.from_dict({**raw, "optimizer": {"type": "torch.optim.optimizer.deepcopy", "args": {"x": 1}}},
                               "ckpt", restricted=True)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)
