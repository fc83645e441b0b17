"""Values from the data ("${data.num_classes}") and project-wide values ("${vars.n_classes}") in a config's args."""

import re

import pytest
import torch

from base import BaseDataLoader
from config.parser import ConfigParser
from conftest import make_config, run, run_dirs
from utils.errors import UserError

CPU = torch.device("cpu")
FROM_DATA = {"vars": {"n_classes": "${data.num_classes}", "k": 2, "lr": 0.002},
             "arch.args.num_classes": "${vars.n_classes}", "optimizer.args.lr": "${vars.lr}",
             "loss": {"type": "nll_loss", "args": {"weight": "${data.class_weights}"}},
             "metrics": ["accuracy", {"type": "top_k_acc", "args": {"k": "${vars.k}"}}]}


def parse(tmp_path, tiny_mnist, overrides: dict, sets: list[str] = ()) -> ConfigParser:
    return ConfigParser.from_file(make_config(tmp_path, tiny_mnist, overrides), sets)


def build(config: ConfigParser):
    return config.build_trainer(CPU, config.build_data_loader(CPU))


def same(a, b) -> bool:
    """Equal state dicts: every tensor bit for bit."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_references_keep_their_type_and_the_config_keeps_them_as_written(tmp_path, tiny_mnist):
    config = parse(tmp_path, tiny_mnist, FROM_DATA)
    trainer = build(config)
    assert trainer.model.fc2.out_features == 10 and trainer.data_loader.in_channels == 1
    weight = trainer.criterion.keywords["weight"]
    assert weight.dtype == torch.float32 and weight.shape == (10,) and torch.isclose(weight.mean(), torch.tensor(1.0))
    assert trainer.metric_fns["top_k_acc"].keywords == {"k": 2} and trainer.optimizer.param_groups[0]["lr"] == 0.002
    assert config.data_values["num_classes"] == 10 and torch.equal(config.data_values["class_weights"], weight)
    assert config.config["arch"]["args"]["num_classes"] == "${vars.n_classes}"  # what config.json and checkpoints hold


def test_a_loss_class_gets_the_weights_as_its_buffer(tmp_path, tiny_mnist):
    config = parse(tmp_path, tiny_mnist, {"arch.args.num_classes": "${data.num_classes}",
                                          "loss": {"type": "NLLLoss", "args": {"weight": "${data.class_weights}"}}})
    assert torch.equal(build(config).criterion.weight, config.data_values["class_weights"])


def test_set_may_give_a_reference_and_a_new_var(tmp_path, tiny_mnist):
    config = parse(tmp_path, tiny_mnist, {}, ["arch.args.num_classes=${data.num_classes}", "vars.k=1",
                                              "metrics=[{type: top_k_acc, args: {k: '${vars.k}'}}]"])
    assert config["arch"]["args"]["num_classes"] == "${data.num_classes}" and config["metrics"][0]["args"]["k"] == 1
    assert build(config).model.fc2.out_features == 10


@pytest.mark.parametrize("overrides,message", [
    ({"arch.args.num_classes": "${vars.n_clases}", "vars": {"n_classes": 10}},
     "config.json: arch.args.num_classes: \"${vars.n_clases}\": the config has no 'vars.n_clases' "
     "(did you mean 'n_classes'?)"),
    ({"arch.args.num_classes": "${data._labels}"}, "plain names, none starting with '_'"),
    ({"arch.args.num_classes": "${data.x.y}"}, "names one attribute of the data loader"),
    ({"arch.args.num_classes": "n${vars.n}"}, "a reference is the whole value"),
    ({"data_loader.args.batch_size": "${data.num_classes}"}, "only the args of arch, loss, metrics, optimizer"),
    ({"trainer.epochs": "${vars.n}", "vars": {"n": 1}}, "references may stand only in the args of"),
    ({"vars": {"a": "${vars.b}", "b": "${vars.a}"}}, "the references form a cycle (vars.b -> vars.a -> vars.b)"),
    ({"vars": 3}, "vars: expected a mapping"),
    ({"vars": {"a0": 1, **{f"a{i + 1}": [f"${{vars.a{i}}}"] * 2 for i in range(20)}}},
     "with its references filled in, the config holds more than 10,000 values"),
])
def test_a_bad_config_reference_is_refused_before_anything_is_built(tmp_path, tiny_mnist, overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse(tmp_path, tiny_mnist, overrides)


@pytest.mark.parametrize("name,message", [
    ("num_clases", "arch.args.num_classes: \"${data.num_clases}\": the data loader (MnistDataLoader) has no attribute "
                   "'num_clases' (did you mean 'num_classes'?); it has: n_samples, num_classes, in_channels, "
                   "class_weights, "),
    ("batches", "'batches' of the data loader (MnistDataLoader) is a method"),
    ("dataset", "'dataset' of the data loader (MnistDataLoader) is of type InMemoryImages"),
])
def test_a_data_reference_reads_only_plain_attributes(tmp_path, tiny_mnist, name, message):
    config = parse(tmp_path, tiny_mnist, {"arch.args.num_classes": f"${{data.{name}}}"})
    with pytest.raises(UserError, match=re.escape(message)):
        build(config)


class Labelled(torch.utils.data.Dataset):
    """Images of one channel whose labels are `labels`; `targets` only with `with_targets` (else read per sample)."""

    def __init__(self, labels: list[int], with_targets: bool):
        self.labels = torch.tensor(labels)
        if with_targets:
            self.targets = self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple:
        return torch.zeros(3, 4, 4), self.labels[i]


@pytest.mark.parametrize("with_targets", [True, False])
def test_class_weights_count_the_training_samples_only(with_targets):
    labels = [0] * 12 + [1] * 4 + [2] * 4 + [3] * 2
    loader = BaseDataLoader(Labelled(labels, with_targets), batch_size=4, validation_split=6, seed=3)
    train = torch.tensor(labels)[loader.indices]
    counts = torch.bincount(train, minlength=4).float()
    expected = torch.where(counts > 0, 1 / counts, 0.0)
    assert loader.num_classes == int(train.max()) + 1 and loader.in_channels == 3
    assert torch.allclose(loader.class_weights, expected[: loader.num_classes] / expected[: loader.num_classes].mean())
    assert torch.isclose(loader.class_weights.mean(), torch.tensor(1.0))


def test_a_torchvision_dataset_without_targets_offers_them_too():
    from data_loader.data_loaders import TorchvisionDataLoader

    loader = TorchvisionDataLoader("FakeData", dataset_args={"size": 24, "image_size": [3, 8, 8], "num_classes": 4},
                                   num_workers=0, validation_split=4)
    labels = torch.tensor([int(loader.dataset[int(i)][1]) for i in loader.indices])
    assert loader.in_channels == 3 and loader.num_classes == int(labels.max()) + 1
    assert loader.class_weights.shape == (loader.num_classes,)
    assert torch.isclose(loader.class_weights.mean(), torch.tensor(1.0))


def test_resume_with_references_is_exact_and_test_and_predict_use_the_recorded_values(tmp_path, tiny_mnist):
    config = make_config(tmp_path, tiny_mnist, {**FROM_DATA, "trainer.epochs": 2,
                                                "lr_scheduler": {"type": "StepLR", "args": {"step_size": 1}}})
    straight = tmp_path / "straight"
    assert run("train.py", "-c", config, "--set", f"trainer.save_dir={straight}").returncode == 0
    first = run("train.py", "-c", config, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    resumed = run("train.py", "-r", run_dirs(tmp_path / "saved")[0], "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr
    a, b = (torch.load(run_dirs(root)[0] / "latest.pth", weights_only=True) for root in (straight, tmp_path / "saved"))
    assert b["config"]["arch"]["args"]["num_classes"] == "${vars.n_classes}" and b["data_values"]["num_classes"] == 10
    assert a["optimizer"]["state"] and same(a["model"], b["model"]) and same(a["optimizer"], b["optimizer"])
    latest = run_dirs(tmp_path / "saved")[0] / "latest.pth"
    assert run("test.py", "-r", latest).returncode == 0
    assert run("predict.py", "-r", latest).returncode == 0


def test_a_bad_reference_on_the_command_line_is_one_line_and_no_run_directory(tmp_path, tiny_mnist):
    result = run("train.py", "-c", make_config(tmp_path, tiny_mnist), "--set",
                 "arch.args.num_classes=${data.num_clases}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "has no attribute 'num_clases' (did you mean 'num_classes'?)" in result.stderr
    assert not run_dirs(tmp_path / "saved")
