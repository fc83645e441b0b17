"""Names to callables: a config's `type` looked up for its role, of the role's kind, and for a config read
back from a checkpoint only within what the project trusts. Nothing is called while a name is checked."""

import importlib
import inspect
import typing
from collections.abc import Callable
from typing import Any

import torch

from config.schema import signature_params
from utils.errors import UserError
from utils.suggest import suggest

# Where each role's `type` is looked up, in order. A dotted path (`torchvision.models.resnet18`)
# is imported as written, for any role.
ROLE_MODULES = {"arch": ["model.model"], "data_loader": ["data_loader.data_loaders"], "metrics": ["model.metric"],
                "loss": ["model.loss", "torch.nn"], "optimizer": ["torch.optim"],
                "lr_scheduler": ["torch.optim.lr_scheduler"],
                "trainer": ["trainer.trainer", "trainer.gan", "trainer.vae"],
                # inside a data loader's args (data_loader/pipeline.py): `dataset` and `transforms` entries
                "dataset": ["torchvision.datasets"], "transform": ["torchvision.transforms.v2"]}


# What a config read back from a checkpoint may name for each role without --trust-config, decided from the
# object before anything is called: (packages whose classes of the role's kind it may name, modules whose
# functions it may name). A dotted path outside them is not even imported. arch may also name a model builder
# registered in torchvision.models, and a function of model.model only if it is annotated to return a model.
# Anything else is refused, however trusted its package: torch.save, a download helper, torch.nn.init.* ...
# A config given with -c may name any importable callable.
CHECKPOINT_KINDS = {
    "arch": (("model", "torch.nn", "torchvision.models"), ("model.model",)),
    "loss": (("model", "torch.nn.modules.loss"), ("model.loss",)),
    "metrics": (("model.metric",), ("model.metric",)),
    "optimizer": (("torch.optim",), ()),
    "lr_scheduler": (("torch.optim",), ()),
    "dataset": (("torchvision.datasets", "data_loader"), ()),
    "transform": (("torchvision.transforms", "data_loader"), ()),
    "trainer": (("trainer",), ()),
    "data_loader": (("data_loader",), ()),
}
TRUST_HINT = "give your own config with -c, or --trust-config if you trust this checkpoint"


def within(module_name: str, packages: tuple[str, ...]) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in packages)


def checkpoint_may_name(role: str) -> str:
    """What a checkpoint's config may name for `role`, in words."""
    classes_from, functions_from = CHECKPOINT_KINDS[role]
    allowed = [f"a class of ({', '.join(classes_from)})"] + [f"a function of {m}" for m in functions_from]
    if role == "arch":
        allowed = [allowed[0], "a function of model.model annotated to return a model",
                   "a model builder of torchvision.models"]
    return f"{role} may name only: {', '.join(allowed)}"


def is_model_builder(target: Callable) -> bool:
    """`target` is a model builder torchvision.models registers (resnet18, vit_b_16, ...)."""
    from torchvision import models

    return any(models.get_model_builder(name) is target for name in models.list_models())


def untrusted(role: str, target: Callable) -> str | None:
    """What `target` is, if a checkpoint's config may not name it for `role` (see CHECKPOINT_KINDS), or None."""
    classes_from, functions_from = CHECKPOINT_KINDS[role]
    module = getattr(target, "__module__", None) or "?"
    if inspect.isclass(target):
        if not within(module, classes_from):
            return f"a class of {module}"
        return "not an nn.Module loss class" if role == "loss" and not issubclass(target, torch.nn.Module) else None
    if inspect.isfunction(target) and module in functions_from and (role != "arch" or returns_kind(role, target)):
        return None
    if role == "arch" and is_model_builder(target):
        return None
    return f"a {'function' if inspect.isfunction(target) else type(target).__name__} of {module}"


def kinds() -> dict[str, tuple[tuple, str]]:
    """Per role: what an object must be, and how to name that kind in errors. torch's kinds are classes to
    be an instance of; the project's own are known by the attributes they have (config/ sits below base/)."""
    schedulers = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    return {
        "arch": ((torch.nn.Module,), "a model (an nn.Module)"),
        "data_loader": (("batches", "split_validation", "has_validation"), "a data loader (a BaseDataLoader)"),
        "optimizer": ((torch.optim.Optimizer,), "an optimizer (a torch.optim.Optimizer)"),
        "lr_scheduler": (schedulers, "an LR scheduler (a torch.optim.lr_scheduler.LRScheduler)"),
        "trainer": (("train", "DEFAULTS", "LOGGED"), "a trainer (a BaseTrainer)"),
        "dataset": ((torch.utils.data.Dataset,), "a dataset (a torch.utils.data.Dataset)"),
    }


def of_kind(role: str, obj: Any) -> bool:
    """`obj`, a class or an object, is of the role's kind."""
    needs = kinds()[role][0]
    if isinstance(needs[0], str):
        return all(hasattr(obj, name) for name in needs)
    return issubclass(obj, needs) if inspect.isclass(obj) else isinstance(obj, needs)


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
    kind = kinds()[role][1]
    if inspect.isclass(target):
        return None if of_kind(role, target) else f"is not {kind}"
    if role == "trainer":
        return f"is not {kind}"
    return None if inspect.isfunction(target) else f"is not {kind}, nor a function that returns one"


def check_built(role: str, obj: Any, type_name: str, where: str) -> Any:
    """What a function returned must be of the role's kind (a class was checked before the call)."""
    if role in ("loss", "metrics", "transform"):
        ok, kind = callable(obj), "something callable"
    else:
        ok, kind = of_kind(role, obj), kinds()[role][1]
    if not ok:
        raise UserError(f"{where}: {type_name} returned {type(obj).__name__}, not {kind}")
    return obj


def returns_kind(role: str, fn: Callable) -> bool:
    """`fn` is annotated to return the role's kind (`def resnet34(...) -> nn.Module`)."""
    try:
        returned = typing.get_type_hints(fn).get("return")
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate says nothing
        return False
    return inspect.isclass(returned) and of_kind(role, returned)


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
    of the role's kind. `restricted`: the config came from a checkpoint, so it may only name what
    CHECKPOINT_KINDS allows for the role; a dotted path outside it is never imported."""
    refused = f"{where}: '{type_name}' is not trusted in a checkpoint's config"
    if "." in type_name:
        module_name, _, attr = type_name.rpartition(".")
        classes_from, functions_from = CHECKPOINT_KINDS[role]
        if restricted and not within(module_name, classes_from + functions_from):
            raise UserError(f"{refused}: it is in module {module_name}; {checkpoint_may_name(role)}; {TRUST_HINT}")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UserError(f"{where}: cannot import '{module_name}' for '{type_name}': {e}") from None
        if not callable(getattr(module, attr, None)):
            raise UserError(f"{where}: '{module_name}' has no callable '{attr}'{suggest(attr, dir(module))}")
        target = getattr(module, attr)
    else:
        available = {}
        for module_name in ROLE_MODULES[role]:
            available.update({k: v for k, v in _candidates(module_name, role).items() if k not in available})
        if type_name not in available:
            listing = ", ".join(sorted(available))
            raise UserError(f"{where}: unknown {role} type '{type_name}'{suggest(type_name, available)}; "
                            f"available: {listing}{unlisted_hint(role, type_name)}")
        target = available[type_name]
    what = untrusted(role, target) if restricted else None
    if what:
        raise UserError(f"{refused}: it is {what}; {checkpoint_may_name(role)}; {TRUST_HINT}")
    problem = kind_problem(role, target)
    if problem:
        raise UserError(f"{where}: '{type_name}' {problem}")
    return target
