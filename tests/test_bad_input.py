"""Bad input gets one clear line and exit code 2 before anything is written; a NaN never costs earlier work.

The table below runs in one Python process (this file's `__main__`): each case goes through train.py's
or test.py's own `main` and `run_main`, as a real run does, so one torch import serves every case. A
few cases also run as real processes, to show the in-process answer is the real one.
"""

import argparse
import contextlib
import io
import itertools
import json
import os
import pickle
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, make_config, run, run_dirs

# The flaky loss below is named by dotted path in configs, so the processes that train must import this file.
ENV = {"PYTHONPATH": str(ROOT / "tests")}
CALLS = itertools.count()


def flaky_nll_loss(output: torch.Tensor, target: torch.Tensor, nan_from: int = -1, nan_to: int = -1,
                   nan_grad_at: int = -1) -> torch.Tensor:
    """nll_loss, but NaN on calls [nan_from, nan_to) of this process (training and validation batches
    count), and a finite loss with NaN gradients on call `nan_grad_at`."""
    call = next(CALLS)
    loss = F.nll_loss(output, target)
    if call == nan_grad_at:
        loss = loss + (output.sum() * 0).sqrt()  # value + 0, gradient 0 * inf = NaN
    return loss * float("nan") if nan_from <= call < nan_to else loss


def flaky_loss(**args) -> dict:
    return {"type": "test_bad_input.flaky_nll_loss", "args": args}


# With tiny_mnist and BASE_CONFIG an epoch is 28 training batches (896 samples / 32) and 4 validation
# batches, so the loss is called 32 times per epoch; call 32 + 5 is epoch 2's 6th training batch.
EPOCH_CALLS, TRAIN_BATCHES = 32, 28

# A torchvision dataset with config transforms (issue 15): 64 random 1x28x28 images, 16 held out.
def fake_data(transforms: dict, **args) -> dict:
    return {"type": "TorchvisionDataLoader", "args": {
        "dataset": "FakeData", "dataset_args": {"size": 64, "image_size": [1, 28, 28]}, "batch_size": 16,
        "validation_split": 16, "num_workers": 0, "transforms": transforms, **args}}


