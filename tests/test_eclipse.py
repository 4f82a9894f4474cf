"""The one-step ECLIPSE-style reference prior: its contrastive term against a hand computation, its loss against
MSE + weight x contrastive written out, the pipeline's one step against the bare network, and train.py's option."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from shifted_diffusion.eclipse import EclipseLoss, contrastive_loss, one_step_timestep
from shifted_diffusion.loss import LossConfig
from shifted_diffusion.prior import PriorConfig, ShiftedPrior
from shifted_diffusion.prior_pipeline import build_pipeline, load_prior
from shifted_diffusion.schedule import DiffusionSchedule, ScheduleConfig
from shifted_diffusion.toy.prior_job import run_prior_job
from shifted_diffusion.training import read_loss_log
from shifted_diffusion.vocab import StandardNormalShift

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = [3, 2]


def hand_contrastive(pred: np.ndarray, text: np.ndarray, temperature: float) -> np.ndarray:
    """-log softmax over j of the mean blockwise cosine, in float64 loops."""
    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    n, out = len(pred), []
    for i in range(n):
        sims = []
        for j in range(n):
            start, total = 0, 0.0
            for size in BLOCKS:
                total += cos(pred[i, start:start + size], text[j, start:start + size])
                start += size
            sims.append(total / len(BLOCKS) / temperature)
        out.append(-sims[i] + math.log(sum(math.exp(s) for s in sims)))
    return np.array(out)


def test_contrastive_term_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    pred, text = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    got = contrastive_loss(pred, text, BLOCKS, temperature=0.3)
    np.testing.assert_allclose(got.double().numpy(), hand_contrastive(pred.double().numpy(), text.double().numpy(), 0.3),
                               rtol=1e-5, atol=1e-6)
    # a prediction that points at its own caption (block by block) beats one that points at another's
    aligned = contrastive_loss(text * 3.0, text, BLOCKS, temperature=0.1)
    swapped = contrastive_loss(text.roll(1, 0), text, BLOCKS, temperature=0.1)
    assert (aligned < swapped).all()
    with pytest.raises(ValueError, match=r"must both be \(B, 5\)"):
        contrastive_loss(pred[:, :4], text[:, :4], BLOCKS, temperature=0.3)


class Recorder(torch.nn.Module):
    """A stand-in network: x0_hat = W x_in + clip_text, recording what it was given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(5, 5, generator=torch.Generator().manual_seed(1)))

    def forward(self, x, t, cluster_idx, tokens, clip):
        self.seen = (x.clone(), t.clone(), cluster_idx, tokens.clone(), clip.clone())
        return x @ self.weight.T + clip


