"""A dataset of a user's own, for tests only, named in configs by dotted path (`tests.custom_data.LabelFile`)."""

from pathlib import Path

import torch
from torch.utils.data import Dataset


class LabelFile(Dataset):
    """One sample per line of `<root>/labels.txt` (its label, 0-9), with a 1x28x28 image drawn at random at every
    read (as an augmentation would); no `targets` or `samples`, so only the default fingerprint's generic rules
    see its labels."""

    def __init__(self, root: str):
        self.labels = [int(line) for line in (Path(root) / "labels.txt").read_text().split()]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.rand(1, 28, 28), self.labels[index]


class Versioned(LabelFile):
    """A LabelFile that gives its own fingerprint: `version`."""

    def __init__(self, root: str, version: str | dict | list = "v1"):
        super().__init__(root)
        self.version = version

    def fingerprint(self) -> str | dict | list:
        return self.version
