"""The epoch loop, monitoring, early stopping, checkpoints and signals. Subclasses train one epoch."""

import logging
import math
import re
import signal
import time
from pathlib import Path

import torch

from base import options
from logger import TensorboardWriter, progress_bar
from logger.metrics_file import MetricsFile
from utils import checkpoint, dist
from utils.errors import TrainingError
from utils.profiler import start_profiler

log = logging.getLogger("train")


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: the step finished, a checkpoint was saved, the run stops."""

    def __init__(self, signum: int, path: Path):
        launcher = f"torchrun --nproc_per_node={dist.world_size()}" if dist.is_distributed() else "python"
        super().__init__(f"stopped by {signal.Signals(signum).name}; resume with: {launcher} train.py -r {path}")
        self.exit_code = 128 + signum


class NamedStates:
    """Several objects (optimizers, schedulers) whose states are saved as one dict by name."""

    def __init__(self, objects: dict):
        self.objects = objects

    def state_dict(self) -> dict:
        return {name: obj.state_dict() for name, obj in self.objects.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])


class BaseTrainer:
    DEFAULTS = options.DEFAULTS  # the trainer keys a config may set; a subclass may add its own
    LOGGED: tuple[str, ...] = ()  # names a subclass's steps log besides loss and metrics (monitor may name them)

    def __init__(self, model, criterion, metric_fns: dict, optimizer, config, device: torch.device,
                 run_dir: Path | None = None, lr_scheduler=None):
        """`model`, `optimizer` and `lr_scheduler` are one object each, or dicts by name (several models;
        an optimizer has the name of the model it trains, a scheduler that of its optimizer)."""
        self.config, self.options = config, config["trainer"]
        self.device = device
        self.run_dir = Path(run_dir) if run_dir else None  # train.py sets it once the first batches passed
        self.models = model if isinstance(model, dict) else {"model": model}
        self.model = torch.nn.ModuleDict(model) if isinstance(model, dict) else model  # what is saved as "model"
        self.optimizers = optimizer if isinstance(optimizer, dict) else {"model": optimizer}
        self.lr_schedulers = lr_scheduler if isinstance(lr_scheduler, dict) else {"model": lr_scheduler}
        self.lr_schedulers = {name: s for name, s in self.lr_schedulers.items() if s is not None}
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler  # as given: one object, or a dict
        specs = dict(config.entries("lr_scheduler")) if config["lr_scheduler"] else {}
        self.scheduler_intervals = {name: specs[name].get("interval", "epoch") for name in self.lr_schedulers}
        self.criterion, self.metric_fns = criterion, metric_fns
        self.epochs, self.log_step = self.options["epochs"], self.options["log_step"]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.options["amp"] == "fp16")

        self.monitor_mode, _, self.monitor_key = self.options["monitor"].partition(" ")
        self.monitor_best = {"min": math.inf, "max": -math.inf}.get(self.monitor_mode, math.nan)
        self.not_improved_count = 0
        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0  # completed epochs; batches into the next
        self._signal, self.last_save = None, time.monotonic()
        self.writer = None  # TensorBoard, opened in train(): resume must set the global step first
        self.metrics_file, self.profiler = None, None  # metrics.csv and trainer.profile, from train()

    # ---- run state: save and load walk the same dict ---------------------------------------------
    def stateful(self) -> dict:
        """The objects whose `state_dict()` is part of the run state, by checkpoint key (None: absent).
        A subclass adds its own (a sampler, an EMA of the weights) by extending this dict."""
        def named(obj):
            return NamedStates(obj) if isinstance(obj, dict) else obj

        criterion = self.criterion if isinstance(self.criterion, torch.nn.Module) else None  # e.g. a loss's history
        return {"model": self.model, "optimizer": named(self.optimizer), "lr_scheduler": named(self.lr_scheduler),
                "scaler": self.scaler, "criterion": criterion}

    def state_dict(self) -> dict:
        return {
            "version": checkpoint.VERSION,
            "arch": ", ".join(spec["type"] for _, spec in self.config.entries("arch")),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            **{key: None if obj is None else obj.state_dict() for key, obj in self.stateful().items()},
            "monitor_best": self.monitor_best,
            "not_improved_count": self.not_improved_count,
            "rng": dist.gather_objects(checkpoint.rng_state()),  # one entry per rank
            "config": self.config.config,
        }

    def load_state_dict(self, state: dict) -> None:
        """The inverse of `state_dict`. A checkpoint without the model or optimizer is a KeyError; another
        entry it lacks or saved empty (a scheduler or an fp16 scaler added since) keeps its fresh state."""
        for key, obj in self.stateful().items():
            if obj is not None and (key in ("model", "optimizer") or state.get(key)):
                obj.load_state_dict(state[key])
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.global_step = state["global_step"]
        self.monitor_best, self.not_improved_count = state["monitor_best"], state["not_improved_count"]
        rngs = state["rng"]  # one per rank
        if len(rngs) == dist.world_size():
            checkpoint.set_rng_state(rngs[dist.rank()])
        elif dist.is_main():  # another number of processes: the other ranks keep their own seeds (streams differ)
            checkpoint.set_rng_state(rngs[0])

    # ---- the epoch loop ---------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def _valid_epoch(self, epoch: int) -> dict[str, float]:
        return {}

    def train(self) -> dict[str, float]:
        """Train from the epoch after the last completed one; returns the last epoch's results."""
        # Points up to global_step were logged before the checkpoint was saved: a resume hides only later ones.
        self.writer = TensorboardWriter(self.run_dir / "tensorboard", self.options["tensorboard"] and dist.is_main(),
                                        purge_step=self.global_step + 1 if self.global_step else None)
        self.metrics_file = MetricsFile(self.run_dir / "metrics.csv", self.epoch, dist.is_main())
        if dist.is_main():
            self.profiler = start_profiler(self.options.get("profile"), self.run_dir / "profile", self.device)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        result = {}
        try:
            for epoch in range(self.epoch + 1, self.epochs + 1):
                result, stop = self._run_epoch(epoch)
                if dist.broadcast_flag(stop, self.device):
                    log.info("Early stop: '%s' did not improve for %d epochs", self.monitor_key,
                             self.not_improved_count)
                    break
                if epoch < self.epochs and dist.any_flag(self._signal is not None, self.device):
                    # the signal came during validation or saving: latest.pth holds this epoch's end
                    raise Interrupted(self._signal or signal.SIGTERM, self.run_dir / "latest.pth")
            self.writer.hparams(self.config.config, result)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.writer.close()
            if self.profiler is not None:
                self.profiler.stop()
        return result

    def _run_epoch(self, epoch: int) -> tuple[dict[str, float], bool]:
        """Train, maybe validate, step the schedulers, log, monitor, save: (results, early stop)."""
        started = time.perf_counter()
        result = self._train_epoch(epoch)
        validated = epoch % self.options["valid_period"] == 0 or epoch == self.epochs
        if validated:
            result.update(self._valid_epoch(epoch))
        self.epoch, self.batch_in_epoch = epoch, 0
        self._step_schedulers_on_epoch(result)
        result.update(self.learning_rates())
        self._log_epoch(epoch, result, time.perf_counter() - started)
        improved, stop = self._monitor(result, validated)
        self._save_epoch(epoch, improved)
        return result, stop

    def _on_signal(self, signum: int, frame) -> None:
        if self._signal is not None:  # the second Ctrl-C: stop now (temporary files are removed)
            raise KeyboardInterrupt
        self._signal = signum
        log.warning("%s received: finishing this step, then saving a checkpoint (again to quit now)",
                    signal.Signals(signum).name)

    def _stop_requested(self) -> bool:
        """Single process: a flag check. Under DDP the ranks agree at log intervals (no per-step sync)."""
        if not dist.is_distributed():
            return self._signal is not None
        return self.global_step % self.log_step == 0 and dist.any_flag(self._signal is not None, self.device)

    def _stop_now(self) -> None:
        """Save where we are (mid-epoch) and leave with an exit code that says which signal."""
        path = self._save(["latest.pth"])
        raise Interrupted(self._signal or signal.SIGTERM, path)

    def learning_rates(self) -> dict[str, float]:
        """{'lr': ...} for one optimizer, {'lr_<name>': ...} for several (their first parameter group's)."""
        if len(self.optimizers) == 1:
            return {"lr": next(iter(self.optimizers.values())).param_groups[0]["lr"]}
        return {f"lr_{name}": opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}

    def _step_schedulers_on_epoch(self, result: dict) -> None:
        """Epoch schedulers step once an epoch; ReduceLROnPlateau with the monitored value, when there is one."""
        for name, scheduler in self.lr_schedulers.items():
            if self.scheduler_intervals[name] != "epoch":
                continue
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if self.monitor_key in result:  # not on an epoch without validation (valid_period)
                    scheduler.step(result[self.monitor_key])
            else:
                scheduler.step()

    def _monitor(self, result: dict, validated: bool) -> tuple[bool, bool]:
        """(improved, early stop). A non-finite value never counts as an improvement; an epoch that did not
        validate (valid_period) counts neither way for a val_ metric."""
        if self.monitor_mode == "off" or (self.monitor_key.startswith("val_") and not validated):
            return False, False
        if self.monitor_key not in result:
            raise TrainingError(f"trainer.monitor: '{self.monitor_key}' was not logged in epoch {self.epoch}; "
                                f"logged: {', '.join(result)}")
        value = result[self.monitor_key]
        better = value < self.monitor_best if self.monitor_mode == "min" else value > self.monitor_best
        if math.isfinite(value) and better:
            self.monitor_best, self.not_improved_count = value, 0
            return True, False
        self.not_improved_count += 1
        early_stop = self.options["early_stop"]
        return False, bool(early_stop) and self.not_improved_count >= early_stop

    # ---- checkpoints --------------------------------------------------------------------------------
    def _save_epoch(self, epoch: int, improved: bool) -> None:
        """model_best and the periodic file first, latest.pth last: a kill between two files leaves latest.pth
        at the previous epoch, which the resume trains again (and then writes model_best again if it improves)."""
        if not self._weights_finite():  # a finite loss can still come with NaN/Inf gradients
            raise TrainingError(f"model weights are NaN or Inf after epoch {epoch}: not saved, stopping; "
                                f"{self.kept()} (lower the learning rate or clip gradients)")
        period = self.options["save_period"]
        names = ["model_best.pth"] if improved else []
        if improved:
            log.info("Saving model_best.pth (%s = %.6g)", self.monitor_key, self.monitor_best)
        if period and epoch % period == 0:
            names.append(f"checkpoint-epoch{epoch}.pth")
        self._save([*names, "latest.pth"])
        if dist.is_main() and self.options["keep_last"]:
            numbered = {int(m[1]): p for p in self.run_dir.glob("checkpoint-epoch*.pth")
                        if (m := re.fullmatch(r"checkpoint-epoch(\d+)\.pth", p.name))}  # not 'epoch1 (copy).pth'
            for old in sorted(numbered)[: -self.options["keep_last"]]:
                numbered[old].unlink(missing_ok=True)

    def kept(self) -> str:
        """What an error that stops the run leaves to resume from."""
        if self.run_dir and (self.run_dir / "latest.pth").exists():
            return f"the last good checkpoint in {self.run_dir} is kept"
        return "no checkpoint was written yet"

    def _weights_finite(self) -> bool:
        """Every floating-point parameter and buffer is finite (one host sync, once an epoch)."""
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    def _save(self, names: list[str]) -> Path:
        """Write the run state to each of `names` in the run directory (rank 0; the others wait)."""
        state = self.state_dict()  # every rank takes part: it gathers the RNG states
        error = None
        if dist.is_main():
            try:
                data = checkpoint.serialize(state)
                for name in names:
                    checkpoint.save_atomic(data, self.run_dir / name)
            except TrainingError as e:
                error = e
        if dist.broadcast_flag(error is not None, self.device):
            raise error or TrainingError("rank 0 could not write a checkpoint")
        self.last_save = time.monotonic()
        log.debug("Saved %s at epoch %d, step %d", ", ".join(names), self.epoch, self.global_step)
        return self.run_dir / names[-1]

    # ---- logging ------------------------------------------------------------------------------------
    def _log_epoch(self, epoch: int, result: dict, seconds: float) -> None:
        text = "  ".join(f"{k} {v:.6g}" for k, v in result.items())
        log.info("epoch %d/%d  %s  (%.1f s)", epoch, self.epochs, text, seconds)
        self.writer.scalars({f"epoch/{k}": v for k, v in result.items()}, self.global_step)
        self.metrics_file.write(epoch, self.global_step, result)

    def progress_bar(self, epoch: int, total: int, initial: int):
        return progress_bar(total, f"epoch {epoch}/{self.epochs}", initial, enabled=self.options["verbosity"] > 0)
