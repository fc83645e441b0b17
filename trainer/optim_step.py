"""The optimizer step that a training step calls, in the spirit of mmengine's OptimWrapper: one object that
carries gradient accumulation, the fp16 scaler, clipping and zeroing, for one optimizer or several by name."""

import functools
from contextlib import nullcontext

import torch

from utils import dist
from utils.errors import UserError, one_line


class OptimStep:
    """`optim_step(loss)` backpropagates `loss` into optimizer `name`'s parameters (`optim_step(loss, name)`
    with several), scaled for fp16 and averaged over the accumulation group, and on the group's last
    micro-batch unscales, clips and steps that optimizer. The loop opens each micro-batch with `begin` and,
    when it stepped, closes it with `finish` (the fp16 scale's update and zeroed gradients)."""

    def __init__(self, optimizers: dict, scaler: torch.amp.GradScaler, options: dict, device: torch.device):
        """`options`: the trainer's accum_steps, grad_clip, on_nonfinite and amp."""
        self.optimizers, self.scaler, self.device = optimizers, scaler, device
        self.accum_steps, self.grad_clip = options["accum_steps"], options["grad_clip"]
        self.skip_nonfinite = options["on_nonfinite"] == "skip"
        self.params = {name: [p for group in opt.param_groups for p in group["params"]]
                       for name, opt in optimizers.items()}
        amp = options["amp"] != "off"  # backward runs outside autocast; without AMP no context at all (cheaper)
        self.outside_autocast = functools.partial(torch.autocast, device.type, enabled=False) if amp else nullcontext
        self.stepping, self.group, self.called, self.skipped = True, 1, False, False
        self.rehearsal = False  # the first-batch check: backward only, nothing stepped or scaled

    def begin(self, number: int, n_batches: int) -> bool:
        """Micro-batch `number` (from 0) of an epoch of `n_batches`: whether it ends an accumulation group,
        so that the optimizers step (the epoch's last micro-batch always does)."""
        self.stepping = (number + 1) % self.accum_steps == 0 or number + 1 == n_batches
        self.group = min(self.accum_steps, n_batches - number // self.accum_steps * self.accum_steps)
        self.called = self.skipped = False
        return self.stepping

    def __call__(self, loss: torch.Tensor, name: str = "model") -> None:
        self.called = True
        if self.rehearsal:
            try:
                loss.backward(inputs=None if name == "model" else self.params[name])
            except RuntimeError as e:
                of = "" if name == "model" else f" (optimizer {name})"
                raise UserError(f"loss.backward() fails{of}: {type(e).__name__}: {one_line(e)[:300]}") from None
            return
        if self.skip_nonfinite and self.nonfinite(loss):
            return
        with self.outside_autocast():
            scaled = self.scaler.scale(loss / self.group if self.group > 1 else loss)
            scaled.backward(inputs=None if name == "model" else self.params[name])  # several: only its own
        if self.stepping:
            if self.grad_clip:
                self.scaler.unscale_(self.optimizers[name])
                torch.nn.utils.clip_grad_norm_(self.params[name], self.grad_clip)
            self.scaler.step(self.optimizers[name])

    def nonfinite(self, loss: torch.Tensor) -> bool:
        """on_nonfinite: skip. A NaN/Inf loss on any rank drops the micro-batch's gradients on all (a host sync)."""
        self.skipped = self.skipped or dist.any_flag(not torch.isfinite(loss).item(), self.device)
        return self.skipped

    def finish(self) -> None:
        """After the optimizers stepped: update the fp16 scale and zero the gradients."""
        self.scaler.update()
        self.zero_grad()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
