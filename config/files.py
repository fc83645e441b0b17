"""Reading a config file (JSON or YAML) and applying `--set KEY=VALUE` overrides, within bounds.

Every mistake is a `UserError` naming the file (line and column where known) and the key.
"""

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from utils.errors import UserError
from utils.suggest import suggest

# Bounds on what a config may hold: a file larger, or nested deeper, or with more values (a YAML alias
# counts each time it is used) is refused before anything reads it further.
MAX_BYTES, MAX_DEPTH, MAX_VALUES = 1_000_000, 32, 10_000


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
    except ValueError as e:  # a number of more than 4,300 digits (Python's limit on int(str))
        raise UserError(f"{path}: invalid JSON: {str(e).split(';')[0]}") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently), and reading
    1e-3 as a float: YAML 1.1's floats need a dot, YAML 1.2's do not (https://github.com/yaml/pyyaml/issues/173).
    off/on/yes/no stay booleans, as YAML 1.1 says."""

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


UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:
    [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def parse_yaml(text: str, path: Path) -> Any:
    loader = UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    except ValueError as e:  # a number of more than 4,300 digits (Python's limit on int(str))
        raise UserError(f"{path}: invalid YAML: {str(e).split(';')[0]}") from None
    finally:
        loader.dispose()


def check_bounds(data: Any, where: str) -> None:
    """Refuse a config nested deeper than MAX_DEPTH or holding more than MAX_VALUES values (a YAML alias
    bomb expands to billions): checked without expanding it, before anything prints or copies it. Numbers must
    be finite, and integers fit in 64 bits (all torch and NumPy take): NaN, .inf or 10**30 stop here, by key."""
    count, stack = 0, [(data, 1, "")]
    while stack:
        value, depth, key = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise UserError(f"{where}: the config holds more than {MAX_VALUES:,} values")
        if depth > MAX_DEPTH:
            raise UserError(f"{where}: nested more than {MAX_DEPTH} levels deep")
        at = f"{where}: {key}" if key else where
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{at}: expected a finite number, got {value}")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise UserError(f"{at}: an integer of {value.bit_length()} bits, more than 64")
        if isinstance(value, dict):
            stack.extend((child, depth + 1, f"{key}.{name}" if key else str(name)) for name, child in value.items())
        elif isinstance(value, list):
            stack.extend((child, depth + 1, f"{key}[{i}]") for i, child in enumerate(value))


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
    return key.split("."), value


def apply_override(config: dict, path: list[str], value: Any, what: str = "--set ") -> None:
    """Set one dotted key. It must exist already, except a new argument inside an `args` mapping or a new value
    in `vars`. `what` starts its errors (a sweep's search space says where it is)."""
    node = config
    for depth, part in enumerate(path):
        where = ".".join(path[: depth + 1])
        last = depth == len(path) - 1
        if not isinstance(node, dict):
            raise UserError(f"{what}{'.'.join(path)}: '{'.'.join(path[:depth])}' is not a mapping")
        if part not in node and not (last and (path[depth - 1 : depth] == ["args"] or path[:depth] == ["vars"])):
            raise UserError(f"{what}{'.'.join(path)}: unknown key '{where}'{suggest(part, node)}")
        if last:
            node[part] = value
        else:
            node = node[part]

