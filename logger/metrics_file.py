"""metrics.csv in the run directory: one row per epoch with every value the epoch logged, for a
spreadsheet or `pandas.read_csv`. Rows are kept by epoch, so an epoch trained again after an
interruption is written once; the file is rewritten whole and atomically at each epoch's end."""

import csv
import io
from pathlib import Path

from utils.checkpoint import save_atomic
from utils.errors import UserError

KEYS = ["epoch", "global_step"]  # the first columns; the logged values follow in the order first seen


class MetricsFile:
    """The rows of a run's metrics.csv. `completed`: the epochs the run state holds (a resume); rows of
    later epochs were written by an interrupted run after its last checkpoint and are dropped."""

    def __init__(self, path: Path, completed: int = 0, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self.rows: dict[int, dict] = {}
        self.columns = list(KEYS)
        if enabled and completed and self.path.is_file():
            self._read(completed)

    def _read(self, completed: int) -> None:
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            for number, row in enumerate(reader, start=2):
                epoch = row.get("epoch") or ""
                if not epoch.isdigit():
                    raise UserError(f"{self.path}: line {number}: epoch {epoch!r} is not a number "
                                    "(fix or move the file to resume)")
                if int(epoch) <= completed:
                    self.rows[int(epoch)] = row
            self.columns += [name for name in reader.fieldnames or () if name not in self.columns]

    def write(self, epoch: int, global_step: int, values: dict[str, float]) -> None:
        """Add (or replace) the row of `epoch` and rewrite the file."""
        if not self.enabled:
            return
        self.rows[epoch] = {"epoch": epoch, "global_step": global_step, **values}
        self.columns += [name for name in values if name not in self.columns]
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows[key] for key in sorted(self.rows))
        save_atomic(text.getvalue().encode(), self.path, what="metrics file")
