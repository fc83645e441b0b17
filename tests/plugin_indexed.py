"""A project outside this one, as a user would write it, named by dotted path from its config: a data
loader whose batches are dicts of three tensors, a trainer whose step reads them and logs an extra value,
and a loss that keeps a per-sample history (state that must be saved and restored for exact resume)."""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from base import BaseDataLoader
from data_loader.datasets import MNIST_FILES, read_idx
from trainer.trainer import Trainer


class IndexedImages(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images.unsqueeze(1).float() / 255, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": self.labels[index], "index": torch.tensor(index)}


class IndexedDataLoader(BaseDataLoader):
    """MNIST as {'image', 'label', 'index'} batches. Training always holds out 128 images for validation
    (no config key says so: `has_validation` tells the config checker)."""

    def __init__(self, data_dir: str, batch_size: int = 32, training: bool = True, seed: int = 0,
                 shuffle: bool = True, validation_split: float = 0.0):
        images, labels = (read_idx(Path(data_dir) / "MNIST" / "raw" / f"{name}.gz") for name in MNIST_FILES[training])
        super().__init__(IndexedImages(images, labels), batch_size=batch_size, shuffle=shuffle, seed=seed,
                         validation_split=128 if training else 0)

    @classmethod
    def has_validation(cls, args: dict) -> bool:
        return True


class HistoryLoss(torch.nn.Module):
    """Cross-entropy plus agreement with a running average of each sample's past predictions (the kind of
    loss noisy-label methods use); the history is a buffer, updated only while training."""

    LOGGED = ("agreement",)

    def __init__(self, num_samples: int, num_classes: int = 10, momentum: float = 0.7, weight: float = 0.5):
        super().__init__()
        self.momentum, self.weight = momentum, weight
        self.register_buffer("history", torch.full((num_samples, num_classes), 1.0 / num_classes))

    def forward(self, output: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> dict:
        probs = output.softmax(dim=1)
        past = self.history[index]
        agreement = (probs * past).sum(dim=1).mean()
        if self.training:
            self.history[index] = self.momentum * past + (1 - self.momentum) * probs.detach()
        return {"loss": F.cross_entropy(output, target) - self.weight * agreement.log(), "agreement": agreement}


class IndexedTrainer(Trainer):
    """Reads dict batches and gives the loss each sample's index; logs the images' mean brightness too."""

    LOGGED = ("brightness",)

    def train_step(self, batch) -> dict:
        return self.step(batch, self.forward_model)

    def valid_step(self, batch) -> dict:
        return self.step(batch, self.model)

    def step(self, batch: dict, model) -> dict:
        output = model(batch["image"])
        parts = self.criterion(output, batch["label"], batch["index"])
        return {**parts, "brightness": batch["image"].mean(), "output": output, "target": batch["label"]}
