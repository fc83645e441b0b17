"""The trainer's options: defaults, allowed values and their checks. A leaf module: the config parser
checks a config with it and the trainer reads its defaults from it, without importing each other."""

import re

from utils.suggest import suggest

# Every trainer key, with its default and meaning (the README's table mirrors this).
DEFAULTS = {
    "type": "Trainer",  # the trainer class: a class in trainer/, or a dotted path (a subclass of BaseTrainer)
    "epochs": 10,  # passes over the training data (or len_epoch batches each)
    "len_epoch": 0,  # batches per epoch, drawn from an endless stream of passes (0: one pass per epoch)
    "valid_period": 1,  # validate every N epochs (and after the last)
    "save_dir": "saved/",  # runs go to <save_dir>/<name>/<run_id>/
    "save_period": 1,  # write checkpoint-epoch<N>.pth every N epochs (0: never)
    "keep_last": 0,  # keep only the N newest checkpoint-epoch<N>.pth (0: keep all)
    "save_step": 0,  # also write latest.pth every N optimizer steps (0: at epoch ends only)
    "save_minutes": 0.0,  # also write latest.pth when this many minutes passed since the last save (0: off)
    "verbosity": 2,  # console and log file: 0 warnings, 1 info, 2 debug
    "monitor": "min val_loss",  # "<min|max> <logged metric>" for model_best.pth and early stop, or "off"
    "early_stop": 0,  # stop after N epochs without improvement (0: never)
    "tensorboard": True,  # write TensorBoard event files into the run directory
    "log_step": 50,  # optimizer steps between console, TensorBoard and progress-bar updates
    "amp": "off",  # mixed precision: "off", "bf16", or "fp16" (with a grad scaler)
    "accum_steps": 1,  # micro-batches accumulated per optimizer step
    "grad_clip": 0.0,  # clip the global grad norm to this value (0: off)
    "channels_last": False,  # NHWC memory format for model and 4-D inputs
    "compile": False,  # torch.compile the model
    "on_nonfinite": "stop",  # NaN/Inf loss: "stop" the run, or "skip" the step (a host sync per step)
    "tb_images": 0,  # TensorBoard: a grid of input images every N epochs (0: off)
    "tb_histograms": 0,  # TensorBoard: parameter and gradient histograms every N epochs (0: off)
    "profile": None,  # torch.profiler over training batches: {wait: 1, warmup: 1, active: 3[, repeat: 1]} (null: off)
}
CHOICES = {"amp": ("off", "bf16", "fp16"), "on_nonfinite": ("stop", "skip")}
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
    if options.get("profile") is not None and check_profile(options["profile"]):
        return check_profile(options["profile"])
    if options["monitor"] == "off":
        return None
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
