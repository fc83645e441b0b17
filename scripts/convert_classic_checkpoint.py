"""Convert a checkpoint of the classic pytorch-template (victoresque/pytorch-template) to this project's format.

    python scripts/convert_classic_checkpoint.py saved/models/Mnist_LeNet/<run_id>/model_best.pth model_best.pth
    python test.py -r model_best.pth --set data_loader.args.data_dir=data/
    python train.py -c configs/mnist.json --finetune model_best.pth

A classic checkpoint pickles the whole `parse_config.ConfigParser`, so `torch.load(weights_only=True)`
refuses it, and a plain `torch.load` would import the old project's modules and could run any code the
file names. This script unpickles it with a restricted unpickler instead: tensors, the standard
containers and plain values are rebuilt; any other class becomes an inert `StandIn` that only records
its pickled state (its module is never imported); a call to anything else (`os.system`, `eval`, ...)
stops the conversion. The new file holds state dicts, plain values and the config as a plain dict.
Classic layout: base/base_trainer.py `_save_checkpoint` and parse_config.py in the classic repository.
"""

import _compat_pickle
import builtins
import codecs
import collections
import io
import os
import pickle
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import checkpoint  # noqa: E402
from utils.cli import ArgumentParser, run_main, text  # noqa: E402
from utils.errors import UserError  # noqa: E402

# ---- the restricted unpickler -----------------------------------------------------------------------------
# What torch.save writes for tensors and state dicts (the same kinds torch's weights_only loader accepts).
TORCH_REBUILDS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                  "_rebuild_parameter_with_state", "_rebuild_sparse_tensor", "_rebuild_qtensor",
                  "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor")
LIBRARIES = ("torch", "numpy", "builtins", "collections", "_codecs", "copyreg")  # real code here: allowlist only
# Classes whose pickle calls them with plain arguments (the ConfigParser's paths): recorded, never called.
PATHS = ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")


def allowed_globals() -> dict[str, object]:
    """The globals that are rebuilt for real: tensors, storages, dtypes, containers, numpy scalars."""
    allowed = {f"torch._utils.{name}": getattr(torch._utils, name) for name in TORCH_REBUILDS
               if hasattr(torch._utils, name)}
    allowed |= {f"torch.{name}": value for name, value in vars(torch).items()
                if isinstance(value, torch.dtype) or (name.endswith("Storage") and isinstance(value, type))}
    allowed |= {"torch.Size": torch.Size, "torch.Tensor": torch.Tensor, "torch.device": torch.device,
                "torch.nn.parameter.Parameter": torch.nn.Parameter,
                "torch.storage.UntypedStorage": torch.UntypedStorage, "torch.storage.TypedStorage": torch.TypedStorage,
                "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
                "torch.serialization._get_layout": torch.serialization._get_layout,
                "collections.OrderedDict": collections.OrderedDict, "_codecs.encode": codecs.encode}
    allowed |= {f"builtins.{name}": getattr(builtins, name)
                for name in ("set", "frozenset", "complex", "bytearray", "bytes", "slice", "range")}
    # a classic MetricTracker (pandas) can leave monitor_best a numpy float: numpy's scalar constructor
    # (numpy.core in numpy 1, numpy._core in numpy 2) and dtype
    scalar = np.float64(0).__reduce__()[0]
    allowed |= {f"{module}.scalar": scalar for module in ("numpy.core.multiarray", "numpy._core.multiarray")}
    allowed["numpy.dtype"] = np.dtype
    return allowed


class Refused(UserError):
    """The file asks for something a checkpoint never needs: nothing is converted."""


class StandInType(type):
    """The class of every stand-in. Creating one (pickle's NEWOBJ calls `__new__`) only records data;
    calling one (pickle's REDUCE, as in `os.system("...")`) is refused, except for plain data classes."""

    def __call__(cls, *args, **kwargs):
        module, _, name = cls.qualname.rpartition(".")
        if module.split(".")[0] == "pathlib" and name in PATHS:
            return cls.__new__(cls, *args)
        shown = ", ".join(repr(a) for a in args)
        raise Refused(f"refused: the file calls {cls.qualname}({shown[:80]}) when unpickled; a checkpoint "
                      "never needs that, so nothing was converted")


