"""An autoencoder's trainer: the input is its own target (configs/mnist_vae.json)."""

from trainer.trainer import Trainer


class VaeTrainer(Trainer):
    """Trains `model(x)` to give back x: the loss gets (output, x); labels are not used. A loss that
    returns its parts (model/vae.py's VAELoss) has each logged, in training and validation."""

    def train_step(self, batch) -> dict:
        images = batch[0]
        result = self.criterion(self.forward_model(images), images)
        self.optim_step(result["loss"])  # what the loop does for a step that does not call it
        return result

    def valid_step(self, batch) -> dict:
        images = batch[0]
        return self.criterion(self.model(images), images)
