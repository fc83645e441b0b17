"""Data loaders. Any class defined here can be named in a config's `data_loader.type`.

A loader may also say how predict.py reads an image file for a model trained on it: a classmethod
`image_reader(args)` (args: the config's data_loader.args) returning path -> input tensor (C, H, W)."""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from base import BaseDataLoader
from config.resolve import check_built, resolve
from config.schema import check_args, signature_params
from data_loader.augment import BatchAugment
from data_loader.datasets import MNIST_FILES, InMemoryImages, SampleBySample, find_file, read_images_and_labels
from data_loader.pipeline import PipelineDataLoader, build_pipeline
from utils.errors import UserError
from utils.seed import draw_seed

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGE_SIZE = 224  # ImageFolderDataLoader's default side, in pixels


class MnistDataLoader(BaseDataLoader):
    """MNIST from `<data_dir>/MNIST/raw/` (the four IDX files, gzipped or not, as torchvision keeps them).

    in_memory: decode once into a uint8 tensor on the training device and take batches by index (fast); false:
    the same tensor on the CPU, read sample by sample in DataLoader workers (for per-sample transforms from the
    config, use TorchvisionDataLoader with dataset "MNIST"). training: false gives the official test split.
    normalize: true standardises pixels with MNIST's mean and std; false keeps them in [0, 1] (GANs, VAEs).
    download: fetch the files with torchvision when they are missing (needs a network).
    augment: batched on-device augmentation of training batches, e.g.
    {"crop_padding": 2, "flip": false} (data_loader/augment.py); validation and test batches are left as they are."""

    def __init__(self, data_dir: str, batch_size: int = 128, shuffle: bool = True, validation_split: float = 0.0,
                 num_workers: int = 0, training: bool = True, in_memory: bool = True, download: bool = False,
                 pin_memory: bool = True, persistent_workers: bool = False, prefetch_factor: int = 2,
                 drop_last: bool = False, seed: int = 0, normalize: bool = True, folds: int = 0, fold: int = 0,
                 augment: dict | None = None):
        raw = Path(data_dir) / "MNIST" / "raw"
        mean, std = (MNIST_MEAN, MNIST_STD) if normalize else (0.0, 1.0)
        self.augment = BatchAugment.from_config(augment, fill=-mean / std) if training else None  # fill: black
        self._generator: torch.Generator | None = None
        if download and not all(find_file(raw, name) for name in MNIST_FILES[training]):
            self._download(data_dir, raw, training)
        files = [find_file(raw, name) for name in MNIST_FILES[training]]
        if None in files:
            missing = ", ".join(f"{n}.gz" for n, f in zip(MNIST_FILES[training], files) if f is None)
            raise UserError(f"MNIST files not found: put {missing} in {raw}/ (or set download: true when online)")
        images, targets = read_images_and_labels(*files)
        dataset = InMemoryImages(images.unsqueeze(1), targets, mean, std)
        super().__init__(dataset if in_memory else SampleBySample(dataset), batch_size=batch_size, shuffle=shuffle,
                         validation_split=validation_split, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers, prefetch_factor=prefetch_factor, drop_last=drop_last,
                         seed=seed, folds=folds, fold=fold)
        self.classes = [str(digit) for digit in range(10)]

    @classmethod
    def image_reader(cls, args: dict) -> Callable[[str], torch.Tensor]:
        """A grayscale image file as training saw MNIST: 28 x 28, white digit on black, normalised the same."""
        from torchvision import transforms

        mean, std = (MNIST_MEAN, MNIST_STD) if args.get("normalize", True) else (0.0, 1.0)
        transform = transforms.Compose([transforms.Resize((28, 28)), transforms.ToTensor(),
                                        transforms.Normalize((mean,), (std,))])
        return lambda path: transform(read_image(path, "L"))

    def batches(self, skip: int = 0) -> Iterator:
        """The epoch's batches; with `augment`, each augmented from a generator seeded by its number."""
        if self.augment is None:
            yield from super().batches(skip)
            return
        for number, (images, targets) in enumerate(super().batches(skip), start=skip):
            if self._generator is None or self._generator.device != images.device:
                self._generator = torch.Generator(images.device)
            self._generator.manual_seed(draw_seed(self.seed, self.epoch, number))
            yield self.augment(images, self._generator), targets

    def split_validation(self) -> BaseDataLoader | None:
        valid = super().split_validation()
        if valid is not None:
            valid.augment = None
        return valid

    @staticmethod
    def _download(data_dir: str, raw: Path, training: bool) -> None:
        from torchvision import datasets

        try:
            datasets.MNIST(data_dir, train=training, download=True)
        except Exception as e:  # noqa: BLE001 - offline, a proxy, a mirror down: one answer
            raise UserError(f"could not download MNIST ({type(e).__name__}); put the files in {raw}/") from None


