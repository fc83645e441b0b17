"""Predict classes with a checkpoint, for image files and folders or for the data loader's test split.

    python predict.py -r saved/mnist/<run_id>/model_best.pth digits/ seven.png   # path, class, probability, topk
    python predict.py -r saved/mnist/<run_id>/model_best.pth                     # the test split: index, target, ...
"""

import utils.python_version  # noqa: F401 - first: an older Python stops here, in one line

# isort: split
import csv
import io
from collections.abc import Iterator
from pathlib import Path

import torch

from data_loader.data_loaders import image_files
from logger import progress_bar
from runs.run import CHECKPOINT_HELP, Run, check_output_path, open_checkpoint
from trainer.trainer import data_and_target
from utils import checkpoint
from utils.cli import ArgumentParser, add_common_arguments, integer, request_of, run_main, text
from utils.errors import UserError


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-r", "--resume", type=text, required=True, help=CHECKPOINT_HELP)
    parser.add_argument("inputs", nargs="*", type=text, help="image files or folders (default: the test split)")
    parser.add_argument("-o", "--output", type=text, help="CSV file (default: <checkpoint>-predictions.csv, replaced)")
    parser.add_argument("--force", action="store_true", help="let -o replace an existing file")
    parser.add_argument("--topk", type=integer, default=5, help="classes listed per input (default 5)")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def load_model(args) -> tuple[Run, torch.nn.Module]:
    """The run of the checkpoint (its config as test.py reads it: data unless --trust-config) and its model
    in eval mode, the weights as saved (unwrapped even from DDP or compile)."""
    run = open_checkpoint(request_of(args))
    path, models = run.resumed_from, run.config.build_named("arch")
    if models.keys() != {"model"}:
        raise UserError(f"{path}: arch has {len(models)} models ({', '.join(models)}); this script takes one")
    checkpoint.load_model_weights(models["model"], run.state["model"], str(path))
    return run, models["model"].to(run.device).eval()


def batches(args, config, device: torch.device) -> tuple[list, Iterator]:
    """The inputs' names and their (data, target or None) batches: the image files of `args.inputs`, read as
    the data loader's `image_reader` says, else the loader's test split (names: sample indices)."""
    loader_args = config["data_loader"].get("args", {})
    if args.inputs:
        reader = getattr(config.callables["data_loader"], "image_reader", None)
        if reader is None:
            raise UserError(f"{config['data_loader']['type']} has no image_reader: give no inputs to predict "
                            "on its test split, or add one (data_loader/data_loaders.py)")
        read, files, size = reader(loader_args), image_files(args.inputs), loader_args.get("batch_size", 32)
        return [str(f) for f in files], ((torch.stack([read(str(f)) for f in files[i : i + size]]), None)
                                         for i in range(0, len(files), size))
    loader = config.build_data_loader(device, test=True)
    return list(range(loader.n_samples)), (data_and_target(batch, "predict.py") for batch in loader)


def predict(model: torch.nn.Module, stream: Iterator, device: torch.device, k: int, bar) -> tuple[list, list, list]:
    """Top-k probabilities and classes of every input, and the true classes where known; one host sync."""
    tops, targets = [], []
    with torch.inference_mode():
        for data, target in stream:
            output = model(data.to(device))
            if not isinstance(output, torch.Tensor) or output.dim() != 2:
                raise UserError("the model returns no (batch, classes) scores: predict.py needs a classifier")
            tops.append(output.float().softmax(dim=1).topk(min(k, output.shape[1]), dim=1))
            targets += [] if target is None else [target.to(device)]
            bar.update(len(data))
    probs, classes = (torch.cat(t).tolist() for t in zip(*tops))
    return probs, classes, torch.cat(targets).tolist() if targets else []


def csv_text(keys: list, probs: list, classes: list, labels: list, names: list[str], k: int) -> str:
    """A row per input; the top-k classes as `name:probability;...`. Without names (an older checkpoint): indices."""
    def name(i: int) -> str:
        return names[i] if i < len(names) else str(i)

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([*(["index", "target"] if labels else ["path"]), "class", "probability", f"top{k}"])
    for n, (key, top, p) in enumerate(zip(keys, classes, probs)):
        writer.writerow([key, *([name(labels[n])] if labels else []), name(top[0]), f"{p[0]:.6f}",
                         ";".join(f"{name(c)}:{q:.6f}" for c, q in zip(top, p))])
    return text.getvalue()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}")
    if args.output:
        check_output_path(Path(args.output), Path(args.resume), args.force)
    run, model = load_model(args)
    keys, stream = batches(args, run.config, run.device)
    if not keys:
        raise UserError(f"{run.resumed_from}: its test split is empty: nothing to predict")
    with progress_bar(len(keys), "predict", seconds=run.config["trainer"]["progress_seconds"]) as bar:
        probs, classes, labels = predict(model, stream, run.device, args.topk, bar)
    out = Path(args.output or run.resumed_from.with_name(f"{run.resumed_from.stem}-predictions.csv"))
    text = csv_text(keys, probs, classes, labels, run.state.get("classes", []), args.topk)
    checkpoint.save_atomic(text.encode(), out, "predictions")
    if labels:
        print(f"accuracy: {sum(label == top[0] for label, top in zip(labels, classes)) / len(keys):.6g}")
    print(f"{len(keys)} predictions written to {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
