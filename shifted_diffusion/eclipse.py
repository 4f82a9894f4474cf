"""A non-diffusion reference prior in the manner of ECLIPSE (Patel et al., CVPR 2024): one step from caption to
image embedding, trained with a projection (MSE) loss plus a CLIP contrastive loss.

The network is the prior's own (``ShiftedPrior``, baseline form: no cluster token), so an ECLIPSE prior is saved,
loaded and sampled by the same pipeline. Its input embedding is a draw x ~ N(0, I) and its timestep input is the
one a one-step respacing of the schedule keeps (``one_step_timestep``), so the pipeline's sampler at one step,
whose single step returns the network's x0 prediction unchanged (posterior coefficients 1 and 0 at the first
table index), is exactly the trained map. Per caption i of a batch of B::

    x0_hat_i = f(x_i, t*, tokens_i, c_i)
    loss_i   = mean_d (x0_i - x0_hat_i)^2  +  weight * CE_i,
    CE_i     = -log softmax_j( s(x0_hat_i, c_j) / temperature )[i],   s(a, b) = mean over CLIP blocks of cos(a_b, b_b)

with c_j the CLIP text embeddings of the batch (each block normalised on its own, as the multi-CLIP embedding
concatenates independent CLIPs; every other caption of the batch is a negative, a repeated caption included).
The paper's weight is 0.2; the temperature (0.07, CLIP's initial one), the noise input and the condition dropout
(the same empty-caption dropout as the diffusion priors, so guidance works) are this implementation's choices. A
row whose CLIP text embedding was dropped to the empty caption's has no caption to find: its contrastive term is
left out (the projection term stays). The projection term is a mean over the D dimensions, as in the diffusion
priors' loss; the paper writes a squared L2 norm, so if that is a sum over D its 0.2 weighs the contrastive term
D times less than ours (``--eclipse_contrastive_weight`` sets it).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .loss import LossConfig, _draw_device, drop_conditions
from .schedule import DiffusionSchedule

ONE_STEP = "1"  # the respacing an ECLIPSE prior is trained for and sampled with


def one_step_timestep(schedule: DiffusionSchedule) -> torch.Tensor:
    """The network timestep (1,) of the schedule respaced to one step."""
    return schedule.respace(ONE_STEP).timesteps


def block_normalize(x: torch.Tensor, block_sizes: Sequence[int]) -> torch.Tensor:
    """Each CLIP block of the rows of x (N, D) scaled to unit length, float32."""
    return torch.cat([F.normalize(block.float(), dim=-1) for block in x.split(list(block_sizes), dim=-1)], dim=-1)


def contrastive_loss(predicted: torch.Tensor, clip_text: torch.Tensor, block_sizes: Sequence[int],
                     temperature: float) -> torch.Tensor:
    """Per row i: -log softmax_j(s(predicted_i, clip_text_j) / temperature)[i], s the mean blockwise cosine -> (B,)."""
    if predicted.shape != clip_text.shape or predicted.ndim != 2 or predicted.shape[1] != sum(block_sizes):
        raise ValueError(f"contrastive_loss: predicted {tuple(predicted.shape)} and clip_text {tuple(clip_text.shape)} "
                         f"must both be (B, {sum(block_sizes)})")
    similarity = block_normalize(predicted, block_sizes) @ block_normalize(clip_text, block_sizes).T / len(block_sizes)
    targets = torch.arange(predicted.shape[0], device=predicted.device)
    return F.cross_entropy(similarity / temperature, targets, reduction="none")


class EclipseLoss:
    """loss_i = mean_d (x0 - f(x, t*, caption))^2 + weight * contrastive_i (module docstring); the call signature of
    ``ShiftedDiffusionLoss``, so the training loop takes either."""

    def __init__(self, schedule: DiffusionSchedule, config: LossConfig, block_sizes: Sequence[int], *,
                 contrastive_weight: float = 0.2, temperature: float = 0.07):
        self.timestep = one_step_timestep(schedule)
        self.config = config
        self.block_sizes = [int(s) for s in block_sizes]
        self.contrastive_weight = float(contrastive_weight)
        self.temperature = float(temperature)

    def __call__(self, model, x0: torch.Tensor, text_tokens: torch.Tensor, clip_text_emb: torch.Tensor,
                 cluster_idx: Optional[torch.Tensor], shift_mean: torch.Tensor, shift_std: torch.Tensor, *,
                 null_text_tokens: Optional[torch.Tensor] = None, null_clip_text_emb: Optional[torch.Tensor] = None,
                 noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                 timesteps_per_caption: int = 1) -> torch.Tensor:
        """Per-caption loss (B,), float32. The input is shift_mean + shift_std * noise (N(0, I) for the baseline
        shift the trainer gives it); ``timesteps_per_caption`` must be 1 (there is one timestep)."""
        if timesteps_per_caption != 1:
            raise ValueError(f"an ECLIPSE prior has one timestep; timesteps_per_caption {timesteps_per_caption}")
        batch = x0.shape[0]
        if noise is None:
            draw = _draw_device(generator, x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=draw, dtype=x0.dtype).to(x0.device)
        x_in = shift_mean + shift_std * noise
        target_text = clip_text_emb
        text_tokens, clip_text_emb = drop_conditions(
            text_tokens, clip_text_emb, null_text_tokens=null_text_tokens, null_clip_text_emb=null_clip_text_emb,
            empty_t5_prob=self.config.empty_t5_prob, empty_clip_prob=self.config.empty_clip_prob, generator=generator)
        timesteps = self.timestep.to(x0.device).expand(batch)
        x0_hat = model(x_in, timesteps, cluster_idx, text_tokens, clip_text_emb).float()
        projection = (x0.float() - x0_hat).pow(2).mean(dim=-1)
        if self.contrastive_weight == 0:
            return projection
        kept = (clip_text_emb == target_text).all(dim=-1).float()  # CLIP condition not dropped
        return projection + self.contrastive_weight * kept * contrastive_loss(x0_hat, target_text, self.block_sizes,
                                                                              self.temperature)
