"""A checkpoint's config is data: it may only name what the project trusts, and never runs other code.

Hostile checkpoints are made from a real one by putting, in each role, a call to `os.system`,
`subprocess.run`, `builtins.exec`, or a class of a module on PYTHONPATH whose import writes a marker.
Every case runs through train.py's and test.py's own `main` (one process for the whole table, as in
test_bad_input.py); a few also run as separate processes. No marker may ever appear.

Then helpers that merely live in torch or torchvision and write files (torch.save, download helpers ...), for
every role that may hold a function: refused for the whole matrix in one process, and one real process each.
Last, files whose tensors declare more bytes than they hold, refused before torch.load allocates anything.
"""

import io
import json
import os
import struct
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
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


# ---- trust by role and kind: helpers that merely live in torch or torchvision -------------------------------
# Functions of torch and torchvision that write files where their args say ({target}: a folder of the test),
# or change tensors in place; a checkpoint's config may name none of them, for any role.
WRITERS = {
    "torch.save": {"obj": [1], "f": "{target}/torch.save.pth"},
    "torch.hub.download_url_to_file": {"url": "data:,%23hostile", "dst": "{site}", "progress": False},
    "torchvision.datasets.utils.download_url": {"url": "data:,x", "root": "{target}", "filename": "download_url"},
    "torchvision.datasets.utils.download_and_extract_archive": {"url": "data:,x", "download_root": "{target}"},
    "torchvision.utils.save_image": {"tensor": [[0.5]], "fp": "{target}/image.png"},
    "torch.onnx.export": {"model": None, "args": [], "f": "{target}/model.onnx"},
    "torch.jit.save": {"m": None, "f": "{target}/model.pt"},
    "torch.nn.init.xavier_uniform_": {"tensor": [[0.0]]},
}
SITE_PTH = Path(sysconfig.get_paths()["purelib"]) / f"zz_hostile_{os.getpid()}.pth"  # Python runs a .pth at start


def roles_that_take_a_function() -> list[str]:
    """Every role for which a config given with -c may name a plain function (the kind check alone lets it in)."""
    from config.resolve import ROLE_MODULES, kind_problem

    return [role for role in ROLE_MODULES if kind_problem(role, torch.save) is None]


def writer_args(name: str, target: Path) -> dict:
    return json.loads(json.dumps(WRITERS[name]).replace("{target}", str(target)).replace("{site}", str(SITE_PTH)))


def with_function(config: dict, role: str, name: str, args: dict) -> tuple[dict, str]:
    """`config` with `name(**args)` in `role`, and the key its error names."""
    spec, loader = {"type": name, "args": args}, {"type": "TorchvisionDataLoader", "args": {"dataset": "FakeData"}}
    if role == "metrics":
        return {**config, "metrics": [spec]}, "metrics[0].type"
    if role == "dataset":
        loader["args"] = {"dataset": name, "dataset_args": args}
        return {**config, "data_loader": loader}, "data_loader.args.dataset"
    if role == "transform":
        loader["args"]["transforms"] = {"train": [spec]}
        return {**config, "data_loader": loader}, "data_loader.args.transforms.train[0].type"
    return {**config, role: spec}, f"{role}.type"


@pytest.mark.quick
def test_roles_that_take_a_function_are_all_covered():
    assert set(roles_that_take_a_function()) == {"arch", "data_loader", "loss", "metrics", "optimizer", "lr_scheduler",
                                                 "dataset", "transform"}


@pytest.mark.quick
@pytest.mark.parametrize("name", WRITERS)
def test_no_role_takes_a_torch_helper_from_a_checkpoint(name):
    """The full matrix in one process: each helper, for each role that may hold a function, passes the kind
    check of a config given with -c (so only the trust rule stops it), and a checkpoint's config is refused."""
    from config.resolve import TRUST_HINT, resolve

    for role in roles_that_take_a_function():
        assert resolve(role, name, "key", restricted=False) is not None
        with pytest.raises(UserError) as refused:
            resolve(role, name, "key", restricted=True)
        message = str(refused.value)
        assert message.startswith(f"key: '{name}' is not trusted in a checkpoint's config: ") and TRUST_HINT in message
        assert f"{role} may name only: " in message and "\n" not in message


@pytest.mark.quick
def test_the_helpers_write_files_when_called(tmp_path):
    """Proof that the hostile args are live: called as a config given with -c would call them, they write."""
    from config.resolve import resolve

    for name in ("torch.save", "torchvision.datasets.utils.download_url"):
        try:
            resolve("arch", name, "arch.type")(**writer_args(name, tmp_path))
        except AttributeError:  # download_url: after it has opened its file, tqdm fails on a data: response
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["download_url", "torch.save.pth"]


