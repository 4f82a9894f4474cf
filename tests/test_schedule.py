"""The shifted process against independent computations: Monte Carlo of the one-step chain, the
Gaussian conditional of the joint, and diffusers' DDPMScheduler for the baseline."""

import numpy as np
import pytest
import torch

from shifted_diffusion.schedule import DiffusionSchedule, ScheduleConfig, spaced_timesteps
from shifted_diffusion.sampling import sample_ancestral

T = 1000


def numpy_linear_betas(T=1000, lo=1e-4, hi=0.02):
    return np.linspace(lo * 1000 / T, hi * 1000 / T, T)


@pytest.fixture(scope="module")
def schedule():
    return DiffusionSchedule.from_config(ScheduleConfig())


def shift(dim, seed=0):
    g = np.random.default_rng(seed)
    return g.normal(size=dim) * 2.0, np.exp(g.normal(size=dim) * 0.5)


def test_linear_and_cosine_betas_match_closed_forms():
    betas = DiffusionSchedule.from_config(ScheduleConfig()).betas.numpy()
    np.testing.assert_allclose(betas, numpy_linear_betas(), rtol=1e-12)
    short = DiffusionSchedule.from_config(ScheduleConfig(num_timesteps=100)).betas.numpy()
    np.testing.assert_allclose(short, numpy_linear_betas(100), rtol=1e-12)
    cos = DiffusionSchedule.from_config(ScheduleConfig(beta_schedule="cosine", num_timesteps=50))
    f = lambda t: np.cos((t / 50 + 0.008) / 1.008 * np.pi / 2) ** 2
    expected = [min(1 - f(i + 1) / f(i), 0.999) for i in range(50)]
    np.testing.assert_allclose(cos.betas.numpy(), expected, rtol=1e-9)
    assert cos.betas[-1] == 0.999  # the last step is clipped, as in improved-diffusion
    with pytest.raises(ValueError, match="beta_schedule"):
        DiffusionSchedule.from_config(ScheduleConfig(beta_schedule="sqrt"))


@pytest.mark.parametrize("shifted", [True, False])
def test_marginal_matches_monte_carlo_of_the_one_step_chain(schedule, shifted):
    dim, n = 3, 40_000
    mu, s = shift(dim) if shifted else (np.zeros(dim), np.ones(dim))
    x0 = np.array([1.0, -3.0, 0.5])
    rng = np.random.default_rng(1)
    betas = numpy_linear_betas()
    x = np.tile(x0, (n, 1))
    checkpoints = {0, 10, 99, 500, 999}
    for t in range(T):
        a = 1 - betas[t]
        x = np.sqrt(a) * x + (1 - np.sqrt(a)) * mu + np.sqrt(betas[t]) * s * rng.standard_normal((n, dim))
        if t in checkpoints:
            tt = torch.full((1,), t)
            args = [torch.tensor(x0)[None], tt]
            m = torch.tensor(mu)[None]
            sd = torch.tensor(s)[None]
            mean = schedule.q_sample(*args, torch.zeros(1, dim, dtype=torch.float64), m, sd)[0].numpy()
            std = schedule.q_sample(*args, torch.ones(1, dim, dtype=torch.float64), m, sd)[0].numpy() - mean
            assert np.all(np.abs(x.mean(0) - mean) <= 4.5 * std / np.sqrt(n) + 1e-12), (t, x.mean(0), mean)
            np.testing.assert_allclose(x.std(0), std, rtol=0.02)


