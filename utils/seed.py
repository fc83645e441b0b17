"""Seeds for every random number generator a run uses, and the choice of speed or repeatability."""

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from utils import dist


def draw_seed(seed: int, epoch: int, number: int) -> int:
    """A generator seed for batch or sample `number` of `epoch`: independent of workers, ranks and resumes."""
    return ((seed * 100_003 + epoch) * 1_000_000_007 + number) % 2**63


def seed_generators(seed: int) -> None:
    """Seed the generators a dataset may draw from: torch's, Python's and NumPy's (global) ones."""
    torch.default_generator.manual_seed(seed)
    seed_python_and_numpy(seed)


def seed_python_and_numpy(seed: int) -> None:
    """Python's and NumPy's global generators (several times the cost of seeding torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def generators_kept() -> Iterator[None]:
    """Torch's (CPU), Python's and NumPy's global generators as they were afterwards: draws inside leave no trace."""
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


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
    if deterministic != torch.are_deterministic_algorithms_enabled():  # the call imports torch._inductor (slow)
        torch.use_deterministic_algorithms(deterministic)
