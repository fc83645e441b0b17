"""How the framework's cost grows with the work: one command prints the ratio of train.py's time to a hand-written
loop's for four kinds of work, and images/s against the batch size for the first.

    python benchmarks/bench_scaling.py                        # all, short runs (a few minutes on 2 cores)
    python benchmarks/bench_scaling.py --only resnet ddp --repeats 8

  lenet       LeNet on MNIST: `bench_mnist.py --same-allocator` (its (a) and (b))
  resnet      torchvision's ResNet-18 (11.2M parameters) on 32x32 synthetic images held in memory, SGD, no validation
  imagefolder JPEGs decoded and augmented by DataLoader workers: `bench_imagefolder.py` (OMP_NUM_THREADS=1)
  ddp         LeNet on MNIST, 2 processes on the CPU (gloo) under torchrun: train.py against a hand-written DDP loop
  batch       images/s of lenet's two ways at batch sizes 32 to 512 (one pair each)

Every pair runs its two ways in fresh processes, alternating; each prints wall and CPU seconds of its timed span
(whole epochs; the framework's `Trainer.train()`, checkpoints included). A ratio above 1 is the framework's cost.
"""

import argparse
import json
import os
import re
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

from base.base_data_loader import BaseDataLoader  # noqa: E402
from benchmarks.bench_mnist import cpu_seconds, mean_sd, run_trainer, timed_train  # noqa: E402
from data_loader.datasets import InMemoryImages, read_idx  # noqa: E402
from utils.allocator import MALLOC_SETTINGS  # noqa: E402

MNIST = ROOT / "data" / "mnist_small"
RESNET_IMAGES, RESNET_BATCH, DDP_BATCH = 2048, 64, 64
ENV = {**os.environ, **{name: str(value) for name, value in MALLOC_SETTINGS.items()}}  # as --same-allocator


class SyntheticImages(BaseDataLoader):
    """`n` random 3x32x32 uint8 images with 10 classes, in memory, batched by index (seeded: both ways get them)."""

    def __init__(self, n: int, batch_size: int, **kwargs):
        images, targets = synthetic(n)
        super().__init__(InMemoryImages(images, targets, 0.5, 0.25), batch_size=batch_size, **kwargs)


def synthetic(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator),
            torch.randint(0, 10, (n,), generator=generator))


