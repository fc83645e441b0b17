"""The per-sample image path against a hand-written torchvision loop: JPEG decode + augmentation + a small CNN.

    python benchmarks/bench_imagefolder.py                 # 3,000 JPEGs, 2 epochs, 5 interleaved pairs
    python benchmarks/bench_imagefolder.py --images 6000 --repeats 8
    python benchmarks/bench_imagefolder.py --loaders-only  # only the data: both loaders in one process, alternating

The script writes --images small JPEGs (64x64, 10 classes) into a temporary ImageFolder tree, then trains
the same small CNN on them two ways, each in a fresh process, alternating:

  (a) hand  : torchvision.datasets.ImageFolder with a v2.Compose of the transforms below, a torch DataLoader
              (batch 64, shuffle, 2 workers), and the plain loop: forward, cross-entropy, backward, SGD step.
  (b) train : `train.py` with ImageFolderDataLoader and the same transforms from the config ("transforms":
              {"train": [...]}), 2 workers, batch 64, no validation, no metrics, TensorBoard off (the
              checkpoint-epochN.pth and latest.pth it writes every epoch are part of its cost).

Transforms (both): RandomResizedCrop(56, scale 0.35-1), RandomHorizontalFlip, ToImage, ToDtype(float32,
scale), Normalize. Timed: whole epochs ((a) its epoch loop, (b) `Trainer.train()`), DataLoader worker start
included in both; also the CPU seconds of the process and its workers over that span (user + system),
which a busy shared machine disturbs less than wall time. Both run with the glibc malloc settings train.py
sets on CPU (utils/allocator.py), so the ratio is the framework's own cost.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BATCH_SIZE, WORKERS, LR, CLASSES, SIZE = 64, 2, 0.05, 10, 64
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
TRANSFORMS = [
    {"type": "RandomResizedCrop", "args": {"size": 56, "scale": [0.35, 1.0]}},
    {"type": "RandomHorizontalFlip"},
    {"type": "ToImage"},
    {"type": "ToDtype", "args": {"dtype": "float32", "scale": True}},
    {"type": "Normalize", "args": {"mean": MEAN, "std": STD}},
]


class SmallCNN(nn.Module):
    """Three strided 3x3 convolutions and a linear layer: about as much compute per image as decoding it."""

    def __init__(self, num_classes: int = CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_images(root: Path, count: int) -> None:
    """`count` JPEGs in root/train/<class>/: a class-coloured blob on noise, so there is something to learn."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        label = i % CLASSES
        pixels = torch.randint(0, 256, (SIZE, SIZE, 3), generator=generator, dtype=torch.uint8)
        y, x = torch.randint(0, SIZE // 2, (2,), generator=generator).tolist()
        pixels[y : y + SIZE // 2, x : x + SIZE // 2] = torch.tensor([25 * label, 255 - 25 * label, 128])
        folder = root / "train" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.jpg", quality=90)


# ---- the two workers (each in its own process) -------------------------------------------------------
def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the DataLoader workers of past epochs)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def hand_loader(data_dir: Path):
    """The torchvision DataLoader a user would write, with the same transforms as the config's."""
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomResizedCrop(56, scale=(0.35, 1.0)), v2.RandomHorizontalFlip(), v2.ToImage(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    dataset = datasets.ImageFolder(str(data_dir / "train"), transform=transform)
    generator = torch.Generator().manual_seed(1)
    return DataLoader(dataset, BATCH_SIZE, shuffle=True, num_workers=WORKERS, generator=generator)


def run_hand(data_dir: Path, epochs: int) -> tuple[float, float]:
    """(a) The loop a user would write with torchvision; returns (wall, CPU) seconds of `epochs` epochs."""
    import torch.nn.functional as F

    torch.manual_seed(1)
    loader = hand_loader(data_dir)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    started, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(epochs):
        model.train()
        total = torch.zeros(())
        for data, target in loader:
            loss = F.cross_entropy(model(data), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        print(f"loss {total.item() / len(loader):.4f}")
    return time.perf_counter() - started, cpu_seconds() - cpu


def config(data_dir: Path, save_dir: Path, epochs: int) -> dict:
    return {
        "name": "bench_imagefolder", "seed": 1,
        "arch": {"type": "benchmarks.bench_imagefolder.SmallCNN", "args": {}},
        "data_loader": {"type": "ImageFolderDataLoader", "args": {
            "data_dir": str(data_dir), "batch_size": BATCH_SIZE, "num_workers": WORKERS,
            "transforms": {"train": TRANSFORMS}}},
        "optimizer": {"type": "SGD", "args": {"lr": LR, "momentum": 0.9}},
        "loss": "cross_entropy",
        "trainer": {"epochs": epochs, "save_dir": str(save_dir), "monitor": "off", "tensorboard": False,
                    "log_step": 20},
    }


def run_trainer(data_dir: Path, epochs: int) -> tuple[float, float]:
    """(b) `train.py -c <config>` in this process; returns the (wall, CPU) seconds `Trainer.train()` took."""
    import train
    from trainer.trainer import Trainer

    seconds = []
    train_epochs = Trainer.train

    def timed_train(self):
        started, cpu = time.perf_counter(), cpu_seconds()
        result = train_epochs(self)
        seconds.append((time.perf_counter() - started, cpu_seconds() - cpu))
        return result

    Trainer.train = timed_train
    with tempfile.TemporaryDirectory() as save_dir:
        path = Path(save_dir) / "config.json"
        path.write_text(json.dumps(config(data_dir, Path(save_dir), epochs)))
        train.main(["-c", str(path)])
    return seconds[0]


def loaders_only(data_dir: Path, repeats: int) -> None:
    """Decode + augment only: one epoch of each loader in turn, in this process, `repeats` times."""
    from data_loader.data_loaders import ImageFolderDataLoader

    loaders = {"hand": hand_loader(data_dir), "train": ImageFolderDataLoader(
        str(data_dir), batch_size=BATCH_SIZE, num_workers=WORKERS, transforms={"train": TRANSFORMS})}
    results = {mode: [] for mode in loaders}
    for repeat in range(repeats):
        for mode in loaders if repeat % 2 == 0 else reversed(loaders):
            started, cpu = time.perf_counter(), cpu_seconds()
            for _ in loaders[mode]:
                pass
            results[mode].append((time.perf_counter() - started, cpu_seconds() - cpu))
    report(results, "one epoch of the data only")


def report(results: dict, what: str) -> None:
    print(f"\n{what} ({len(results['hand'])} runs each, mean ± sd):")
    for mode, label in (("hand", "(a) hand-written"), ("train", "(b) framework")):
        wall, cpu = ([r[i] for r in results[mode]] for i in (0, 1))
        print(f"  {label:24s} {mean_sd(wall)} s wall   {mean_sd(cpu)} s CPU")
    for i, kind in enumerate(("wall", "CPU")):
        ratios = [b[i] / a[i] for a, b in zip(results["hand"], results["train"])]
        print(f"  ratio (b)/(a) of {kind} time: {mean_sd(ratios)} (mean ± sd over the interleaved pairs), "
              f"median {statistics.median(ratios):.3f}")


# ---- the driver ----------------------------------------------------------------------------------------
def spawn(mode: str, data_dir: Path, args, out: Path) -> tuple[float, float]:
    command = [sys.executable, __file__, "--worker", mode, "--data-dir", str(data_dir), "--epochs",
               str(args.epochs), "--out", str(out)]
    from utils.allocator import MALLOC_SETTINGS

    env = {**os.environ, "CI": "true", **{name: str(value) for name, value in MALLOC_SETTINGS.items()}}
    result = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    if result.returncode != 0:
        sys.exit(f"error: the {mode} worker failed (exit {result.returncode}): {' '.join(command)}")
    return tuple(json.loads(out.read_text())["seconds"])


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="JPEGs to generate (default: 3000)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed run (default: 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each way, interleaved (default: 5)")
    parser.add_argument("--loaders-only", action="store_true",
                        help="time the two data loaders alone (decode + augment), alternating in one process")
    parser.add_argument("--worker", choices=["hand", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        seconds = (run_hand if args.worker == "hand" else run_trainer)(Path(args.data_dir), args.epochs)
        Path(args.out).write_text(json.dumps({"seconds": seconds}))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "images"
        started = time.perf_counter()
        make_images(data_dir, args.images)
        print(f"{args.images} JPEGs of {SIZE}x{SIZE} in {time.perf_counter() - started:.1f} s; batch {BATCH_SIZE}, "
              f"{WORKERS} workers, {args.epochs} epochs, torch {torch.__version__}, {os.cpu_count()} CPUs")
        if args.loaders_only:
            return loaders_only(data_dir, args.repeats)
        results = {"hand": [], "train": []}
        for repeat in range(args.repeats):
            for mode in ("hand", "train") if repeat % 2 == 0 else ("train", "hand"):
                results[mode].append(spawn(mode, data_dir, args, Path(tmp) / f"{mode}{repeat}.json"))
                wall, cpu = results[mode][-1]
                print(f"  run {repeat + 1} {mode:5s} {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    report(results, f"whole epochs of training, {args.images * args.epochs} images")


if __name__ == "__main__":
    main()