# ---- the table ----------------------------------------------------------------------------------------------
# Config cases: `train.py -c <config>` where the config is the tiny one with these dotted keys changed
# (None deletes the key). Every message must name the config file and what is listed.
CONFIGS = {
    "missing section": ({"arch": None}, ["missing required key 'arch'"]),
    "missing name": ({"name": None}, ["missing required key 'name'"]),
    "unknown top-level key": ({"optimiser": {}}, ["unknown key 'optimiser'", "did you mean 'optimizer'"]),
    "unknown trainer key": ({"trainer.epoch": 3}, ["trainer: unknown key 'epoch'", "did you mean 'epochs'"]),
    "trainer not a mapping": ({"trainer": [1]}, ["trainer: expected a mapping"]),
    "unknown arch type": ({"arch.type": "MnistModle"}, ["arch.type", "'MnistModle'", "did you mean 'MnistModel'"]),
    "unknown optimizer type": ({"optimizer.type": "Adma"}, ["optimizer.type", "did you mean 'Adam'", "SGD"]),
    "unknown loss": ({"loss": "nll_los"}, ["loss.type", "did you mean 'nll_loss'", "cross_entropy"]),
    "unknown metric": ({"metrics": ["acuracy"]}, ["metrics[0].type", "did you mean 'accuracy'"]),
    "unknown scheduler": ({"lr_scheduler": {"type": "StepLr", "args": {"step_size": 1}}},
                          ["lr_scheduler.type", "did you mean 'StepLR'"]),
    "dotted type, no module": ({"arch.type": "nosuch.Net"}, ["arch.type", "cannot import 'nosuch'"]),
    "dotted type, no attribute": ({"optimizer.type": "torch.optim.Adamm"},
                                  ["optimizer.type", "no callable 'Adamm'", "did you mean 'Adam'"]),
    "spec without type": ({"arch": {"args": {}}}, ["arch.type: missing"]),
    "spec with unknown key": ({"arch.arg": {}}, ["arch: unknown key 'arg'", "did you mean 'args'"]),
    "args not a mapping": ({"optimizer.args": [0.1]}, ["optimizer.args: expected a mapping"]),
    "arch arg not accepted": ({"arch.args.num_class": 10},
                              ["arch.args: unknown argument 'num_class'", "accepted: num_classes"]),
    "optimizer arg not accepted": ({"optimizer.args.learning_rate": 0.1},
                                   ["optimizer.args: unknown argument 'learning_rate'", "lr"]),
    "missing required argument": ({"data_loader.args.data_dir": None},
                                  ["data_loader.args: missing required argument 'data_dir'"]),
    "scheduler without its argument": ({"lr_scheduler": {"type": "StepLR"}},
                                       ["lr_scheduler.args: missing required argument 'step_size'"]),
    "epochs is a string": ({"trainer.epochs": "10"}, ["trainer.epochs: expected an integer, got '10'"]),
    "epochs is zero": ({"trainer.epochs": 0}, ["trainer.epochs: must be >= 1"]),
    "seed is a float": ({"seed": 1.5}, ["seed: expected an integer"]),
    "deterministic is a string": ({"deterministic": "yes"}, ["deterministic: expected true or false"]),
    "batch_size negative": ({"data_loader.args.batch_size": -1}, ["data_loader", "batch_size", "-1"]),
    "batch_size a string": ({"data_loader.args.batch_size": "32"},
                            ["data_loader.args.batch_size: expected an integer"]),
    "validation_split above 1": ({"data_loader.args.validation_split": 1.5},
                                 ["data_loader", "validation_split", "[0, 1)"]),
    "validation_split negative": ({"data_loader.args.validation_split": -0.1},
                                  ["data_loader", "validation_split", "[0, 1)"]),
    "validation_split too many": ({"data_loader.args.validation_split": 5000}, ["data_loader", "validation_split"]),
    "negative learning rate": ({"optimizer.args.lr": -0.1}, ["optimizer", "learning rate"]),
    "monitor malformed": ({"trainer.monitor": "minimize val_loss"}, ["trainer.monitor: expected 'min <metric>'"]),
    "monitor never logged": ({"trainer.monitor": "max val_acc"},
                             ["trainer.monitor: 'val_acc' is never logged", "did you mean 'val_accuracy'"]),
    "monitor needs validation": ({"data_loader.args.validation_split": 0},
                                 ["trainer.monitor: 'val_loss' is never logged"]),
    "amp choice": ({"trainer.amp": "fp32"}, ["trainer.amp: expected one of off, bf16, fp16"]),
    "on_nonfinite choice": ({"trainer.on_nonfinite": "ignore"}, ["trainer.on_nonfinite: expected one of"]),
    "scheduler interval": ({"lr_scheduler": {"type": "StepLR", "args": {"step_size": 1}, "interval": "batch"}},
                           ["lr_scheduler.interval"]),
    "metric listed twice": ({"metrics": ["accuracy", "accuracy"]}, ["metrics: a metric is listed twice"]),
    "name with a slash": ({"name": "a/b"}, ["name: must be a non-empty name without '/'"]),
    "device unknown in config": ({"device": "gpu"}, ["device: unknown device 'gpu'"]),
    "unknown trainer type": ({"trainer.type": "GANTrainer"}, ["trainer.type", "did you mean 'GanTrainer'"]),
    "trainer of the wrong kind": ({"trainer.type": "model.model.MnistModel"},
                                  ["trainer.type", "MnistModel", "not a trainer"]),
    "unknown subclass option": ({"trainer.type": "GanTrainer", "trainer.sample": 4},
                                ["trainer: unknown key 'sample'", "did you mean 'samples'"]),
    "subclass option on the base trainer": ({"trainer.samples": 4}, ["trainer: unknown key 'samples'"]),
    "named optimizer for no model": ({"optimizer": {"generator": {"type": "Adam", "args": {}}}},
                                     ["optimizer: arch is one {{type, args}} entry, so optimizer must be too"]),
    "optimizer named after no model": ({"arch": {"net": {"type": "MnistModel", "args": {}}},
                                        "optimizer": {"nett": {"type": "Adam", "args": {}}}},
                                       ["optimizer.nett: no arch of that name", "did you mean 'net'"]),
    "unknown transform type": ({"data_loader": fake_data({"train": [{"type": "RandomCrp", "args": {"size": 28}}]})},
                               ["data_loader.args.transforms.train[0].type: unknown transform type 'RandomCrp'",
                                "did you mean 'RandomCrop'"]),
    "transform arg not accepted": ({"data_loader": fake_data({"eval": [{"type": "Normalize", "args": {"sd": 1}}]})},
                                   ["data_loader.args.transforms.eval[0].args: unknown argument 'sd'",
                                    "did you mean 'std'"]),
    "transform fails on the data": ({"data_loader": fake_data({"train": [{"type": "RandomCrop",
                                                                          "args": {"size": 40}}]})},
                                    ["data_loader: transforms.train: fails on sample 0: Required crop size (40, 40)"]),
    "torchvision dataset missing": ({"data_loader": fake_data({}, dataset="CIFAR10", dataset_args={}),
                                     "data_loader.args.data_dir": "{work}/nodata"},
                                    ["CIFAR10 files not found", "{work}/nodata/cifar-10-batches-py/"]),
    "save_dir is a file": ({"trainer.save_dir": "{work}/notes.txt"},
                           ["trainer.save_dir: cannot create a run directory in {work}/notes.txt"]),
}

