"""Train a model described by a config.

    python train.py -c configs/mnist.json            # a new run
    python train.py -r saved/mnist/<run_id>          # resume a run (its newest checkpoint that loads)
    python train.py -r auto -c configs/mnist.json    # resume the newest run of this config's name
    torchrun --nproc_per_node=2 train.py -c configs/mnist.json   # DistributedDataParallel
"""

import json
import logging
from datetime import datetime
from pathlib import Path

import torch

from utils import checkpoint, dist
from utils.cli import ArgumentParser, keep_freed_memory, run_main, seed_everything, select_device
from utils.config import ConfigParser, diff_configs, load_file
from utils.errors import UserError

log = logging.getLogger("train")

SHORTCUTS = {"lr": "optimizer.args.lr", "bs": "data_loader.args.batch_size", "epochs": "trainer.epochs"}


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", help="config file (.json, .yaml)")
    parser.add_argument("-r", "--resume", help="checkpoint file, run directory, or 'auto' (newest run of -c's name)")
    parser.add_argument("-d", "--device", help="auto, cpu, cuda, cuda:N or mps (default: the config's, else auto)")
    parser.add_argument("--finetune", metavar="CHECKPOINT", help="start a new run from these model weights only")
    parser.add_argument("--trust-config", action="store_true",
                        help="let a resumed checkpoint's config name any importable code (only for files you trust)")
    parser.add_argument("--lr", type=float, help=f"shortcut for --set {SHORTCUTS['lr']}=...")
    parser.add_argument("--bs", type=int, help=f"shortcut for --set {SHORTCUTS['bs']}=...")
    parser.add_argument("--epochs", type=int, help=f"shortcut for --set {SHORTCUTS['epochs']}=...")
    parser.add_argument("--set", nargs="+", default=[], action="extend", metavar="KEY=VALUE",
                        help="override any config key, e.g. --set optimizer.args.lr=0.01 trainer.epochs=3")
    args = parser.parse_args(argv)
    if not args.config and not args.resume:
        parser.error("give a config (-c) or a checkpoint to resume (-r)")
    if args.resume and args.finetune:
        parser.error("-r and --finetune exclude each other: resume continues a run, finetune starts one")
    if args.finetune and not args.config:
        parser.error("--finetune needs a config (-c) for the new run")
    if args.resume == "auto" and not args.config:
        parser.error("-r auto needs -c to know which run name to look for")
    return args


def load_resume(args) -> tuple[Path, dict]:
    """The checkpoint to resume from: a file, the newest that loads in a run directory, or 'auto'."""
    if args.resume == "auto":
        raw = load_file(args.config)
        save_dir = raw.get("trainer", {}).get("save_dir", "saved/")
        return checkpoint.load_newest(checkpoint.newest_run(Path(save_dir), raw.get("name", "")))
    path = Path(args.resume)
    if path.is_dir():
        return checkpoint.load_newest(path)
    return path, checkpoint.load(path)


def build_config(args, resumed: dict | None) -> tuple[ConfigParser, list[str]]:
    overrides = [f"{SHORTCUTS[k]}={getattr(args, k)}" for k in SHORTCUTS if getattr(args, k) is not None]
    overrides += args.set
    if args.device:
        overrides.append(f"device={args.device}")
    if args.config:
        config = ConfigParser.from_file(args.config, overrides)
    else:
        config = ConfigParser.from_dict(resumed["config"], f"{args.resume} (its config)", overrides,
                                        restricted=not args.trust_config)
    changes = []
    if resumed is not None:
        if config["arch"] != resumed["config"]["arch"]:
            raise UserError(f"{config.source}: arch differs from the checkpoint's ({resumed['config']['arch']}): "
                            "a resume keeps the architecture; use --finetune to start a new run from its weights")
        changes = diff_configs(resumed["config"], config.config)
    return config, changes


