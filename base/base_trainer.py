"""The epoch loop, monitoring, early stopping, checkpoints and signals. Subclasses train one epoch."""

import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch

from config.schema import TRAINER
from logger import TensorboardWriter, progress_bar
from logger.metrics_file import MetricsFile
from logger.tracking import Tracking
from utils import checkpoint, dist, fsdp
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


def one_or_named(objects: dict, several=NamedStates):
    """A role's objects as the checkpoint holds them: the one named 'model' as itself, several as one object by
    name (`several`), none as None. The one rule for "one model or many" after the config's."""
    if not objects:
        return None
    return objects["model"] if objects.keys() == {"model"} else several(objects)


class BaseTrainer:
    DEFAULTS = TRAINER  # the trainer keys a config may set; a subclass may add its own
    LOGGED: tuple[str, ...] = ()  # names a subclass's steps log besides loss and metrics (monitor may name them)
    logger = log  # the run's log (console and train.log), as `self.logger.info(...)` in the classic template

    def __init__(self, config, device: torch.device, models: dict, criterion, metric_fns: dict, optimizers: dict,
                 lr_schedulers: dict, run=None):
        """`models`, `optimizers` and `lr_schedulers` by name (config.build_named): one of each is named 'model';
        with several, an optimizer has the name of the model it trains, a scheduler that of its optimizer.
        `run` (runs/run.py): the run whose directory the checkpoints go to, once it started."""
        self.config, self.options, self.device, self.run = config, config["trainer"], device, run
        self.models, self.optimizers, self.lr_schedulers = models, optimizers, lr_schedulers
        self.model = one_or_named(models, torch.nn.ModuleDict)  # what is saved as "model"
        self.optimizer, self.lr_scheduler = optimizers.get("model"), lr_schedulers.get("model")  # of one model
        specs = config.entries("lr_scheduler")
        self.scheduler_intervals = {name: specs[name].get("interval", "epoch") for name in lr_schedulers}
        self.criterion, self.metric_fns = criterion, metric_fns
        self.epochs, self.log_step = self.options["epochs"], self.options["log_step"]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.options["amp"] == "fp16")

        self.monitor_mode, _, self.monitor_key = self.options["monitor"].partition(" ")
        self.monitor_best = {"min": math.inf, "max": -math.inf}.get(self.monitor_mode, math.nan)
        self.not_improved_count = 0
        self.monitor_value = math.nan  # the last epoch's monitored value (NaN: none), recorded for save_top_k
        self.monitor_changed: str | None = None  # a resume's checkpoint monitor, when another (log_start says so)
        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0  # completed epochs; batches into the next
        self._signal, self.last_save = None, time.monotonic()
        self.writer = None  # TensorBoard, opened in train(): resume must set the global step first
        self.metrics_file, self.profiler = None, None  # metrics.csv and trainer.profile, from train()
        # called with (epoch, results) after each epoch's checkpoint; an exception stops the run there (a sweep's
        # pruning, runs/sweep.py)
        self.epoch_callbacks: list[Callable[[int, dict[str, float]], None]] = []
        self.tracker, self.tracking_run_id = None, None  # the experiment tracker, from train(), and its run's id

    # ---- run state: save and load walk the same dict ---------------------------------------------
    def stateful(self) -> dict:
        """The objects whose `state_dict()` is part of the run state, by checkpoint key (None: absent).
        A subclass adds its own (a sampler, an EMA of the weights) by extending this dict."""
        criterion = self.criterion if isinstance(self.criterion, torch.nn.Module) else None  # e.g. a loss's history
        return {"model": self.model, "optimizer": one_or_named(self.optimizers),
                "lr_scheduler": one_or_named(self.lr_schedulers), "scaler": self.scaler, "criterion": criterion}

    def state_dict(self) -> dict:
        return {
            "version": checkpoint.VERSION,
            "arch": ", ".join(spec["type"] for spec in self.config.entries("arch").values()),
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "global_step": self.global_step,
            **{key: None if obj is None else obj.state_dict() for key, obj in self.stateful().items()},
            "monitor": self.options["monitor"], "monitor_best": self.monitor_best, "monitor_value": self.monitor_value,
            "not_improved_count": self.not_improved_count,
            "rng": dist.gather_objects(checkpoint.rng_state()),  # one entry per rank
            "config": self.config.config, "finetuned_from": self.config["finetuned_from"] or {},
            "tracking_run_id": self.tracking_run_id or "",  # a resume continues the same tracked run
        }

    def load_state_dict(self, state: dict) -> None:
        """The inverse of `state_dict`. A checkpoint without the model or optimizer is a KeyError; another
        entry it lacks or saved empty (a scheduler or an fp16 scaler added since) keeps its fresh state. The best
        value and early-stop count start afresh when the checkpoint's monitor is another (older ones: taken as this)."""
        for key, obj in self.stateful().items():
            value = state[key] if key in ("model", "optimizer") else state.get(key)  # None: loaded (runs/sharded.py)
            if obj is not None and value is not None and (value or key in ("model", "optimizer")):
                obj.load_state_dict(value)
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.global_step = state["global_step"]
        self.tracking_run_id = state.get("tracking_run_id") or None
        if state.get("monitor", self.options["monitor"]) == self.options["monitor"]:
            self.monitor_best, self.not_improved_count = state["monitor_best"], state["not_improved_count"]
            self.monitor_value = state.get("monitor_value", math.nan)
        else:
            self.monitor_changed = state["monitor"]
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
        self.writer = TensorboardWriter(self.run.dir / "tensorboard", self.options["tensorboard"] and dist.is_main(),
                                        purge_step=self.global_step + 1 if self.global_step else None)
        self.metrics_file = MetricsFile(self.run.dir / "metrics.csv", self.epoch, dist.is_main())
        if dist.is_main():
            self.profiler = start_profiler(self.options.get("profile"), self.run.dir / "profile", self.device)
        self.tracker = Tracking(self.config.resolved, dist.is_main())
        self.tracking_run_id = self.tracker.start(self.run.dir, self.tracking_run_id, self.run.tracking_parent)
        self.tracker.log_rows(self.metrics_file.rows)  # epochs saved but not tracked yet (a stop in between)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        result, finished = {}, False
        try:
            for epoch in range(self.epoch + 1, self.epochs + 1):
                result, stop = self._run_epoch(epoch)
                if dist.broadcast_flag(stop, self.device):
                    log.info("Early stop: '%s' did not improve for %d epochs", self.monitor_key,
                             self.not_improved_count)
                    break
                if epoch < self.epochs and dist.any_flag(self._signal is not None, self.device):
                    # the signal came during validation or saving: the latest checkpoint holds this epoch's end
                    raise Interrupted(self._signal or signal.SIGTERM, self.run.latest)
            self.writer.hparams(self.config.config, result)
            finished = True
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.writer.close()
            self.tracker.end("FINISHED" if finished else "KILLED" if self._signal else "FAILED")
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
        self.on_epoch_end(epoch, result)
        self.epoch, self.batch_in_epoch = epoch, 0
        result.update(self.learning_rates())  # the epoch's own, before the epoch schedulers step
        self._step_schedulers_on_epoch(result)
        self._log_epoch(epoch, result, time.perf_counter() - started)
        improved, stop = self._monitor(result, validated)
        self._save_epoch(epoch, improved)
        self.tracker.log_metrics(result, epoch)  # after the checkpoint: an epoch trained again was never sent
        for callback in self.epoch_callbacks:
            callback(epoch, result)
        return result, stop

    # ---- hooks: what a subclass (or the loss, or a model) may add to the loop --------------------------
    def on_epoch_start(self, epoch: int) -> None:
        """Before the first batch of `epoch` (from 1), and again when a run resumes in the middle of it: set here
        what follows from the epoch (an annealing weight); don't accumulate. Calls the loss's and the models'
        `on_epoch_start(epoch)`, where they have one."""
        for hook in self._hooks("on_epoch_start"):
            hook(epoch)

    def on_epoch_end(self, epoch: int, result: dict[str, float]) -> None:
        """After `epoch` trained (and validated: `result` holds its values), once, before its checkpoint, which
        holds what it changed. Calls the loss's and the models' `on_epoch_end(epoch)`, where they have one."""
        for hook in self._hooks("on_epoch_end"):
            hook(epoch)

    def on_batch_end(self, number: int, result: dict) -> None:
        """After training batch `number` of the epoch (from 0) and its optimizer step; `result` is what
        train_step returned (tensors: reading a value with .item() waits for the device)."""

    def _hooks(self, name: str) -> list:
        return [getattr(part, name) for part in (self.criterion, *self.models.values())
                if callable(getattr(part, name, None))]

    def _on_signal(self, signum: int, frame) -> None:
        """The first SIGINT/SIGTERM stops at the end of the step, with a save; a second Ctrl-C stops now (temporary
        files are removed). SIGTERM again changes nothing: a scheduler may send it to every process while torchrun
        forwards its own, and a dead torchrun agent's parent-death signal comes once for each of its threads."""
        if self._signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self._signal = signum
        log.warning("%s received: finishing this step, then saving a checkpoint (Ctrl-C to quit now)",
                    signal.Signals(signum).name)

    def _stop_requested(self) -> bool:
        """Single process: a flag check. Under DDP the ranks agree at log intervals (no per-step sync)."""
        if not dist.is_distributed():
            return self._signal is not None
        return self.global_step % self.log_step == 0 and dist.any_flag(self._signal is not None, self.device)

    def learning_rates(self) -> dict[str, float]:
        """Each optimizer's (first parameter group's) lr: 'lr' for the one model's, 'lr_<name>' for several."""
        return {"lr" if name == "model" else f"lr_{name}": opt.param_groups[0]["lr"]
                for name, opt in self.optimizers.items()}

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
        self.monitor_value = math.nan
        if self.monitor_mode == "off" or (self.monitor_key.startswith("val_") and not validated):
            return False, False
        if self.monitor_key not in result:
            raise TrainingError(f"trainer.monitor: '{self.monitor_key}' was not logged in epoch {self.epoch}; "
                                f"logged: {', '.join(result)}")
        value = self.monitor_value = float(result[self.monitor_key])
        better = value < self.monitor_best if self.monitor_mode == "min" else value > self.monitor_best
        if math.isfinite(value) and better:
            self.monitor_best, self.not_improved_count = value, 0
            return True, False
        self.not_improved_count += 1
        early_stop = self.options["early_stop"]
        return False, bool(early_stop) and self.not_improved_count >= early_stop

    # ---- checkpoints --------------------------------------------------------------------------------
    def _save_epoch(self, epoch: int, improved: bool) -> None:
        if improved:
            log.info("New best %s = %.6g", self.monitor_key, self.monitor_best)
        self._save(epoch, improved)

    def _save(self, epoch: int | None = None, improved: bool = False) -> None:
        """Write the run state (rank 0; the others wait): at the end of `epoch`, or mid-epoch (None). Weights or
        optimizer state with a NaN or Inf (a NaN loss or gradient since the last check) are never written: the run
        stops and its last good checkpoint stays."""
        state = self.state_dict()  # every rank takes part: it gathers the RNG states
        local = [fsdp.local(t) for t in checkpoint.tensors_in((state["model"], state["optimizer"]))]  # FSDP: shards
        if dist.any_flag(not checkpoint.all_finite(local), self.device):
            where = f"after epoch {epoch}" if epoch else f"in epoch {self.epoch + 1} at step {self.global_step}"
            raise TrainingError(f"model weights or optimizer state are NaN or Inf {where}: not saved, stopping; "
                                f"{self.run.left_to_resume()} (lower the learning rate or clip gradients)")
        if self.options["strategy"] == "fsdp":  # every rank writes its shards
            self.run.save_sharded(state, self.models, self.optimizers, epoch, improved)
        else:
            dist.on_main(lambda: self.run.save(state, epoch, improved), self.device,
                         TrainingError("rank 0 could not write a checkpoint"))
        self.last_save = time.monotonic()

    # ---- logging ------------------------------------------------------------------------------------
    def _log_epoch(self, epoch: int, result: dict, seconds: float) -> None:
        text = "  ".join(f"{k} {v:.6g}" for k, v in result.items())
        log.info("epoch %d/%d  %s  (%.1f s)", epoch, self.epochs, text, seconds)
        self.writer.scalars({f"epoch/{k}": v for k, v in result.items()}, self.global_step)
        self.metrics_file.write(epoch, self.global_step, result)

    def progress_bar(self, epoch: int, total: int, initial: int):
        return progress_bar(total, f"epoch {epoch}/{self.epochs}", initial, self.options["verbosity"] > 0,
                            self.options["progress_seconds"])
