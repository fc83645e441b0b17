"""Console and file logging, and the progress bar: what a person watching a run sees."""

import logging
import sys
import time
from datetime import timedelta
from pathlib import Path

from utils import dist

LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
FILE_ONLY = {"file_only": True}  # `log.info(..., extra=FILE_ONLY)`: train.log only, not the console


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
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    console.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    root.addHandler(console)
    if log_file is not None and rank == 0:
        file = logging.FileHandler(log_file, mode="a")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file)


def progress_bar(total: int, desc: str, initial: int = 0, enabled: bool = True, seconds: float = 10.0):
    """tqdm over samples for people watching a terminal; where the output is not one (CI, nohup, Slurm), a plain
    line every `seconds` (ProgressLines). Off on ranks > 0."""
    shown = enabled and dist.is_main()
    if not (shown and sys.stderr.isatty()):
        return ProgressLines(total, desc, initial, seconds if shown else 0)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", unit_scale=True, dynamic_ncols=True,
                leave=False)


class ProgressLines:
    """The progress bar's interface (update, set_postfix, close, n, total) as a plain line on stdout (samples done,
    samples/s, the time left, the postfix: the loss) at the first update `seconds` after the last line (0: never).
    Training updates it at log intervals, so it adds no work to a step."""

    def __init__(self, total: int, desc: str, initial: int = 0, seconds: float = 10.0):
        self.total, self.desc, self.n, self.initial, self.seconds = total, desc, initial, initial, seconds
        self.started = self.printed = time.monotonic()
        self.postfix = ""

    def set_postfix(self, refresh: bool = True, **values: str) -> None:
        self.postfix = "".join(f"  {key} {value}" for key, value in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.seconds or now - self.printed < self.seconds:
            return
        self.printed, rate = now, (self.n - self.initial) / (now - self.started)
        eta = timedelta(seconds=round((self.total - self.n) / rate)) if rate else "?"
        print(f"{self.desc}  {self.n:,}/{self.total:,} ({self.n / max(self.total, 1):.0%})  {rate:,.0f} samples/s  "
              f"ETA {eta}{self.postfix}", flush=True)

    def close(self) -> None:
        """Nothing to clear: the lines stay."""

    def __enter__(self) -> "ProgressLines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
