"""Where the time of bench_mnist.py's two ways goes, one run of each in this process: for a GPU lease, where a
few runs must say why (b) is slower, not only that it is.

    python benchmarks/where_time_goes.py --device cuda          # full MNIST from ../shared/datasets/mnist
    python benchmarks/where_time_goes.py --way train --data data/mnist_small

For (a) the hand-written loop and (b) train.py (bench_mnist.py's, 2 epochs, batch 128, --amp/--channels-last as
there) it prints the timed span's wall time and each thread's CPU seconds (the main thread, autograd's device
thread, OpenMP's pool); for (b) also the time inside the trainer's parts (nested: train_batch holds train_step and
the optimizer step), per call. With --kernels, one more epoch of each way under torch.profiler: the kernels
launched (CUDA) or aten operators dispatched (CPU), by name, and the GPU's busy time.
"""

import argparse
import collections
import functools
import os
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

from benchmarks import bench_mnist  # noqa: E402

PARTS = collections.Counter()  # wall seconds inside the trainer's parts, and "<part> calls", once time_parts ran


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


def time_parts() -> None:
    from data_loader.datasets import InMemoryImages
    from trainer import optim_step, trainer

    for owner, name in [(trainer.Trainer, "train_batch"), (trainer.Trainer, "train_step"),
                        (optim_step.OptimStep, "__call__"), (optim_step.OptimStep, "finish"),
                        (trainer.MetricTracker, "update"), (trainer, "to_device"), (trainer, "samples_in"),
                        (trainer.Trainer, "_grad_sync"), (trainer.Trainer, "_after_step"),
                        (trainer.Trainer, "_log_progress"), (trainer.Trainer, "_valid_epoch"),
                        (trainer.Trainer, "_save"), (InMemoryImages, "get_batch")]:
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


def around_timed_span(way: str, enter, leave) -> None:
    """Call enter() and leave() around (a)'s epoch loop (its two perf_counter calls) or (b)'s Trainer.train()."""
    if way == "hand":
        clock, calls = time.perf_counter, []

        def perf_counter() -> float:
            calls.append(None)
            (enter if len(calls) == 1 else leave)()
            return clock()

        bench_mnist.time = types.SimpleNamespace(perf_counter=perf_counter)  # run_hand's clock only
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
    if way == "hand":
        bench_mnist.run_hand(data_dir, args)
    else:
        with tempfile.TemporaryDirectory() as save_dir:
            import train

            train.main(["-c", str(ROOT / "configs" / "mnist.json"), "--set",
                        *bench_mnist.trainer_overrides(data_dir, Path(save_dir), args.epochs, args)])


def threads_and_parts(way: str, data_dir: Path, args, out) -> None:
    state = {}

    def enter():
        state["threads"], state["started"] = thread_seconds(), time.perf_counter()

    def leave():
        wall, after = time.perf_counter() - state["started"], thread_seconds()
        busy = {tid: (name, cpu - state["threads"].get(tid, (name, 0.0))[1]) for tid, (name, cpu) in after.items()}
        print(f"\n{bench_mnist.LABELS[way]}: {wall:.3f} s wall; CPU seconds by thread (those over 5 ms):", file=out)
        for name, cpu in sorted(busy.values(), key=lambda item: -item[1]):
            if cpu > 0.005:
                print(f"  {name:18s} {cpu:.3f}", file=out)

    around_timed_span(way, enter, leave)
    if way == "train":
        time_parts()
    run(way, data_dir, args)
    for label, seconds in PARTS.most_common():
        if not label.endswith(" calls"):
            calls = PARTS[label + " calls"]
            print(f"  {label:14s} {seconds:7.3f} s  {calls:6d} calls  {1e6 * seconds / calls:8.1f} µs/call", file=out)


def kernels(way: str, data_dir: Path, args, out) -> None:
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.startswith("cuda")
    profiler = profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda)
    around_timed_span(way, profiler.__enter__, lambda: profiler.__exit__(None, None, None))
    run(way, data_dir, argparse.Namespace(**{**vars(args), "epochs": 1}))
    events = profiler.key_averages()
    if cuda:
        chosen = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = f", GPU busy {sum(e.self_device_time_total for e in chosen) / 1e6:.3f} s"
    else:
        chosen, busy = [e for e in events if e.key.startswith("aten::")], ""
    print(f"\n{bench_mnist.LABELS[way]}, one epoch under torch.profiler: {sum(e.count for e in chosen)} "
          f"{'kernels' if cuda else 'aten operators'}{busy}; the most frequent:", file=out)
    for event in sorted(chosen, key=lambda e: -e.count)[:25]:
        print(f"  {event.count:7d}  {event.key[:100]}", file=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "mnist"),
                        help="folder with the MNIST files (default: ../shared/datasets/mnist next to the repo)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--way", choices=["hand", "train"], help="one way only (default: both)")
    parser.add_argument("--kernels", action="store_true", help="also one epoch of each way under torch.profiler")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # WAY:WHAT, the file to append the figures to
    args = parser.parse_args()
    args.epochs, args.batch_size, args.compile = 2, bench_mnist.BATCH_SIZE, False
    if args.worker:  # one way, one measurement, in a fresh process
        (way, what), report = args.worker[0].split(":"), args.worker[1]
        with open(report, "a") as out:
            (threads_and_parts if what == "threads" else kernels)(way, Path(args.data), args, out)
        return
    source = bench_mnist.find_mnist(Path(args.data)) or bench_mnist.find_mnist(ROOT / "data" / "mnist_small")
    options = ["--device", args.device, "--amp", args.amp] + ["--channels-last"] * args.channels_last
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, report = Path(tmp) / "data", Path(tmp) / "report.txt"
        bench_mnist.prepare_data(source, data_dir)
        for what in ["threads"] + ["kernels"] * args.kernels:
            for way in [args.way] if args.way else ["hand", "train"]:
                command = [sys.executable, __file__, *options, "--data", str(data_dir), "--worker", f"{way}:{what}",
                           str(report)]
                result = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True, env={**os.environ, "CI": "true"})
                if result.returncode != 0:
                    sys.exit(f"error: {' '.join(command)} failed:\n{result.stderr.strip()[-2000:]}")
                print(report.read_text(), end="", flush=True)
                report.unlink()


if __name__ == "__main__":
    main()
