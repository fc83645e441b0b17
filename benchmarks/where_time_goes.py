"""Where the time of bench_mnist.py's two ways goes, one way per run: for a GPU lease, where a few runs must say
why (b) is slower, not only that it is.

    python benchmarks/where_time_goes.py --way hand --device cuda        # full MNIST from ../shared/datasets/mnist
    python benchmarks/where_time_goes.py --way train --device cuda
    python benchmarks/where_time_goes.py --way train --kernels --data data/mnist_small
    OMP_NUM_THREADS=1 python benchmarks/where_time_goes.py --bench imagefolder --way train
    python benchmarks/where_time_goes.py --bench imagefolder --images 640 --epochs 1 --way train --instructions

(a) the hand-written loop or (b) train.py, as bench_mnist.py runs them (2 epochs, batch 128, --amp and
--channels-last as there), or with --bench imagefolder as bench_imagefolder.py does (3,000 generated JPEGs, 2
workers). Printed after the run: the timed span's wall time and each thread's CPU seconds (the main thread,
autograd's device thread, OpenMP's pool; not the DataLoader workers, which are processes); the time spent waiting
for a DataLoader's next batch, and inside the model's forward, backward, the optimizer's step and zero_grad, per
call, both ways; for (b) also the trainer's parts (nested: train_batch holds train_step and the optimizer step).
With --kernels instead, one epoch under torch.profiler: the kernels launched (CUDA) or aten operators dispatched
(CPU), by name, and the GPU's busy time. With --python-calls instead, the timed span under cProfile: the Python
functions called and their own time. With --instructions instead, the run under valgrind's callgrind, counting only
in the timed span: the instructions each process executed (the main one, each DataLoader worker), a count that other
jobs on the machine do not move (and far slower to get).
"""

import argparse
import collections
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_imagefolder, bench_mnist  # noqa: E402

PARTS = collections.Counter()  # wall seconds inside the timed span's parts, and "<part> calls", once time_parts ran
REPORT: list[str] = []  # printed after the run, below its own output
BENCHES = {"mnist": bench_mnist, "imagefolder": bench_imagefolder}


