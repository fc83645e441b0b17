"""Build the small MNIST subset bundled in data/mnist_small/ from the full MNIST files.

    python scripts/make_mnist_subset.py ../shared/datasets/mnist data/mnist_small

Takes a class-balanced random sample (fixed seed, so the output is byte-identical on every run)
and writes it in the original IDX format, gzipped, under <out>/MNIST/raw/, where the MNIST
data loader and torchvision.datasets.MNIST look for files.
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_loader.datasets import find_file, read_idx, write_idx  # noqa: E402
from utils.cli import ArgumentParser, run_main, text  # noqa: E402
from utils.errors import UserError  # noqa: E402

SPLITS = {"train": 10_000, "t10k": 2_000}  # images kept per split; ~2 MB gzipped in all


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=lambda value: Path(text(value)), help="folder holding the four full MNIST files")
    parser.add_argument("out", type=lambda value: Path(text(value)), help="output root (files go to <out>/MNIST/raw/)")
    args = parser.parse_args(argv)
    rng, subsets = np.random.default_rng(0), {}
    for split, count in SPLITS.items():  # everything read and checked before anything is written
        files = [find_file(args.src, f"{split}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")]
        if None in files:
            raise UserError(f"{args.src}: the {split} files (*-ubyte[.gz]) are not all in this folder")
        images, labels = (read_idx(f).numpy() for f in files)
        per_class = count // 10
        if len(images) != len(labels) or min(np.bincount(labels, minlength=10)[:10]) < per_class:
            raise UserError(f"{args.src}: the {split} files need {per_class} images of each digit, with a label each")
        keep = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)])
        subsets[split] = rng.permutation(keep), images, labels
    raw = args.out / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, (keep, images, labels) in subsets.items():
        write_idx(raw / f"{split}-images-idx3-ubyte.gz", torch.from_numpy(images[keep]))
        write_idx(raw / f"{split}-labels-idx1-ubyte.gz", torch.from_numpy(labels[keep]))
        print(f"{split}: {len(keep)} images -> {raw}")
    return 0


if __name__ == "__main__":
    run_main(main)
