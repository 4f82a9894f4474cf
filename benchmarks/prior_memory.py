"""Training memory of the prior by parts, with and without gradient checkpointing, on any device.

    python benchmarks/prior_memory.py --preset large [--batch 64] [--dtype bf16] [--json out.json]

Weights + AdamW (12 B per parameter), gradients (4 B), and the activations one training forward saves for
backward (counted through autograd's saved-tensor hooks at batch 1 and 2, split into per-caption and
batch-independent bytes), with the estimated peak at --batch as a range; on CUDA also one real training
step's ``max_memory_allocated`` (--no-real-step skips it), and for ``--shard_over N`` the peak per process
with the training state sharded over N processes (ZeRO stage 1 / 2 / 3, FSDP). The counting is
``shifted_diffusion.train_memory.memory_report``. Prints one JSON object; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict

from shifted_diffusion.encoders import DTYPE_NAMES
from shifted_diffusion.train_memory import memory_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "large"])
    p.add_argument("--batch", type=int, default=64, help="captions per training step for the estimate")
    p.add_argument("--dtype", default="bf16", choices=DTYPE_NAMES, help="autocast dtype")
    p.add_argument("--device", default=None)
    p.add_argument("--real-step", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, also run one real step at --batch and report its peak")
    p.add_argument("--shard_over", type=int, nargs="*", default=[8],
                   help="also estimate the per-process peak with the training state sharded (ZeRO-1/2/3, FSDP) "
                        "over each of these process counts")
    p.add_argument("--json", default=None, help="also write the JSON here")
    return p


def main(argv=None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    result = memory_report(args.preset, args.batch, args.dtype, args.device, real_step=args.real_step,
                           shard_over=args.shard_over)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
