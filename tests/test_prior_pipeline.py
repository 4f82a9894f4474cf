"""PriorPipeline.sample: the caption's cluster drives the shift (not the cluster nearest x0_hat, the
original's defect), guidance's unconditional branch, save/load round trip."""

import pytest
import torch

import shifted_diffusion.prior_pipeline as prior_pipeline
from shifted_diffusion.prior import PriorConfig, ShiftedPrior
from shifted_diffusion.prior_pipeline import PriorPipeline, load_prior, save_prior
from shifted_diffusion.sampling import sample_ddim
from shifted_diffusion.schedule import DiffusionSchedule, ScheduleConfig
from shifted_diffusion.vocab import ClusterVocab

CONFIG = PriorConfig.preset("tiny", vocab_size=5)


def pipeline(**kwargs):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    vocab = ClusterVocab(torch.randn(5, CONFIG.clip_dim, generator=g), torch.rand(5, CONFIG.clip_dim, generator=g) + 0.1,
                         std_scale=2.0)
    nulls = dict(null_clip_text=torch.randn(CONFIG.clip_dim, generator=g),
                 null_text_tokens=torch.randn(CONFIG.text_len, CONFIG.text_dim, generator=g))
    return PriorPipeline(ShiftedPrior(CONFIG), vocab, DiffusionSchedule.from_config(ScheduleConfig()), **nulls, **kwargs)


def captions(n=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, CONFIG.clip_dim, generator=g), torch.randn(n, CONFIG.text_len, CONFIG.text_dim, generator=g)


def test_shift_is_the_captions_cluster(monkeypatch):
    pipe = pipeline()
    seen = {}

    def spy(denoiser, schedule, shift_mean, shift_std, **kwargs):
        seen.update(shift_mean=shift_mean, shift_std=shift_std, steps=schedule.num_steps)
        return shift_mean

    monkeypatch.setattr(prior_pipeline, "sample_ancestral", spy)
    clip_text, tokens = captions()
    pipe.sample(clip_text, tokens, num_images_per_prompt=3, num_steps=8)
    # independent: nearest mean by cosine, computed here; then std_scale * s_k
    cos = torch.nn.functional.normalize(clip_text, dim=-1) @ torch.nn.functional.normalize(pipe.shift.means, dim=-1).T
    k = cos.argmax(1).repeat_interleave(3)
    torch.testing.assert_close(seen["shift_mean"], pipe.shift.means[k])
    torch.testing.assert_close(seen["shift_std"], 2.0 * pipe.shift.stds[k])
    assert seen["steps"] == 8


def test_guidance_unconditional_branch(monkeypatch):
    calls = {}
    original = ShiftedPrior.denoiser

    def spy(self, *args, **kwargs):
        calls.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShiftedPrior, "denoiser", spy)
    clip_text, tokens = captions(2)
    pipeline().sample(clip_text, tokens, num_steps=2, guidance_scale=3.0)
    assert calls["guidance_scale"] == 3.0 and calls["null_clip_text_emb"] is None  # tokens dropped, CLIP kept
    pipeline(uncond_drops_clip=True).sample(clip_text, tokens, num_steps=2, guidance_scale=3.0)
    assert calls["null_clip_text_emb"] is not None


def test_clip_only_prior_cannot_guide_without_dropping_clip():
    config = PriorConfig.preset("tiny", text_len=0, vocab_size=None)
    from shifted_diffusion.vocab import StandardNormalShift

    pipe = PriorPipeline(ShiftedPrior(config), StandardNormalShift(config.clip_dim),
                         DiffusionSchedule.from_config(ScheduleConfig()), null_clip_text=torch.zeros(config.clip_dim),
                         null_text_tokens=torch.zeros(0, config.text_dim), uncond_drops_clip=False)
    clip_text = torch.randn(2, config.clip_dim)
    with pytest.raises(ValueError, match="unconditional branch"):
        pipe.sample(clip_text, torch.zeros(2, 0, config.text_dim), num_steps=2, guidance_scale=2.0)
    pipe.uncond_drops_clip = True
    assert pipe.sample(clip_text, torch.zeros(2, 0, config.text_dim), num_steps=2, guidance_scale=2.0).shape == (2, 64)


def test_save_load_round_trip_samples_identically(tmp_path):
    pipe = pipeline()
    save_prior(tmp_path / "p", pipe.prior, pipe.shift, ScheduleConfig(), {"clip_models": ["x"], "t5_model": "none"},
               pipe.null_clip_text, pipe.null_text_tokens)
    loaded = load_prior(tmp_path / "p")
    clip_text, tokens = captions(2)
    a = pipe.sample(clip_text, tokens, num_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    b = loaded.sample(clip_text, tokens, num_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def test_load_in_bfloat16_samples_float32_close_to_float32(tmp_path):
    pipe = pipeline()
    save_prior(tmp_path / "p", pipe.prior, pipe.shift, ScheduleConfig(), {"clip_models": ["x"], "t5_model": "none"},
               pipe.null_clip_text, pipe.null_text_tokens)
    low = load_prior(tmp_path / "p", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in low.prior.parameters())
    clip_text, tokens = captions(3)
    a = pipe.sample(clip_text, tokens, num_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    b = low.sample(clip_text, tokens, num_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert b.dtype == torch.float32 and b.shape == a.shape
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert (cos > 0.99).all(), cos
    assert (a - b).abs().max() > 0  # really computed in bf16


def test_ddim_is_finite_where_a_cluster_std_is_zero():
    mean, std = torch.zeros(2, 3), torch.tensor([[1.0, 0.0, 2.0]] * 2)
    out = sample_ddim(lambda x, t: 0.5 * x + 1.0, DiffusionSchedule.from_config(ScheduleConfig()).respace("8"), mean, std,
                      generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