def test_posterior_is_the_gaussian_conditional_of_the_joint(schedule):
    dim = 4
    mu, s = shift(dim, seed=3)
    rng = np.random.default_rng(4)
    betas = numpy_linear_betas()
    abar = np.cumprod(1 - betas)
    for t in [1, 5, 300, 999]:
        x0 = rng.normal(size=dim)
        x_t = rng.normal(size=dim) * 3
        # joint of (x_{t-1}, x_t) given x0
        m1 = np.sqrt(abar[t - 1]) * x0 + (1 - np.sqrt(abar[t - 1])) * mu
        v1 = (1 - abar[t - 1]) * s**2
        a = 1 - betas[t]
        mt = np.sqrt(a) * m1 + (1 - np.sqrt(a)) * mu
        vt = a * v1 + betas[t] * s**2
        cov = np.sqrt(a) * v1
        cond_mean = m1 + cov / vt * (x_t - mt)
        cond_var = v1 - cov**2 / vt
        mean, var = schedule.q_posterior(
            torch.tensor(x0)[None], torch.tensor(x_t)[None], torch.tensor([t]), torch.tensor(mu)[None], torch.tensor(s)[None]
        )
        np.testing.assert_allclose(mean[0].numpy(), cond_mean, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(var[0].numpy(), cond_var, rtol=1e-9)


def test_x0_eps_round_trip_and_definition(schedule):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    mu, s = (torch.tensor(v)[None].expand(5, 6) for v in shift(6))
    t = torch.tensor([0, 3, 100, 700, 999])
    x_t = schedule.q_sample(x0, t, eps, mu, s)
    torch.testing.assert_close(schedule.eps_from_x0(x_t, t, x0, mu, s), eps)
    torch.testing.assert_close(schedule.x0_from_eps(x_t, t, eps, mu, s), x0)


def test_p2_weight_closed_form(schedule):
    abar = np.cumprod(1 - numpy_linear_betas())
    t = torch.tensor([0, 10, 500, 999])
    snr = abar[t.numpy()] / (1 - abar[t.numpy()])
    np.testing.assert_allclose(schedule.p2_weight(t).numpy(), 1 / (1 + snr), rtol=1e-6)
    np.testing.assert_allclose(schedule.p2_weight(t, k=2.0, gamma=0.5).numpy(), 1 / np.sqrt(2 + snr), rtol=1e-6)


def test_respacing_keeps_alphas_cumprod_and_recomputes_betas(schedule):
    assert spaced_timesteps(T, 8) == [0, 143, 285, 428, 571, 714, 856, 999]
    assert spaced_timesteps(T, "ddim50") == list(range(0, 1000, 20))
    assert spaced_timesteps(10, "2,3") == [0, 4, 5, 7, 9]
    for spacing in ["8", "16", "ddim50", [0, 10, 500]]:
        spaced = schedule.respace(spacing)
        kept = spaced.timesteps.numpy()
        abar = np.cumprod(1 - numpy_linear_betas())
        np.testing.assert_allclose(spaced.alphas_cumprod.numpy(), abar[kept], rtol=1e-12)
        # each respaced beta is 1 - abar_k / abar_{k_prev}
        prev = np.concatenate([[1.0], abar[kept][:-1]])
        np.testing.assert_allclose(spaced.betas.numpy(), 1 - abar[kept] / prev, rtol=1e-12)
    with pytest.raises(ValueError):
        schedule.respace("2000")


def test_shape_errors_name_the_tensor(schedule):
    x0 = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="shift_std"):
        schedule.q_sample(x0, torch.zeros(2, dtype=torch.long), x0, x0, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        schedule.q_sample(x0, torch.zeros(3, dtype=torch.long), x0, x0, x0)


# --- baseline (mean 0, std 1) against diffusers' DDPMScheduler --------------------------------------------


def _predictor(x_t, t):
    """A fixed, deterministic stand-in for x0_hat(x_t, t)."""
    return 0.7 * x_t + torch.sin(t.to(x_t.dtype) / 100.0)[:, None]


@pytest.mark.reference
@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("steps", [10, 1000])
def test_baseline_equals_diffusers_ddpm(schedule, variance, steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        prediction_type="sample", clip_sample=False, variance_type=variance,
    )
    # diffusers builds its tables in float32 (its cumprod drifts ~3e-6 from float64); rebuild them in
    # float64 the way it does, so that the comparison below tests the update rules at 1e-6
    ref.betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    ref.alphas = 1.0 - ref.betas
    ref.alphas_cumprod = torch.cumprod(ref.alphas, dim=0)
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0, noise, x_start = (torch.randn(4, 16, generator=g, dtype=torch.float64) for _ in range(3))
    zeros, ones = torch.zeros_like(x0), torch.ones_like(x0)
    t = torch.tensor([1, 50, 500, 999])
    torch.testing.assert_close(schedule.q_sample(x0, t, noise, zeros, ones), ref.add_noise(x0, noise, t), atol=1e-6, rtol=0)

    # posterior mean = the noiseless DDPM step
    for step in [1, 50, 999]:
        mean, _ = schedule.q_posterior(x0, x_start, torch.full((4,), step), zeros, ones)
        ref_step = ref.step(x0, step, x_start, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(mean, _noiseless(ref, x0, step, x_start), atol=1e-6, rtol=0)
        torch.testing.assert_close(ref_step.pred_original_sample, x0)

    # whole ancestral chains with the same predictor and the same noise stream
    ref.set_timesteps(steps)
    x, gen = x_start.clone(), torch.Generator().manual_seed(5)
    for step in ref.timesteps:
        x = ref.step(_predictor(x, step.expand(4)), step, x, generator=gen).prev_sample
    spaced = schedule if steps == T else schedule.respace(f"ddim{steps}")
    ours = sample_ancestral(
        _predictor, spaced, zeros, ones, variance=variance, x_start=x_start, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(ours, x, atol=1e-6, rtol=0)


def _noiseless(ref, x0, step, x_t):
    """The mean of diffusers' step: c1 x0 + c2 x_t from its own tables."""
    abar = ref.alphas_cumprod
    abar_t, abar_prev = abar[step], abar[step - 1] if step > 0 else ref.one
    beta = 1 - abar_t / abar_prev
    c1 = abar_prev.sqrt() * beta / (1 - abar_t)
    c2 = (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar_t)
    return c1 * x0 + c2 * x_t


def _improved_diffusion_space_timesteps(num_timesteps, section_counts):
    """improved-diffusion's space_timesteps (and GLIDE's "fast27"), written out from its published formulas."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[4:])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired:
                    return set(range(0, num_timesteps, i))
            raise ValueError("no stride")
        if section_counts == "fast27":
            steps = _improved_diffusion_space_timesteps(num_timesteps, "10,10,3,2,2")
            steps.remove(num_timesteps - 1)
            steps.add(num_timesteps - 3)
            return steps
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = num_timesteps // len(section_counts), num_timesteps % len(section_counts)
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError("section too small")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def test_respacing_is_the_original_releases_for_every_count_and_string():
    """Counts 1..1000, 251 multi-section strings, every ddimN and fast27: the same timesteps as
    improved-diffusion (rounding j * stride instead of accumulating kept 500 instead of 499 for "21")."""
    T = 1000
    assert spaced_timesteps(T, "21")[10] == 499
    for count in range(1, T + 1):
        assert spaced_timesteps(T, str(count)) == sorted(_improved_diffusion_space_timesteps(T, str(count))), count
    rng = np.random.default_rng(0)
    for _ in range(251):
        sections = int(rng.integers(2, 6))
        spacing = ",".join(str(int(c)) for c in rng.integers(1, T // sections + 1, size=sections))
        assert spaced_timesteps(T, spacing) == sorted(_improved_diffusion_space_timesteps(T, spacing)), spacing
    assert spaced_timesteps(T, "ddim3") == [0, 334, 668]
    for count in range(1, T + 1):
        try:
            expected = sorted(_improved_diffusion_space_timesteps(T, f"ddim{count}"))
        except ValueError:
            with pytest.raises(ValueError, match=f"ddim{count}: no integer stride"):
                spaced_timesteps(T, f"ddim{count}")
            continue
        assert spaced_timesteps(T, f"ddim{count}") == expected
    fast = spaced_timesteps(T, "fast27")
    assert fast == sorted(_improved_diffusion_space_timesteps(T, "fast27")) and len(fast) == 27 and fast[-1] == T - 3
    with pytest.raises(ValueError, match="expected a count"):
        spaced_timesteps(T, "fast")
