"""Image-to-image with the fine-tuned decoder: image -> multi-CLIP embedding -> projection -> Stable Diffusion.

    python test.py --decoder sd2-shifted-decoder --images photos/ --output_dir recon/
    python test.py        # no arguments: the toy decoder on a few held-out toy-world images

The work is ``shifted_diffusion.image_to_image``; ``python test.py --help`` lists the flags.
"""

from __future__ import annotations

from shifted_diffusion.image_to_image import main as image_to_image


def main(argv=None):
    return image_to_image(argv)


if __name__ == "__main__":
    main()