# Files given as configs: (file name, content, what the message names).
FILES = {
    "config file missing": ("absent.json", None, ["absent.json: config file not found"]),
    "invalid JSON": ("bad.json", '{"name": "tiny",\n  "seed": 1,,\n}', ["bad.json:2:13: invalid JSON"]),
    "invalid YAML": ("bad.yaml", "name: tiny\narch: {type: MnistModel\nseed: 1\n", ["bad.yaml:3:", "invalid YAML"]),
    "empty file": ("empty.json", "  \n", ["empty.json: config file is empty"]),
    "top level is a list": ("list.json", "[1, 2]", ["list.json: the top level must be a mapping", "list"]),
    "top level is a string (YAML)": ("scalar.yml", "just words\n", ["scalar.yml: the top level must be a mapping"]),
    "unknown format": ("config.toml", "name = 'tiny'\n", ["config.toml: unsupported config format"]),
    "not text": ("binary.json", b"\xff\xfe\x00\x01", ["binary.json: cannot read config"]),
}

# Command lines. {config} is a good config, {ckpt} a good checkpoint (of a run whose config is good);
# the other names are files made in `workspace`.
COMMANDS = {
    "no config, no resume": ("train.py", [], ["give a config (-c) or a checkpoint to resume (-r)"]),
    "unknown option": ("train.py", ["-c", "{config}", "--epohcs", "3"],
                       ["error: unrecognized arguments: --epohcs 3 (see train.py --help)"]),
    "shortcut not a number": ("train.py", ["-c", "{config}", "--lr", "fast"], ["--lr", "invalid float value: 'fast'"]),
    "--set without =": ("train.py", ["-c", "{config}", "--set", "trainer.epochs"],
                        ["--set 'trainer.epochs': expected KEY=VALUE"]),
    "--set unknown key": ("train.py", ["-c", "{config}", "--set", "trainer.epoch=3"],
                          ["--set trainer.epoch", "unknown key 'trainer.epoch'", "did you mean 'epochs'"]),
    "--set unparsable value": ("train.py", ["-c", "{config}", "--set", "trainer.epochs=[1"],
                               ["--set 'trainer.epochs=[1'", "cannot parse value"]),
    "--set below a leaf": ("train.py", ["-c", "{config}", "--set", "trainer.epochs.n=1"],
                           ["--set trainer.epochs.n", "'trainer.epochs' is not a mapping"]),
    "--set wrong kind": ("train.py", ["-c", "{config}", "--set", "trainer.epochs=ten"],
                         ["{config}: trainer.epochs: expected an integer, got 'ten'"]),
    "unknown device": ("train.py", ["-c", "{config}", "-d", "gpu"], ["--device: unknown device 'gpu'"]),
    "cuda without CUDA": ("train.py", ["-c", "{config}", "-d", "cuda"],
                          ["--device: 'cuda', but CUDA is not available on this machine"]),
    "mps without MPS": ("train.py", ["-c", "{config}", "-d", "mps"],
                        ["--device: 'mps', but MPS is not available on this machine"]),
    "dataset missing": ("train.py", ["-c", "{config}", "--set", "data_loader.args.data_dir={work}/nodata"],
                        ["{work}/nodata/MNIST/raw/", "train-images-idx3-ubyte.gz"]),
    "resume path missing": ("train.py", ["-r", "{work}/nope.pth"], ["{work}/nope.pth: checkpoint not found"]),
    "resume a text file": ("train.py", ["-r", "{work}/notes.txt"],
                           ["{work}/notes.txt: not a loadable checkpoint: not a PyTorch checkpoint file"]),
    "resume a plain pickle": ("train.py", ["-r", "{work}/plain.pkl"],
                              ["{work}/plain.pkl: not a loadable checkpoint: not a PyTorch checkpoint file"]),
    "resume an empty file": ("train.py", ["-r", "{work}/empty.pth"],
                             ["{work}/empty.pth: not a loadable checkpoint: the file is empty, damaged or cut short"]),
    "resume a truncated file": ("train.py", ["-r", "{work}/truncated.pth"],
                                ["{work}/truncated.pth: not a loadable checkpoint: the file is empty, damaged or cut "
                                 "short"]),
    "resume pickled objects": ("train.py", ["-r", "{work}/pickled.pth"],
                               ["{work}/pickled.pth", "a Python object (argparse.Namespace), refused for safety"]),
    "resume other tensors": ("train.py", ["-r", "{work}/tensors.pth"],
                             ["{work}/tensors.pth: not a checkpoint of this project"]),
    "resume a newer version": ("train.py", ["-r", "{work}/future.pth"], ["{work}/future.pth: checkpoint version 99"]),
    "resume a run without checkpoints": ("train.py", ["-r", "{work}/empty_run"],
                                         ["{work}/empty_run: no checkpoint (*.pth)"]),
    "resume auto without -c": ("train.py", ["-r", "auto"], ["error: -r auto needs -c"]),
    "resume auto, no run yet": ("train.py", ["-r", "auto", "-c", "{config}"], ["-r auto: no run of 'tiny'"]),
    "resume with finetune": ("train.py", ["-r", "{ckpt}", "--finetune", "{ckpt}"], ["-r and --finetune"]),
    "resume, bad --set": ("train.py", ["-r", "{ckpt}", "--set", "trainer.epochz=3"],
                          ["--set trainer.epochz: unknown key 'trainer.epochz'"]),
    "resume, other arch": ("train.py", ["-r", "{ckpt}", "--set", "arch.args.num_classes=5"],
                           ["arch differs from the checkpoint's", "--finetune"]),
    "finetune, missing weights": ("train.py", ["-c", "{config}", "--finetune", "{work}/nope.pth"],
                                  ["{work}/nope.pth: checkpoint not found"]),
    "finetune, weights do not fit": ("train.py", ["-c", "{config}", "--finetune", "{work}/misfit.pth"],
                                     ["--finetune {work}/misfit.pth: weights do not fit MnistModel: size mismatch "
                                      "for fc2.weight (checkpoint [5, 50], model [10, 50])"]),
    "test without -r": ("test.py", [], ["error: the following arguments are required: -r/--resume (see test.py"]),
    "test, checkpoint missing": ("test.py", ["-r", "{work}/nope.pth"], ["{work}/nope.pth: checkpoint not found"]),
    "test, a directory": ("test.py", ["-r", "{work}/empty_run"], ["{work}/empty_run: not a checkpoint file"]),
    "test, not a checkpoint": ("test.py", ["-r", "{work}/notes.txt"], ["{work}/notes.txt: not a loadable checkpoint"]),
    "test, weights do not fit": ("test.py", ["-r", "{work}/misfit.pth"],
                                 ["{work}/misfit.pth: weights do not fit MnistModel: size mismatch for fc2.weight"]),
    "test, bad --set": ("test.py", ["-r", "{ckpt}", "--set", "data_loader.args.batch_sise=8"],
                        ["{ckpt} (its config)", "batch_sise", "did you mean 'batch_size'"]),
    "test, cuda without CUDA": ("test.py", ["-r", "{ckpt}", "-d", "cuda"], ["--device: 'cuda', but CUDA is not"]),
    "test, broken -c": ("test.py", ["-r", "{ckpt}", "-c", "{work}/bad.json"], ["bad.json:2:13: invalid JSON"]),
    "test, batch size zero": ("test.py", ["-r", "{ckpt}", "--bs", "0"],
                              ["{ckpt} (its config): data_loader", "batch_size must be a positive integer, got 0"]),
    "test, dataset missing": ("test.py", ["-r", "{ckpt}", "--set", "data_loader.args.data_dir={work}/nodata"],
                              ["{work}/nodata/MNIST/raw/", "t10k-images-idx3-ubyte.gz"]),
}

