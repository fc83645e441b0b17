"""FSDP2 (trainer.strategy: fsdp): each model's blocks, then the model itself, sharded over torchrun's processes with
`torch.distributed.fsdp.fully_shard`, so that parameters, gradients and optimizer state are split N ways
(https://docs.pytorch.org/docs/stable/distributed.fsdp.fully_shard.html); and the run state of models and
optimizers by parameter name, sharded or whole, for checkpoints (`torch.distributed.checkpoint.state_dict`).

Torch's FSDP and DTensor modules are imported by the functions that shard or gather state: importing them takes a
large part of every start-up's time, and a run that never shards never needs them."""

import contextlib
import sys
from collections.abc import Iterable, Iterator

import torch

from utils import dist

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def shard(model: torch.nn.Module, device: torch.device, amp: str) -> torch.nn.Module:
    """`model`, sharded in place over torchrun's processes (rank 0's initial weights): its `fsdp_blocks()` (else
    its child modules) with parameters to train, then the whole model. With AMP the gathered parameters are in the
    AMP dtype and gradients are reduced in float32. A single process's model, and a frozen one, as they are."""
    if not dist.is_distributed() or not any(p.requires_grad for p in model.parameters()):
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.no_grad():  # every rank starts from rank 0's weights, as under DDP (ranks are seeded differently)
        for tensor in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(tensor, src=0)
    mesh = init_device_mesh(device.type, (dist.world_size(),))
    reduce_dtype = torch.float32 if amp in AMP_DTYPES else None
    policy = MixedPrecisionPolicy(param_dtype=AMP_DTYPES.get(amp), reduce_dtype=reduce_dtype)
    blocks = model.fsdp_blocks() if callable(getattr(model, "fsdp_blocks", None)) else model.children()
    for block in blocks:
        if any(p.requires_grad for p in block.parameters()):
            fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """`shard` made it an FSDPModule (whose module, not imported yet, means none is)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (a DTensor); any other tensor as it is."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor.DTensor) else tensor


def set_gradient_sync(models: Iterable[torch.nn.Module], sync: bool) -> None:
    """Reduce-scatter gradients only in the micro-batch that steps (accumulation keeps unsharded gradients)."""
    for model in models:
        if is_sharded(model):
            model.set_requires_gradient_sync(sync)


@contextlib.contextmanager
def gathered(models: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Every sharded model whole for the duration (evaluation): a forward then needs no collective, so ranks may
    evaluate different numbers of batches. Costs the whole model's memory while it lasts."""
    parts = [part for model in models for part in model.modules() if is_sharded(part)]
    for part in parts:
        part.set_reshard_after_forward(False, recurse=False)
        part.unshard()
    try:
        yield
    finally:
        for part in parts:
            part.reshard()
            part.set_reshard_after_forward(True, recurse=False)


def state_by_name(models: dict, optimizers: dict) -> dict:
    """{"model": {name: state}, "optimizer": {name: state}}, keyed by parameter name (an optimizer's too), with the
    sharded tensors of a sharded model (whole ones otherwise). A fresh optimizer's state is initialised."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": {name: get_model_state_dict(model) for name, model in models.items()},
            "optimizer": {name: get_optimizer_state_dict(models[name], opt) for name, opt in optimizers.items()}}


def load_by_name(models: dict, optimizers: dict, state: dict, whole: bool) -> None:
    """The inverse of `state_by_name`; `whole`: the tensors are whole (every rank has them all), not shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=whole, strict=True)
    for name, model in models.items():
        set_model_state_dict(model, state["model"][name], options=options)
    for name, optimizer in optimizers.items():
        set_optimizer_state_dict(models[name], optimizer, state["optimizer"][name], options=options)
