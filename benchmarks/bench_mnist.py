"""How much the framework costs on top of a hand-written PyTorch loop: MNIST, MnistModel (LeNet), batch 128.

    python benchmarks/bench_mnist.py                      # CPU, 2 epochs, 3 interleaved repetitions
    python benchmarks/bench_mnist.py --device cuda --repeats 5
    python benchmarks/bench_mnist.py --same-allocator     # (a) gets train.py's CPU malloc settings too
    python benchmarks/bench_mnist.py --augment            # (b) against (c): (b) with on-device crop + flip
    python benchmarks/bench_mnist.py --tracking           # (b) against (d): (b) tracked by MLflow
    python benchmarks/bench_mnist.py --device cuda --amp bf16 --channels-last --compile   # both ways get them

One run of this script, on one device, trains the same model on the same data with the same batch size,
optimizer (Adam, lr 0.002) and number of steps two ways, each in a fresh process:

  (a) hand  : a minimal loop: images decoded once into a uint8 tensor on the device, batches taken by
              index from a seeded permutation, normalised per batch; validation (loss, accuracy) each epoch;
              cuDNN's autotuner on, as train.py sets it.
  (b) train : `python train.py -c configs/mnist.json` as shipped (validation split 0.1, metrics, StepLR,
              logging, TensorBoard, checkpoints every epoch, progress bar when stderr is a terminal) with the
              data, batch size, epochs and save folder set by --set overrides.
  (c) --augment: (b) with `data_loader.args.augment={crop_padding: 2, flip: true}` (batched on the device),
              timed against (b) instead of (a).
  (d) --tracking: (b) with `tracking={type: mlflow}` (the embedded SQLite store in the save folder; needs
              requirements-tracking.txt), timed against (b) instead of (a).

--batch-size, --amp, --channels-last and --compile apply to both ways: (a) gets autocast (and a GradScaler for fp16),
a channels_last model and inputs and torch.compile as a user would add them; (b) the trainer keys of the same names.
With --compile each way runs once untimed first, so that both read the compiled code from torch.compile's on-disk
cache (each process still traces).

The timed span is whole epochs, validation included: (a) its epoch loop, (b) `Trainer.train()`. Before it, (b)
checks its first training and validation batch (forward, backward, nothing kept), which compiles with --compile
and starts cuBLAS/cuDNN on CUDA; (a) does the same before its clock starts. Both
processes import what they use before the clock starts; the cost of imports and data loading is what
the start-up figure measures: from launching `python train.py` to the end of its first optimizer step,
next to `python -c "import torch"`. (a) and (b) alternate, so slow phases of a shared machine hit both.

Data: the four MNIST files (.gz or not) in --data (default ../shared/datasets/mnist next to the repo),
decompressed once into a temporary <dir>/MNIST/raw/ as torchvision leaves them; the bundled
data/mnist_small (10k images) when that folder has no MNIST files.
"""

import argparse
import gzip
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
BATCH_SIZE, LR, VALIDATION_FRACTION = 128, 0.002, 0.1  # as configs/mnist.json, with the batch size of the issue
MEAN, STD = 0.1307, 0.3081


class FirstStepAdam(torch.optim.Adam):
    """Adam that prints the wall-clock time after its first step and ends the process: the start-up
    measurement names it as the optimizer (`optimizer.type=benchmarks.bench_mnist.FirstStepAdam`)."""

    def step(self, closure=None):
        super().step(closure)
        print(f"FIRST_STEP {time.time()}", flush=True)
        os._exit(0)


# ---- data --------------------------------------------------------------------------------------------
def find_mnist(folder: Path) -> Path | None:
    """The folder holding the four MNIST files (.gz or not): `folder` itself or its MNIST/raw/."""
    for candidate in (folder, folder / "MNIST" / "raw"):
        if all((candidate / n).is_file() or (candidate / f"{n}.gz").is_file() for n in FILES):
            return candidate
    return None


