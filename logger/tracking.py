"""Experiment tracking (the config's `tracking`): a run's parameters, tags, per-epoch metrics and files, sent by rank 0
to a tracker once an epoch, after the epoch's checkpoint. A tracker is a class with `start`, `log_params`,
`log_metrics`, `log_artifact`, `end` and its `uri` (MLflow's: logger/mlflow_tracker.py); TRACKERS names it by `type`.

Tracking never costs training: its first failure (a server down or too slow, a locked database) is one warning, and
tracking is off for the rest of the process; metrics.csv has every epoch regardless.
"""

import importlib
import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from config.schema import TRACKING_ARGS
from logger.tensorboard import flatten
from utils import dist
from utils.errors import UserError, one_line

log = logging.getLogger("train")
TRACKERS = {"mlflow": ("logger.mlflow_tracker", "MlflowTracker")}  # type -> (module, class)
REQUIREMENTS = "requirements-tracking.txt"
ROOT = Path(__file__).resolve().parents[1]  # the project's code, for its git commit


def check_installed(spec: dict | None, device: torch.device | None = None) -> None:
    """Before anything is written: a config that asks for a tracker whose package is missing stops with one line
    naming the requirements file (rank 0 checks: it is the one that tracks)."""
    def check() -> None:
        try:
            importlib.import_module(TRACKERS[spec["type"]][0])
        except ImportError as e:
            package = (e.name or spec["type"]).partition(".")[0]
            raise UserError(f"tracking.type '{spec['type']}' needs the {package} package: "
                            f"pip install -r {REQUIREMENTS}") from None

    if spec:
        dist.on_main(check, device, UserError(f"rank 0 has no {spec['type']} package: pip install -r {REQUIREMENTS}"))


def git_commit() -> str | None:
    """The commit of the project's code, when it is a git checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


class Tracking:
    """One run's tracking on rank 0; with tracking off, on other ranks, or after a failure, every call does nothing.

    `config`: the run's config as a plain dict (its `tracking`, `name` and `trainer.save_dir` place the run)."""

    def __init__(self, config: dict, enabled: bool = True):
        self.config, self.spec = config, config.get("tracking") if enabled else None
        self.args = {**TRACKING_ARGS, **(self.spec or {}).get("args", {})}
        self.tracker: Any = None  # the started tracker
        self.run_dir: Path | None = None
        self.last_step = 0  # the last epoch the tracked run holds

    def start(self, run_dir: Path, run_id: str | None = None, parent_id: str | None = None) -> str | None:
        """Continue the tracked run `run_id` (a resume), or begin one (a child of `parent_id`, when given) with the
        config as parameters; its id (`run_id` itself if tracking is off or failed)."""
        self.run_dir = run_dir
        if not self.spec:
            return run_id
        module, name = TRACKERS[self.spec["type"]]
        self.tracker = getattr(importlib.import_module(module), name)(
            self.args["uri"], self.args["experiment"] or self.config["name"], self.config["trainer"]["save_dir"])
        tags = {"run_dir": str(run_dir.resolve()), "git_commit": git_commit(), "torch_version": torch.__version__,
                "world_size": str(dist.world_size())}
        tags = {key: value for key, value in tags.items() if value}
        started = self._call(lambda: self.tracker.start(run_id, run_dir.name, parent_id, tags))
        if started is None:
            return run_id
        new_id, self.last_step = started
        if new_id != run_id:
            self._call(lambda: self.tracker.log_params(flatten(self.config)))
        return new_id

    def log_rows(self, rows: dict[int, dict]) -> None:
        """The epochs of metrics.csv's rows the tracked run lacks: saved, then stopped before they were sent."""
        for epoch in sorted(rows):
            if epoch > self.last_step:
                values = {key: float(value) for key, value in rows[epoch].items()
                          if key not in ("epoch", "global_step") and value not in ("", None)}
                self.log_metrics(values, epoch)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        self._call(lambda: self.tracker.log_metrics(values, step, int(time.time() * 1000)))
        self.last_step = max(self.last_step, step)

    def log_artifact(self, path: Path) -> None:
        if path.is_file():
            self._call(lambda: self.tracker.log_artifact(path))

    def end(self, status: str) -> None:
        """The run's config.json and metrics.csv (and, when finished and asked, its checkpoint files) as artifacts;
        then the run's status: FINISHED, KILLED (stopped by a signal, resumable) or FAILED."""
        if self.tracker is None:
            return
        checkpoints = sorted(self.run_dir.glob("*.pth")) if self.args["checkpoints"] and status == "FINISHED" else []
        for path in [self.run_dir / "config.json", self.run_dir / "metrics.csv", *checkpoints]:
            self.log_artifact(path)
        self._call(lambda: self.tracker.end(status))

    def _call(self, action: Callable) -> Any:
        """`action()` while tracking is on; its first failure is one warning and turns tracking off."""
        if self.tracker is None:
            return None
        try:
            return action()
        except Exception as e:  # noqa: BLE001 - whatever the tracker's failure, training goes on
            message = one_line(e)
            log.warning("tracking: %s: %s; tracking is off for the rest of this run (metrics.csv has every epoch)",
                        self.tracker.uri, message if len(message) <= 200 else f"{message[:200]}...")
            self.tracker = None
            return None
