"""The training loss against direct computations: x_t from the closed-form marginal, P2 weights,
condition dropout rates."""

import numpy as np
import pytest
import torch

from shifted_diffusion.loss import LossConfig, ShiftedDiffusionLoss, drop_conditions
from shifted_diffusion.schedule import DiffusionSchedule, ScheduleConfig

B, D, L, E = 6, 5, 3, 4


class Recorder(torch.nn.Module):
    """A stand-in network that records its inputs and returns a fixed prediction."""

    def __init__(self, prediction=None):
        super().__init__()
        self.prediction = prediction
        self.calls = []

    def forward(self, x_t, timesteps, cluster_idx, text_tokens, clip_text_emb):
        self.calls.append((x_t, timesteps, cluster_idx, text_tokens, clip_text_emb))
        return self.prediction if self.prediction is not None else torch.zeros_like(x_t)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x0=torch.randn(B, D, generator=g) * 2,
        text_tokens=torch.randn(B, L, E, generator=g),
        clip_text_emb=torch.randn(B, D, generator=g),
        cluster_idx=torch.arange(B),
        shift_mean=torch.randn(B, D, generator=g),
        shift_std=torch.rand(B, D, generator=g) + 0.5,
    )


def test_loss_is_p2_weighted_x0_error_on_the_shifted_marginal():
    schedule = DiffusionSchedule.from_config(ScheduleConfig())
    loss_fn = ShiftedDiffusionLoss(schedule, LossConfig(p2_k=1.0, p2_gamma=1.0, empty_t5_prob=0.0))
    data = batch()
    t = torch.tensor([0, 1, 10, 300, 800, 999])
    noise = torch.randn(B, D, generator=torch.Generator().manual_seed(9))
    prediction = torch.randn(B, D, generator=torch.Generator().manual_seed(3))
    model = Recorder(prediction)
    loss = loss_fn(model, **data, t=t, noise=noise)

    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t.numpy()]
    x0, mu, s = (data[k].double().numpy() for k in ("x0", "shift_mean", "shift_std"))
    x_t = np.sqrt(abar)[:, None] * x0 + (1 - np.sqrt(abar))[:, None] * mu + np.sqrt(1 - abar)[:, None] * s * noise.double().numpy()
    np.testing.assert_allclose(model.calls[0][0].numpy(), x_t, rtol=1e-5, atol=1e-5)
    assert model.calls[0][1].tolist() == t.tolist()
    weight = 1 / (1 + abar / (1 - abar))
    expected = weight * ((x0 - prediction.double().numpy()) ** 2).mean(1)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)
    assert loss.dtype == torch.float32 and loss.shape == (B,)
    # a perfect predictor has zero loss
    assert float(loss_fn(Recorder(data["x0"]), **data, t=t, noise=noise).abs().max()) == 0.0


def test_respaced_training_feeds_original_timesteps():
    schedule = DiffusionSchedule.from_config(ScheduleConfig()).respace("ddim10")
    model = Recorder()
    ShiftedDiffusionLoss(schedule, LossConfig(empty_t5_prob=0.0))(model, **batch(), t=torch.tensor([0, 1, 2, 3, 8, 9]))
    assert model.calls[0][1].tolist() == [0, 100, 200, 300, 800, 900]


def test_condition_dropout_rate_and_replacement():
    n = 20000
    g = torch.Generator().manual_seed(0)
    tokens, clip = torch.randn(n, L, E, generator=g), torch.randn(n, D, generator=g)
    null_tokens, null_clip = torch.full((L, E), 7.0), torch.full((D,), -3.0)
    out_tokens, out_clip = drop_conditions(
        tokens, clip, null_text_tokens=null_tokens, null_clip_text_emb=null_clip,
        empty_t5_prob=0.1, empty_clip_prob=0.3, generator=g,
    )
    dropped_t5 = (out_tokens == 7.0).all(dim=(1, 2))
    dropped_clip = (out_clip == -3.0).all(dim=1)
    assert abs(dropped_t5.float().mean().item() - 0.1) < 4 * np.sqrt(0.09 / n)
    assert abs(dropped_clip.float().mean().item() - 0.3) < 4 * np.sqrt(0.21 / n)
    torch.testing.assert_close(out_tokens[~dropped_t5], tokens[~dropped_t5])
    torch.testing.assert_close(out_clip[~dropped_clip], clip[~dropped_clip])
    # independent per sample: the joint rate is the product
    assert abs((dropped_t5 & dropped_clip).float().mean().item() - 0.03) < 4 * np.sqrt(0.03 * 0.97 / n)


def test_dropout_needs_the_empty_caption_encodings():
    data = batch()
    with pytest.raises(ValueError, match="null_text_tokens"):
        drop_conditions(data["text_tokens"], data["clip_text_emb"], null_text_tokens=None, null_clip_text_emb=None,
                        empty_t5_prob=0.1, empty_clip_prob=0.0)
    with pytest.raises(ValueError, match="null_clip_text_emb"):
        drop_conditions(data["text_tokens"], data["clip_text_emb"], null_text_tokens=None, null_clip_text_emb=None,
                        empty_t5_prob=0.0, empty_clip_prob=0.5)
    # the loss forwards the dropped tokens to the model
    schedule = DiffusionSchedule.from_config(ScheduleConfig())
    model = Recorder()
    ShiftedDiffusionLoss(schedule, LossConfig(empty_t5_prob=1.0))(
        model, **data, null_text_tokens=torch.zeros(L, E), generator=torch.Generator().manual_seed(0)
    )
    assert float(model.calls[0][3].abs().max()) == 0.0


def test_prefix_shared_loss_equals_separate_per_timestep_losses():
    """K timesteps sharing one caption prefix == the K (caption, timestep) pairs computed separately."""
    from shifted_diffusion.prior import PriorConfig, ShiftedPrior

    torch.manual_seed(0)
    config = PriorConfig.preset("tiny", clip_dim=D, text_dim=E, text_len=L, vocab_size=B)
    model = ShiftedPrior.from_prior_config(config)
    schedule = DiffusionSchedule.from_config(ScheduleConfig())
    loss_fn = ShiftedDiffusionLoss(schedule, LossConfig(empty_t5_prob=0.0))
    data = batch(seed=2)
    K = 3
    t = torch.randint(0, 1000, (B * K,), generator=torch.Generator().manual_seed(1))
    noise = torch.randn(B * K, D, generator=torch.Generator().manual_seed(2))
    shared = loss_fn(model, **data, t=t, noise=noise, timesteps_per_caption=K)
    shared.sum().backward()
    grads_shared = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    rep = {k: v.repeat_interleave(K, dim=0) for k, v in data.items()}
    separate = loss_fn(model, **rep, t=t, noise=noise)  # B*K independent full forwards
    assert shared.shape == (B,)
    torch.testing.assert_close(shared, separate.reshape(B, K).mean(1), rtol=1e-5, atol=1e-6)
    separate.reshape(B, K).mean(1).sum().backward()
    for a, p in zip(grads_shared, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
