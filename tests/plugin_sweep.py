"""A trainer for the two-process sweep test, named by dotted path from its config: a trial's first epoch waits until
another trial's folder exists, so the two processes are each inside a trial at once, however their start-ups differ."""

import time

from trainer.trainer import Trainer


class WaitsForAnotherTrial(Trainer):
    def on_epoch_start(self, epoch: int) -> None:
        deadline = time.monotonic() + 120
        while len(list(self.run.dir.parent.glob("trial-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        super().on_epoch_start(epoch)
