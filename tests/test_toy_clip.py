"""Tiny toy CLIP: contrastive training lowers the loss, saves/loads through MultiCLIP, caches, evaluates."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shifted_diffusion.toy import ATTRIBUTES, ToyClipConfig, ToyWorldConfig, ensure_toy_assets, generate_world
from shifted_diffusion.toy.clip import build_model, load_world_tensors, normalize_images, train_clip_model, train_toy_clip

TINY = ToyClipConfig(
    embed_dim=16, vision_resnet_layers=(1, 1, 1, 1), vision_width=8,
    text_width=32, text_layers=1, text_heads=2, batch_size=32, steps=3, num_threads=1,
)
TINY_VIT = dataclasses.replace(TINY, vision_resnet_layers=None, patch_size=16, vision_width=32, vision_layers=1,
                               vision_head_width=16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("toyclip") / "world", ToyWorldConfig(num_images=32, seed=5))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return ensure_toy_assets(tmp_path_factory.mktemp("assets"), fast=True)


def test_contrastive_loss_decreases_on_a_fixed_batch(world):
    # one batch = the whole world, captions fixed (the metadata's): every step sees the same pairs
    config = dataclasses.replace(TINY, steps=25, lr=3e-3, warmup_frac=0.0, caption_mention_probs=None)
    _, losses = train_clip_model(world, config)
    assert losses[0] > np.log(32) - 0.3  # an untrained model is no better than chance (32-way)
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses


def test_training_is_seeded(world):
    config = dataclasses.replace(TINY, steps=2)
    _, a = train_clip_model(world, config)
    _, b = train_clip_model(world, config)
    _, c = train_clip_model(world, dataclasses.replace(config, seed=1))
    assert a == b and a != c


@pytest.mark.parametrize("config", [TINY, TINY_VIT], ids=["resnet", "vit"])
def test_saved_clip_loads_through_multiclip_and_matches_training_preprocessing(world, tmp_path, config):
    from shifted_diffusion.encoders import MultiCLIP

    out = train_toy_clip(world, tmp_path / "clip", config, eval_images=0)
    clip = MultiCLIP([(out, "")], device="cpu")
    assert clip.block_sizes == [config.embed_dim] and clip.dim == config.embed_dim
    images, _, texts = load_world_tensors(world)
    pil = [Image.fromarray(images[i].permute(1, 2, 0).numpy()) for i in range(4)]
    # the same weights, rebuilt from the config and fed the training-time normalisation
    from safetensors.torch import load_file

    reference = build_model(config).eval()
    weights = [p for p in Path(out).glob("*.safetensors")]
    assert len(weights) == 1
    reference.load_state_dict(load_file(str(weights[0])))
    with torch.no_grad():
        expected_image = reference.encode_image(normalize_images(images[:4], config.image_size))
        import open_clip

        tokens = open_clip.tokenizer.SimpleTokenizer(context_length=config.context_length)(texts[:3])
        expected_text = reference.encode_text(tokens)
    torch.testing.assert_close(clip.encode_image(pil), expected_image, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(clip.encode_text(texts[:3]), expected_text, atol=1e-4, rtol=1e-4)
    info = json.loads((Path(out) / "toy_clip_train.json").read_text())
    assert info["complete"] and info["num_params"] == sum(p.numel() for p in reference.parameters())


def test_trained_clip_is_cached_and_retrained_on_a_new_config(world, tmp_path):
    out = train_toy_clip(world, tmp_path / "clip", TINY, eval_images=0)
    weights = next(Path(out).glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    train_toy_clip(world, out, TINY, eval_images=0)
    assert weights.stat().st_mtime_ns == stamp
    train_toy_clip(world, out, dataclasses.replace(TINY, steps=4), eval_images=0)
    assert weights.stat().st_mtime_ns != stamp
    assert json.loads((Path(out) / "toy_clip_train.json").read_text())["config"]["steps"] == 4


def test_ensure_toy_assets_fast_and_zero_shot_accuracy(assets):
    from shifted_diffusion.toy import zero_shot_accuracy

    assert (Path(assets["world"]) / "metadata.jsonl").is_file()
    assert (Path(assets["clip"]) / "open_clip_config.json").is_file()
    acc = zero_shot_accuracy(assets["clip"], assets["world"], n=40)
    assert set(acc) == set(ATTRIBUTES) and all(0.0 <= v <= 1.0 for v in acc.values())
    info = json.loads((Path(assets["clip"]) / "toy_clip_train.json").read_text())
    assert set(info["zero_shot_accuracy"]) == set(ATTRIBUTES) and info["train_seconds"] > 0


def test_zero_shot_evaluator_scores_an_oracle_encoder_perfectly():
    from shifted_diffusion.toy.evaluate import attribute_prompts, heldout_images, zero_shot_from_encoders

    config = ToyWorldConfig(num_images=10)
    images, attributes = heldout_images(config, 30)
    # oracle: an image's embedding is the one-hot of its true attributes (looked up by pixels),
    # a prompt's embedding the one-hot of the value it names
    lookup = {np.asarray(im).tobytes(): [int(attributes[a][i]) for a in ATTRIBUTES] for i, im in enumerate(images)}
    sizes = [len(config.values(a)) for a in ATTRIBUTES]
    offsets = np.cumsum([0] + sizes[:-1])
    prompt_code = {}
    for j, a in enumerate(ATTRIBUTES):
        for v, variants in enumerate(attribute_prompts(config, a)):
            for text in variants:
                prompt_code[text] = offsets[j] + v

    def encode_image(ims):
        out = torch.zeros(len(ims), sum(sizes))
        for i, im in enumerate(ims):
            for j, v in enumerate(lookup[np.asarray(im).tobytes()]):
                out[i, offsets[j] + v] = 1.0
        return out

    def encode_text(texts):
        out = torch.zeros(len(texts), sum(sizes))
        for i, t in enumerate(texts):
            out[i, prompt_code[t]] = 1.0
        return out

    acc = zero_shot_from_encoders(encode_image, encode_text, config, n=30, batch_size=7)
    assert acc == dict.fromkeys(ATTRIBUTES, 1.0)
    # a useless text encoder scores at most the majority rate
    bad = zero_shot_from_encoders(encode_image, lambda t: torch.ones(len(t), sum(sizes)), config, n=30)
    assert bad["position"] < 0.5