def prepare_data(source: Path, data_dir: Path) -> None:
    """Decompressed copies of the MNIST files in `data_dir`/MNIST/raw/ (the layout the loader reads)."""
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, raw / name)
        else:
            with gzip.open(source / f"{name}.gz", "rb") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)


# ---- the two workers (each runs in its own process) ------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_hand(data_dir: Path, args, optimizer_class=torch.optim.Adam) -> tuple[float, float]:
    """(a) The loop a user would write by hand, with the options of `args` (batch size, AMP, channels_last, compile)
    as a user would add them; returns the (wall, CPU) seconds of `args.epochs` epochs with validation."""
    import contextlib

    import torch.nn.functional as F

    from data_loader.datasets import read_idx
    from model.model import MnistModel

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as train.py sets it unless `deterministic` (utils/seed.py)
    raw = data_dir / "MNIST" / "raw"
    images = read_idx(raw / FILES[0]).unsqueeze(1).to(device)
    labels = read_idx(raw / FILES[1]).long().to(device)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1)).to(device)
    n_valid = int(len(images) * VALIDATION_FRACTION)
    valid_idx, train_idx = order[:n_valid], order[n_valid:]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = MnistModel().to(device, memory_format=memory_format)
    optimizer = optimizer_class(model.parameters(), lr=LR)
    forward = torch.compile(model) if args.compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if args.amp != "off" else contextlib.nullcontext

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ((images[idx].float() / 255 - MEAN) / STD).contiguous(memory_format=memory_format), labels[idx]

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # as (b)'s check_first_batches
        model.train()
        data, target = batch(train_idx[: args.batch_size])
        with autocast():
            F.nll_loss(forward(data), target).backward()
        model.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad(), autocast():
            model(batch(valid_idx[: args.batch_size])[0])
    sync(device)
    started, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(args.epochs):
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), device=device)]
        for i in range(0, len(perm), args.batch_size):
            data, target = batch(perm[i : i + args.batch_size])
            with autocast():
                loss = F.nll_loss(forward(data), target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        model.eval()
        total_loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        with torch.no_grad():
            for i in range(0, n_valid, args.batch_size):
                data, target = batch(valid_idx[i : i + args.batch_size])
                with autocast():
                    output = model(data)
                total_loss += F.nll_loss(output, target, reduction="sum")
                correct += (output.argmax(1) == target).sum()
        print(f"val_loss {total_loss.item() / n_valid:.4f}  val_accuracy {correct.item() / n_valid:.4f}")
    sync(device)
    return time.perf_counter() - started, cpu_seconds() - cpu


def trainer_overrides(data_dir: Path, save_dir: Path, epochs: int, args) -> list[str]:
    """configs/mnist.json set to the benchmark's data, batch size, epochs and device, and `args`' GPU options."""
    gpu_options = ([f"trainer.amp={args.amp}"] if args.amp != "off" else []) + \
        ["trainer.channels_last=true"] * args.channels_last + ["trainer.compile=true"] * args.compile
    return [f"data_loader.args.data_dir={data_dir}", f"data_loader.args.batch_size={args.batch_size}",
            f"data_loader.args.validation_split={VALIDATION_FRACTION}", f"optimizer.args.lr={LR}",
            f"trainer.epochs={epochs}", f"trainer.save_dir={save_dir}", f"device={args.device}", *gpu_options]


VARIANTS = {"train": [], "augment": ["data_loader.args.augment={crop_padding: 2, flip: true}"],
            "tracking": ["tracking={type: mlflow}"]}  # (b), (c), (d): their overrides


def run_trainer(data_dir: Path, args, variant: str = "train") -> tuple[float, float]:
    """(b) `train.py -c configs/mnist.json` in this process; returns the (wall, CPU) seconds `Trainer.train()` took."""
    with tempfile.TemporaryDirectory() as save_dir:
        overrides = trainer_overrides(data_dir, Path(save_dir), args.epochs, args) + VARIANTS[variant]
        return timed_train(["-c", str(ROOT / "configs" / "mnist.json"), "--set", *overrides])


def timed_train(argv: list[str]) -> tuple[float, float]:
    """`train.main(argv)` in this process; the (wall, CPU) seconds its `Trainer.train()` took."""
    import train
    from trainer.trainer import Trainer

    seconds = []
    train_epochs = Trainer.train

    def timed(self):
        sync(self.device)
        started, cpu = time.perf_counter(), cpu_seconds()
        result = train_epochs(self)
        sync(self.device)
        seconds.append((time.perf_counter() - started, cpu_seconds() - cpu))
        return result

    Trainer.train = timed
    train.main(argv)
    return seconds[0]


def worker(args) -> None:
    device = torch.device(args.device)
    if args.worker == "hand-startup":
        run_hand(Path(args.data_dir), args, FirstStepAdam)
    if args.worker == "hand":
        seconds, cpu = run_hand(Path(args.data_dir), args)
    else:
        seconds, cpu = run_trainer(Path(args.data_dir), args, args.worker)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    Path(args.out).write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_bytes": peak}))


# ---- the driver ----------------------------------------------------------------------------------------
def worker_env(args) -> dict:
    """--same-allocator: both ways run with the glibc malloc settings train.py sets for CPU runs
    (utils.allocator.keep_freed_memory), so the ratio is the framework's own cost, not its allocator tuning."""
    if not args.same_allocator:
        return dict(os.environ)
    from utils.allocator import MALLOC_SETTINGS

    return {**os.environ, **{name: str(value) for name, value in MALLOC_SETTINGS.items()}}


def spawn(mode: str, data_dir: Path, args, out: Path) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--data-dir", str(data_dir), "--out", str(out),
               *worker_options(args)]
    # the console log goes nowhere (its cost stays); stderr is ours, so a terminal shows the progress bar
    result = subprocess.run(command, cwd=ROOT, env=worker_env(args), stdout=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        sys.exit(f"error: the {mode} worker failed (exit {result.returncode}): {' '.join(command)}")
    return json.loads(out.read_text())


def worker_options(args) -> list[str]:
    """The options a worker process takes from the driver's command line."""
    options = ["--epochs", str(args.epochs), "--device", args.device, "--batch-size", str(args.batch_size),
               "--amp", args.amp]
    return options + ["--channels-last"] * args.channels_last + ["--compile"] * args.compile


def startup_seconds(command: list[str]) -> float:
    """Seconds from launching `command` to its exit, or to its FIRST_STEP line when it prints one."""
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "CI": "true"})
    ended = time.time()
    for line in result.stdout.splitlines():
        if line.startswith("FIRST_STEP "):
            return float(line.split()[1]) - started
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{result.stderr.strip()}")
    return ended - started


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


