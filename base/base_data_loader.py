"""Batching shared by every dataset: seeded shuffle per epoch, validation split, DDP sharding, resume.

The order of an epoch is a pure function of (seed, epoch), so a resumed run sees the same batches
as an uninterrupted one, and a mid-epoch resume skips the batches already trained without loading
them. Under torchrun each rank takes every world_size-th sample of that order.

A dataset's own random draws (augmentation with torch, `random` or NumPy in `__getitem__`) are a function of
position too, in whichever worker reads them: torch's generator is seeded from (seed, epoch, sample index) before
each sample, Python's and NumPy's from (seed, epoch, the batch's first sample index) before each batch (their
seeding costs more). So any num_workers, persistent or not, and any resume read the same data; torch's draws
(torchvision's transforms) are also the same on any number of ranks."""

import contextlib
import copy
import logging
import os
import signal
import threading
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from base.data_fingerprint import data_fingerprint
from utils import dist
from utils.allocator import frozen_while_forking
from utils.errors import SampleError, UserError, one_line
from utils.seed import draw_seed, generators_kept, seed_python_and_numpy


class _EpochKeys(Sampler):
    """Yields (epoch, index) for the indices the loader set: each sample's key, sent to whichever worker reads it."""

    def __init__(self) -> None:
        self.epoch, self.indices = 0, []

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededSamples(Dataset):
    """`dataset` read a batch of (epoch, index) keys at a time: Python's and NumPy's generators seeded from the
    batch's first key, torch's from each sample's own. In the main process (num_workers 0) the generators are the
    training's (dropout): put back afterwards. A sample that fails to read raises a SampleError naming it (index
    and file), in whichever process reads it."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        with generators_kept() if get_worker_info() is None else contextlib.nullcontext():
            seed_python_and_numpy(draw_seed(self.seed, *keys[0]))
            return [self.read(key) for key in keys]

    def read(self, key: tuple[int, int]):
        epoch, index = key
        torch.default_generator.manual_seed(draw_seed(self.seed, epoch, index))
        try:
            return self.dataset[index]
        except Exception as e:  # noqa: BLE001 - whatever the data raise, the one line names the sample
            message = one_line(e) if isinstance(e, UserError) else f"{type(e).__name__}: {one_line(e)}"
            file = sample_file(self.dataset, index)
            raise SampleError(f"{message} (sample {index}{f', {file}' if file and file not in message else ''})") \
                from e


def sample_file(dataset: Dataset, index: int) -> str | None:
    """The file of sample `index` where the dataset lists them: ImageFolder's `samples` (path, label) or a `files`
    or `paths` list."""
    for name in ("samples", "files", "paths"):
        try:
            item = getattr(dataset, name)[index]
        except (AttributeError, TypeError, IndexError, KeyError):
            continue
        item = item[0] if isinstance(item, tuple) else item
        if isinstance(item, (str, os.PathLike)):
            return os.fspath(item)
    return None


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def ignore_stop_signals(worker_id: int) -> None:
    """A worker's first act (worker_init_fn): Ctrl-C and a scheduler's SIGTERM to the whole process group (torchrun's
    too) reach the workers as well, but they are the main process's to act on: a worker that died of one would stop
    the main process with an error before it saves. So SIGINT is ignored, and SIGTERM, still blocked from the fork
    (start_workers), ends a worker only when its main process sends it (its way to end a worker that hangs)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if hasattr(signal, "sigwaitinfo"):  # not on macOS: there SIGTERM keeps its default (unblocked below)
        threading.Thread(target=end_on_sigterm_from_parent, daemon=True).start()
    else:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def end_on_sigterm_from_parent() -> None:
    """Take the blocked SIGTERMs as they come; end this process at the first its parent sent."""
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != os.getppid():
        pass
    os._exit(0)