# Cases that also run as real processes.
REAL = ["invalid JSON", "unknown optimizer type", "cuda without CUDA", "resume pickled objects", "test without -r",
        "dataset missing"]


def command(case: str, work: Path, ckpt: Path) -> tuple[str, list[str], list[str]]:
    """(script, argv, expected fragments) of a case, with its files' paths filled in."""
    paths = {"work": work, "config": work / "good.json", "ckpt": ckpt}
    if case in CONFIGS:
        script, argv, expect = "train.py", ["-c", str(work / f"{case}.json")], [str(work / f"{case}.json")]
        expect += CONFIGS[case][1]
    elif case in FILES:
        script, argv, expect = "train.py", ["-c", str(work / FILES[case][0])], FILES[case][2]
    else:
        script, argv, expect = COMMANDS[case]
    return script, [a.format(**paths) for a in argv], [e.format(**paths) for e in expect]


# ---- the files the cases read -------------------------------------------------------------------------------
def write_config(work: Path, data_dir: Path, name: str, changes: dict) -> None:
    """make_config's tiny config with `changes` ('{work}' filled in); a None value deletes the key."""
    changes = {k: v.format(work=work) if isinstance(v, str) else v for k, v in changes.items()}
    path = make_config(work, data_dir, {k: v for k, v in changes.items() if v is not None}, name)
    config = json.loads(path.read_text())
    for dotted in (k for k, v in changes.items() if v is None):
        *parents, last = dotted.split(".")
        node = config
        for part in parents:
            node = node[part]
        del node[last]
    path.write_text(json.dumps(config))


