"""The config: read a JSON or YAML file, apply command-line overrides, check it, build objects by name.

Reading a config has no side effects: nothing is created on disk until training starts.
Every mistake is a `UserError` naming the file and the key path.
"""

import copy
import functools
import importlib
import inspect
import json
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from base import options as trainer_options
from base.base_data_loader import BaseDataLoader
from base.base_trainer import BaseTrainer
from utils.errors import UserError
from utils.suggest import suggest

REQUIRED = object()

# Top-level keys and their defaults. The trainer's own keys: base/options.py.
TOP_LEVEL = {
    "name": REQUIRED,
    "seed": 0,
    "deterministic": False,
    "device": "auto",
    "arch": REQUIRED,
    "data_loader": REQUIRED,
    "optimizer": REQUIRED,
    "loss": REQUIRED,
    "metrics": [],
    "lr_scheduler": None,
    "trainer": {},
}

# Where each role's `type` is looked up, in order. A dotted path (`torchvision.models.resnet18`)
# is imported as written, for any role.
ROLE_MODULES = {
    "arch": ["model.model"],
    "data_loader": ["data_loader.data_loaders"],
    "loss": ["model.loss", "torch.nn"],
    "metrics": ["model.metric"],
    "optimizer": ["torch.optim"],
    "lr_scheduler": ["torch.optim.lr_scheduler"],
    "trainer": ["trainer.trainer", "trainer.gan", "trainer.vae"],
    # inside a data loader's args (data_loader/pipeline.py): `dataset` and `transforms` entries
    "dataset": ["torchvision.datasets"],
    "transform": ["torchvision.transforms.v2"],
}

# Arguments the framework passes itself, so a config need not (and may not always) give them.
INJECTED = {
    "optimizer": {"params"},
    "lr_scheduler": {"optimizer"},
    "data_loader": {"seed", "training"},
}

SCHEDULER_INTERVALS = ("epoch", "step")
# Bounds on what a config may hold: a file larger, or nested deeper, or with more values (a YAML alias
# counts each time it is used) is refused before anything reads it further.
MAX_BYTES, MAX_DEPTH, MAX_VALUES = 1_000_000, 32, 10_000
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def load_file(path: str | Path) -> dict:
    """Parse a .json/.yaml/.yml file into a dict; errors name the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    if path.suffix not in (".json", ".yaml", ".yml"):
        raise UserError(f"{path}: unsupported config format '{path.suffix}' (use .json, .yaml or .yml)")
    try:
        if path.stat().st_size > MAX_BYTES:
            raise UserError(f"{path}: config file is larger than {MAX_BYTES:,} bytes")
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read config: {e}") from None
    if not text.strip():
        raise UserError(f"{path}: config file is empty")
    try:
        data = parse_json(text, path) if path.suffix == ".json" else parse_yaml(text, path)
    except RecursionError:
        raise UserError(f"{path}: nested more than {MAX_DEPTH} levels deep") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys to values, not {type(data).__name__}")
    check_bounds(data, str(path))
    return data


def parse_json(text: str, path: Path) -> Any:
    def unique_keys(pairs: list) -> dict:
        keys = [key for key, _ in pairs]
        for key in keys:
            if keys.count(key) > 1:
                raise UserError(f"{path}: key {shorten(key)!r} is given twice in one mapping")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                mark = key_node.start_mark
                raise UserError(f"{self.name}:{mark.line + 1}:{mark.column + 1}: key {shorten(str(key))!r} "
                                "is given twice in one mapping")
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, path: Path) -> Any:
    loader = UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    finally:
        loader.dispose()


def check_bounds(data: Any, where: str) -> None:
    """Refuse a config nested deeper than MAX_DEPTH or holding more than MAX_VALUES values (a YAML alias
    bomb expands to billions): checked without expanding it, before anything prints or copies it."""
    count, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise UserError(f"{where}: the config holds more than {MAX_VALUES:,} values")
        if depth > MAX_DEPTH:
            raise UserError(f"{where}: nested more than {MAX_DEPTH} levels deep")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)


def shorten(text: str, limit: int = 60) -> str:
    """A value quoted in an error message, cut to `limit` characters."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text):,} characters)"


