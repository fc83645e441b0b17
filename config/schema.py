"""What a config may hold: the top-level keys, the trainer's keys, and the checks of kinds, keys and
arguments. Defaults live here, next to their checks; the parser fills them in."""

import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from config.files import shorten
from config.refs import is_data_reference
from utils.errors import UserError
from utils.suggest import suggest

REQUIRED = object()

# Top-level keys and their defaults. The trainer's own keys: TRAINER below.
TOP_LEVEL = {"name": REQUIRED, "seed": 0, "deterministic": False, "device": "auto", "arch": REQUIRED,
             "data_loader": REQUIRED, "optimizer": REQUIRED, "loss": REQUIRED, "metrics": [], "lr_scheduler": None,
             "trainer": {}, "vars": {}, "finetuned_from": None, "sweep": {}, "tracking": None}
# vars: the project's own values, for "${vars.<key>}" in args; finetuned_from: {path, sha256} of the checkpoint
# whose model weights start a new run (what --finetune records); sweep: sweep.py's search space (runs/sweep.py
# checks it; train.py ignores it); tracking: the experiment tracker (TRACKING_ARGS)
# Arguments the framework passes itself, so a config need not (and may not always) give them.
INJECTED = {"optimizer": {"params"}, "lr_scheduler": {"optimizer"}, "data_loader": {"seed", "training"}}
SCHEDULER_INTERVALS = ("epoch", "step")
KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
              dict: "a mapping"}


def check_type(value: Any, default: Any, where: str) -> None:
    """Values must have the kind of their default (an int is fine where a float is expected)."""
    expected = type(default)
    if default is None:
        return
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        quote = " (YAML reads off, no, yes and on as false/true: quote the word, 'off')" if (
            expected is str and isinstance(value, bool)) else ""
        raise UserError(f"{where}: expected {KIND_NAMES.get(expected, expected.__name__)}, got "
                        f"{shorten(repr(value))}{quote}")


# Keys of the classic pytorch-template that have no place here, and what replaces them.
CLASSIC_KEYS = {"n_gpu": "the classic template's GPU count: use device (or -d cuda:0), and torchrun for several GPUs"}


def check_keys(given: dict, allowed, where: str) -> None:
    """Every unknown key of `given` in one message, each with its closest allowed key."""
    unknown = [f"'{shorten(str(key))}'" + (f" ({CLASSIC_KEYS[key]})" if key in CLASSIC_KEYS else
                                           suggest(str(key), allowed)) for key in given if key not in allowed]
    if unknown:
        keys = "key" if len(unknown) == 1 else "keys"
        raise UserError(f"{where}: unknown {keys} {', '.join(unknown)}; allowed: {', '.join(allowed)}")



def signature_params(fn: Callable) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


SIMPLE_TYPES = {int: int, float: float, bool: bool, str: str, "int": int, "float": float, "bool": bool, "str": str}


def simple_type(annotation: Any) -> tuple[type | None, bool]:
    """The simple type of an annotation (int, float, bool, str), also of `X | None` and `Optional[X]`, and whether
    None is allowed: (None, False) for any other annotation, which is not checked."""
    members = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(members) == 2 and \
            type(None) in members:
        return SIMPLE_TYPES.get(next(m for m in members if m is not type(None))), True
    return SIMPLE_TYPES.get(annotation), False


def check_args(fn: Callable, args: dict, where: str, injected: set[str]) -> None:
    """Args must be accepted by `fn`'s signature, required ones present, simple annotations respected."""
    params = signature_params(fn)
    if not params:
        return
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    accepted = [n for n in named if n not in injected]
    for key, value in args.items():
        if key not in named and not takes_any:
            listing = ", ".join(accepted) or "none"
            raise UserError(f"{where}: unknown argument '{key}'{suggest(key, accepted)}; accepted: {listing}")
        expected, optional = simple_type(named[key].annotation) if key in named else (None, False)
        if expected is not None and not (optional and value is None) and not is_data_reference(value):
            # a data reference's kind is known once the data is
            check_type(value, expected(), f"{where}.{key}")
    for name, param in named.items():
        if param.default is param.empty and name not in args and name not in injected:
            raise UserError(f"{where}: missing required argument '{name}'")


