"""Issue 5, part 5: parts 1 and 2 on a GPU (bf16; dim 64, and dim 1024 as blora_for_kohya recommends).

The same step as ``bench_step.py`` (content and style blocks at full width, 1024 tokens, batch
1, forward + backward + AdamW), on CUDA, with one more variant: ``ours:torch`` runs our
network with ``LYCORIS_KERNEL_BACKEND=torch``. With Triton installed, LyCORIS 4.x picks its
fused kernels for ``ours``, so the pair shows what they are worth; without Triton both rows
take the plain torch path. Memory is ``torch.cuda.max_memory_allocated`` over the step, each
variant in a fresh process.

    python benchmarks/bench_cuda.py                       # on a machine with a GPU
    python benchmarks/bench_cuda.py --record              # ... and append the tables to RESULTS.md
    python benchmarks/bench_cuda.py --device cpu --dry-run  # the code path, tiny, on the CPU

Without a GPU (and without ``--device cpu``) it says so and exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_step  # noqa: E402
import torch  # noqa: E402


def parser():
    p = bench_step.parser(__doc__.split("\n\n")[0])
    p.set_defaults(device="cuda", modes="bf16", dims="64,1024", variants="a,b,ours,ours:torch", rounds=10, warmup=2,
                   mem_steps=3)
    p.add_argument("--dry-run", action="store_true",
                   help="tiny width, 8x8 latent, one round: checks the code path (use with --device cpu)")
    return p


def main(argv=None) -> int:
    p = parser()
    args, _ = p.parse_known_args(argv)
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        print("bench_cuda.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
              "nothing measured. For the code path on the CPU: --device cpu --dry-run")
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        argv = [a for a in argv if a != "--dry-run"]
        argv = ["--size", "tiny", "--latent", "8", "--rounds", "1", "--warmup", "1", "--mem-steps", "1"] + argv
    title = "CUDA training step (issue 5, part 5)" + (" [dry run]" if args.dry_run else "")
    return bench_step.main(argv, title=title, prog_parser=p)


if __name__ == "__main__":
    sys.exit(main())
