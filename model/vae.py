"""A variational autoencoder for 28x28 grey images in [0, 1] (Kingma & Welling 2013,
https://arxiv.org/abs/1312.6114), for configs/mnist_vae.json with trainer/vae.py."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class VAE(nn.Module):
    """784 -> hidden -> (mu, log variance) of a latent_dim Gaussian -> hidden -> 784 logits."""

    def __init__(self, latent_dim: int = 16, hidden: int = 400):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, 784),
                                     nn.Unflatten(1, (1, 28, 28)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction logits, mu, log variance); the latent is sampled (reparameterised) when training."""
        mu, log_var = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * log_var).exp() if self.training else mu
        return self.decoder(z), mu, log_var


class VAELoss(nn.Module):
    """The negative evidence lower bound per image, returned with its two parts so that both are logged:
    `recon` (binary cross-entropy of the pixels) and `kl` (KL divergence of the latent from N(0, I))."""

    LOGGED = ("recon", "kl")  # so that trainer.monitor may name them

    def forward(self, output: tuple, target: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, mu, log_var = output
        recon = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(target)
        kl = -0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum() / len(target)
        return {"loss": recon + kl, "recon": recon, "kl": kl}
