"""A checkpoint's config is data: it may only name what the project trusts, and never runs other code.

Hostile checkpoints are made from a real one by putting, in each role, a call to `os.system`,
`subprocess.run`, `builtins.exec`, or a class of a module on PYTHONPATH whose import writes a marker.
Every case runs through train.py's and test.py's own `main` (one process for the whole table, as in
test_bad_input.py); a few also run as separate processes. No marker may ever appear.

Last, files whose tensors declare more bytes than they hold, refused before torch.load allocates anything.
"""

import io
import json
import os
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_config, run, run_dirs
from utils import checkpoint
from utils.errors import UserError

ROLES = ["arch", "data_loader", "loss", "metrics", "optimizer", "lr_scheduler"]
ATTACKS = ["os.system", "subprocess.run", "builtins.exec", "module"]
CASES = [f"{role}-{attack}" for role in ROLES for attack in ATTACKS]
REAL = [("test.py", "arch-os.system"), ("train.py", "loss-module"), ("test.py", "metrics-subprocess.run")]


def attack_spec(attack: str, marker: Path, module: str) -> dict:
    """A `{type, args}` entry that, if it were ever called or imported, would create `marker`."""
    if attack == "os.system":
        return {"type": "os.system", "args": {"command": f"touch {marker}"}}
    if attack == "subprocess.run":
        return {"type": "subprocess.run", "args": {"args": ["touch", str(marker)]}}
    if attack == "builtins.exec":
        return {"type": "builtins.exec", "args": {"source": f"open({str(marker)!r}, 'w').close()"}}
    return {"type": f"{module}.Anything", "args": {}}


def hostile_checkpoint(state: dict, case: str, work: Path) -> Path:
    """`state` with one role of its config replaced by the attack `case` names; its module goes to work/modules."""
    role, attack = case.split("-")
    marker, module = work / "markers" / case, f"hostile_{role}_{attack.replace('.', '_')}"
    (work / "modules" / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\n\nclass Anything:\n"
                                                   "    pass\n")
    spec = attack_spec(attack, marker, module)
    if role == "data_loader":  # keep its validation split, so the monitored val_loss still exists
        spec["args"] = {**state["config"]["data_loader"]["args"], **spec["args"]}
    config = {**state["config"], role: [spec] if role == "metrics" else spec}
    path = work / f"{case}.pth"
    torch.save({**state, "config": config}, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_mnist) -> tuple[Path, Path]:
    """(the tiny config, a 1-epoch run's latest.pth)."""
    tmp_path = tmp_path_factory.mktemp("trusted")
    config = make_config(tmp_path, tiny_mnist, {"trainer.epochs": 1, "trainer.tensorboard": False})
    result = run("train.py", "-c", config)
    assert result.returncode == 0, result.stderr
    return config, run_dirs(tmp_path / "saved")[0] / "latest.pth"


@pytest.fixture(scope="module")
def work(tmp_path_factory, trained) -> Path:
    """Every hostile checkpoint, and the modules their configs name."""
    work = tmp_path_factory.mktemp("hostile")
    (work / "markers").mkdir()
    (work / "modules").mkdir()
    state = torch.load(trained[1], weights_only=True)
    for case in CASES:
        hostile_checkpoint(state, case, work)
    return work


def env(work: Path) -> dict:
    """The hostile modules are importable: only the trust rule keeps them out."""
    return {**os.environ, "CI": "true", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(work / "modules")])}


def drive(work: Path, cases: dict[str, tuple[str, list[str]]], watch: list[Path]) -> dict:
    """Run `cases` through test_bad_input.drive (one process): {case: {code, stderr, changed}}."""
    spec = work / "cases.json"
    spec.write_text(json.dumps({"cases": cases, "watch": [str(w) for w in watch]}))
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "test_bad_input.py"), str(spec)], cwd=work,
                            capture_output=True, text=True, timeout=300, env=env(work))
    assert result.returncode == 0, result.stderr
    return json.loads(spec.with_suffix(".out.json").read_text())


@pytest.fixture(scope="module")
def refused(work, trained) -> dict:
    cases = {f"{script} {case}": (script, ["-r", str(work / f"{case}.pth")])
             for case in CASES for script in ("train.py", "test.py")}
    return drive(work, cases, [work, trained[1].parent])


