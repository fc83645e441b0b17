"""Where the time of bench_mnist.py's two ways goes, one way per run: for a GPU lease, where a few runs must say
why (b) is slower, not only that it is.

    python benchmarks/where_time_goes.py --way hand --device cuda        # full MNIST from ../shared/datasets/mnist
    python benchmarks/where_time_goes.py --way train --device cuda
    python benchmarks/where_time_goes.py --way train --kernels --data data/mnist_small
    OMP_NUM_THREADS=1 python benchmarks/where_time_goes.py --bench imagefolder --way train

(a) the hand-written loop or (b) train.py, as bench_mnist.py runs them (2 epochs, batch 128, --amp and
--channels-last as there), or with --bench imagefolder as bench_imagefolder.py does (3,000 generated JPEGs, 2
workers). Printed after the run: the timed span's wall time and each thread's CPU seconds (the main thread,
autograd's device thread, OpenMP's pool; not the DataLoader workers, which are processes); the time spent waiting
for a DataLoader's next batch; for (b) also the time inside the trainer's parts, per call (nested: train_batch
holds train_step and the optimizer step). With --kernels instead, one epoch under torch.profiler: the kernels
launched (CUDA) or aten operators dispatched (CPU), by name, and the GPU's busy time.
"""

import argparse
import collections
import functools
import os
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
    """Time the DataLoader's next batch (both ways) and, for (b), the trainer's parts."""
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    parts = [(_MultiProcessingDataLoaderIter, "__next__")]
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
    args = parser.parse_args()
    if args.bench == "imagefolder" and (args.device != "cpu" or args.amp != "off" or args.channels_last):
        parser.error("--bench imagefolder runs bench_imagefolder.py's ways as they are: on the CPU, in float32")
    args.epochs, args.batch_size, args.compile = 2, bench_mnist.BATCH_SIZE, False
    with tempfile.TemporaryDirectory() as tmp:
        if args.bench == "imagefolder":
            bench_imagefolder.make_images(Path(tmp), 3000)
        else:
            source = bench_mnist.find_mnist(Path(args.data)) or bench_mnist.find_mnist(ROOT / "data" / "mnist_small")
            bench_mnist.prepare_data(source, Path(tmp))
        (kernels if args.kernels else threads_and_parts)(args.way, Path(tmp), args)
    print("\n" + "\n".join(REPORT))


if __name__ == "__main__":
    main()