@pytest.mark.quick
def test_a_checkpoint_may_still_name_what_each_role_is_for():
    from config.resolve import resolve

    for role, name in [("arch", "torchvision.models.resnet18"), ("arch", "torch.nn.Linear"), ("arch", "model.vae.VAE"),
                       ("loss", "CrossEntropyLoss"), ("loss", "model.vae.VAELoss"), ("loss", "nll_loss"),
                       ("metrics", "accuracy"), ("optimizer", "torch.optim.SGD"), ("lr_scheduler", "ReduceLROnPlateau"),
                       ("dataset", "CIFAR10"), ("transform", "torchvision.transforms.Normalize"),
                       ("transform", "RandomCrop"), ("trainer", "GanTrainer"), ("data_loader", "MnistDataLoader")]:
        resolve(role, name, "key", restricted=True)
    for role, name in [("loss", "torch.nn.functional.cross_entropy"), ("metrics", "model.loss.nll_loss"),
                       ("arch", "torchvision.models.get_model"), ("dataset", "data_loader.datasets.write_idx"),
                       ("transform", "torchvision.transforms.functional.to_pil_image")]:
        with pytest.raises(UserError, match="is not trusted in a checkpoint's config"):
            resolve(role, name, "key", restricted=True)


def test_a_checkpoints_config_never_downloads(tmp_path, tiny_mnist):
    """download: true in a checkpoint's data loader (or its dataset_args) is read as false: missing files are
    the usual one line, and nothing is fetched or created."""
    from config.parser import ConfigParser

    raw = json.loads(make_config(tmp_path, tmp_path / "data", {"data_loader.args.download": True}).read_text())
    args = {"dataset": "MNIST", "data_dir": str(tmp_path / "data"), "dataset_args": {"download": True},
            "validation_split": 128}
    torchvision_mnist = {"type": "TorchvisionDataLoader", "args": args}
    for config in (raw, {**raw, "data_loader": torchvision_mnist}):
        parser = ConfigParser.from_dict(config, "ckpt", restricted=True)
        with pytest.raises(UserError, match="MNIST files not found"):
            parser.build_data_loader(torch.device("cpu"), test=True)
        assert list(tmp_path.iterdir()) == [tmp_path / "config.json"]


@pytest.fixture(scope="module")
def writers(tmp_path_factory, trained) -> Iterator[tuple[Path, dict]]:
    """One hostile checkpoint per helper, each in a role of its own (all roles covered), and its script."""
    work = tmp_path_factory.mktemp("writers")
    (work / "target").mkdir()
    state = torch.load(trained[1], weights_only=True)
    roles, scripts = roles_that_take_a_function(), ["test.py", "train.py", "predict.py"]
    cases = {}
    for i, name in enumerate(WRITERS):
        config, where = with_function(state["config"], roles[i % len(roles)], name, writer_args(name, work / "target"))
        torch.save({**state, "config": config}, work / f"{name}.pth")
        cases[name] = (scripts[i % len(scripts)], where)
    yield work, cases
    SITE_PTH.unlink(missing_ok=True)  # only if a test failed


@pytest.mark.parametrize("name", WRITERS)
def test_real_processes_refuse_a_checkpoint_naming_a_torch_helper(name, writers, trained):
    work, cases = writers
    script, where = cases[name]
    runs = trained[1].parent.parent  # train.py would start a new run here
    before = sorted(work.iterdir()), sorted(runs.rglob("*"))
    result = subprocess.run([sys.executable, str(ROOT / script), "-r", str(work / f"{name}.pth")], cwd=work,
                            capture_output=True, text=True, timeout=180, env={**os.environ, "CI": "true"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{work / name}.pth (its config): {where}: '{name}' is not trusted in a checkpoint's config" in result.stderr
    assert list((work / "target").iterdir()) == [] and not SITE_PTH.exists()
    assert (sorted(work.iterdir()), sorted(runs.rglob("*"))) == before


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
    """The process's peak RSS stays below the GiB the file declares; torch.load would inflate it. It is measured by a
    small Python in between: a process forked from pytest itself would count pytest's own memory as its peak."""
    assert inflating.stat().st_size < 4 << 20
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, sys.executable, str(ROOT / script), "-r", str(inflating)],
                          cwd=inflating.parent, capture_output=True, text=True, env={**os.environ, "CI": "true"})
    seconds = time.monotonic() - began
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    stderr = done.stderr
    assert f"{inflating}: not a loadable checkpoint: its record " in stderr and "1,073,741,824 bytes" in stderr
    assert int(done.stdout) * 1024 < 1 << 30, done.stdout  # kilobytes on Linux
    assert seconds < 120


# Runs argv[1:] and prints its peak RSS in kilobytes (RUSAGE_CHILDREN), exiting with its code.
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
