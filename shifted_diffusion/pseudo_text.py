"""Semi-supervised prior training: uncaptioned images as pairs with a pseudo text condition (Lafite-style).

CLIP puts images and texts in one space, so an uncaptioned image can stand in for its own caption: its CLIP
image embedding, normalised per CLIP block and perturbed by Gaussian noise, replaces the CLIP text embedding;
the word-level tokens are those of the empty caption; the cluster (shifted prior) is the one the vocabulary
assigns to that pseudo embedding, as for a real caption.

Per CLIP block b of the concatenated embedding (``block_sizes``)::

    u_b = x_b / |x_b|,   eps_b ~ N(0, I),   p_b = s_b * (u_b + noise * eps_b / |eps_b|) / |u_b + noise * eps_b / |eps_b||

``noise`` is the perturbation level (Lafite's xi: the noise vector has length ``noise`` relative to the unit
embedding; one value, or one per block), ``s_b`` the mean norm of the real CLIP text embeddings of block b in
the training set, so a pseudo text embedding has the scale of a real one. In high dimension eps_b is nearly
orthogonal to u_b, so cos(p_b, x_b) ~ 1 / sqrt(1 + noise^2): ``matched_noise`` picks, per block, the level at
which a pseudo text embedding is as close to its image as real captions are to theirs (mean cosine c_b of the
captioned training pairs: noise_b = sqrt(1 / c_b^2 - 1)). ``PseudoTextMixer`` replaces a fixed share (``fraction``) of every
training batch's rows by such pairs drawn from the uncaptioned training images with the step's generator (a
resumed run draws the same ones).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def block_norms(embeddings: torch.Tensor, block_sizes: Sequence[int]) -> torch.Tensor:
    """Mean L2 norm of each CLIP block over the rows of ``embeddings`` (N, D) -> (num_blocks,) float32."""
    if embeddings.ndim != 2 or embeddings.shape[1] != sum(block_sizes) or embeddings.shape[0] == 0:
        raise ValueError(f"embeddings: expected (N >= 1, {sum(block_sizes)}), got {tuple(embeddings.shape)}")
    return torch.stack([block.float().norm(dim=1).mean()
                        for block in torch.split(embeddings, list(block_sizes), dim=1)])


def matched_noise(image_emb: torch.Tensor, text_emb: torch.Tensor, block_sizes: Sequence[int]) -> torch.Tensor:
    """Per block, the noise level whose pseudo text embeddings have the mean cosine to their image that the
    real pairs (``image_emb`` (N, D), ``text_emb`` (N, D), row i = one caption and its image) have:
    sqrt(1 / c^2 - 1), c clamped to [0.05, 1] -> (num_blocks,) float32."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2 or image_emb.shape[1] != sum(block_sizes):
        raise ValueError(f"image_emb / text_emb: expected two (N, {sum(block_sizes)}), got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    cos = torch.stack([torch.nn.functional.cosine_similarity(x.float(), t.float(), dim=1).mean()
                       for x, t in zip(torch.split(image_emb, list(block_sizes), dim=1),
                                       torch.split(text_emb, list(block_sizes), dim=1))])
    return (1.0 / cos.clamp(0.05, 1.0).square() - 1.0).sqrt()


def pseudo_text_embedding(image_emb: torch.Tensor, block_sizes: Sequence[int], text_norms: torch.Tensor,
                          noise, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, D) image embeddings -> (B, D) float32 pseudo text embeddings (the module's formula); ``noise`` a
    float or one level per block."""
    levels = torch.as_tensor(noise, dtype=torch.float32).flatten().expand(len(block_sizes))
    if (levels < 0).any():
        raise ValueError(f"noise: expected >= 0, got {noise}")
    if image_emb.ndim != 2 or image_emb.shape[1] != sum(block_sizes):
        raise ValueError(f"image_emb: expected (B, {sum(block_sizes)}), got {tuple(image_emb.shape)}")
    device = image_emb.device
    draw = generator.device if generator is not None else device
    eps = torch.randn(image_emb.shape, generator=generator, device=draw, dtype=torch.float32).to(device)
    tiny = torch.finfo(torch.float32).tiny
    out = []
    for x, e, scale, level in zip(torch.split(image_emb.float(), list(block_sizes), dim=1),
                                  torch.split(eps, list(block_sizes), dim=1), text_norms.tolist(), levels.tolist()):
        p = x / x.norm(dim=1, keepdim=True).clamp_min(tiny) + level * e / e.norm(dim=1, keepdim=True).clamp_min(tiny)
        out.append(scale * p / p.norm(dim=1, keepdim=True).clamp_min(tiny))
    return torch.cat(out, dim=1)


class PseudoTextMixer:
    """Replace the first ``round(fraction * B)`` rows of each training batch by uncaptioned images with a
    pseudo text condition.

    ``image_embeds``: (N, D) CLIP image embeddings of the uncaptioned training images (kept on their device in
    their dtype; rows are drawn uniformly with replacement); ``text_norms``: ``block_norms`` of the real CLIP
    text embeddings; ``null_text_tokens``: (L, E) the empty caption's token states."""

    def __init__(self, image_embeds: torch.Tensor, block_sizes: Sequence[int], text_norms: torch.Tensor,
                 null_text_tokens: torch.Tensor, *, fraction: float, noise):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction: expected in [0, 1], got {fraction}")
        if fraction > 0 and image_embeds.shape[0] == 0:
            raise ValueError("a pseudo text fraction > 0 needs uncaptioned training images; there are none")
        self.image_embeds, self.block_sizes = image_embeds, list(block_sizes)
        self.text_norms, self.null_text_tokens = text_norms, null_text_tokens
        self.fraction, self.noise = float(fraction), noise

    def rows(self, batch_size: int) -> int:
        """How many rows of a batch of ``batch_size`` get a pseudo text condition."""
        return int(round(self.fraction * batch_size))

    def mix(self, batch: dict, generator: Optional[torch.Generator] = None) -> dict:
        """{clip_image (B, D), clip_text (B, D), text_tokens (B, L, E)} on one device -> the same keys with the
        first ``rows(B)`` rows replaced (a new dict; the input is not modified)."""
        b = batch["clip_image"].shape[0]
        k = self.rows(b)
        if k == 0:
            return batch
        device = batch["clip_image"].device
        draw = generator.device if generator is not None else device
        index = torch.randint(self.image_embeds.shape[0], (k,), generator=generator, device=draw)
        images = self.image_embeds[index.to(self.image_embeds.device)].to(device, torch.float32)  # (k, D)
        pseudo = pseudo_text_embedding(images, self.block_sizes, self.text_norms, self.noise, generator)
        tokens = batch["text_tokens"]
        null = self.null_text_tokens.to(tokens).reshape(1, *tokens.shape[1:]).expand(k, *tokens.shape[1:])
        return {**batch,
                "clip_image": torch.cat([images.to(batch["clip_image"].dtype), batch["clip_image"][k:]]),
                "clip_text": torch.cat([pseudo.to(batch["clip_text"].dtype), batch["clip_text"][k:]]),
                "text_tokens": torch.cat([null, tokens[k:]])}
