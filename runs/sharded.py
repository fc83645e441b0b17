"""Sharded checkpoints (trainer.strategy: fsdp): a folder written by every rank with torch.distributed.checkpoint
(DCP), which any number of processes, with any strategy, reads back (DCP reshards on load), and which never runs
code. `python -m runs.sharded FOLDER OUT.pth` turns one into an ordinary checkpoint file.

    <run dir>/latest.dcp/   .metadata      what DCP wrote where: read with a restricted unpickler (read_metadata)
                            __<rank>_0.distcp   each rank's shards of the models' and optimizers' tensors
                            state.pth      the rest of the run state, an ordinary weights-only checkpoint file

The tensors are keyed by parameter name (`<model|optimizer>/<name>/<parameter>[/<state>]`), so a checkpoint does not
depend on how the model was wrapped or sharded; state.pth holds everything else, plain data under the usual rules.
DCP is imported where a folder is written or read: importing it takes a large part of every start-up's time.
"""

import contextlib
import copy
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from utils import checkpoint, dist, fsdp
from utils.cli import ArgumentParser, run_main
from utils.errors import TrainingError, UserError, one_line

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

SUFFIX, METADATA, STATE = ".dcp", ".metadata", "state.pth"
LATEST, BEST = f"latest{SUFFIX}", f"model_best{SUFFIX}"
ASIDE = f"{checkpoint.TMP_MARK}old"  # .<name>.tmp-old: the folder a save replaces, until the new one is in place

# What a DCP .metadata pickle may name: its own dataclasses, torch.Size, dtypes and layouts, and the saved path.
METADATA_CLASSES = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "MetadataIndex",
    "_MEM_FORMAT_ENCODING")} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                                ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                                ("pathlib", "PurePosixPath")}


