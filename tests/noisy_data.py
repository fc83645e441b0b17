"""A user's own Dataset for tests, named in configs by dotted path: augmentation noise drawn in __getitem__
from torch, Python's `random` and NumPy, as ports of real projects do."""

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from base import BaseDataLoader


class NoisyDigits(Dataset):
    """`size` fixed random 1x28x28 images, labels 0-9, plus noise from each of the three generators each time a
    sample is read: a resume that restores any one of them wrongly trains to other weights."""

    def __init__(self, size: int = 256):
        self.images = torch.rand(size, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        self.labels = torch.arange(size) % 10

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        noise = torch.randn(1, 28, 28) + torch.from_numpy(np.random.rand(1, 28, 28).astype(np.float32))
        return self.images[index] + noise + random.random(), self.labels[index]


class NoisyDataLoader(BaseDataLoader):
    def __init__(self, **options):
        super().__init__(NoisyDigits(), **options)
