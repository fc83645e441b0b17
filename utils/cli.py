"""What train.py and test.py share: argument parsing, device choice, seeding, one-line errors."""

import argparse
import ctypes
import logging
import os
import platform
import random
import sys
from collections.abc import Callable

import numpy as np
import torch

from utils import dist
from utils.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line and exit code 2 (no usage dump)."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main`; a UserError or an interrupt becomes one line on stderr and a non-zero exit."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        log_to_file(f"error: {e}")
        code = e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:  # the Interrupted of a graceful stop carries its own exit code
        if not hasattr(e, "exit_code"):
            raise
        print(str(e), file=sys.stderr)
        log_to_file(str(e))
        code = e.exit_code
    if dist.is_distributed():
        torch.distributed.destroy_process_group()
    sys.exit(code or 0)


def log_to_file(message: str) -> None:
    """Put the closing error in the run's train.log too (the console already has it, on stderr)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(logging.makeLogRecord({"msg": message, "levelno": logging.ERROR, "levelname": "ERROR",
                                                "name": "train"}))


def select_device(name: str, where: str = "device") -> torch.device:
    """'auto' is the best available; a named device that is not there is an error, never a fallback.
    `where` names the setting in errors: the config's key or the command-line option."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    use = "use auto, cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{where}: unknown device '{name}' ({use})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{where}: '{name}', but CUDA is not available on this machine (use cpu)")
        if dist.launched_by_torchrun():  # one GPU per process
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"{where}: '{name}', but only {torch.cuda.device_count()} CUDA device(s) here")
        torch.cuda.set_device(device)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{where}: '{name}', but MPS is not available on this machine (use cpu)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{where}: unsupported device type '{device.type}' ({use})")
    return device


# glibc's malloc settings for CPU runs, named as the environment variables that would set them
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": 32 << 20, "MALLOC_TRIM_THRESHOLD_": 64 << 20}


def keep_freed_memory() -> None:
    """Stop glibc from handing freed memory back to the OS between training steps (Linux, CPU runs).

    By default glibc trims the heap and unmaps large blocks as soon as they are freed, so every CPU
    step faults its activations back in: about 2,000 page faults per MnistModel step, 15-20% of its
    time. This sets, from the start, the limits glibc's own adaptive rule ends at (32 MiB for mmap,
    twice that for trimming). MALLOC_*_ or GLIBC_TUNABLES in the environment take precedence."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    if MALLOC_SETTINGS.keys() & os.environ.keys() or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, MALLOC_SETTINGS["MALLOC_MMAP_THRESHOLD_"])  # -3: M_MMAP_THRESHOLD
    libc.mallopt(-1, MALLOC_SETTINGS["MALLOC_TRIM_THRESHOLD_"])  # -1: M_TRIM_THRESHOLD


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch (each rank differently), and choose speed or bitwise repeatability.
    https://pytorch.org/docs/stable/notes/randomness.html"""
    seed += dist.rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if deterministic != torch.are_deterministic_algorithms_enabled():  # the call imports torch._inductor: ~2 s
        torch.use_deterministic_algorithms(deterministic)