class StandIn(metaclass=StandInType):
    """An object of a class that is not imported: its constructor arguments and pickled state, as data."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __setstate__(self, state) -> None:  # pickle's BUILD: the object's __dict__ (or (dict, slots))
        self.state = state

    def attributes(self) -> dict:
        state = self.state[0] if isinstance(self.state, tuple) else self.state
        return state if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"<stand-in for {self.qualname}>"


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that imports nothing: allowed globals are torch's and the standard containers;
    every other name becomes a StandIn subclass, made once per name."""

    allowed: dict[str, object] = {}
    stand_ins: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        # protocol 2 (torch.save's) writes Python 2 names: __builtin__.set, commands.call
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualname = f"{module}.{name}"
        if not RestrictedUnpickler.allowed:
            RestrictedUnpickler.allowed = allowed_globals()
        if qualname in self.allowed:
            return self.allowed[qualname]
        if module.split(".")[0] in LIBRARIES:
            raise Refused(f"refused: the file names {qualname}, which is not a tensor, container or plain value; "
                          "nothing was converted")
        if qualname not in self.stand_ins:
            self.stand_ins[qualname] = StandInType(name, (StandIn,), {"qualname": qualname, "__module__": __name__})
        return self.stand_ins[qualname]


# torch.load(pickle_module=...) takes a module: its Unpickler for the data, its load for legacy headers.
RESTRICTED_PICKLE = types.SimpleNamespace(__name__="restricted_pickle", Unpickler=RestrictedUnpickler,
                                          load=lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load(),
                                          UnpicklingError=pickle.UnpicklingError)


def load_classic(path: Path) -> dict:
    """The classic checkpoint's dict, with its ConfigParser (and any other project object) as a StandIn."""
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    print(f"Unpickling {path} because you trust it (running this converter says so); restricted: no code from the "
          "file runs, its project classes become inert stand-ins")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", pickle_module=RESTRICTED_PICKLE, weights_only=False)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - whatever the damage, the answer is one line
        raise UserError(f"{path}: not a PyTorch checkpoint: {checkpoint.load_failure(e)}") from None
    if isinstance(state, dict) and "model" in state and "version" in state:
        raise UserError(f"{path}: already a checkpoint of this project (it has 'version' and 'model'): "
                        "use it as it is")
    if not isinstance(state, dict) or not {"state_dict", "config"} <= state.keys():
        found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path}: not a classic pytorch-template checkpoint (expected a dict with 'state_dict' "
                        f"and 'config'; found {found})")
    return state


# ---- the config -------------------------------------------------------------------------------------------
TOP_LEVEL = ("name", "arch", "data_loader", "optimizer", "loss", "metrics", "lr_scheduler", "trainer")
TRAINER = ("epochs", "save_dir", "save_period", "verbosity", "monitor", "early_stop", "tensorboard")


