"""The start train.py and test.py share: their common flags, the config (the user's file, or a
checkpoint's config as data), the device, the process group under torchrun, and the seeds."""

import argparse
import json

import torch

from utils import checkpoint, dist
from utils.config import ConfigParser
from utils.device import select_device
from utils.seed import seed_everything

# Command-line shortcuts for config keys (train.py has all three, test.py only --bs).
SHORTCUTS = {"lr": "optimizer.args.lr", "bs": "data_loader.args.batch_size", "epochs": "trainer.epochs"}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="config file (.json, .yaml); with -r, used instead of the checkpoint's")
    parser.add_argument("-d", "--device", help="auto, cpu, cuda, cuda:N or mps (default: the config's, else auto)")
    parser.add_argument("--bs", "--batch_size", type=int, help=f"shortcut for --set {SHORTCUTS['bs']}=...")
    parser.add_argument("--set", nargs="+", default=[], action="extend", metavar="KEY=VALUE",
                        help="override any config key, e.g. --set optimizer.args.lr=0.01 trainer.epochs=3")
    parser.add_argument("--trust-config", action="store_true",
                        help="let a checkpoint's config name any importable code (only for files you trust)")


def load_config(args: argparse.Namespace, checkpoint_path=None, state: dict | None = None) -> ConfigParser:
    """The config of `-c` (the user's own code), else the one stored in the checkpoint: someone else's
    data, which may only name what the project trusts unless --trust-config. The command line wins."""
    overrides = [f"{key}={getattr(args, flag)}" for flag, key in SHORTCUTS.items()
                 if getattr(args, flag, None) is not None]
    overrides += args.set + ([f"device={json.dumps(args.device)}"] if args.device else [])  # a string: -d 0
    if args.config:
        return ConfigParser.from_file(args.config, overrides)
    return ConfigParser.from_dict(state["config"], f"{checkpoint_path} (its config)", overrides,
                                  restricted=not args.trust_config)


def start_process(config: ConfigParser, args: argparse.Namespace) -> torch.device:
    """Choose the device, join torchrun's process group (if launched by it) and seed every generator."""
    device = select_device(config["device"], "--device" if args.device else f"{config.source}: device")
    if dist.launched_by_torchrun():
        dist.init(device)
    seed_everything(config["seed"], config["deterministic"])
    return device


def build_parts(config: ConfigParser, device: torch.device, data_loader, finetune: str | None = None) -> dict:
    """The trainer's keyword arguments: the models (on the device), loss, metrics, optimizers, schedulers
    and the data loaders, all as the config names them. A mistake stops here, before anything is written."""
    built = config.build("arch")
    models = built if isinstance(built, dict) else {"model": built}
    for name, model in models.items():
        model = model.to(device)
        models[name] = model.to(memory_format=torch.channels_last) if config["trainer"]["channels_last"] else model
    model = models if isinstance(built, dict) else models["model"]
    if finetune:
        weights = checkpoint.load(finetune)["model"]
        checkpoint.load_model_weights(torch.nn.ModuleDict(model) if isinstance(model, dict) else model, weights,
                                      f"--finetune {finetune}")
    criterion = config.build_loss()
    optimizer = config.build("optimizer", {n: m.parameters() for n, m in models.items()} if isinstance(built, dict)
                             else model.parameters())
    return {"model": model, "criterion": criterion.to(device) if isinstance(criterion, torch.nn.Module) else criterion,
            "metric_fns": config.build_metrics(), "optimizer": optimizer, "data_loader": data_loader,
            "valid_data_loader": data_loader.split_validation(),
            "lr_scheduler": config.build("lr_scheduler", optimizer) if config["lr_scheduler"] else None}


def build_test_loader(config: ConfigParser, device: torch.device):
    """The data loader's test split in order, every sample once (of a k-fold run's checkpoint too: all the test
    data, not the fold's part of it); test.py, predict.py and export.py read it."""
    folds = {"folds": 0} if "folds" in config["data_loader"].get("args", {}) else {}
    loader = config.build("data_loader", training=False, shuffle=False, validation_split=0.0, **folds,
                          seed=config["seed"]).to(device)
    loader.drop_last = False  # every test sample counts, whatever the training config says
    return loader
