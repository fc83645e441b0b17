"""Trainers for fault tests, named by dotted path from their configs: they die like a killed process (no clean-up)
at a chosen moment of a save, deterministically."""

import os
import signal

from runs import sharded
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


class DiesInShardedSave(Trainer):
    """At the end of epoch `die_at` (trainer.strategy fsdp), rank 0 is killed by SIGKILL in the middle of installing
    latest.dcp: the previous folder renamed aside, the new one not yet in its place."""

    DEFAULTS = {**Trainer.DEFAULTS, "die_at": 0}

    def _save(self, epoch=None, improved=False):
        if epoch is not None and epoch == self.options["die_at"]:
            install = sharded.install

            def rename_aside_then_die(folder, target):
                if target.name != sharded.LATEST:
                    return install(folder, target)
                os.rename(target, target.with_name(f".{target.name}{sharded.ASIDE}"))
                os.kill(os.getpid(), signal.SIGKILL)

            sharded.install = rename_aside_then_die
        return super()._save(epoch, improved)
