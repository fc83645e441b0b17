"""Checkpoint files: atomic writes, safe loads, and the random generators' state (which file is which: runs/).

A checkpoint is one plain dict (state dicts, numbers, strings, the config as a dict) that loads with
`torch.load(path, weights_only=True)`; nothing else is ever used to load one."""

import contextlib
import hashlib
import io
import math
import os
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.errors import TrainingError, UserError

VERSION = 1
TMP_MARK = ".tmp-"  # temporary files are named .<target>.tmp-<pid>; never a checkpoint


def serialize(state: dict) -> bytes:
    """The checkpoint's bytes, made once however many files they go to (latest, periodic, best)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_atomic(data: bytes, path: Path, what: str = "checkpoint") -> None:
    """Write `data` to a temporary file in the same folder, fsync, then rename over `path`. A crash at any moment
    leaves the old file or the new one, never a truncated one (https://lwn.net/Articles/457667/). A failed write
    removes the temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException as e:
        with contextlib.suppress(OSError):  # clean-up must not mask the error that matters
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise TrainingError(f"cannot write {what} {path}: {e.strerror or e}") from None
        raise


def all_finite(*states) -> bool:
    """Every floating-point tensor in `states` (state dicts, nested) is finite: one fused max-norm over them all
    (NaN and Inf carry through a max, and a max cannot overflow) and one host sync; for saves, not steps."""
    tensors = [t for t in tensors_in(states) if t.is_floating_point()]
    return not tensors or math.isfinite(torch.nn.utils.get_total_norm(tensors, math.inf))


def tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return [t for v in values for t in tensors_in(v)]


# The type of each field a checkpoint of this project has (a field of another type is refused on load).
FIELDS = {"version": int, "arch": str, "epoch": int, "batch_in_epoch": int, "global_step": int, "model": dict,
          "optimizer": dict, "monitor": str, "monitor_best": float, "monitor_value": float, "not_improved_count": int,
          "rng": list, "config": dict, "data": dict, "classes": list, "data_values": dict, "finetuned_from": dict,
          "tracking_run_id": str}
RNG_KEYS = {"python", "numpy", "torch", "cuda"}
STATES = ("lr_scheduler", "scaler", "criterion", "train_tracker")  # a state dict, or None where there is none
COUNTS = ("epoch", "batch_in_epoch", "global_step", "not_improved_count")  # never negative


def load(path: str | Path) -> dict:
    """Load a checkpoint safely (`weights_only=True`); any problem is one clear UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise UserError(f"{path}: not a checkpoint file")
    try:
        with warnings.catch_warnings():  # e.g. a plain pickle's protocol warning: the error below says it all
            warnings.simplefilter("ignore")
            check_records(path)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the damage, the answer is the same
        raise UserError(f"{path}: not a loadable checkpoint: {load_failure(e)}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path}: not a checkpoint of this project (no 'model' and 'config' entries)")
    for key, kind in FIELDS.items():
        if key in state and (not isinstance(state[key], kind) or kind is int and isinstance(state[key], bool)):
            raise UserError(f"{path}: damaged checkpoint: '{key}' is {type(state[key]).__name__}, not {kind.__name__}")
    for key in STATES:
        if state.get(key) is not None and not isinstance(state[key], dict):
            raise UserError(f"{path}: damaged checkpoint: '{key}' is {type(state[key]).__name__}, not a state dict")
    if negative := next((key for key in COUNTS if state.get(key, 0) < 0), None):
        raise UserError(f"{path}: damaged checkpoint: '{negative}' is {state[negative]}, a count below 0")
    rngs = state.get("rng")
    if rngs is not None and not (rngs and all(isinstance(r, dict) and r.keys() == RNG_KEYS for r in rngs)):
        raise UserError(f"{path}: damaged checkpoint: 'rng' is not a list of generator states")
    if state.get("version", 0) > VERSION:
        raise UserError(f"{path}: checkpoint version {state['version']} is newer than this code ({VERSION})")
    return state


# torch.save's legacy format (before PyTorch 1.6, not a zip) starts with this magic number, pickled
LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


class Inert:
    """What every global of a checkpoint's pickle becomes while its sizes are read: called, filled or set, it
    does nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class DeclaredSizes(pickle.Unpickler):
    """Reads a checkpoint's data.pkl and builds nothing: each global is `Inert` (a storage type: its dtype),
    each tensor storage, ('storage', type, key, location, numel) as torch.save writes it, only records its
    declared bytes by key."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.declared: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "torch" and name.endswith("Storage"):
            dtype = getattr(getattr(torch, name, None), "dtype", None)
            return dtype if isinstance(dtype, torch.dtype) else torch.uint8  # UntypedStorage: bytes
        return Inert

    def persistent_load(self, pid: Any) -> Inert:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[4], int):
            if not isinstance(pid[1], torch.dtype):
                raise ValueError(f"its tensor data/{pid[2]} has no known storage type")
            key = str(pid[2])
            self.declared[key] = max(self.declared.get(key, 0), pid[4] * pid[1].itemsize)
        return Inert()


def check_records(path: Path) -> None:
    """Refuse, before torch.load allocates anything, a file whose tensors ask for more memory than it holds:
    torch allocates each storage at the size the pickle declares, and inflates a compressed record whatever
    its size (a small file of compressed zeros takes gigabytes). torch.save stores its records uncompressed.
    Also refuse a record whose bytes fail the CRC-32 torch.save wrote for it: torch.load does not check them,
    so a damaged byte in a tensor would load silently."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if LEGACY_MAGIC in f.read(16):
                raise ValueError("it is in torch's legacy format (before PyTorch 1.6), whose tensor sizes cannot "
                                 "be checked before loading: load it where you trust it and save it again")
        return  # not a checkpoint at all: torch.load says what it is
    file_size = path.stat().st_size
    records = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.file_size > info.compress_size or info.header_offset + info.compress_size > file_size:
                raise ValueError(f"its record {info.filename} declares {info.file_size:,} bytes "
                                 f"({info.compress_size:,} in the file), more than the file holds")
            if records.setdefault(info.filename, info) is not info:
                raise ValueError(f"its record {info.filename} appears twice")
        for info in records.values():
            if info.CRC:  # 0: saved without checksums (torch.utils.serialization.config.save.compute_crc32)
                check_crc(archive, info)
        pickles = [name for name in records if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            return  # not torch's layout: torch.load says so
        reader = DeclaredSizes(archive.read(pickles[0]))
        reader.load()
    prefix = pickles[0].removesuffix("data.pkl")
    for key, declared in reader.declared.items():
        held = records[f"{prefix}data/{key}"].file_size if f"{prefix}data/{key}" in records else 0
        if declared > held:
            raise ValueError(f"its tensor data/{key} declares {declared:,} bytes, and the file holds {held:,}")


def check_crc(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Read the record through: zipfile compares its CRC-32 at the end."""
    try:
        with archive.open(info) as record:
            while record.read(1 << 24):
                pass
    except zipfile.BadZipFile:
        raise ValueError(f"its record {info.filename} fails its CRC-32 check: the file is damaged") from None


def load_failure(error: Exception) -> str:
    """Why torch.load refused a file, in a few words (its own messages run to paragraphs)."""
    text = str(error)
    unsafe = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", text)  # its two wordings
    if unsafe and unsafe[1].startswith("parse_config."):
        return ("it is a classic pytorch-template checkpoint (it pickles parse_config.ConfigParser): convert it "
                "with scripts/convert_classic_checkpoint.py, then use --finetune or test.py -r")
    if unsafe:
        return f"it holds a Python object ({unsafe[1]}), refused for safety"
    if "Weights only load failed" in text:
        return "not a PyTorch checkpoint file"
    if isinstance(error, (EOFError, OSError)) or "PytorchStreamReader" in text or not text.strip():
        return "the file is empty, damaged or cut short"
    return text.strip().splitlines()[0].split(". ")[0][:200]  # e.g. a truncated zip: its first sentence


def sha256(path: str | Path) -> str:
    """The file's SHA-256 as hex: which file a run's weights came from (`finetuned_from`)."""
    if os.path.exists(path) and not os.path.isfile(path):  # a folder, or a FIFO that would wait forever
        raise UserError(f"{path}: not a checkpoint file")
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the checkpoint: {e.strerror or e}") from None


def load_model_weights(model: torch.nn.Module, weights: dict, where: str) -> None:
    """`model.load_state_dict(weights)`; weights of another shape or architecture are one UserError."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
        first = re.sub(r": copying a param with shape torch.Size\((.*?)\) from checkpoint, the shape in current "
                       r"model is torch.Size\((.*?)\)\.", r" (checkpoint \1, model \2)", details[0])
        raise UserError(f"{where}: weights do not fit {type(model).__name__}: {first[:200]}") from None


# ---- random number generators -----------------------------------------------------------------
def rng_state() -> dict:
    """Python, NumPy, torch CPU and every CUDA device's generator state, as plain data."""
    np_state = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": np_state[2],
                      "has_gauss": np_state[3], "cached_gaussian": np_state[4]},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(state["python"][0:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
