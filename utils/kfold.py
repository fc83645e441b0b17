"""k-fold cross-validation (`train.py -c cfg --folds K`): K runs under one parent run directory,

    <save_dir>/<name>/<run_id>/fold_0/ ... fold_<K-1>/   each an ordinary run (resumable with -r)
    <save_dir>/<name>/<run_id>/folds.json                 the folds done, then their mean and sd

Fold i trains with `data_loader.args.folds=K, fold=i` (its validation data is part i of K of a seeded
order; see BaseDataLoader), which its config and checkpoints keep. Running the same command again
continues the newest parent with the same config and K: finished folds are skipped, an interrupted one
resumes from its newest checkpoint.
"""

import argparse
import copy
import csv
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from utils import checkpoint, dist
from utils.errors import UserError
from utils.startup import load_config

RESULTS = "folds.json"


def fold_overrides(folds: int, fold: int) -> list[str]:
    """The config keys of fold `fold`: the fold is the validation data, instead of validation_split."""
    return [f"data_loader.args.folds={folds}", f"data_loader.args.fold={fold}", "data_loader.args.validation_split=0"]


def fold_config(args: argparse.Namespace, fold: int):
    """The checked config of one fold: the user's config and command line plus the fold's keys."""
    return load_config(argparse.Namespace(**{**vars(args), "set": [*args.set, *fold_overrides(args.folds, fold)]}))


def shared_config(config) -> dict:
    """What every fold of one k-fold run has in common: its config without the fold index."""
    shared = copy.deepcopy(config.config)
    del shared["data_loader"]["args"]["fold"]
    return json.loads(json.dumps(shared))  # as folds.json holds it


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
        result["best"] = {monitor.split()[1]: checkpoint.load(run_dir / "latest.pth")["monitor_best"]}
    return result


def summarize(runs: list[dict]) -> dict:
    """Mean and sample standard deviation over the folds of the best monitored value and each metric."""
    table = {f"best {key}": [run["best"][key] for run in runs] for key in runs[0].get("best", {})}
    table.update({key: [run["metrics"].get(key, float("nan")) for run in runs] for key in runs[0]["metrics"]})
    return {key: {"mean": statistics.fmean(values), "sd": statistics.stdev(values)} for key, values in table.items()}


def write_record(parent: Path, record: dict) -> None:
    checkpoint.save_atomic((json.dumps(record, indent=2) + "\n").encode(), parent / RESULTS, what="k-fold results")


def run_folds(args: argparse.Namespace, argv: list[str], train: Callable[[list[str]], int],
              new_run_dir: Callable) -> int:
    """Train the folds that are not finished, one `train(argv)` each, then print and write the summary."""
    if dist.launched_by_torchrun():
        raise UserError("--folds runs the folds in one process; under torchrun train each fold on its own with "
                        f"--set {' '.join(fold_overrides(args.folds, 0))} (and fold=1, 2, ...)")
    config = fold_config(args, 0)  # every mistake stops here, before anything is written
    shared = shared_config(config)
    parent, record = find_parent(Path(config["trainer"]["save_dir"]) / config["name"], args.folds, shared)
    if parent is None:
        parent = new_run_dir(config)
        record = {"folds": args.folds, "monitor": config["trainer"]["monitor"], "config": shared, "runs": {}}
        write_record(parent, record)
    print(f"k-fold: {args.folds} folds in {parent}", flush=True)
    for fold in range(args.folds):
        if str(fold) in record["runs"]:
            print(f"k-fold: fold {fold} finished before, skipped", flush=True)
            continue
        run_dir = parent / f"fold_{fold}"
        run_dir.mkdir(exist_ok=True)
        where = ["-r", str(run_dir)] if checkpoint.candidates(run_dir) else ["--run-dir", str(run_dir)]
        print(f"k-fold: fold {fold} of {args.folds} in {run_dir}", flush=True)
        try:
            train([*argv, "--folds", "0", *where, "--set", *fold_overrides(args.folds, fold)])
        except BaseException:
            print(f"k-fold: fold {fold} stopped; run the same command again to go on (finished folds are skipped)",
                  file=sys.stderr)
            raise
        record["runs"][str(fold)] = fold_result(run_dir, record["monitor"])
        write_record(parent, record)
    record["summary"] = summarize([record["runs"][str(fold)] for fold in range(args.folds)])
    write_record(parent, record)
    for key, stats in record["summary"].items():
        print(f"k-fold: {key} {stats['mean']:.6g} ± {stats['sd']:.3g} (mean ± sd over {args.folds} folds)")
    print(f"k-fold: results written to {parent / RESULTS}")
    return 0
