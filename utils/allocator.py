"""glibc's malloc settings for CPU training: keep freed memory instead of page-faulting it back each step."""

import ctypes
import logging
import os
import platform

MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": 32 << 20, "MALLOC_TRIM_THRESHOLD_": 64 << 20}  # bytes, by env variable


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
