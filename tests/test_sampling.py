"""Samplers against closed forms: oracle sampling of a Gaussian data distribution (1000 and 8 steps),
DDIM(eta=1) == ancestral fixed-small, temperature 0, clamping, guidance."""

import numpy as np
import pytest
import torch

from shifted_diffusion.guidance import classifier_free_guidance
from shifted_diffusion.sampling import sample_ancestral, sample_ddim
from shifted_diffusion.schedule import DiffusionSchedule, ScheduleConfig

T = 1000
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, T))  # independent of the package's tables

DATA_MEAN = np.array([1.0, -2.0, 0.5, 3.0])
DATA_VAR = np.array([0.2, 1.5, 0.05, 4.0])


def shift_params(shifted):
    if not shifted:
        return np.zeros(4), np.ones(4)
    return np.array([0.8, -1.0, 0.0, 2.0]), np.array([0.7, 1.3, 0.4, 2.5])


def oracle(mu, s):
    """E[x0 | x_t] for x0 ~ N(m, diag(c)) under the shifted forward process, in closed form."""
    m, c = (torch.tensor(v) for v in (DATA_MEAN, DATA_VAR))
    mu_t, s_t = torch.tensor(mu), torch.tensor(s)
    abar = torch.tensor(ABAR)

    def denoise(x_t, timesteps):
        ab = abar[timesteps][:, None]
        a = ab.sqrt()
        mean_t = a * m + (1 - a) * mu_t
        var_t = ab * c + (1 - ab) * s_t**2
        return m + a * c / var_t * (x_t - mean_t)

    return denoise


def predicted_moments(kept, mu, s, variance, temperature=1.0):
    """Propagate mean and variance through the linear-Gaussian reverse chain exactly (numpy)."""
    m, c = DATA_MEAN, DATA_VAR
    mean, var = mu.copy(), (temperature * s) ** 2
    for i in range(len(kept) - 1, -1, -1):
        ab = ABAR[kept[i]]
        ab_prev = ABAR[kept[i - 1]] if i > 0 else 1.0
        beta = 1 - ab / ab_prev
        c1 = beta * np.sqrt(ab_prev) / (1 - ab)
        c2 = np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        a = np.sqrt(ab)
        gain = a * c / (ab * c + (1 - ab) * s**2)
        expected_t = a * m + (1 - a) * mu
        mean = mu + c1 * (m + gain * (mean - expected_t) - mu) + c2 * (mean - mu)
        var = (c1 * gain + c2) ** 2 * var
        if i > 0:
            v = beta * (1 - ab_prev) / (1 - ab) if variance == "fixed_small" else beta
            var = var + temperature**2 * v * s**2
    return mean, var


def run_oracle(spacing, shifted, variance, n=20000, seed=0):
    mu, s = shift_params(shifted)
    schedule = DiffusionSchedule.from_config(ScheduleConfig())
    if spacing != T:
        schedule = schedule.respace(spacing)
    mu_b = torch.tensor(mu).expand(n, 4)
    s_b = torch.tensor(s).expand(n, 4)
    x0 = sample_ancestral(
        oracle(mu, s), schedule, mu_b, s_b, variance=variance, generator=torch.Generator().manual_seed(seed)
    )
    return x0.numpy(), schedule.timesteps.numpy(), mu, s


def assert_moments(samples, mean, var, n_sigma=4.5):
    n = len(samples)
    assert np.all(np.abs(samples.mean(0) - mean) < n_sigma * np.sqrt(var / n)), (samples.mean(0), mean)
    # standard error of a sample variance of a Gaussian: var * sqrt(2 / n)
    assert np.all(np.abs(samples.var(0) - var) < n_sigma * var * np.sqrt(2 / n)), (samples.var(0), var)


@pytest.mark.parametrize("shifted", [True, False])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_oracle_sampling_1000_steps_reproduces_the_data(shifted, variance):
    samples, kept, mu, s = run_oracle(T, shifted, variance)
    assert_moments(samples, DATA_MEAN, DATA_VAR)


@pytest.mark.parametrize("shifted", [True, False])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_oracle_sampling_8_steps_mean_exact_variance_as_predicted(shifted, variance):
    samples, kept, mu, s = run_oracle("8", shifted, variance, n=40000)
    mean, var = predicted_moments(kept, mu, s, variance)
    np.testing.assert_allclose(mean, DATA_MEAN, atol=1e-3)  # the reverse chain keeps the mean (up to abar_T)
    assert_moments(samples, mean, var)
    # the fixed reverse variance does NOT reproduce the data variance at 8 steps: the error is real
    se = DATA_VAR * np.sqrt(2 / len(samples))
    assert np.max(np.abs(var - DATA_VAR) / se) > 10


