"""torch.distributed in a few lines: a plain `python train.py` is rank 0 of a world of 1."""

import ctypes
import os
import signal
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

from utils.errors import UserError

PARENT = os.getppid()  # under torchrun its agent (read at import: init() checks that it is still the parent)
PR_SET_PDEATHSIG = 1  # prctl(2) option: a signal this process gets when its parent dies


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: torch.device) -> None:
    """Join the process group torchrun describes (env:// rendezvous): NCCL on CUDA, gloo on CPU."""
    end_with_agent()
    backend, device_id = ("nccl", device) if device.type == "cuda" else ("gloo", None)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not restarts:
        dist.init_process_group(backend, device_id=device_id)
        return
    # torchrun --max-restarts keeps its store across restarts: a restarted group must not read the keys of the
    # group that died (gloo would connect to a dead worker's address: "connectFullMesh failed")
    store, rank, world = next(dist.rendezvous("env://"))
    dist.init_process_group(backend, store=dist.PrefixStore(f"restart{restarts}/", store), rank=rank,
                            world_size=world, device_id=device_id)


def end_with_agent() -> None:
    """SIGTERM for this process when its torchrun agent dies (kill -9, the OOM killer): the usual way out, a save
    at the next log interval while training, an immediate end before. Without it the workers, each in a session of
    its own, train on unsupervised holding the run lock, or wait for the dead agent's store in start-up. Linux's
    parent-death signal is sent by the kernel: no thread, no polling, nothing while training, and it comes even
    while this process waits inside torch.distributed. It follows the parent *thread*: torchrun forks its workers
    from its main thread, which ends only with it. A death before this module was imported is not seen."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != PARENT:  # the agent died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, applied on every rank (early stop, a signal): no rank is left waiting."""
    if not is_distributed():
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def on_main(action: Callable, device: torch.device, elsewhere: UserError):
    """`action()` on rank 0 alone (None elsewhere); a UserError it raises is raised on every rank (`elsewhere`)."""
    result, error = None, None
    if is_main():
        try:
            result = action()
        except UserError as e:
            error = e
    if broadcast_flag(error is not None, device):
        raise error or elsewhere
    return result


def any_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank if any rank says so (a signal reaches the ranks at different steps)."""
    if not is_distributed():
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj: object) -> list:
    """Every rank's `obj`, in rank order (the RNG states for a checkpoint)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
