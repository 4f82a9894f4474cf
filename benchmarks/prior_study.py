"""Shifted vs baseline vs a one-step ECLIPSE-style prior in the toy world: sampling steps, std_scale, vocabulary
size, training length, guidance and noise temperature, over several seeds.

    python benchmarks/prior_study.py --out benchmarks/results/prior_study.json [--quick] [--axes default,std_scale,...]
        [--seeds 1,2,3] [--base_steps N] [--train_steps 1000,4000] [--fast]

Writes the JSON (rows, mean +- std over seeds, wall times) and a plot beside it (.png), and prints the table;
nothing is asserted. ``--quick``: the default axis only, 250 training steps, 100 captions x 4 samples. The work
is ``shifted_diffusion.toy.prior_study.run_prior_study`` (its docstring has the details).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from shifted_diffusion.toy.prior_study import run_prior_study


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run_prior_study(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
