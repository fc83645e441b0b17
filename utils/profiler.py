"""trainer.profile: torch.profiler over a few training batches, traces written for TensorBoard.

Off (null) by default: then no profiler exists, and the loop looks for one once an epoch, not per step."""

from collections.abc import Iterator
from pathlib import Path

import torch


def start_profiler(profile: dict | None, trace_dir: Path, device: torch.device):
    """A started torch.profiler.profile on the `profile` schedule (config/schema.py checks it), or None.
    Its traces go to `trace_dir` (tensorboard_trace_handler) when each recording cycle ends."""
    if profile is None:
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(**{"repeat": 1, **profile})  # torch's repeat=0 would record forever
    profiler = torch.profiler.profile(activities=activities, schedule=schedule,
                                      on_trace_ready=torch.profiler.tensorboard_trace_handler(str(trace_dir)))
    profiler.start()
    return profiler


def profiled(batches: Iterator, profiler) -> Iterator:
    """The batches, with the profiler's step marked after each one is trained."""
    for batch in batches:
        yield batch
        profiler.step()
