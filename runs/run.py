"""A run directory's whole life: found again (`-r auto`, `-r <run dir>`, `-r <file>`), what a resume restores
and from which file, created once training really starts, locked while a process trains in it, its checkpoint
files written and tidied. No other file decides anything about resuming.

    <save_dir>/<name>/<YYYYmmdd-HHMMSS>[-N]/   config.json  train.log  metrics.csv  tensorboard/  run.lock
                                               latest.pth  model_best.pth  checkpoint-epoch<N>.pth
                                               top-epoch<N>-<metric>=<value>.pth  test-results.jsonl
"""

import contextlib
import fcntl
import itertools
import json
import logging
import math
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from config.parser import ConfigParser, diff_configs, entries_of
from config.refs import fill_in
from logger import setup_logging
from logger.metrics_file import MetricsFile
from runs import sharded
from utils import checkpoint, dist, fsdp
from utils.cli import Request
from utils.device import select_device
from utils.errors import UserError
from utils.seed import seed_everything

log = logging.getLogger("train")
LATEST, BEST, LOCK = "latest.pth", "model_best.pth", "run.lock"
CHECKPOINT_HELP = f"checkpoint file, or run directory (its {BEST}, else {LATEST})"  # -r of test, predict, export
TEST_RESULTS = "test-results.jsonl"  # test.py appends one line per evaluation of a checkpoint in the folder
PERIODIC = re.compile(r"checkpoint-epoch(\d+)\.(?:pth|dcp)")  # not 'checkpoint-epoch1 (copy).pth'
TOP = "top-epoch{epoch}-{key}={value:.6g}.pth"  # save_top_k's files: the epoch and its monitored value
RUN_ID = re.compile(r"(\d{8}-\d{6})(?:-(\d+))?")  # <YYYYmmdd-HHMMSS>[-N], as new runs are named


