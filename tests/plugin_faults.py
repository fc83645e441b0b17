"""A trainer for fault tests, named by dotted path from their configs: it dies like a killed process
(os._exit, no clean-up) between the files of one save, deterministically."""

import os

from trainer.trainer import Trainer


class DiesBetweenFiles(Trainer):
    """At the end of epoch `die_at`, writes the first file of that epoch's save, then exits at once."""

    DEFAULTS = {**Trainer.DEFAULTS, "die_at": 0}

    def _save(self, names: list[str]):
        if self.epoch == self.options["die_at"] and len(names) > 1:
            super()._save(names[:1])
            os._exit(9)
        return super()._save(names)
