"""The shifted Gaussian diffusion process (Zhou et al., CVPR 2023).

Every formula takes explicit ``shift_mean`` (mu) and ``shift_std`` (the per-dim std of Sigma, with
``std_scale`` already applied).  The DALL-E 2 baseline is ``shift_mean = 0, shift_std = 1``; then every
quantity reduces to plain DDPM (Ho et al. 2020).  Equivalently, ``x - mu`` follows DDPM whose noise has
covariance Sigma, which is how the code is written.

Tables are built in float64 on the CPU and cast to the input's device and dtype when used.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Sequence, Union

import torch

Spacing = Union[int, str, Sequence[int]]


@dataclass(frozen=True)
class ScheduleConfig:
    """Beta schedule of the forward process; linear betas are scaled by 1000/T as in improved-diffusion."""

    beta_schedule: str = "linear"  # "linear" | "cosine"
    num_timesteps: int = 1000
    beta_min: float = 1e-4
    beta_max: float = 0.02

    def to_dict(self) -> dict:
        return asdict(self)


def linear_betas(num_timesteps: int, beta_min: float = 1e-4, beta_max: float = 0.02) -> torch.Tensor:
    """b_t linear from beta_min to beta_max, both scaled by 1000/T (improved-diffusion)."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * beta_min, scale * beta_max, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """b_t = 1 - abar(t+1)/abar(t), abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2) (Nichol & Dhariwal 2021)."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def betas_from_config(config: ScheduleConfig) -> torch.Tensor:
    """The (T,) float64 betas a ScheduleConfig describes."""
    if config.num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {config.num_timesteps}")
    if config.beta_schedule == "linear":
        return linear_betas(config.num_timesteps, config.beta_min, config.beta_max)
    if config.beta_schedule == "cosine":
        return cosine_betas(config.num_timesteps)
    raise ValueError(f"unknown beta_schedule {config.beta_schedule!r}; expected 'linear' or 'cosine'")


