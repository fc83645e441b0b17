"""The template's extension points, each proven by its example: a new project, an image folder with
a torchvision model, a custom loss and metric, a YAML config, step hooks, TensorBoard extras, seeding."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import new_project
from config.parser import ConfigParser
from conftest import ROOT, make_config, read_test_results, run, run_dirs, write_image_folder
from model.loss import focal_loss
from model.metric import true_class_prob
from runs.run import Run
from trainer.trainer import Trainer
from utils.cli import run_main
from utils.errors import UserError


def touch(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def files_under(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# ---- new_project.py -------------------------------------------------------------------------------
def test_copy_leaves_out_runs_caches_data_and_vcs(tmp_path):
    source, target = tmp_path / "source", tmp_path / "copy"
    kept = ["train.py", "model/model.py", "tests/test_smoke.py", ".ci/run", ".gitignore", "saved/.gitkeep",
            "data/mnist_small/MNIST/raw/train-images-idx3-ubyte.gz"]
    left_out = [".git/HEAD", "saved/mnist/20260101-000000/latest.pth", "model/__pycache__/model.cpython-312.pyc",
                ".pytest_cache/v/cache", ".ruff_cache/0.6/x", "data/MNIST/raw/train-images-idx3-ubyte.gz",
                "data/cifar-10-python.tar.gz", "data/mnist_small/MNIST/raw/train-images-idx3-ubyte", "stale.pyc"]
    for name in kept + left_out:
        touch(source / name)

    new_project.copy_project(source, target)
    assert files_under(target) == set(kept)

    with pytest.raises(UserError, match="already exists and is not an empty folder"):
        new_project.copy_project(source, target)
    with pytest.raises(UserError, match="must be outside this one"):
        new_project.copy_project(source, source / "inside")


def test_new_project_copy_trains_and_an_existing_target_is_refused(tmp_path, tiny_mnist, capsys):
    target = tmp_path / "MyProject"
    result = run("new_project.py", target)
    assert result.returncode == 0, result.stderr
    assert {"train.py", "test.py", "configs/mnist.json", "saved/.gitkeep", ".ci/run", "tests/conftest.py"} <= (
        files_under(target))
    assert not [p for p in files_under(target) if p.startswith((".git/", "saved/mnist")) or "__pycache__" in p]

    config = make_config(tmp_path, tiny_mnist, {"trainer.epochs": 1, "trainer.tensorboard": False})
    trained = subprocess.run([sys.executable, "train.py", "-c", str(config)], cwd=target, capture_output=True,
                             text=True, timeout=300, env={**os.environ, "CI": "true", "PYTHONPATH": ""})
    assert trained.returncode == 0, trained.stderr
    assert (run_dirs(tmp_path / "saved")[0] / "latest.pth").is_file()

    with pytest.raises(SystemExit) as stopped:
        run_main(lambda: new_project.main([str(target)]))
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"error: {target}: already exists and is not an empty folder; choose a new path\n"


# ---- an image folder with a torchvision model --------------------------------------------------------
@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "images")


@pytest.mark.slow
def test_image_folder_with_torchvision_resnet(tmp_path, image_folder):
    save_dir = tmp_path / "saved"
    result = run("train.py", "-c", ROOT / "configs/image_folder.json", "--epochs", "1", "--bs", "8",
                 "--set", f"data_loader.args.data_dir={image_folder}", "data_loader.args.image_size=32",
                 f"trainer.save_dir={save_dir}", "trainer.tensorboard=false", "trainer.save_period=0")
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(save_dir, "image_folder")
    assert "val_accuracy" in (run_dir / "train.log").read_text()
    assert "fc.weight" in torch.load(run_dir / "latest.pth", weights_only=True)["model"]  # a torchvision ResNet

    result = run("test.py", "-r", run_dir / "latest.pth")
    assert result.returncode == 0, result.stderr
    assert read_test_results(run_dir)[-1]["samples"] == 8  # the test/ folder


def test_image_folder_problems_name_the_folder_or_file(tmp_path):
    config = ConfigParser.from_file(ROOT / "configs/image_folder.json", [
        f"data_loader.args.data_dir={tmp_path}", "data_loader.args.num_workers=0", "data_loader.args.batch_size=1"])
    with pytest.raises(UserError, match=f"image folder not found: {tmp_path / 'train'} "):
        config.build("data_loader")
    (tmp_path / "train" / "cats").mkdir(parents=True)
    with pytest.raises(UserError, match=f"data_loader: {tmp_path / 'train'}: .*no valid file"):
        config.build("data_loader")
    touch(tmp_path / "train" / "cats" / "broken.png", "not an image")
    # the first image is read at start-up, where the transforms are tried on it
    broken = tmp_path / "train" / "cats" / "broken.png"
    with pytest.raises(UserError, match=f"data_loader: {broken}: cannot read image"):
        config.build("data_loader")


def test_an_unreadable_image_read_by_a_worker_is_one_line_before_the_run_starts(tmp_path, image_folder):
    """The first-batch check reads every image here (one batch holds them all), in DataLoader workers."""
    touch(image_folder / "train" / "dark" / "broken.png", "not an image")
    save_dir = tmp_path / "saved"
    result = run("train.py", "-c", ROOT / "configs/image_folder.json", "--bs", "64", "--set",
                 f"data_loader.args.data_dir={image_folder}", "data_loader.args.image_size=32",
                 "data_loader.args.drop_last=false", f"trainer.save_dir={save_dir}")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {ROOT / 'configs/image_folder.json'}: the first training batch fails: "
                           f"{image_folder / 'train' / 'dark' / 'broken.png'}: cannot read image: "), line
    assert not save_dir.exists()


# ---- a custom loss and metric ------------------------------------------------------------------------
def test_focal_loss_and_true_class_prob():
    logits = torch.tensor([[4.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    target = torch.tensor([0, 1, 1])
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0), F.cross_entropy(logits, target))
    assert focal_loss(logits, target, gamma=2.0) < F.cross_entropy(logits, target)
    easy = focal_loss(logits[:1], target[:1], gamma=2.0) / F.cross_entropy(logits[:1], target[:1])
    hard = focal_loss(logits[2:], target[2:], gamma=2.0) / F.cross_entropy(logits[2:], target[2:])
    assert easy < 0.001 < 0.5 < hard  # confident right answers are scaled down far more than wrong ones

    probs = logits.softmax(dim=1)
    expected = (probs[0, 0] + probs[1, 1] + probs[2, 1]) / 3
    torch.testing.assert_close(true_class_prob(logits, target), expected)
    torch.testing.assert_close(true_class_prob(logits.log_softmax(dim=1), target), expected)


def test_custom_loss_and_metric_config_trains(tmp_path, tiny_mnist):
    save_dir = tmp_path / "saved"
    result = run("train.py", "-c", ROOT / "configs/mnist_focal.json", "--epochs", "1", "--set",
                 f"data_loader.args.data_dir={tiny_mnist}", f"trainer.save_dir={save_dir}", "trainer.tensorboard=false")
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(save_dir, "mnist_focal")
    assert "val_true_class_prob" in (run_dir / "train.log").read_text()
    best = torch.load(run_dir / "model_best.pth", weights_only=True)  # monitored: max val_true_class_prob
    assert 0 < best["monitor_best"] < 1


# ---- a YAML config -----------------------------------------------------------------------------------
def test_yaml_config_is_the_json_one():
    yaml_config = ConfigParser.from_file(ROOT / "configs/mnist.yaml").config
    assert yaml_config == ConfigParser.from_file(ROOT / "configs/mnist.json").config


# ---- step hooks: a subclass changes the step, the loop stays the base's -------------------------------
def test_trainer_subclass_overrides_the_steps(tmp_path, tiny_mnist):
    overrides = {"trainer.epochs": 1, "trainer.tensorboard": False}
    config = ConfigParser.from_file(make_config(tmp_path, tiny_mnist, overrides))
    device = torch.device("cpu")
    data_loader = config.build_data_loader(device)

    class FrozenTrainer(Trainer):
        """Returns a zero loss: if the loop backpropagates what the hook returns, nothing learns."""

        train_calls = valid_calls = 0

        def train_step(self, batch):
            self.train_calls += 1
            result = super().train_step(batch)
            return {**result, "loss": result["loss"] * 0}

        def valid_step(self, batch):
            self.valid_calls += 1
            return super().valid_step(batch)

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config.callables["trainer"] = FrozenTrainer
    trainer = config.build_trainer(device, data_loader, run=Run(config, device, run_dir))
    model, valid_data_loader = trainer.model, trainer.valid_data_loader
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = trainer.train()

    assert trainer.train_calls == trainer.global_step == len(data_loader)
    assert trainer.valid_calls == len(valid_data_loader)
    assert result["loss"] == 0 and result["val_loss"] > 0  # training logs the hook's loss
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {"latest.pth", "checkpoint-epoch1.pth"} <= {p.name for p in run_dir.iterdir()}


# ---- TensorBoard beyond scalars ----------------------------------------------------------------------
def tensorboard_contents(run_dir) -> dict:
    """{'images'|'histograms': {tag: how many logged}, 'hparams': {name: value}} of a run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "histograms": 0}).Reload()
    hparams = {}
    for content in events.PluginTagToContent("hparams").values():
        hparams.update(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)
    return {"images": {tag: len(events.Images(tag)) for tag in events.Tags()["images"]},
            "histograms": {tag: len(events.Histograms(tag)) for tag in events.Tags()["histograms"]},
            "hparams": hparams}


