"""One epoch of training and evaluation. Subclass Trainer and override `train_step`/`valid_step` to change
what a step computes (README: "Custom training steps"); the loop stays this one."""

import contextlib
import copy
import inspect
import itertools
import logging
import math
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch

from base.base_trainer import BaseTrainer, Interrupted
from config.schema import signature_params
from trainer.optim_step import OptimStep
from utils import dist, fsdp
from utils.errors import SampleError, TrainingError, UserError, one_line
from utils.profiler import profiled

log = logging.getLogger("train")
NOT_LOGGED = ("output", "target")  # what a step returns for the metrics, not as a value of its own
LOSS_INPUTS = ("indices", "epoch")  # what a loss may ask for by name, besides (output, target)


def to_device(batch, device: torch.device, memory_format=torch.preserve_format):
    """A batch of any structure (tensor, tuple, list, dict, nested) with every tensor on `device`; 4-D
    tensors in `memory_format` (channels_last)."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 4 and memory_format is not torch.preserve_format:
            return batch.to(device, non_blocking=True, memory_format=memory_format)
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):  # before Mapping: an abstract class's isinstance costs more per step
        return type(batch)([to_device(value, device, memory_format) for value in batch])
    if isinstance(batch, Mapping):
        return {key: to_device(value, device, memory_format) for key, value in batch.items()}
    return batch


def first_tensor(batch) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    return next((t for t in map(first_tensor, values) if t is not None), None)


def samples_in(result: Mapping, batch) -> int:
    """How many samples a step's values average over: the target's, else the batch's first tensor's."""
    target = result.get("target")
    tensor = target if isinstance(target, torch.Tensor) and target.dim() else first_tensor(batch)
    return tensor.shape[0] if tensor is not None and tensor.dim() else 1


def data_and_target(batch, step: str) -> tuple:
    """The default steps' reading of a batch: (data, target, ...) or {'data': ..., 'target': ...}."""
    try:
        return (batch["data"], batch["target"]) if isinstance(batch, Mapping) else (batch[0], batch[1])
    except (KeyError, IndexError, TypeError):
        shape = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise UserError(f"{step} reads batches as (data, target, ...) or {{'data', 'target'}}, got {shape}: "
                        "override train_step and valid_step for other batches") from None


def describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {str(value)[:60]!r}"


@contextlib.contextmanager
def failing_batch(what: str):
    """An error of the data, the model or the loss on a batch (a wrong shape, a label out of range, a damaged
    file) as one line naming `what` and the error's own last words (a worker's error is a whole traceback)."""
    try:
        yield
    except UserError as e:  # a step or metric of the wrong kind, a file a data loader cannot read
        raise UserError(f"{what}: {one_line(e)}") from None
    except (RuntimeError, IndexError, ValueError, TypeError, OSError) as e:
        raise UserError(f"{what}: {type(e).__name__}: {one_line(e)[:300]}") from None