def read_image(path: str, mode: str = "RGB"):
    """An image file as a PIL image in `mode`: "RGB" (torchvision's default loader: any image) or "L"
    (grayscale: a colour image is refused). A file PIL cannot read is a UserError naming it."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            channels = len([band for band in image.getbands() if band != "A"])  # alpha is dropped either way
            if mode == "L" and channels != 1:
                raise UserError(f"{path}: a {channels}-channel image ({image.mode}); this model reads "
                                "1-channel (grayscale) images")
            return image.convert(mode)
    except OSError as e:
        raise UserError(f"{path}: cannot read image: {e}") from None


def image_files(inputs: list[str]) -> list[Path]:
    """The files given, and the images under the folders given (sorted): predict.py's inputs."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    files = []
    for name in map(Path, inputs):
        if name.is_dir():
            found = sorted(p for p in name.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
            if not found:
                raise UserError(f"{name}: no images in this folder ({', '.join(IMG_EXTENSIONS)})")
            files += found
        elif name.is_file():
            files.append(name)
        else:
            raise UserError(f"{name}: no such file or folder")
    return files


def imagenet_default(image_size: int, mean: list | None, std: list | None) -> list[dict]:
    """Resize to a square, float tensor in [0, 1], normalise (ImageNet's mean and std by default)."""
    return [{"type": "Resize", "args": {"size": [image_size, image_size]}}, *TO_FLOAT,
            {"type": "Normalize", "args": {"mean": mean or [0.485, 0.456, 0.406], "std": std or [0.229, 0.224, 0.225]}}]


TO_FLOAT = [{"type": "ToImage"}, {"type": "ToDtype", "args": {"dtype": "float32", "scale": True}}]


class ImageFolderDataLoader(PipelineDataLoader):
    """Images sorted into one folder per class, read with torchvision.datasets.ImageFolder:

        <data_dir>/train/<class>/<image>   (training and validation)
        <data_dir>/test/<class>/<image>    (test.py: training false)

    Classes are the folder names in sorted order (label 0, 1, ...; `classes` lists them). Images are converted
    to RGB, then go through `transforms` (see PipelineDataLoader); a pipeline not given resizes to
    image_size x image_size and normalises with mean/std (per channel; the defaults are ImageNet's)."""

    def __init__(self, data_dir: str, batch_size: int = 32, shuffle: bool = True, validation_split: float = 0.0,
                 num_workers: int = 2, training: bool = True, image_size: int = IMAGE_SIZE,
                 mean: list | None = None, std: list | None = None, transforms: dict | None = None,
                 pin_memory: bool = True, persistent_workers: bool = False, prefetch_factor: int = 2,
                 drop_last: bool = False, seed: int = 0, folds: int = 0, fold: int = 0):
        from torchvision import datasets

        root = Path(data_dir) / ("train" if training else "test")
        if not root.is_dir():
            raise UserError(f"image folder not found: {root} (expected {root}/<class>/<image>)")
        try:
            dataset = datasets.ImageFolder(str(root), loader=read_image)
        except (FileNotFoundError, OSError) as e:  # no class folders, or no images in them
            raise UserError(f"{root}: {e}") from None
        super().__init__(dataset, transforms, imagenet_default(image_size, mean, std), training=training,
                         batch_size=batch_size, shuffle=shuffle, validation_split=validation_split,
                         num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers,
                         prefetch_factor=prefetch_factor, drop_last=drop_last, seed=seed, folds=folds, fold=fold)

    @classmethod
    def image_reader(cls, args: dict) -> Callable[[str], torch.Tensor]:
        """An image file as evaluation saw this folder's images: RGB, then the "eval" pipeline (or the default)."""
        specs = (args.get("transforms") or {}).get("eval") or \
            imagenet_default(args.get("image_size", IMAGE_SIZE), args.get("mean"), args.get("std"))
        transform = build_pipeline(specs, "data_loader.args.transforms.eval")
        return lambda path: transform(read_image(path))


class TorchvisionDataLoader(PipelineDataLoader):
    """Any torchvision.datasets class by name ("CIFAR10", "FashionMNIST", "SVHN", "FakeData", ...) or dotted path.

    The loader passes root=data_dir, and train=True/False or split="train"/"test", to a class that takes them;
    `dataset_args` add to or replace them, `test_args` do so for the test split only (training false). Images go
    through `transforms` (see PipelineDataLoader; a pipeline not given makes float tensors in [0, 1]). `classes`:
    the dataset's class names, when it has them. Files are never fetched unless dataset_args has download: true."""

    def __init__(self, dataset: str, data_dir: str = "data/", dataset_args: dict | None = None,
                 test_args: dict | None = None, transforms: dict | None = None, batch_size: int = 128,
                 shuffle: bool = True, validation_split: float = 0.0, num_workers: int = 2, training: bool = True,
                 pin_memory: bool = True, persistent_workers: bool = False, prefetch_factor: int = 2,
                 drop_last: bool = False, seed: int = 0):
        cls = resolve("dataset", dataset, "dataset")
        kwargs = dataset_kwargs(cls, data_dir, dataset_args, test_args, training, "")
        super().__init__(open_dataset(cls, dataset, kwargs), transforms, TO_FLOAT, training=training,
                         batch_size=batch_size, shuffle=shuffle, validation_split=validation_split,
                         num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers,
                         prefetch_factor=prefetch_factor, drop_last=drop_last, seed=seed)

    @classmethod
    def check_config(cls, args: dict, where: str, restricted: bool) -> None:
        """The dataset's name (a checkpoint's config may name only torchvision's) and its arguments."""
        super().check_config(args, where, restricted)
        dataset = resolve("dataset", str(args["dataset"]), f"{where}.dataset", restricted)
        dataset_kwargs(dataset, args.get("data_dir", "data/"), args.get("dataset_args"), args.get("test_args"),
                       False, f"{where}.")


def dataset_kwargs(cls: type, data_dir: str, dataset_args: Any, test_args: Any, training: bool, where: str) -> dict:
    """The arguments of the dataset class: root, train or split as it takes them, then the config's (checked)."""
    params = signature_params(cls)
    kwargs: dict[str, Any] = {"root": data_dir} if "root" in params else {}
    if "train" in params:
        kwargs["train"] = training
    elif "split" in params:
        kwargs["split"] = "train" if training else "test"
    for name, extra in (("dataset_args", dataset_args), ("test_args", test_args if not training else None)):
        if extra is not None and not isinstance(extra, dict):
            raise UserError(f"{where}{name}: expected a mapping of {cls.__name__}'s arguments, got {extra!r}")
        check_args(cls, extra or {}, f"{where}{name}", set(kwargs))
        kwargs.update(extra or {})
    return kwargs


def open_dataset(cls: type, name: str, kwargs: dict) -> Dataset:
    """`cls(**kwargs)`; missing files (torchvision's "Dataset not found") are one line saying where they go."""
    try:
        return check_built("dataset", cls(**kwargs), name, "dataset")
    except (TypeError, ValueError) as e:
        raise UserError(f"dataset_args: {name}: {e}") from None
    except (RuntimeError, OSError) as e:  # not found, corrupted, or a failed download (URLError is an OSError)
        folder = Path(kwargs.get("root", "."))
        if isinstance(getattr(cls, "base_folder", None), str):  # CIFAR10: <root>/cifar-10-batches-py
            folder = folder / cls.base_folder
        elif hasattr(cls, "raw_folder"):  # the MNIST family: <root>/<class name>/raw
            folder = folder / cls.__name__ / "raw"
        url = getattr(cls, "url", None)
        source = f", from {url}" if isinstance(url, str) else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        found, hint = ("could not be downloaded", "") if kwargs.get("download") else \
            ("not found", ", or set dataset_args.download: true when online")
        raise UserError(f"{name} files {found} ({first}): torchvision.datasets.{cls.__name__} reads them from "
                        f"{folder}/ (see its documentation{source}); put them there{hint}") from None