@dataclass
class Run:
    """One run as a script sees it: the checked config on a started process, what it resumes from, and (once
    `start` made or claimed it) its directory, which a trainer writes its checkpoints into with `save`."""

    config: ConfigParser
    device: torch.device
    dir: Path | None = None  # a resumed run's or a fold's directory; a new run's once `start` made it
    resumed_from: Path | None = None  # the checkpoint file, and its state
    state: dict | None = None
    changes: list[str] = field(default_factory=list)  # config keys changed since that checkpoint
    lock: Any = None  # held by rank 0 while this process trains in `dir`
    allow_data_changes: bool = False  # --data-changed: a resume on other data goes on instead of stopping
    data_changes: list[str] = field(default_factory=list)  # how the data differ from the checkpoint's (restore)
    reset_best: bool = False  # --reset-best: the best to beat is the checkpoint's, not the run's model_best.pth
    run_best: float | None = None  # what the run's model_best.pth records (restore), of the checkpoint's monitor
    notes: list[str] = field(default_factory=list)  # warnings of restore, logged once train.log is open (start)
    top: dict[str, float] = field(default_factory=dict)  # save_top_k: file name -> rank (start reads the files)
    tracking_parent: str | None = None  # the tracked run a new tracked run is a child of (Request.tracking_parent)

    @property
    def latest(self) -> Path:
        return self.dir / (sharded.LATEST if self.config["trainer"]["strategy"] == "fsdp" else LATEST)

    def restore(self, trainer) -> str | None:
        """Load the checkpoint's run state into `trainer`; why the run has nothing left to do, or None. Training
        data that differ from the checkpoint's stop it (UserError) unless `allow_data_changes`."""
        missing = [key for key in ("optimizer", "rng", "epoch", "global_step") if key not in self.state]
        if missing:
            raise UserError(f"{self.resumed_from}: holds model weights but no run state to resume ({', '.join(missing)}"
                            "; a converted or exported checkpoint?): use -c CONFIG --finetune it, or test.py -r")
        try:
            if sharded.is_checkpoint(self.resumed_from) or any(map(fsdp.is_sharded, trainer.models.values())):
                sharded.load_into(trainer.models, trainer.optimizers, self.resumed_from, self.state)
                trainer.load_state_dict({**self.state, "model": None, "optimizer": None})  # None: loaded above
            else:
                trainer.load_state_dict(self.state)
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise UserError(f"{self.resumed_from}: does not fit this run: {str(e).strip().splitlines()[0][:200]}") \
                from None
        saved = entries_of("optimizer", saved_section(self.state, "optimizer", self.resumed_from))
        for name, spec in self.config.entries("optimizer").items():
            apply_optimizer_changes(trainer.optimizers[name], saved.get(name, ("", {}))[1], spec)
        if trainer.epoch >= trainer.epochs:
            return f"all {trainer.epochs} epochs are trained"
        patience = self.config["trainer"]["early_stop"]
        more_epochs = trainer.epochs > self.state["config"]["trainer"]["epochs"]
        if patience and trainer.not_improved_count >= patience and not more_epochs:
            return f"it early-stopped ('{trainer.monitor_key}' did not improve for {patience} epochs)"
        if self.dir and self.resumed_from.name == BEST and (reason := self.trained_past_best(trainer, more_epochs)):
            return reason
        self.data_changes = data_changes(self.state.get("data", {}), trainer.data_fingerprint)
        if self.data_changes and not self.allow_data_changes:
            raise UserError(f"{self.resumed_from}: the training data differ from the checkpoint's: "
                            f"{', '.join(self.data_changes)}; to resume anyway (not exact), add --data-changed")
        if self.dir:
            self.keep_run_best(trainer)
        return None

    def trained_past_best(self, trainer, more_epochs: bool) -> str | None:
        """Resuming from model_best.pth, the run's only checkpoint left (the others removed): why the run is finished
        when its metrics.csv shows it trained all its epochs or early-stopped after that best; else None, with a
        note that the epochs after it are trained again."""
        if [p.name for p in candidates(self.dir)] != [BEST]:
            return None
        trained = max(MetricsFile(self.dir / "metrics.csv", sys.maxsize).rows, default=0)
        if trained <= trainer.epoch:
            return None
        patience = self.config["trainer"]["early_stop"]
        if trained >= trainer.epochs or patience and trained - trainer.epoch >= patience and not more_epochs:
            return (f"the run trained to epoch {trained} (metrics.csv), and {BEST}, of epoch {trainer.epoch}, is its "
                    "only checkpoint left")
        self.notes.append(f"{BEST} (epoch {trainer.epoch}) is the run's only checkpoint left: the epochs after it, "
                          f"to {trained}, are trained again")
        return None

    def keep_run_best(self, trainer) -> None:
        """The best value to beat is the run's, which its model_best.pth records: a resume from an older checkpoint
        never lets a worse state replace it (--reset-best: the checkpoint's own, as before)."""
        monitor = self.state.get("monitor", self.config["trainer"]["monitor"])
        self.run_best = recorded_best(self.dir / BEST, monitor)
        if self.reset_best or trainer.monitor_changed or self.run_best is None or \
                not rank(self.run_best, monitor) < rank(trainer.monitor_best, monitor):
            return
        self.notes.append(f"{BEST} keeps the run's best {trainer.monitor_key} {self.run_best:.6g} "
                          f"({self.resumed_from.name} records {trainer.monitor_best:.6g}); --reset-best to beat the "
                          "checkpoint's instead")
        trainer.monitor_best = self.run_best

    def start(self) -> None:
        """Training really starts: make the directory (a new run's), lock it, tidy it, write the resolved
        config and open train.log. Called after the first batches passed, so a mistake leaves no folder."""
        self.dir = self.dir or new_run_dir(self.config, self.device)
        self.lock = dist.on_main(lambda: lock_run(self.dir), self.device,
                                 UserError(f"{self.dir}: in use by another process ({LOCK})"))
        if dist.is_main():
            for tmp in self.dir.glob(f".*{checkpoint.TMP_MARK}*"):  # what a killed process left half-written
                sharded.remove(tmp)
            checkpoint.save_atomic((json.dumps(self.config.config, indent=2) + "\n").encode(),
                                   self.dir / "config.json", "config")
        setup_logging(self.dir / "train.log", self.config["trainer"]["verbosity"], dist.rank())
        if dist.is_main():
            for note in self.notes:
                log.warning("%s", note)
            if self.state:
                self.repair_best()
            if self.config["trainer"]["save_top_k"]:
                self.top = read_top(self.dir, self.config["trainer"]["monitor"])

    def repair_best(self) -> None:
        """model_best.pth behind the best the checkpoint records (a kill between the files of an older version's
        save, a file removed by hand): when that best is the checkpoint's own epoch-end state, write it again."""
        state, best = self.state, self.run_best  # None: no model_best.pth, or a damaged one
        if sharded.is_checkpoint(self.resumed_from):  # its files are written best first, then renamed
            return
        if state["not_improved_count"] or state["batch_in_epoch"] or not math.isfinite(state["monitor_best"]):
            return
        monitor = state.get("monitor", self.config["trainer"]["monitor"])
        if best is not None and (best == state["monitor_best"] or
                                 not self.reset_best and rank(best, monitor) < rank(state["monitor_best"], monitor)):
            return  # model_best.pth holds the checkpoint's best, or the better best of the run's history
        checkpoint.save_atomic(self.resumed_from.read_bytes(), self.dir / BEST)
        log.warning("%s was behind %s: written again from it", BEST, self.resumed_from.name)

    def save(self, state: dict, epoch: int | None = None, improved: bool = False) -> None:
        """Write `state` (rank 0). At the end of `epoch`: model_best.pth, the periodic file and the top-k file first,
        latest.pth last (a kill in between leaves it at the previous epoch, trained again on resume), then keep_last
        and save_top_k remove what they no longer keep."""
        names = self.checkpoint_names(state, epoch, improved)
        data = checkpoint.serialize(state)
        for name in names:
            checkpoint.save_atomic(data, self.dir / name)
        self.remove_old(epoch)
        log.debug("Saved %s at epoch %d, step %d", ", ".join(names), state["epoch"], state["global_step"])

    def save_sharded(self, state: dict, models: dict, optimizers: dict, epoch: int | None = None,
                     improved: bool = False) -> None:
        """`save` for trainer.strategy fsdp, on every rank: the same names as DCP folders (runs/sharded.py)."""
        names = [name.replace(".pth", sharded.SUFFIX) for name in self.checkpoint_names(state, epoch, improved)]
        sharded.save(self.dir, names, state, models, optimizers, self.device)
        if dist.is_main():
            self.remove_old(epoch)
            log.debug("Saved %s at epoch %d, step %d", ", ".join(names), state["epoch"], state["global_step"])

    def checkpoint_names(self, state: dict, epoch: int | None, improved: bool) -> list[str]:
        """The files a save writes, in order: at the end of `epoch` model_best, the periodic and the top-k file;
        latest last."""
        options = self.config["trainer"]
        names = [BEST] if improved else []
        if epoch and options["save_period"] and epoch % options["save_period"] == 0:
            names.append(f"checkpoint-epoch{epoch}.pth")
        if epoch and options["save_top_k"] and (top := self.top_name(state, options["save_top_k"])):
            names.append(top)
        return [*names, LATEST]

    def remove_old(self, epoch: int | None) -> None:
        """At an epoch's end, only the newest trainer.keep_last periodic checkpoints stay, and save_top_k's k best."""
        options = self.config["trainer"]
        if epoch and options["keep_last"]:
            numbered = {int(m[1]): p for p in self.dir.glob("checkpoint-epoch*") if (m := PERIODIC.fullmatch(p.name))}
            for old in sorted(numbered)[: -options["keep_last"]]:
                sharded.remove(numbered[old])
        for old in sorted(self.top, key=self.top.get)[options["save_top_k"]:]:
            (self.dir / old).unlink(missing_ok=True)
            del self.top[old]

    def top_name(self, state: dict, k: int) -> str | None:
        """save_top_k: the file name for this epoch-end `state` when its monitored value is among the run's k best
        (counted in `top`, which the name then joins); else None. A tie keeps the older file."""
        value, monitor = state["monitor_value"], state["monitor"]
        if not math.isfinite(value):  # monitoring off, or an epoch that did not validate
            return None
        name = TOP.format(epoch=state["epoch"], key=re.sub(r"[^\w.-]", "_", monitor.partition(" ")[2]), value=value)
        ranked = {**self.top, name: rank(value, monitor)}
        if name not in sorted(ranked, key=ranked.get)[:k]:
            return None
        self.top = ranked
        return name

    def left_to_resume(self) -> str:
        """What an error that stops the run leaves to resume from: its newest checkpoint, by name."""
        files = candidates(self.dir) if self.dir else []
        return f"the last good checkpoint is kept: {files[0]}" if files else "no checkpoint was written yet"


