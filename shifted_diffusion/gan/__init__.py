"""The GAN decoder (Lafite-style, language-free): image embedding -> image in one forward pass.

``networks`` (StyleGAN2-style generator and projection discriminator), ``losses`` (adversarial, R1, contrastive,
the conditioning perturbation), ``training`` (``finetune.py --decoder_type gan``, on the shared training core) and
``decoder`` (``GanDecoder``: the decoders' ``generate`` call; ``decoder.load_decoder`` loads its folder).
"""
