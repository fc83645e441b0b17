"""Bad values for every script's flags and every config key (wrong type, empty, huge, negative, a folder for a
file, a file for a folder, a missing file, a damaged checkpoint): one line on stderr, a non-zero exit, no
traceback, and not one file changed (names, sizes, times and SHA-256 of a prepared workspace and run directory).

The matrix runs in one helper process (this file's `__main__`), each case through its script's own `main` and
`utils.cli.run_main`, as a real process does; a sample of each script also runs as a real process, and Ctrl-C
during predict.py and export.py is sent to real ones."""

import contextlib
import copy
import hashlib
import importlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

import pytest
import torch

from config.parser import entries_of, with_defaults
from config.resolve import resolve
from config.schema import INJECTED, TOP_LEVEL, TRAINER, signature_params
from conftest import ROOT, make_config, run, run_dirs, write_image_folder
from utils.cli import run_main

ENV = {"CI": "true", "OMP_NUM_THREADS": "1"}
HUGE = "1" + "0" * 30  # no int64 holds it
# Bad values by the kind of a key's default (as --set writes them: YAML). Each must be refused for every key of
# that kind, except the pairs in ACCEPTED.
BAD = {
    int: ["abc", "", "-1", "1.5", "1e999", HUGE, "[]", "{}"],
    float: ["abc", "", "-1", "1e999", ".nan", "[]", HUGE],
    bool: ["abc", "", "2", "[]"],
    str: ["", "[]", "{a: 1}", "-1", "1e999"],
    list: ["abc", "", "{}", "-1"],
    dict: ["abc", "", "[]", "-1"],
    type(None): ["abc", "-1", "[]", "1e999"],
}
DEPRECATED = ("size_average", "reduce")  # torch's deprecated loss arguments: any value is taken, with a warning


# ---- the config keys ----------------------------------------------------------------------------------------
def config_keys(raw: dict, source: str) -> dict[str, object]:
    """Every key a config may hold, dotted, with its value or default: the top-level and trainer keys (defaults
    filled in), the keys of every mapping, and every argument a `{type, args}` entry's callee takes."""
    config = with_defaults(raw, source)
    keys = dict(walk(config))
    for role in ("arch", "data_loader", "optimizer", "loss", "lr_scheduler"):
        for where, spec in entries_of(role, config[role]).values():
            if isinstance(spec, dict):
                params = signature_params(resolve(role, spec["type"], where))
                for name, param in params.items():
                    if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and \
                            name not in INJECTED.get(role, ()) and param.default is not param.empty and \
                            name not in DEPRECATED:
                        keys.setdefault(f"{where}.args.{name}", param.default)
    return keys


def walk(config: dict, prefix: str = ""):
    for key, value in config.items():
        yield prefix + key, value
        if isinstance(value, dict):
            yield from walk(value, f"{prefix}{key}.")


def bad_values(key: str, value: object) -> list[str]:
    kind = bool if isinstance(value, bool) else type(value) if type(value) in BAD else str
    values = list(BAD[kind])
    if key.endswith(("data_dir", "save_dir")):
        values += ["{work}/notes.txt", "{work}/notes.txt/sub"] + (["{work}/missing"] if "data_dir" in key else [])
    return values


# ---- the workspace ------------------------------------------------------------------------------------------
def damaged_checkpoints(state: dict) -> dict[str, dict]:
    """A checkpoint's fields given values of the wrong type or out of range."""
    changes = {"epoch": "x", "config": [1], "model": torch.zeros(3), "optimizer": "x", "rng": "x",
               "global_step": 1.5, "monitor_best": "x", "classes": "x", "data_values": [1], "arch": 5,
               "version": "1", "batch_in_epoch": -1, "not_improved_count": -3, "train_tracker": "x",
               "lr_scheduler": "x", "criterion": "x", "monitor": 5, "data": "x", "finetuned_from": [1]}
    states = {f"{key}_wrong": {**state, key: value} for key, value in changes.items()}
    states["model_of_strings"] = {**state, "model": {name: "x" for name in state["model"]}}
    states["model_empty"] = {**state, "model": {}}
    states["config_empty"] = {**state, "config": {}}
    states["config_arch_list"] = {**state, "config": {**state["config"], "arch": [1]}}
    states["epoch_negative"] = {**state, "epoch": -1}
    states["state_dict_only"] = {"state_dict": torch.zeros(3)}
    return states


