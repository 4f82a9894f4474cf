"""Samplers of the shifted reverse process on an x0-predicting denoiser.

A denoiser is ``denoiser(x_t (B, D), timesteps (B,) long) -> x0_hat (B, D)``, where ``timesteps`` are
the original timesteps the network was trained on (``schedule.timesteps``).  Classifier-free guidance
lives in the denoiser (``ShiftedPrior.denoiser``); samplers only walk the chain.  All per-step
coefficients are cast to the device once, before the loop.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .schedule import DiffusionSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _check_shift(shift_mean: torch.Tensor, shift_std: torch.Tensor) -> None:
    if shift_mean.dim() != 2 or shift_std.shape != shift_mean.shape:
        raise ValueError(
            f"shift_mean and shift_std must both be (B, D); got {tuple(shift_mean.shape)} and {tuple(shift_std.shape)}"
        )


def _noise(like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """N(0, I) like `like`, drawn on the generator's device (a CPU generator works for CUDA sampling)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def clamp_x0(x0_hat, shift_mean, shift_std, num_std: Optional[float]):
    """Clamp x0_hat to mu +- num_std * std (per dim); None leaves it unchanged."""
    if num_std is None:
        return x0_hat
    return torch.maximum(torch.minimum(x0_hat, shift_mean + num_std * shift_std), shift_mean - num_std * shift_std)


def sample_start(shift_mean, shift_std, *, noise_temperature: float = 1.0, generator=None) -> torch.Tensor:
    """x_T ~ N(mu, (temperature * std)^2); temperature 0 starts at mu (the original released sampler)."""
    _check_shift(shift_mean, shift_std)
    return shift_mean + noise_temperature * shift_std * _noise(shift_mean, generator)


def _table(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype)


def sample_ancestral(
    denoiser: Denoiser,
    schedule: DiffusionSchedule,
    shift_mean: torch.Tensor,
    shift_std: torch.Tensor,
    *,
    variance: str = "fixed_large",
    noise_temperature: float = 1.0,
    clamp_std: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    x_start: Optional[torch.Tensor] = None,
    callback: Optional[Callback] = None,
    progress: bool = False,
) -> torch.Tensor:
    """x_{t-1} = mu + c1 (x0_hat - mu) + c2 (x_t - mu) + sqrt(v_t) * temperature * std * z."""
    x_t = x_start if x_start is not None else sample_start(
        shift_mean, shift_std, noise_temperature=noise_temperature, generator=generator
    )
    coef1 = _table(schedule.posterior_mean_coef1, x_t)
    coef2 = _table(schedule.posterior_mean_coef2, x_t)
    noise_scale = _table(schedule.reverse_variance(variance).sqrt(), x_t) * noise_temperature
    timesteps = schedule.timesteps.to(x_t.device)
    batch = x_t.shape[0]
    for i in tqdm(range(schedule.num_steps - 1, -1, -1), disable=not progress, desc="prior sampling"):
        t = timesteps[i].expand(batch)
        x0_hat = clamp_x0(denoiser(x_t, t), shift_mean, shift_std, clamp_std)
        mean = shift_mean + coef1[i] * (x0_hat - shift_mean) + coef2[i] * (x_t - shift_mean)
        x_t = mean + noise_scale[i] * shift_std * _noise(x_t, generator) if i > 0 else mean
        if callback is not None:
            callback(i, t, x_t, x0_hat)
    return x_t


def sample_ddim(
    denoiser: Denoiser,
    schedule: DiffusionSchedule,
    shift_mean: torch.Tensor,
    shift_std: torch.Tensor,
    *,
    eta: float = 0.0,
    noise_temperature: float = 1.0,
    clamp_std: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    x_start: Optional[torch.Tensor] = None,
    callback: Optional[Callback] = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) on y = x - mu with noise covariance Sigma:
    y_{t-1} = sqrt(abar_{t-1}) y0_hat + sqrt(1 - abar_{t-1} - s_t^2) std eps_hat + s_t * temperature * std * z,
    s_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1})."""
    x_t = x_start if x_start is not None else sample_start(
        shift_mean, shift_std, noise_temperature=noise_temperature, generator=generator
    )
    alphas_cumprod = schedule.alphas_cumprod
    alphas_cumprod_prev = schedule.alphas_cumprod_prev
    sigma = eta * ((1 - alphas_cumprod_prev) / (1 - alphas_cumprod) * (1 - alphas_cumprod / alphas_cumprod_prev)).sqrt()
    sqrt_ab = _table(alphas_cumprod.sqrt(), x_t)
    sqrt_one_minus_ab = _table((1 - alphas_cumprod).sqrt(), x_t)
    sqrt_ab_prev = _table(alphas_cumprod_prev.sqrt(), x_t)
    direction = _table((1 - alphas_cumprod_prev - sigma**2).clamp(min=0).sqrt(), x_t)
    noise_scale = _table(sigma, x_t) * noise_temperature
    timesteps = schedule.timesteps.to(x_t.device)
    batch = x_t.shape[0]
    for i in tqdm(range(schedule.num_steps - 1, -1, -1), disable=not progress, desc="prior sampling (ddim)"):
        t = timesteps[i].expand(batch)
        x0_hat = clamp_x0(denoiser(x_t, t), shift_mean, shift_std, clamp_std)
        # std * eps_hat = (x_t - mu - sqrt(abar_t)(x0_hat - mu)) / sqrt(1 - abar_t): std cancels (zero stds are fine)
        std_eps_hat = (x_t - shift_mean - sqrt_ab[i] * (x0_hat - shift_mean)) / sqrt_one_minus_ab[i]
        y_prev = sqrt_ab_prev[i] * (x0_hat - shift_mean) + direction[i] * std_eps_hat
        if i > 0 and eta > 0:
            y_prev = y_prev + noise_scale[i] * shift_std * _noise(x_t, generator)
        x_t = shift_mean + y_prev
        if callback is not None:
            callback(i, t, x_t, x0_hat)
    return x_t
