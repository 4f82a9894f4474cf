"""The whole chain on the toy world: text -> prior (shifted vs baseline) -> CLIP image embedding -> decoder -> image.

    python benchmarks/toy_text_to_image.py --out results.json [--fast] [--num_captions 100] [--samples_per_caption 4]
        [--prior_num_inference_steps 8] [--guidance_scale 3] [--decoder DIR] [--shifted_prior DIR] [--baseline_prior DIR]
        [--text_image_decoder DIR | --no_text_image]

Text-to-image with the shifted and the baseline prior against image-to-image and real-image references, on
held-out toy-world captions (attribute accuracy, CLIP cosines, Frechet distance, diversity), through the
language-free decoder and through the decoder that reads the caption too (text only, and text + each prior's
embedding); priors and the toy decoders are reused when found and trained otherwise. ``--fast`` is the seconds-long version the tests run. The
work is ``shifted_diffusion.toy.text_to_image_eval.run_text_to_image_eval`` (its docstring has the details).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from shifted_diffusion.toy.text_to_image_eval import run_text_to_image_eval


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run_text_to_image_eval(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
