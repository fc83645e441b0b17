"""Learning-rate range test: train a few steps with the learning rate growing exponentially, and suggest one.

    python lr_find.py -c configs/mnist.json                          # 100 steps from 1e-7 to 10
    python lr_find.py -c configs/mnist.json --steps 200 --end 1 --out lr_find/

The config's model, loss, optimizer and data train as in train.py (the trainer's own step: AMP, clipping, a
custom train_step); the ramp sets the learning rate instead of the lr_scheduler, and stops when the smoothed
loss passes 4x its minimum. The suggestion is where the smoothed loss falls fastest against log(lr) (fastai's
"steep" point, as Lightning's): a starting point, usually a little below the loss's minimum. Nothing is saved,
no run directory is made; the curve goes to --out (lr_find.csv, TensorBoard), by default a temporary folder.
"""

import utils.python_version  # noqa: F401 - first: an older Python stops here, in one line

# isort: split
import csv
import io
import itertools
import math
import os
import tempfile
from pathlib import Path

from logger import TensorboardWriter, setup_logging
from runs.run import is_run_directory, open_run
from trainer.trainer import to_device
from utils import dist
from utils.checkpoint import save_atomic
from utils.cli import ArgumentParser, add_common_arguments, integer, number, request_of, run_main, text
from utils.errors import UserError

BETA = 0.98  # the loss's exponential moving average (debiased), as fastai's and Lightning's finders
DIVERGED = 4.0  # stop when the smoothed loss exceeds this multiple of its (positive) minimum
SKIP_BEGIN, SKIP_END = 10, 1  # points left out of the suggestion (Lightning's defaults): the start is noise


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--steps", type=integer, default=100, help="optimizer steps in the ramp (default 100)")
    parser.add_argument("--start", type=number, default=1e-7, help="the first learning rate (default 1e-7)")
    parser.add_argument("--end", type=number, default=10.0, help="the last learning rate (default 10)")
    parser.add_argument("--out", type=text,
                        help="folder for lr_find.csv and tensorboard/ (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("give a config (-c)")
    if args.steps < 2 or not 0 < args.start < args.end:
        parser.error("--steps must be >= 2 and 0 < --start < --end")
    out = Path(os.path.realpath(args.out)) if args.out else None  # before the ramp: a file or a run's folder
    if out and (out.exists() and not out.is_dir() or any(is_run_directory(p) for p in [out, *out.parents])):
        parser.error(f"--out {args.out}: not a folder, or inside a run directory (whose files the runs own)")
    return args


def endless_batches(loader):
    """Epoch after epoch of the training data, in the seeded order of each."""
    if len(loader) == 0:
        raise UserError("the training data is empty: no batch for the range test")
    for epoch in itertools.count(1):
        loader.set_epoch(epoch)
        yield from loader.batches()


def ramp(trainer, steps: int, start: float, end: float) -> list[tuple[float, float, float]]:
    """(lr, loss, smoothed loss) per step, until `steps` or divergence. One batch is one optimizer step."""
    trainer.train_mode(True)
    rows, average, best = [], 0.0, math.inf
    for step, batch in zip(range(steps), endless_batches(trainer.data_loader)):
        lr = start * (end / start) ** (step / (steps - 1))
        for optimizer in trainer.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr
        result = trainer.train_batch(to_device(batch, trainer.device, trainer.memory_format), 0, 1)  # it steps
        loss = math.nan if result is None else result["loss"].item()  # a host sync per step: each value is needed
        average = BETA * average + (1 - BETA) * loss
        smoothed = average / (1 - BETA ** (step + 1))
        rows.append((lr, loss, smoothed))
        if not math.isfinite(smoothed) or 0 < best < smoothed / DIVERGED:  # a minimum <= 0: NaN/Inf only
            break
        best = min(best, smoothed)
    return rows


def suggest_lr(rows: list[tuple[float, float, float]]) -> float | None:
    """The lr where the smoothed loss falls fastest against log(lr) (its most negative slope)."""
    points = [(math.log(lr), smoothed) for lr, _, smoothed in rows if math.isfinite(smoothed)]
    if len(points) > SKIP_BEGIN + SKIP_END + 2:
        points = points[SKIP_BEGIN : len(points) - SKIP_END]
    if len(points) < 3:
        return None
    slopes = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(points, points[1:])]
    steepest = min(range(len(slopes)), key=slopes.__getitem__)
    return math.exp(points[steepest][0])


def write_curve(rows: list[tuple[float, float, float]], out: Path) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["step", "lr", "loss", "smoothed_loss"])
    writer.writerows((step, *row) for step, row in enumerate(rows))
    save_atomic(text.getvalue().encode(), out / "lr_find.csv", what="LR finder curve")
    board = TensorboardWriter(out / "tensorboard", enabled=True)
    for step, (lr, loss, smoothed) in enumerate(rows):
        board.scalars({"lr_find/lr": lr, "lr_find/loss": loss, "lr_find/smoothed_loss": smoothed}, step)
    board.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    if dist.launched_by_torchrun():
        raise UserError("lr_find.py runs in one process: python lr_find.py -c ...")
    run = open_run(request_of(args))  # never started: no run directory, nothing saved
    setup_logging(None, run.config["trainer"]["verbosity"])
    trainer = run.config.build_trainer(run.device, run.config.build_data_loader(run.device), run=run)
    trainer.lr_schedulers = {}  # the ramp sets the lr
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="lr_find-"))
    rows = ramp(trainer, args.steps, args.start, args.end)
    out.mkdir(parents=True, exist_ok=True)
    write_curve(rows, out)
    if len(rows) < args.steps:
        print(f"Stopped after {len(rows)} of {args.steps} steps at lr {rows[-1][0]:.3g}: the loss diverged")
    lr = suggest_lr(rows)
    where = f"curve: {out / 'lr_find.csv'}, tensorboard --logdir {out / 'tensorboard'}"
    if lr is None:
        print(f"No suggestion: too few steps before the loss diverged (lower --start or --end); {where}")
        return 1
    print(f"Suggested lr: {lr:.3g} (steepest descent of the smoothed loss); {where}")
    return 0


if __name__ == "__main__":
    run_main(main)