def test_loss_is_projection_plus_weighted_contrastive_at_the_one_step_timestep():
    schedule = DiffusionSchedule.from_config(ScheduleConfig())
    g = torch.Generator().manual_seed(2)
    x0, clip, noise = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    tokens = torch.randn(6, 3, 4, generator=g)
    model = Recorder()
    loss = EclipseLoss(schedule, LossConfig(empty_t5_prob=0.0), BLOCKS, contrastive_weight=0.2, temperature=0.5)
    got = loss(model, x0, tokens, clip, None, torch.zeros(6, 5), torch.ones(6, 5), noise=noise)
    x_in, t, cluster, seen_tokens, seen_clip = model.seen
    torch.testing.assert_close(x_in, noise)  # N(0, I) input: mean 0, std 1
    assert cluster is None and torch.equal(seen_clip, clip) and torch.equal(seen_tokens, tokens)
    assert t.tolist() == [int(schedule.respace("1").timesteps[0])] * 6 == one_step_timestep(schedule).tolist() * 6
    pred = noise @ model.weight.detach().T + clip
    expected = ((x0 - pred) ** 2).mean(1).double().numpy() + 0.2 * hand_contrastive(pred.double().numpy(),
                                                                                     clip.double().numpy(), 0.5)
    np.testing.assert_allclose(got.detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)
    # the dropped rows see the empty caption's tokens; the contrastive target stays the caption's own embedding
    dropping = EclipseLoss(schedule, LossConfig(empty_t5_prob=1.0), BLOCKS, contrastive_weight=0.2, temperature=0.5)
    again = dropping(model, x0, tokens, clip, None, torch.zeros(6, 5), torch.ones(6, 5), noise=noise,
                     null_text_tokens=torch.zeros(3, 4))
    assert torch.equal(model.seen[3], torch.zeros(6, 3, 4))
    np.testing.assert_allclose(again.detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)
    # a row whose CLIP condition was dropped has no caption to pick out: projection only, for that row alone
    no_clip = EclipseLoss(schedule, LossConfig(empty_t5_prob=0.0, empty_clip_prob=0.5), BLOCKS,
                          contrastive_weight=0.2, temperature=0.5)
    null_clip = torch.full((5,), 0.25)
    mixed = no_clip(model, x0, tokens, clip, None, torch.zeros(6, 5), torch.ones(6, 5), noise=noise,
                    null_clip_text_emb=null_clip, generator=torch.Generator().manual_seed(4))
    dropped = (model.seen[4] == null_clip).all(1)
    assert 0 < int(dropped.sum()) < 6  # this seed drops some rows, not all
    pred = noise @ model.weight.detach().T + model.seen[4]
    ce = hand_contrastive(pred.double().numpy(), clip.double().numpy(), 0.5)
    expected = ((x0 - pred) ** 2).mean(1).double().numpy() + 0.2 * np.where(dropped.numpy(), 0.0, ce)
    np.testing.assert_allclose(mixed.detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one timestep"):
        loss(model, x0, tokens, clip, None, torch.zeros(6, 5), torch.ones(6, 5), timesteps_per_caption=2)


def test_pipeline_samples_an_eclipse_prior_in_one_network_call():
    torch.manual_seed(0)
    config = PriorConfig.preset("tiny", clip_dim=8, text_dim=4, text_len=3, vocab_size=None, width=32, depth=1, heads=2)
    network = ShiftedPrior.from_prior_config(config).eval()
    encoders = {"clip_models": [], "t5_model": "none", "text_max_length": 3}
    pipeline = build_pipeline(network, StandardNormalShift(8), ScheduleConfig(), encoders, torch.zeros(8),
                              torch.zeros(3, 4), training={"train": {"prior_type": "eclipse"}})
    assert pipeline.one_step
    g = torch.Generator().manual_seed(3)
    clip, tokens, start = torch.randn(2, 8, generator=g), torch.randn(2, 3, 4, generator=g), torch.randn(2, 8, generator=g)
    schedule = DiffusionSchedule.from_config(ScheduleConfig())
    with torch.no_grad():
        direct = network(start, one_step_timestep(schedule).expand(2), None, tokens, clip)
    for steps in (1, 8):  # the one-step prior ignores the step count it is given
        sampled = pipeline.sample(clip, tokens, latents=start, num_inference_steps=steps)
        torch.testing.assert_close(sampled, direct, rtol=1e-5, atol=1e-6)
    diffusion = build_pipeline(network, StandardNormalShift(8), ScheduleConfig(), encoders, torch.zeros(8),
                               torch.zeros(3, 4))
    assert not diffusion.one_step
    assert not torch.allclose(diffusion.sample(clip, tokens, latents=start, num_inference_steps=8,
                                               generator=torch.Generator().manual_seed(0)), direct)


def _args(folder, clip_dir, out, *extra):
    return ["--train_data_dir", str(folder), "--clip_models", str(clip_dir), "--t5_model", f"clip-tokens:{clip_dir}",
            "--text_max_length", "8", "--config", str(ROOT / "configs" / "prior_tiny.yaml"), "--train_batch_size", "4",
            "--val_fraction", "0.2", "--output_dir", str(out), "--num_validation_samples", "4", "--checkpointing_steps",
            "0", "--validation_steps", "0", "--logging_steps", "1", "--lr_warmup_steps", "0", "--no-use_ema", *extra]


def test_train_py_trains_an_eclipse_prior_whose_loss_falls(caption_image_folder, tiny_open_clip_dir, tmp_path):
    with pytest.raises(ValueError, match="add --baseline"):
        run_prior_job(_args(caption_image_folder, tiny_open_clip_dir, tmp_path / "x", "--prior_type", "eclipse"))
    with pytest.raises(ValueError, match="--prior_type: expected one of"):
        run_prior_job(_args(caption_image_folder, tiny_open_clip_dir, tmp_path / "x", "--prior_type", "flow"))
    out = tmp_path / "eclipse"
    prior_dir = run_prior_job(_args(caption_image_folder, tiny_open_clip_dir, out, "--baseline", "--prior_type",
                                    "eclipse", "--max_train_steps", "30", "--learning_rate", "3e-3",
                                    "--timesteps_per_caption", "1"))
    losses = [line["loss"] for line in read_loss_log(out / "logs" / "loss.jsonl")]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    info = json.loads((prior_dir / "model_index.json").read_text())["training"]["train"]
    assert info["prior_type"] == "eclipse" and info["eclipse_contrastive_weight"] == 0.2
    pipeline = load_prior(prior_dir)
    assert pipeline.one_step
    out_a = pipeline(["a red square"], num_inference_steps=8, generator=torch.Generator().manual_seed(0)).image_embeds
    out_b = pipeline(["a red square"], num_inference_steps=1, generator=torch.Generator().manual_seed(0)).image_embeds
    torch.testing.assert_close(out_a, out_b)
