"""Whether this tree trains the same weights as an earlier commit: `configs/mnist.json` on the bundled data, run by
both trees' `train.py` (fresh processes, one thread each), every tensor of the final models and optimizer states
compared with torch.equal. For changes to the hot loop that must not change results.

    python benchmarks/check_same_weights.py                 # against main
    python benchmarks/check_same_weights.py --base 4d83d96 --epochs 2
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils import checkpoint  # noqa: E402


def final_state(tree: Path, save_dir: Path, args) -> dict:
    """The latest.pth of `tree`'s train.py run on configs/mnist.json, loaded."""
    overrides = [f"trainer.epochs={args.epochs}", f"trainer.len_epoch={args.len_epoch}", f"trainer.save_dir={save_dir}"]
    command = [sys.executable, "train.py", "-c", "configs/mnist.json", "--set", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tree, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(command)} in {tree} failed:\n{result.stderr.strip()}")
    (latest,) = save_dir.glob("*/*/latest.pth")
    return checkpoint.load(latest)


def tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested state dict, by its path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    return {path: t for key, item in items for path, t in tensors(item, f"{prefix}/{key}").items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="the commit to compare with (default: main)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs (default: 1)")
    parser.add_argument("--len-epoch", type=int, default=0, help="batches per epoch (default: 0, a whole pass)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(base), args.base], cwd=ROOT, check=True)
        try:
            states = [final_state(tree, Path(tmp) / name, args) for tree, name in ((base, "a"), (ROOT, "b"))]
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=True)
    old, new = ({key: tensors(state[key]) for key in ("model", "optimizer")} for state in states)
    differ = [f"{key}{path}" for key in old for path in old[key].keys() | new[key].keys()
              if path not in old[key] or path not in new[key] or not torch.equal(old[key][path], new[key][path])]
    count = sum(len(t) for t in old.values())
    print(f"{args.base} against this tree: {count} tensors of the model and optimizer, {len(differ)} differ"
          + (f": {', '.join(sorted(differ)[:10])}" if differ else " (bitwise equal)"))
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
