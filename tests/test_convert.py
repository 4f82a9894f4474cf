"""Original ClipPrior (real x_transformers 0.28.4 Decoder trunk) -> ShiftedPrior conversion is exact."""

import pytest
import torch

from shifted_diffusion.convert import (
    convert_original_state_dict,
    infer_config_from_original,
    load_original_checkpoint,
)
from shifted_diffusion.prior import PriorConfig, ShiftedPrior

pytestmark = pytest.mark.reference

# `reference_prior` (tests/conftest.py) builds the original network; every test here takes it, so a machine
# without x_transformers skips them.

CONFIGS = {
    "tiny_vocab": PriorConfig.preset("tiny"),
    "tiny_baseline": PriorConfig.preset("tiny", vocab_size=None),
    # inner attention width (3 * 64) != width (96), 3 blocks: catches q/k/v split and layer-order slips
    "odd_heads": PriorConfig(width=96, depth=3, heads=3, clip_dim=40, text_dim=24, text_len=5, vocab_size=7),
}


def _inputs(config, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x_t=torch.randn(batch, config.clip_dim, generator=g) * 2.0,
        timesteps=torch.randint(0, 1000, (batch,), generator=g),
        cluster_idx=torch.randint(0, config.vocab_size or 1, (batch,), generator=g),
        text_tokens=torch.randn(batch, config.text_len, config.text_dim, generator=g),
        clip_text_emb=torch.randn(batch, config.clip_dim, generator=g),
    )


def _run_reference(ref, inp):
    return ref(inp["x_t"], inp["timesteps"], inp["text_tokens"], inp["clip_text_emb"], inp["cluster_idx"])


def _run_ours(model, inp):
    return model(inp["x_t"], inp["timesteps"], inp["cluster_idx"], inp["text_tokens"], inp["clip_text_emb"])


def test_randomized_reference_has_no_default_weights(reference_prior):
    ref = reference_prior(CONFIGS["tiny_vocab"])
    sd = ref.state_dict()
    norm_gains = [k for k in sd if k.endswith(".g") or k.endswith(".gamma")]
    assert len(norm_gains) == 2 * 2 + 4  # 2 RMSNorms per block x 2 blocks + 4 LayerNorms
    for k in norm_gains:
        assert not torch.allclose(sd[k], torch.ones_like(sd[k])), k


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_converted_model_matches_reference(reference_prior, name):
    config = CONFIGS[name]
    ref = reference_prior(config)
    model = ShiftedPrior.from_prior_config(config).eval()
    model.load_state_dict(convert_original_state_dict(ref.state_dict()), strict=True)
    inp = _inputs(config)
    with torch.no_grad():
        expected = _run_reference(ref, inp)
        got = _run_ours(model, inp)
        cached = model.forward_cached(
            model.encode_prefix(inp["text_tokens"], inp["clip_text_emb"]),
            inp["x_t"], inp["timesteps"], inp["cluster_idx"],
        )
    assert expected.abs().max() > 0.1  # a non-degenerate output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)


def test_input_gradients_match_reference(reference_prior):
    config = CONFIGS["tiny_vocab"]
    ref = reference_prior(config, seed=3)
    model = ShiftedPrior.from_prior_config(config)
    model.load_state_dict(convert_original_state_dict(ref.state_dict()))
    grads, outs = [], []
    for fn, net in ((_run_reference, ref), (_run_ours, model)):
        inp = _inputs(config, seed=4)
        inp["x_t"].requires_grad_(True)
        inp["text_tokens"].requires_grad_(True)
        out = fn(net, inp)  # with grad: the training code paths (e.g. the single-matmul GEGLU)
        out.square().sum().backward()
        grads.append((inp["x_t"].grad, inp["text_tokens"].grad))
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_infer_config(reference_prior, name):
    config = CONFIGS[name]
    sd = reference_prior(config).state_dict()
    inferred = infer_config_from_original(sd, text_len=config.text_len, vocab_size=config.vocab_size or 1)
    assert inferred == config


