"""A trainer for fault tests, named by dotted path from their configs: it dies like a killed process
(os._exit, no clean-up) between the files of one save, deterministically."""

import os

from trainer.trainer import Trainer
from utils import checkpoint


class DiesBetweenFiles(Trainer):
    """At the end of epoch `die_at`, writes the first file of that epoch's save, then exits at once."""

    DEFAULTS = {**Trainer.DEFAULTS, "die_at": 0}

    def _save(self, epoch=None, improved=False):
        if epoch is not None and epoch == self.options["die_at"]:
            write = checkpoint.save_atomic
            written = []

            def write_one_then_die(data, path, what="checkpoint"):
                if written:
                    os._exit(9)
                write(data, path, what)
                written.append(path)

            checkpoint.save_atomic = write_one_then_die
        return super()._save(epoch, improved)
