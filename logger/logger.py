"""Console and file logging, and the progress bar: what a person watching a run sees."""

import logging
import sys
from pathlib import Path

from utils import dist

LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


def setup_logging(log_file: Path | None, verbosity: int = 2, rank: int = 0) -> None:
    """Log to the console and, on rank 0, append to `log_file` (a resumed run continues the same file)."""
    root = logging.getLogger()
    logging.raiseExceptions = False  # a full disk under train.log: no traceback per line; the next save says it
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    level = LEVELS.get(verbosity, logging.DEBUG) if rank == 0 else logging.WARNING
    root.setLevel(max(level, logging.INFO))  # other libraries' debug chatter stays out
    logging.getLogger("train").setLevel(level)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    root.addHandler(console)
    if log_file is not None and rank == 0:
        file = logging.FileHandler(log_file, mode="a")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file)


def progress_bar(total: int, desc: str, initial: int = 0, enabled: bool = True):
    """tqdm over samples, for people watching a terminal; off in CI, in files and on ranks > 0."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", unit_scale=True, dynamic_ncols=True,
                leave=False, disable=not (enabled and dist.is_main() and sys.stderr.isatty()))
