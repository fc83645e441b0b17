"""One epoch of training and evaluation. Subclass Trainer and override `train_step`/`valid_step`
to change what a step computes; the loop stays this one."""

import contextlib
import logging
from collections.abc import Callable

import torch

from base import BaseTrainer
from utils import dist
from utils.errors import TrainingError

log = logging.getLogger("train")


class MetricTracker:
    """Sample-weighted sums of the loss and metrics, kept on the device, and the losses of the batches
    since the last NaN/Inf check. `result()` is the only host sync; under DDP it sums over ranks, so
    every rank sees the global average."""

    def __init__(self, metric_fns: dict[str, Callable], device: torch.device):
        self.names = ["loss", *metric_fns]
        self.metric_fns, self.device = metric_fns, device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.names), device=self.device)
        self.count = 0  # samples, known on the host: no sync
        self.mark(0)

    def mark(self, batch: int) -> None:
        """Start the interval buffers here: the next update is batch number `batch` of the epoch."""
        self.losses, self.losses_from = [], batch
        self.logged = (self.sums.clone(), self.count)

    def update(self, loss: torch.Tensor, output: torch.Tensor, target: torch.Tensor) -> None:
        n = target.shape[0]
        values = torch.stack([loss.float(), *(fn(output, target).float() for fn in self.metric_fns.values())])
        self.sums.add_(values, alpha=n)
        self.count += n
        self.losses.append(loss)

    def result(self, reduce: bool = True, since: tuple | None = None) -> dict[str, float]:
        """Averages since the last reset (or since `since`, an earlier (sums, count)), summed over ranks if `reduce`."""
        sums, count = self.sums, self.count
        if since is not None:
            sums, count = sums - since[0], count - since[1]
        totals = torch.cat([sums, torch.tensor([float(count)], device=self.device)])
        if reduce:
            totals = dist.all_reduce_sum(totals.clone())
        values = (totals[:-1] / totals[-1].clamp(min=1)).tolist()
        return dict(zip(self.names, values))

    def interval_result(self) -> dict[str, float]:
        """This rank's averages since the previous call (the log interval)."""
        since, self.logged = self.logged, (self.sums.clone(), self.count)
        return self.result(reduce=False, since=since)

    def first_nonfinite(self) -> int | None:
        """The epoch's batch number of the first NaN/Inf loss since the previous call, or None (a host sync)."""
        if not self.losses:
            return None
        bad = torch.nonzero(~torch.isfinite(torch.stack(self.losses))).flatten().tolist()
        first = self.losses_from + bad[0] if bad else None
        self.mark(self.losses_from + len(self.losses))
        return first

    def state_dict(self) -> dict:
        """The sums of every rank added up (under DDP every rank must call this, as for a checkpoint)."""
        sums = dist.all_reduce_sum(self.sums.clone())
        count = int(dist.all_reduce_sum(torch.tensor(self.count, device=self.device)))
        return {"sums": sums, "count": count}

    def load_state_dict(self, state: dict) -> None:
        """Rank 0 takes the saved totals and the other ranks keep zeros, so `result()` counts them once."""
        if dist.is_main():
            self.sums, self.count = state["sums"].to(self.device), state["count"]


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(step: Callable, loader, metric_fns: dict[str, Callable], device: torch.device, amp: str = "off",
             progress=None) -> dict[str, float]:
    """Loss and metrics of `step(data, target) -> (loss, output)` over `loader`, sample-weighted and
    reduced over ranks. Validation and test.py both use this."""
    tracker = MetricTracker(metric_fns, device)
    for data, target in loader:
        data, target = data.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(device, amp):
            loss, output = step(data, target)
        tracker.update(loss, output, target)
        if progress is not None:
            progress.update(target.shape[0])
    return tracker.result()


