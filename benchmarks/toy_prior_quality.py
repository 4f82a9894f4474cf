"""Shifted vs baseline prior on the toy world, same budget and seed, scored at 4 / 8 / 16 / 64 sampling steps.

    python benchmarks/toy_prior_quality.py --out results.json [--seed N] [--max_train_steps N] [--fast]
                                           [--output_dir DIR] [--toy_root DIR] [any train.py flag ...]

Trains a shifted and a baseline prior on the toy world with the toy preset and identical flags (extra
flags go to both), scores both on the same held-out captions, writes the JSON results and prints the table;
``--fast`` is the seconds-long version the tests run. The work is
``shifted_diffusion.toy.prior_quality.run_prior_quality`` (its docstring has the details).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from shifted_diffusion.toy.prior_quality import run_prior_quality


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run_prior_quality(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
