"""Bad input gets one clear line and exit code 2 before anything is written; a NaN never costs earlier work.

The table below runs in one Python process (this file's `__main__`): each case goes through train.py's
or test.py's own `main` and `run_main`, as a real run does, so one torch import serves every case. A
few cases also run as real processes, to show the in-process answer is the real one.
"""

import argparse
import contextlib
import gzip
import io
import itertools
import json
import os
import pickle
import shutil
import subprocess
import sys
import traceback
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import BASE_CONFIG, ROOT, make_config, run, run_dirs
from data_loader.datasets import read_idx, write_idx
from trainer.trainer import Trainer

# The flaky loss below is named by dotted path in configs, so the processes that train must import this file.
ENV = {"PYTHONPATH": str(ROOT / "tests")}
CALLS = itertools.count()


def detached_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A loss cut off from the graph (a habit: .detach() or a numpy detour): its backward fails."""
    return F.nll_loss(output, target).detach()


def flaky_nll_loss(output: torch.Tensor, target: torch.Tensor, nan_from: int = -1, nan_to: int = -1,
                   nan_grad_at: int = -1) -> torch.Tensor:
    """nll_loss, but NaN on calls [nan_from, nan_to) of this process (training and validation batches
    count), and a finite loss with NaN gradients on call `nan_grad_at`."""
    call = next(CALLS)
    loss = F.nll_loss(output, target)
    if call == nan_grad_at:
        loss = loss + (output.sum() * 0).sqrt()  # value + 0, gradient 0 * inf = NaN
    return loss * float("nan") if nan_from <= call < nan_to else loss


def classic_accuracy(output: torch.Tensor, target: torch.Tensor) -> float:
    """The classic template's metric: a Python float."""
    return (output.argmax(dim=1) == target).sum().item() / len(target)


class ClassicEpochTrainer(Trainer):
    """A classic template subclass: it trains, validates and steps the scheduler in its own _train_epoch."""

    def _train_epoch(self, epoch):
        return {}


class OldStepTrainer(Trainer):
    def train_step(self, data, target):
        return super().train_step((data, target))


def flaky_loss(**args) -> dict:
    return {"type": "test_bad_input.flaky_nll_loss", "args": args}


# With tiny_mnist and BASE_CONFIG an epoch is 28 training batches (896 samples / 32) and 4 validation
# batches, so the loss is called 32 times per epoch, after the 2 calls of the first-batch check (one training,
# one validation batch); call 2 + 32 + 5 is epoch 2's 6th training batch.
FIRST_CALLS, EPOCH_CALLS, TRAIN_BATCHES = 2, 32, 28

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
    # runs that would train nothing, or data that do not fit the model: the first-batch check, before any file
    "validation rounds to 0 samples": ({"data_loader.args.validation_split": 0.0001},
                                       ["trainer.monitor: 'val_loss' needs validation data", "round to 0 of 1024"]),
    "drop_last, batch larger than the data": ({"data_loader.args.batch_size": 2000, "data_loader.args.drop_last": True},
                                              ["the training data give no batch (896 samples, batch_size 2000, "
                                               "drop_last)"]),
    "labels outside the model's classes": ({"arch.args.num_classes": 5},
                                           ["the first training batch fails: IndexError: Target", "is out of bounds"]),
    "a loss whose backward fails": ({"loss": "test_bad_input.detached_loss"},
                                    ["the first training batch fails: loss.backward() fails: RuntimeError: element 0 "
                                     "of tensors does not require grad"]),
    "output and target of other shapes": ({"loss": "MSELoss"},
                                          ["the first training batch fails: RuntimeError: The size of tensor a (10)"]),
    "truncated data file": ({"data_loader.args.data_dir": "{work}/data_cut"},
                            ["{work}/data_cut/MNIST/raw/train-images-idx3-ubyte.gz: damaged file (EOFError"]),
    "data file with a bad header": ({"data_loader.args.data_dir": "{work}/data_header"},
                                    ["{work}/data_header/MNIST/raw/train-labels-idx1-ubyte.gz: not an IDX file"]),
    "fewer labels than images": ({"data_loader.args.data_dir": "{work}/data_short"},
                                 ["{work}/data_short/MNIST/raw/train-labels-idx1-ubyte.gz: 1,000 labels",
                                  "for the 1,024 images of"]),
    "labels all 255": ({"data_loader.args.data_dir": "{work}/data_255"},
                       ["the first training batch fails: IndexError: Target 255 is out of bounds"]),
    "a 200 KB unknown key": ({"x" * 200_000: 1}, ["unknown key 'xxxxxxxxxx", "...(200,000 characters)'"]),
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
    "YAML alias bomb": ("bomb.yaml", "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n" for a, b in zip("abcdefgh", "bcdefghi")) + "name: *i\n",
        ["bomb.yaml: the config holds more than 10,000 values"]),
    "JSON nested 100,000 deep": ("deep.json", '{"name": ' + "[" * 100_000 + "]" * 100_000 + "}",
                                 ["deep.json: nested more than 32 levels deep"]),
    "YAML nested 40 deep": ("deep.yaml", "name: tiny\nseed: " + "[" * 40 + "]" * 40 + "\n",
                            ["deep.yaml: nested more than 32 levels deep"]),
    "duplicate key (JSON)": ("twice.json", '{"name": "a", "seed": 1, "seed": 2}',
                             ["twice.json: key 'seed' is given twice in one mapping"]),
    "duplicate key (YAML)": ("twice.yaml", "name: a\nseed: 1\nseed: 2\n",
                             ["twice.yaml:3:1: key 'seed' is given twice in one mapping"]),
    "config file of 2 MB": ("huge.json", '{"name": "' + "x" * 2_000_000 + '"}',
                            ["huge.json: config file is larger than 1,000,000 bytes"]),
}