def make_workspace(work: Path, data_dir: Path, run_ckpt: Path) -> Path:
    """Every file the table names, in `work`; runs would go to work/saved. Returns the good checkpoint: the
    run's, with nll_loss for its test module's loss (which a checkpoint's config may not name)."""
    work.mkdir()
    state = torch.load(run_ckpt, weights_only=True)
    ckpt = work / "checkpoint.pth"
    torch.save({**state, "config": {**state["config"], "loss": "nll_loss"}}, ckpt)
    write_config(work, data_dir, "good.json", {})
    for case, (changes, _) in CONFIGS.items():
        write_config(work, data_dir, f"{case}.json", changes)
    for name, content, _ in FILES.values():
        if isinstance(content, bytes):
            (work / name).write_bytes(content)
        elif content is not None:
            (work / name).write_text(content)
    (work / "notes.txt").write_text("not a checkpoint\n")
    (work / "empty_run").mkdir()
    data = ckpt.read_bytes()
    (work / "truncated.pth").write_bytes(data[: len(data) // 2])
    torch.save({"model": {}, "config": {}, "args": argparse.Namespace(lr=0.1)}, work / "pickled.pth")
    torch.save({"weights": torch.zeros(3)}, work / "tensors.pth")
    (work / "plain.pkl").write_bytes(pickle.dumps({"model": {}, "config": {}}))
    (work / "empty.pth").write_bytes(b"")
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "version": 99}, work / "future.pth")
    state["model"] = {k: v[:5] if k.startswith("fc2") else v for k, v in state["model"].items()}  # 5 classes
    torch.save(state, work / "misfit.pth")
    return ckpt


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def drive(cases_file: str) -> None:
    """Run each case's main in this process; write {case: {code, stderr, changed}} next to the cases."""
    import test
    import train
    from utils.cli import run_main

    spec = json.loads(Path(cases_file).read_text())
    watched = [Path(p) for p in spec["watch"]]
    results = {}
    for case, (script, argv) in spec["cases"].items():
        before = {str(w): snapshot(w) for w in watched}
        err, code = io.StringIO(), None
        sys.argv[0] = script
        main = {"train.py": train.main, "test.py": test.main}[script]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                run_main(lambda: main(argv))  # noqa: B023 - called at once
            except SystemExit as e:
                code = e.code
            except BaseException:  # what a real process would print as a traceback
                traceback.print_exc()
        changed = [p for w in watched for p, v in snapshot(w).items() if before[str(w)].get(p) != v]
        results[case] = {"code": code, "stderr": err.getvalue(), "changed": changed}
    Path(cases_file).with_suffix(".out.json").write_text(json.dumps(results))