class MetadataUnpickler(pickle.Unpickler):
    """pickle.load as DCP's FileSystemReader does it, admitting only the classes of DCP metadata (and dtypes)."""

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_CLASSES or module == "torch" and isinstance(getattr(torch, name, None),
                                                                                  torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it holds a Python object ({module}.{name}), refused for safety")


def read_metadata(folder: Path) -> "Metadata":
    """A DCP folder's metadata, read without running code and checked: tensors only (DCP loads other values with a
    plain torch.load), each stored in a file of the folder itself. Anything else is one UserError."""
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

    path = folder / METADATA
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise UserError(f"{folder}: not a sharded checkpoint (no {METADATA})") from None
    except Exception as e:  # noqa: BLE001 - a damaged or hostile pickle fails in many ways; the answer is the same
        raise UserError(f"{path}: not a loadable checkpoint: {one_line(e)[:200]}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) or \
            not all(isinstance(v, TensorStorageMetadata) for v in metadata.state_dict_metadata.values()):
        raise UserError(f"{path}: not a sharded checkpoint of this project (it must hold tensors only)")
    storage = metadata.storage_data
    if not isinstance(storage, dict) or not all(isinstance(k, MetadataIndex) and stored_here(v)
                                                for k, v in storage.items()):
        raise UserError(f"{path}: damaged checkpoint: its storage entries must name files of the folder itself")
    return metadata


def stored_here(entry) -> bool:
    """A storage entry as this project writes them: a stretch of a file of the folder itself, not transformed."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    return (isinstance(entry, _StorageInfo) and isinstance(entry.relative_path, str)
            and re.fullmatch(r"[\w.-]+", entry.relative_path) is not None and entry.relative_path not in (".", "..")
            and all(type(n) is int and n >= 0 for n in (entry.offset, entry.length))
            and not entry.transform_descriptors)


def safe_reader(folder: Path, metadata: "Metadata"):
    """DCP's file reader with metadata already read by `read_metadata` (the original unpickles it with pickle.load)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs) -> "Metadata":
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(folder)


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """DCP warns each time one process saves or loads alone ("assuming the intent is ..."), which is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def is_checkpoint(path: Path) -> bool:
    """A sharded checkpoint folder (by its name, or by its metadata file)."""
    return path.is_dir() and (path.suffix == SUFFIX or (path / METADATA).exists())


# ---- the state as DCP sees it: tensors by path, the rest plain --------------------------------------------------
def split(tree, path: tuple = ()) -> tuple[dict, object]:
    """(every tensor of nested dicts `tree` by its path 'a/b/c', `tree` without them)."""
    if not isinstance(tree, dict):
        return {}, tree
    tensors, plain = {}, {}
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            tensors["/".join((*path, str(key)))] = value
        else:
            inner, plain[key] = split(value, (*path, str(key)))
            tensors.update(inner)
    return tensors, plain


def merge(plain: dict, tensors: dict) -> dict:
    """The inverse of `split`: a copy of `plain` with each tensor put back at its path."""
    plain = copy.deepcopy(plain)
    for key, tensor in tensors.items():
        *parents, last = key.split("/")
        node = plain
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = tensor
    return plain


def by_parameter_name(state: dict, model: torch.nn.Module) -> dict:
    """An ordinary checkpoint's model and optimizer entries as `fsdp.state_by_name` has them, for the one model
    (trainer.strategy fsdp): optimizer state by parameter name (the optimizer was built on `model.parameters()`)."""
    params = [name for name, _ in model.named_parameters()]
    optimizer = {"state": {params[i]: s for i, s in state["optimizer"]["state"].items()},
                 "param_groups": [{**g, "params": [params[i] for i in g["params"]]}
                                  for g in state["optimizer"]["param_groups"]]}
    return {"model": {"model": state["model"]}, "optimizer": {"model": optimizer}}


def ordinary_layout(named: dict) -> tuple[dict, dict]:
    """The inverse of `by_parameter_name`: (model, optimizer) as an ordinary checkpoint holds them."""
    optimizer, index = named["optimizer"]["model"], {}
    groups = [{**g, "params": [index.setdefault(p, len(index)) for p in g["params"]]}
              for g in optimizer["param_groups"]]
    return named["model"]["model"], {"state": {index[p]: s for p, s in optimizer["state"].items()},
                                     "param_groups": groups}


# ---- writing --------------------------------------------------------------------------------------------------
def save(run_dir: Path, names: list[str], state: dict, models: dict, optimizers: dict, device: torch.device) -> None:
    """On every rank: the run state (`state`, but the models and optimizers from themselves) as the DCP folders
    `names` of `run_dir`, the last one last. Written once into a temporary folder (each rank its shards, rank 0 the
    metadata and state.pth), then renamed into place: a kill at any moment leaves each folder old or new."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    tensors, plain = split(fsdp.state_by_name(models, optimizers))
    rest = {**state, **plain}  # model and optimizer: what is not a tensor (parameter names, hyper-parameters)
    tmp = run_dir / f".{names[-1]}{checkpoint.TMP_MARK}write"
    failed = TrainingError(f"rank 0 could not write the checkpoint {run_dir / names[-1]}")
    dist.on_main(lambda: shutil.rmtree(tmp, ignore_errors=True), device, failed)  # what a killed save left
    try:
        with single_process_quiet():
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp), no_dist=not dist.is_distributed())
    except (CheckpointException, OSError) as e:
        raise TrainingError(f"cannot write checkpoint {tmp}: {one_line(e)[:200]}") from None

    def finish() -> None:
        try:
            checkpoint.save_atomic(checkpoint.serialize(rest), tmp / STATE)
            for name in names[:-1]:  # the same files under other names: hard links, no copy
                linked = run_dir / f".{name}{checkpoint.TMP_MARK}write"
                shutil.rmtree(linked, ignore_errors=True)
                install(Path(shutil.copytree(tmp, linked, copy_function=os.link)), run_dir / name)
            install(tmp, run_dir / names[-1])
        except OSError as e:
            raise TrainingError(f"cannot write checkpoint {run_dir / names[-1]}: {e.strerror or e}") from None
    dist.on_main(finish, device, failed)


