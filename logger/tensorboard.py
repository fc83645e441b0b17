"""TensorBoard, when enabled; otherwise every call does nothing. Imported only when used (it is slow)."""

from pathlib import Path

import torch


def flatten(config: dict, prefix: str = "") -> dict:
    """A nested config as one level of dotted keys (`trainer.epochs`); lists as their text."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        elif isinstance(value, list):
            flat[f"{prefix}{key}"] = str(value)
    return flat


class TensorboardWriter:
    """SummaryWriter calls that do nothing when disabled. The writer opens at the first write, so
    importing TensorBoard (slow) does not delay the first training step."""

    def __init__(self, log_dir: Path, enabled: bool, purge_step: int | None = None):
        self.log_dir, self.enabled, self.purge_step = log_dir, enabled, purge_step
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run hides points an interrupted run logged after its checkpoint
            self._writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
        return self._writer

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.enabled:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def image_grid(self, tag: str, images: torch.Tensor, step: int) -> None:
        if self.enabled:
            from torchvision.utils import make_grid

            self.writer.add_image(tag, make_grid(images[:64].detach().float().cpu(), normalize=True), step)

    def histograms(self, model: torch.nn.Module, step: int) -> None:
        if self.enabled:
            for name, param in model.named_parameters():
                self.writer.add_histogram(f"params/{name}", param.detach().float().cpu(), step)
                if param.grad is not None:
                    self.writer.add_histogram(f"grads/{name}", param.grad.detach().float().cpu(), step)

    def hparams(self, config: dict, final: dict[str, float]) -> None:
        """The run's config and final metrics, for TensorBoard's HParams view."""
        if self.enabled and final:
            self.writer.add_hparams(flatten(config), {f"hparam/{k}": v for k, v in final.items()}, run_name=".")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
