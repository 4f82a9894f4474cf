"""Semi-supervised prior training (shifted_diffusion.pseudo_text, train.py --pseudo_text_fraction): the pseudo text
embedding against closed forms and Monte Carlo, the mixer's rows, and train.py runs with uncaptioned images."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shifted_diffusion.pseudo_text import PseudoTextMixer, block_norms, matched_noise, pseudo_text_embedding
from shifted_diffusion.toy.prior_job import run_prior_job
from shifted_diffusion.vocab import ClusterVocab

ROOT = Path(__file__).resolve().parents[1]


def test_pseudo_text_has_the_text_scale_and_the_closed_form_cosine():
    torch.manual_seed(0)
    blocks = [512, 256]
    image = torch.randn(2000, sum(blocks)) * torch.tensor([3.0] * 512 + [0.5] * 256)
    norms = torch.tensor([7.0, 2.0])
    for noise in (0.0, 0.5, 1.5):
        pseudo = pseudo_text_embedding(image, blocks, norms, noise, torch.Generator().manual_seed(1))
        for x, p, norm in zip(image.split(blocks, 1), pseudo.split(blocks, 1), norms):
            torch.testing.assert_close(p.norm(dim=1), torch.full((2000,), float(norm)))  # a real caption's scale
            cos = torch.nn.functional.cosine_similarity(x, p, dim=1)
            # the unit noise direction is nearly orthogonal in 256+ dims: E cos = 1 / sqrt(1 + noise^2) (Monte Carlo)
            assert float(cos.mean()) == pytest.approx(1 / math.sqrt(1 + noise ** 2), abs=0.01)
    per_block = pseudo_text_embedding(image, blocks, norms, [0.0, 1.0], torch.Generator().manual_seed(1))
    first, second = per_block.split(blocks, 1)
    torch.testing.assert_close(first, 7.0 * image[:, :512] / image[:, :512].norm(dim=1, keepdim=True))
    assert float(torch.nn.functional.cosine_similarity(image[:, 512:], second, dim=1).mean()) == pytest.approx(
        1 / math.sqrt(2), abs=0.01)
    again = pseudo_text_embedding(image, blocks, norms, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(again, pseudo_text_embedding(image, blocks, norms, 0.5, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="noise: expected >= 0"):
        pseudo_text_embedding(image, blocks, norms, -0.1)


def test_matched_noise_inverts_the_pairs_cosine():
    """Text rows built at an exact cosine c to their image (c u + sqrt(1 - c^2) v, v a unit vector orthogonal to
    u): the matched level is sqrt(1 / c^2 - 1) per block."""
    torch.manual_seed(0)
    blocks, cosines = [64, 32], [0.3, 0.8]
    images, texts = [], []
    for d, c in zip(blocks, cosines):
        u = torch.nn.functional.normalize(torch.randn(100, d), dim=1)
        v = torch.randn(100, d)
        v = torch.nn.functional.normalize(v - (v * u).sum(1, keepdim=True) * u, dim=1)
        images.append(u * 4.0)
        texts.append((c * u + math.sqrt(1 - c * c) * v) * 9.0)
    noise = matched_noise(torch.cat(images, 1), torch.cat(texts, 1), blocks)
    torch.testing.assert_close(noise, torch.tensor([math.sqrt(1 / c ** 2 - 1) for c in cosines]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(block_norms(torch.cat(texts, 1), blocks), torch.tensor([9.0, 9.0]))
    with pytest.raises(ValueError, match="expected two"):
        matched_noise(torch.cat(images, 1), torch.cat(texts, 1)[:, :10], blocks)


def test_mixer_replaces_its_share_of_rows_with_pseudo_pairs_in_their_own_cluster():
    torch.manual_seed(0)
    d, b = 16, 8
    means = torch.eye(4, d) * 5.0  # four well separated cluster directions
    uncaptioned = means.repeat_interleave(3, dim=0) + 0.1 * torch.randn(12, d)  # 3 images near each mean
    null_tokens = torch.randn(5, 6)
    mixer = PseudoTextMixer(uncaptioned, [d], torch.tensor([2.0]), null_tokens, fraction=0.25, noise=0.0)
    assert [mixer.rows(n) for n in (8, 64, 4, 1)] == [2, 16, 1, 0]  # the mixing weight, per batch
    batch = {"clip_image": torch.randn(b, d), "clip_text": torch.randn(b, d), "text_tokens": torch.randn(b, 5, 6)}
    before = {k: v.clone() for k, v in batch.items()}
    mixed = mixer.mix(batch, torch.Generator().manual_seed(3))
    assert all(torch.equal(batch[k], before[k]) for k in batch)  # the input is left as it was
    for key in batch:
        assert mixed[key].shape == batch[key].shape and torch.equal(mixed[key][2:], batch[key][2:])
    for row in range(2):  # an uncaptioned image, the empty caption's tokens, its own direction at the text scale
        assert any(torch.equal(mixed["clip_image"][row], image) for image in uncaptioned)
        assert torch.equal(mixed["text_tokens"][row], null_tokens)
        image = mixed["clip_image"][row]
        torch.testing.assert_close(mixed["clip_text"][row], 2.0 * image / image.norm())
    vocab = ClusterVocab(means, torch.ones(4, d), std_scale=1.0)
    assert torch.equal(vocab.assign(mixed["clip_text"][:2]), vocab.assign(mixed["clip_image"][:2]))
    same = mixer.mix(batch, torch.Generator().manual_seed(3))
    assert all(torch.equal(same[k], mixed[k]) for k in mixed)  # drawn from the step's generator: reproducible
    with pytest.raises(ValueError, match="no"):
        PseudoTextMixer(uncaptioned[:0], [d], torch.tensor([2.0]), null_tokens, fraction=0.5, noise=0.0)


def _args(folder, clip_dir, out, *extra):
    return [
        "--train_data_dir", str(folder), "--clip_models", str(clip_dir), "--t5_model", f"clip-tokens:{clip_dir}",
        "--text_max_length", "8", "--config", str(ROOT / "configs" / "prior_tiny.yaml"), "--vocab_size", "3",
        "--train_batch_size", "4", "--val_fraction", "0.2", "--output_dir", str(out), "--kmeans_iters", "5",
        "--validation_steps", "0", "--checkpointing_steps", "2", "--logging_steps", "1", *extra,
    ]


def test_train_py_mixes_uncaptioned_images_and_resumes_exactly(caption_image_folder, tiny_open_clip_dir, tmp_path):
    semi = ("--pseudo_text_fraction", "0.5")
    straight = run_prior_job(_args(caption_image_folder, tiny_open_clip_dir, tmp_path / "a", *semi,
                                   "--max_train_steps", "4"))
    record = json.loads((straight / "model_index.json").read_text())["training"]["pseudo_text"]
    assert record["rows_per_batch"] == 2 and record["uncaptioned_images"] > 0
    assert record["noise_source"] == "matched to the captioned pairs" and all(x >= 0 for x in record["noise"])
    run_prior_job(_args(caption_image_folder, tiny_open_clip_dir, tmp_path / "b", *semi, "--max_train_steps", "2"))
    resumed = run_prior_job(_args(caption_image_folder, tiny_open_clip_dir, tmp_path / "b", *semi,
                                  "--max_train_steps", "4", "--resume_from_checkpoint", "latest"))
    captioned_only = run_prior_job(_args(caption_image_folder, tiny_open_clip_dir, tmp_path / "c",
                                         "--max_train_steps", "4"))
    a, b, c = (load_file(str(run / "prior" / "diffusion_pytorch_model.safetensors"))
               for run in (straight, resumed, captioned_only))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert any(not torch.allclose(a[k], c[k]) for k in a)  # the pseudo pairs changed the training
    set_noise = run_prior_job(_args(caption_image_folder, tiny_open_clip_dir, tmp_path / "d", *semi,
                                    "--pseudo_text_noise", "0.3", "--max_train_steps", "1"))
    record = json.loads((set_noise / "model_index.json").read_text())["training"]["pseudo_text"]
    assert record["noise"] == [0.3] and record["noise_source"] == "set"
    with pytest.raises(ValueError, match="rounds to 0 pseudo text rows"):
        run_prior_job(_args(caption_image_folder, tiny_open_clip_dir, tmp_path / "e", "--pseudo_text_fraction",
                            "0.1", "--max_train_steps", "1"))
    with pytest.raises(ValueError, match="pseudo_text_fraction"):
        run_prior_job(_args(caption_image_folder, tiny_open_clip_dir, tmp_path / "f", "--pseudo_text_fraction",
                            "1.0", "--max_train_steps", "1"))