def _ddim_timesteps(num_timesteps: int, count: int) -> list[int]:
    """The smallest integer stride giving exactly ``count`` timesteps from 0; refused when none does."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return list(range(0, num_timesteps, stride))
    raise ValueError(f"ddim{count}: no integer stride takes exactly {count} of {num_timesteps} timesteps")


def _section_timesteps(num_timesteps: int, counts: list[int]) -> list[int]:
    """The range split into len(counts) near-equal sections; section i gives counts[i] timesteps at a
    fractional stride accumulated step by step and rounded (Python's round: halves to even)."""
    base, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if not 0 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return kept


def spaced_timesteps(num_timesteps: int, spacing: Spacing) -> list[int]:
    """Timesteps kept when respacing, sorted: the original release's rules (improved-diffusion's
    ``space_timesteps``, plus GLIDE's "fast27").

    ``8`` or ``"8"``: 8 evenly strided steps including 0 and T-1; ``"10,20"``: sections of the range
    with that many steps each; ``"ddim50"``: the integer stride from 0 that gives exactly 50 steps (an
    error when no stride does); ``"fast27"``: "10,10,3,2,2" with T-1 replaced by T-3; a sequence of
    ints: exactly those timesteps.
    """
    if isinstance(spacing, (list, tuple)):
        kept = sorted(set(int(t) for t in spacing))
        if not kept or kept[0] < 0 or kept[-1] >= num_timesteps:
            raise ValueError(f"timesteps {spacing} must lie in [0, {num_timesteps})")
        return kept
    spacing = str(spacing).strip()
    if spacing == "fast27":
        kept = set(_section_timesteps(num_timesteps, [10, 10, 3, 2, 2]))
        kept.discard(num_timesteps - 1)  # fewer artefacts from the noisiest step
        kept.add(num_timesteps - 3)
        return sorted(kept)
    try:
        if spacing.startswith("ddim"):
            return _ddim_timesteps(num_timesteps, int(spacing[len("ddim"):]))
        counts = [int(c) for c in spacing.split(",")]
    except ValueError as error:
        if "ddim" in str(error) or "section" in str(error):
            raise
        raise ValueError(f"timestep spacing {spacing!r}: expected a count ('8'), counts per section ('10,20'), "
                         "'ddimN', 'fast27' or a list of timesteps") from None
    kept = sorted(set(_section_timesteps(num_timesteps, counts)))
    if not kept:
        raise ValueError(f"timestep spacing {spacing!r} keeps no timestep")
    return kept


def _expand(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] cast to like's device/dtype, shaped (B, 1, ..., 1) to broadcast against like."""
    values = table.to(device=t.device)[t].to(device=like.device, dtype=like.dtype)
    return values.reshape(values.shape + (1,) * (like.dim() - values.dim()))


class DiffusionSchedule:
    """Tables of one (possibly respaced) schedule; index ``t`` is a table index, ``timesteps[t]`` is
    the original timestep the network is conditioned on."""

    def __init__(self, betas: torch.Tensor, timesteps: torch.Tensor | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.timesteps = (
            torch.arange(len(betas)) if timesteps is None else torch.as_tensor(timesteps, dtype=torch.long)
        )
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # q(x_{t-1} | x_t, x0): mean = mu + c1 (x0 - mu) + c2 (x_t - mu), variance = bt~ Sigma
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = alphas.sqrt() * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> "DiffusionSchedule":
        return cls(betas_from_config(config))

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def respace(self, spacing: Spacing) -> "DiffusionSchedule":
        """Keep a subset of steps; betas recomputed from the kept abar: b'_i = 1 - abar_{k_i} / abar_{k_{i-1}}."""
        kept = spaced_timesteps(self.num_steps, spacing)
        alphas_cumprod = self.alphas_cumprod[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        return DiffusionSchedule(1.0 - alphas_cumprod / previous, self.timesteps[kept])

    def to(self, device) -> "DiffusionSchedule":
        """A copy whose tables live on ``device`` (float64 kept): samplers then copy nothing from the host,
        which a CUDA-graph capture requires. Returns ``self`` when every table is already there."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" is the current CUDA device
            device = torch.device("cuda", torch.cuda.current_device())
        tables = {name: value for name, value in vars(self).items() if isinstance(value, torch.Tensor)}
        if all(value.device == device for value in tables.values()):
            return self
        moved = copy.copy(self)
        for name, value in tables.items():
            setattr(moved, name, value.to(device))
        return moved

    def reverse_variance(self, kind: str = "fixed_large") -> torch.Tensor:
        """(S,) factor v_t of the reverse variance v_t Sigma: "fixed_large" b_t (bt~_1 at the first
        step) or "fixed_small" bt~_t."""
        if kind == "fixed_small":
            return self.posterior_variance
        if kind == "fixed_large":
            if self.num_steps == 1:
                return self.posterior_variance
            return torch.cat([self.posterior_variance[1:2], self.betas[1:]])
        raise ValueError(f"unknown reverse variance {kind!r}; expected 'fixed_large' or 'fixed_small'")

    def _check(self, name: str, tensor: torch.Tensor, like: torch.Tensor) -> None:
        if tensor.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(like.shape)} (same as x0/x_t)")

    def _check_t(self, t: torch.Tensor, batch: int) -> None:
        if t.dim() != 1 or t.shape[0] != batch:
            raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")

    def q_mean_std(self, x0, t, shift_mean, shift_std):
        """q(x_t | x0) = N(sqrt(abar_t) x0 + (1 - sqrt(abar_t)) mu, (1 - abar_t) Sigma): (mean, std)."""
        self._check_t(t, x0.shape[0])
        sqrt_ab = _expand(self.sqrt_alphas_cumprod, t, x0)
        mean = shift_mean + sqrt_ab * (x0 - shift_mean)
        return mean, _expand(self.sqrt_one_minus_alphas_cumprod, t, x0) * shift_std

    def q_sample(self, x0, t, noise, shift_mean, shift_std):
        """x_t = sqrt(abar_t) x0 + (1 - sqrt(abar_t)) mu + sqrt(1 - abar_t) std * noise."""
        for name, tensor in (("noise", noise), ("shift_mean", shift_mean), ("shift_std", shift_std)):
            self._check(name, tensor, x0)
        mean, std = self.q_mean_std(x0, t, shift_mean, shift_std)
        return mean + std * noise

    def q_posterior(self, x0, x_t, t, shift_mean, shift_std):
        """q(x_{t-1} | x_t, x0) = N(mu + c1 (x0 - mu) + c2 (x_t - mu), bt~_t Sigma): (mean, variance)."""
        self._check("x_t", x_t, x0)
        self._check_t(t, x0.shape[0])
        mean = (
            shift_mean
            + _expand(self.posterior_mean_coef1, t, x0) * (x0 - shift_mean)
            + _expand(self.posterior_mean_coef2, t, x0) * (x_t - shift_mean)
        )
        return mean, _expand(self.posterior_variance, t, x0) * shift_std**2

    def x0_from_eps(self, x_t, t, eps, shift_mean, shift_std):
        """x0 = mu + (x_t - mu - sqrt(1 - abar_t) std eps) / sqrt(abar_t)."""
        self._check_t(t, x_t.shape[0])
        residual = x_t - shift_mean - _expand(self.sqrt_one_minus_alphas_cumprod, t, x_t) * shift_std * eps
        return shift_mean + residual / _expand(self.sqrt_alphas_cumprod, t, x_t)

    def eps_from_x0(self, x_t, t, x0, shift_mean, shift_std):
        """eps = (x_t - mu - sqrt(abar_t)(x0 - mu)) / (sqrt(1 - abar_t) std)."""
        self._check_t(t, x_t.shape[0])
        residual = x_t - shift_mean - _expand(self.sqrt_alphas_cumprod, t, x_t) * (x0 - shift_mean)
        return residual / (_expand(self.sqrt_one_minus_alphas_cumprod, t, x_t) * shift_std)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR_t = abar_t / (1 - abar_t), float64."""
        alphas_cumprod = self.alphas_cumprod.to(t.device)[t]
        return alphas_cumprod / (1.0 - alphas_cumprod)

    def p2_weight(self, t: torch.Tensor, k: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
        """w_t = 1 / (k + SNR_t)^gamma (Choi et al. 2022), float32."""
        return (1.0 / (k + self.snr(t)) ** gamma).float()
