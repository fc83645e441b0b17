"""What the per-sample seeding of a dataset's generators costs: seconds per epoch of full MNIST read sample by
sample through the DataLoader (MnistDataLoader with in_memory false), nothing else, with num_workers 0 and 2.

    python benchmarks/bench_data_seeding.py --data ../shared/datasets/mnist   # a folder with the four .gz files

Run it on two checkouts (git worktree) to compare; benchmarks/README.md has the figures."""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_loader.data_loaders import MnistDataLoader  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/datasets/mnist", help="folder with the MNIST .gz files")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "MNIST").mkdir()
        (Path(root) / "MNIST" / "raw").symlink_to(Path(args.data).resolve())
        for workers in (0, 2):
            loader = MnistDataLoader(root, batch_size=128, in_memory=False, num_workers=workers, seed=0)
            seconds = []
            for epoch in range(1, args.epochs + 1):
                loader.set_epoch(epoch)
                start = time.perf_counter()
                for _ in loader:
                    pass
                seconds.append(time.perf_counter() - start)
            print(f"num_workers {workers}: {statistics.median(seconds):.3f} s per epoch (median of {args.epochs}, "
                  f"{loader.n_samples:,} samples)")


if __name__ == "__main__":
    main()
