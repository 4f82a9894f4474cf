"""Train a shifted diffusion prior (caption -> CLIP image embedding).

    accelerate launch train.py --config configs/prior_small.yaml --train_data_dir DIR
    python train.py            # no arguments: the embedded toy world, end to end, offline

The work is ``shifted_diffusion.toy.prior_job.run_prior_job``; ``python train.py --help`` lists the flags.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from shifted_diffusion.toy.prior_job import run_prior_job


def main(argv: Optional[Sequence[str]] = None) -> Path:
    return run_prior_job(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