def open_run(request: Request) -> Run:
    """train.py's run: its config (the user's file, else the checkpoint's, as data) and what it resumes from."""
    config = load_config(request) if request.resume in (None, "auto") else None
    path, state, folder = find_resume(request, config) if request.resume else (None, None, None)
    config = config or load_config(request, path, state)
    if state and config["arch"] != saved_section(state, "arch", path):
        raise UserError(f"{config.source}: arch differs from the checkpoint's ({state['config']['arch']}): "
                        "a resume keeps the architecture; use --finetune to start a new run from its weights")
    return Run(config, start_process(config, request), folder or (Path(request.run_dir) if request.run_dir else None),
               path, state, diff_configs(state["config"], config.config) if state else [],
               allow_data_changes=request.data_changed, reset_best=request.reset_best,
               tracking_parent=request.tracking_parent)


def open_checkpoint(request: Request) -> Run:
    """test.py, predict.py and export.py: the checkpoint of -r (a file, or a run directory's best) and its config,
    to evaluate (never trained)."""
    path = checkpoint_to_evaluate(Path(request.resume))
    state = sharded.load_whole(path) if sharded.is_checkpoint(path) else checkpoint.load(path)
    config = load_config(request, path, state)
    config.data_values.update(state.get("data_values", {}))  # the model is built as training built it
    device = start_process(config, request)
    if path != Path(request.resume) and dist.is_main():
        print(f"{request.resume}: using {path.name}")
    return Run(config, device, None, path, state)


