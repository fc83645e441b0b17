"""Evaluate a checkpoint on the test split.

    python test.py -r saved/mnist/<run_id>/model_best.pth
    python test.py -r saved/mnist/<run_id>      # the same: a run's model_best.pth (latest.pth without one)

The model and data are rebuilt from the config stored in the checkpoint (-c overrides it); the
results are printed and appended, one JSON line per evaluation, to test-results.jsonl next to the checkpoint.
Under torchrun every process evaluates its share of the test set and rank 0 reports the totals.
"""

import utils.python_version  # noqa: F401 - first: an older Python stops here, in one line

# isort: split
import json
from datetime import datetime

import torch

from logger import progress_bar
from runs.run import CHECKPOINT_HELP, TEST_RESULTS, open_checkpoint
from trainer.trainer import failing_batch
from utils import checkpoint, dist
from utils.cli import ArgumentParser, add_common_arguments, request_of, run_main, text


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-r", "--resume", type=text, required=True, help=CHECKPOINT_HELP)
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    run = open_checkpoint(request_of(parse_args(argv)))
    path, state = run.resumed_from, run.state
    loader = run.config.build_data_loader(run.device, test=True)
    trainer = run.config.build_trainer(run.device, loader, training=False, run=run)
    checkpoint.load_model_weights(trainer.model, state["model"], str(path))
    if state.get("criterion") and isinstance(trainer.criterion, torch.nn.Module):  # a loss with state of its own
        trainer.criterion.load_state_dict(state["criterion"])
    seconds = run.config["trainer"]["progress_seconds"]
    with progress_bar(loader.n_samples, "test", seconds=seconds) as bar, failing_batch("a test batch fails"):
        result = trainer.evaluate(loader, progress=bar)  # the trainer's valid_step, as in validation
    if not dist.is_main():
        return 0
    result = {"checkpoint": str(path), "epoch": state["epoch"], "samples": loader.n_samples,
              "time": datetime.now().isoformat(timespec="seconds"), **result}
    for key, value in result.items():
        print(f"{key:>12s}: {value:.6g}" if isinstance(value, float) else f"{key:>12s}: {value}")
    out = path.with_name(TEST_RESULTS)
    with open(out, "a") as f:  # one write: earlier evaluations are never rewritten
        f.write(json.dumps(result) + "\n")
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
