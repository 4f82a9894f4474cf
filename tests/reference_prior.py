"""Reference prior with the original ClipPrior's structure and state-dict names: a numerical reference.

Test code, not part of the package: the trunk is the real `x_transformers==0.28.4` Decoder (the `test`
extra), as in the original release; the wrapper around it has the original's module names and layouts, so
its state dict is an "original checkpoint". Tests reach it through tests/conftest.py's `reference_prior`
fixture; benchmarks/prior_speed.py loads this file by path from a checkout. Plain Python, no pytest.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ReferenceLayerNorm(nn.Module):
    """The original's LN: learned `gamma`, fixed zero `beta` buffer, eps 1e-5."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta, eps=1e-5)


def reference_sinusoid(values: Tensor, dim: int) -> Tensor:
    """[cos(v f), sin(v f)], f = exp(-ln(10000) * arange(dim // 2) / (dim // 2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half).to(values.device)
    args = values[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _mlp_proj(d_in: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width), nn.SiLU(), ReferenceLayerNorm(width), nn.Linear(width, width))


class ReferenceClipPrior(nn.Module):
    """The original network: x_transformers Decoder over [t5 | clip | t | (k) | x_t | final]."""

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        clip_dim: int,
        text_dim: int,
        use_vocab: bool = True,
        dim_head: int = 64,
    ):
        super().__init__()
        from x_transformers import Decoder

        self.width = width
        kwargs = dict(dim=width, depth=depth, heads=heads, use_scalenorm=True, use_rmsnorm=True, ff_glu=True)
        if dim_head != 64:  # 64 is x_transformers' default (and the original's)
            kwargs["attn_dim_head"] = dim_head
        self.transformer = Decoder(**kwargs)
        self.time_embed = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.t5_proj = nn.Sequential(
            ReferenceLayerNorm(text_dim), nn.Linear(text_dim, width), nn.SiLU(),
            ReferenceLayerNorm(width), nn.Linear(width, width),
        )
        self.x_proj = _mlp_proj(clip_dim, width)
        self.clip_sentence_proj = _mlp_proj(clip_dim, width)
        self.final_emb = nn.Parameter(torch.randn(1, 1, width))
        self.out_proj = nn.Sequential(nn.Linear(width, clip_dim), nn.SiLU(), nn.Linear(clip_dim, clip_dim))
        self.pos_embed = (
            nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width)) if use_vocab else None
        )

    @classmethod
    def from_config(cls, config) -> "ReferenceClipPrior":
        """Same architecture as a shifted_diffusion PriorConfig."""
        return cls(
            width=config.width, depth=config.depth, heads=config.heads, clip_dim=config.clip_dim,
            text_dim=config.text_dim, use_vocab=config.vocab_size is not None, dim_head=config.dim_head,
        )

    def forward(
        self,
        x_t: Tensor,
        timesteps: Tensor,
        text_tokens: Tensor,
        clip_text_emb: Tensor,
        cluster_idx: Optional[Tensor] = None,
    ) -> Tensor:
        """x0_hat (B, D); the whole sequence goes through the trunk every call."""
        b = x_t.shape[0]
        x = self.x_proj(x_t)[:, None]
        temb = self.time_embed(reference_sinusoid(timesteps, self.width))[:, None]
        clip = self.clip_sentence_proj(clip_text_emb[:, None])
        text = self.t5_proj(text_tokens)
        parts = [text, clip, temb]
        if self.pos_embed is not None:
            parts.append(self.pos_embed(reference_sinusoid(cluster_idx, self.width))[:, None])
        parts += [x, self.final_emb.repeat(b, 1, 1)]
        out = self.transformer(torch.cat(parts, dim=1))
        return self.out_proj(out[:, -1])


@torch.no_grad()
def randomize_(module: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Overwrite every parameter with random values (gains around 1, weights ~ 1/sqrt(fan_in))."""
    for name, p in module.named_parameters():
        if p.dim() == 1 and (name.endswith(".g") or name.endswith(".gamma") or name.endswith("weight")):
            p.copy_(1.0 + 0.5 * (torch.rand(p.shape, generator=generator) - 0.5))  # norm gains
        elif p.dim() == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))  # biases
        elif name.endswith("final_emb"):
            p.copy_(torch.randn(p.shape, generator=generator))
        else:
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1]))
    return module
