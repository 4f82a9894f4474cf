"""Text-to-image: caption -> prior (shifted or baseline, from train.py) -> CLIP image embedding -> decoder.

    python sft_test.py --prior runs/prior --decoder sd2-shifted-decoder --prompt "a red double-decker bus"
    python sft_test.py --prior runs/kandinsky_prior --decoder kandinsky-community/kandinsky-2-2-decoder --prompt "..."
    python sft_test.py    # no arguments: example toy-world captions with the toy prior and the toy decoder

The work is ``shifted_diffusion.text_to_image``; ``python sft_test.py --help`` lists the flags.
"""

from __future__ import annotations

from shifted_diffusion.text_to_image import main as text_to_image


def main(argv=None):
    return text_to_image(argv)


if __name__ == "__main__":
    main()