def install(folder: Path, target: Path) -> None:
    """Rename `folder` to `target`. A folder can't be renamed over another: the old one is renamed aside first and
    removed last; `recover` puts it back when a kill came between the two renames."""
    aside = target.with_name(f".{target.name}{ASIDE}")
    shutil.rmtree(aside, ignore_errors=True)
    if target.exists():
        os.rename(target, aside)
    os.rename(folder, target)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the renames themselves durable
    finally:
        os.close(dir_fd)
    shutil.rmtree(aside, ignore_errors=True)


def recover(run_dir: Path) -> None:
    """A folder renamed aside by `install` whose replacement never came (a kill between the renames): back in place."""
    for aside in Path(run_dir).glob(f".*{SUFFIX}{ASIDE}"):
        target = aside.with_name(aside.name[1 : -len(ASIDE)])
        if not target.exists():
            os.rename(aside, target)


def remove(path: Path) -> None:
    """A checkpoint file or folder (keep_last)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---- reading --------------------------------------------------------------------------------------------------
def load_state(folder: Path) -> dict:
    """The run state of state.pth (model and optimizer without their tensors), once the metadata passed."""
    read_metadata(folder)
    return checkpoint.load(folder / STATE)


def read_tensors(folder: Path, tensors: dict, together: bool) -> None:
    """Fill `tensors` (by path; sharded or whole) in place from the folder; `together`: every rank calls this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    metadata = read_metadata(folder)
    try:
        with single_process_quiet():
            dcp.load(tensors, storage_reader=safe_reader(folder, metadata),
                     no_dist=not (together and dist.is_distributed()))
    except (CheckpointException, RuntimeError, ValueError, KeyError, OSError) as e:
        missing = re.search(r"Missing key in checkpoint state_dict: (\S+)", str(e))
        why = f"it has no {missing[1]}" if missing else one_line(e)[:200]
        raise UserError(f"{folder}: does not fit this run: {why}") from None


def load_into(models: dict, optimizers: dict, path: Path, state: dict) -> None:
    """Resume, on every rank together: the models' and optimizers' state of `path` (a DCP folder, read in the shards
    the models have now, whatever the processes that wrote it; or an ordinary checkpoint's whole tensors)."""
    if not is_checkpoint(path):
        fsdp.load_by_name(models, optimizers, by_parameter_name(state, models["model"]), whole=True)
        return
    tensors, _ = split(fsdp.state_by_name(models, optimizers))
    read_tensors(path, tensors, together=True)
    fsdp.load_by_name(models, optimizers, merge({"model": state["model"], "optimizer": state["optimizer"]}, tensors),
                      whole=False)


def load_whole(folder: Path) -> dict:
    """The checkpoint of `folder` in one process, as an ordinary checkpoint (test.py, predict.py, export.py)."""
    state = load_state(folder)
    metadata = read_metadata(folder)
    tensors = {key: torch.empty(entry.size, dtype=entry.properties.dtype)
               for key, entry in metadata.state_dict_metadata.items()}
    read_tensors(folder, tensors, together=False)
    model, optimizer = ordinary_layout(merge({"model": state["model"], "optimizer": state["optimizer"]}, tensors))
    return {**state, "model": model, "optimizer": optimizer}


def main(argv=None) -> int:
    parser = ArgumentParser(description="Turn a sharded checkpoint (a DCP folder) into one ordinary checkpoint file.")
    parser.add_argument("folder", help="the sharded checkpoint, e.g. saved/mnist/<run_id>/latest.dcp")
    parser.add_argument("output", help="the .pth file to write (not an existing one)")
    args = parser.parse_args(argv)
    folder, output = Path(args.folder), Path(args.output)
    if output.suffix != ".pth" or output.exists():
        raise UserError(f"{output}: give a new file name ending in .pth")
    if not is_checkpoint(folder):
        raise UserError(f"{folder}: not a sharded checkpoint folder")
    checkpoint.save_atomic(checkpoint.serialize(load_whole(folder)), output)
    print(f"{folder} -> {output}")
    return 0


if __name__ == "__main__":
    run_main(main)