# ---- workers (each in its own process) -------------------------------------------------------------------------
def hand_resnet(epochs: int) -> tuple[float, float]:
    """ResNet-18 trained by hand on the synthetic images; (wall, CPU) seconds of `epochs` epochs."""
    import torch.nn.functional as F
    from torchvision.models import resnet18

    torch.manual_seed(1)
    images, targets = synthetic(RESNET_IMAGES)
    model = resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    started, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(images))
        for i in range(0, len(order), RESNET_BATCH):
            idx = order[i : i + RESNET_BATCH]
            loss = F.cross_entropy(model((images[idx].float() / 255 - 0.5) / 0.25), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started, cpu_seconds() - cpu


def trainer_resnet(epochs: int, save_dir: Path) -> tuple[float, float]:
    """The same with train.py (metrics, logging, TensorBoard, a checkpoint every epoch), in this process."""
    config = {"name": "resnet", "seed": 1, "arch": {"type": "torchvision.models.resnet18", "args": {"num_classes": 10}},
              "data_loader": {"type": "benchmarks.bench_scaling.SyntheticImages",
                              "args": {"n": RESNET_IMAGES, "batch_size": RESNET_BATCH}},
              "optimizer": {"type": "SGD", "args": {"lr": 0.05, "momentum": 0.9}}, "loss": "cross_entropy",
              "metrics": ["accuracy"], "trainer": {"epochs": epochs, "save_dir": str(save_dir), "monitor": "off"}}
    path = save_dir / "resnet.json"
    path.write_text(json.dumps(config))
    return timed_train(["-c", str(path)])


def hand_ddp(epochs: int) -> tuple[float, float]:
    """LeNet by hand under DDP (gloo, CPU): each rank its half of a seeded order; validation summed over ranks."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from model.model import MnistModel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    raw = MNIST / "MNIST" / "raw"
    images = read_idx(raw / "train-images-idx3-ubyte.gz").unsqueeze(1)
    labels = read_idx(raw / "train-labels-idx1-ubyte.gz").long()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    n_valid = len(images) // 10
    valid_idx, train_idx = order[:n_valid][rank::world], order[n_valid:]
    torch.manual_seed(1)
    model = torch.nn.parallel.DistributedDataParallel(MnistModel())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.002)

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (images[idx].float() / 255 - 0.1307) / 0.3081, labels[idx]

    started, cpu = time.perf_counter(), cpu_seconds()
    for epoch in range(epochs):
        model.train()
        mine = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(epoch))][rank::world]
        for i in range(0, len(mine), DDP_BATCH):
            data, target = batch(mine[i : i + DDP_BATCH])
            loss = F.nll_loss(model(data), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        totals = torch.zeros(2)
        with torch.no_grad():
            for i in range(0, len(valid_idx), DDP_BATCH):
                data, target = batch(valid_idx[i : i + DDP_BATCH])
                output = model.module(data)
                totals += torch.stack([F.nll_loss(output, target, reduction="sum"), (output.argmax(1) == target).sum()])
        dist.all_reduce(totals)
    seconds = time.perf_counter() - started, cpu_seconds() - cpu
    dist.barrier()  # a rank that tears down while the other still talks to it aborts
    dist.destroy_process_group()
    return seconds


def trainer_ddp(epochs: int) -> tuple[float, float]:
    """train.py -c configs/mnist.json under the same torchrun (bench_mnist.run_trainer: same data, optimizer, batch)."""
    args = argparse.Namespace(epochs=epochs, batch_size=DDP_BATCH, amp="off", channels_last=False, compile=False,
                              device="cpu")
    return run_trainer(MNIST, args)


def worker(args) -> None:
    save_dir = Path(args.out).parent
    if args.worker == "hand-resnet":
        wall, cpu = hand_resnet(args.epochs)
    elif args.worker == "train-resnet":
        wall, cpu = trainer_resnet(args.epochs, save_dir)
    elif args.worker == "hand-ddp":
        wall, cpu = hand_ddp(args.epochs)
    else:
        wall, cpu = trainer_ddp(args.epochs)
    rank = os.environ.get("RANK", "0")
    Path(f"{args.out}.{rank}").write_text(json.dumps({"seconds": wall, "cpu_seconds": cpu}))


# ---- the driver ------------------------------------------------------------------------------------------------
def spawn(mode: str, args, tmp: Path, n: int) -> dict:
    """One worker (under torchrun with 2 processes for ddp): its wall seconds (rank 0's), CPU seconds (all ranks')."""
    out = tmp / f"{mode}{n}.json"
    script = [__file__, "--worker", mode, "--epochs", str(args.epochs), "--out", str(out)]
    if mode.endswith("ddp"):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                   str(29500 + n % 100), *script]
        env = {**ENV, "OMP_NUM_THREADS": "1"}
    else:
        command, env = [sys.executable, *script], ENV
    result = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"error: the {mode} worker failed (exit {result.returncode}):\n{result.stderr.strip()[-2000:]}")
    ranks = [json.loads(path.read_text()) for path in sorted(tmp.glob(f"{out.name}.*"))]
    return {"seconds": ranks[0]["seconds"], "cpu_seconds": sum(r["cpu_seconds"] for r in ranks)}


def pairs(case: str, args, tmp: Path) -> None:
    results = {"hand": [], "train": []}
    for n in range(args.repeats):
        for way in ("hand", "train") if n % 2 == 0 else ("train", "hand"):
            results[way].append(spawn(f"{way}-{case}", args, tmp, n))
    show(case, results)


def show(case: str, results: dict) -> None:
    parts = []
    for key, kind in (("seconds", "wall"), ("cpu_seconds", "CPU")):
        ratios = [b[key] / a[key] for a, b in zip(results["hand"], results["train"])]
        parts.append(f"{kind} {mean_sd(ratios)} (median {statistics.median(ratios):.3f})")
    hand, train = (statistics.mean(r["seconds"] for r in results[way]) for way in ("hand", "train"))
    print(f"  {case:12s} ratio {'; '.join(parts)}   hand {hand:.2f} s, train.py {train:.2f} s", flush=True)


def script_ratios(case: str, command: list[str], env: dict) -> None:
    """Run another benchmark script and show its ratio lines."""
    output = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if output.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{output.stderr.strip()[-2000:]}")
    found = re.findall(r"ratio \S+ of (wall|CPU) time: (.*)", output.stdout)
    print(f"  {case:12s} ratio " + "; ".join(f"{kind} {value}" for kind, value in found), flush=True)


def batch_table(args) -> None:
    print("  batch   (a) hand images/s   (b) train.py images/s   (b)/(a) of wall time")
    for size in (32, 64, 128, 256, 512):
        command = [sys.executable, "benchmarks/bench_mnist.py", "--same-allocator", "--repeats", "1",
                   "--startup-repeats", "0", "--epochs", str(args.epochs), "--batch-size", str(size), "--data",
                   args.mnist]
        output = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        rates = re.findall(r"([\d,]+) samples/s", output.stdout)
        ratio = re.search(r"ratio \S+ of wall time: ([\d.]+)", output.stdout)
        if output.returncode != 0 or len(rates) != 2 or not ratio:
            sys.exit(f"error: {' '.join(command)} failed:\n{output.stderr.strip()[-2000:]}")
        print(f"  {size:5d}   {rates[0]:>17s}   {rates[1]:>21s}   {ratio[1]}", flush=True)


CASES = ("lenet", "resnet", "imagefolder", "ddp", "batch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=CASES, default=list(CASES), help="the cases to run (default: all)")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved pairs per ratio (default: 4)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timed run (default: 1)")
    parser.add_argument("--mnist", default=str(MNIST), help="MNIST for lenet and batch (default: the bundled 10k)")
    parser.add_argument("--worker", choices=["hand-resnet", "train-resnet", "hand-ddp", "train-ddp"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.1f}, {args.repeats} pairs, "
          f"{args.epochs} epoch(s) per run; ratio = train.py / hand-written (mean ± sd over the pairs)")
    runs = ["--repeats", str(args.repeats), "--epochs", str(args.epochs)]
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.only:
            if case == "lenet":
                script_ratios(case, [sys.executable, "benchmarks/bench_mnist.py", "--same-allocator", "--data",
                                     args.mnist, "--startup-repeats", "0", *runs], os.environ)
            elif case == "imagefolder":
                script_ratios(case, [sys.executable, "benchmarks/bench_imagefolder.py", "--images", "1000", *runs],
                              {**os.environ, "OMP_NUM_THREADS": "1"})
            elif case == "batch":
                batch_table(args)
            else:
                pairs(case, args, Path(tmp))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