def apply_optimizer_changes(optimizer: torch.optim.Optimizer, old: dict, new: dict) -> None:
    """The restored optimizer state holds the checkpoint's hyper-parameters; a resume that changes one
    (`--lr 1e-4`) means the new value. Schedulers then continue from it."""
    for key, value in new.get("args", {}).items():
        if old.get("args", {}).get(key) != value and key in optimizer.param_groups[0]:
            for group in optimizer.param_groups:
                group[key] = value


def new_run_dir(config: ConfigParser) -> Path:
    """saved/<name>/<YYYYmmdd-HHMMSS>[-N]/, made by rank 0 and shared with the others."""
    run_dir = None
    if dist.is_main():
        base = Path(config["trainer"]["save_dir"]) / config["name"]
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir, n = base / stamp, 1
        try:
            base.mkdir(parents=True, exist_ok=True)
            while True:
                try:
                    run_dir.mkdir()
                    break
                except FileExistsError:
                    n += 1
                    run_dir = base / f"{stamp}-{n}"
        except OSError as e:
            raise UserError(f"{config.source}: trainer.save_dir: cannot create a run directory in {base}: "
                            f"{e.strerror}") from None
    if dist.is_distributed():
        shared = [run_dir]
        torch.distributed.broadcast_object_list(shared, src=0)
        run_dir = shared[0]
    return Path(run_dir)


def main(argv=None) -> int:
    args = parse_args(argv)
    resume_path, resumed = load_resume(args) if args.resume else (None, None)
    config, changes = build_config(args, resumed)
    device = select_device(config["device"], "--device" if args.device else f"{config.source}: device")
    if dist.launched_by_torchrun():
        dist.init(device)
    if device.type == "cpu":
        keep_freed_memory()
    seed_everything(config["seed"], config["deterministic"])

    # Build everything first: a mistake stops us here, before anything is written.
    data_loader = config.build("data_loader", seed=config["seed"]).to(device)
    valid_data_loader = data_loader.split_validation()
    model = config.build("arch").to(device)
    if config["trainer"]["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if args.finetune:
        checkpoint.load_model_weights(model, checkpoint.load(args.finetune)["model"], f"--finetune {args.finetune}")
    criterion, metric_fns = config.build_loss(), config.build_metrics()
    optimizer = config.build("optimizer", model.parameters())
    lr_scheduler = config.build("lr_scheduler", optimizer) if config["lr_scheduler"] else None

    from trainer.trainer import Trainer

    run_dir = resume_path.parent if resumed else new_run_dir(config)
    trainer = Trainer(model, criterion, metric_fns, optimizer, config, device, run_dir, data_loader,
                      valid_data_loader, lr_scheduler)
    if resumed:
        try:
            trainer.load_state_dict(resumed)
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"{resume_path}: does not fit this run: {str(e).strip().splitlines()[0][:200]}") from None
        apply_optimizer_changes(optimizer, resumed["config"]["optimizer"], config["optimizer"])
    if dist.is_main():
        checkpoint.remove_stale_temporaries(run_dir)
        (run_dir / "config.json").write_text(json.dumps(config.config, indent=2) + "\n")
    from logger import setup_logging

    setup_logging(run_dir / "train.log", config["trainer"]["verbosity"], dist.rank())
    if resumed:
        log.info("Resuming %s at epoch %d, batch %d (global step %d)", resume_path, trainer.epoch + 1,
                 trainer.batch_in_epoch, trainer.global_step)
        for line in changes:
            log.warning("Config changed since the checkpoint: %s", line)
    else:
        log.info("Run directory: %s", run_dir)
    log.debug("%s", model)
    log.info("Training on %s (%d process%s), %d training samples, %d validation samples", device,
             dist.world_size(), "es" if dist.world_size() > 1 else "", data_loader.n_samples,
             valid_data_loader.n_samples if valid_data_loader else 0)
    trainer.train()
    log.info("Done. Checkpoints and logs: %s", run_dir)
    return 0


if __name__ == "__main__":
    run_main(main)