def thread_seconds() -> dict[str, tuple[str, float]]:
    """{thread id: (name, CPU seconds)} of this process's live threads (Linux)."""
    seconds = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds[tid] = (name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return seconds


def time_parts(way: str) -> None:
    """Time what both ways do (the DataLoader's next batch, the model's forward, backward, the optimizer's step and
    zero_grad) and, for (b), the trainer's parts."""
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    from model.model import MnistModel

    parts = [(_MultiProcessingDataLoaderIter, "__next__"), (MnistModel, "forward"),
             (bench_imagefolder.SmallCNN, "forward"), (torch.Tensor, "backward"), (torch.optim.Adam, "step"),
             (torch.optim.SGD, "step"), (torch.optim.Optimizer, "zero_grad")]
    if way == "train":
        from data_loader.datasets import InMemoryImages
        from trainer import optim_step, trainer

        parts += [(trainer.Trainer, "train_batch"), (trainer.Trainer, "train_step"),
                  (optim_step.OptimStep, "__call__"), (optim_step.OptimStep, "finish"),
                  (trainer.MetricTracker, "update"), (trainer, "to_device"), (trainer, "samples_in"),
                  (trainer.Trainer, "_grad_sync"), (trainer.Trainer, "_after_step"),
                  (trainer.Trainer, "_log_progress"), (trainer.Trainer, "_valid_epoch"), (trainer.Trainer, "_save"),
                  (trainer.Trainer, "_log_epoch"), (InMemoryImages, "get_batch")]
    for owner, name in parts:
        wrapped = getattr(owner, name)

        @functools.wraps(wrapped)
        def timed(*args, wrapped=wrapped, label=name, **kwargs):
            started = time.perf_counter()
            try:
                return wrapped(*args, **kwargs)
            finally:
                PARTS[label] += time.perf_counter() - started
                PARTS[label + " calls"] += 1

        setattr(owner, name, timed)


def around_timed_span(way: str, enter, leave, bench: types.ModuleType) -> None:
    """Call enter() and leave() around (a)'s epoch loop (its two perf_counter calls in `bench`) or (b)'s
    Trainer.train()."""
    if way == "hand":
        clock, calls = time.perf_counter, []

        def perf_counter() -> float:
            calls.append(None)
            (enter if len(calls) == 1 else leave)()
            return clock()

        bench.time = types.SimpleNamespace(perf_counter=perf_counter)  # run_hand's clock only
        return
    from trainer.trainer import Trainer

    train = Trainer.train

    def timed_train(self):
        bench_mnist.sync(self.device)
        enter()
        try:
            return train(self)
        finally:
            bench_mnist.sync(self.device)
            leave()

    Trainer.train = timed_train


def run(way: str, data_dir: Path, args) -> None:
    if args.bench == "imagefolder":
        (bench_imagefolder.run_hand if way == "hand" else bench_imagefolder.run_trainer)(data_dir, args.epochs)
    elif way == "hand":
        bench_mnist.run_hand(data_dir, args)
    else:
        with tempfile.TemporaryDirectory() as save_dir:
            import train

            train.main(["-c", str(ROOT / "configs" / "mnist.json"), "--set",
                        *bench_mnist.trainer_overrides(data_dir, Path(save_dir), args.epochs, args)])


def threads_and_parts(way: str, data_dir: Path, args) -> None:
    state = {}

    def enter():
        PARTS.clear()  # (b)'s first-batch check is before the span
        state["threads"], state["started"] = thread_seconds(), time.perf_counter()

    def leave():
        wall, after = time.perf_counter() - state["started"], thread_seconds()
        busy = {tid: (name, cpu - state["threads"].get(tid, (name, 0.0))[1]) for tid, (name, cpu) in after.items()}
        REPORT.append(f"{bench_mnist.LABELS[way]}: {wall:.3f} s wall; CPU seconds by thread (those over 5 ms):")
        by_cpu = sorted(busy.values(), key=lambda item: -item[1])
        REPORT.extend(f"  {name:18s} {cpu:.3f}" for name, cpu in by_cpu if cpu > 0.005)

    around_timed_span(way, enter, leave, BENCHES[args.bench])
    time_parts(way)
    run(way, data_dir, args)
    for label, seconds in PARTS.most_common():
        if not label.endswith(" calls"):
            calls = PARTS[label + " calls"]
            REPORT.append(f"  {label:14s} {seconds:7.3f} s  {calls:6d} calls  {1e6 * seconds / calls:8.1f} µs/call")


def kernels(way: str, data_dir: Path, args) -> None:
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.startswith("cuda")
    profiler = profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda)
    around_timed_span(way, profiler.__enter__, lambda: profiler.__exit__(None, None, None), BENCHES[args.bench])
    run(way, data_dir, argparse.Namespace(**{**vars(args), "epochs": 1}))
    events = profiler.key_averages()
    if cuda:
        chosen = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = f", GPU busy {sum(e.self_device_time_total for e in chosen) / 1e6:.3f} s"
    else:
        chosen, busy = [e for e in events if e.key.startswith("aten::")], ""
    REPORT.append(f"{bench_mnist.LABELS[way]}, one epoch under torch.profiler: {sum(e.count for e in chosen)} "
                  f"{'kernels' if cuda else 'aten operators'}{busy}; the most frequent:")
    REPORT.extend(f"  {event.count:7d}  {event.key[:100]}" for event in sorted(chosen, key=lambda e: -e.count)[:25])


