"""Hyper-parameter sweep: an Optuna study of the config's `sweep` search space, each trial an ordinary run.

    python sweep.py -c configs/mnist_sweep.json --trials 20     # again: continues the study, resumes a killed trial
    python sweep.py -c configs/mnist_sweep.json --trials 20 --storage postgresql://user:pw@host/db   # several machines
    python sweep.py -c configs/mnist_sweep.json --report        # the results table and plots so far

A sweep's path: a Request (utils/cli.py) -> its Sweep (runs/sweep.py), which hands out trials -> train.py's train.
"""

import utils.python_version  # noqa: F401 - first: an older Python stops here, in one line

# isort: split
import sys

from runs.sweep import PRUNERS, Sweep, TrialPruned
from train import train
from utils import dist
from utils.allocator import unfreeze_objects
from utils.cli import ArgumentParser, Request, add_common_arguments, integer, request_of, run_main, text
from utils.errors import TrainingError


def parse_args(argv=None) -> tuple[Request, dict]:
    """The request, and the sweep's own options."""
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--trials", type=integer, help="the study's total number of trials (run again to go on)")
    parser.add_argument("--storage", type=text, help="the study's database URL, e.g. "
                        "postgresql://user:password@host/db (default: sqlite in <save_dir>/<name>/sweep/study.db)")
    parser.add_argument("--pruner", choices=PRUNERS, default="median", help="stops poor trials after an epoch "
                        "(default: median; none: off)")
    parser.add_argument("--report", action="store_true", help="print and write the results so far; train nothing")
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("give the config with the search space (-c)")
    if dist.launched_by_torchrun():
        parser.error("a sweep trains its trials in one process: run sweep.py with python, not torchrun")
    if args.report == (args.trials is not None):
        parser.error("give --trials N (the study's total), or --report")
    if args.trials is not None and args.trials < 1:
        parser.error("--trials needs N >= 1")
    return request_of(args), {"trials": args.trials, "storage": args.storage, "pruner": args.pruner}


def main(argv=None) -> int:
    request, options = parse_args(argv)
    sweep = Sweep(request, options["storage"], options["pruner"], create=options["trials"] is not None)
    with sweep.database():
        for trial in sweep.trials(options["trials"]) if options["trials"] else ():
            try:
                train(trial.request, trial.report)  # the one place a trial's run starts
            except TrialPruned as reason:
                sweep.pruned(trial, reason)
                continue
            except TrainingError as e:  # this trial's parameters (a diverging learning rate): the study goes on
                sweep.failed(trial, e)
                continue
            except BaseException:
                print(f"sweep: trial {trial.number} stopped; run the same command again to resume it",
                      file=sys.stderr)
                raise
            finally:
                unfreeze_objects()  # train() froze the trial's objects out of the collector's sight; they end with it
            sweep.finish(trial)
        sweep.summarize()
    return 0


if __name__ == "__main__":
    run_main(main)