# ---- tests --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_mnist) -> tuple[Path, subprocess.CompletedProcess]:
    """A 3-epoch run whose loss turns NaN at epoch 2's 6th batch: it must stop there, keeping epoch 1."""
    tmp_path = tmp_path_factory.mktemp("stopped")
    loss = flaky_loss(nan_from=EPOCH_CALLS + 5, nan_to=10**9)
    config = make_config(tmp_path, tiny_mnist, {"trainer.epochs": 3, "trainer.tensorboard": False, "loss": loss})
    result = run("train.py", "-c", config, env=ENV)
    (run_dir,) = run_dirs(tmp_path / "saved")
    return run_dir, result


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_mnist, stopped_run) -> tuple[Path, Path, dict]:
    """(workspace, checkpoint, results of every case run in one process)."""
    work = tmp_path_factory.mktemp("bad") / "work"
    ckpt = make_workspace(work, tiny_mnist, stopped_run[0] / "checkpoint-epoch1.pth")
    cases = {case: command(case, work, ckpt)[:2] for case in [*CONFIGS, *FILES, *COMMANDS]}
    spec = work.parent / "cases.json"
    spec.write_text(json.dumps({"cases": cases, "watch": [str(work), str(stopped_run[0])]}))
    result = subprocess.run([sys.executable, __file__, str(spec)], cwd=work, capture_output=True, text=True,
                            timeout=300, env={**os.environ, **ENV, "CI": "true"})
    assert result.returncode == 0, result.stderr
    return work, ckpt, json.loads(spec.with_suffix(".out.json").read_text())


def checkpoints(run_dir: Path) -> dict[str, dict]:
    return {p.name: torch.load(p, weights_only=True) for p in sorted(run_dir.glob("*.pth"))}


def finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state["model"].values())