def python_calls(way: str, data_dir: Path, args) -> None:
    """cProfile over the timed span only: the Python functions called, by their own time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    around_timed_span(way, profiler.enable, profiler.disable, BENCHES[args.bench])
    run(way, data_dir, args)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    REPORT.append(f"{bench_mnist.LABELS[way]}, the timed span under cProfile:{text.getvalue()}")


def count_instructions(args) -> None:
    """This run again under callgrind, instrumented only in the timed span (callgrind_control switches it from inside;
    workers forked inside are counted too); then each process's count. Both ways get train.py's malloc settings."""
    from utils.allocator import MALLOC_SETTINGS

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.callgrind_out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        inner = [arg for arg in sys.argv[1:] if arg != "--instructions"] + ["--instrumented"]
        env = {**os.environ, **{name: str(value) for name, value in MALLOC_SETTINGS.items()}}
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}/callgrind.out.%p",
                   sys.executable, __file__, *inner]
        process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
        if process.wait():
            sys.exit(f"error: the run under valgrind failed (exit {process.returncode})")
        counts = {}
        for path in out.glob("callgrind.out.*"):
            totals = [line.split()[1] for line in path.read_text().splitlines() if line.startswith("totals:")]
            if totals and int(totals[0]):
                counts[int(path.suffix[1:])] = int(totals[0])
    workers = [count for pid, count in counts.items() if pid != process.pid]
    REPORT.append(f"{bench_mnist.LABELS[args.way]}, instructions in the timed span: {sum(counts.values()):,}; "
                  f"main process {counts.get(process.pid, 0):,}" +
                  (f", {len(workers)} DataLoader workers {sum(workers):,}" if workers else ""))


def instrumented(args, data_dir: Path) -> None:
    """The run inside count_instructions: callgrind counts from the timed span's start to its end."""
    def switch(state: str):
        return lambda: subprocess.run(["callgrind_control", "--instr=" + state, str(os.getpid())], check=True,
                                      stdout=subprocess.DEVNULL)

    around_timed_span(args.way, switch("on"), switch("off"), BENCHES[args.bench])
    run(args.way, data_dir, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--way", choices=["hand", "train"], required=True, help="(a) hand or (b) train")
    parser.add_argument("--bench", choices=list(BENCHES), default="mnist", help="whose two ways (default: mnist)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "mnist"),
                        help="folder with the MNIST files (default: ../shared/datasets/mnist next to the repo)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--kernels", action="store_true", help="one epoch under torch.profiler instead")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--python-calls", action="store_true", help="cProfile over the timed span instead")
    parser.add_argument("--instructions", action="store_true", help="count instructions under valgrind instead")
    parser.add_argument("--callgrind-out", help="with --instructions: keep callgrind's files here (callgrind_annotate)")
    parser.add_argument("--instrumented", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=2, help="epochs (default: 2)")
    parser.add_argument("--images", type=int, default=3000, help="JPEGs for --bench imagefolder (default: 3000)")
    args = parser.parse_args()
    if args.bench == "imagefolder" and (args.device != "cpu" or args.amp != "off" or args.channels_last):
        parser.error("--bench imagefolder runs bench_imagefolder.py's ways as they are: on the CPU, in float32")
    if args.instructions and (args.device != "cpu" or not shutil.which("callgrind_control")):
        parser.error("--instructions runs on the CPU under valgrind: it needs valgrind's callgrind_control on PATH")
    args.batch_size, args.compile = bench_mnist.BATCH_SIZE, False
    if args.instructions:
        count_instructions(args)
        return print("\n" + "\n".join(REPORT))
    with tempfile.TemporaryDirectory() as tmp:
        if args.bench == "imagefolder":
            bench_imagefolder.make_images(Path(tmp), args.images)
        else:
            source = bench_mnist.find_mnist(Path(args.data)) or bench_mnist.find_mnist(ROOT / "data" / "mnist_small")
            bench_mnist.prepare_data(source, Path(tmp))
        if args.instrumented:
            return instrumented(args, Path(tmp))
        report = kernels if args.kernels else python_calls if args.python_calls else threads_and_parts
        report(args.way, Path(tmp), args)
    print("\n" + "\n".join(REPORT))


if __name__ == "__main__":
    main()