def parse_override(expr: str) -> tuple[list[str], Any]:
    """`optimizer.args.lr=0.01` -> (['optimizer', 'args', 'lr'], 0.01); values are YAML scalars/lists."""
    key, sep, raw = expr.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {shorten(expr)!r}: expected KEY=VALUE, e.g. trainer.epochs=3")
    try:
        value = parse_yaml(raw, f"--set {key}") if raw.strip() else ""
    except RecursionError:
        raise UserError(f"--set {key}: nested more than {MAX_DEPTH} levels deep") from None
    check_bounds(value, f"--set {key}")
    if isinstance(value, str) and NUMBER.fullmatch(raw.strip()):
        value = float(raw)  # YAML 1.1 reads 1e-3 as a string; on a command line it means a number
    return key.split("."), value


def apply_override(config: dict, path: list[str], value: Any) -> None:
    """Set one dotted key. It must exist already, except a new argument inside an `args` mapping."""
    node = config
    for depth, part in enumerate(path):
        where = ".".join(path[: depth + 1])
        last = depth == len(path) - 1
        if not isinstance(node, dict):
            raise UserError(f"--set {'.'.join(path)}: '{'.'.join(path[:depth])}' is not a mapping")
        if part not in node and not (last and path[depth - 1 : depth] == ["args"]):
            raise UserError(f"--set {'.'.join(path)}: unknown key '{where}'{suggest(part, node)}")
        if last:
            node[part] = value
        else:
            node = node[part]


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


def with_defaults(raw: dict, source: str, restricted: bool = False) -> dict:
    """The file's config with every default filled in (the *resolved* config written to the run), the
    trainer's from its class (`trainer.type`). Keys are checked afterwards, by ConfigParser."""
    config = copy.deepcopy(raw)
    check_keys(config, TOP_LEVEL, source)
    for key, default in TOP_LEVEL.items():
        if key not in config:
            if default is REQUIRED:
                raise UserError(f"{source}: missing required key '{key}'")
            config[key] = copy.deepcopy(default)
    if not isinstance(config["trainer"], dict):
        raise UserError(f"{source}: trainer: expected a mapping, got {shorten(repr(config['trainer']))}")
    trainer_type = config["trainer"].get("type", trainer_options.DEFAULTS["type"])
    defaults = resolve("trainer", str(trainer_type), f"{source}: trainer.type", restricted).DEFAULTS
    config["trainer"] = {**copy.deepcopy(defaults), **config["trainer"]}
    return config


def is_named(spec: Any) -> bool:
    """`{"generator": {type, args}, "discriminator": {type, args}}`: several named entries of one role."""
    return (isinstance(spec, dict) and bool(spec) and not {"type", "args", "interval"} & spec.keys()
            and all(isinstance(v, dict) for v in spec.values()))


def specs_of(role: str, spec: Any) -> list[tuple[str, Any]]:
    """(where, spec) of each entry of a role: one, or one per name."""
    return [(f"{role}.{name}", entry) for name, entry in spec.items()] if is_named(spec) else [(role, spec)]