def test_tensorboard_images_histograms_and_hparams_only_when_asked(tmp_path, tiny_mnist):
    on = make_config(tmp_path, tiny_mnist, {"trainer.tb_images": 1, "trainer.tb_histograms": 2,
                                            "trainer.save_dir": str(tmp_path / "on")})
    off = make_config(tmp_path, tiny_mnist, {"trainer.epochs": 1, "trainer.save_dir": str(tmp_path / "off")},
                      name="off.json")
    for config in (on, off):
        result = run("train.py", "-c", config)
        assert result.returncode == 0, result.stderr

    (on_dir,), (off_dir,) = run_dirs(tmp_path / "on"), run_dirs(tmp_path / "off")
    shown = tensorboard_contents(on_dir)
    assert shown["images"] == {"inputs": 2}  # every epoch of 2
    histograms = {"params/conv1.weight", "grads/conv1.weight", "params/fc2.bias", "grads/fc2.bias"}
    assert histograms <= set(shown["histograms"])
    assert {shown["histograms"][tag] for tag in histograms} == {1}  # every 2nd epoch of 2
    assert shown["hparams"]["optimizer.args.lr"].number_value == pytest.approx(0.002)
    assert shown["hparams"]["trainer.tb_images"].number_value == 1

    quiet = tensorboard_contents(off_dir)
    assert quiet["images"] == {} and quiet["histograms"] == {}
    assert quiet["hparams"]["optimizer.type"].string_value == "Adam"  # the HParams view is always there


# ---- seed and deterministic --------------------------------------------------------------------------
@pytest.mark.slow
def test_deterministic_runs_with_one_seed_give_the_same_weights(tmp_path, tiny_mnist):
    weights = {}
    for label, seed in (("a", 3), ("b", 3), ("c", 4)):
        save_dir = tmp_path / label
        result = run("train.py", "-c", ROOT / "configs/mnist.yaml", "--epochs", "1", "--set",
                     f"data_loader.args.data_dir={tiny_mnist}", f"trainer.save_dir={save_dir}",
                     "trainer.tensorboard=false", "deterministic=true", f"seed={seed}")
        assert result.returncode == 0, result.stderr
        (run_dir,) = run_dirs(save_dir, "mnist")
        weights[label] = torch.load(run_dir / "latest.pth", weights_only=True)["model"]
        assert json.loads((run_dir / "config.json").read_text())["deterministic"] is True

    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])