LABELS = {"hand": "(a) hand-written loop", "train": "(b) Trainer + config", "augment": "(c) (b) + crop, flip",
          "tracking": "(d) (b) + MLflow"}


def report(results: dict, pair: tuple[str, str], n_train: int, args) -> None:
    print(f"\nwhole epochs with validation ({args.repeats} runs each, mean ± sd):")
    for mode in pair:
        seconds = [r["seconds"] for r in results[mode]]
        rate = n_train * args.epochs / statistics.mean(seconds)
        peak = max(r["peak_bytes"] for r in results[mode]) / 2**20
        memory = "peak CUDA memory" if args.device.startswith("cuda") else "peak RSS"
        cpu = mean_sd([r["cpu_seconds"] for r in results[mode]])
        print(f"  {LABELS[mode]:24s} {mean_sd(seconds)} s   {rate:,.0f} samples/s   {memory} {peak:,.0f} MiB   "
              f"CPU {cpu} s")
    names = "/".join(LABELS[mode][:3] for mode in reversed(pair))
    for key, kind in (("seconds", "wall"), ("cpu_seconds", "CPU")):
        ratios = [b[key] / a[key] for a, b in zip(*(results[mode] for mode in pair))]
        print(f"  ratio {names} of {kind} time: {mean_sd(ratios)} (mean ± sd over the interleaved pairs), "
              f"median {statistics.median(ratios):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "mnist"),
                        help="folder with the MNIST files (default: ../shared/datasets/mnist next to the repo)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed run (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each way, interleaved (default: 3)")
    parser.add_argument("--startup-repeats", type=int, default=5, help="start-up measurements of each (default: 5)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"(default: {BATCH_SIZE})")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                        help="mixed precision on both ways (default: off)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model and inputs on both ways")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model on both ways")
    parser.add_argument("--same-allocator", action="store_true",
                        help="give the hand-written loop the malloc settings train.py uses on CPU too")
    parser.add_argument("--augment", action="store_true",
                        help="time (b) against (c), (b) with on-device crop and flip, instead of (a) against (b)")
    parser.add_argument("--tracking", action="store_true",
                        help="time (b) against (d), (b) tracked by MLflow (embedded store), instead of (a) against (b)")
    parser.add_argument("--worker", choices=["hand", "hand-startup", *VARIANTS], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from data_loader.datasets import read_idx
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda: CUDA is not available on this machine")

    source = find_mnist(Path(args.data)) or find_mnist(ROOT / "data" / "mnist_small")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        prepare_data(source, data_dir)
        n_train = len(read_idx(data_dir / "MNIST" / "raw" / FILES[1]))
        n_train -= int(n_train * VALIDATION_FRACTION)
        print(f"MNIST from {source}: {n_train} training samples per epoch, batch {args.batch_size}, "
              f"{args.epochs} epochs, device {args.device}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads"
              + (", the same malloc settings for both" if args.same_allocator else ""))

        pair = ("train", "augment") if args.augment else ("train", "tracking") if args.tracking else ("hand", "train")
        results = {mode: [] for mode in pair}
        if args.compile:  # the first process to compile fills the on-disk cache that later ones read
            for mode in pair:
                warm_up = spawn(mode, data_dir, args, Path(tmp) / f"{mode}-warm-up.json")
                print(f"  warm-up {mode:7s} {warm_up['seconds']:.2f} s (not counted)", flush=True)
        for repeat in range(args.repeats):
            for mode in pair if repeat % 2 == 0 else pair[::-1]:
                results[mode].append(spawn(mode, data_dir, args, Path(tmp) / f"{mode}{repeat}.json"))
                print(f"  run {repeat + 1} {mode:7s} {results[mode][-1]['seconds']:.2f} s", flush=True)
        if args.augment or args.tracking:
            report(results, pair, n_train, args)
            return

        startup_config = ["-c", "configs/mnist.json", "--set", *trainer_overrides(
            data_dir, Path(tmp) / "saved", 1, args), "optimizer.type=benchmarks.bench_mnist.FirstStepAdam"]
        commands = {
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "... and import torch._dynamo": [sys.executable, "-c", "import time, torch, torch._dynamo; "
                                             "print('FIRST_STEP', time.time())"],
            "(a) hand-written loop to first step": [sys.executable, __file__, "--worker", "hand-startup", "--data-dir",
                                                    str(data_dir), *worker_options(args)],
            "(b) train.py -c ... to first step": [sys.executable, "train.py", *startup_config],
        }
        startup = {label: [] for label in commands}
        for _ in range(args.startup_repeats):
            for label, command in commands.items():
                startup[label].append(startup_seconds(command))

    if args.repeats:
        report(results, pair, n_train, args)
    if not args.startup_repeats:
        return
    print(f"\nstart-up, seconds from launch ({args.startup_repeats} runs each, mean ± sd; torch.optim's first step "
          "imports torch._dynamo, in any script):")
    for label, seconds in startup.items():
        print(f"  {label:40s} {mean_sd(seconds)} s")
    base = startup["python -c 'import torch'"]
    for label in list(startup)[2:]:
        extra = [t - i for t, i in zip(startup[label], base)]
        print(f"  {label[:3] + ' minus import torch':40s} {mean_sd(extra)} s")

if __name__ == "__main__":
    main()
