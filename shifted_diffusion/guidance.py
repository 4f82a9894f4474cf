"""Classifier-free guidance on the x0 prediction (Ho & Salimans 2022, applied to x0 as in the paper)."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor

from .prior import PrefixCache, check_tensor, require_tensor


def classifier_free_guidance(
    x0_cond: torch.Tensor, x0_uncond: torch.Tensor, scale: Union[float, torch.Tensor]
) -> torch.Tensor:
    """x0_hat = x0_uncond + g * (x0_cond - x0_uncond), over the whole embedding (not halves of it)."""
    if x0_cond.shape != x0_uncond.shape:
        raise ValueError(
            f"classifier_free_guidance: x0_cond has shape {tuple(x0_cond.shape)} but x0_uncond has "
            f"shape {tuple(x0_uncond.shape)}; they must match"
        )
    return x0_uncond + scale * (x0_cond - x0_uncond)


def guided_denoiser(
    prior,
    text_tokens: Tensor,
    clip_text_emb: Tensor,
    cluster_idx: Optional[Tensor],
    *,
    guidance_scale: float = 1.0,
    null_text_tokens: Optional[Tensor] = None,
    null_clip_text_emb: Optional[Tensor] = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """The network turned into a sampler's denoiser (x_t, timesteps) -> x0_hat (k-diffusion's "external" wrapper
    shape): caption prefixes encoded once here, classifier-free guidance on x0 outside the network.

    guidance_scale != 1: x0_hat = x0_uncond + g * (x0_cond - x0_uncond) with the unconditional
    caption = `null_text_tokens` ((L, E) or (1, L, E), broadcast) and, if given,
    `null_clip_text_emb` ((D,) or (1, D)); cond and uncond run as one doubled batch.
    The prefix is computed here, once, under the caller's grad mode. x_t may have batch B*K
    (K samples per caption, `repeat_interleave` order).
    """
    cfg = prior.arch
    b = prior._check_caption(text_tokens, clip_text_emb)
    # a bf16/fp16 network samples from fp32 inputs: captions and x_t go in its dtype, x0_hat comes back in x_t's
    dtype = prior.final_emb.dtype if not torch.is_autocast_enabled() else clip_text_emb.dtype
    text_tokens, clip_text_emb = text_tokens.to(dtype), clip_text_emb.to(dtype)
    if cfg.has_cluster_token:
        if cluster_idx is None:
            raise ValueError(f"cluster_idx: required (shape (B={b},)) because vocab_size={cfg.vocab_size}")
        check_tensor("cluster_idx", cluster_idx, (b,), f"(B={b},)")
    guided = float(guidance_scale) != 1.0

    if not guided:
        prefix = prior.encode_prefix(text_tokens, clip_text_emb)
    else:
        if null_text_tokens is None:
            raise ValueError(
                "null_text_tokens: required when guidance_scale != 1 (the text tokens of the empty caption)"
            )
        require_tensor("null_text_tokens", null_text_tokens)
        null_tokens = null_text_tokens[None] if null_text_tokens.dim() == 2 else null_text_tokens
        check_tensor(
            "null_text_tokens", null_tokens, (1, cfg.text_len, cfg.text_dim),
            f"(text_len={cfg.text_len}, text_dim={cfg.text_dim}) or (1, {cfg.text_len}, {cfg.text_dim})",
            given=null_text_tokens,
        )
        null_tokens = null_tokens.to(text_tokens)
        if null_clip_text_emb is not None:
            require_tensor("null_clip_text_emb", null_clip_text_emb)
            null_clip = null_clip_text_emb[None] if null_clip_text_emb.dim() == 1 else null_clip_text_emb
            check_tensor(
                "null_clip_text_emb", null_clip, (1, cfg.clip_dim),
                f"(clip_dim={cfg.clip_dim},) or (1, {cfg.clip_dim})",
                given=null_clip_text_emb,
            )
            null_clip = null_clip.to(clip_text_emb)
        # batch 2B: [cond | uncond]; the empty caption is encoded once, not once per prompt
        prefix = PrefixCache.cat_for_sampling([
            prior.encode_prefix(text_tokens, clip_text_emb),
            prior.encode_null_prefix(null_tokens, clip_text_emb if null_clip_text_emb is None else null_clip, b),
        ], cfg.tail_len)

    def denoise(x_t: Tensor, timesteps: Tensor) -> Tensor:
        n = x_t.shape[0]
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(n)
        if n % b:
            raise ValueError(f"x_t: batch {n} must be a multiple of the caption batch {b}")
        idx = cluster_idx
        if idx is not None and n != b:
            idx = idx.repeat_interleave(n // b)
        if not guided:
            return prior.forward_cached(prefix, x_t.to(dtype), timesteps, idx).to(x_t.dtype)
        idx2 = None if idx is None else torch.cat([idx, idx])
        x0 = prior.forward_cached(prefix, torch.cat([x_t, x_t]).to(dtype), torch.cat([timesteps, timesteps]), idx2)
        x0_cond, x0_uncond = x0.to(x_t.dtype).chunk(2, dim=0)
        return classifier_free_guidance(x0_cond, x0_uncond, guidance_scale)

    return denoise


class UnconditionalInputs(ModelMixin, ConfigMixin):
    """What the unconditional branch of classifier-free guidance feeds the network: one place, saved with the
    pipeline (config + safetensors) instead of being inferred where guidance runs.

    ``text_tokens``: "empty_caption" (the word-level encoding of "", what this project's training drops to) or
    "zeros" (the original release trained its T5 dropout by zeroing the tokens, and sampled the same way).
    ``clip_text``: "prompt" (each prompt keeps its own CLIP text embedding; the original) or "empty_caption"
    (replaced by the CLIP embedding of "": for priors trained with CLIP dropout or without text tokens)."""

    @register_to_config
    def __init__(self, text_len: int = 80, text_dim: int = 1024, clip_dim: int = 1536,
                 text_tokens: str = "empty_caption", clip_text: str = "prompt"):
        super().__init__()
        from .checks import check_choice

        check_choice("text_tokens", text_tokens, {"empty_caption", "zeros"})
        check_choice("clip_text", clip_text, {"prompt", "empty_caption"})
        self.register_buffer("null_text_tokens", torch.zeros(text_len, text_dim))  # (L, E)
        self.register_buffer("null_clip_text", torch.zeros(clip_dim))  # (D,)

    @classmethod
    def from_encodings(cls, null_text_tokens: Tensor, null_clip_text: Tensor, *, text_tokens: str = "empty_caption",
                       clip_text: str = "prompt") -> "UnconditionalInputs":
        """From the encodings of the empty caption ((L, E) tokens, (D,) CLIP text embedding)."""
        inputs = cls(text_len=null_text_tokens.shape[0], text_dim=null_text_tokens.shape[1],
                     clip_dim=null_clip_text.shape[0], text_tokens=text_tokens, clip_text=clip_text)
        if text_tokens == "empty_caption":
            inputs.null_text_tokens.copy_(null_text_tokens)
        inputs.null_clip_text.copy_(null_clip_text)
        return inputs

    def inputs(self) -> tuple[Tensor, Optional[Tensor]]:
        """(null text tokens (L, E), null CLIP text embedding (D,) or None when each prompt keeps its own)."""
        return self.null_text_tokens, self.null_clip_text if self.config.clip_text == "empty_caption" else None