class ConfigParser:
    """A checked config and the one place that turns its `{type, args}` entries into objects."""

    def __init__(self, config: dict, source: str = "<config>", restricted: bool = False):
        """restricted: the config is someone else's data (read from a checkpoint): it may only name
        what the project trusts (see `resolve`)."""
        self.source, self.config, self.restricted = source, config, restricted
        self.targets: dict[str, Callable] = {}  # "arch", "metrics[0]", ... -> what its `type` names
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
        return self.config[key]

    def entries(self, role: str) -> list[tuple[str, Any]]:
        """(name, spec) of each entry of `role`: ('model', spec) for a single one."""
        spec = self.config[role]
        return list(spec.items()) if is_named(spec) else [("model", spec)]

    # ---- checking -------------------------------------------------------------------------------
    def _check(self) -> None:
        cfg, src = self.config, self.source
        check_keys(cfg, TOP_LEVEL, src)
        for key in ("name", "seed", "deterministic", "device", "metrics", "trainer"):
            check_type(cfg[key], TOP_LEVEL[key], f"{src}: {key}")
        if not cfg["name"] or "/" in cfg["name"]:
            raise UserError(f"{src}: name: must be a non-empty name without '/', got {shorten(repr(cfg['name']))}")
        self._check_trainer()
        for role in ("arch", "data_loader", "optimizer", "loss", "lr_scheduler"):
            for where, spec in specs_of(role, cfg[role]) if cfg[role] is not None else []:
                self._check_spec(role, spec, where)
        for i, spec in enumerate(cfg["metrics"]):
            self._check_spec("metrics", spec, f"metrics[{i}]")
        if len(set(self.metric_names())) != len(cfg["metrics"]):
            raise UserError(f"{src}: metrics: a metric is listed twice: {self.metric_names()}")
        self._check_names()
        problem = trainer_options.check_options(cfg["trainer"], self.logged_metric_names())
        if problem:
            raise UserError(f"{src}: trainer.{problem}")
        for where, spec in specs_of("lr_scheduler", cfg["lr_scheduler"]) if cfg["lr_scheduler"] else []:
            plateau = spec["type"].rpartition(".")[2] == "ReduceLROnPlateau"
            if plateau and (cfg["trainer"]["monitor"] == "off" or spec.get("interval") == "step"):
                raise UserError(f"{src}: {where}: ReduceLROnPlateau steps once per epoch on the monitored "
                                "metric: set trainer.monitor and leave interval at 'epoch'")

    def _check_trainer(self) -> None:
        """The trainer class, then its keys (a subclass may add its own to DEFAULTS) and their kinds."""
        options, src = self.config["trainer"], self.source
        check_type(options.get("type"), "", f"{src}: trainer.type")
        trainer_class = resolve("trainer", options["type"], f"{src}: trainer.type", self.restricted)
        self.targets["trainer"] = trainer_class
        check_keys(options, trainer_class.DEFAULTS, f"{src}: trainer")
        for key, value in options.items():
            check_type(value, trainer_class.DEFAULTS[key], f"{src}: trainer.{key}")

    def _check_names(self) -> None:
        """Several models: each optimizer names a model, each scheduler an optimizer (a frozen model may
        have none). One model: one optimizer and at most one scheduler."""
        arch, optimizer, scheduler = (self.config[role] for role in ("arch", "optimizer", "lr_scheduler"))
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
        check_keys(spec, allowed, where)
        if not isinstance(spec.get("type"), str):
            raise UserError(f"{where}.type: missing or not a string")
        args = spec.get("args", {})
        if not isinstance(args, dict):
            raise UserError(f"{where}.args: expected a mapping, got {shorten(repr(args))}")
        if role == "lr_scheduler" and spec.get("interval", "epoch") not in SCHEDULER_INTERVALS:
            raise UserError(f"{where}.interval: expected one of {SCHEDULER_INTERVALS}, got {spec['interval']!r}")
        target = resolve(role, spec["type"], f"{where}.type", self.restricted)
        self.targets[where[len(self.source) + 2 :]] = target
        injected = INJECTED.get(role, set())
        if role in ("loss", "metrics") and not inspect.isclass(target):
            injected = set(list(signature_params(target))[:2])  # (output, target) come from the trainer
        check_args(target, args, f"{where}.args", injected)
        if role == "data_loader" and hasattr(target, "check_config"):  # names inside its args (transforms, ...)
            target.check_config(args, f"{where}.args", self.restricted)

    def metric_names(self) -> list[str]:
        return [spec if isinstance(spec, str) else spec["type"].rpartition(".")[2] for spec in self.config["metrics"]]

    def logged_metric_names(self) -> list[str]:
        """Every name `monitor` may refer to: loss, metrics and what the trainer class and the loss say they
        log (their LOGGED), in training and, if the data loader class says it has some, validation."""
        extra = [*getattr(self.targets["trainer"], "LOGGED", ()), *getattr(self.targets["loss"], "LOGGED", ())]
        names = ["loss", *extra, *self.metric_names()]
        has_validation = getattr(self.targets["data_loader"], "has_validation", BaseDataLoader.has_validation)(
            self.config["data_loader"].get("args", {}))
        return names + ([f"val_{n}" for n in names] if has_validation else [])

    # ---- building -------------------------------------------------------------------------------
    def build(self, role: str, *args: Any, **kwargs: Any) -> Any:
        """`config[role]` as an object: its `type` called with its `args` and the given arguments. Several
        named entries give a dict of objects by name; an argument that is a dict gives each its own."""
        spec = self.config[role]
        if not is_named(spec):
            return self._call(role, spec, role, *args, **kwargs)
        built = {}
        for name, entry in spec.items():
            own_args = [arg[name] if isinstance(arg, dict) else arg for arg in args]
            built[name] = self._call(role, entry, f"{role}.{name}", *own_args, **kwargs)
        return built

    def build_loss(self) -> Callable:
        return self._callable("loss", self.config["loss"], "loss")

    def build_metrics(self) -> dict[str, Callable]:
        return {
            name: self._callable("metrics", spec, f"metrics[{i}]")
            for i, (name, spec) in enumerate(zip(self.metric_names(), self.config["metrics"]))
        }

    def _callable(self, role: str, spec: str | dict, where: str) -> Callable:
        """A loss or metric: a class is instantiated with its args, a function gets them bound."""
        spec = {"type": spec} if isinstance(spec, str) else spec
        if inspect.isclass(self.targets[where]):
            return self._call(role, spec, where)
        target = self.targets[where]
        return functools.partial(target, **spec.get("args", {})) if spec.get("args") else target

    def _call(self, role: str, spec: dict, where: str, *args: Any, **kwargs: Any) -> Any:
        target = self.targets[where]
        try:
            built = target(*args, **{**spec.get("args", {}), **kwargs})
        except (TypeError, ValueError) as e:
            raise UserError(f"{self.source}: {where}: {spec['type']}: {e}") from None
        except UserError as e:  # e.g. a data loader's missing files: say which config entry asked for them
            raise UserError(f"{self.source}: {where}: {e}") from None
        return check_built(role, built, spec["type"], f"{self.source}: {where}")