def checkpoint_to_evaluate(path: Path) -> Path:
    """A checkpoint file or folder as it is; of a run directory, model_best.pth, else latest.pth (monitoring off),
    or the .dcp folder of that name (a sharded run's), the newer of the two where it has both."""
    if not path.is_dir() or sharded.is_checkpoint(path):
        return path
    for names in ((BEST, sharded.BEST), (LATEST, sharded.LATEST)):
        if found := [path / name for name in names if (path / name).exists()]:
            return max(found, key=lambda p: p.stat().st_mtime_ns)
    raise UserError(f"{path}: no {BEST} or {LATEST} in this run directory")


def is_run_directory(path: Path) -> bool:
    """A folder that train.py made: its config.json, with its run.lock or a checkpoint (*.pth)."""
    return (path / "config.json").is_file() and ((path / LOCK).exists() or any(path.glob("*.pth")))


def check_output_path(output: Path, resume: Path, force: bool) -> None:
    """-o of predict.py and export.py, refused before any work: the checkpoint read (also through a link or
    '..'), any checkpoint (a .pth file), a file inside a run directory, and, without --force, an existing file."""
    path, where = Path(os.path.realpath(output)), f"-o {output}"  # Path.resolve raises on a symlink loop
    if path == Path(os.path.realpath(checkpoint_to_evaluate(resume))):
        raise UserError(f"{where}: is the checkpoint being read; choose another file")
    if path.suffix.lower() == ".pth":
        raise UserError(f"{where}: a .pth file is a checkpoint; choose another name")
    if run_dir := next((p for p in path.parents if is_run_directory(p)), None):
        raise UserError(f"{where}: inside the run directory {run_dir}, whose files the runs own; write elsewhere")
    if not path.parent.is_dir():
        raise UserError(f"{where}: no such folder {output.parent}")
    if path.is_dir():
        raise UserError(f"{where}: is a folder; give a file name")
    if path.exists() and not force:
        raise UserError(f"{where}: already exists; add --force to replace it")


def saved_section(state: dict, key: str, path: Path) -> Any:
    """A section of the checkpoint's config with its "${vars...}" filled in, to compare with the config's."""
    return fill_in(state["config"][key], state["config"], f"{path} (its config)", key)