class Trainer(BaseTrainer):
    def __init__(self, model, criterion, metric_fns, optimizer, config, device, run_dir, data_loader,
                 valid_data_loader=None, lr_scheduler=None):
        super().__init__(model, criterion, metric_fns, optimizer, config, device, run_dir, lr_scheduler)
        self.data_loader, self.valid_data_loader = data_loader, valid_data_loader
        self.train_metrics = MetricTracker(metric_fns, device)
        self.accum_steps, self.grad_clip = self.options["accum_steps"], self.options["grad_clip"]
        self.memory_format = torch.channels_last if self.options["channels_last"] else torch.preserve_format
        self.forward_model = model  # what steps call: may be compiled and/or wrapped in DDP
        if self.options["compile"]:
            self.forward_model = torch.compile(self.forward_model)
        if dist.is_distributed():
            ids = [device.index] if device.type == "cuda" else None
            self.forward_model = torch.nn.parallel.DistributedDataParallel(self.forward_model, device_ids=ids)

    def stateful(self) -> dict:
        return {**super().stateful(), "train_tracker": self.train_metrics}  # an interrupted epoch's running sums

    def train_step(self, data: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward one batch: (loss, output). Override for custom work; backward and step stay in the loop."""
        output = self.forward_model(data)
        return self.criterion(output, target), output

    def valid_step(self, data: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(data)  # the plain module: no DDP buffer sync in evaluation
        return self.criterion(output, target), output

    # ---- one epoch: move the batch, step, maybe update the weights, maybe the interval work ----------------
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        skip, n_batches = self._start_epoch(epoch), len(self.data_loader)
        batch_size = self.data_loader.batch_size
        bar = self.progress_bar(epoch, n_batches * batch_size, skip * batch_size)
        for batch_idx, (data, target) in enumerate(self.data_loader.batches(skip), start=skip):
            data = data.to(self.device, non_blocking=True, memory_format=self.memory_format)
            target = target.to(self.device, non_blocking=True)
            last = batch_idx + 1 == n_batches
            stepping = (batch_idx + 1) % self.accum_steps == 0 or last
            loss, output = self._forward_backward(data, target, stepping, self._group_size(batch_idx, n_batches))
            if self.options["on_nonfinite"] == "skip" and self._skip_nonfinite(loss, epoch):
                continue
            self.train_metrics.update(loss.detach(), output.detach(), target)
            if stepping:
                self._optimizer_step(histograms=last and self._due(epoch, "tb_histograms"))
                self.batch_in_epoch = batch_idx + 1
                self._after_step(epoch, bar, last)
        bar.close()
        return self._end_epoch(epoch)

    def _start_epoch(self, epoch: int) -> int:
        """Prepare the epoch; returns the batches to skip (> 0 only when resuming in the middle of it)."""
        self.model.train()
        skip = self.batch_in_epoch
        if not skip:  # a mid-epoch resume restored the running sums (load_state_dict)
            self.train_metrics.reset()
        self.train_metrics.mark(skip)
        self.skipped_steps = 0  # on_nonfinite: skip
        self.data_loader.set_epoch(epoch)
        self._log_images(epoch)
        return skip

    def _group_size(self, batch_idx: int, n_batches: int) -> int:
        """Micro-batches in this batch's accumulation group: accum_steps, or fewer for the epoch's last group."""
        return min(self.accum_steps, n_batches - batch_idx // self.accum_steps * self.accum_steps)

    def _forward_backward(self, data, target, stepping: bool, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """train_step under autocast, then backward of the loss scaled for fp16 and averaged over the
        accumulation group (a short last group is averaged over its own size, as in timm)."""
        with self._grad_sync(stepping):
            with autocast(self.device, self.options["amp"]):
                loss, output = self.train_step(data, target)
            self.scaler.scale(loss / group_size if group_size > 1 else loss).backward()
        return loss, output

    def _after_step(self, epoch: int, bar, last: bool) -> None:
        """Every log_step optimizer steps (and at the epoch's end): the NaN/Inf check and the logs; then a
        signal's stop, and every save_step steps a save."""
        if self.global_step % self.log_step == 0 or last:
            self._check_finite(epoch)
            self._log_progress(bar)
        if self._stop_requested():
            bar.close()
            self._stop_now()
        if self.options["save_step"] and self.global_step % self.options["save_step"] == 0:
            self._save(["latest.pth"])

    def _end_epoch(self, epoch: int) -> dict[str, float]:
        if not self.train_metrics.count:  # never report a metric of 0 for an epoch that learnt nothing
            why = ("every step had a NaN/Inf loss and was skipped" if self.skipped_steps else
                   "no training batch: is batch_size larger than the training data, with drop_last?")
            raise TrainingError(f"epoch {epoch} trained no step ({why}); stopping")
        result = self.train_metrics.result()
        if self.skipped_steps:
            result["skipped_steps"] = self.skipped_steps
        return result

    def _grad_sync(self, stepping: bool):
        """Under DDP, all-reduce gradients only in the micro-batch that steps (no_sync while accumulating)."""
        if stepping or not isinstance(self.forward_model, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.forward_model.no_sync()

    def _skip_nonfinite(self, loss: torch.Tensor, epoch: int) -> bool:
        """on_nonfinite: skip. A NaN/Inf loss on any rank drops the gradients accumulated for this step
        and stays out of the metrics. A host sync per batch, by request; all ranks skip together."""
        if not dist.any_flag(not torch.isfinite(loss).item(), self.device):
            return False
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        log.warning("Skipped a step in epoch %d: loss is NaN or Inf (%d skipped this epoch)", epoch, self.skipped_steps)
        return True

    def _optimizer_step(self, histograms: bool) -> None:
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if histograms:
            self.writer.histograms(self.model, self.global_step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None and self.scheduler_interval == "step":
            self.lr_scheduler.step()
        self.global_step += 1

    def _valid_epoch(self, epoch: int) -> dict[str, float]:
        if self.valid_data_loader is None:
            return {}
        self.model.eval()
        result = evaluate(self.valid_step, self.valid_data_loader, self.metric_fns, self.device, self.options["amp"])
        return {f"val_{k}": v for k, v in result.items()}

    def _check_finite(self, epoch: int) -> None:
        """Stop on a NaN/Inf loss among the batches since the last check: no per-step sync. Nothing is
        saved, so model_best.pth and the last good checkpoint stay as they were. Under DDP every rank stops.
        (With on_nonfinite: skip no NaN reaches the tracker.)"""
        bad = self.train_metrics.first_nonfinite()
        if dist.any_flag(bad is not None, self.device):
            where = f"batch {bad + 1}" if bad is not None else "on another rank"
            raise TrainingError(f"loss is NaN or Inf at epoch {epoch}, {where}: stopping; the last good "
                                f"checkpoint in {self.run_dir} is kept (lower the learning rate or clip gradients)")

    def _log_progress(self, bar) -> None:
        values = self.train_metrics.interval_result()
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        self.writer.scalars({f"step/{k}": v for k, v in values.items()}, self.global_step)
        bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
        bar.update(min(self.batch_in_epoch * self.data_loader.batch_size, bar.total) - bar.n)

    def _due(self, epoch: int, option: str) -> bool:
        period = self.options[option]
        return bool(period) and self.writer.enabled and epoch % period == 0

    def _log_images(self, epoch: int) -> None:
        if self._due(epoch, "tb_images"):
            data, _ = next(self.data_loader.batches())
            self.writer.image_grid("inputs", data, self.global_step)
