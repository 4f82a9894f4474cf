"""The seed's shifted-vs-baseline comparison in the toy world, through evaluate.py.

    python benchmarks/toy_shifted_vs_baseline.py [--num_captions 500] [--guidance_scales 1,2,3,4,5]
        [--shifted_prior DIR] [--baseline_prior DIR] [--decoder DIR] [--results_dir benchmarks/results]

Needs the two toy priors (`python train.py`, `python train.py --baseline --output_dir outputs/toy_prior_baseline`)
and the toy decoder (`python train_toy_decoder.py`). Renders a held-out toy world, runs evaluate.py on it (toy CLIP
Frechet distance `fd_clip`, CLIP scores, the pixel reader's attribute accuracy), and writes
toy_shifted_vs_baseline.json (results, the evaluate.py command, wall times) and the two plots under --results_dir.
The work is ``shifted_diffusion.toy.comparison.run_toy_comparison`` (its docstring has the details).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from shifted_diffusion.toy.comparison import run_toy_comparison


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run_toy_comparison(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
