"""Hyper-parameter sweeps (`sweep.py -c CONFIG --trials N`): an Optuna study whose trials are ordinary runs,

    <save_dir>/<name>/sweep/study.db        the study (SQLite), unless --storage names a database server
    <save_dir>/<name>/sweep/trial-<n>/      trial n: a run directory (config.json with its parameters, checkpoints,
                                            metrics.csv, ...), and sweep.lock, held by the process running it
    <save_dir>/<name>/sweep/trials.csv      the results (history.png, importances.png beside it)

The search space is the config's `sweep` section: keys as `--set` takes them, each with {"float": [low, high]},
{"int": [low, high]} (both with optional "log" and "step") or {"choice": [values]}. The objective is the best
value of trainer.monitor. The same command again continues the study: a trial whose process died (its
sweep.lock is free) resumes from its own checkpoint, in its own folder, with its own parameters.
Optuna is imported only here, lazily: the core install does without it (requirements-sweep.txt).
"""

import contextlib
import copy
import csv
import fcntl
import io
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from config.files import apply_override, shorten
from config.parser import ConfigParser, diff_configs
from logger.tracking import Tracking, check_installed
from runs.run import LATEST, candidates, load_config
from utils import checkpoint
from utils.cli import Request
from utils.errors import TrainingError, UserError, one_line
from utils.suggest import suggest

INSTALL = "pip install -r requirements-sweep.txt"
LOCK, RESULTS = "sweep.lock", "trials.csv"
PRUNERS = ("median", "hyperband", "none")
KINDS = ("float", "int", "choice")  # of a search space entry
BOUNDS = {"float": (int, float), "int": (int,)}  # the kinds of a range's bounds
CHOICES = (type(None), bool, int, float, str)  # what Optuna stores as a categorical value


class TrialPruned(Exception):
    """The pruner stopped a trial after an epoch: its run directory keeps that epoch's checkpoint."""


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(f"a sweep needs Optuna, which is not installed: {INSTALL}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # sweep.py prints its own line per trial
    return optuna


def check_space(config: ConfigParser) -> dict[str, dict]:
    """The config's `sweep` section, checked before any trial: each key exists (as --set has it), each range or
    choice is well formed, and the config takes its ends and every choice (the parser's checks)."""
    space, source = config.config["sweep"], config.source
    if not space:
        raise UserError(f"{source}: sweep: empty; give the search space, e.g. "
                        '"sweep": {"optimizer.args.lr": {"float": [1e-4, 1e-1], "log": true}}')
    for key, spec in space.items():
        where = f"{source}: sweep.{key}"
        for value in spec_values(spec, where):
            with_value = copy.deepcopy(config.config)
            apply_override(with_value, str(key).split("."), value, f"{source}: sweep.")
            try:
                ConfigParser.from_dict(with_value, f"sweep.{key}={value!r}", restricted=config.restricted)
            except UserError as e:
                raise UserError(f"{source}: {one_line(e)}") from None
        current = lookup(config.config, key)
        if "float" in spec and isinstance(current, int) and not isinstance(current, bool):
            raise UserError(f"{where}: the config has an integer here ({current}): use {{\"int\": [low, high]}}")
    return space


def spec_values(spec: Any, where: str) -> list:
    """A space entry's ends (a range) or values (a choice), after checking its form."""
    kinds = [kind for kind in KINDS if isinstance(spec, dict) and kind in spec]
    if len(kinds) != 1:
        typo = suggest(str(next(iter(spec))), KINDS) if isinstance(spec, dict) and spec and not kinds else ""
        raise UserError(f'{where}: expected one of {{"float": [low, high]}}, {{"int": [low, high]}} or '
                        f'{{"choice": [values]}}, got {shorten(repr(spec))}{typo}')
    kind, value = kinds[0], spec[kinds[0]]
    allowed = [kind] if kind == "choice" else [kind, "log", "step"]
    if extra := [key for key in spec if key not in allowed]:
        raise UserError(f"{where}: unknown key '{extra[0]}'{suggest(str(extra[0]), allowed)}; allowed: "
                        f"{', '.join(allowed)}")
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(v, CHOICES) for v in value):
            raise UserError(f"{where}: choice: expected a non-empty list of numbers, strings, booleans or null")
        return value
    numeric = all(isinstance(v, BOUNDS[kind]) and not isinstance(v, bool) for v in value) \
        if isinstance(value, list) and len(value) == 2 else False
    if not numeric or not value[0] < value[1]:
        kinds = "integers" if kind == "int" else "numbers"
        raise UserError(f"{where}: {kind}: expected [low, high], {kinds} with low < high, got {shorten(repr(value))}")
    if spec.get("log") and value[0] <= 0:
        raise UserError(f"{where}: a log range needs low > 0, got {value[0]}")
    step = spec.get("step")
    if step is not None and (not isinstance(step, BOUNDS[kind]) or isinstance(step, bool) or step <= 0
                             or spec.get("log")):
        raise UserError(f"{where}: step: expected a positive {'integer' if kind == 'int' else 'number'}, "
                        "and no log range with it")
    if not isinstance(spec.get("log", False), bool):
        raise UserError(f"{where}: log: expected true or false")
    return value


