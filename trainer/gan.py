"""A GAN trainer: two models, two optimizers, each step trains both (configs/mnist_gan.json)."""

import torch

from trainer.trainer import Trainer


class GanTrainer(Trainer):
    """Models `generator` and `discriminator`, each with its own optimizer, and a logits loss (BCEWithLogitsLoss).
    Each step updates the discriminator on real and generated images, then the generator through the updated
    discriminator. Every epoch a grid of `samples` generated images (fixed noise) goes to TensorBoard."""

    DEFAULTS = {**Trainer.DEFAULTS, "samples": 64}  # images in the epoch's grid of samples (0: none)
    LOGGED = ("loss_d", "loss_g")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        latent_dim = self.models["generator"].latent_dim
        noise = torch.Generator().manual_seed(0)  # its own generator: the run's random streams stay as they are
        self.fixed_noise = torch.randn(self.options["samples"], latent_dim, generator=noise).to(self.device)

    def losses(self, real: torch.Tensor, generator, discriminator) -> tuple[torch.Tensor, torch.Tensor]:
        """(discriminator loss on real and generated images, generator loss): the fake half is detached
        for the discriminator, so its backward never reaches the generator."""
        n = real.shape[0]
        fake = generator(torch.randn(n, self.models["generator"].latent_dim, device=self.device))
        labels = torch.cat([torch.ones(n, 1, device=self.device), torch.zeros(n, 1, device=self.device)])
        loss_d = self.criterion(discriminator(torch.cat([real, fake.detach()])), labels)
        return loss_d, fake

    def train_step(self, batch) -> dict:
        real = batch[0]
        loss_d, fake = self.losses(real, self.forward_models["generator"], self.forward_models["discriminator"])
        self.optim_step(loss_d, "discriminator")
        # the plain discriminator: under DDP only the generator's gradients are all-reduced here
        loss_g = self.criterion(self.models["discriminator"](fake), torch.ones(len(real), 1, device=self.device))
        self.optim_step(loss_g, "generator")
        return {"loss": loss_d + loss_g, "loss_d": loss_d, "loss_g": loss_g}

    def valid_step(self, batch) -> dict:
        real = batch[0]
        loss_d, fake = self.losses(real, self.models["generator"], self.models["discriminator"])
        loss_g = self.criterion(self.models["discriminator"](fake), torch.ones(len(real), 1, device=self.device))
        return {"loss": loss_d + loss_g, "loss_d": loss_d, "loss_g": loss_g}

    def _valid_epoch(self, epoch: int) -> dict[str, float]:
        result = super()._valid_epoch(epoch)
        if self.options["samples"] and self.writer.enabled:
            with torch.no_grad():
                self.writer.image_grid("samples", self.models["generator"].eval()(self.fixed_noise), self.global_step)
        return result