def signature_params(fn: Callable) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


SIMPLE_TYPES = {int: int, float: float, bool: bool, str: str, "int": int, "float": float, "bool": bool, "str": str}


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
        expected = SIMPLE_TYPES.get(named[key].annotation) if key in named else None
        if expected is not None:
            check_type(value, expected(), f"{where}.{key}")
    for name, param in named.items():
        if param.default is param.empty and name not in args and name not in injected:
            raise UserError(f"{where}: missing required argument '{name}'")


# What a config read back from a checkpoint may name without --trust-config: modules in these packages
# (this project's role packages, and torch/torchvision code that only builds objects), decided from the
# name before anything is imported. A config given with -c may name any importable callable.
TRUSTED_PACKAGES = ("model", "data_loader", "trainer", "torch.nn", "torch.optim", "torchvision.models",
                    "torchvision.transforms", "torchvision.datasets")
TRUST_HINT = "give your own config with -c, or --trust-config if you trust this checkpoint"


def is_trusted_module(module_name: str) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in TRUSTED_PACKAGES)


def _kinds() -> dict[str, tuple[tuple[type, ...], str]]:
    """Per role: the classes an object must be an instance of, and how to name that kind in errors."""
    schedulers = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    return {
        "arch": ((torch.nn.Module,), "a model (an nn.Module)"),
        "data_loader": ((BaseDataLoader,), "a data loader (a BaseDataLoader)"),
        "optimizer": ((torch.optim.Optimizer,), "an optimizer (a torch.optim.Optimizer)"),
        "lr_scheduler": (schedulers, "an LR scheduler (a torch.optim.lr_scheduler.LRScheduler)"),
        "trainer": ((BaseTrainer,), "a trainer (a BaseTrainer)"),
        "dataset": ((torch.utils.data.Dataset,), "a dataset (a torch.utils.data.Dataset)"),
    }


def kind_problem(role: str, target: Any) -> str | None:
    """Why `target` cannot fill `role`, or None. Checked before anything is called: a class must be of
    the role's kind; otherwise only a Python function will do (its result is checked after the call);
    a loss or metric must take (output, target); a transform is a class or a function that builds one."""
    if role in ("loss", "metrics", "transform"):
        if inspect.isclass(target):
            callable_instances = any("__call__" in vars(k) for k in target.__mro__[:-1])
            return None if callable_instances else "is a class whose objects cannot be called"
        if not inspect.isfunction(target):
            return "is not a function or class"
        if role == "transform":
            return None
        params = signature_params(target).values()
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
            return "cannot be called with (output, target)"
        return None
    bases, kind = _kinds()[role]
    if inspect.isclass(target):
        return None if issubclass(target, bases) else f"is not {kind}"
    if role == "trainer":
        return f"is not {kind}"
    return None if inspect.isfunction(target) else f"is not {kind}, nor a function that returns one"