def plain(value, where: str):
    """`value` as JSON-like data (dicts, lists, str, numbers, bool, None); anything else is an error."""
    if isinstance(value, dict):
        return {str(k): plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        value = value.item()  # a classic MetricTracker can leave monitor_best a numpy float or a tensor
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise UserError(f"{where}: holds {value!r}, not plain data")


def classic_config(saved) -> dict:
    """The classic config dict: ConfigParser keeps it in `_config`; older versions saved the dict itself."""
    if isinstance(saved, dict):
        return plain(saved, "config")
    if isinstance(saved, StandIn):
        attributes = saved.attributes()
        for key in ("_config", "config"):
            if isinstance(attributes.get(key), dict):
                return plain(attributes[key], f"config.{key}")
    raise UserError(f"'config' is {saved!r} without a '_config' dict: not a classic ConfigParser")


def convert_config(old: dict) -> tuple[dict, list[str]]:
    """This project's config from a classic one, and a note for each key that changed or was dropped."""
    if not isinstance(old.get("arch"), dict) or not isinstance(old["arch"].get("type"), str):
        raise UserError(f"config: 'arch' must be a mapping with a 'type', got {old.get('arch')!r}")
    config = {key: old[key] for key in TOP_LEVEL if key in old}
    notes = []
    for key in old:
        if key == "n_gpu":
            notes.append(f"n_gpu ({old[key]}) dropped: set 'device' (or -d cpu, cuda, cuda:N) and run on several "
                         "GPUs with torchrun")
        elif key not in TOP_LEVEL:
            notes.append(f"{key} dropped: not a key of this project")
    trainer = old.get("trainer") if isinstance(old.get("trainer"), dict) else {}
    config["trainer"] = {key: trainer[key] for key in TRAINER if key in trainer}
    notes += [f"trainer.{key} dropped: not a trainer key of this project" for key in trainer if key not in TRAINER]
    # classic defaults that differ from ours: no monitor meant 'off', early_stop <= 0 meant never
    config["trainer"].setdefault("monitor", "off")
    early_stop = config["trainer"].get("early_stop", 0)
    if isinstance(early_stop, (int, float)) and early_stop <= 0:
        config["trainer"]["early_stop"] = 0
    elif early_stop:
        notes.append(f"trainer.early_stop {early_stop} kept: the classic template stopped after {early_stop + 1} "
                     f"epochs without improvement, this project stops after {early_stop}")
    return config, notes


# ---- the checkpoint ---------------------------------------------------------------------------------------
def model_weights(state_dict, notes: list[str]) -> dict:
    """The state dict, without DataParallel's 'module.' prefix (classic runs with n_gpu > 1 saved it)."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError("'state_dict' is not a model state dict (a mapping of names to tensors)")
    if state_dict and all(key.startswith("module.") for key in state_dict):
        notes.append("state_dict: DataParallel's 'module.' prefix removed")
        weights = collections.OrderedDict((key[len("module."):], v) for key, v in state_dict.items())
        metadata = getattr(state_dict, "_metadata", {})  # per-module versions: 'module' was the model itself
        weights._metadata = collections.OrderedDict((key[len("module."):] if key != "module" else "", v)
                                                    for key, v in metadata.items() if key)
        return weights
    return state_dict


def convert(old: dict) -> tuple[dict, list[str]]:
    config, notes = convert_config(classic_config(old["config"]))
    monitor_best = plain(old.get("monitor_best"), "monitor_best")
    state = {
        "version": checkpoint.VERSION,
        "arch": config["arch"]["type"],
        "epoch": int(plain(old.get("epoch", 0), "epoch")),
        "model": model_weights(old["state_dict"], notes),
        "optimizer": old.get("optimizer"),
        "monitor_best": float(monitor_best) if isinstance(monitor_best, (int, float)) else None,
        "config": config,
    }
    return {key: value for key, value in state.items() if value is not None}, notes  # absent, not None


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=text, help="checkpoint written by the classic pytorch-template")
    parser.add_argument("new", type=text, help="where to write the converted checkpoint")
    args = parser.parse_args(argv)
    old, new = Path(args.old), Path(args.new)
    if os.path.realpath(old) == os.path.realpath(new):  # Path.resolve raises on a symlink loop
        raise UserError(f"{new}: the converted file must not replace the original; give another path")
    if new.exists() or new.is_symlink():  # a folder, a FIFO, a link, earlier work: never replaced
        raise UserError(f"{new}: already exists; give a new path")
    classic = load_classic(old)
    try:
        state, notes = convert(classic)
    except UserError as e:
        raise UserError(f"{old}: {e}") from None
    data = checkpoint.serialize(state)
    try:  # what every loader of this project does: refuse anything but plain data
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{old}: the converted state is not plain data: {checkpoint.load_failure(e)}") from None
    checkpoint.save_atomic(data, new)
    for note in notes:
        print(f"note: {note}")
    print(f"Wrote {new} ({state['arch']}, epoch {state['epoch']}). Evaluate: python test.py -r {new} "
          "[--set data_loader.args.data_dir=DIR]; fine-tune: python train.py -c CONFIG --finetune "
          f"{new} (it has no resume state for -r)")
    return 0


if __name__ == "__main__":
    run_main(main)
