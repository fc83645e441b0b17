"""Datasets and augmentation from the config (issue 15): any torchvision dataset by name, train/eval transform
pipelines checked at start-up, batched on-device augmentation for in-memory MNIST, exact resume with both."""

import gzip
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from config.parser import ConfigParser
from conftest import ROOT, make_config, run, run_dirs, write_image_folder
from data_loader.augment import BatchAugment
from data_loader.data_loaders import MnistDataLoader, TorchvisionDataLoader
from utils.errors import UserError

ENV = {"OMP_NUM_THREADS": "1"}
TO_FLOAT = [{"type": "ToImage"}, {"type": "ToDtype", "args": {"dtype": "float32", "scale": True}},
            {"type": "Normalize", "args": {"mean": [0.5], "std": [0.5]}}]
AUGMENT = [{"type": "RandomCrop", "args": {"size": 28, "padding": 2}}, {"type": "RandomHorizontalFlip"}]
TRANSFORMS = {"train": AUGMENT + TO_FLOAT, "eval": TO_FLOAT}


def fake_data(**args) -> dict:
    """The data_loader entry for 160 + 32 random 1x28x28 images of torchvision's FakeData, with augmentation."""
    return {"type": "TorchvisionDataLoader", "args": {
        "dataset": "FakeData", "dataset_args": {"size": 192, "image_size": [1, 28, 28], "num_classes": 10},
        "test_args": {"random_offset": 10_000}, "transforms": TRANSFORMS, "batch_size": 16, "validation_split": 32,
        "num_workers": 0, **args}}


def config_dict(data_loader: dict) -> dict:
    return {"name": "t", "arch": {"type": "MnistModel"}, "optimizer": {"type": "Adam"}, "loss": "nll_loss",
            "data_loader": data_loader, "trainer": {"monitor": "off"}}


