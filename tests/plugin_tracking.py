"""A trainer for tracking tests, named by dotted path from their configs: it dies like a killed process (os._exit, no
clean-up) between the files of epoch `die_at`'s save (plugin_faults), or right after epoch `die_after_epoch`'s save,
before the epoch is tracked."""

import os

from plugin_faults import DiesBetweenFiles


class DiesAfterSave(DiesBetweenFiles):
    DEFAULTS = {**DiesBetweenFiles.DEFAULTS, "die_after_epoch": 0}

    def _save_epoch(self, epoch, improved):
        super()._save_epoch(epoch, improved)
        if epoch == self.options["die_after_epoch"]:
            os._exit(9)