def start_process(config: ConfigParser, request: Request) -> torch.device:
    """Choose the device, join torchrun's process group (if launched by it) and seed every generator."""
    device = select_device(config["device"], "--device" if request.device_flag else f"{config.source}: device")
    if dist.launched_by_torchrun():
        dist.init(device)
    seed_everything(config["seed"], config["deterministic"])
    return device


def data_changes(saved: dict, current: dict) -> list[str]:
    """What differs between two data fingerprints (base/data_fingerprint.py), among the entries both have: a
    checkpoint of an older version has fewer."""
    return [f"{key} {saved[key]} -> {current[key]}" if key == "samples" else f"{key} changed"
            for key in current if key in saved and saved[key] != current[key]]


def apply_optimizer_changes(optimizer: torch.optim.Optimizer, old: dict, new: dict) -> None:
    """The restored optimizer state holds the checkpoint's hyper-parameters; a resume that changes one
    (`--lr 1e-4`) means the new value. Schedulers then continue from it."""
    for key, value in new.get("args", {}).items():
        if old.get("args", {}).get(key) != value and key in optimizer.param_groups[0]:
            for group in optimizer.param_groups:
                group[key] = value


def load_config(request: Request, path: Path | None = None, state: dict | None = None) -> ConfigParser:
    """The config of `-c` (the user's own code), else the one stored in the checkpoint: someone else's data,
    which may only name what the project trusts unless --trust-config. The command line wins."""
    if request.config_file:
        return ConfigParser.from_file(request.config_file, [*request.overrides, *finetune_override(request.finetune)])
    return ConfigParser.from_dict(state["config"], f"{path} (its config)", request.overrides,
                                  restricted=not request.trust_config)


def finetune_override(path: str | None) -> list[str]:
    """--finetune CKPT as the config records it: `finetuned_from` with the file's absolute path and SHA-256."""
    if not path:
        return []
    return ["finetuned_from=" + json.dumps({"path": os.path.realpath(path), "sha256": checkpoint.sha256(path)})]


def finetune_weights(config: ConfigParser) -> dict:
    """The model weights of the config's `finetuned_from`, which must be the file it names, unchanged."""
    source = config["finetuned_from"]
    if checkpoint.sha256(source["path"]) != source["sha256"]:
        raise UserError(f"{config.source}: finetuned_from: {source['path']} is not the file the config records "
                        "(its SHA-256 differs)")
    return checkpoint.load(source["path"])["model"]


def find_resume(request: Request, config: ConfigParser | None) -> tuple[Path | None, dict | None, Path | None]:
    """(checkpoint, its state, the run directory to continue in) of -r: a file, a run directory's newest checkpoint
    that loads, or 'auto': the newest run of the config's name (started afresh while it has no checkpoint)."""
    if request.resume == "auto":
        run = newest_run(Path(config["trainer"]["save_dir"]), config["name"])
        if run is None or not candidates(run):
            return None, None, run
        path, state = load_newest(run)
    else:
        path = Path(request.resume)
        path, state = load_newest(path) if path.is_dir() and not sharded.is_checkpoint(path) else (path, load(path))
    # a run directory made by train.py is continued; a lone checkpoint elsewhere continues in a new run
    in_run = (path.parent / "config.json").is_file() and (path.parent / "train.log").is_file()
    return path, state, path.parent if in_run else None


def new_run_dir(config: ConfigParser, device: torch.device | None = None) -> Path:
    """saved/<name>/<YYYYmmdd-HHMMSS>[-N]/, made by rank 0 and shared with the others (`device`: torchrun's)."""
    base, stamp = Path(config["trainer"]["save_dir"]) / config["name"], datetime.now().strftime("%Y%m%d-%H%M%S")

    def make() -> Path:
        try:
            base.mkdir(parents=True, exist_ok=True)
            for n in itertools.count(1):
                with contextlib.suppress(FileExistsError):  # another run started in the same second
                    (path := base / (stamp if n == 1 else f"{stamp}-{n}")).mkdir()
                    return path
        except OSError as e:
            raise UserError(f"{config.source}: trainer.save_dir: cannot create a run directory in {base}: "
                            f"{e.strerror}") from None
    shared = [dist.on_main(make, device, UserError(f"{base}: rank 0 could not create the run directory"))]
    if dist.is_distributed():
        torch.distributed.broadcast_object_list(shared, src=0)
    return Path(shared[0])


