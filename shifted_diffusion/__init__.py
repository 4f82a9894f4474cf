"""Shifted Diffusion (Zhou et al., CVPR 2023): a shifted diffusion prior from captions to CLIP
image embeddings, and a language-free decoder conditioned on those embeddings."""

__version__ = "0.1.0"