def check_built(role: str, obj: Any, type_name: str, where: str) -> Any:
    """What a function returned must be of the role's kind (a class was checked before the call)."""
    if role in ("loss", "metrics", "transform"):
        ok, kind = callable(obj), "something callable"
    else:
        bases, kind = _kinds()[role]
        ok = isinstance(obj, bases)
    if not ok:
        raise UserError(f"{where}: {type_name} returned {type(obj).__name__}, not {kind}")
    return obj


def returns_kind(role: str, fn: Callable) -> bool:
    """`fn` is annotated to return the role's kind (`def resnet34(...) -> nn.Module`)."""
    try:
        returned = typing.get_type_hints(fn).get("return")
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate says nothing
        return False
    return inspect.isclass(returned) and issubclass(returned, _kinds()[role][0])


def _candidates(module_name: str, role: str) -> dict[str, Callable]:
    """The names a config may use for `role` without a dotted path: what `module_name` defines (or, for
    torch's modules, exports) that is of the role's kind."""
    module = importlib.import_module(module_name)
    found = {}
    for name, obj in vars(module).items():
        if name.startswith("_") or not callable(obj) or kind_problem(role, obj):
            continue
        if module_name.startswith(("torch.", "torchvision.")):  # their public classes, not the abstract bases
            keep = inspect.isclass(obj) and name not in ("Optimizer", "LRScheduler", "Transform", "VisionDataset")
            keep = keep and (name.endswith("Loss") if module_name == "torch.nn" else True)
        else:  # the module's own classes, and functions; a function builds a model (...) only if it says so
            keep = getattr(obj, "__module__", "") == module_name and (
                role in ("loss", "metrics") or inspect.isclass(obj) or returns_kind(role, obj))
        if keep:
            found[name] = obj
    return found


def unlisted_hint(role: str, type_name: str) -> str:
    """Why a name defined in a role module is not listed: it is not of the role's kind, or a function that
    does not say what it returns."""
    for module_name in ROLE_MODULES[role]:
        own = not module_name.startswith(("torch.", "torchvision."))  # torch's and torchvision's list all they have
        if own and callable(getattr(importlib.import_module(module_name), type_name, None)):
            return (f" ('{type_name}' in {module_name} is not listed for {role}: a function must be annotated with "
                    f"what it returns; name it by dotted path, '{module_name}.{type_name}', if it is one)")
    return ""


def resolve(role: str, type_name: str, where: str, restricted: bool = False) -> Callable:
    """The callable a config's `type` names, looked up in the role's modules or as a dotted path, and
    of the role's kind. `restricted`: the config came from a checkpoint, so a dotted path may only
    name a trusted module (see TRUSTED_PACKAGES); no other module is imported."""
    if "." in type_name:
        module_name, _, attr = type_name.rpartition(".")
        if restricted and not is_trusted_module(module_name):
            raise UserError(f"{where}: '{type_name}' is not trusted in a checkpoint's config (only this project's "
                            f"{', '.join(TRUSTED_PACKAGES[:3])} modules and torch/torchvision classes); {TRUST_HINT}")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UserError(f"{where}: cannot import '{module_name}' for '{type_name}': {e}") from None
        if not callable(getattr(module, attr, None)):
            raise UserError(f"{where}: '{module_name}' has no callable '{attr}'{suggest(attr, dir(module))}")
        target = getattr(module, attr)
        if restricted and not is_trusted_module(getattr(target, "__module__", None) or ""):  # imported from elsewhere
            raise UserError(f"{where}: '{type_name}' is defined in '{target.__module__}', which a checkpoint's "
                            f"config may not name; {TRUST_HINT}")
    else:
        available = {}
        for module_name in ROLE_MODULES[role]:
            available.update({k: v for k, v in _candidates(module_name, role).items() if k not in available})
        if type_name not in available:
            listing = ", ".join(sorted(available))
            raise UserError(f"{where}: unknown {role} type '{type_name}'{suggest(type_name, available)}; "
                            f"available: {listing}{unlisted_hint(role, type_name)}")
        target = available[type_name]
    problem = kind_problem(role, target)
    if problem:
        raise UserError(f"{where}: '{type_name}' {problem}")
    return target


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
