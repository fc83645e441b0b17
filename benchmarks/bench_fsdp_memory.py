"""What trainer.strategy fsdp saves: each process's bytes of parameters, gradients and optimizer state, with 1, 2
and 4 processes, against DDP's whole copy per process. CPU and gloo are enough: the bytes are those of the tensors
each process holds after a real step (forward, backward, Adam step), not an estimate.

    python benchmarks/bench_fsdp_memory.py                     # launches torchrun with 1, 2 and 4 processes
    python benchmarks/bench_fsdp_memory.py --blocks 8 --width 2048

The model: `--blocks` blocks of Linear(width, width) + ReLU (the blocks `utils.fsdp.shard` shards one by one), Adam.
Gradients are counted after backward, before the optimizer step zeroes them; the peak of a step holds all three.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def worker(blocks: int, width: int) -> None:
    import torch

    from utils import dist, fsdp

    def local_bytes(tensors) -> int:
        """Bytes this process holds of `tensors` (its shard of a sharded one)."""
        return sum(fsdp.local(t).nbytes for t in tensors)

    dist.init(torch.device("cpu"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU())
                                  for _ in range(blocks)])
    model = fsdp.shard(model, torch.device("cpu"), "off")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, width)).square().mean().backward()
    params = list(model.parameters())
    sizes = [local_bytes(params), local_bytes([p.grad for p in params])]
    optimizer.step()
    sizes.append(local_bytes([v for state in optimizer.state.values() for v in state.values() if v.dim()]))
    mb = [s / 2**20 for s in sizes]
    print(f"rank {dist.rank()}/{dist.world_size()}: params {mb[0]:.1f} MiB, grads {mb[1]:.1f} MiB, "
          f"optimizer {mb[2]:.1f} MiB, total {sum(mb):.1f} MiB "
          f"({sum(p.numel() for p in params):,} parameters)", flush=True)
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.blocks, args.width)
    for n in args.processes:
        print(f"--- {n} process{'es' if n > 1 else ''}", flush=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                        __file__, "--worker", "--blocks", str(args.blocks), "--width", str(args.width)],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


if __name__ == "__main__":
    main()
