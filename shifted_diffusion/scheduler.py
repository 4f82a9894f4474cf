"""The shifted diffusion process as a diffusers scheduler (the nearest analogue is ``UnCLIPScheduler``).

The network predicts x0; each caption brings its own shift (the cluster mean ``mu`` and std), which ``step``
and ``add_noise`` take as inputs. The tables come from ``DiffusionSchedule`` and the step math from
``sampling.ancestral_step`` / ``sampling.ddim_step``, the same code the pipeline's sampling loop runs.

    scheduler.set_timesteps(8)
    x = scheduler.init_noise(shift_mean, shift_std, generator=g)
    for t in scheduler.timesteps:
        x0_hat = denoiser(x, t.expand(len(x)))
        x = scheduler.step(x0_hat, t, x, shift_mean=shift_mean, shift_std=shift_std, generator=g).prev_sample
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from .checks import check_choice
from .sampling import ancestral_step, ancestral_tables, ddim_step, ddim_tables, sample_start
from .schedule import DiffusionSchedule, ScheduleConfig


@dataclass
class ShiftedDiffusionSchedulerOutput(BaseOutput):
    """prev_sample: x_{t-1} (B, D); pred_original_sample: the x0_hat the step used (B, D)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class ShiftedDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """Forward process q(x_t | x0) = N(sqrt(abar_t) x0 + (1 - sqrt(abar_t)) mu, (1 - abar_t) Sigma) and its
    reverse steps (``sampler``: "ancestral" with ``variance_type`` fixed_large / fixed_small, or "ddim" with
    ``eta``), respaced to any number of steps ("8", "10,10", "ddim50", "fast27"; the original's rules)."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, sampler: str = "ancestral", variance_type: str = "fixed_large",
                 eta: float = 0.0):
        check_choice("sampler", sampler, {"ancestral", "ddim"})
        check_choice("variance_type", variance_type, {"fixed_large", "fixed_small"})
        self.schedule = DiffusionSchedule.from_config(self.schedule_config)
        self.set_timesteps(num_train_timesteps)

    @property
    def schedule_config(self) -> ScheduleConfig:
        return ScheduleConfig(self.config.beta_schedule, self.config.num_train_timesteps, self.config.beta_start,
                              self.config.beta_end)

    @classmethod
    def from_schedule_config(cls, config: ScheduleConfig, **sampling) -> "ShiftedDiffusionScheduler":
        return cls(num_train_timesteps=config.num_timesteps, beta_schedule=config.beta_schedule,
                   beta_start=config.beta_min, beta_end=config.beta_max, **sampling)

    def set_timesteps(self, num_inference_steps: Union[int, str] = 8, device=None) -> None:
        """Respace to ``num_inference_steps`` (a count or a spacing string); ``timesteps`` runs from noisy to clean."""
        steps = str(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        spaced = self.schedule if steps == str(self.schedule.num_steps) else self.schedule.respace(steps)
        self.spaced = spaced.to(device) if device is not None and torch.device(device).type == "cuda" else spaced
        self.timesteps = spaced.timesteps.flip(0).to(device or "cpu")
        self._tables = {}

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def init_noise(self, shift_mean: torch.Tensor, shift_std: torch.Tensor, *, noise_temperature: float = 1.0,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x_T ~ N(mu, (temperature * std)^2)."""
        return sample_start(shift_mean, shift_std, noise_temperature=noise_temperature, generator=generator)

    def _index(self, timestep) -> int:
        t = int(timestep)
        matches = (self.spaced.timesteps == t).nonzero()
        if not len(matches):
            raise ValueError(f"timestep {t} is not one of this schedule's {self.num_inference_steps} steps "
                             f"({self.timesteps.tolist()}); call set_timesteps first")
        return int(matches[0])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *, shift_mean: torch.Tensor,
             shift_std: torch.Tensor, noise_temperature: float = 1.0, generator: Optional[torch.Generator] = None,
             return_dict: bool = True):
        """One reverse step from x_t (``sample``) given x0_hat (``model_output``) and the caption's shift."""
        i = self._index(timestep)
        key = (sample.device, sample.dtype)
        if key not in self._tables:
            self._tables[key] = (ddim_tables(self.spaced, self.config.eta, sample) if self.config.sampler == "ddim"
                                 else ancestral_tables(self.spaced, self.config.variance_type, sample))
        step = ddim_step if self.config.sampler == "ddim" else ancestral_step
        prev = step(self._tables[key], i, sample, model_output, shift_mean, shift_std,
                    noise_temperature=noise_temperature, generator=generator)
        if not return_dict:
            return (prev, model_output)
        return ShiftedDiffusionSchedulerOutput(prev_sample=prev, pred_original_sample=model_output)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, *,
                  shift_mean: torch.Tensor, shift_std: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + (1 - sqrt(abar_t)) mu + sqrt(1 - abar_t) std * noise (training timesteps)."""
        return self.schedule.q_sample(original_samples, timesteps, noise, shift_mean, shift_std)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