@pytest.mark.parametrize("script", ["train.py", "test.py"])
@pytest.mark.parametrize("case", CASES)
def test_a_hostile_checkpoint_config_is_refused_before_it_runs(case, script, work, refused):
    role, attack = case.split("-")
    result = refused[f"{script} {case}"]
    stderr = result["stderr"]
    assert result["code"] == 2 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    where = "metrics[0].type" if role == "metrics" else f"{role}.type"
    type_name = f"hostile_{role}_{attack.replace('.', '_')}.Anything" if attack == "module" else attack
    for fragment in (f"{work / case}.pth (its config): {where}: '{type_name}'", "-c", "--trust-config"):
        assert fragment in stderr
    assert not (work / "markers" / case).exists()
    assert result["changed"] == []  # nothing written, beside the checkpoint or in its run


def test_no_marker_appeared_and_no_hostile_module_was_imported(work, refused):
    assert len(refused) == 2 * len(CASES)
    assert list((work / "markers").iterdir()) == []
    assert not list((work / "modules").glob("__pycache__"))  # never imported, so never compiled


@pytest.mark.parametrize("script,case", REAL)
def test_real_processes_refuse_the_same(script, case, work, refused):
    result = subprocess.run([sys.executable, str(ROOT / script), "-r", str(work / f"{case}.pth")], cwd=work,
                            capture_output=True, text=True, timeout=120, env=env(work))
    assert (result.returncode, result.stdout, result.stderr) == (2, "", refused[f"{script} {case}"]["stderr"])
    assert not (work / "markers" / case).exists()


def test_trust_config_lets_the_checkpoint_name_any_code_but_kinds_are_still_checked(work, trained, refused):
    """The same checkpoints with --trust-config behave like a config given with -c: a module is imported
    (its marker appears: the tests above would see it), a function runs and its result is checked, and
    what is not of the role's kind is refused before it is called."""
    cases = {case: ("test.py", ["-r", str(work / f"{case}.pth"), "--trust-config"])
             for case in ("arch-module", "arch-subprocess.run", "arch-os.system", "loss-builtins.exec")}
    results = drive(work, cases, [trained[1].parent])
    assert (work / "markers" / "arch-module").exists()
    assert "hostile_arch_module' has no callable 'Anything'" not in results["arch-module"]["stderr"]
    assert "'hostile_arch_module.Anything' is not a model (an nn.Module)" in results["arch-module"]["stderr"]
    assert (work / "markers" / "arch-subprocess.run").exists()
    assert "subprocess.run returned CompletedProcess, not a model (an nn.Module)" in (
        results["arch-subprocess.run"]["stderr"])
    assert not (work / "markers" / "arch-os.system").exists()
    assert "'os.system' is not a model (an nn.Module), nor a function that returns one" in (
        results["arch-os.system"]["stderr"])
    assert not (work / "markers" / "loss-builtins.exec").exists()
    assert "'builtins.exec' is not a function or class" in results["loss-builtins.exec"]["stderr"]
    for case, result in results.items():
        (work / "markers" / case).unlink(missing_ok=True)
        assert result["code"] == 2 and len(result["stderr"].strip().splitlines()) == 1, result["stderr"]


def test_finetune_uses_only_the_weights(tmp_path, work, trained):
    """--finetune from a checkpoint whose config is hostile in every role: only its weights are read."""
    state = torch.load(trained[1], weights_only=True)
    config = dict(state["config"])
    for role in ROLES:
        config[role] = attack_spec("os.system", work / "markers" / "finetune", "")
    torch.save({**state, "config": config}, tmp_path / "poisoned.pth")
    config_file = make_config(tmp_path, json.loads(trained[0].read_text())["data_loader"]["args"]["data_dir"],
                              {"trainer.epochs": 1, "trainer.tensorboard": False})
    result = run("train.py", "-c", config_file, "--finetune", tmp_path / "poisoned.pth")
    assert result.returncode == 0, result.stderr
    assert not (work / "markers" / "finetune").exists()
    weights = torch.load(run_dirs(tmp_path / "saved")[0] / "latest.pth", weights_only=True)["model"]
    assert not torch.equal(weights["fc2.weight"], state["model"]["fc2.weight"])  # trained on from them


def test_shipped_configs_resolve_within_what_a_checkpoint_may_name():
    """So `test.py -r` on their checkpoints needs no flag (image_folder names torchvision.models.resnet18)."""
    from config.files import load_file
    from config.parser import ConfigParser

    for path in sorted((ROOT / "configs").glob("*.*")):
        ConfigParser.from_dict(load_file(path), f"{path} (its config)", restricted=True)