def test_nan_loss_stops_naming_epoch_and_batch_and_keeps_the_last_good_checkpoint(stopped_run):
    run_dir, result = stopped_run
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: loss is NaN or Inf at epoch 2, batch 6: stopping; the last good checkpoint in {run_dir} is kept "
        "(lower the learning rate or clip gradients)"]
    saved = checkpoints(run_dir)
    assert list(saved) == ["checkpoint-epoch1.pth", "latest.pth", "model_best.pth"]
    assert all(state["epoch"] == 1 and finite(state) for state in saved.values())
    assert (run_dir / "model_best.pth").read_bytes() == (run_dir / "latest.pth").read_bytes()
    assert "epoch 1/3" in (run_dir / "train.log").read_text()


def test_skip_counts_nan_steps_and_nan_weights_are_never_saved(tmp_path, tiny_mnist):
    """on_nonfinite: skip skips epoch 1's batches 4-6; a finite loss with NaN gradients on epoch 2's last
    batch makes NaN weights, which stop the run unsaved: epoch 1's checkpoints stay."""
    loss = flaky_loss(nan_from=3, nan_to=6, nan_grad_at=EPOCH_CALLS + TRAIN_BATCHES - 1)
    config = make_config(tmp_path, tiny_mnist, {"trainer.on_nonfinite": "skip", "trainer.tensorboard": False,
                                                "loss": loss})
    result = run("train.py", "-c", config, env=ENV)
    (run_dir,) = run_dirs(tmp_path / "saved")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: model weights are NaN or Inf after epoch 2: not saved, stopping; the last good checkpoint in "
        f"{run_dir} is kept (lower the learning rate or clip gradients)"]
    assert result.stdout.count("Skipped a step in epoch 1: loss is NaN or Inf") == 3
    assert "(3 skipped this epoch)" in result.stdout and "skipped_steps 3" in result.stdout
    saved = checkpoints(run_dir)
    assert list(saved) == ["checkpoint-epoch1.pth", "latest.pth", "model_best.pth"]
    assert all(state["epoch"] == 1 and finite(state) for state in saved.values())
    assert saved["latest.pth"]["global_step"] == TRAIN_BATCHES - 3  # a skipped step is not a step


def test_the_table_is_large_and_distinct():
    cases = [*CONFIGS, *FILES, *COMMANDS]
    assert len(set(cases)) == len(cases) >= 40
    assert set(REAL) <= set(cases)


@pytest.mark.parametrize("case", [*CONFIGS, *FILES, *COMMANDS])
def test_bad_input_is_one_line_before_any_side_effect(case, bad_inputs):
    work, ckpt, results = bad_inputs
    _, _, expect = command(case, work, ckpt)
    result = results[case]
    stderr = result["stderr"]
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert result["code"] == 2, stderr
    for fragment in expect:
        assert fragment in stderr
    assert result["changed"] == []  # no run directory, log, event file or rewritten checkpoint
    assert not (work / "saved").exists()


@pytest.fixture(scope="module")
def real_runs(bad_inputs) -> dict[str, tuple[int, str, str]]:
    """The REAL cases as separate train.py/test.py processes, started together: {case: (code, stdout, stderr)}."""
    work, ckpt, _ = bad_inputs
    procs = {}
    for case in REAL:
        script, argv, _ = command(case, work, ckpt)
        procs[case] = subprocess.Popen([sys.executable, str(ROOT / script), *argv], cwd=work, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       env={**os.environ, **ENV, "CI": "true"})
    answers = {}
    for case, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        answers[case] = (proc.returncode, stdout, stderr)
    return answers


@pytest.mark.parametrize("case", REAL)
def test_real_processes_answer_the_same(case, bad_inputs, real_runs):
    work, _, results = bad_inputs
    code, stdout, stderr = real_runs[case]
    assert (code, stdout, stderr) == (2, "", results[case]["stderr"])
    assert not (work / "saved").exists()


if __name__ == "__main__":
    drive(sys.argv[1])
