"""The checked config, and the one place that turns its `{type, args}` entries into objects.

Reading a config has no side effects: nothing is created on disk until training starts.
Every mistake is a `UserError` naming the file and the key path.
"""

import copy
import functools
import inspect
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from config import schema
from config.files import apply_override, check_bounds, load_file, parse_override, shorten
from config.refs import data_value, fill_in
from config.resolve import check_built, resolve
from utils import fsdp
from utils.errors import UserError, one_line
from utils.suggest import suggest


def with_defaults(raw: dict, source: str, restricted: bool = False) -> dict:
    """The file's config with every default filled in (the *resolved* config written to the run), the
    trainer's from its class (`trainer.type`). Keys are checked afterwards, by ConfigParser."""
    config = copy.deepcopy(raw)
    schema.check_keys(config, schema.TOP_LEVEL, source)
    for key, default in schema.TOP_LEVEL.items():
        if key not in config:
            if default is schema.REQUIRED:
                raise UserError(f"{source}: missing required key '{key}'")
            config[key] = copy.deepcopy(default)
    if not isinstance(config["trainer"], dict):
        raise UserError(f"{source}: trainer: expected a mapping, got {shorten(repr(config['trainer']))}")
    trainer_type = config["trainer"].get("type", schema.TRAINER["type"])
    defaults = resolve("trainer", str(trainer_type), f"{source}: trainer.type", restricted).DEFAULTS
    config["trainer"] = {**copy.deepcopy(defaults), **config["trainer"]}
    return config


def is_named(spec: Any) -> bool:
    """`{"generator": {type, args}, "discriminator": {type, args}}`: several named entries of one role."""
    return (isinstance(spec, dict) and bool(spec) and not {"type", "args", "interval"} & spec.keys()
            and all(isinstance(v, dict) for v in spec.values()))


def entries_of(role: str, spec: Any) -> dict[str, tuple[str, Any]]:
    """Each entry of a role by name, with where the config has it: a single entry is named 'model' (at
    `role`), several are named by their keys (at `role.name`). The one place that decides one or many."""
    if spec is None:
        return {}
    return {n: (f"{role}.{n}", entry) for n, entry in spec.items()} if is_named(spec) else {"model": (role, spec)}


def without_downloads(args: Any) -> Any:
    """`args` with every `download` key, at any depth, false: a checkpoint's config never fetches files."""
    if not isinstance(args, dict):
        return args
    return {key: False if key == "download" else without_downloads(value) for key, value in args.items()}