def train_and_resume(tmp_path, data_dir, overrides: dict) -> tuple[dict, dict]:
    """(weights after 2 uninterrupted epochs, weights after 1 epoch, a stop and a resume for the 2nd)."""
    reference = run("train.py", "-c", make_config(tmp_path / "a", data_dir, overrides), env=ENV)
    assert reference.returncode == 0, reference.stderr
    config = make_config(tmp_path / "b", data_dir, overrides)
    first = run("train.py", "-c", config, "--epochs", "1", env=ENV)
    assert first.returncode == 0, first.stderr
    (run_dir,) = run_dirs(tmp_path / "b" / "saved")
    resumed = run("train.py", "-r", run_dir, "--epochs", "2", env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    (reference_dir,) = run_dirs(tmp_path / "a" / "saved")
    return tuple(torch.load(d / "latest.pth", weights_only=True)["model"] for d in (reference_dir, run_dir))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.fixture
def folders(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    return tmp_path


# ---- torchvision datasets by name ---------------------------------------------------------------------------
@pytest.mark.slow
def test_fakedata_with_random_transforms_in_workers_resumes_exactly(folders):
    """Two persistent workers and random crops and flips: a stop after epoch 1 and a resume give the very
    weights of an uninterrupted run (each sample's draws are seeded by seed, epoch and index); test.py runs."""
    loader = fake_data(num_workers=2, persistent_workers=True)
    reference, resumed = train_and_resume(folders, "", {"data_loader": loader})
    assert_same(reference, resumed)
    (run_dir,) = run_dirs(folders / "b" / "saved")
    tested = run("test.py", "-r", run_dir / "latest.pth", env=ENV)
    assert tested.returncode == 0, tested.stderr
    assert "samples: 192" in tested.stdout


def test_batches_are_a_function_of_seed_epoch_and_position():
    """Same batches whichever epoch is replayed and wherever a (mid-epoch) resume starts; training is
    augmented, validation goes through the eval pipeline (no crop, no flip)."""
    loader = ConfigParser.from_dict(config_dict(fake_data()), "cfg").build("data_loader", seed=3)
    loader.set_epoch(2)
    epoch2 = [x for x, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(epoch2[4:], (x for x, _ in loader.batches(4))))
    loader.set_epoch(3)
    assert not torch.equal(epoch2[0], next(iter(loader))[0])
    valid = loader.split_validation()
    plain = TorchvisionDataLoader("FakeData", dataset_args={"size": 192, "image_size": [1, 28, 28]},
                                  transforms={"train": TO_FLOAT, "eval": TO_FLOAT}, batch_size=16,
                                  validation_split=32, num_workers=0, seed=3)
    assert torch.equal(next(iter(valid))[0], next(iter(plain.split_validation()))[0])
    plain.set_epoch(2)
    assert not torch.equal(epoch2[0], next(iter(plain))[0])  # the training pipeline did augment
    assert loader.classes == [] and valid.n_samples == 32


def test_bundled_mnist_through_torchvisions_own_class(tmp_path):
    """dataset "MNIST" reads the bundled files with torchvision.datasets.MNIST: the same images, normalised
    by the config's pipeline, as the in-memory MnistDataLoader, and its class names."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (ROOT / "data" / "mnist_small" / "MNIST" / "raw").glob("*.gz"):
        with gzip.open(gz, "rb") as src, open(raw / gz.stem, "wb") as dst:  # torchvision reads them unzipped
            shutil.copyfileobj(src, dst)
    normalize = {"type": "Normalize", "args": {"mean": [0.1307], "std": [0.3081]}}
    spec = {"type": "TorchvisionDataLoader", "args": {
        "dataset": "MNIST", "data_dir": str(tmp_path), "batch_size": 64, "shuffle": False, "num_workers": 0,
        "transforms": {"eval": [*TO_FLOAT[:2], normalize]}}}
    config = ConfigParser.from_dict(config_dict(spec), "cfg")
    for training, count in ((True, 10_000), (False, 2_000)):
        loader = config.build("data_loader", training=training, seed=0)
        in_memory = MnistDataLoader(str(ROOT / "data" / "mnist_small"), batch_size=64, shuffle=False,
                                    training=training)
        assert loader.n_samples == count and loader.classes[3] == "3 - three"
        if not training:
            (x, y), (x2, y2) = next(iter(loader)), next(iter(in_memory))
            torch.testing.assert_close(x, x2)
            assert torch.equal(y, y2)


def test_the_cifar10_example_config_checks_and_says_where_its_files_go(tmp_path):
    config = ConfigParser.from_file(ROOT / "configs" / "cifar10.json", [f"data_loader.args.data_dir={tmp_path}"])
    with pytest.raises(UserError, match=f"CIFAR10 files not found .* reads them from {tmp_path}/cifar-10-batches-py/"):
        config.build("data_loader", seed=0)


def test_a_checkpoints_config_names_only_trusted_datasets_and_transforms():
    for loader in (fake_data(dataset="tests.models.Evil"),
                   fake_data(transforms={"train": [{"type": "os.system", "args": {"command": "true"}}]})):
        with pytest.raises(UserError, match="is not trusted in a checkpoint's config"):
            ConfigParser.from_dict(config_dict(loader), "ckpt", restricted=True)
    ConfigParser.from_dict(config_dict(fake_data(dataset="torchvision.datasets.FakeData")), "ckpt", restricted=True)


# ---- an image folder with transforms from the config --------------------------------------------------------
def test_image_folder_of_png_and_jpeg_with_config_transforms(tmp_path):
    root = write_image_folder(tmp_path / "images", counts=(12, 4), size=(36, 30), jpeg=True)
    grey = [{"type": "Grayscale"}]
    transforms = {"train": [*grey, {"type": "RandomResizedCrop", "args": {"size": 28, "scale": [0.5, 1.0]}},
                            {"type": "RandomHorizontalFlip"}, *TO_FLOAT],
                  "eval": [*grey, {"type": "Resize", "args": {"size": [28, 28], "interpolation": "bilinear"}},
                           *TO_FLOAT]}
    loader = {"type": "ImageFolderDataLoader", "args": {"data_dir": str(root), "batch_size": 8, "num_workers": 1,
                                                        "validation_split": 8, "transforms": transforms}}
    config = make_config(tmp_path, root, {"data_loader": loader, "arch.args.num_classes": 2, "trainer.epochs": 1})
    result = run("train.py", "-c", config, env=ENV)
    assert result.returncode == 0, result.stderr
    assert "16 training samples, 8 validation samples" in result.stdout
    (run_dir,) = run_dirs(tmp_path / "saved")
    tested = run("test.py", "-r", run_dir / "latest.pth", env=ENV)
    assert tested.returncode == 0, tested.stderr
    assert "samples: 8" in tested.stdout
    built = ConfigParser.from_file(config).build("data_loader", seed=0)
    assert built.classes == ["dark", "light"]


# ---- bad input: one line, exit 2, nothing written -----------------------------------------------------------
BAD = {
    "unknown transform": ({"transforms": {"train": [{"type": "RandomCrp", "args": {"size": 28}}]}},
                          "data_loader.args.transforms.train[0].type: unknown transform type 'RandomCrp' "
                          "(did you mean 'RandomCrop'?)"),
    "bad transform argument": ({"transforms": {"eval": [{"type": "Normalize", "args": {"mean": [0.5], "sd": [1]}}]}},
                               "data_loader.args.transforms.eval[0].args: unknown argument 'sd' (did you mean 'std'?)"),
    "transform fails on the data": ({"transforms": {"train": [{"type": "RandomCrop", "args": {"size": 40}}]}},
                                    "data_loader: transforms.train: fails on sample 0: Required crop size (40, 40) "
                                    "is larger than input image size (28, 28)"),
    "no tensor": ({"transforms": {"train": AUGMENT}}, "transforms.train: gives Image for sample 0, not a tensor"),
    "dataset files missing": ({"dataset": "CIFAR10", "data_dir": "{tmp}/nowhere", "dataset_args": {},
                               "test_args": None},
                              "CIFAR10 files not found (Dataset not found or corrupted. You can use download=True to "
                              "download it): torchvision.datasets.CIFAR10 reads them from {tmp}/nowhere/"
                              "cifar-10-batches-py/"),
}


def test_bad_datasets_and_transforms_are_one_line_before_anything_is_written(tmp_path):
    procs = {}
    for case, (args, _) in BAD.items():
        args = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in args.items()}
        config = make_config(tmp_path, "", {"data_loader": fake_data(**args)}, f"{case}.json")
        procs[case] = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-c", str(config)], cwd=ROOT,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for case, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, stderr
        assert stderr.count("\n") == 1 and BAD[case][1].format(tmp=tmp_path) in stderr, stderr
    assert not (tmp_path / "saved").exists()


# ---- in-memory MNIST with batched augmentation on the device ------------------------------------------------
def test_batch_augment_is_a_padded_crop_and_flip_per_image():
    images = torch.randn(16, 3, 8, 10)
    out = BatchAugment(crop_padding=2, flip=True, fill=-1.0)(images, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    mirrored = torch.rand(16, 1, generator=generator) < 0.5
    shift = torch.randint(0, 5, (16, 2, 1), generator=generator)
    padded = F.pad(images, (2, 2, 2, 2), value=-1.0)
    for i in range(16):
        crop = padded[i, :, shift[i, 0, 0]:][:, :8, shift[i, 1, 0]:][:, :, :10]
        assert torch.equal(out[i], crop.flip(2) if mirrored[i] else crop)
    assert mirrored.any() and not mirrored.all() and (out == -1.0).any()
    assert BatchAugment.from_config({"crop_padding": 0, "flip": False}, 0.0) is None
    with pytest.raises(UserError, match="augment: unknown key 'padding'"):
        BatchAugment.from_config({"padding": 2}, 0.0)


def test_mnist_augment_touches_only_training_batches(tiny_mnist):
    args = {"batch_size": 64, "validation_split": 128, "seed": 1}
    plain = MnistDataLoader(str(tiny_mnist), **args)
    augmented = MnistDataLoader(str(tiny_mnist), augment={"crop_padding": 2, "flip": True}, **args)
    augmented.set_epoch(1)
    batches = [x for x, _ in augmented]
    assert all(torch.equal(a, b) for a, b in zip(batches[3:], (x for x, _ in augmented.batches(3))))
    plain.set_epoch(1)
    assert not torch.equal(batches[0], next(iter(plain))[0])
    assert torch.equal(next(iter(augmented.split_validation()))[0], next(iter(plain.split_validation()))[0])


def test_mnist_with_on_device_augmentation_resumes_exactly(folders, tiny_mnist):
    augment = {"data_loader.args.augment": {"crop_padding": 2, "flip": True}}
    reference, resumed = train_and_resume(folders, tiny_mnist, augment)
    assert_same(reference, resumed)


@pytest.mark.slow
def test_two_processes_with_random_transforms_match_one_with_twice_the_batch(folders):
    """Under torchrun each sample gets the crop and flip it would get in one process (seeded by sample, not by
    rank or worker): 2 processes x 16 train like 1 x 32."""
    layout = {"data_loader": fake_data(drop_last=True, num_workers=1), "arch.type": "tests.models.Deterministic",
              "trainer.epochs": 1, "trainer.tensorboard": False}
    config = make_config(folders / "a", "", {**layout, "data_loader.args.batch_size": 32})
    single = run("train.py", "-d", "cpu", "-c", config, env=ENV)
    assert single.returncode == 0, single.stderr
    config = make_config(folders / "b", "", {**layout, "data_loader.args.batch_size": 16})
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", "-d", "cpu", "-c", str(config)], cwd=ROOT, capture_output=True, text=True,
                         timeout=240, env={**os.environ, **ENV, "CI": "true"})
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-2000:]
    assert "Training on cpu (2 processes)" in ddp.stdout + ddp.stderr
    a, b = (torch.load(run_dirs(folders / n / "saved")[0] / "latest.pth", weights_only=True)["model"] for n in "ab")
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-5), key
