"""Datasets that fit in memory: decoded once into a uint8 tensor, normalised per batch on its device."""

import gzip
import math
import struct
import zlib
from pathlib import Path

import torch
from torch.utils.data import Dataset

from utils.errors import UserError

MNIST_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),  # by `training`
               False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def find_file(folder: Path, name: str) -> Path | None:
    """`name` or `name.gz` in `folder`."""
    return next((file for file in (folder / name, folder / f"{name}.gz") if file.is_file()), None)


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (the MNIST format, http://yann.lecun.com/exdb/mnist/), gzipped or not, as uint8. A damaged
    or cut-short file is one UserError naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path}: damaged file ({type(e).__name__}: {e or 'cut short'})") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or len(data) < 4 + 4 * data[3]:
        raise UserError(f"{path}: not an IDX file of unsigned bytes (bad header)")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = len(data) - 4 - 4 * ndim
    if body != math.prod(shape):
        raise UserError(f"{path}: cut short or damaged: its header says {math.prod(shape):,} bytes of data "
                        f"(shape {shape}), it holds {body:,}")
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def read_images_and_labels(images: Path, labels: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """An IDX pair of images and labels, checked to match in number."""
    x, y = read_idx(images), read_idx(labels)
    if len(x) != len(y) or y.dim() != 1:
        raise UserError(f"{labels}: {len(y):,} labels (shape {tuple(y.shape)}) for the {len(x):,} images of {images}")
    return x, y


def write_idx(path: Path, array: torch.Tensor) -> None:
    """`array` (uint8) as a gzipped IDX file; byte-identical for the same array (no time stamp)."""
    header = bytes([0, 0, 0x08, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(header + array.contiguous().numpy().tobytes())


class InMemoryImages(Dataset):
    """uint8 images (N, C, H, W) and integer targets; `get_batch` indexes and normalises a whole batch."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, mean: float, std: float):
        self.images, self.targets = images, targets.long()
        # (x / 255 - mean) / std as one multiply and one subtract
        self.scale, self.shift = 1.0 / (255.0 * std), mean / std

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device) -> "InMemoryImages":
        self.images, self.targets = self.images.to(device), self.targets.to(device)
        return self

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get_batch(torch.tensor([index]))[0][0], self.targets[index]

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[indices].float().mul_(self.scale).sub_(self.shift), self.targets[indices]


class SampleBySample(Dataset):
    """A dataset's samples one at a time, for DataLoader workers: its `get_batch` and `to` are left out."""

    def __init__(self, dataset: Dataset):
        self.dataset, self.targets = dataset, dataset.targets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        return self.dataset[index]
