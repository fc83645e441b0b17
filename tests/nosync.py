"""A Trainer that fails on any host-device sync inside a training step that does not log (CUDA only; named in
configs by dotted path, tests/test_speed.py): from the start of `train_batch` to the end of `on_batch_end`, which
covers the forward, the loss, backward, the optimizer step, the schedulers and the running sums."""

import torch

from trainer.trainer import Trainer


class NoSyncTrainer(Trainer):
    checked_steps = 0

    def train_batch(self, batch, number: int, n_batches: int, histograms: bool = False):
        if 0 < number < n_batches - 1:  # not the first (lazy state) nor the last (it logs)
            torch.cuda.set_sync_debug_mode("error")
            NoSyncTrainer.checked_steps += 1
        return super().train_batch(batch, number, n_batches, histograms)

    def on_batch_end(self, batch_idx: int, result) -> None:
        super().on_batch_end(batch_idx, result)
        torch.cuda.set_sync_debug_mode("default")

    def train(self):
        result = super().train()
        print(f"steps checked for syncs: {NoSyncTrainer.checked_steps}")
        return result
