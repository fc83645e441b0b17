"""Which device a process trains on: the config's or the command line's, never a silent fallback."""

import os
import re

import torch

from utils import dist
from utils.errors import UserError


def select_device(name: str, where: str = "device") -> torch.device:
    """'auto' is the best available; a named device that is not there is an error. Under torchrun each
    process takes cuda:<LOCAL_RANK>, so there the name must be 'cuda' or 'auto', not 'cuda:N'.
    `where` names the setting in errors: the config's key or the command-line option."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    use = "use auto, cpu, cuda, cuda:N or mps"
    if re.fullmatch(r"[\d,]+", name):  # the classic template's -d 0 / -d 0,1 (GPU indices)
        use = f"GPU indices are the classic template's -d: use -d cuda:{name.split(',')[0]}, or torchrun for several"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{where}: unknown device '{name}' ({use})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{where}: '{name}', but CUDA is not available on this machine (use cpu)")
        if dist.launched_by_torchrun():  # one GPU per process
            if device.index is not None:
                raise UserError(f"{where}: '{name}': under torchrun each process uses cuda:<LOCAL_RANK>; "
                                "use cuda or auto (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        elif device.index is None:  # set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"{where}: '{name}', but only {torch.cuda.device_count()} CUDA device(s) here")
        torch.cuda.set_device(device)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{where}: '{name}', but MPS is not available on this machine (use cpu)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{where}: unsupported device type '{device.type}' ({use})")
    return device