# ---- the trainer's keys ----------------------------------------------------------------------------------
# Every trainer key, with its default and meaning (the README's table mirrors this); a trainer class
# may add its own (its DEFAULTS).
TRAINER = {
    "type": "Trainer",  # the trainer class: a class in trainer/, or a dotted path (a subclass of BaseTrainer)
    "epochs": 10,  # passes over the training data (or len_epoch batches each)
    "len_epoch": 0,  # batches per epoch, drawn from an endless stream of passes (0: one pass per epoch)
    "valid_period": 1,  # validate every N epochs (and after the last)
    "save_dir": "saved/",  # runs go to <save_dir>/<name>/<run_id>/
    "save_period": 1,  # write a numbered checkpoint of the epoch every N epochs (0: never)
    "keep_last": 0,  # keep only the N newest numbered checkpoints (0: keep all)
    "save_top_k": 0,  # keep the files of the k best epochs by the monitored value, top-epoch<N>-<metric>=<value>.pth
    "save_step": 0,  # also write the latest checkpoint every N optimizer steps (0: at epoch ends only)
    "save_minutes": 0.0,  # also write the latest checkpoint when this many minutes passed since the last save (0: off)
    "verbosity": 2,  # console and log file: 0 warnings, 1 info, 2 debug
    "monitor": "min val_loss",  # "<min|max> <logged metric>" for the best checkpoint and early stop, or "off"
    "early_stop": 0,  # stop after N epochs without improvement (0: never)
    "tensorboard": True,  # write TensorBoard event files into the run directory
    "log_step": 50,  # optimizer steps between console, TensorBoard and progress-bar updates
    "train_metrics": "log_steps",  # training-batch metrics on the batches of logging steps, or on "every_step"
    "progress_seconds": 10.0,  # output not a terminal (CI, nohup, Slurm): a progress line at the first log interval
    # this many seconds after the last one (0: none); a terminal gets the progress bar
    "amp": "off",  # mixed precision: "off", "bf16", or "fp16" (with a grad scaler)
    "accum_steps": 1,  # micro-batches accumulated per optimizer step
    "grad_clip": 0.0,  # clip the global grad norm to this value (0: off)
    "channels_last": False,  # NHWC memory format for model and 4-D inputs
    "compile": False,  # torch.compile the model
    "strategy": "ddp",  # under torchrun: "ddp" (a whole model per process) or "fsdp" (sharded, with DCP checkpoints)
    "on_nonfinite": "stop",  # NaN/Inf loss: "stop" the run, or "skip" the step (a host sync per step)
    "tb_images": 0,  # TensorBoard: a grid of input images every N epochs (0: off)
    "tb_histograms": 0,  # TensorBoard: parameter and gradient histograms every N epochs (0: off)
    "profile": None,  # torch.profiler over training batches: {wait: 1, warmup: 1, active: 3[, repeat: 1]} (null: off)
}
CHOICES = {"amp": ("off", "bf16", "fp16"), "on_nonfinite": ("stop", "skip"), "strategy": ("ddp", "fsdp"),
           "train_metrics": ("log_steps", "every_step")}
AT_LEAST_ONE = ("epochs", "log_step", "accum_steps", "valid_period")
PROFILE_KEYS = {"wait": 0, "warmup": 0, "active": 1, "repeat": 1}  # torch.profiler.schedule's, with their minimum


def check_options(options: dict, logged_names: list[str]) -> str | None:
    """The first problem with the trainer options as 'key: message', or None. Types are checked before."""
    for key, choices in CHOICES.items():
        if options[key] not in choices:
            return f"{key}: expected one of {', '.join(choices)}, got {options[key]!r}"
    for key, value in options.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low = 1 if key in AT_LEAST_ONE else 0
            if value < low:
                return f"{key}: must be >= {low}, got {value!r}"
    if options["strategy"] == "fsdp" and options["tb_histograms"]:  # each process holds a shard of each parameter
        return "tb_histograms: needs whole parameters: not with strategy fsdp"
    if options["strategy"] == "fsdp" and options["save_top_k"]:  # its files are single .pth checkpoints
        return "save_top_k: not with strategy fsdp (its checkpoints are folders of shards); use save_period"
    if options.get("profile") is not None and check_profile(options["profile"]):
        return check_profile(options["profile"])
    if options["monitor"] == "off":
        return "save_top_k: ranks epochs by trainer.monitor, which is off" if options.get("save_top_k") else None
    match = re.fullmatch(r"(min|max) (\S+)", options["monitor"])
    if not match:
        return f"monitor: expected 'min <metric>', 'max <metric>' or 'off', got {options['monitor']!r}"
    if match[2] not in logged_names:
        return (f"monitor: '{match[2]}' is never logged{suggest(match[2], logged_names)}; "
                f"logged: {', '.join(logged_names)}")
    return None


def check_profile(profile) -> str | None:
    """The problem with trainer.profile (a torch.profiler schedule) as 'profile: message', or None."""
    if not isinstance(profile, dict) or not {"wait", "warmup", "active"} <= profile.keys():
        return f"profile: expected null or a mapping like {{wait: 1, warmup: 1, active: 3}}, got {profile!r}"
    for key, value in profile.items():
        if key not in PROFILE_KEYS:
            return f"profile: unknown key '{key}'{suggest(key, PROFILE_KEYS)}; allowed: {', '.join(PROFILE_KEYS)}"
        if isinstance(value, bool) or not isinstance(value, int) or value < PROFILE_KEYS[key]:
            return f"profile.{key}: expected an integer >= {PROFILE_KEYS[key]}, got {value!r}"
    return None


# ---- tracking: {"type": "mlflow", "args": {...}} (logger/tracking.py), or null ---------------------------------
TRACKING_TYPES = ("mlflow",)
TRACKING_ARGS = {
    "uri": None,  # the tracking store or server; null: MLFLOW_TRACKING_URI, else the SQLite file <save_dir>/mlflow.db
    "experiment": None,  # the experiment the run goes to; null: the config's name
    "checkpoints": False,  # also upload the run's checkpoint files as artifacts when training finishes
}


def check_tracking(spec: Any, where: str) -> None:
    """`tracking` is null or {type, args} with a known type and args of the right kinds (a UserError otherwise)."""
    if spec is None:
        return
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise UserError(f"{where}: expected null or {{type: mlflow, args: {{...}}}}, got {shorten(repr(spec))}")
    check_keys(spec, ["type", "args"], where)
    if spec["type"] not in TRACKING_TYPES:
        raise UserError(f"{where}.type: expected one of {', '.join(TRACKING_TYPES)}, got {shorten(repr(spec['type']))}"
                        f"{suggest(spec['type'], TRACKING_TYPES)}")
    args = spec.get("args", {})
    if not isinstance(args, dict):
        raise UserError(f"{where}.args: expected a mapping, got {shorten(repr(args))}")
    check_keys(args, TRACKING_ARGS, f"{where}.args")
    for key, value in args.items():
        if TRACKING_ARGS[key] is None and not (value is None or isinstance(value, str) and value):
            raise UserError(f"{where}.args.{key}: expected null or a non-empty string, got {shorten(repr(value))}")
        check_type(value, TRACKING_ARGS[key], f"{where}.args.{key}")