def candidates(run_dir: Path) -> list[Path]:
    """Resumable checkpoints of a run (files, and folders of a sharded run), newest first; model_best (a copy of an
    older state) last, for a run whose other checkpoints were removed."""
    sharded.recover(run_dir)
    files = [p for p in Path(run_dir).glob("*.pth") if p.name != BEST]
    files += [p for p in Path(run_dir).glob(f"*{sharded.SUFFIX}") if p.name != sharded.BEST and p.is_dir()]
    # file times are coarse: on a tie, latest (written by mid-epoch saves too) is the newer state
    files.sort(key=lambda p: (p.stat().st_mtime_ns, p.stem == "latest"), reverse=True)
    return files + [p for p in [Path(run_dir) / BEST, Path(run_dir) / sharded.BEST] if p.exists()]


def rank(value: float, monitor: str) -> float:
    """A monitored value as a sort key, lower is better ('max val_accuracy' negates it)."""
    return -value if monitor.startswith("max") else value


def recorded_best(path: Path, monitor: str) -> float | None:
    """The best value a checkpoint records, when it loads and is of `monitor` (older ones: taken as of it)."""
    if not path.is_file():
        return None
    try:
        state = checkpoint.load(path)
    except UserError:
        return None
    return state["monitor_best"] if state.get("monitor", monitor) == monitor else None


def read_top(run_dir: Path, monitor: str) -> dict[str, float]:
    """save_top_k's files of `monitor` in `run_dir` and their ranks, from the values the files record (not their
    names): what a resume keeps on counting. A file that does not load is left as it is, and not counted."""
    top = {}
    key = re.escape(re.sub(r"[^\w.-]", "_", monitor.partition(" ")[2]))
    for path in sorted(run_dir.glob("top-epoch*.pth")):
        if not re.fullmatch(rf"top-epoch\d+-{key}=[^=]*\.pth", path.name):
            continue
        try:
            state = checkpoint.load(path)
        except UserError as e:
            log.warning("save_top_k: not counting %s", e)
            continue
        if state.get("monitor") == monitor and math.isfinite(state.get("monitor_value", math.nan)):
            top[path.name] = rank(state["monitor_value"], monitor)
    return top


def load_newest(run_dir: Path) -> tuple[Path, dict]:
    """The newest checkpoint in `run_dir` that loads; a damaged one falls back to the one before."""
    files = candidates(run_dir)
    if not files:
        raise UserError(f"{run_dir}: no checkpoint (*.pth) or sharded checkpoint (*.dcp) to resume from")
    for path in files:
        try:
            return path, load(path)
        except UserError as e:
            log.warning("skipping %s", e)
    raise UserError(f"{run_dir}: none of its {len(files)} checkpoints loads")


def load(path: Path) -> dict:
    """A checkpoint's state: a file's, or a sharded folder's run state (its tensors are read by `Run.restore`)."""
    return sharded.load_state(path) if sharded.is_checkpoint(path) else checkpoint.load(path)


def newest_run(save_dir: Path, name: str) -> Path | None:
    """The run of config `name` started last (`-r auto`), by its id: not by folder times, which any file
    written into an old run (a test result) would change. None when there is none."""
    runs = [(m[1], int(m[2] or 1), p) for p in (Path(save_dir) / name).glob("*")
            if p.is_dir() and (m := RUN_ID.fullmatch(p.name))]
    return max(runs)[2] if runs else None


def lock_run(run_dir: Path):
    """Hold `run_dir/run.lock` while this process trains there: a second process gets one line naming the
    holder. The operating system drops the lock when its process dies, so a killed run never blocks the next."""
    lock = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise UserError(f"{run_dir}: in use by {holder} ({LOCK}); wait for it to end or stop it") from None
    lock.truncate(0)
    lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock
