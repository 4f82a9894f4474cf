"""Train the toy decoder: a tiny Stable Diffusion on the toy world, conditioned on the toy CLIP's image embeddings.

    python train_toy_decoder.py        # -> outputs/toy_decoder: autoencoder 3000 steps + UNet 4000 steps, one thread
                                       # (wall time: the README, "Text-to-image in the toy world")
    python train_toy_decoder.py --output_dir DIR --unet_steps 2400 --config my_toy_decoder.yaml
    python train_toy_decoder.py --world_dir W --clip_dir C    # an existing world + toy CLIP
    python train_toy_decoder.py --decoder_type text_and_image  # -> outputs/toy_text_image_decoder: a toy text-to-image
                                       # model + an IP-Adapter for the image embedding (same autoencoder)

The recipe is shifted_diffusion.toy.decoder_recipe (`--help` lists its flags).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from shifted_diffusion.toy.decoder_recipe import train_toy_decoder


def main(argv: Optional[Sequence[str]] = None) -> Path:
    return train_toy_decoder(argv)


if __name__ == "__main__":
    main()