def lookup(config: dict, key: str) -> Any:
    """The config's value at a dotted key (None where it has none: a new argument)."""
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def suggest_value(trial, key: str, spec: dict) -> Any:
    if "choice" in spec:
        return trial.suggest_categorical(key, spec["choice"])
    low, high = spec.get("float", spec.get("int"))
    if "int" in spec:
        return trial.suggest_int(key, low, high, step=spec.get("step", 1), log=spec.get("log", False))
    return trial.suggest_float(key, low, high, step=spec.get("step"), log=spec.get("log", False))


def shown(url: str) -> str:
    """A storage URL for messages: its password hidden."""
    from sqlalchemy.engine import make_url

    with contextlib.suppress(Exception):
        return make_url(url).render_as_string(hide_password=True)
    return url.rpartition("@")[2]


def try_lock(path: Path):
    """An exclusive lock on `path` (the open file), or None when another process holds it."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


@dataclass
class Trial:
    """One trial as sweep.py trains it: its number, parameters, run request and per-epoch report."""

    number: int
    params: dict
    request: Request
    report: Callable[[int, dict], None]  # the trainer's epoch callback: reports to the pruner, may raise TrialPruned
    lock: Any  # sweep.lock, held while this process trains the trial

    @property
    def run_dir(self) -> Path:
        return Path(self.request.resume or self.request.run_dir)


class Sweep:
    """The study of a config's search space: its trials to train, their outcomes, the results table."""

    def __init__(self, request: Request, storage: str | None, pruner: str = "median", create: bool = True):
        self.request = request
        self.config = load_config(request)
        self.space = check_space(self.config)
        self.mode, _, self.monitor = self.config["trainer"]["monitor"].partition(" ")
        if self.mode == "off":
            raise UserError(f"{self.config.source}: trainer.monitor: 'off', but a sweep optimises the monitored value "
                            "(e.g. 'min val_loss')")
        self.optuna = import_optuna()
        self.name = self.config["name"]
        self.folder = Path(self.config["trainer"]["save_dir"]) / self.name / "sweep"
        if storage is None and not create and not (self.folder / "study.db").is_file():
            raise UserError(f"{self.folder / 'study.db'}: no study here yet (sweep.py --trials N makes it)")
        if storage is None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.url = storage or f"sqlite:///{self.folder / 'study.db'}"
        if self.url.startswith("postgresql://"):  # requirements-sweep.txt's driver (SQLAlchemy 2.1: psycopg 3)
            self.url = "postgresql+psycopg2://" + self.url.removeprefix("postgresql://")
        self.storage = self.open_storage()
        self.study = self.open_study(pruner, create)
        self.tracking = self.track() if create else Tracking({}, enabled=False)

    def open_storage(self):
        from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError, SQLAlchemyError

        try:
            for attempt in range(3):
                try:
                    return self.optuna.storages.RDBStorage(self.url)
                except (IntegrityError, OperationalError, ProgrammingError):  # another process made the tables
                    # at the same moment (SQLite: "table ... already exists"), or the server is not up yet
                    if attempt == 2:
                        raise
                    time.sleep(1)
        except ImportError as e:  # the database's driver
            raise UserError(f"--storage {shown(self.url)}: its driver is not installed "
                            f"({one_line(e.__cause__ or e)}); {INSTALL} installs PostgreSQL's") from None
        except (SQLAlchemyError, ValueError) as e:
            raise UserError(f"--storage {shown(self.url)}: cannot open it: {one_line(e.__cause__ or e)[:300]}") \
                from None

    def open_study(self, pruner: str, create: bool):
        """The config's study (its `name`), made on first use; a study made with another config is refused."""
        pruners = {"median": self.optuna.pruners.MedianPruner, "hyperband": self.optuna.pruners.HyperbandPruner,
                   "none": self.optuna.pruners.NopPruner}
        if not create and self.name not in self.optuna.get_all_study_names(self.storage):
            raise UserError(f"--storage {shown(self.url)}: no study named '{self.name}'")
        study = self.optuna.create_study(storage=self.storage, study_name=self.name, load_if_exists=True,
                                         direction="minimize" if self.mode == "min" else "maximize",
                                         pruner=pruners[pruner]())
        made_with = study.user_attrs.get("config")
        if made_with is None:
            study.set_user_attr("config", self.config.config)
        elif made_with != self.config.config:
            changes = "; ".join(diff_configs(made_with, self.config.config))
            raise UserError(f"{self.config.source}: study '{self.name}' in {shown(self.url)} was made with another "
                            f"config ({changes[:300]}): run it with that one, or start a new study with "
                            "--set name=<new name>")
        return study

    def track(self) -> Tracking:
        """With `tracking` in the config, the study is one tracked run and each trial a child of it; its id is
        kept with the study, so every process and every re-run of the sweep adds its trials to the same parent."""
        check_installed(self.config["tracking"])
        tracking = Tracking(self.config.config)
        known = self.study.user_attrs.get("tracking_run_id")
        with contextlib.nullcontext() if known else self.study_lock():  # processes starting together: one makes it
            known = known or self.study.user_attrs.get("tracking_run_id")
            parent_id = tracking.start(self.folder, known)
            if parent_id and parent_id != known:
                self.study.set_user_attr("tracking_run_id", parent_id)
        return tracking

    @contextlib.contextmanager
    def study_lock(self, timeout: float = 30.0) -> Iterator[None]:
        """One process of the study at a time, in its database: the holder is the process that made the empty
        study '<name>:lock' (study names are unique there), and deletes it when done. A process that waited
        `timeout` takes the lock over (its holder died holding it)."""
        name, deadline = f"{self.name}:lock", time.monotonic() + timeout
        while True:
            try:
                self.optuna.create_study(storage=self.storage, study_name=name)
                break
            except self.optuna.exceptions.DuplicatedStudyError:
                if time.monotonic() > deadline:
                    print(f"sweep: took over the lock '{name}' in {shown(self.url)}, held for {timeout:.0f} s (by a "
                          "process that died?)", flush=True)
                    break
                time.sleep(0.2)
        try:
            yield
        finally:
            with contextlib.suppress(KeyError):  # a holder that was only slow, after the takeover
                self.optuna.delete_study(study_name=name, storage=self.storage)

    @contextlib.contextmanager
    def database(self) -> Iterator[None]:
        """The study's database failing on the way (a lost connection): one line and exit 1, not a traceback."""
        from sqlalchemy.exc import SQLAlchemyError

        try:
            yield
        except (SQLAlchemyError, self.optuna.exceptions.StorageInternalError) as e:
            raise TrainingError(f"--storage {shown(self.url)}: {one_line(e)[:300]}; run the same command again "
                                "to go on") from None

    # ---- the trials to train --------------------------------------------------------------------------------
    def trials(self, total: int) -> Iterator[Trial]:
        """Trials left by a process that died (resumed), then new ones until the study holds `total`."""
        trained = 0
        while (trial := self.orphan() or self.new_trial(total)) is not None:
            trained += 1
            yield trial
        if not trained:
            print(f"sweep: study '{self.name}' has its {total} trials: nothing to train", flush=True)

    def counted(self) -> list:
        """The study's trials, without those asked for beyond its total by a race of two processes."""
        return [t for t in self.study.get_trials(deepcopy=False) if "over" not in t.user_attrs]

    def orphan(self) -> Trial | None:
        """A running trial whose folder is here and whose sweep.lock is free: its process died."""
        for frozen in self.study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.RUNNING,)):
            run_dir = frozen.user_attrs.get("run_dir")  # set once the folder and its lock exist
            if run_dir and Path(run_dir).is_dir() and (lock := try_lock(Path(run_dir) / LOCK)):
                print(f"sweep: trial {frozen.number} was left unfinished by a process that ended: resuming it in "
                      f"{run_dir}", flush=True)
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(
                    self.storage.get_study_id_from_name(self.name), frozen.number)
                return self.trial(self.optuna.trial.Trial(self.study, trial_id), frozen.params, Path(run_dir), lock)
        return None

    def new_trial(self, total: int) -> Trial | None:
        if len(self.counted()) >= total:
            return None
        asked = self.study.ask()
        numbers = sorted(t.number for t in self.counted())
        if numbers.index(asked.number) >= total:  # another process asked for the last one first
            asked.set_user_attr("over", f"asked beyond the study's {total} trials; never trained")
            self.study.tell(asked, state=self.optuna.trial.TrialState.FAIL)
            return None
        run_dir = self.folder / f"trial-{asked.number}"
        try:
            run_dir.mkdir(parents=True)
        except FileExistsError:
            self.study.tell(asked, state=self.optuna.trial.TrialState.FAIL)
            raise UserError(f"{run_dir}: already exists, but study '{self.name}' in {shown(self.url)} did not have "
                            "this trial (a new database?): move the folder away, or start a new study with "
                            "--set name=<new name>") from None
        lock = try_lock(run_dir / LOCK)
        params = {key: suggest_value(asked, key, spec) for key, spec in self.space.items()}
        asked.set_user_attr("run_dir", str(run_dir.resolve()))  # last: a trial with it is locked (see orphan)
        print(f"sweep: trial {asked.number}: {format_params(params)} in {run_dir}", flush=True)
        return self.trial(asked, params, run_dir, lock)

    def trial(self, optuna_trial, params: dict, run_dir: Path, lock) -> Trial:
        """The trial's run: the config with its parameters, resumed from its folder's checkpoint if it has one."""
        overrides = [*self.request.overrides, *(f"{key}={json.dumps(value)}" for key, value in params.items())]
        resume = str(run_dir) if candidates(run_dir) else None
        request = replace(self.request, overrides=overrides, resume=resume, run_dir=None if resume else str(run_dir),
                          tracking_parent=self.study.user_attrs.get("tracking_run_id"))
        epochs = params.get("trainer.epochs", self.config["trainer"]["epochs"])

        def report(epoch: int, result: dict) -> None:
            value = result.get(self.monitor)
            if value is None or not math.isfinite(value):
                return
            optuna_trial.report(value, epoch)
            if epoch < epochs and optuna_trial.should_prune():  # the last epoch's trial is done: it completes
                logging.getLogger("train").info("Pruned by the sweep after epoch %d (%s %.6g)", epoch, self.monitor,
                                                value)
                raise TrialPruned(f"pruned after epoch {epoch} ({self.monitor} {value:.6g})")

        return Trial(optuna_trial.number, params, request, report, lock)

    # ---- outcomes -----------------------------------------------------------------------------------------
    def finish(self, trial: Trial) -> None:
        """The trial trained to its end: its value is the best monitored value its checkpoint records."""
        value = checkpoint.load(trial.run_dir / LATEST)["monitor_best"]
        if math.isfinite(value):
            self.study.tell(trial.number, value)
            print(f"sweep: trial {trial.number}: best {self.monitor} {value:.6g}", flush=True)
        else:
            self.failed(trial, UserError(f"{self.monitor} never had a finite value"))
        trial.lock.close()

    def pruned(self, trial: Trial, reason: TrialPruned) -> None:
        self.study.tell(trial.number, state=self.optuna.trial.TrialState.PRUNED)
        print(f"sweep: trial {trial.number} {reason}; its run directory keeps that epoch's checkpoint", flush=True)
        trial.lock.close()

    def failed(self, trial: Trial, error: UserError) -> None:
        self.study.tell(trial.number, state=self.optuna.trial.TrialState.FAIL)
        print(f"sweep: trial {trial.number} failed: {one_line(error)}", flush=True)
        trial.lock.close()

    # ---- results ------------------------------------------------------------------------------------------
    def summarize(self) -> None:
        """The table of trials (printed and written as trials.csv), the plots, and the best trial's commands."""
        keys = list(self.space)
        rows = [[t.number, t.state.name, "" if t.value is None else f"{t.value:.6g}",
                 *(t.params.get(key, "") for key in keys), t.user_attrs.get("run_dir", "")]
                for t in self.counted()]
        header = ["number", "state", self.monitor, *keys, "run_dir"]
        self.folder.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([header, *rows])
        checkpoint.save_atomic(text.getvalue().encode(), self.folder / RESULTS, what="sweep results")
        shown_rows = [header, *([*(f"{c:.4g}" if isinstance(c, float) else c for c in row[:-1]), relative(row[-1])]
                                for row in rows)]  # the CSV keeps every digit and the full path
        widths = [max(len(str(row[i])) for row in shown_rows) for i in range(len(header))]
        for row in shown_rows:
            print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
        print(f"sweep: results written to {self.folder / RESULTS}")
        self.plot()
        for name in (RESULTS, "history.png", "importances.png"):
            self.tracking.log_artifact(self.folder / name)
        self.tracking.end("FINISHED")
        if any(t.state == self.optuna.trial.TrialState.COMPLETE for t in self.counted()):
            best = self.study.best_trial
            run_dir = relative(best.user_attrs["run_dir"])
            print(f"sweep: best trial {best.number}: {self.monitor} {best.value:.6g} ({format_params(best.params)})\n"
                  f"  train it again: python train.py -c {run_dir}/config.json\n"
                  f"  evaluate it:    python test.py -r {run_dir}")

    def plot(self) -> None:
        """history.png and importances.png (Optuna's matplotlib plots), where matplotlib is installed."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            from optuna.visualization import matplotlib as plots
        except ImportError:
            print(f"sweep: no plots: matplotlib is not installed ({INSTALL})")
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's matplotlib plots are 'experimental'
            for name, plot in (("history.png", plots.plot_optimization_history),
                               ("importances.png", plots.plot_param_importances)):
                try:
                    axes = plot(self.study)
                except (ValueError, RuntimeError) as e:  # importances need two finished trials that differ
                    print(f"sweep: no {name}: {one_line(e)}")
                    continue
                axes.figure.savefig(self.folder / name, bbox_inches="tight", dpi=100)
                matplotlib.pyplot.close(axes.figure)
                print(f"sweep: plot written to {self.folder / name}")


def relative(path: str) -> str:
    """A path as printed: relative to the working directory when it is under it."""
    with contextlib.suppress(ValueError):
        return str(Path(path).relative_to(Path.cwd()))
    return path


def format_params(params: dict) -> str:
    return ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in params.items())
