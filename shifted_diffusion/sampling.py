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
    """Clamp x0_hat to mu +- num_std * std (per dim); None leaves it unchanged. The samplers' ``clamp_unit``
    chooses the std (default the shift std; the pipeline passes the raw cluster stds s_k, as the original)."""
    if num_std is None:
        return x0_hat
    return torch.maximum(torch.minimum(x0_hat, shift_mean + num_std * shift_std), shift_mean - num_std * shift_std)


def sample_start(shift_mean, shift_std, *, noise_temperature: float = 1.0, generator=None) -> torch.Tensor:
    """x_T ~ N(mu, (temperature * std)^2); temperature 0 starts at mu (the original released sampler)."""
    _check_shift(shift_mean, shift_std)
    return shift_mean + noise_temperature * shift_std * _noise(shift_mean, generator)


def _table(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype)


def ancestral_tables(schedule: DiffusionSchedule, variance: str, like: torch.Tensor) -> dict:
    """Per-step coefficients of the ancestral step, cast to ``like``'s device and dtype once."""
    return {"coef1": _table(schedule.posterior_mean_coef1, like), "coef2": _table(schedule.posterior_mean_coef2, like),
            "noise_scale": _table(schedule.reverse_variance(variance).sqrt(), like)}


def ancestral_step(tables: dict, i: int, x_t, x0_hat, shift_mean, shift_std, *, noise_temperature: float = 1.0,
                   generator=None) -> torch.Tensor:
    """x_{t-1} = mu + c1 (x0_hat - mu) + c2 (x_t - mu) + sqrt(v_t) * temperature * std * z (no noise at i = 0)."""
    mean = shift_mean + tables["coef1"][i] * (x0_hat - shift_mean) + tables["coef2"][i] * (x_t - shift_mean)
    if i == 0:
        return mean
    return mean + tables["noise_scale"][i] * noise_temperature * shift_std * _noise(x_t, generator)


def ddim_tables(schedule: DiffusionSchedule, eta: float, like: torch.Tensor) -> dict:
    """Per-step coefficients of the DDIM step, cast to ``like``'s device and dtype once."""
    alphas_cumprod, alphas_cumprod_prev = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    sigma = eta * ((1 - alphas_cumprod_prev) / (1 - alphas_cumprod) * (1 - alphas_cumprod / alphas_cumprod_prev)).sqrt()
    return {"sqrt_ab": _table(alphas_cumprod.sqrt(), like), "sqrt_one_minus_ab": _table((1 - alphas_cumprod).sqrt(), like),
            "sqrt_ab_prev": _table(alphas_cumprod_prev.sqrt(), like),
            "direction": _table((1 - alphas_cumprod_prev - sigma**2).clamp(min=0).sqrt(), like),
            "noise_scale": _table(sigma, like), "eta": float(eta)}


def ddim_step(tables: dict, i: int, x_t, x0_hat, shift_mean, shift_std, *, noise_temperature: float = 1.0,
              generator=None) -> torch.Tensor:
    """y_{t-1} = sqrt(abar_{t-1}) y0_hat + sqrt(1 - abar_{t-1} - s_t^2) std eps_hat + s_t * temperature * std * z
    on y = x - mu; std * eps_hat = (x_t - mu - sqrt(abar_t)(x0_hat - mu)) / sqrt(1 - abar_t) (std cancels)."""
    std_eps_hat = (x_t - shift_mean - tables["sqrt_ab"][i] * (x0_hat - shift_mean)) / tables["sqrt_one_minus_ab"][i]
    y_prev = tables["sqrt_ab_prev"][i] * (x0_hat - shift_mean) + tables["direction"][i] * std_eps_hat
    if i > 0 and tables["eta"] > 0:
        y_prev = y_prev + tables["noise_scale"][i] * noise_temperature * shift_std * _noise(x_t, generator)
    return shift_mean + y_prev


def _walk(step, tables, denoiser, schedule, x_t, shift_mean, shift_std, *, clamp_std, clamp_unit, noise_temperature,
          generator, callback, progress, desc) -> torch.Tensor:
    timesteps = schedule.timesteps.to(x_t.device)
    batch = x_t.shape[0]
    unit = shift_std if clamp_unit is None else clamp_unit
    for i in tqdm(range(schedule.num_steps - 1, -1, -1), disable=not progress, desc=desc):
        t = timesteps[i].expand(batch)
        x0_hat = clamp_x0(denoiser(x_t, t), shift_mean, unit, clamp_std)
        x_t = step(tables, i, x_t, x0_hat, shift_mean, shift_std, noise_temperature=noise_temperature,
                   generator=generator)
        if callback is not None:
            callback(i, t, x_t, x0_hat)
    return x_t


def sample_ancestral(
    denoiser: Denoiser,
    schedule: DiffusionSchedule,
    shift_mean: torch.Tensor,
    shift_std: torch.Tensor,
    *,
    variance: str = "fixed_large",
    noise_temperature: float = 1.0,
    clamp_std: Optional[float] = None,
    clamp_unit: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    x_start: Optional[torch.Tensor] = None,
    callback: Optional[Callback] = None,
    progress: bool = False,
) -> torch.Tensor:
    """The ancestral chain x_T -> x_0 (``ancestral_step`` at every step)."""
    x_t = x_start if x_start is not None else sample_start(
        shift_mean, shift_std, noise_temperature=noise_temperature, generator=generator
    )
    return _walk(ancestral_step, ancestral_tables(schedule, variance, x_t), denoiser, schedule, x_t, shift_mean,
                 shift_std, clamp_std=clamp_std, clamp_unit=clamp_unit, noise_temperature=noise_temperature, generator=generator,
                 callback=callback, progress=progress, desc="prior sampling")


def sample_ddim(
    denoiser: Denoiser,
    schedule: DiffusionSchedule,
    shift_mean: torch.Tensor,
    shift_std: torch.Tensor,
    *,
    eta: float = 0.0,
    noise_temperature: float = 1.0,
    clamp_std: Optional[float] = None,
    clamp_unit: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    x_start: Optional[torch.Tensor] = None,
    callback: Optional[Callback] = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) on y = x - mu with noise covariance Sigma (``ddim_step`` at every step)."""
    x_t = x_start if x_start is not None else sample_start(
        shift_mean, shift_std, noise_temperature=noise_temperature, generator=generator
    )
    return _walk(ddim_step, ddim_tables(schedule, eta, x_t), denoiser, schedule, x_t, shift_mean, shift_std,
                 clamp_std=clamp_std, clamp_unit=clamp_unit, noise_temperature=noise_temperature, generator=generator,
                 callback=callback,
                 progress=progress, desc="prior sampling (ddim)")
