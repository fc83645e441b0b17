"""Coming from pytorch-template (issue 18): classic checkpoints convert without running their code, and
the classic template's own config.json trains here once `n_gpu` is gone.

The classic checkpoint is written by a separate process from a stand-in of the classic layout
(`parse_config.py` with its ConfigParser, `model/model.py`), as the classic `_save_checkpoint` does;
that folder is not on the converter's path.
"""

import collections
import importlib.util
import io
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from config.parser import ConfigParser
from conftest import ROOT, make_config, run, run_dirs
from model.model import MnistModel
from utils.errors import UserError

CONVERT = "scripts/convert_classic_checkpoint.py"
CLASSIC_CONFIG = ROOT / "tests" / "fixtures" / "classic_config.json"  # victoresque/pytorch-template@41dc06f

spec = importlib.util.spec_from_file_location("convert_classic_checkpoint", ROOT / CONVERT)
convert_classic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert_classic)

# The classic layout, reduced to what a checkpoint refers to. Importing parse_config leaves a mark.
CLASSIC_FILES = {
    "parse_config.py": '''
        from pathlib import Path

        Path(__file__).with_name("IMPORTED").touch()  # the converter must never import this


        class ConfigParser:  # the classic attributes, without its folders and logging
            def __init__(self, config, resume=None, run_id="0101_120000"):
                self._config = config
                self.resume = resume
                save_dir = Path(config["trainer"]["save_dir"])
                self._save_dir = save_dir / "models" / config["name"] / run_id
                self._log_dir = save_dir / "log" / config["name"] / run_id
                self.log_levels = {0: 30, 1: 20, 2: 10}

            @property
            def config(self):
                return self._config
        ''',
    "model/__init__.py": "",
    "model/model.py": '''
        import torch.nn as nn
        import torch.nn.functional as F


        class MnistModel(nn.Module):  # the classic model/model.py
            def __init__(self, num_classes=10):
                super().__init__()
                self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
                self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
                self.conv2_drop = nn.Dropout2d()
                self.fc1 = nn.Linear(320, 50)
                self.fc2 = nn.Linear(50, num_classes)

            def forward(self, x):
                x = F.relu(F.max_pool2d(self.conv1(x), 2))
                x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
                x = x.view(-1, 320)
                x = F.relu(self.fc1(x))
                x = F.dropout(x, training=self.training)
                return F.log_softmax(self.fc2(x), dim=1)
        ''',
    # what the classic BaseTrainer._save_checkpoint writes; a second, hostile file calls os.system
    "save_checkpoints.py": '''
        import json
        import os
        import sys
        from collections import OrderedDict
        from pathlib import Path

        import numpy as np
        import torch

        from model.model import MnistModel
        from parse_config import ConfigParser


        class Hostile:
            def __reduce__(self):
                return (os.system, (f"touch {sys.argv[4]}",))


        saved = torch.load(sys.argv[1], weights_only=True)
        model = MnistModel()
        model.load_state_dict(saved["model"])
        config = json.loads(Path(sys.argv[2]).read_text(), object_hook=OrderedDict)  # as classic read_json
        state = {"arch": type(model).__name__, "epoch": 3, "state_dict": model.state_dict(),
                 "optimizer": saved["optimizer"], "monitor_best": np.float64(0.25),
                 "config": ConfigParser(config, resume=Path("saved/models/x/checkpoint-epoch2.pth"))}
        torch.save(state, Path(sys.argv[3]) / "classic.pth")
        config["trainer"]["surprise"] = Hostile()
        torch.save({**state, "config": ConfigParser(config)}, Path(sys.argv[3]) / "hostile.pth")
        ''',
}


def converter_lines(result: subprocess.CompletedProcess) -> list[str]:
    return result.stderr.strip().splitlines()


@pytest.fixture(scope="module")
def classic(tmp_path_factory) -> Path:
    """A folder with classic.pth and hostile.pth, written by the stand-in classic project (folder `old/`)
    from this project's MnistModel weights and an Adam state that has taken one step."""
    work = tmp_path_factory.mktemp("classic")
    old = work / "old"
    for name, text in CLASSIC_FILES.items():
        (old / name).parent.mkdir(parents=True, exist_ok=True)
        (old / name).write_text(textwrap.dedent(text).lstrip())
    torch.manual_seed(0)
    model = MnistModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, work / "weights.pt")
    result = subprocess.run([sys.executable, "save_checkpoints.py", work / "weights.pt", CLASSIC_CONFIG, work,
                             work / "MARKER"], cwd=old, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    (old / "IMPORTED").unlink()
    return work


@pytest.fixture(scope="module")
def converted(classic) -> Path:
    new = classic / "new.pth"
    result = run(CONVERT, classic / "classic.pth", new)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "because you trust it" in lines[0]
    assert any(line.startswith("note: n_gpu (1) dropped") and "torchrun" in line for line in lines)
    assert any("early_stop 10 kept: the classic template stopped after 11 epochs" in line for line in lines)
    return new


def test_converted_checkpoint_is_plain_data_with_the_same_weights(classic, converted):
    state = torch.load(converted, weights_only=True)
    saved = torch.load(classic / "weights.pt", weights_only=True)
    assert state["version"] == 1 and state["arch"] == "MnistModel" and state["epoch"] == 3
    assert state["monitor_best"] == 0.25 and type(state["monitor_best"]) is float
    assert state["model"].keys() == saved["model"].keys()
    assert all(torch.equal(state["model"][k], saved["model"][k]) for k in saved["model"])
    exp_avg = state["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, saved["optimizer"]["state"][0]["exp_avg"])
    config = state["config"]
    assert type(config) is dict and "n_gpu" not in config
    assert config["data_loader"]["args"]["data_dir"] == "data/"
    assert config["trainer"] == {"epochs": 100, "save_dir": "saved/", "save_period": 1, "verbosity": 2,
                                 "monitor": "min val_loss", "early_stop": 10, "tensorboard": True}


def test_test_py_evaluates_a_converted_checkpoint(converted, tiny_mnist):
    result = run("test.py", "-r", converted, "--set", f"data_loader.args.data_dir={tiny_mnist}")
    assert result.returncode == 0, result.stderr
    accuracy = float(re.search(r"accuracy: ([0-9.]+)", result.stdout)[1])
    assert 0 <= accuracy <= 1 and "samples: 256" in result.stdout


def test_finetune_from_a_converted_checkpoint(tmp_path, tiny_mnist, converted):
    result = run("train.py", "-c", make_config(tmp_path, tiny_mnist, {"trainer.epochs": 1}), "--finetune", converted)
    assert result.returncode == 0, result.stderr
    assert (run_dirs(tmp_path / "saved")[0] / "model_best.pth").is_file()


def test_the_old_project_is_never_imported_even_when_importable(classic, converted):
    result = run(CONVERT, classic / "classic.pth", classic / "again.pth", env={"PYTHONPATH": str(classic / "old")})
    assert result.returncode == 0, result.stderr
    assert not (classic / "old" / "IMPORTED").exists()
    again, first = (torch.load(path, weights_only=True) for path in (classic / "again.pth", converted))
    assert again["config"] == first["config"]


def test_a_checkpoint_that_calls_os_system_is_refused_and_nothing_runs(classic):
    result = run(CONVERT, classic / "hostile.pth", classic / "hostile-new.pth")
    assert result.returncode == 2
    (line,) = converter_lines(result)
    assert line.startswith(f"error: {classic / 'hostile.pth'}: refused: the file calls posix.system('touch ")
    assert not (classic / "MARKER").exists() and not (classic / "hostile-new.pth").exists()


@pytest.mark.parametrize("case", ["missing", "text"])
def test_missing_or_non_checkpoint_file_is_one_line(tmp_path, case):
    old = tmp_path / "old.pth"
    if case == "text":
        old.write_text('{"name": "not a checkpoint"}\n')
    result = run(CONVERT, old, tmp_path / "new.pth")
    assert result.returncode == 2
    (line,) = converter_lines(result)
    expected = "file not found" if case == "missing" else "not a PyTorch checkpoint"
    assert line.startswith(f"error: {old}: {expected}") and "Traceback" not in result.stderr
    assert not (tmp_path / "new.pth").exists()


# ---- in one process: the unpickler and the config mapping ------------------------------------------------
class Calls:
    """Pickles as a call of `fn(*args)`, as a hostile file would."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("fn, args, named", [
    (eval, ("1 + 1",), "builtins.eval"),
    (getattr, ("", "join"), "builtins.getattr"),
    (os.system, ("true",), "posix.system"),
    (subprocess.call, (["true"],), "subprocess.call"),
    (torch.load, ("x.pth",), "torch.serialization.load"),
    (collections.namedtuple, ("T", "a"), "collections.namedtuple"),
])
def test_unpickler_refuses_every_call_but_tensors_and_containers(fn, args, named):
    data = pickle.dumps({"config": [Calls(fn, *args)]}, protocol=2)
    with pytest.raises(convert_classic.Refused, match=re.escape(named)):
        convert_classic.RestrictedUnpickler(io.BytesIO(data)).load()


@pytest.mark.parametrize("zip_format", [True, False])  # False: torch < 1.6's format, used by old classic runs
def test_unpickler_rebuilds_tensors_containers_and_stand_ins(zip_format):
    buffer = io.BytesIO()
    value = {"w": torch.arange(6.0).view(2, 3)[:, 1:], "od": collections.OrderedDict(a={1, 2}), "c": 1j,
             "path": Path("saved/x")}
    torch.save(value, buffer, _use_new_zipfile_serialization=zip_format)
    buffer.seek(0)
    loaded = torch.load(buffer, pickle_module=convert_classic.RESTRICTED_PICKLE, weights_only=False)
    assert torch.equal(loaded["w"], value["w"]) and loaded["od"] == value["od"] and loaded["c"] == 1j
    assert isinstance(loaded["path"], convert_classic.StandIn) and loaded["path"].args == ("saved", "x")


def test_classic_config_converts_to_a_valid_config_here():
    classic = json.loads(CLASSIC_CONFIG.read_text())
    classic["trainer"]["old_only"] = 1
    del classic["trainer"]["monitor"]  # the classic default was 'off'
    config, notes = convert_classic.convert_config(classic)
    assert "trainer.old_only dropped: not a trainer key of this project" in notes
    assert config["trainer"]["monitor"] == "off"
    ConfigParser.from_dict(config, "converted")  # names and arguments all resolve here


def test_dataparallel_prefix_and_already_converted_files(tmp_path):
    weights = collections.OrderedDict((f"module.{k}", v) for k, v in MnistModel().state_dict().items())
    state, notes = convert_classic.convert({"state_dict": weights, "config": json.loads(CLASSIC_CONFIG.read_text())})
    MnistModel().load_state_dict(state["model"])
    assert "state_dict: DataParallel's 'module.' prefix removed" in notes
    torch.save({"version": 1, "model": {}, "config": {}}, tmp_path / "new.pth")
    with pytest.raises(UserError, match="already a checkpoint of this project"):
        convert_classic.load_classic(tmp_path / "new.pth")


# ---- the classic template's own config ------------------------------------------------------------
def test_classic_config_json_trains_without_n_gpu(tmp_path, tiny_mnist):
    config = json.loads(CLASSIC_CONFIG.read_text())
    del config["n_gpu"]
    config["data_loader"]["args"]["data_dir"] = str(tiny_mnist)
    config["trainer"].update(save_dir=str(tmp_path / "saved"), epochs=1)
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run("train.py", "-c", tmp_path / "config.json")
    assert result.returncode == 0, result.stderr
    assert (run_dirs(tmp_path / "saved", "Mnist_LeNet")[0] / "model_best.pth").is_file()