def test_load_original_checkpoint_wrapped_and_prefixed(reference_prior, tmp_path):
    config = CONFIGS["tiny_vocab"]
    ref = reference_prior(config, seed=5)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}, "epoch": 3}
    path = tmp_path / "prior.pth"
    torch.save(wrapped, path)
    model = load_original_checkpoint(path, text_len=config.text_len, vocab_size=config.vocab_size).eval()
    assert model.arch == config
    inp = _inputs(config, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(_run_ours(model, inp), _run_reference(ref, inp), atol=1e-5, rtol=1e-5)


def test_learnable_vocab_keys_dropped_and_size_inferred(reference_prior):
    config = CONFIGS["tiny_vocab"]
    sd = dict(reference_prior(config).state_dict())
    sd["vocab.mean.weight"] = torch.randn(11, config.clip_dim)
    sd["vocab.log_std.weight"] = torch.randn(11, config.clip_dim)
    assert infer_config_from_original(sd, text_len=config.text_len).vocab_size == 11
    assert not any(k.startswith("vocab.") for k in convert_original_state_dict(sd))


def test_bad_state_dicts_raise(reference_prior):
    config = CONFIGS["tiny_vocab"]
    sd = dict(reference_prior(config).state_dict())
    with pytest.raises(ValueError, match="unexpected keys.*bogus"):
        convert_original_state_dict({**sd, "bogus.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="t5_proj.0.beta"):
        convert_original_state_dict({**sd, "t5_proj.0.beta": torch.ones(config.text_dim)})
    no_k = {k: v for k, v in sd.items() if k != "transformer.layers.2.1.to_k.weight"}
    with pytest.raises(ValueError, match="block 1 lacks"):
        convert_original_state_dict(no_k)
    sigma = {**sd, "out_proj.2.weight": torch.zeros(2 * config.clip_dim, 2 * config.clip_dim)}
    with pytest.raises(ValueError, match="learn_sigma"):
        infer_config_from_original(sigma)


def test_full_size_presets_match_reference_parameter_count(reference_prior):
    for preset in ("small", "large"):
        config = PriorConfig.preset(preset)
        with torch.device("meta"):
            ours = ShiftedPrior.from_prior_config(config)
            ref = reference_prior(config, seed=None)
        n_ours = sum(p.numel() for p in ours.parameters())
        n_ref = sum(p.numel() for p in ref.parameters())
        assert n_ours == n_ref
        assert sum(1 for _ in ours.blocks) == config.depth
        ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        converted = convert_original_state_dict(
            {k: torch.empty(s, device="meta") for k, s in ref_shapes.items()}
        )
        ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == ours_shapes


def test_load_prior_reads_an_original_release_folder(reference_prior, tmp_path):
    """load_prior(<ckpt file>) with the original's flattened mean.pth / std.pth beside it: the caption's
    cluster (argmax cosine to the means) drives the shift, and the network is the converted one."""
    from shifted_diffusion.prior_pipeline import load_prior

    config = CONFIGS["tiny_vocab"]
    ref = reference_prior(config, seed=3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "prior.pt")
    g = torch.Generator().manual_seed(4)
    means = torch.randn(config.vocab_size + 2, config.clip_dim, generator=g)  # extra rows, as in the release
    torch.save(means.flatten(), tmp_path / "mean.pth")
    torch.save(torch.rand(config.vocab_size + 2, config.clip_dim, generator=g).flatten(), tmp_path / "std.pth")
    pipeline = load_prior(tmp_path / "prior.pt", text_len=config.text_len, vocab_size=config.vocab_size)
    assert pipeline.vocabulary.num_clusters == config.vocab_size  # the extra rows are dropped, as the release did
    torch.testing.assert_close(pipeline.vocabulary.means, means[: config.vocab_size])
    inp = _inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(_run_ours(pipeline.prior, inp), _run_reference(ref, inp), atol=1e-5, rtol=1e-5)
    expected_idx = torch.nn.functional.normalize(inp["clip_text_emb"], dim=-1) @ torch.nn.functional.normalize(
        means[: config.vocab_size], dim=-1).T
    torch.testing.assert_close(pipeline.vocabulary.assign(inp["clip_text_emb"]), expected_idx.argmax(1))
    out = pipeline.sample(inp["clip_text_emb"], inp["text_tokens"], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, config.clip_dim)


def test_guided_sampling_of_an_original_checkpoint_uses_zero_t5_tokens(reference_prior, tmp_path):
    """The original trained T5 dropout by zeroing the tokens and sampled the unconditional branch with zero tokens
    and the prompt's own CLIP text embedding: a converted checkpoint guides the same way. Checked against the
    original network (x_transformers trunk) run in an ancestral loop written out here."""
    from shifted_diffusion.prior_pipeline import load_prior
    from shifted_diffusion.schedule import DiffusionSchedule, ScheduleConfig

    config = CONFIGS["tiny_vocab"]
    ref = reference_prior(config, seed=3)
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "prior.pt")
    g = torch.Generator().manual_seed(4)
    means = torch.randn(config.vocab_size, config.clip_dim, generator=g)
    stds = torch.rand(config.vocab_size, config.clip_dim, generator=g) + 0.1
    torch.save(means, tmp_path / "mean.pth")
    torch.save(stds, tmp_path / "std.pth")
    pipeline = load_prior(tmp_path / "prior.pt", text_len=config.text_len, vocab_size=config.vocab_size)
    assert pipeline.unconditional.config.text_tokens == "zeros" and pipeline.unconditional.config.clip_text == "prompt"
    inp = _inputs(config)
    got = pipeline.sample(inp["clip_text_emb"], inp["text_tokens"], num_inference_steps=3, guidance_scale=2.0,
                          generator=torch.Generator().manual_seed(0))

    schedule = DiffusionSchedule.from_config(ScheduleConfig()).respace("3")
    idx = (torch.nn.functional.normalize(inp["clip_text_emb"], dim=-1) @ torch.nn.functional.normalize(means, dim=-1).T).argmax(1)
    mu, std = means[idx], 5.0 * stds[idx]  # the release's std_scale
    variance = torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]]).float()  # fixed_large
    c1, c2 = schedule.posterior_mean_coef1.float(), schedule.posterior_mean_coef2.float()
    rng = torch.Generator().manual_seed(0)
    x = mu + std * torch.randn(mu.shape, generator=rng)
    zeros = torch.zeros_like(inp["text_tokens"])
    with torch.no_grad():
        for i in reversed(range(3)):
            t = schedule.timesteps[i].expand(len(x))
            cond = ref(x, t, inp["text_tokens"], inp["clip_text_emb"], idx)
            uncond = ref(x, t, zeros, inp["clip_text_emb"], idx)
            x0 = uncond + 2.0 * (cond - uncond)
            mean = mu + c1[i] * (x0 - mu) + c2[i] * (x - mu)
            x = mean + variance[i].sqrt() * std * torch.randn(x.shape, generator=rng) if i > 0 else mean
    torch.testing.assert_close(got, x, atol=1e-4, rtol=1e-4)
