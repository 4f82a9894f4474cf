"""Image-embedding projection: one CLIP image embedding -> a few cross-attention tokens.

The language-free decoder replaces Stable Diffusion's 77 text tokens by `num_tokens` tokens
computed from the (un-normalised, concatenated) multi-CLIP image embedding x0:
    encoder_hidden_states = LayerNorm?( reshape( Linear(x0), (num_tokens, cross_attention_dim) ) ).
It is a diffusers ModelMixin + ConfigMixin so `save_pretrained` / `from_pretrained` work beside the pipeline.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

PROJECTION_SUBFOLDER = "image_projection"


class ImageEmbeddingProjection(ModelMixin, ConfigMixin):
    """Linear D -> num_tokens x cross_attention_dim (optionally LayerNorm per token): x0 -> prompt_embeds."""

    @register_to_config
    def __init__(
        self,
        clip_dim: int = 1536,
        cross_attention_dim: int = 1024,
        num_tokens: int = 4,
        layer_norm: bool = True,
    ):
        super().__init__()
        if clip_dim <= 0 or cross_attention_dim <= 0 or num_tokens <= 0:
            raise ValueError(
                f"ImageEmbeddingProjection needs positive sizes, got clip_dim={clip_dim}, "
                f"cross_attention_dim={cross_attention_dim}, num_tokens={num_tokens}"
            )
        self.proj = torch.nn.Linear(clip_dim, num_tokens * cross_attention_dim)
        self.norm = torch.nn.LayerNorm(cross_attention_dim) if layer_norm else torch.nn.Identity()

    def check_image_embeds(self, image_embeds: torch.Tensor, source: str = "image_embeds") -> None:
        """Raise a clear error when `image_embeds` is not (B, clip_dim)."""
        clip_dim = self.config.clip_dim
        if image_embeds.ndim != 2 or image_embeds.shape[-1] != clip_dim:
            raise ValueError(
                f"{source}: expected an image embedding of shape (B, {clip_dim}) (clip_dim of the projection, "
                f"from its config), got shape {tuple(image_embeds.shape)}; the CLIP models that produced the "
                f"embedding do not match the ones the decoder was fine-tuned with"
            )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        self.check_image_embeds(image_embeds)
        batch = image_embeds.shape[0]
        tokens = self.proj(image_embeds.to(self.proj.weight.dtype))  # (B, num_tokens * C)
        tokens = tokens.view(batch, self.config.num_tokens, self.config.cross_attention_dim)  # (B, N, C)
        return self.norm(tokens)  # (B, N, C)