class MetricTracker:
    """Sample-weighted sums, on the device, of what steps return: 'loss', the other scalar values, and each
    metric of (output, target) of the batches measured (`update(..., measure=True)`; training measures only the
    batches of logging steps unless trainer.train_metrics is "every_step"); and the losses of the batches since
    the last NaN/Inf check. The names are fixed by the first batch, which is checked (and takes a mid-epoch
    checkpoint's sums by name). Only `result`, `interval_result` and `first_nonfinite` read the sums on the host
    (a sync each); under DDP `result` sums over ranks, so every rank sees the global average."""

    def __init__(self, metric_fns: dict[str, Callable], device: torch.device, step: str = "step"):
        self.metric_fns, self.device, self.step = metric_fns, device, step
        self.names: list[str] | None = None
        self.keys: list[str] | None = None  # the step's own values; None until a batch fixes them
        self.reset()

    def reset(self) -> None:
        if self.keys is None:  # names of a checkpoint: a new epoch takes the next batch's
            self.names = None
        self.sums = torch.zeros(len(self.names or ()), device=self.device)
        self.count = self.measured = 0  # samples of every batch, of the measured ones; known on the host: no sync
        self.mark(0)

    def mark(self, batch: int) -> None:
        """Start the interval buffers here: the next update is batch number `batch` of the epoch."""
        self.losses, self.losses_from = [], batch
        self.logged = (self.sums.tolist(), self.count, self.measured)

    def start(self, result) -> None:
        """Fix the names from a step's first result, checking that it is a mapping of scalar tensors."""
        if not isinstance(result, Mapping) or not isinstance(result.get("loss"), torch.Tensor):
            raise UserError(f"{self.step} returned {describe(result)}: expected a mapping with a 'loss' tensor "
                            "(and optionally 'output', 'target' and other scalar tensors to log)")
        values = {key: value for key, value in result.items() if key not in NOT_LOGGED}
        if self.metric_fns and not {"output", "target"} <= result.keys():
            raise UserError(f"{self.step} returned no 'output' and 'target' for the metrics {list(self.metric_fns)}")
        with torch.no_grad():
            values.update({name: fn(result["output"], result["target"]) for name, fn in self.metric_fns.items()})
        for name, value in values.items():
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                who = f"metric '{name}'" if name in self.metric_fns else f"{self.step}['{name}']"
                raise UserError(f"{who} returned {describe(value)}, not a scalar tensor (keep it a tensor: no .item())")
        self.keys = ["loss", *(key for key in values if key != "loss" and key not in self.metric_fns)]
        names = [*self.keys, *self.metric_fns]
        if self.names is None:
            self.sums = torch.zeros(len(names), device=self.device)
        else:  # a mid-epoch checkpoint's running sums, by the names they were saved with
            missing = [name for name in names if name not in self.names]
            if missing:
                raise UserError(f"the checkpoint is from the middle of an epoch and has no running sum of "
                                f"{', '.join(missing)}: resume from an epoch-end checkpoint or keep the metrics")
            self.sums = self.sums[[self.names.index(name) for name in names]]
        self.names = names
        self.logged = (self.sums.tolist(), self.count, self.measured)

    def update(self, result: Mapping, n: int, measure: bool = True) -> None:
        """Add a batch of `n` samples: its step values, and its metrics if `measure`."""
        if self.keys is None:
            self.start(result)
        values = [result[key].detach().float() for key in self.keys]
        self.losses.append(values[0])
        self.count += n
        if not (measure and self.metric_fns):  # one value (the loss alone): no stack, one kernel less per step
            self.sums[: len(values)].add_(values[0] if len(values) == 1 else torch.stack(values), alpha=n)
            return
        with torch.no_grad():
            values += [fn(result["output"], result["target"]).float() for fn in self.metric_fns.values()]
        self.sums.add_(torch.stack(values), alpha=n)
        self.measured += n

    def result(self) -> dict[str, float]:
        """Averages since the last reset, summed over ranks: the step values over every batch, the metrics over
        the measured ones."""
        totals = torch.cat([self.sums, torch.tensor([float(self.count), float(self.measured)], device=self.device)])
        *sums, count, measured = dist.all_reduce_sum(totals).tolist()
        return self.averages(sums, count, measured)

    def interval_result(self) -> dict[str, float]:
        """This rank's averages since the previous call (the log interval)."""
        sums, count, measured = self.sums.tolist(), self.count, self.measured
        (sums_before, count_before, measured_before), self.logged = self.logged, (sums, count, measured)
        return self.averages([total - before for total, before in zip(sums, sums_before)], count - count_before,
                             measured - measured_before)

    def averages(self, sums: list[float], count: float, measured: float) -> dict[str, float]:
        n_steps = len(self.names or ()) - len(self.metric_fns)  # the names are [*keys, *metrics]
        return {name: total / max(count if i < n_steps else measured, 1)
                for i, (name, total) in enumerate(zip(self.names or (), sums))}

    def first_nonfinite(self) -> int | None:
        """The epoch's batch number of the first NaN/Inf loss since the previous call, or None. One host sync: the
        running sum of the loss stays finite until a loss is not (the run stops at the first check that sees it),
        so the batches' own losses are read only then."""
        losses, first = self.losses, self.losses_from
        self.losses, self.losses_from = [], first + len(losses)
        if not losses or math.isfinite(self.sums[0].item()):
            return None
        bad = torch.nonzero(~torch.isfinite(torch.stack(losses))).flatten().tolist()
        return first + bad[0] if bad else None  # none: the sum overflowed, no loss is NaN/Inf

    def state_dict(self) -> dict:
        """Every rank's own sums, in rank order (under DDP every rank must call this, as for a checkpoint)."""
        own = {"sums": self.sums.to("cpu", copy=True), "count": self.count, "measured": self.measured}
        return {"names": self.names, "ranks": dist.gather_objects(own)}

    def load_state_dict(self, state: dict) -> None:
        """On as many ranks each takes its own sums back, so the epoch's totals are added up in the order of a run
        never stopped; on another number, rank 0 takes all and the others zeros, so `result()` counts them once.
        The names stay the checkpoint's until the next batch's `start` takes the sums by name."""
        self.names = state.get("names") or ["loss", *self.metric_fns]  # checkpoints before names were saved
        self.keys = None
        self.sums, self.count, self.measured = torch.zeros(len(self.names), device=self.device), 0, 0
        ranks = state.get("ranks") or [state]  # checkpoints before every rank's sums were saved: the total
        ranks = [{"measured": r["count"], **r} for r in ranks]  # checkpoints before then measured every batch
        if len(ranks) == dist.world_size():
            own = ranks[dist.rank()]
            self.sums, self.count, self.measured = own["sums"].to(self.device), own["count"], own["measured"]
        elif dist.is_main():
            self.sums = sum(r["sums"] for r in ranks).to(self.device)
            self.count, self.measured = sum(r["count"] for r in ranks), sum(r["measured"] for r in ranks)


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class Trainer(BaseTrainer):
    """Supervised training of (data, target) batches by default; a subclass changes `train_step`/`valid_step`."""

    def __init__(self, config, device, models, criterion, metric_fns, optimizers, lr_schedulers, data_loader,
                 valid_data_loader=None, run=None):
        super().__init__(config, device, models, criterion, metric_fns, optimizers, lr_schedulers, run)
        self._check_overrides()
        self.data_loader, self.valid_data_loader = data_loader, valid_data_loader
        self.data_fingerprint = data_loader.fingerprint()
        self.train_metrics = MetricTracker(metric_fns, device, f"{type(self).__name__}.train_step")
        self.every_step_metrics = self.options["train_metrics"] == "every_step"
        self.memory_format = torch.channels_last if self.options["channels_last"] else torch.preserve_format
        self.forward_models = {name: self._wrap(m) for name, m in self.models.items()}  # what steps call
        self.forward_model = next(iter(self.forward_models.values()))
        self.optim_step = OptimStep(self.optimizers, self.scaler, self.options, device)
        self.optimize = self.optim_step  # the name steps written before the step object use
        self.skipped_steps = 0  # on_nonfinite: skip, in this epoch
        forward = criterion.forward if isinstance(criterion, torch.nn.Module) else criterion
        self.loss_asks = [name for name in LOSS_INPUTS if name in signature_params(forward)]
        self.loss_inputs: dict = {}  # given to the criterion with each batch (compute_loss)

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as the training steps call it: compiled and/or in DDP (its state is saved unwrapped)."""
        if self.options["compile"]:
            model = torch.compile(model)
        if dist.is_distributed() and any(p.requires_grad for p in model.parameters()) and not fsdp.is_sharded(model):
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    def _check_overrides(self) -> None:
        """A subclass written for the old contract, or for the classic template, fails here with the fix."""
        where = f"{self.config.source}: trainer.type: {type(self).__name__}"
        for name in ("train_step", "valid_step"):
            if len(inspect.signature(getattr(self, name)).parameters) != 1:
                raise UserError(f"{where}.{name} must take one argument, the batch, and return a mapping with "
                                "'loss' (README: Custom training steps)")
        if type(self)._train_epoch is not Trainer._train_epoch:
            raise UserError(f"{where} overrides _train_epoch: the loop validates, steps the schedulers and counts "
                            "steps for you; override train_step and valid_step instead")

    def stateful(self) -> dict:
        return {**super().stateful(), "train_tracker": self.train_metrics}  # an interrupted epoch's running sums

    def state_dict(self) -> dict:
        """The run state, the data fingerprint (a resume compares it), the outputs' class names (predict.py) and
        the values the config read from the data (test.py and predict.py build with them)."""
        return {**super().state_dict(), "data": self.data_fingerprint,
                "classes": list(getattr(self.data_loader, "classes", [])), "data_values": self.config.data_values}

    def check_first_batches(self) -> None:
        """The first training batch through the real training step (train_step, the metrics, the loss's backward;
        no optimizer update) and the first validation batch through valid_step, before the run starts: wrong
        shapes, labels out of range, a backward that fails and damaged data stop in one line before anything is
        written. Nothing changes: the models' and the loss's states, the gradients and every generator are put back."""
        source = self.config.source
        if self.valid_data_loader is None and self.monitor_key.startswith("val_"):
            raise UserError(f"{source}: trainer.monitor: '{self.monitor_key}' needs validation data, and the data "
                            f"loader gives none (does validation_split round to 0 of {self.data_loader.n_samples} "
                            "samples?)")
        for split, loader in (("training", self.data_loader), ("validation", self.valid_data_loader)):
            if loader is not None and len(loader) == 0:
                raise UserError(f"{source}: data_loader: the {split} data give no batch ({loader.n_samples} samples, "
                                f"batch_size {loader.batch_size}{', drop_last' if loader.drop_last else ''})")
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), \
                warnings.catch_warnings(action="ignore"):
            with failing_batch(f"{source}: the first training batch fails"):
                self._rehearse(next(self.data_loader.batches()))
            if self.valid_data_loader is not None:
                with failing_batch(f"{source}: the first validation batch fails"):
                    self.evaluate(self.valid_data_loader, max_batches=1)

    def _rehearse(self, batch) -> None:
        """train_step and the backward of its loss on `batch`, then every state as it was and no gradient."""
        parts = [*self.models.values(), *([self.criterion] if isinstance(self.criterion, torch.nn.Module) else [])]
        states = [copy.deepcopy(part.state_dict()) for part in parts]  # batch norm statistics, a loss's buffers
        self.optim_step.begin(0, 1)
        self.optim_step.rehearsal = True
        try:
            self.train_mode(True)
            self._loss_inputs(self.data_loader)
            with autocast(self.device, self.options["amp"]):
                result = self.train_step(to_device(batch, self.device, self.memory_format))
            fresh = MetricTracker(self.metric_fns, self.device, self.train_metrics.step)
            (copy.copy(self.train_metrics) if self.batch_in_epoch else fresh).start(result)  # mid-epoch: sums by name
            if not self.optim_step.called:
                self.optim_step(result["loss"])
        finally:
            self.optim_step.rehearsal = False
            for part, state in zip(parts, states):
                part.zero_grad(set_to_none=True)
                part.load_state_dict(state)

    # ---- the steps: what a subclass overrides --------------------------------------------------------------
    def train_step(self, batch) -> dict:
        """Forward one batch: {'loss', 'output', 'target'} plus any scalar tensors to log. The loop calls
        `optim_step` with the loss (a step that trains several models calls it per optimizer itself)."""
        data, target = data_and_target(batch, f"{type(self).__name__}.train_step")
        return self.compute_loss(self.forward_model(data), target)

    def valid_step(self, batch) -> dict:
        data, target = data_and_target(batch, f"{type(self).__name__}.valid_step")
        return self.compute_loss(self.model(data), target)  # the plain module: no DDP buffer sync in evaluation

    def compute_loss(self, output, target) -> dict:
        """The criterion as a step's result; a criterion that returns a mapping of parts has them logged. A
        criterion that takes `indices` (the batch's dataset indices) or `epoch` by name is given them."""
        value = self.criterion(output, target, **self.loss_inputs)
        return {**(value if isinstance(value, Mapping) else {"loss": value}), "output": output, "target": target}

    # ---- one epoch: move the batch, step, maybe finish the optimizer step, maybe the interval work -----------
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        skip, n_batches = self._start_epoch(epoch)
        batch_size = self.data_loader.batch_size
        bar = self.progress_bar(epoch, n_batches * batch_size, skip * batch_size)
        batches = self._epoch_batches(epoch, skip)
        if self.profiler is not None:  # trainer.profile: looked for once an epoch, not per step
            batches = profiled(batches, self.profiler)
        for batch_idx, batch in enumerate(batches, start=skip):
            batch = to_device(batch, self.device, self.memory_format)
            last = batch_idx + 1 == n_batches
            result = self.train_batch(batch, batch_idx, n_batches, last and self._due(epoch, "tb_histograms"))
            if result is None:  # on_nonfinite: skip
                continue
            measure = self.every_step_metrics or (self.optim_step.stepping and (
                last or self.global_step % self.log_step == 0))  # the steps that log them
            self.train_metrics.update(result, samples_in(result, batch), measure)
            self.on_batch_end(batch_idx, result)
            if self.optim_step.stepping:
                self.batch_in_epoch = batch_idx + 1
                self._after_step(epoch, bar, last)
        bar.close()
        return self._end_epoch(epoch)

    def _start_epoch(self, epoch: int) -> tuple[int, int]:
        """Prepare the epoch: (batches to skip, > 0 only when resuming in the middle of it; batches in it)."""
        self.train_mode(True)
        skip = self.batch_in_epoch
        if not skip:  # a mid-epoch resume restored the running sums (load_state_dict)
            self.train_metrics.reset()
        self.train_metrics.mark(skip)
        self.skipped_steps = 0
        self.data_loader.set_epoch(epoch)
        self.on_epoch_start(epoch)
        self._log_images(epoch)
        return skip, self.options["len_epoch"] or len(self.data_loader)

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator:
        """The epoch's batches from number `skip` on: one pass of the loader, or with len_epoch the epoch's
        stretch of an endless stream of passes (pass p has the loader's order of epoch p + 1)."""
        loader, len_epoch = self.data_loader, self.options["len_epoch"]
        with self._stop_on_bad_sample(epoch):
            if not len_epoch:
                yield from loader.batches(skip)
                return
            position, end, per_pass = (epoch - 1) * len_epoch + skip, epoch * len_epoch, len(loader)
            while per_pass and position < end:
                pass_index, start = divmod(position, per_pass)
                loader.set_epoch(pass_index + 1)
                for batch in itertools.islice(loader.batches(start), end - position):
                    position += 1
                    yield batch

    @contextlib.contextmanager
    def _stop_on_bad_sample(self, epoch: int) -> Iterator[None]:
        """A sample that cannot be read in the middle of a run (a damaged file the first-batch check did not read)
        stops it in one line naming the sample, the epoch and the step, after a save of the last complete step. Not
        in the middle of an accumulation group, nor under DDP (the other ranks are inside a step): there the last
        checkpoint stays."""
        try:
            yield
        except SampleError as e:
            saved = not dist.is_distributed() and self.optim_step.stepping
            if saved:
                self._save()
            kept = f"saved {self.run.latest} at this step" if saved else self.run.left_to_resume()
            raise UserError(f"{one_line(e)}: in epoch {epoch}, after step {self.global_step}; {kept}; fix or remove "
                            "the file, then resume with -r") from None

    def train_batch(self, batch, number: int, n_batches: int, histograms: bool = False) -> Mapping | None:
        """Micro-batch `number` of `n_batches` (on the device): train_step under autocast, `optim_step` with its loss
        unless the step called it, the scheduled work of a micro-batch that steps. None: skipped (on_nonfinite)."""
        stepping = self.optim_step.begin(number, n_batches)
        if self.loss_asks:
            self._loss_inputs(self.data_loader)
        with self._grad_sync(stepping):
            with autocast(self.device, self.options["amp"]):
                result = self.train_step(batch)
            if self.train_metrics.keys is None:
                self.train_metrics.start(result)  # the first batch: a step that returns the wrong kind stops here
            if not self.optim_step.called:
                self.optim_step(result["loss"])
        if self.optim_step.skipped:
            self.optim_step.zero_grad()
            self.skipped_steps += 1
            log.warning("Skipped a step in epoch %d: loss is NaN or Inf (%d skipped this epoch)", self.epoch + 1,
                        self.skipped_steps)
            return None
        if stepping:
            if histograms:
                self.writer.histograms(self.model, self.global_step + 1)
            self.optim_step.finish()
            for name, scheduler in self.lr_schedulers.items():
                if self.scheduler_intervals[name] == "step":
                    scheduler.step()
            self.global_step += 1
        return result

    def _loss_inputs(self, loader) -> None:
        """What the criterion asks for (loss_asks) of `loader`'s batch last given."""
        if "indices" in self.loss_asks:
            self.loss_inputs["indices"] = loader.batch_indices.to(self.device, non_blocking=True)
        if "epoch" in self.loss_asks:
            self.loss_inputs["epoch"] = self.epoch + 1  # the epoch being trained, or validated

    def _after_step(self, epoch: int, bar, last: bool) -> None:
        """Every log_step optimizer steps (and at the epoch's end): the NaN/Inf check and the logs; then a
        signal's stop, and every save_step steps a save."""
        if self.global_step % self.log_step == 0 or last:
            self._check_finite(epoch)
            self._log_progress(bar)
        if self._stop_requested():  # save where we are and leave with an exit code that says which signal
            bar.close()
            self._save()
            raise Interrupted(self._signal or signal.SIGTERM, self.run.latest)
        if self._save_due():
            self._save()

    def _save_due(self) -> bool:
        """Every save_step optimizer steps; or, at log intervals, when save_minutes have passed since the last
        save (rank 0's clock decides, so every rank agrees)."""
        if self.options["save_step"] and self.global_step % self.options["save_step"] == 0:
            return True
        if not self.options["save_minutes"] or self.global_step % self.log_step:
            return False
        return dist.broadcast_flag(time.monotonic() - self.last_save >= 60 * self.options["save_minutes"], self.device)

    def _end_epoch(self, epoch: int) -> dict[str, float]:
        if not self.train_metrics.count:  # never report a metric of 0 for an epoch that learnt nothing
            why = ("every step had a NaN/Inf loss and was skipped" if self.skipped_steps else
                   "no training batch: is batch_size larger than the training data, with drop_last?")
            raise TrainingError(f"epoch {epoch} trained no step ({why}); stopping; {self.run.left_to_resume()}")
        result = self.train_metrics.result()
        if self.skipped_steps:
            result["skipped_steps"] = self.skipped_steps
        return result

    def _grad_sync(self, stepping: bool):
        """Under DDP, all-reduce gradients only in the micro-batch that steps (no_sync while accumulating); under
        FSDP, reduce-scatter them only then."""
        if not dist.is_distributed():
            return contextlib.nullcontext()
        fsdp.set_gradient_sync(self.models.values(), stepping)
        stack = contextlib.ExitStack()
        for model in self.forward_models.values() if not stepping else ():
            if isinstance(model, torch.nn.parallel.DistributedDataParallel):
                stack.enter_context(model.no_sync())
        return stack

    def train_mode(self, training: bool) -> None:
        """Models and a module loss (which may keep state only while training) in train or eval mode."""
        self.model.train(training)
        if isinstance(self.criterion, torch.nn.Module):
            self.criterion.train(training)

    # ---- evaluation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader, progress=None, max_batches: int | None = None) -> dict[str, float]:
        """Sample-weighted averages of what valid_step returns over `loader` (its first `max_batches`), reduced
        over ranks. Validation and test.py both use this."""
        self.train_mode(False)
        tracker = MetricTracker(self.metric_fns, self.device, f"{type(self).__name__}.valid_step")
        with fsdp.gathered(self.models.values()):  # ranks may have different numbers of batches
            for batch in itertools.islice(loader, max_batches):
                if self.loss_asks:
                    self._loss_inputs(loader)
                batch = to_device(batch, self.device)
                with autocast(self.device, self.options["amp"]):
                    result = self.valid_step(batch)
                n = samples_in(result, batch)
                tracker.update(result, n)
                if progress is not None:
                    progress.update(n)
        if not dist.any_flag(tracker.names is not None, self.device):
            raise UserError("the evaluation data is empty: no batch to evaluate")
        return tracker.result()

    def _valid_epoch(self, epoch: int) -> dict[str, float]:
        if self.valid_data_loader is None:
            return {}
        with self._stop_on_bad_sample(epoch):
            return {f"val_{k}": v for k, v in self.evaluate(self.valid_data_loader).items()}

    # ---- interval work --------------------------------------------------------------------------------------
    def _check_finite(self, epoch: int) -> None:
        """Stop on a NaN/Inf loss among the batches since the last check: no per-step sync. Nothing is
        saved, so the best and the last good checkpoints stay as they were. Under DDP every rank stops.
        (With on_nonfinite: skip no NaN reaches the tracker.)"""
        bad = self.train_metrics.first_nonfinite()
        if dist.any_flag(bad is not None, self.device):
            where = f"batch {bad + 1}" if bad is not None else "on another rank"
            raise TrainingError(f"loss is NaN or Inf at epoch {epoch}, {where}: stopping; {self.run.left_to_resume()} "
                                "(lower the learning rate or clip gradients)")

    def _save(self, epoch: int | None = None, improved: bool = False) -> None:
        """A mid-epoch save (save_step, save_minutes, a signal) first checks the losses since the last check: a NaN
        loss stops the run there, as at a log interval, before its weights reach a file."""
        if epoch is None:
            self._check_finite(self.epoch + 1)
        super()._save(epoch, improved)

    def _log_progress(self, bar) -> None:
        values = {**self.train_metrics.interval_result(), **self.learning_rates()}
        self.writer.scalars({f"step/{k}": v for k, v in values.items()}, self.global_step)
        bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
        bar.update(min(self.batch_in_epoch * self.data_loader.batch_size, bar.total) - bar.n)

    def _due(self, epoch: int, option: str) -> bool:
        period = self.options[option]
        return bool(period) and self.writer.enabled and epoch % period == 0

    def _log_images(self, epoch: int) -> None:
        if self._due(epoch, "tb_images"):
            images = first_tensor(next(self.data_loader.batches(), None))
            if images is not None and images.dim() == 4:
                self.writer.image_grid("inputs", images, self.global_step)
