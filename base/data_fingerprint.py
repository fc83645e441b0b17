"""What a resume compares to know it trains on the same data: a small dict of str and int (checkpoints hold it
and load with weights_only=True), one entry per thing that can change, so that a mismatch names it:

    {"samples": 1024, "labels": "<crc>", "files": "<crc>", "<attribute>": "<crc>", "items": "<crc>", "split": "<crc>"}

samples: the dataset's length. labels, files: its `targets`, and its `samples` file list relative to its `root`.
Any other public attribute that is a tensor, an array, or a list or tuple of str, Path or int (a file or label
list) is an entry of its own name; those of a dataset it wraps (its `.dataset`) count too. items: a few evenly
spaced samples of the innermost dataset, read with the random generators seeded. split: the loader's indices.
A dataset with a `fingerprint()` method (returning a str, or a dict of str to str or int) replaces all but
samples and split: for data too large to hash, or that know their version."""

import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.errors import UserError
from utils.seed import generators_kept, seed_generators

ITEMS = 8  # samples read for `items`
NAMES = {"targets": "labels", "samples": "files"}  # torchvision's attributes, by what they hold


def data_fingerprint(dataset: Dataset, indices: torch.Tensor) -> dict[str, str | int]:
    """The fingerprint of `dataset` as read by a loader that trains on `indices` of it."""
    levels = [dataset]
    while isinstance(getattr(levels[-1], "dataset", None), Dataset):  # wrappers: transforms, Subset, ...
        levels.append(levels[-1].dataset)
    own = next((level.fingerprint for level in levels if callable(getattr(level, "fingerprint", None))), None)
    entries = own_entries(own()) if own else {**attributes(levels), "items": read_items(levels[-1])}
    return {"samples": len(dataset), **entries, "split": f"{add(0, indices):08x}"}


def own_entries(value: Any) -> dict[str, str | int]:
    if isinstance(value, str):
        return {"dataset": value}
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, (str, int)) for k, v in value.items()):
        return value
    raise UserError(f"the dataset's fingerprint() must return a str or a dict of str to str or int, got {value!r:.100}")


def attributes(levels: list[Dataset]) -> dict[str, str]:
    """CRCs of the label and file lists among the datasets' public attributes (the outermost's first)."""
    entries = {}
    for level in levels:
        root = str(getattr(level, "root", "") or "")
        for name, value in getattr(level, "__dict__", {}).items():
            listed = isinstance(value, (list, tuple)) and all(isinstance(v, (str, Path, int)) for v in value)
            if not name.startswith("_") and (name in NAMES or listed or isinstance(value, (torch.Tensor, np.ndarray))):
                entries.setdefault(NAMES.get(name, name), f"{add(0, value, root):08x}")
    return entries


def read_items(dataset: Dataset) -> str:
    """CRC of up to ITEMS evenly spaced samples, read with Python's, NumPy's and torch's CPU generators seeded
    (then restored): a random augmentation reads the same each time, and training draws what it would have."""
    n, root = len(dataset), str(getattr(dataset, "root", "") or "")
    crc = 0
    try:
        with generators_kept():
            seed_generators(0)
            for index in range(0, n, max(1, -(-n // ITEMS))):
                crc = add(crc, dataset[index], root)
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"the data fingerprint could not read sample {index}: {message}") from None
    return f"{crc:08x}"


def add(crc: int, value: Any, root: str = "") -> int:
    """`crc` updated with `value`: the bytes of tensors, arrays and PIL images, the repr of numbers and strings
    (absolute paths relative to `root`), through tuples, lists and dicts; of other objects only the type (their
    repr may hold an address)."""
    if isinstance(value, (list, tuple, dict)) or (isinstance(value, np.ndarray) and value.dtype == object):
        crc = zlib.crc32(f"{type(value).__name__}{len(value)}".encode(), crc)
        for item in value.items() if isinstance(value, dict) else value:
            crc = add(crc, item, root)
        return crc
    if isinstance(value, torch.Tensor):
        head, data = f"{value.dtype}{tuple(value.shape)}", value.detach().cpu().contiguous().reshape(-1)
        data = data.view(torch.uint8).numpy()
    elif isinstance(value, np.ndarray):
        head, data = f"{value.dtype}{value.shape}", np.ascontiguousarray(value).view(np.uint8)
    elif hasattr(value, "tobytes") and hasattr(value, "mode"):  # a PIL image
        head, data = f"{value.mode}{value.size}", value.tobytes()
    elif isinstance(value, (str, Path)) and root and os.path.isabs(value):
        head, data = "path", os.path.relpath(value, root).encode()
    elif isinstance(value, (str, Path, bytes, int, float, complex, np.generic)) or value is None:
        head, data = "", repr(value).encode()
    else:
        head, data = type(value).__qualname__, b""
    return zlib.crc32(data, zlib.crc32(head.encode(), crc))