def start_workers(loader: DataLoader) -> Iterator:
    """iter(loader) with this process's objects frozen for the garbage collector while the workers fork: their
    collections skip all the trainer's objects (no traversal, no copy-on-write; benchmarks/bench_imagefolder.py).
    SIGINT and SIGTERM stay blocked meanwhile, so a new worker takes none before it ignores them; one that came
    to this process is handled once they are unblocked."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        with frozen_while_forking():
            return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class BaseDataLoader:
    """Batches `dataset`. A dataset with a `get_batch(indices)` method (data already in memory) is
    batched by index in this process; any other goes through a torch DataLoader with workers.

    validation_split: a fraction (0 < x < 1) or a count of training samples held out for validation.
    folds, fold: k-fold cross-validation (`train.py --folds K` sets them): validation is part `fold` of
    `folds` near-equal parts of a seeded order, training the rest; instead of validation_split."""

    logger = logging.getLogger("train")  # the run's log, as in the classic template

    def __init__(self, dataset: Dataset, *, batch_size: int, shuffle: bool = True, validation_split: float = 0.0,
                 num_workers: int = 0, pin_memory: bool = True, persistent_workers: bool = False,
                 prefetch_factor: int = 2, drop_last: bool = False, seed: int = 0,
                 indices: torch.Tensor | None = None, folds: int = 0, fold: int = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if isinstance(dataset, IterableDataset):
            raise ValueError(f"{type(dataset).__name__} is an IterableDataset: give a map-style Dataset (__getitem__ "
                             "and __len__); the epoch order, split, sharding and exact resume work by index")
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.classes = [str(name) for name in getattr(dataset, "classes", ())]  # names of labels 0, 1, ...
        self.drop_last, self.seed = drop_last, seed
        self.loader_options = {"num_workers": num_workers, "pin_memory": pin_memory and torch.cuda.is_available()}
        if num_workers > 0:
            self.loader_options.update(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)
        self.indices = torch.arange(len(dataset)) if indices is None else indices
        self.valid_indices = self._fold(folds, fold, validation_split) if folds else self._split(validation_split)
        self.epoch = 0
        self.batch_indices = self.indices[:0]  # the dataset indices of the batch last given (a loss may ask)
        self._sampler = _EpochKeys()
        self._loader = None  # created on first use, kept so persistent workers survive epochs

    @classmethod
    def has_validation(cls, args: dict) -> bool:
        """Whether a loader made with these config `args` gives validation data (`split_validation`). The
        config checker asks, so that `monitor` may name `val_` values; override it if your loader decides."""
        return bool(args.get("validation_split", 0)) or bool(args.get("folds", 0))

    def _split(self, validation_split: float) -> torch.Tensor | None:
        n = len(self.indices)
        if isinstance(validation_split, bool) or not isinstance(validation_split, (int, float)):
            raise ValueError(f"validation_split must be a fraction or a count, got {validation_split!r}")
        if isinstance(validation_split, int) and not 0 <= validation_split < n:
            raise ValueError(f"validation_split {validation_split} must be a count in [0, {n}) (the dataset size)")
        if isinstance(validation_split, float) and not 0.0 <= validation_split < 1.0:
            raise ValueError(f"validation_split {validation_split} must be a fraction in [0, 1)")
        n_valid = validation_split if isinstance(validation_split, int) else int(n * validation_split)
        if n_valid == 0:
            return None
        order = self._seeded_order()
        return self._hold_out(order[:n_valid], order[n_valid:])

    def _fold(self, folds: int, fold: int, validation_split: float) -> torch.Tensor:
        """Hold out part `fold` of `folds`; the parts of one seed cover every sample once."""
        if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= len(self.indices):
            raise ValueError(f"folds must be an integer from 2 to the number of samples, got {folds!r}")
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
            raise ValueError(f"fold must be an integer from 0 to {folds - 1}, got {fold!r}")
        if validation_split:
            raise ValueError("folds and validation_split exclude each other: the fold is the validation data")
        parts = list(torch.tensor_split(self._seeded_order(), folds))
        valid = parts.pop(fold)
        return self._hold_out(valid, torch.cat(parts))

    def _seeded_order(self) -> torch.Tensor:
        """The one order (a function of the seed) that validation_split and folds take their parts from."""
        return torch.randperm(len(self.indices), generator=torch.Generator().manual_seed(self.seed))

    def _hold_out(self, valid: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
        """Keep positions `train` of the indices for training; return those at `valid`."""
        held_out, self.indices = self.indices[valid], self.indices[train]
        return held_out

    def split_validation(self) -> "BaseDataLoader | None":
        """A loader over the held-out samples: same dataset, no shuffle, no padding across ranks."""
        if self.valid_indices is None:
            return None
        valid = copy.copy(self)
        valid.indices, valid.valid_indices, valid.shuffle, valid.drop_last = self.valid_indices, None, False, False
        valid._sampler, valid._loader = _EpochKeys(), None
        return valid

    def set_epoch(self, epoch: int) -> None:
        """Select the order of `epoch` (a pure function of seed and epoch)."""
        self.epoch = epoch

    def to(self, device: torch.device) -> "BaseDataLoader":
        """Move in-memory data to the training device (a no-op for datasets read by workers)."""
        if hasattr(self.dataset, "to"):
            self.dataset.to(device)
        return self

    def epoch_indices(self) -> torch.Tensor:
        """This rank's samples for the current epoch, in order, before skipping."""
        indices = self.indices
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            indices = indices[torch.randperm(len(indices), generator=generator)]
        world = dist.world_size()
        if world > 1:
            if self.shuffle:  # training: every rank gets as many samples (steps must match), as DistributedSampler
                padded = -(-len(indices) // world) * world
                indices = torch.cat([indices, indices[: padded - len(indices)]])
            indices = indices[dist.rank() :: world]
        if self.drop_last:
            indices = indices[: len(indices) // self.batch_size * self.batch_size]
        return indices

    def fingerprint(self) -> dict:
        """What a resume compares to know the data are the same (base/data_fingerprint.py)."""
        return data_fingerprint(self.dataset, self.indices)

    @property
    def n_samples(self) -> int:
        return len(self.indices)

    # What a config reads with "${data.<name>}" (README: Values from the data), computed only when read.
    @property
    def num_classes(self) -> int:
        """The number of class names, else the largest training label + 1."""
        return len(self.classes) or int(self._labels().max()) + 1

    @property
    def in_channels(self) -> int:
        """The first dimension of the first training sample's input."""
        return int(self.dataset[int(self.indices[0])][0].shape[0])

    @property
    def class_weights(self) -> torch.Tensor:
        """Each class's inverse frequency among the training samples (not validation), scaled to average 1: a
        loss's per-class `weight` for imbalanced data. A class no training sample has weighs 0."""
        counts = torch.bincount(self._labels(), minlength=len(self.classes)).float()
        inverse = torch.where(counts > 0, 1 / counts, 0.0)
        return inverse / inverse.mean()

    def _labels(self) -> torch.Tensor:
        """The training samples' labels: from the dataset's `targets`, else read sample by sample."""
        targets = getattr(self.dataset, "targets", None)
        if targets is None:
            return torch.tensor([int(self.dataset[int(i)][1]) for i in self.indices])
        return torch.as_tensor(targets).cpu().long()[self.indices.cpu()]

    def __len__(self) -> int:
        """Batches per epoch on this rank (skipped ones included), counted without drawing the order."""
        n, world = len(self.indices), dist.world_size()
        if world > 1:  # training pads to a multiple of world (see epoch_indices); evaluation does not
            n = -(-n // world) if self.shuffle else len(range(dist.rank(), n, world))
        if self.drop_last:
            n = n // self.batch_size * self.batch_size
        return -(-n // self.batch_size)

    def __iter__(self) -> Iterator:
        return self.batches()

    def batches(self, skip: int = 0) -> Iterator:
        """The current epoch's batches, without the first `skip` (a resume in the middle of an epoch)."""
        indices = self.epoch_indices()[skip * self.batch_size :]
        starts = range(0, len(indices), self.batch_size)
        if hasattr(self.dataset, "get_batch"):
            indices = indices.to(self.dataset.device)
            for start in starts:
                self.batch_indices = indices[start : start + self.batch_size]
                yield self.dataset.get_batch(self.batch_indices)
            return
        if self._loader is None:
            # its own generator: creating the iterator must not consume the global RNG (exact resume)
            self._loader = DataLoader(SeededSamples(self.dataset, self.seed), self.batch_size, sampler=self._sampler,
                                      generator=torch.Generator().manual_seed(self.seed),
                                      worker_init_fn=ignore_stop_signals, **self.loader_options)
        self._sampler.epoch, self._sampler.indices = self.epoch, indices.tolist()
        for batch, start in zip(start_workers(self._loader), starts):  # the loader first: it runs to its end
            self.batch_indices = indices[start : start + self.batch_size]
            yield batch