def make_workspace(work: Path, data_dir: Path) -> None:
    """config.json (the tiny config, one short epoch), a finished run of it in saved/, shipped configs made to
    run here (ship_*.json), damaged checkpoints (bad/*.pth) and odd paths (odd/)."""
    overrides = {"trainer.epochs": 1, "trainer.len_epoch": 4, "trainer.tensorboard": False,
                 "lr_scheduler": {"type": "StepLR", "args": {"step_size": 1}}}
    config = make_config(work, data_dir, overrides)
    result = run("train.py", "-c", config, env=ENV)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(work / "saved")
    write_image_folder(work / "images", counts=(8, 4), size=(32, 32))
    for path in sorted((ROOT / "configs").glob("*.json")):
        (work / f"ship_{path.name}").write_text(json.dumps(localized(json.loads(path.read_text()), work, data_dir)))
    (work / "bad").mkdir()
    state = torch.load(run_dir / "latest.pth", weights_only=True)
    state["config"]["trainer"]["epochs"] = 2  # not finished: a resume would train
    for name, damaged in damaged_checkpoints(state).items():
        torch.save(damaged, work / "bad" / f"{name}.pth")
    odd = work / "odd"
    (odd / "folder").mkdir(parents=True)
    (odd / "empty.pth").write_bytes(b"")
    (odd / "notes.txt").write_text("not a checkpoint\n")
    data = (run_dir / "latest.pth").read_bytes()
    (odd / "truncated.pth").write_bytes(data[: len(data) // 2])
    (odd / "loop.pth").symlink_to("loop.pth")
    os.mkfifo(odd / "fifo.pth")
    (work / "notes.txt").write_text("a file, not a folder\n")
    (odd / "digits.json").write_text(config.read_text().replace('"seed": 1', '"seed": 1' + "0" * 5000))
    (odd / "nan.json").write_text(config.read_text().replace('"seed": 1', '"seed": NaN'))
    write_classic(work / "classic.pth", state["model"])


def write_classic(path: Path, weights: dict) -> None:
    """A classic pytorch-template checkpoint: it pickles a parse_config.ConfigParser (a stand-in here)."""
    parser = type("ConfigParser", (), {"__module__": "parse_config"})
    sys.modules["parse_config"] = types.SimpleNamespace(ConfigParser=parser)
    try:
        config = parser()
        config._config = json.loads((ROOT / "tests" / "fixtures" / "classic_config.json").read_text())
        torch.save({"arch": "MnistModel", "epoch": 1, "state_dict": weights, "config": config}, path)
    finally:
        del sys.modules["parse_config"]


def localized(config: dict, work: Path, data_dir: Path) -> dict:
    """A shipped config made to run here in a second: the tiny MNIST, FakeData for a torchvision dataset, the
    small image folder; one epoch; runs in work/saved."""
    config = copy.deepcopy(config)
    args = config["data_loader"]["args"]
    if config["data_loader"]["type"] == "MnistDataLoader":
        args.update(data_dir=str(data_dir), download=False)
    elif config["data_loader"]["type"] == "TorchvisionDataLoader":
        args.update(dataset="FakeData", dataset_args={"size": 64, "image_size": [3, 32, 32]}, validation_split=16,
                    num_workers=0, persistent_workers=False, batch_size=16)
    else:
        args.update(data_dir=str(work / "images"), image_size=32, num_workers=0, batch_size=4, validation_split=4)
    config["trainer"].update(save_dir=str(work / "saved"), epochs=1, tensorboard=False)
    return config


# ---- the cases ----------------------------------------------------------------------------------------------
# Paths that are not what a flag wants: a folder, an empty file, a text file, a cut zip, a missing file, '..' to
# a missing file, a symlink loop, a FIFO (reading it would wait forever).
ODD_FILES = ["{work}/odd/folder", "{work}/odd/empty.pth", "{work}/odd/notes.txt", "{work}/odd/truncated.pth",
             "{work}/odd/missing.pth", "{work}/odd/folder/../missing.pth", "{work}/odd/loop.pth",
             "{work}/odd/fifo.pth", ""]
WRITABLE = ("{work}/odd/folder", "{work}/odd/missing.pth", "{work}/odd/folder/../missing.pth")  # for new output
SET_VALUES = ["trainer.epochs=abc", "trainer.epochs=-1", "trainer.epochs=1e999", "trainer.epochs=", "=", "=1",
              "a..b=1", ".a=1", "a.=1", "nokey=1", "trainer.nokey=1", "trainer=", "trainer=5", "arch=[]",
              "trainer.epochs.x=1", "data_loader.args.batch_size=abc", "vars.x.y=1", HUGE,
              "trainer.epochs=" + "9" * 5000, "trainer.epochs=" + HUGE, "trainer.grad_clip=.nan"]
DEVICES = ["", "gpu", "cuda:99", "-1", "cpu:abc", "cuda:-1", "meta", "cpu,cuda", HUGE]
INTEGERS, NUMBERS = ["abc", "", "-1", "0", "1.5", HUGE], ["abc", "", "-1", "nan", "inf", "1e999"]


def script_cases() -> dict[str, tuple[str, list[str]]]:
    """Every flag of every script with bad values: {case: (script, argv)}."""
    cases = {}
    for script, needs in {"train.py": ["-c", "{config}"], "test.py": ["-r", "{ckpt}"],
                          "predict.py": ["-r", "{ckpt}"], "export.py": ["-r", "{ckpt}", "--format", "exported"],
                          "lr_find.py": ["-c", "{config}", "--steps", "2"]}.items():
        for value in SET_VALUES:
            cases[f"{script} --set {value}"] = (script, [*needs, "--set", value])
        for value in DEVICES:
            cases[f"{script} -d {value!r}"] = (script, [*needs, "-d", value])
        for value in INTEGERS:
            cases[f"{script} --bs {value!r}"] = (script, [*needs, "--bs", value])
        for path in ODD_FILES:
            cases[f"{script} -c {path}"] = (script, [*needs, "-c", path])
    for script in ("train.py", "test.py", "predict.py", "export.py"):
        extra = ["--format", "exported"] if script == "export.py" else []
        for path in [*ODD_FILES, "{work}/empty_run"]:
            cases[f"{script} -r {path}"] = (script, ["-r", path, *extra])
        for path in sorted(damaged_checkpoints({"model": {}, "config": {}})):
            cases[f"{script} -r bad/{path}"] = (script, ["-r", f"{{work}}/bad/{path}.pth", *extra])
    for flag in ("--epochs", "--folds"):
        for value in INTEGERS:
            if (flag, value) != ("--folds", "0"):  # 0: no k-fold
                cases[f"train.py {flag} {value!r}"] = ("train.py", ["-c", "{config}", flag, value])
    for value in NUMBERS:
        cases[f"train.py --lr {value!r}"] = ("train.py", ["-c", "{config}", "--lr", value])
        for flag in ("--start", "--end"):
            cases[f"lr_find.py {flag} {value!r}"] = ("lr_find.py", ["-c", "{config}", "--steps", "2", flag, value])
    for value in INTEGERS:
        cases[f"lr_find.py --steps {value!r}"] = ("lr_find.py", ["-c", "{config}", "--steps", value])
        cases[f"predict.py --topk {value!r}"] = ("predict.py", ["-r", "{ckpt}", "--topk", value])
    for path in [*ODD_FILES, "{work}/notes.txt/sub", "{run}"]:
        cases[f"train.py --finetune {path}"] = ("train.py", ["-c", "{config}", "--finetune", path])
        if path != "{work}/odd/folder":  # an empty folder: a run directory
            cases[f"train.py --run-dir {path}"] = ("train.py", ["-c", "{config}", "--run-dir", path])
        if path not in WRITABLE:
            cases[f"lr_find.py --out {path}"] = ("lr_find.py", ["-c", "{config}", "--steps", "2", "--out", path])
            cases[f"new_project.py {path}"] = ("new_project.py", [path])
            cases[f"convert new {path}"] = ("scripts/convert_classic_checkpoint.py", ["{work}/classic.pth", path])
        cases[f"predict.py input {path}"] = ("predict.py", ["-r", "{ckpt}", path])
        for script in ("predict.py", "export.py"):
            extra = ["--format", "exported"] if script == "export.py" else []
            cases[f"{script} -o {path}"] = (script, ["-r", "{ckpt}", *extra, "-o", path])
        cases[f"convert old {path}"] = ("scripts/convert_classic_checkpoint.py", [path, "{work}/odd/new.pth"])
        cases[f"make_mnist_subset src {path}"] = ("scripts/make_mnist_subset.py", [path, "{work}/odd/subset"])
    space = "sweep={optimizer.args.lr: {float: [0.001, 0.01]}}"
    for value in INTEGERS:
        cases[f"sweep.py --trials {value!r}"] = ("sweep.py", ["-c", "{config}", "--set", space, "--trials", value])
    for value in ["", "abc", "sqlite:///{work}/notes.txt/sub/study.db", "postgresql://u@127.0.0.1:1/db"]:
        cases[f"sweep.py --storage {value!r}"] = ("sweep.py", ["-c", "{config}", "--set", space, "--trials", "1",
                                                              "--storage", value])
    for value in ["sweep={}", "sweep={optimizer.args.lr: {float: [1, 0]}}", "sweep={nokey: {choice: [1]}}",
                  "sweep=[]", "trainer.monitor=off"]:
        cases[f"sweep.py --set {value}"] = ("sweep.py", ["-c", "{config}", "--set", space, "--set", value,
                                                        "--trials", "1"])
    for value in ["", "abc"]:
        cases[f"sweep.py --pruner {value!r}"] = ("sweep.py", ["-c", "{config}", "--set", space, "--trials", "1",
                                                             "--pruner", value])
    for path in ODD_FILES:
        cases[f"sweep.py -c {path}"] = ("sweep.py", ["-c", path, "--trials", "1"])
    for value in ["", "abc", "ONNX"]:
        cases[f"export.py --format {value!r}"] = ("export.py", ["-r", "{ckpt}", "--format", value])
    cases["new_project.py {work}"] = ("new_project.py", ["{work}"])
    cases["make_mnist_subset out a file"] = ("scripts/make_mnist_subset.py",
                                             [f"{ROOT}/data/mnist_small/MNIST/raw", "{work}/notes.txt"])
    cases["convert new is old"] = ("scripts/convert_classic_checkpoint.py", ["{work}/classic.pth"] * 2)
    cases["train.py -r auto -c odd"] = ("train.py", ["-r", "auto", "-c", "{work}/odd/folder"])
    for name in ("digits.json", "nan.json"):
        cases[f"train.py -c odd/{name}"] = ("train.py", ["-c", f"{{work}}/odd/{name}"])
    return cases


def key_cases(work: Path) -> dict[str, tuple[str, list[str]]]:
    """Every key of the tiny config and of each shipped config (made to run here) with the bad values of its
    kind, as `train.py -c <config> --set key=value`: {case: (script, argv)}."""
    cases = {}
    for config in [work / "config.json", *sorted(work.glob("ship_*.json"))]:
        for key, value in config_keys(json.loads(config.read_text()), str(config)).items():
            for bad in bad_values(key, value):
                case = f"{key}={bad}"
                if case not in cases and case not in ACCEPTED:
                    cases[case] = ("train.py", ["-c", str(config), "--set", case])
    for name, items in LIST_ITEMS.items():  # entries of lists: the whole list set
        for case in items:
            cases[case] = ("train.py", ["-c", str(work / name), "--set", case])
    return cases


LIST_ITEMS = {
    "config.json": ["metrics=[{type: top_k_acc, args: {k: -1}}]", "metrics=[{type: top_k_acc, args: {k: abc}}]",
                    "metrics=[5]", "metrics=[{}]"],
    "ship_cifar10.json": ["data_loader.args.transforms.train=[{type: RandomCrop, args: {size: -1}}]",
                          "data_loader.args.transforms.train=[{type: Normalize, args: {mean: abc, std: 1}}]",
                          "data_loader.args.transforms.eval=[5]", "data_loader.args.dataset_args.image_size=[-1, 2]"]}


# Values the callee itself takes, of arguments the config leaves to it (torch's, or an option this config does
# not use), and an empty save_dir (the current folder): not the config's to refuse, so not run here.
ACCEPTED = {"seed=-1", "trainer.save_dir=", "optimizer.args.weight_decay=1.5",
            "optimizer.generator.args.weight_decay=1.5", "optimizer.discriminator.args.weight_decay=1.5",
            "lr_scheduler.args.step_size=-1", "lr_scheduler.args.gamma=-1", "lr_scheduler.args.last_epoch=-1",
            "lr_scheduler.args.T_max=-1", "lr_scheduler.args.eta_min=-1", "loss.args.label_smoothing=-1",
            "loss.args.ignore_index=-1", "loss.args.gamma=-1", "data_loader.args.prefetch_factor=-1",
            "data_loader.args.fold=-1", "data_loader.args.mean=[]", "data_loader.args.std=[]", "arch.args.weights=[]",
            "tracking.args.uri=abc", "tracking.args.experiment=abc"}  # a store in folder abc; an experiment's name


def fill(arg: str, paths: dict[str, Path]) -> str:
    """`arg` with its {work}, {config}, ... placeholders replaced (a YAML value's own braces stay)."""
    for name, path in paths.items():
        arg = arg.replace(f"{{{name}}}", str(path))
    return arg


# ---- the helper process -------------------------------------------------------------------------------------
def stats(folders: list[Path]) -> dict[str, tuple[int, int]]:
    """Every entry's (mtime, size), symlinks as themselves (a loop has no target)."""
    return {str(p): (p.lstat().st_mtime_ns, p.lstat().st_size) for folder in folders for p in folder.rglob("*")}


def digests(folders: list[Path]) -> dict[str, str]:
    """Every regular file's SHA-256 (a FIFO or symlink is not read)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for folder in folders for p in folder.rglob("*")
            if p.is_file() and not p.is_symlink()}


class Hung(Exception):
    pass


def on_alarm(signum, frame):
    raise Hung()


def drive(cases_file: str) -> None:
    """Run each case's main in this process (cwd: the workspace); write {case: {code, stderr, changed}} and the
    SHA-256 of every watched file before and after all cases next to the cases."""
    spec = json.loads(Path(cases_file).read_text())
    watched = [Path(p) for p in spec["watch"]]
    results, hashed = {}, digests(watched)
    signal.signal(signal.SIGALRM, on_alarm)
    for case, (script, argv) in spec["cases"].items():
        module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
        before, err = stats(watched), io.StringIO()
        sys.argv = [script, *argv]
        code = None
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            signal.alarm(20)
            try:
                run_main(lambda: module.main(argv))  # noqa: B023 - called at once
            except SystemExit as e:
                code = e.code
            except Hung:
                print("hung for 20 s", file=sys.stderr)
            except BaseException:  # what a real process would print as a traceback
                traceback.print_exc()
            finally:
                signal.alarm(0)
        for handler in logging.getLogger().handlers[:]:  # a run that started logs to its train.log: close it
            handler.close()
            logging.getLogger().removeHandler(handler)
        after = stats(watched)
        results[case] = {"code": code, "stderr": err.getvalue(),
                         "changed": sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))}
    Path(cases_file).with_suffix(".out.json").write_text(json.dumps(
        {"results": results, "sha256": [hashed, digests(watched)]}))


# ---- tests --------------------------------------------------------------------------------------------------
# One or two bad values of each script as real processes, to show the in-process answer is the real one.
REAL = ["trainer.len_epoch=" + HUGE, "test.py -r {work}/odd/truncated.pth", "predict.py --topk '0'",
        "export.py -r bad/config_wrong", "lr_find.py --out {run}", "new_project.py {work}/odd/loop.pth",
        "convert old {work}/odd/fifo.pth", "make_mnist_subset src {work}/odd/folder"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_mnist) -> dict[str, Path]:
    """The placeholders' paths: the workspace, its config, its finished run and that run's best checkpoint."""
    work = tmp_path_factory.mktemp("values") / "work"
    work.mkdir()
    make_workspace(work, tiny_mnist)
    (run_dir,) = run_dirs(work / "saved")
    return {"work": work, "config": work / "config.json", "run": run_dir, "ckpt": run_dir / "model_best.pth",
            "data": tiny_mnist}


@pytest.fixture(scope="module")
def matrix(workspace) -> tuple[dict, dict, list]:
    """(cases with their paths filled in, {case: result}, SHA-256 of every watched file before and after)."""
    work = workspace["work"]
    cases = {case: (script, [fill(arg, workspace) for arg in argv])
             for case, (script, argv) in {**script_cases(), **key_cases(work)}.items()}
    spec = work.parent / "cases.json"
    spec.write_text(json.dumps({"cases": cases, "watch": [str(work), str(workspace["data"])]}))
    result = subprocess.run([sys.executable, __file__, str(spec)], cwd=work, capture_output=True, text=True,
                            timeout=600, env={**os.environ, **ENV, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(spec.with_suffix(".out.json").read_text())
    return cases, out["results"], out["sha256"]


def problem(result: dict) -> str | None:
    """What is wrong with a case's answer, or None: one line on stderr, no traceback, non-zero exit, no change."""
    lines = result["stderr"].strip().splitlines()
    if "Traceback" in result["stderr"] or len(lines) != 1:
        return f"{len(lines)} lines on stderr, ending {lines[-1][:200] if lines else ''!r}"
    if result["code"] in (0, None):
        return f"exit code {result['code']}"
    if result["changed"]:
        return f"changed {result['changed'][:3]}"
    return None


def test_every_flag_and_every_key_is_covered(matrix):
    cases, _, _ = matrix
    scripts = {script for script, _ in cases.values()}
    assert scripts == {"train.py", "test.py", "predict.py", "export.py", "lr_find.py", "new_project.py", "sweep.py",
                       "scripts/convert_classic_checkpoint.py", "scripts/make_mnist_subset.py"}
    keys = {case.partition("=")[0] for case in cases}
    assert {*TOP_LEVEL, *(f"trainer.{key}" for key in TRAINER), "trainer.samples", "data_loader.args.transforms",
            "data_loader.args.image_size", "loss.args.gamma", "optimizer.args.betas"} <= keys
    assert len(cases) > 1000 and set(REAL) <= set(cases)


def test_every_bad_value_is_one_line_and_changes_no_file(matrix):
    cases, results, (before, after) = matrix
    failures = [f"{case[:100]}: {issue}" for case in cases if (issue := problem(results[case]))]
    assert not failures, f"{len(failures)} of {len(cases)}:\n" + "\n".join(failures[:60])
    assert before == after  # the SHA-256 of every file of the workspace, its run and the data


@pytest.fixture(scope="module")
def real_runs(matrix, workspace) -> dict[str, tuple[int, str]]:
    """The REAL cases as processes of their own, started together: {case: (exit code, stderr)}."""
    cases, _, _ = matrix
    procs = {case: subprocess.Popen([sys.executable, str(ROOT / cases[case][0]), *cases[case][1]],
                                    cwd=workspace["work"], text=True, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, env={**os.environ, **ENV}) for case in REAL}
    return {case: (proc.wait(timeout=300), proc.stderr.read()) for case, proc in procs.items()}


@pytest.mark.parametrize("case", REAL)
def test_real_processes_answer_the_same(case, matrix, real_runs):
    _, results, _ = matrix
    assert real_runs[case] == (results[case]["code"], results[case]["stderr"])


def reached(proc: subprocess.Popen, call: int, marker: Path) -> bool:
    """The process is at the place to interrupt: importing torch (call 0: its library is mapped), or the model's
    `call`-th forward (the marker file exists)."""
    if call == 0:
        return "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
    return marker.exists()


@pytest.mark.parametrize("script, call", [("predict.py", 0), ("predict.py", 1), ("export.py", 2)])
def test_ctrl_c_during_predict_or_export_is_one_line_and_writes_nothing(script, call, workspace, tmp_path):
    """Ctrl-C (SIGINT to the process group) during start-up's imports, predict.py's first batch, export.py's
    trace: one line, exit code 130, no output."""
    config = json.loads(workspace["config"].read_text())
    config["arch"]["type"] = "tests.models.Stalling"
    (tmp_path / "stalling.json").write_text(json.dumps(config))
    out, marker = tmp_path / "out" / "result", tmp_path / "stalled"
    out.parent.mkdir()
    argv = ["-r", workspace["ckpt"], "-c", tmp_path / "stalling.json", "-o", out,
            *(["--format", "exported"] if script == "export.py" else [])]
    proc = subprocess.Popen([sys.executable, ROOT / script, *map(str, argv)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, **ENV, "TEST_STALL": f"{call}:{marker}"})
    try:
        for _ in range(12000):  # a loaded machine: up to 2 minutes to import torch and reach the model
            if proc.poll() is not None or reached(proc, call, marker):
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()[1]
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, stderr) == (130, "error: interrupted\n")
    assert list(out.parent.iterdir()) == []  # no output, no temporary file


if __name__ == "__main__":
    drive(sys.argv[1])