def test_the_original_start_at_mu_is_temperature_zero():
    mu, s = shift_params(True)
    schedule = DiffusionSchedule.from_config(ScheduleConfig()).respace("8")
    seen = []

    def denoise(x_t, t):
        seen.append(x_t.clone())
        return oracle(mu, s)(x_t, t)

    mu_b, s_b = torch.tensor(mu).expand(3, 4), torch.tensor(s).expand(3, 4)
    a = sample_ancestral(denoise, schedule, mu_b, s_b, noise_temperature=0.0, generator=torch.Generator().manual_seed(1))
    b = sample_ancestral(denoise, schedule, mu_b, s_b, noise_temperature=0.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(seen[0], mu_b)  # started exactly at the cluster mean
    torch.testing.assert_close(a, b)  # and added no noise on the way
    c = sample_ancestral(denoise, schedule, mu_b, s_b, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c)


def test_ddim_eta_one_equals_ancestral_fixed_small_and_eta_zero_is_deterministic():
    mu, s = shift_params(True)
    schedule = DiffusionSchedule.from_config(ScheduleConfig()).respace("16")
    mu_b, s_b = torch.tensor(mu).expand(6, 4), torch.tensor(s).expand(6, 4)
    den = oracle(mu, s)
    ddim = sample_ddim(den, schedule, mu_b, s_b, eta=1.0, generator=torch.Generator().manual_seed(3))
    anc = sample_ancestral(den, schedule, mu_b, s_b, variance="fixed_small", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ddim, anc, atol=1e-10, rtol=1e-10)
    start = torch.tensor(mu) + torch.tensor(s) * torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d1 = sample_ddim(den, schedule, mu_b, s_b, eta=0.0, x_start=start, generator=torch.Generator().manual_seed(4))
    d2 = sample_ddim(den, schedule, mu_b, s_b, eta=0.0, x_start=start, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(d1, d2)


def test_ddim_many_steps_reproduces_the_data_mean():
    mu, s = shift_params(True)
    schedule = DiffusionSchedule.from_config(ScheduleConfig()).respace("ddim200")
    n = 20000
    x0 = sample_ddim(
        oracle(mu, s), schedule, torch.tensor(mu).expand(n, 4), torch.tensor(s).expand(n, 4),
        generator=torch.Generator().manual_seed(0),
    ).numpy()
    assert np.all(np.abs(x0.mean(0) - DATA_MEAN) < 4.5 * np.sqrt(DATA_VAR / n))
    np.testing.assert_allclose(x0.var(0), DATA_VAR, rtol=0.06)  # the DDIM ODE maps N(mu, Sigma) to the data


def test_clamp_keeps_x0_hat_within_three_std():
    mu, s = shift_params(True)
    schedule = DiffusionSchedule.from_config(ScheduleConfig()).respace("8")
    mu_b, s_b = torch.tensor(mu).expand(5, 4), torch.tensor(s).expand(5, 4)
    wild = lambda x_t, t: x_t * 0 + 1e3 * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    x0 = sample_ancestral(wild, schedule, mu_b, s_b, clamp_std=3.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x0, mu_b + 3 * s_b * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64))
    unclamped = sample_ancestral(wild, schedule, mu_b, s_b, generator=torch.Generator().manual_seed(0))
    assert unclamped.abs().max() > 900


def test_callback_and_timesteps_run_high_to_low():
    schedule = DiffusionSchedule.from_config(ScheduleConfig()).respace("8")
    seen = []
    sample_ancestral(
        lambda x, t: x, schedule, torch.zeros(2, 3), torch.ones(2, 3),
        callback=lambda i, t, x_t, x0_hat: seen.append((i, int(t[0]))),
    )
    assert [t for _, t in seen] == sorted(schedule.timesteps.tolist(), reverse=True)
    assert [i for i, _ in seen] == list(range(7, -1, -1))


def test_guidance_combination():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.0), cond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 0.0), uncond)
    for scale in [2.0, 7.5]:
        # g != 1 moves the conditional prediction by (g - 1)(cond - uncond), i.e. uncond + g(cond - uncond)
        torch.testing.assert_close(classifier_free_guidance(cond, uncond, scale), cond + (scale - 1) * (cond - uncond))
    # the whole embedding is guided, not halves of it (the original's defect)
    diff = classifier_free_guidance(cond, uncond, 3.0) - cond
    assert (diff.abs() > 0).all()
    with pytest.raises(ValueError, match="x0_uncond"):
        classifier_free_guidance(cond, uncond[:, :4], 2.0)