# Command lines. {config} is a good config, {ckpt} a good checkpoint (of a run whose config is good);
# the other names are files made in `workspace`.
COMMANDS = {
    "no config, no resume": ("train.py", [], ["give a config (-c) or a checkpoint to resume (-r)"]),
    "unknown option": ("train.py", ["-c", "{config}", "--epohcs", "3"],
                       ["error: unrecognized arguments: --epohcs 3 (see train.py --help)"]),
    "shortcut not a number": ("train.py", ["-c", "{config}", "--lr", "fast"], ["--lr", "invalid number value: 'fast'"]),
    "--set without =": ("train.py", ["-c", "{config}", "--set", "trainer.epochs"],
                        ["--set 'trainer.epochs': expected KEY=VALUE"]),
    "--set unknown key": ("train.py", ["-c", "{config}", "--set", "trainer.epoch=3"],
                          ["--set trainer.epoch", "unknown key 'trainer.epoch'", "did you mean 'epochs'"]),
    "--set unparsable value": ("train.py", ["-c", "{config}", "--set", "trainer.epochs=[1"],
                               ["--set trainer.epochs:1:3: invalid YAML"]),
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
    "resume a flipped byte": ("train.py", ["-r", "{work}/flipped.pth"],
                              ["{work}/flipped.pth: not a loadable checkpoint: ", "its record checkpoint/data/",
                               "fails its CRC-32 check: the file is damaged"]),
    "resume pickled objects": ("train.py", ["-r", "{work}/pickled.pth"],
                               ["{work}/pickled.pth", "a Python object (argparse.Namespace), refused for safety"]),
    "resume other tensors": ("train.py", ["-r", "{work}/tensors.pth"],
                             ["{work}/tensors.pth: not a checkpoint of this project"]),
    "resume a newer version": ("train.py", ["-r", "{work}/future.pth"], ["{work}/future.pth: checkpoint version 99"]),
    "resume a run without checkpoints": ("train.py", ["-r", "{work}/empty_run"],
                                         ["{work}/empty_run: no checkpoint (*.pth)"]),
    "resume auto without -c": ("train.py", ["-r", "auto"], ["error: -r auto needs -c"]),
    "resume with finetune": ("train.py", ["-r", "{ckpt}", "--finetune", "{ckpt}"], ["-r and --finetune"]),
    "resume, bad --set": ("train.py", ["-r", "{ckpt}", "--set", "trainer.epochz=3"],
                          ["--set trainer.epochz: unknown key 'trainer.epochz'"]),
    "resume, other arch": ("train.py", ["-r", "{ckpt}", "--set", "arch.args.num_classes=5"],
                           ["arch differs from the checkpoint's", "--finetune"]),
    "finetune, missing weights": ("train.py", ["-c", "{config}", "--finetune", "{work}/nope.pth"],
                                  ["{work}/nope.pth: checkpoint not found"]),
    "finetuned_from, not a record": ("train.py", ["-c", "{config}", "--set", "finetuned_from=old.pth"],
                                     ["finetuned_from: expected null or {{path: <checkpoint>, sha256: "]),
    "finetune, weights do not fit": ("train.py", ["-c", "{config}", "--finetune", "{work}/misfit.pth"],
                                     ["--finetune {work}/misfit.pth: weights do not fit MnistModel: size mismatch "
                                      "for fc2.weight (checkpoint [5, 50], model [10, 50])"]),
    "--set alias bomb": ("train.py", ["-c", "{config}", "--set", "trainer.epochs=[&a [1,1,1,1,1,1,1,1,1,1], "
                                      "&b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], "
                                      "[*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]]"],
                         ["--set trainer.epochs: the config holds more than 10,000 values"]),
    "resume, rng empty": ("train.py", ["-r", "{work}/rng_empty.pth"],
                          ["{work}/rng_empty.pth: damaged checkpoint: 'rng' is not a list of generator states"]),
    "resume, rng of dicts without states": ("train.py", ["-r", "{work}/rng_bad.pth"],
                                            ["{work}/rng_bad.pth: damaged checkpoint: 'rng'"]),
    "resume, epoch a string": ("train.py", ["-r", "{work}/epoch_str.pth"],
                               ["{work}/epoch_str.pth: damaged checkpoint: 'epoch' is str, not int"]),
    "resume, config None": ("train.py", ["-r", "{work}/config_none.pth"],
                            ["{work}/config_none.pth: damaged checkpoint: 'config' is NoneType, not dict"]),
    "resume, model a list": ("train.py", ["-r", "{work}/model_list.pth"],
                             ["{work}/model_list.pth: damaged checkpoint: 'model' is list, not dict"]),
    "resume, data fingerprint a string": ("train.py", ["-r", "{work}/data_str.pth"],
                                          ["{work}/data_str.pth: damaged checkpoint: 'data' is str, not dict"]),
    "test, epoch a string": ("test.py", ["-r", "{work}/epoch_str.pth"], ["{work}/epoch_str.pth: damaged checkpoint"]),
    "test, truncated data": ("test.py", ["-r", "{ckpt}", "--set", "data_loader.args.data_dir={work}/data_cut"],
                             ["{work}/data_cut/MNIST/raw/t10k-images-idx3-ubyte.gz: damaged file"]),
    "test without -r": ("test.py", [], ["error: the following arguments are required: -r/--resume (see test.py"]),
    "test, checkpoint missing": ("test.py", ["-r", "{work}/nope.pth"], ["{work}/nope.pth: checkpoint not found"]),
    "test, a run directory without checkpoints": ("test.py", ["-r", "{work}/empty_run"],
                                                  ["{work}/empty_run: no model_best.pth or latest.pth in this run "
                                                   "directory"]),
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

# Habits of the classic pytorch-template, each answered with the fix (README: Coming from pytorch-template).
MIGRATION = {
    "classic: n_gpu": ({"n_gpu": 1}, ["unknown key 'n_gpu' (the classic template's GPU count: use device (or -d "
                                      "cuda:0), and torchrun for several GPUs)"]),
    "classic: a float metric": ({"metrics": ["test_bad_input.classic_accuracy"], "trainer.monitor": "off"},
                                ["the first training batch fails: metric 'test_bad_input.classic_accuracy' returned "
                                 "float", "keep it a tensor: no .item()"]),
    "classic: a helper as a data loader": ({"data_loader": {"type": "read_image", "args": {}}},
                                           ["'read_image' in data_loader.data_loaders is not listed for data_loader",
                                            "name it by dotted path"]),
    "classic: _train_epoch override": ({"trainer.type": "test_bad_input.ClassicEpochTrainer"},
                                       ["trainer.type: ClassicEpochTrainer overrides _train_epoch",
                                        "override train_step"]),
    "classic: train_step(data, target)": ({"trainer.type": "test_bad_input.OldStepTrainer"},
                                          ["trainer.type: OldStepTrainer.train_step must take one argument, "
                                           "the batch"]),
}
MIGRATION_COMMANDS = {
    "classic: -d 0": ("train.py", ["-c", "{config}", "-d", "0"], ["--device: unknown device '0'", "use -d cuda:0"]),
    "classic: -d 0,1": ("train.py", ["-c", "{config}", "-d", "0,1"], ["use -d cuda:0, or torchrun for several"]),
    "classic: monitor off in YAML": ("train.py", ["-c", "{work}/monitor_off.yaml"],
                                     ["monitor_off.yaml: trainer.monitor: expected a string, got False",
                                      "quote the word, 'off'"]),
    "classic: --set monitor=off": ("train.py", ["-c", "{config}", "--set", "trainer.monitor=off"],
                                   ["trainer.monitor: expected a string, got False", "quote the word"]),
    "classic: resume a classic checkpoint": ("train.py", ["-r", "{work}/classic.pth"],
                                             ["classic pytorch-template checkpoint",
                                              "scripts/convert_classic_checkpoint.py"]),
    "classic: test a classic checkpoint": ("test.py", ["-r", "{work}/classic.pth"],
                                           ["convert it with scripts/convert_classic_checkpoint.py"]),
    "classic: resume a converted checkpoint": ("train.py", ["-r", "{work}/converted.pth"],
                                               ["{work}/converted.pth: holds model weights but no run state",
                                                "--finetune"]),
    "classic: -r with -c to fine-tune": ("train.py", ["-r", "{ckpt}", "-c", "{work}/other_arch.json"],
                                         ["arch differs from the checkpoint's", "use --finetune"]),
}
CONFIGS.update(MIGRATION)
COMMANDS.update(MIGRATION_COMMANDS)

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
    weights = max(torch.load(ckpt, weights_only=True)["model"].values(), key=torch.Tensor.numel).numpy().tobytes()
    flipped = bytearray(data)
    flipped[data.index(weights) + len(weights) // 2] ^= 1  # one bit of a weight: torch.load alone would not notice
    (work / "flipped.pth").write_bytes(flipped)
    torch.save({"model": {}, "config": {}, "args": argparse.Namespace(lr=0.1)}, work / "pickled.pth")
    torch.save({"weights": torch.zeros(3)}, work / "tensors.pth")
    (work / "plain.pkl").write_bytes(pickle.dumps({"model": {}, "config": {}}))
    (work / "empty.pth").write_bytes(b"")
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "version": 99}, work / "future.pth")
    malformed = {"rng_empty": {"rng": []}, "rng_bad": {"rng": [{}]}, "epoch_str": {"epoch": "3"},
                 "config_none": {"config": None}, "model_list": {"model": [1, 2]}, "data_str": {"data": "x"}}
    for name, change in malformed.items():
        torch.save({**state, **change}, work / f"{name}.pth")
    write_broken_data(work, data_dir)
    write_classic_files(work, data_dir, state)
    state["model"] = {k: v[:5] if k.startswith("fc2") else v for k, v in state["model"].items()}  # 5 classes
    torch.save(state, work / "misfit.pth")
    return ckpt


