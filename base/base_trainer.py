"""The epoch loop, monitoring, early stopping, checkpoints and signals. Subclasses train one epoch."""

import logging
import math
import re
import signal
import sys
import time
from pathlib import Path

import torch

from logger import TensorboardWriter
from utils import checkpoint, dist
from utils.errors import TrainingError

log = logging.getLogger("train")


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: the step finished, a checkpoint was saved, the run stops."""

    def __init__(self, signum: int, path: Path):
        launcher = f"torchrun --nproc_per_node={dist.world_size()}" if dist.is_distributed() else "python"
        super().__init__(f"stopped by {signal.Signals(signum).name}; resume with: {launcher} train.py -r {path}")
        self.exit_code = 128 + signum


class BaseTrainer:
    # Every trainer key, with its default and meaning (the README's table mirrors this).
    DEFAULTS = {
        "epochs": 10,  # passes over the training data
        "save_dir": "saved/",  # runs go to <save_dir>/<name>/<run_id>/
        "save_period": 1,  # write checkpoint-epoch<N>.pth every N epochs (0: never)
        "keep_last": 0,  # keep only the N newest checkpoint-epoch<N>.pth (0: keep all)
        "save_step": 0,  # also write latest.pth every N optimizer steps (0: at epoch ends only)
        "verbosity": 2,  # console and log file: 0 warnings, 1 info, 2 debug
        "monitor": "min val_loss",  # "<min|max> <logged metric>" for model_best.pth and early stop, or "off"
        "early_stop": 0,  # stop after N epochs without improvement (0: never)
        "tensorboard": True,  # write TensorBoard event files into the run directory
        "log_step": 50,  # optimizer steps between console, TensorBoard and progress-bar updates
        "amp": "off",  # mixed precision: "off", "bf16", or "fp16" (with a grad scaler)
        "accum_steps": 1,  # micro-batches accumulated per optimizer step
        "grad_clip": 0.0,  # clip the global grad norm to this value (0: off)
        "channels_last": False,  # NHWC memory format for model and 4-D inputs
        "compile": False,  # torch.compile the model
        "on_nonfinite": "stop",  # NaN/Inf loss: "stop" the run, or "skip" the step (a host sync per step)
        "tb_images": 0,  # TensorBoard: a grid of input images every N epochs (0: off)
        "tb_histograms": 0,  # TensorBoard: parameter and gradient histograms every N epochs (0: off)
    }
    CHOICES = {"amp": ("off", "bf16", "fp16"), "on_nonfinite": ("stop", "skip")}
    AT_LEAST_ONE = ("epochs", "log_step", "accum_steps")

    @classmethod
    def check_options(cls, options: dict, logged_names: list[str]) -> str | None:
        """The first problem with the trainer options as 'key: message', or None."""
        for key, choices in cls.CHOICES.items():
            if options[key] not in choices:
                return f"{key}: expected one of {', '.join(choices)}, got {options[key]!r}"
        for key, value in options.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                low = 1 if key in cls.AT_LEAST_ONE else 0
                if value < low:
                    return f"{key}: must be >= {low}, got {value!r}"
        if options["monitor"] != "off":
            match = re.fullmatch(r"(min|max) (\S+)", options["monitor"])
            if not match:
                return f"monitor: expected 'min <metric>', 'max <metric>' or 'off', got {options['monitor']!r}"
            if match[2] not in logged_names:
                from utils.config import suggest

                return (f"monitor: '{match[2]}' is never logged{suggest(match[2], logged_names)}; "
                        f"logged: {', '.join(logged_names)}")
        return None

    def __init__(self, model, criterion, metric_fns: dict, optimizer, config, device: torch.device,
                 run_dir: Path, lr_scheduler=None):
        self.config = config
        self.options = config["trainer"]
        self.device, self.run_dir = device, Path(run_dir)
        self.model = model  # the module whose state is saved; self.forward_model runs the steps
        self.criterion, self.metric_fns = criterion, metric_fns
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        spec = config["lr_scheduler"] or {}
        self.scheduler_interval = spec.get("interval", "epoch")
        self.epochs, self.log_step = self.options["epochs"], self.options["log_step"]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.options["amp"] == "fp16")

        self.monitor_mode, _, self.monitor_key = self.options["monitor"].partition(" ")
        self.monitor_best = {"min": math.inf, "max": -math.inf}.get(self.monitor_mode, math.nan)
        self.not_improved_count = 0
        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0  # completed epochs; batches into the next
        self.tracker_state = None  # the interrupted epoch's running sums, on a mid-epoch resume
        self._signal = None
        self.writer = None  # TensorBoard, opened in train(): resume must set the global step first

    # ---- run state: save and load walk the same dict ---------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": checkpoint.VERSION,
            "arch": self.config["arch"]["type"],
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler else None,
            "scaler": self.scaler.state_dict(),
            "monitor_best": self.monitor_best,
            "not_improved_count": self.not_improved_count,
            "train_tracker": self.train_metrics.state_dict() if self.batch_in_epoch else None,
            "rng": dist.gather_objects(checkpoint.rng_state()),  # one entry per rank
            "config": self.config.config,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler and state["lr_scheduler"]:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"]) if state["scaler"] else None
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.global_step = state["global_step"]
        self.monitor_best, self.not_improved_count = state["monitor_best"], state["not_improved_count"]
        self.tracker_state = state["train_tracker"]
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
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        result = {}
        try:
            for epoch in range(self.epoch + 1, self.epochs + 1):
                started = time.perf_counter()
                result = self._train_epoch(epoch)
                result.update(self._valid_epoch(epoch))
                self.epoch, self.batch_in_epoch = epoch, 0
                self._step_scheduler_on_epoch(result)
                result["lr"] = self.optimizer.param_groups[0]["lr"]
                self._log_epoch(epoch, result, time.perf_counter() - started)
                improved, stop = self._monitor(result)
                self._save_epoch(epoch, improved)
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
        return result

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

    def _step_scheduler_on_epoch(self, result: dict) -> None:
        if self.lr_scheduler is None or self.scheduler_interval != "epoch":
            return
        if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.lr_scheduler.step(result[self.monitor_key])
        else:
            self.lr_scheduler.step()

    def _monitor(self, result: dict) -> tuple[bool, bool]:
        """(improved, early stop). A non-finite value never counts as an improvement."""
        if self.monitor_mode == "off":
            return False, False
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
        if not self._weights_finite():  # a finite loss can still come with NaN/Inf gradients
            raise TrainingError(f"model weights are NaN or Inf after epoch {epoch}: not saved, stopping; the last good "
                                f"checkpoint in {self.run_dir} is kept (lower the learning rate or clip gradients)")
        period = self.options["save_period"]
        names = ["latest.pth"]
        if period and epoch % period == 0:
            names.append(f"checkpoint-epoch{epoch}.pth")
        if improved:
            names.append("model_best.pth")
            log.info("Saving model_best.pth (%s = %.6g)", self.monitor_key, self.monitor_best)
        self._save(names)
        if dist.is_main() and self.options["keep_last"]:
            periodic = sorted(self.run_dir.glob("checkpoint-epoch*.pth"), key=lambda p: int(p.stem[16:]))
            for old in periodic[: -self.options["keep_last"]]:
                old.unlink()

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
        log.debug("Saved %s at epoch %d, step %d", ", ".join(names), self.epoch, self.global_step)
        return self.run_dir / names[0]

    # ---- logging ------------------------------------------------------------------------------------
    def _log_epoch(self, epoch: int, result: dict, seconds: float) -> None:
        text = "  ".join(f"{k} {v:.6g}" for k, v in result.items())
        log.info("epoch %d/%d  %s  (%.1f s)", epoch, self.epochs, text, seconds)
        self.writer.scalars({f"epoch/{k}": v for k, v in result.items()}, self.global_step)

    def progress_bar(self, epoch: int, total: int, initial: int):
        """tqdm over samples, for people watching a terminal; off in CI, in files and on ranks > 0."""
        from tqdm import tqdm

        show = dist.is_main() and self.options["verbosity"] > 0 and sys.stderr.isatty()
        return tqdm(total=total, initial=initial, desc=f"epoch {epoch}/{self.epochs}", unit="img",
                    unit_scale=True, dynamic_ncols=True, leave=False, disable=not show)
