"""Evaluate a checkpoint on the test split.

    python test.py -r saved/mnist/<run_id>/model_best.pth

The model and data are rebuilt from the config stored in the checkpoint (-c overrides it); the
results are printed and written next to the checkpoint as <checkpoint>-test.json. Under torchrun every
process evaluates its share of the test set and rank 0 reports the totals.
"""

import json
import sys
from pathlib import Path

from utils import checkpoint, dist
from utils.cli import ArgumentParser, run_main, select_device
from utils.config import ConfigParser


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-r", "--resume", required=True, help="checkpoint file to evaluate")
    parser.add_argument("-c", "--config", help="config file to use instead of the checkpoint's")
    parser.add_argument("-d", "--device", help="auto, cpu, cuda, cuda:N or mps (default: the config's, else auto)")
    parser.add_argument("--bs", type=int, help="batch size for evaluation")
    parser.add_argument("--trust-config", action="store_true",
                        help="let the checkpoint's config name any importable code (only for files you trust)")
    parser.add_argument("--set", nargs="+", default=[], action="extend", metavar="KEY=VALUE",
                        help="override any config key, e.g. --set data_loader.args.data_dir=data/")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    path = Path(args.resume)
    state = checkpoint.load(path)
    overrides = args.set + ([f"device={args.device}"] if args.device else [])
    overrides += [f"data_loader.args.batch_size={args.bs}"] if args.bs is not None else []
    if args.config:
        config = ConfigParser.from_file(args.config, overrides)
    else:
        config = ConfigParser.from_dict(state["config"], f"{path} (its config)", overrides,
                                        restricted=not args.trust_config)
    device = select_device(config["device"], "--device" if args.device else f"{config.source}: device")
    if dist.launched_by_torchrun():
        dist.init(device)

    loader = config.build("data_loader", training=False, shuffle=False, validation_split=0.0,
                          seed=config["seed"]).to(device)
    loader.drop_last = False  # every test sample counts, whatever the training config says
    model = config.build("arch")
    checkpoint.load_model_weights(model, state["model"], str(path))
    model = model.to(device).eval()
    criterion, metric_fns = config.build_loss(), config.build_metrics()

    from tqdm import tqdm

    from trainer.trainer import evaluate

    def step(data, target):
        output = model(data)
        return criterion(output, target), output

    with tqdm(total=loader.n_samples, unit="img", unit_scale=True, desc="test", leave=False,
              disable=not (sys.stderr.isatty() and dist.is_main())) as bar:
        result = evaluate(step, loader, metric_fns, device, config["trainer"]["amp"], progress=bar)
    if not dist.is_main():
        return 0
    result = {"checkpoint": str(path), "epoch": state["epoch"], "samples": loader.n_samples, **result}
    for key, value in result.items():
        print(f"{key:>12s}: {value:.6g}" if isinstance(value, float) else f"{key:>12s}: {value}")
    out = path.with_name(f"{path.stem}-test.json")
    checkpoint.save_atomic((json.dumps(result, indent=2) + "\n").encode(), out)
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