def write_classic_files(work: Path, data_dir: Path, state: dict) -> None:
    """classic.pth (pickles a stand-in parse_config.ConfigParser, as the classic template's do), converted.pth
    (weights and config only, as the converter writes), monitor_off.yaml and other_arch.json."""
    stand_in = types.ModuleType("parse_config")
    stand_in.ConfigParser = type("ConfigParser", (), {"__module__": "parse_config"})
    sys.modules["parse_config"] = stand_in
    try:
        torch.save({"arch": "MnistModel", "state_dict": state["model"], "config": stand_in.ConfigParser()},
                   work / "classic.pth")
    finally:
        del sys.modules["parse_config"]
    torch.save({key: state[key] for key in ("version", "arch", "model", "config")}, work / "converted.pth")
    config = {**BASE_CONFIG, "trainer": {**BASE_CONFIG["trainer"], "monitor": "MONITOR"}}
    (work / "monitor_off.yaml").write_text(yaml.safe_dump(config).replace("MONITOR", "off"))
    write_config(work, data_dir, "other_arch.json", {"arch.args.num_classes": 5})


def write_broken_data(work: Path, data_dir: Path) -> None:
    """Copies of the tiny MNIST, each damaged one way: data_cut, data_header, data_short, data_255."""
    raw = data_dir / "MNIST" / "raw"
    images, labels = (read_idx(raw / f"train-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1"))
    for name in ("data_cut", "data_header", "data_short", "data_255"):
        shutil.copytree(data_dir, work / name)
    for split in ("train", "t10k"):  # cut short: half of each gzip stream
        target = work / "data_cut" / "MNIST" / "raw" / f"{split}-images-idx3-ubyte.gz"
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with gzip.open(work / "data_header" / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"PK\x03\x04 not an IDX file")
    write_idx(work / "data_short" / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz", labels[:1000].contiguous())
    write_idx(work / "data_255" / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz", torch.full_like(labels, 255))
    assert len(images) == 1024


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
    loss = flaky_loss(nan_from=FIRST_CALLS + EPOCH_CALLS + 5, nan_to=10**9)
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
        f"error: loss is NaN or Inf at epoch 2, batch 6: stopping; the last good checkpoint is kept: "
        f"{run_dir / 'latest.pth'} (lower the learning rate or clip gradients)"]
    saved = checkpoints(run_dir)
    assert list(saved) == ["checkpoint-epoch1.pth", "latest.pth", "model_best.pth"]
    assert all(state["epoch"] == 1 and finite(state) for state in saved.values())
    assert (run_dir / "model_best.pth").read_bytes() == (run_dir / "latest.pth").read_bytes()
    assert "epoch 1/3" in (run_dir / "train.log").read_text()


def test_skip_counts_nan_steps_and_nan_weights_are_never_saved(tmp_path, tiny_mnist):
    """on_nonfinite: skip skips epoch 1's batches 4-6; a finite loss with NaN gradients on epoch 2's last
    batch makes NaN weights, which stop the run unsaved: epoch 1's checkpoints stay."""
    loss = flaky_loss(nan_from=FIRST_CALLS + 3, nan_to=FIRST_CALLS + 6,
                      nan_grad_at=FIRST_CALLS + EPOCH_CALLS + TRAIN_BATCHES - 1)
    config = make_config(tmp_path, tiny_mnist, {"trainer.on_nonfinite": "skip", "trainer.tensorboard": False,
                                                "loss": loss})
    result = run("train.py", "-c", config, env=ENV)
    (run_dir,) = run_dirs(tmp_path / "saved")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: model weights or optimizer state are NaN or Inf after epoch 2: not saved, stopping; the last good "
        f"checkpoint is kept: {run_dir / 'latest.pth'} (lower the learning rate or clip gradients)"]
    assert result.stdout.count("Skipped a step in epoch 1: loss is NaN or Inf") == 3
    assert "(3 skipped this epoch)" in result.stdout and "skipped_steps 3" in result.stdout
    saved = checkpoints(run_dir)
    assert list(saved) == ["checkpoint-epoch1.pth", "latest.pth", "model_best.pth"]
    assert all(state["epoch"] == 1 and finite(state) for state in saved.values())
    assert saved["latest.pth"]["global_step"] == TRAIN_BATCHES - 3  # a skipped step is not a step


def test_the_table_is_large_and_distinct():
    cases = [*CONFIGS, *FILES, *COMMANDS]
    assert len(MIGRATION) + len(MIGRATION_COMMANDS) >= 12
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