class ConfigParser:
    """A checked config and the one place that turns its `{type, args}` entries into objects."""

    def __init__(self, config: dict, source: str = "<config>", restricted: bool = False):
        """restricted: the config is someone else's data (read from a checkpoint): it may only name
        what the project trusts (see `resolve`)."""
        self.source, self.config, self.restricted = source, config, restricted
        self.resolved = fill_in(config, config, source)  # what is read: `config` with "${vars...}" filled in
        self.callables: dict[str, Callable] = {}  # "arch", "metrics[0]", ...: the callable its `type` names
        self.data, self.device = None, None  # what "${data.<name>}" reads (build_trainer's loader), its tensors' device
        self.data_values: dict[str, Any] = {}  # each "${data.<name>}" read, by name: checkpoints record them
        self._check()

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] = ()) -> "ConfigParser":
        return cls.from_dict(load_file(path), str(path), overrides)

    @classmethod
    def from_dict(cls, raw: dict, source: str, overrides: list[str] = (), restricted: bool = False) -> "ConfigParser":
        if not isinstance(raw, dict):
            raise UserError(f"{source}: expected a mapping of keys to values, got {type(raw).__name__}")
        check_bounds(raw, source)
        config = with_defaults(raw, source, restricted)
        for expr in overrides:
            apply_override(config, *parse_override(expr))
        return cls(config, source, restricted)

    def __getitem__(self, key: str) -> Any:
        return self.resolved[key]

    def entries(self, role: str) -> dict[str, Any]:
        """The spec of each entry of `role` by name ('model' for a single one)."""
        return {name: spec for name, (_, spec) in entries_of(role, self[role]).items()}

    # ---- checking -------------------------------------------------------------------------------
    def _check(self) -> None:
        cfg, src = self.resolved, self.source
        for key in ("name", "seed", "deterministic", "device", "metrics", "trainer", "vars", "sweep"):
            schema.check_type(cfg[key], schema.TOP_LEVEL[key], f"{src}: {key}")
        if not isinstance(cfg["name"], str) or not cfg["name"] or "/" in cfg["name"]:
            raise UserError(f"{src}: name: must be a non-empty name without '/', got {shorten(repr(cfg['name']))}")
        source = cfg["finetuned_from"]
        if source is not None and not (isinstance(source, dict) and source.keys() == {"path", "sha256"}
                                       and all(isinstance(value, str) for value in source.values())):
            raise UserError(f"{src}: finetuned_from: expected null or {{path: <checkpoint>, sha256: <its SHA-256>}} "
                            f"(as --finetune writes it), got {shorten(repr(source))}")
        self._check_trainer()
        schema.check_tracking(cfg["tracking"], f"{src}: tracking")
        for role in ("arch", "data_loader", "optimizer", "loss", "lr_scheduler"):
            for where, spec in entries_of(role, cfg[role]).values():
                self._check_spec(role, spec, where)
        for i, spec in enumerate(cfg["metrics"]):
            self._check_spec("metrics", spec, f"metrics[{i}]")
        if len(set(self.metric_names())) != len(cfg["metrics"]):
            raise UserError(f"{src}: metrics: a metric is listed twice: {self.metric_names()}")
        self._check_names()
        if cfg["trainer"]["strategy"] == "fsdp" and is_named(cfg["arch"]):
            raise UserError(f"{src}: trainer.strategy: fsdp trains one model, and arch names several; use ddp")
        problem = schema.check_options(cfg["trainer"], self.logged_metric_names())
        if problem:
            raise UserError(f"{src}: trainer.{problem}")
        for where, spec in entries_of("lr_scheduler", cfg["lr_scheduler"]).values():
            plateau = spec["type"].rpartition(".")[2] == "ReduceLROnPlateau"
            if plateau and (cfg["trainer"]["monitor"] == "off" or spec.get("interval") == "step"):
                raise UserError(f"{src}: {where}: ReduceLROnPlateau steps once per epoch on the monitored "
                                "metric: set trainer.monitor and leave interval at 'epoch'")

    def _check_trainer(self) -> None:
        """The trainer class, then its keys (a subclass may add its own to DEFAULTS) and their kinds."""
        options, src = self["trainer"], self.source
        schema.check_type(options.get("type"), "", f"{src}: trainer.type")
        trainer_class = resolve("trainer", options["type"], f"{src}: trainer.type", self.restricted)
        self.callables["trainer"] = trainer_class
        schema.check_keys(options, trainer_class.DEFAULTS, f"{src}: trainer")
        for key, value in options.items():
            schema.check_type(value, trainer_class.DEFAULTS[key], f"{src}: trainer.{key}")

    def _check_names(self) -> None:
        """Several models: each optimizer names a model, each scheduler an optimizer (a frozen model may
        have none). One model: one optimizer and at most one scheduler."""
        arch, optimizer, scheduler = (self[role] for role in ("arch", "optimizer", "lr_scheduler"))
        pairs = [("optimizer", optimizer, "arch", arch)]
        if scheduler is not None:
            pairs.append(("lr_scheduler", scheduler, "optimizer", optimizer))
        for role, spec, owner_role, owner in pairs:
            if is_named(spec) != is_named(owner):
                kind = "a mapping of named entries" if is_named(owner) else "one {type, args} entry"
                raise UserError(f"{self.source}: {role}: {owner_role} is {kind}, so {role} must be too")
            unknown = [name for name in spec if is_named(spec) and name not in owner]
            if unknown:
                raise UserError(f"{self.source}: {role}.{unknown[0]}: no {owner_role} of that name"
                                f"{suggest(unknown[0], owner)}; {owner_role}: {', '.join(owner)}")

    def _check_spec(self, role: str, spec: Any, where: str) -> None:
        """A `{type, args}` mapping (or, for loss and metrics, just a name) whose args fit the callee."""
        where = f"{self.source}: {where}"
        if isinstance(spec, str) and role in ("loss", "metrics"):
            spec = {"type": spec}
        if not isinstance(spec, dict):
            raise UserError(f"{where}: expected a mapping with 'type' and 'args', got {shorten(repr(spec))}")
        allowed = ["type", "args"] + (["interval"] if role == "lr_scheduler" else [])
        schema.check_keys(spec, allowed, where)
        if not isinstance(spec.get("type"), str):
            raise UserError(f"{where}.type: missing or not a string")
        args = spec.get("args", {})
        if not isinstance(args, dict):
            raise UserError(f"{where}.args: expected a mapping, got {shorten(repr(args))}")
        if role == "lr_scheduler" and spec.get("interval", "epoch") not in schema.SCHEDULER_INTERVALS:
            raise UserError(f"{where}.interval: expected one of {schema.SCHEDULER_INTERVALS}, got {spec['interval']!r}")
        target = resolve(role, spec["type"], f"{where}.type", self.restricted)
        self.callables[where[len(self.source) + 2 :]] = target
        injected = schema.INJECTED.get(role, set())
        if role in ("loss", "metrics") and not inspect.isclass(target):
            injected = set(list(schema.signature_params(target))[:2])  # (output, target) come from the trainer
        schema.check_args(target, args, f"{where}.args", injected)
        if role == "data_loader" and hasattr(target, "check_config"):  # names inside its args (transforms, ...)
            target.check_config(args, f"{where}.args", self.restricted)

    def metric_names(self) -> list[str]:
        return [spec if isinstance(spec, str) else spec["type"].rpartition(".")[2] for spec in self["metrics"]]

    def logged_metric_names(self) -> list[str]:
        """Every name `monitor` may refer to: loss, metrics and what the trainer class and the loss say they
        log (their LOGGED), in training and, if the data loader class says it has some, validation."""
        extra = [*getattr(self.callables["trainer"], "LOGGED", ()), *getattr(self.callables["loss"], "LOGGED", ())]
        names = ["loss", *extra, *self.metric_names()]
        has_validation = self.callables["data_loader"].has_validation(self["data_loader"].get("args", {}))
        return names + ([f"val_{n}" for n in names] if has_validation else [])

    # ---- building -------------------------------------------------------------------------------
    def build_named(self, role: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Every entry of `role` as an object, by name: its `type` called with its `args` and the given
        arguments; an argument that is a dict by name gives each entry its own."""
        return {name: self._call(role, spec, where, *[a[name] if isinstance(a, dict) else a for a in args], **kwargs)
                for name, (where, spec) in entries_of(role, self[role]).items()}

    def build(self, role: str, *args: Any, **kwargs: Any) -> Any:
        """`build_named`, but a single entry as itself."""
        built = self.build_named(role, *args, **kwargs)
        return built if is_named(self[role]) else built.get("model")

    def build_data_loader(self, device: torch.device, test: bool = False) -> Any:
        """The training data (its validation split with it) on `device`; `test`: the test split in order, every
        sample once (of a k-fold run's checkpoint too: all the test data, not the fold's part of it)."""
        if not test:
            return self.build("data_loader", seed=self["seed"]).to(device)
        folds = {"folds": 0} if "folds" in self["data_loader"].get("args", {}) else {}
        loader = self.build("data_loader", training=False, shuffle=False, validation_split=0.0, **folds,
                            seed=self["seed"]).to(device)
        loader.drop_last = False  # every test sample counts, whatever the training config says
        return loader

    def build_trainer(self, device: torch.device, data_loader: Any, training: bool = True, **extra: Any) -> Any:
        """The trainer class the config names, with the models on `device`, the loss, metrics, optimizers and
        schedulers by name, and `data_loader` with its validation split (what "${data.<name>}" reads, unless a
        checkpoint recorded it). A mistake stops here. `training` with trainer.strategy fsdp: the models are
        sharded before their optimizers are built (test.py evaluates whole models)."""
        self.data, self.device = data_loader, device
        models = {name: model.to(device) for name, model in self.build_named("arch").items()}
        if self["trainer"]["channels_last"]:
            models = {name: model.to(memory_format=torch.channels_last) for name, model in models.items()}
        if training and self["trainer"]["strategy"] == "fsdp":
            models = {name: fsdp.shard(model, device, self["trainer"]["amp"]) for name, model in models.items()}
        criterion = self.build_loss()
        optimizers = self.build_named("optimizer", {name: model.parameters() for name, model in models.items()})
        return self.callables["trainer"](
            config=self, device=device, models=models, metric_fns=self.build_metrics(), optimizers=optimizers,
            criterion=criterion.to(device) if isinstance(criterion, torch.nn.Module) else criterion,
            lr_schedulers=self.build_named("lr_scheduler", optimizers), data_loader=data_loader,
            valid_data_loader=data_loader.split_validation(), **extra)

    def build_loss(self) -> Callable:
        return self._callable("loss", self["loss"], "loss")

    def build_metrics(self) -> dict[str, Callable]:
        return {name: self._callable("metrics", spec, f"metrics[{i}]")
                for i, (name, spec) in enumerate(zip(self.metric_names(), self["metrics"]))}

    def _callable(self, role: str, spec: str | dict, where: str) -> Callable:
        """A loss or metric: a class is instantiated with its args, a function gets them bound."""
        spec = {"type": spec} if isinstance(spec, str) else spec
        if inspect.isclass(self.callables[where]):
            return self._call(role, spec, where)
        target = self.callables[where]
        return functools.partial(target, **self._args(spec, where)) if spec.get("args") else target

    def _call(self, role: str, spec: dict, where: str, *args: Any, **kwargs: Any) -> Any:
        target, given = self.callables[where], self._args(spec, where)
        if self.restricted and role == "data_loader":
            given = without_downloads(given)
        with warnings.catch_warnings(record=True) as caught:  # shown if the call succeeds; else the error says it
            try:
                built = target(*args, **{**given, **kwargs})
            except (TypeError, ValueError, RuntimeError, LookupError, ArithmeticError) as e:  # torch's answers
                raise UserError(f"{self.source}: {where}: {spec['type']}: {one_line(e)[:300]}") from None
            except UserError as e:  # e.g. a data loader's missing files: say which config entry asked for them
                raise UserError(f"{self.source}: {where}: {e}") from None
        for warning in caught:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
        return check_built(role, built, spec["type"], f"{self.source}: {where}")

    def _args(self, spec: dict, where: str) -> dict:
        """The entry's args with "${data.<name>}" filled in (its "${vars...}" are already)."""
        return fill_in(spec.get("args", {}), self.resolved, self.source, f"{where}.args", self._data_value)

    def _data_value(self, name: str, at: str) -> Any:
        """The data loader's attribute `name`, read once (or as a checkpoint recorded it), on the training device."""
        if name not in self.data_values:
            if self.data is None:
                raise UserError(f"{at}: no data loader to read it from here")
            try:
                self.data_values[name] = data_value(self.data, name)
            except (UserError, TypeError, KeyError, IndexError, ValueError, AttributeError) as e:  # a property failed
                raise UserError(f"{at}: {e if isinstance(e, UserError) else f'{type(e).__name__}: {e}'}") from None
        value = self.data_values[name]
        return value.to(self.device) if isinstance(value, torch.Tensor) and self.device is not None else value



def diff_configs(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable `key: old -> new` lines for every leaf that differs."""
    lines = []
    for key in sorted(set(old) | set(new), key=str):
        a, b, path = old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            lines += diff_configs(a, b, f"{path}.")
        elif a != b:
            lines.append(f"{path}: {a!r} -> {b!r}")
    return lines
