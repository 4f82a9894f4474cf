"""Training loss of the prior: x0 target, P2 weighting, condition dropout."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .schedule import DiffusionSchedule


@dataclass(frozen=True)
class LossConfig:
    """P2 weight w_t = 1 / (p2_k + SNR_t)^p2_gamma; condition dropout probabilities."""

    p2_k: float = 1.0
    p2_gamma: float = 1.0
    empty_t5_prob: float = 0.1  # text tokens -> tokens of the empty caption
    empty_clip_prob: float = 0.0  # CLIP sentence embedding -> embedding of the empty caption

    def to_dict(self) -> dict:
        return asdict(self)


def _draw_device(generator: Optional[torch.Generator], device):
    """Random numbers are drawn where the generator lives (then moved), as diffusers does."""
    return generator.device if generator is not None else device


def _bernoulli(batch: int, prob: float, device, generator) -> torch.Tensor:
    return torch.rand(batch, generator=generator, device=_draw_device(generator, device)).to(device) < prob


def drop_conditions(
    text_tokens: torch.Tensor,
    clip_text_emb: torch.Tensor,
    *,
    null_text_tokens: Optional[torch.Tensor],
    null_clip_text_emb: Optional[torch.Tensor],
    empty_t5_prob: float,
    empty_clip_prob: float,
    generator: Optional[torch.Generator] = None,
):
    """Replace each sample's text tokens (prob empty_t5_prob) and CLIP sentence embedding
    (prob empty_clip_prob) by those of the empty caption, independently per sample."""
    batch = text_tokens.shape[0]
    if empty_t5_prob > 0 and text_tokens.shape[1] > 0:
        if null_text_tokens is None:
            raise ValueError("empty_t5_prob > 0 needs null_text_tokens (the text encoding of the empty caption)")
        null = null_text_tokens.reshape(1, *text_tokens.shape[1:]).to(text_tokens)
        drop = _bernoulli(batch, empty_t5_prob, text_tokens.device, generator)
        text_tokens = torch.where(drop[:, None, None], null, text_tokens)
    if empty_clip_prob > 0:
        if null_clip_text_emb is None:
            raise ValueError("empty_clip_prob > 0 needs null_clip_text_emb (the CLIP text embedding of '')")
        null = null_clip_text_emb.reshape(1, -1).to(clip_text_emb)
        drop = _bernoulli(batch, empty_clip_prob, clip_text_emb.device, generator)
        clip_text_emb = torch.where(drop[:, None], null, clip_text_emb)
    return text_tokens, clip_text_emb


class ShiftedDiffusionLoss:
    """loss_i = w_{t_i} * mean_d (x0 - x0_hat(x_t, t))^2, x_t ~ q(x_t | x0) of the shifted process."""

    def __init__(self, schedule: DiffusionSchedule, config: LossConfig = LossConfig()):
        self.schedule = schedule
        self.config = config

    def sample_timesteps(self, batch: int, device, generator=None) -> torch.Tensor:
        """t ~ Uniform{0, ..., S-1} (table indices)."""
        draw = _draw_device(generator, device)
        return torch.randint(0, self.schedule.num_steps, (batch,), device=draw, generator=generator).to(device)

    def __call__(
        self,
        model,
        x0: torch.Tensor,
        text_tokens: torch.Tensor,
        clip_text_emb: torch.Tensor,
        cluster_idx: Optional[torch.Tensor],
        shift_mean: torch.Tensor,
        shift_std: torch.Tensor,
        *,
        null_text_tokens: Optional[torch.Tensor] = None,
        null_clip_text_emb: Optional[torch.Tensor] = None,
        t: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        timesteps_per_caption: int = 1,
    ) -> torch.Tensor:
        """Per-caption P2-weighted x0 loss (B,), float32.

        ``timesteps_per_caption`` K > 1: each caption is trained at K timesteps (B*K rows of x_t) that
        share one caption prefix in the network; the loss is the mean over the K.
        """
        if timesteps_per_caption > 1:
            repeat = lambda x: None if x is None else x.repeat_interleave(timesteps_per_caption, dim=0)  # noqa: E731
            x0, cluster_idx, shift_mean, shift_std = map(repeat, (x0, cluster_idx, shift_mean, shift_std))
        batch = x0.shape[0]
        if t is None:
            t = self.sample_timesteps(batch, x0.device, generator)
        if noise is None:
            draw = _draw_device(generator, x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=draw, dtype=x0.dtype).to(x0.device)
        x_t = self.schedule.q_sample(x0, t, noise, shift_mean, shift_std)
        text_tokens, clip_text_emb = drop_conditions(
            text_tokens,
            clip_text_emb,
            null_text_tokens=null_text_tokens,
            null_clip_text_emb=null_clip_text_emb,
            empty_t5_prob=self.config.empty_t5_prob,
            empty_clip_prob=self.config.empty_clip_prob,
            generator=generator,
        )
        timesteps = self.schedule.timesteps.to(t.device)[t]
        x0_hat = model(x_t, timesteps, cluster_idx, text_tokens, clip_text_emb)
        squared_error = (x0.float() - x0_hat.float()).pow(2).mean(dim=-1)
        losses = squared_error * self.schedule.p2_weight(t, self.config.p2_k, self.config.p2_gamma).to(x0.device)
        return losses.reshape(-1, timesteps_per_caption).mean(dim=1)
