"""References in a config: `"${vars.n_classes}"` is the config's own value at that dotted path, filled in when the
config is checked; `"${data.num_classes}"` is an attribute of the training data loader, filled in when what
reads it is built (README: Values from the data and project-wide values). A reference is the whole value."""

import re
from collections.abc import Callable
from typing import Any

import torch

from config.files import MAX_VALUES, shorten
from utils.errors import UserError
from utils.suggest import suggest

REFERENCE = re.compile(r"\$\{([^{}]*)\}")
ROLES = ("arch", "data_loader", "loss", "metrics", "optimizer", "lr_scheduler")
READ_DATA = "arch, loss, metrics, optimizer and lr_scheduler"  # built after the training data loader
PLAIN = (bool, int, float, str, torch.Tensor)  # what a checkpoint may record (it loads with weights_only)


def is_data_reference(value: Any) -> bool:
    return isinstance(value, str) and bool(REFERENCE.fullmatch(value)) and value[2:].startswith("data.")


def fill_in(value: Any, config: dict, source: str, where: str = "",
            data: Callable[[str, str], Any] | None = None) -> Any:
    """`value` (at `where` in `config`) with its references filled in; `${data.<name>}` by `data(name, at)`,
    or left as written without `data`. References may stand in the args of a role and in `vars`. The result
    is bounded as a config file is (references to references could otherwise grow it exponentially)."""
    count = 0

    def fill(value: Any, where: str, seen: tuple) -> Any:
        nonlocal count
        count += 1
        if count > MAX_VALUES:
            raise UserError(f"{source}: {where}: with its references filled in, the config holds more than "
                            f"{MAX_VALUES:,} values")
        if isinstance(value, dict):
            return {k: fill(v, f"{where}.{k}" if where else k, seen) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v, f"{where}[{i}]", seen) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        at, match = f'{source}: {where}: "{shorten(value)}"', REFERENCE.fullmatch(value)
        if not match:
            raise UserError(f'{at}: a reference is the whole value, e.g. "${{vars.n_classes}}", with no text around it')
        path = match[1].split(".")
        if not all(part.isidentifier() and not part.startswith("_") for part in path):
            raise UserError(f"{at}: a reference is a dotted path of plain names, none starting with '_'")
        root, in_args = re.match(r"\w*", where)[0], re.search(r"\.args\b", where)
        if not (root in ROLES and in_args or root == "vars"):
            raise UserError(f"{at}: references may stand only in the args of {', '.join(ROLES)}, and in vars")
        if path[0] == "data":
            if len(path) != 2:
                raise UserError(f'{at}: a data reference names one attribute of the data loader: "${{data.<name>}}"')
            if root == "data_loader":
                raise UserError(f"{at}: only the args of {READ_DATA} may read the data loader")
            return value if data is None else data(path[1], at)
        if match[1] in seen:
            raise UserError(f"{at}: the references form a cycle ({' -> '.join((*seen, match[1]))})")
        node = config
        for depth, part in enumerate(path):
            if not isinstance(node, dict) or part not in node:
                known = node if isinstance(node, dict) else {}
                raise UserError(f"{at}: the config has no '{'.'.join(path[: depth + 1])}'{suggest(part, known)}")
            node = node[part]
        return fill(node, where, (*seen, match[1]))

    return fill(value, where, ())


def is_plain(value: Any) -> bool:
    return isinstance(value, PLAIN) or isinstance(value, (list, tuple)) and all(isinstance(v, PLAIN) for v in value)


def data_value(loader: Any, name: str) -> Any:
    """The attribute `name` of the data loader (a property of its class, or a value it holds): plain data only,
    never a method. Reading an attribute calls no more than the loader class's own properties."""
    if name not in dir(loader):
        properties = [n for k in reversed(type(loader).__mro__) for n, v in vars(k).items() if isinstance(v, property)]
        offered = [n for n in dict.fromkeys([*properties, *(n for n, v in vars(loader).items() if is_plain(v))])
                   if not n.startswith("_")]
        raise UserError(f"the data loader ({type(loader).__name__}) has no attribute '{name}'"
                        f"{suggest(name, offered)}; it has: {', '.join(offered)}")
    value = getattr(loader, name)
    if not is_plain(value):
        kind = "a method" if callable(value) else f"of type {type(value).__name__}"
        raise UserError(f"'{name}' of the data loader ({type(loader).__name__}) is {kind}: a reference reads a "
                        "number, a string, a tensor or a list of them")
    return value
