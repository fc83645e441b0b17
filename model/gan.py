"""A small DCGAN for 28x28 grey images (Radford et al. 2015, https://arxiv.org/abs/1511.06434), for
configs/mnist_gan.json with trainer/gan.py. Images are in [0, 1] (the data loader's normalize: false)."""

import torch
import torch.nn as nn


class Generator(nn.Module):
    """latent_dim noise -> 7x7x128 -> 14x14x64 -> 28x28x1, in [0, 1]."""

    def __init__(self, latent_dim: int = 64):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 128 * 7 * 7), nn.BatchNorm1d(128 * 7 * 7), nn.ReLU(),
            nn.Unflatten(1, (128, 7, 7)),
            nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.ConvTranspose2d(64, 1, 4, stride=2, padding=1), nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """28x28x1 -> 14x14x64 -> 7x7x128 -> one logit (real > 0). No batch norm: it sees real and generated images in
    one batch for its own loss, generated ones alone for the generator's, and the batch statistics would differ."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 64, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(64, 128, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 7 * 7, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
