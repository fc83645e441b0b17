"""The command line of every script: the flags they share, the request they make of the runs module, and
the exit policy (a bad command line or input is one line and exit code 2)."""

import argparse
import gc
import json
import logging
import math
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from utils import dist
from utils.allocator import unfreeze_objects
from utils.errors import UserError, one_line

# Command-line shortcuts for config keys (train.py has all three, test.py only --bs).
SHORTCUTS = {"lr": "optimizer.args.lr", "bs": "data_loader.args.batch_size", "epochs": "trainer.epochs"}


@dataclass
class Request:
    """What a script was asked for, as plain data: nothing below `runs.open_run` reads the command line."""

    config_file: str | None = None  # -c: the user's own config
    resume: str | None = None  # -r: a checkpoint file, a run directory, or "auto"
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE, the shortcuts and -d, in that order
    device_flag: bool = False  # -d was given: a device error names --device, not the config key
    trust_config: bool = False  # a checkpoint's config may name any importable code
    finetune: str | None = None  # a new run from these model weights
    run_dir: str | None = None  # a new run in this existing folder (a fold)
    data_changed: bool = False  # a resume on data that differ from the checkpoint's goes on (not exact)
    reset_best: bool = False  # a resume's best value to beat is its checkpoint's, not the run's model_best.pth
    tracking_parent: str | None = None  # a new tracked run is a child of this one (a fold's, a trial's)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line and exit code 2 (no usage dump)."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


# argparse `type`s: a value that cannot be meant is refused with the flag's name, before anything runs.
def text(value: str) -> str:
    """A path or name, never empty: `-c ''` (an unset shell variable) is a mistake, not 'no config'."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty value")
    return value


def integer(value: str) -> int:
    """An integer that fits in 64 bits, as a config's integers must."""
    number = int(value)  # a ValueError: argparse says "invalid integer value"
    if not -(2**63) <= number < 2**63:
        raise argparse.ArgumentTypeError(f"{value[:20]}...: more than 64 bits")
    return number


def number(value: str) -> float:
    """A finite number (no nan, inf, or 1e999)."""
    result = float(value)  # a ValueError: argparse says "invalid number value"
    if not math.isfinite(result):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value[:20]!r}")
    return result


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=text,
                        help="config file (.json, .yaml); with -r, used instead of the checkpoint's")
    parser.add_argument("-d", "--device", type=text,
                        help="auto, cpu, cuda, cuda:N or mps (default: the config's, else auto)")
    parser.add_argument("--bs", "--batch_size", type=integer, help=f"shortcut for --set {SHORTCUTS['bs']}=...")
    parser.add_argument("--set", nargs="+", default=[], action="extend", metavar="KEY=VALUE",
                        help="override any config key, e.g. --set optimizer.args.lr=0.01 trainer.epochs=3")
    parser.add_argument("--trust-config", action="store_true",
                        help="let a checkpoint's config name any importable code (only for files you trust)")


def request_of(args: argparse.Namespace) -> Request:
    """The parsed command line as a Request; the shortcuts and -d become overrides (-d as a string: -d 0)."""
    overrides = [f"{key}={getattr(args, flag)}" for flag, key in SHORTCUTS.items()
                 if getattr(args, flag, None) is not None]
    overrides += args.set + ([f"device={json.dumps(args.device)}"] if args.device else [])
    return Request(args.config, getattr(args, "resume", None), overrides, bool(args.device), args.trust_config,
                   getattr(args, "finetune", None), getattr(args, "run_dir", None),
                   getattr(args, "data_changed", False), getattr(args, "reset_best", False))


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main`; a UserError or an interrupt becomes one line on stderr and a non-zero exit."""
    if getattr(signal.getsignal(signal.SIGINT), "__module__", None) == "utils.python_version":  # start-up's guard
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is a KeyboardInterrupt again
    try:
        code = main()
    except UserError as e:
        code = report(f"error: {one_line(e)}", e.exit_code)
    except OSError as e:  # a full disk, a read-only folder, a file gone: anywhere outside checkpoint writes
        code = report(f"error: {e.filename or 'I/O'}: {e.strerror or e}", 1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:  # the Interrupted of a graceful stop carries its own exit code
        if not hasattr(e, "exit_code"):
            raise
        code = report(str(e), e.exit_code)
    if dist.is_distributed():
        # free what holds the process group (a DDP model in a reference cycle, or frozen by train.py) while the
        # interpreter is whole: a gloo group freed during interpreter shutdown can abort the process
        unfreeze_objects()
        gc.collect()
        torch.distributed.destroy_process_group()
    sys.exit(code or 0)


def report(message: str, code: int) -> int:
    """One line on stderr and in the run's train.log (cut short: a message may quote a value of any size)."""
    message = message if len(message) <= 2000 else f"{message[:2000]}..."
    print(message, file=sys.stderr)
    record = logging.makeLogRecord({"msg": message, "levelno": logging.ERROR, "levelname": "ERROR", "name": "train"})
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            try:
                handler.emit(record)
            except OSError:  # the log's own disk may be what failed
                pass
    return code
