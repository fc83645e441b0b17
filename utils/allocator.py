"""Memory for training: glibc's malloc settings (keep freed memory instead of page-faulting it back each step),
and start-up's objects frozen out of the garbage collector's sight."""

import contextlib
import ctypes
import gc
import logging
import os
import platform
from collections.abc import Iterator

MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": 32 << 20, "MALLOC_TRIM_THRESHOLD_": 64 << 20}  # bytes, by env variable
objects_frozen = False  # by freeze_objects (gc.get_freeze_count would tell, but it counts them one by one)


def keep_freed_memory() -> None:
    """Stop glibc from handing freed memory back to the OS between training steps (Linux, CPU runs).

    By default glibc trims the heap and unmaps large blocks as soon as they are freed, so every CPU step
    faults its activations back in (benchmarks/README.md). This sets, from the start, the limits glibc's own
    adaptive rule ends at. MALLOC_*_ or GLIBC_TUNABLES in the environment take precedence."""
    log = logging.getLogger("train")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    if MALLOC_SETTINGS.keys() & os.environ.keys() or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        log.debug("malloc: the environment's settings are kept (utils/allocator.py)")
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, MALLOC_SETTINGS["MALLOC_MMAP_THRESHOLD_"])  # -3: M_MMAP_THRESHOLD
    libc.mallopt(-1, MALLOC_SETTINGS["MALLOC_TRIM_THRESHOLD_"])  # -1: M_TRIM_THRESHOLD
    log.debug("malloc: freed memory is kept (mmap threshold 32 MiB, trim threshold 64 MiB; utils/allocator.py)")


def freeze_objects() -> None:
    """Every object alive now out of the garbage collector's sight (gc.freeze) until `unfreeze_objects`: torch's
    modules, the config, models and data live as long as the run, and a full collection during training then scans
    only what training made (README: Performance)."""
    global objects_frozen
    gc.freeze()
    objects_frozen = True


def unfreeze_objects() -> None:
    """Give the frozen objects back to the collector (at the end of a run whose objects may now be garbage)."""
    global objects_frozen
    gc.unfreeze()
    objects_frozen = False


@contextlib.contextmanager
def frozen_while_forking() -> Iterator[None]:
    """Every object frozen for the block, unless `freeze_objects` froze them already: processes forked in it
    (DataLoader workers) never walk, and so never copy, the parent's objects in their own collections."""
    if objects_frozen:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
