"""Data loaders. Any class defined here can be named in a config's `data_loader.type`.

A loader may also say how predict.py reads an image file for a model trained on it: a classmethod
`image_reader(args)` (args: the config's data_loader.args) returning path -> input tensor (C, H, W).
"""

from collections.abc import Callable
from pathlib import Path

import torch

from base import BaseDataLoader
from data_loader.datasets import MNIST_FILES, InMemoryImages, find_file, read_images_and_labels
from utils.errors import UserError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGE_SIZE = 224  # ImageFolderDataLoader's default side, in pixels


class MnistDataLoader(BaseDataLoader):
    """MNIST from `<data_dir>/MNIST/raw/` (the four IDX files, gzipped or not, as torchvision keeps them).

    in_memory: decode once into a uint8 tensor on the training device and take batches by index
    (fast); false: torchvision.datasets.MNIST with per-sample transforms in DataLoader workers
    (the path to add augmentation to). training: false gives the official test split.
    normalize: true standardises pixels with MNIST's mean and std; false keeps them in [0, 1] (GANs, VAEs).
    download: fetch the files with torchvision when they are missing (needs a network).
    """

    def __init__(self, data_dir: str, batch_size: int = 128, shuffle: bool = True, validation_split: float = 0.0,
                 num_workers: int = 0, training: bool = True, in_memory: bool = True, download: bool = False,
                 pin_memory: bool = True, persistent_workers: bool = False, prefetch_factor: int = 2,
                 drop_last: bool = False, seed: int = 0, normalize: bool = True, folds: int = 0, fold: int = 0):
        raw = Path(data_dir) / "MNIST" / "raw"
        mean, std = (MNIST_MEAN, MNIST_STD) if normalize else (0.0, 1.0)
        files = [find_file(raw, name) for name in MNIST_FILES[training]]
        if None in files and download:
            self._download(data_dir, training)
            files = [find_file(raw, name) for name in MNIST_FILES[training]]
        if None in files:
            missing = ", ".join(f"{n}.gz" for n, f in zip(MNIST_FILES[training], files) if f is None)
            raise UserError(f"MNIST files not found: put {missing} in {raw}/ (or set download: true when online)")
        if in_memory:
            images, targets = read_images_and_labels(*files)
            dataset = InMemoryImages(images.unsqueeze(1), targets, mean, std)
        else:
            dataset = self._torchvision_dataset(data_dir, raw, training, mean, std)
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, validation_split=validation_split,
                         num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers,
                         prefetch_factor=prefetch_factor, drop_last=drop_last, seed=seed, folds=folds, fold=fold)
        self.classes = [str(digit) for digit in range(10)]

    @classmethod
    def image_reader(cls, args: dict) -> Callable[[str], torch.Tensor]:
        """A grayscale image file as training saw MNIST: 28 x 28, white digit on black, normalised the same."""
        from torchvision import transforms

        mean, std = (MNIST_MEAN, MNIST_STD) if args.get("normalize", True) else (0.0, 1.0)
        transform = transforms.Compose([transforms.Resize((28, 28)), transforms.ToTensor(),
                                        transforms.Normalize((mean,), (std,))])
        return lambda path: transform(read_image(path, "L"))

    @staticmethod
    def _download(data_dir: str, training: bool) -> None:
        from torchvision import datasets

        try:
            datasets.MNIST(data_dir, train=training, download=True)
        except Exception as e:  # noqa: BLE001 - offline, a proxy, a mirror down: one answer
            raw = Path(data_dir) / "MNIST" / "raw"
            raise UserError(f"could not download MNIST ({type(e).__name__}); put the files in {raw}/") from None

    @staticmethod
    def _torchvision_dataset(data_dir: str, raw: Path, training: bool, mean: float, std: float):
        import gzip
        import shutil

        from torchvision import datasets, transforms

        for name in (*MNIST_FILES[True], *MNIST_FILES[False]):  # torchvision wants all four files, extracted
            file = find_file(raw, name)
            if file is not None and file.suffix == ".gz" and not file.with_suffix("").exists():
                with gzip.open(file, "rb") as src, open(file.with_suffix(""), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
        try:
            return datasets.MNIST(data_dir, train=training, transform=transform)
        except RuntimeError:
            names = ", ".join(f"{n}.gz" for n in (*MNIST_FILES[True], *MNIST_FILES[False]))
            raise UserError(f"in_memory: false reads MNIST with torchvision, which needs all of {names} "
                            f"in {raw}/") from None


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


def image_transform(image_size: int, mean: list | None, std: list | None):
    """Resize to a square, to a tensor in [0, 1], normalise per channel (defaults: ImageNet's mean and std)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize(mean or [0.485, 0.456, 0.406], std or [0.229, 0.224, 0.225]),
    ])


class ImageFolderDataLoader(BaseDataLoader):
    """Images sorted into one folder per class, read with torchvision.datasets.ImageFolder:

        <data_dir>/train/<class>/<image>   (training and validation)
        <data_dir>/test/<class>/<image>    (test.py: training false)

    Classes are the folder names in sorted order (label 0, 1, ...). Every image is resized to
    image_size x image_size, converted to RGB and normalised with mean/std (per channel; the
    defaults are ImageNet's). Add augmentation to `transform` for training.
    """

    def __init__(self, data_dir: str, batch_size: int = 32, shuffle: bool = True, validation_split: float = 0.0,
                 num_workers: int = 2, training: bool = True, image_size: int = IMAGE_SIZE,
                 mean: list | None = None, std: list | None = None, pin_memory: bool = True,
                 persistent_workers: bool = False, prefetch_factor: int = 2, drop_last: bool = False, seed: int = 0,
                 folds: int = 0, fold: int = 0):
        from torchvision import datasets

        root = Path(data_dir) / ("train" if training else "test")
        if not root.is_dir():
            raise UserError(f"image folder not found: {root} (expected {root}/<class>/<image>)")
        try:
            dataset = datasets.ImageFolder(str(root), transform=image_transform(image_size, mean, std),
                                           loader=read_image)
        except (FileNotFoundError, OSError) as e:  # no class folders, or no images in them
            raise UserError(f"{root}: {e}") from None
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, validation_split=validation_split,
                         num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers,
                         prefetch_factor=prefetch_factor, drop_last=drop_last, seed=seed, folds=folds, fold=fold)

    @classmethod
    def image_reader(cls, args: dict) -> Callable[[str], torch.Tensor]:
        """An image file as training saw this folder's images (RGB, resized, normalised)."""
        transform = image_transform(args.get("image_size", IMAGE_SIZE), args.get("mean"), args.get("std"))
        return lambda path: transform(read_image(path))
