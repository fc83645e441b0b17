"""k-fold cross-validation (`train.py -c cfg --folds K`): K runs under one parent run directory,

    <save_dir>/<name>/<run_id>/fold_0/ ... fold_<K-1>/   each an ordinary run (resumable with -r)
    <save_dir>/<name>/<run_id>/folds.json                 the folds done, then their mean and sd

With `tracking` in the config, each fold is a child of one tracked run of the parent, which gets the summary.
Fold i trains with `data_loader.args.folds=K, fold=i` (validation is part i of K of a seeded order). The
same command again continues the newest parent of the same config and K: finished folds are skipped, an
interrupted one resumes.
"""

import csv
import json
import statistics
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from logger.tracking import Tracking, check_installed
from runs.run import LATEST, candidates, load_config, new_run_dir
from utils import checkpoint, dist
from utils.cli import Request
from utils.errors import UserError

RESULTS = "folds.json"


def fold_overrides(folds: int, fold: int) -> list[str]:
    """The config keys of fold `fold`: the fold is the validation data, instead of validation_split."""
    return [f"data_loader.args.folds={folds}", f"data_loader.args.fold={fold}", "data_loader.args.validation_split=0"]


def shared_config(config) -> dict:
    """What every fold of one k-fold run has in common: its config without the fold index, as folds.json has it."""
    shared = json.loads(json.dumps(config.config))
    del shared["data_loader"]["args"]["fold"]
    return shared


def find_parent(base: Path, folds: int, shared: dict) -> tuple[Path | None, dict]:
    """The newest k-fold parent under `base` with this config and number of folds, and its record."""
    for parent in sorted(base.glob(f"*/{RESULTS}"), key=lambda p: p.stat().st_mtime_ns, reverse=True):
        try:
            record = json.loads(parent.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("folds") == folds and record.get("config") == shared:
            return parent.parent, record
    return None, {}


def fold_result(run_dir: Path, monitor: str) -> dict:
    """A finished fold: its last epoch's values (metrics.csv) and the best monitored value (latest.pth)."""
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            last = list(csv.DictReader(f))[-1]
    except (OSError, IndexError):
        raise UserError(f"{run_dir}: no epoch in metrics.csv to take the fold's results from") from None
    values = {key: float(value) for key, value in last.items()
              if value and key not in ("epoch", "global_step") and key != "lr" and not key.startswith("lr_")}
    result = {"run_dir": str(run_dir), "epoch": int(last["epoch"]), "metrics": values}
    if monitor != "off":
        result["best"] = {monitor.split()[1]: checkpoint.load(run_dir / LATEST)["monitor_best"]}
    return result


def summarize(runs: list[dict]) -> dict:
    """Mean and sample standard deviation over the folds of the best monitored value and each metric."""
    table = {f"best {key}": [run["best"][key] for run in runs] for key in runs[0].get("best", {})}
    table.update({key: [run["metrics"].get(key, float("nan")) for run in runs] for key in runs[0]["metrics"]})
    return {key: {"mean": statistics.fmean(values), "sd": statistics.stdev(values)} for key, values in table.items()}


class KFold:
    """The folds of one k-fold run: its parent directory (found again, or made), which folds are finished,
    each fold's request, and the record of their results."""

    def __init__(self, request: Request, folds: int):
        if dist.launched_by_torchrun():
            raise UserError("--folds runs the folds in one process; under torchrun train each fold on its own with "
                            f"--set {' '.join(fold_overrides(folds, 0))} (and fold=1, 2, ...)")
        self.request, self.folds, self.record = request, folds, {}
        config = load_config(self.fold_request(0))  # every mistake stops here, before anything is written
        check_installed(config["tracking"])
        shared = shared_config(config)
        self.parent, self.record = find_parent(Path(config["trainer"]["save_dir"]) / config["name"], folds, shared)
        if self.parent is None:
            self.parent = new_run_dir(config)
            self.record = {"folds": folds, "monitor": config["trainer"]["monitor"], "config": shared, "runs": {}}
        self.tracking = Tracking(shared)
        if tracking_run_id := self.tracking.start(self.parent, self.record.get("tracking_run_id")):
            self.record["tracking_run_id"] = tracking_run_id  # the folds' parent in the tracker
        self.write()
        print(f"k-fold: {folds} folds in {self.parent}", flush=True)

    def fold_request(self, fold: int, **changes) -> Request:
        return replace(self.request, overrides=[*self.request.overrides, *fold_overrides(self.folds, fold)],
                       tracking_parent=self.record.get("tracking_run_id"), **changes)

    def unfinished(self) -> Iterator[tuple[int, Request]]:
        """Each fold not finished before, and its request: in its own folder, resumed if it has a checkpoint."""
        for fold in range(self.folds):
            if str(fold) in self.record["runs"]:
                print(f"k-fold: fold {fold} finished before, skipped", flush=True)
                continue
            run_dir = self.parent / f"fold_{fold}"
            run_dir.mkdir(exist_ok=True)
            print(f"k-fold: fold {fold} of {self.folds} in {run_dir}", flush=True)
            resume = str(run_dir) if candidates(run_dir) else None
            yield fold, self.fold_request(fold, resume=resume, run_dir=None if resume else str(run_dir))

    def finish(self, fold: int) -> None:
        self.record["runs"][str(fold)] = fold_result(self.parent / f"fold_{fold}", self.record["monitor"])
        self.write()

    def summarize(self) -> None:
        self.record["summary"] = summarize([self.record["runs"][str(fold)] for fold in range(self.folds)])
        self.write()
        self.tracking.log_metrics({f"{key.replace(' ', '_')}_{stat}": value for key, stats in
                                   self.record["summary"].items() for stat, value in stats.items()}, 0)
        self.tracking.log_artifact(self.parent / RESULTS)
        self.tracking.end("FINISHED")
        for key, stats in self.record["summary"].items():
            print(f"k-fold: {key} {stats['mean']:.6g} ± {stats['sd']:.3g} (mean ± sd over {self.folds} folds)")
        print(f"k-fold: results written to {self.parent / RESULTS}")

    def write(self) -> None:
        checkpoint.save_atomic((json.dumps(self.record, indent=2) + "\n").encode(), self.parent / RESULTS,
                               what="k-fold results")
