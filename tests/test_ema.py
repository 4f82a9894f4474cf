"""FusedEMA: the same shadow weights, decay schedule and state as diffusers' EMAModel (the reference),
step after step, trained and frozen tensors; EmaWeights swaps them in and back."""

import pytest
import torch
from diffusers.training_utils import EMAModel

from shifted_diffusion.ema import EmaWeights, FusedEMA


def _model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    model[1].weight.requires_grad_(False)  # a frozen tensor: copied, not averaged
    return model


@pytest.mark.parametrize("kwargs", [dict(decay=0.9), dict(decay=0.999, use_ema_warmup=True, power=0.75),
                                    dict(decay=0.99, update_after_step=2)])
def test_fused_ema_matches_diffusers_ema(kwargs):
    model = _model()
    ours, reference = FusedEMA(model.parameters(), **kwargs), EMAModel(model.parameters(), **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        ours.step(model.parameters())
        reference.step(model.parameters())
        assert ours.cur_decay_value == reference.cur_decay_value
    assert ours.optimization_step == reference.optimization_step == 12
    for s, r, p in zip(ours.shadow_params, reference.shadow_params, model.parameters()):
        torch.testing.assert_close(s, r, atol=1e-6, rtol=1e-6)
        assert not torch.equal(s, p) or not p.requires_grad  # averaged, not copied
    torch.testing.assert_close(ours.shadow_params[2], model[1].weight, atol=0, rtol=0)

    restored = FusedEMA(_model(seed=3).parameters(), **kwargs)  # checkpoints are interchangeable
    restored.load_state_dict(reference.state_dict())
    for s, r in zip(restored.shadow_params, reference.shadow_params):
        torch.testing.assert_close(s, r, atol=0, rtol=0)


def test_fused_ema_checks_the_parameter_count_and_swaps_weights():
    model = _model()
    ema = FusedEMA(model.parameters(), decay=0.5)
    with pytest.raises(ValueError, match="tracks 6 tensors, step got 2"):
        ema.step(list(model.parameters())[:2])
    old = model[0].weight.detach().clone()
    ema.step(model.parameters())  # first step: decay 0, the shadow is the weights
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.step(model.parameters())  # second: decay min(0.5, (1 + 1) / (10 + 1)) = 2/11
    trained = model[0].weight.detach().clone()
    torch.testing.assert_close(ema.shadow_params[0], 2 / 11 * old + 9 / 11 * trained)
    with EmaWeights(ema, model) as swapped:
        torch.testing.assert_close(swapped[0].weight, ema.shadow_params[0], atol=0, rtol=0)
    torch.testing.assert_close(model[0].weight, trained, atol=0, rtol=0)


def test_fused_ema_falls_back_for_shadows_in_another_dtype():
    model = _model()
    ours, reference = FusedEMA(model.parameters(), decay=0.9), EMAModel(model.parameters(), decay=0.9)
    ours.to(dtype=torch.float64)
    reference.to(dtype=torch.float64)
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.mul_(1.5)
        ours.step(model)  # a Module is accepted, as EMAModel does
        reference.step(model.parameters())
    for s, r in zip(ours.shadow_params, reference.shadow_params):
        assert s.dtype == torch.float64
        torch.testing.assert_close(s, r, atol=0, rtol=0)