# ---- declared tensor sizes against the file ------------------------------------------------------------------
MARK = 12345  # the numel of the tensor whose record is rewritten


def oversized_checkpoint(state: dict, path: Path, nbytes: int, compressed: bool) -> None:
    """`state` and a uint8 tensor that declares `nbytes`; its record is `nbytes` of zeros compressed (torch.load
    would inflate them all), or is left at MARK bytes."""
    buffer = io.BytesIO()
    torch.save({**state, "padding": torch.zeros(MARK, dtype=torch.uint8)}, buffer)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w") as out:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/data.pkl"):  # the storage's numel, just before the end of its tuple
                assert data.count(b"M" + struct.pack("<H", MARK) + b"t") == 1
                data = data.replace(b"M" + struct.pack("<H", MARK) + b"t", b"J" + struct.pack("<i", nbytes) + b"t")
            if info.file_size == MARK and compressed:
                record = zipfile.ZipInfo(info.filename)
                record.compress_type, chunk = zipfile.ZIP_DEFLATED, bytes(1 << 24)
                with out.open(record, "w", force_zip64=True) as f:
                    for _ in range(nbytes // len(chunk)):
                        f.write(chunk)
                continue
            out.writestr(info.filename, data)


@pytest.mark.quick
@pytest.mark.parametrize("compressed", [False, True])
def test_declared_sizes_beyond_the_file_are_refused_before_loading(tmp_path, compressed):
    path = tmp_path / "oversized.pth"
    oversized_checkpoint({"model": {}, "config": {}}, path, 1 << 25, compressed)
    assert path.stat().st_size < 1 << 16
    expected = (r"record \S+ declares 33,554,432 bytes \(" if compressed
                else "tensor data/0 declares 33,554,432 bytes, and the file holds 12,345")
    with pytest.raises(UserError, match=f"{path}: not a loadable checkpoint: its {expected}"):
        checkpoint.load(path)


@pytest.mark.quick
def test_legacy_format_is_refused_and_real_checkpoints_still_load(tmp_path):
    """Views, shared storages, empty tensors and every element size load as saved."""
    base = torch.arange(24, dtype=torch.float64)
    state = {"model": {"view": base[3:9].view(2, 3), "same": base, "t": base.t() if base.dim() == 2 else base[::2],
                       "empty": torch.zeros(0), "bf16": torch.ones(5, dtype=torch.bfloat16),
                       "complex": torch.ones(3, dtype=torch.complex64), "bool": torch.ones(2, dtype=torch.bool)},
             "config": {}}
    torch.save(state, tmp_path / "good.pth")
    loaded = checkpoint.load(tmp_path / "good.pth")
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value) and loaded["model"][key].dtype == value.dtype
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(UserError, match="legacy format .* cannot be checked before loading"):
        checkpoint.load(tmp_path / "legacy.pth")


@pytest.fixture(scope="module")
def inflating(tmp_path_factory, trained) -> Path:
    """The trained checkpoint with 1 GiB of compressed zeros in a record (the file: about 1 MB)."""
    path = tmp_path_factory.mktemp("inflating") / "inflating.pth"
    oversized_checkpoint(torch.load(trained[1], weights_only=True), path, 1 << 30, compressed=True)
    return path


@pytest.mark.parametrize("script", ["test.py", "train.py"])
def test_a_small_file_declaring_a_gigabyte_is_refused_at_once_without_the_memory(script, inflating):
    """The process's peak RSS (os.wait4) stays below the GiB the file declares; torch.load would inflate it."""
    assert inflating.stat().st_size < 4 << 20
    with open(inflating.with_suffix(".err"), "w+") as err:
        began = time.monotonic()
        process = subprocess.Popen([sys.executable, str(ROOT / script), "-r", str(inflating)], cwd=inflating.parent,
                                   stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "CI": "true"})
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.monotonic() - began
        err.seek(0)
        stderr = err.read()
    assert os.waitstatus_to_exitcode(status) == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert f"{inflating}: not a loadable checkpoint: its record " in stderr and "1,073,741,824 bytes" in stderr
    assert usage.ru_maxrss * 1024 < 1 << 30, usage.ru_maxrss  # kilobytes on Linux
    assert seconds < 120
