"""Batched augmentation on the device, for images already in memory (MnistDataLoader's `augment`).

A whole batch is cropped and flipped with one gather, on the batch's device, from a generator seeded
per batch from (seed, epoch, batch number): a resumed run, even mid-epoch, draws what an uninterrupted
one would, and nothing waits for the host."""

from typing import Any

import torch
import torch.nn.functional as F

from config.schema import check_keys, check_type
from utils.errors import UserError

# `augment` keys and their defaults (off)
AUGMENT = {
    "crop_padding": 0,  # pixels of padding on each side, then a random crop back to the image size (0: off)
    "flip": False,  # horizontal flip with probability 1/2
}


class BatchAugment:
    """Random crop after padding with `fill` (the value of a black pixel) and horizontal flip, batched."""

    def __init__(self, crop_padding: int = 0, flip: bool = False, fill: float = 0.0):
        self.padding, self.flip, self.fill = crop_padding, flip, fill

    @classmethod
    def from_config(cls, augment: Any, fill: float) -> "BatchAugment | None":
        """The `augment` mapping of a config, checked (None, or every option off: no augmentation)."""
        if augment is None:
            return None
        if not isinstance(augment, dict):
            raise UserError(f"augment: expected a mapping like {AUGMENT}, got {augment!r}")
        check_keys(augment, AUGMENT, "augment")
        for key, value in augment.items():
            check_type(value, AUGMENT[key], f"augment.{key}")
        options = {**AUGMENT, **augment}
        if options["crop_padding"] < 0:
            raise UserError(f"augment.crop_padding: must be >= 0, got {options['crop_padding']}")
        return cls(**options, fill=fill) if options["crop_padding"] or options["flip"] else None

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, C, H, W) -> the same shape: each image shifted by up to `padding` pixels and maybe mirrored."""
        n, c, height, width = images.shape
        device, p = images.device, self.padding
        rows = torch.arange(height, device=device).expand(n, height)
        cols = torch.arange(width, device=device).expand(n, width)
        if self.flip:
            mirrored = torch.rand(n, 1, device=device, generator=generator) < 0.5
            cols = torch.where(mirrored, width - 1 - cols, cols)
        if p:
            images = F.pad(images, (p, p, p, p), value=self.fill)
            shift = torch.randint(0, 2 * p + 1, (n, 2, 1), device=device, generator=generator)
            rows, cols = rows + shift[:, 0], cols + shift[:, 1]
        # one gather from the flat (padded) batch: index = image * plane + row * padded width + column
        plane, padded_width = images.shape[2] * images.shape[3], images.shape[3]
        starts = torch.arange(n * c, device=device).view(n, c, 1) * plane + (rows * padded_width).view(n, 1, height)
        index = starts.view(n, c, height, 1) + cols.view(n, 1, 1, width)
        return images.reshape(-1).index_select(0, index.view(-1)).view(n, c, height, width)
