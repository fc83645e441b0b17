"""Train a model described by a config.

    python train.py -c configs/mnist.json            # a new run
    python train.py -r saved/mnist/<run_id>          # resume a run (its newest checkpoint that loads)
    python train.py -r auto -c configs/mnist.json    # resume the newest run of this config's name
    python train.py -c configs/mnist.json --folds 5  # k-fold cross-validation (again: skips finished folds)
    torchrun --nproc_per_node=2 train.py -c configs/mnist.json   # DistributedDataParallel

A run's path: a Request (utils/cli.py) -> a Run (runs/run.py) -> its trainer (config/parser.py) -> train.
"""

import utils.python_version  # noqa: F401 - first: an older Python stops here, in one line

# isort: split
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from logger import FILE_ONLY
from logger.tracking import check_installed
from runs.kfold import KFold
from runs.run import Run, candidates, finetune_weights, open_run
from utils import checkpoint, dist
from utils.allocator import freeze_objects, keep_freed_memory
from utils.cli import (
    SHORTCUTS,
    ArgumentParser,
    Request,
    add_common_arguments,
    integer,
    number,
    request_of,
    run_main,
    text,
)

log = logging.getLogger("train")


def parse_args(argv=None) -> tuple[Request, int]:
    """The request, and the number of folds (0: not k-fold)."""
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("-r", "--resume", type=text, help="checkpoint file, run directory, or 'auto' (the newest run "
                        "of -c's name, or a new one when it has no checkpoint yet)")
    parser.add_argument("--finetune", type=text, metavar="CHECKPOINT",
                        help="start a new run from these model weights only")
    parser.add_argument("--lr", "--learning_rate", type=number, help=f"shortcut for --set {SHORTCUTS['lr']}=...")
    parser.add_argument("--epochs", type=integer, help=f"shortcut for --set {SHORTCUTS['epochs']}=...")
    parser.add_argument("--folds", type=integer, default=0, metavar="K",
                        help="k-fold cross-validation: K runs (0: off)")
    parser.add_argument("--data-changed", action="store_true", help="resume although the training data differ "
                        "from the checkpoint's (the resume is then not exact)")
    parser.add_argument("--reset-best", action="store_true", help="resume with the checkpoint's own best value to "
                        "beat, not the run's best (which a worse state may then replace)")
    parser.add_argument("--run-dir", type=text,
                        help="train a new run in this existing directory (how --folds places each fold)")
    args = parser.parse_args(argv)
    if args.run_dir and (args.resume or not Path(args.run_dir).is_dir() or candidates(Path(args.run_dir))):
        parser.error("--run-dir needs an existing directory without checkpoints, and no -r (resume a run with -r)")
    if args.folds and (args.folds < 2 or args.resume or args.run_dir or not args.config):
        parser.error("--folds needs K >= 2 and -c, not -r or --run-dir (run the same command again to go on)")
    if not args.config and not args.resume:
        parser.error("give a config (-c) or a checkpoint to resume (-r)")
    if args.reset_best and not args.resume:
        parser.error("--reset-best goes with -r: it sets the best value a resume must beat")
    if args.resume and args.finetune:
        parser.error("-r and --finetune exclude each other: resume continues a run, finetune starts one")
    if args.finetune and not args.config:
        parser.error("--finetune needs a config (-c) for the new run")
    if args.resume == "auto" and not args.config:
        parser.error("-r auto needs -c: the run is the config's name and save_dir (with --set applied)")
    return request_of(args), args.folds


def main(argv=None) -> int:
    request, folds = parse_args(argv)
    if not folds:
        return train(request)
    kfold = KFold(request, folds)
    for fold, fold_request in kfold.unfinished():
        try:
            train(fold_request)
        except BaseException:
            print(f"k-fold: fold {fold} stopped; run the same command again to go on (finished folds are skipped)",
                  file=sys.stderr)
            raise
        kfold.finish(fold)
    kfold.summarize()
    return 0


def train(request: Request, epoch_callback: Callable[[int, dict[str, float]], None] | None = None) -> int:
    """Train the run of `request`; `epoch_callback(epoch, results)` after each epoch's checkpoint (sweep.py's)."""
    run = open_run(request)
    trainer = run.config.build_trainer(run.device, run.config.build_data_loader(run.device), run=run)
    if epoch_callback:
        trainer.epoch_callbacks.append(epoch_callback)
    if run.config["finetuned_from"] and not run.state:  # --finetune, or a config that records it
        checkpoint.load_model_weights(trainer.model, finetune_weights(run.config),
                                      f"--finetune {run.config['finetuned_from']['path']}")
    if run.state and (reason := run.restore(trainer)):
        print(f"{run.resumed_from}: nothing to do: {reason} (--epochs N trains further)")
        return 0
    check_installed(run.config["tracking"], run.device)
    trainer.check_first_batches()  # before anything is written
    run.start()
    if run.device.type == "cpu":
        keep_freed_memory()
    log_start(trainer, run, request)
    freeze_objects()  # start-up's objects, out of the garbage collector's sight while training
    trainer.train()
    log.info("Done. Checkpoints and logs: %s", run.dir)
    return 0


def log_start(trainer, run: Run, request: Request) -> None:
    if run.state:
        log.info("Resuming %s at epoch %d, batch %d (global step %d) in %s", run.resumed_from, trainer.epoch + 1,
                 trainer.batch_in_epoch, trainer.global_step, run.dir)
        for line in run.changes:
            log.warning("Config changed since the checkpoint: %s", line)
        if trainer.monitor_changed:
            log.warning("trainer.monitor changed since the checkpoint (%s -> %s): its best value and early-stop count "
                        "start afresh: the best checkpoint follows the new one", trainer.monitor_changed,
                        trainer.options["monitor"])
        if run.data_changes:
            log.warning("The training data differ from the checkpoint's (%s): the resume is not exact",
                        ", ".join(run.data_changes))
    elif request.resume == "auto":
        log.info("-r auto: no checkpoint of this run yet: starting it in %s", run.dir)
    else:
        log.info("Run directory: %s", run.dir)
    for name, model in trainer.models.items():
        log.info("%s", model_summary(model, name))
        log.info("%s", model, extra=FILE_ONLY)  # the whole module tree: train.log only
    log.info("Training on %s (%d process%s), %d training samples, %d validation samples", trainer.device,
             dist.world_size(), "es" if dist.world_size() > 1 else "", trainer.data_loader.n_samples,
             trainer.valid_data_loader.n_samples if trainer.valid_data_loader else 0)


def model_summary(model: torch.nn.Module, name: str = "model") -> str:
    """One console line: the model's class, its parameters (trainable ones), and the megabytes (millions of bytes) of
    its parameters and buffers."""
    title = type(model).__name__ if name == "model" else f"{name} ({type(model).__name__})"
    params = list(model.parameters())
    size = sum(t.numel() * t.element_size() for t in [*params, *model.buffers()]) / 1e6
    return (f"Model {title}: {sum(p.numel() for p in params):,} parameters "
            f"({sum(p.numel() for p in params if p.requires_grad):,} trainable), {size:.2f} MB")


if __name__ == "__main__":
    run_main(main)
