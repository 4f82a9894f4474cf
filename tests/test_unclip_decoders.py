"""Stock image-embedding decoders (Kandinsky 2.2, Stable unCLIP, Karlo) driven through shifted_diffusion.unclip.

Every pipeline is built tiny from configs (no download; conftest.py's ``tiny_unclip_decoder``), saved with
save_pretrained and loaded back through ``load_unclip_decoder``; random "prior" embeddings of the decoder's dim go in.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

from shifted_diffusion import unclip
from shifted_diffusion.train_config import parse_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KANDINSKY_DIM, UNCLIP_DIM, KARLO_DIM = 24, 16, 20
SIZE = 32  # output pixels (Karlo: super_res sample_size)
DIMS = {"kandinsky": KANDINSKY_DIM, "stable_unclip": UNCLIP_DIM, "karlo": KARLO_DIM}


@pytest.fixture(scope="module")
def decoders(tmp_path_factory, tiny_unclip_decoder):
    """Each tiny pipeline (conftest's tiny_unclip_decoder) saved to its own folder and loaded back with
    load_unclip_decoder (kind detected)."""
    root = tmp_path_factory.mktemp("unclip_decoders")
    for name, dim in DIMS.items():
        tiny_unclip_decoder(name, root / name, dim, size=SIZE)
    loaded = {name: unclip.load_unclip_decoder(root / name) for name in DIMS}
    for pipe in loaded.values():
        pipe.set_progress_bar_config(disable=True)
    return root, loaded


def _embeds(name, batch=2, seed=0):
    return torch.randn(batch, DIMS[name], generator=torch.Generator().manual_seed(seed))


def _decode(decoder, name, embeds, seed, **kwargs):
    """Two steps, guidance on, numpy output; Kandinsky gets a negative embedding."""
    negative = torch.zeros_like(embeds) if name == "kandinsky" else None
    return unclip.decode_image_embeds(decoder, embeds, negative, num_inference_steps=2, guidance_scale=3.0,
                                      generator=torch.Generator().manual_seed(seed), output_type="np",
                                      height=None if name == "karlo" else SIZE,
                                      width=None if name == "karlo" else SIZE, **kwargs)


# ----------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "prior_*.yaml"))),
                         ids=os.path.basename)
def test_every_prior_config_parses(path):
    config = parse_config(["--config", path])
    assert config.clip_models and all(":" in m for m in config.clip_models)


@pytest.mark.parametrize("name, clip", [
    ("prior_kandinsky22.yaml", "ViT-bigG-14:laion2b_s39b_b160k"), ("prior_stable_unclip_l.yaml", "ViT-L-14:openai"),
    ("prior_stable_unclip_h.yaml", "ViT-H-14:laion2b_s32b_b79k"), ("prior_karlo.yaml", "ViT-L-14:openai"),
])
def test_decoder_configs_name_one_clip_of_the_decoders_dim(name, clip):
    import open_clip

    config = parse_config(["--config", os.path.join(REPO, "configs", name)])
    assert config.clip_models == (clip,)
    model, tag = clip.split(":")
    assert tag in open_clip.list_pretrained_tags_by_model(model)
    expected = {"prior_kandinsky22.yaml": 1280, "prior_stable_unclip_l.yaml": 768,
                "prior_stable_unclip_h.yaml": 1024, "prior_karlo.yaml": 768}[name]
    assert open_clip.get_model_config(model)["embed_dim"] == expected
    assert "Raw or normalised" in open(os.path.join(REPO, "configs", name)).read()


# ----------------------------------------------------------------------------------------------
# decoding


def test_loaded_kinds_and_dims(decoders):
    _, loaded = decoders
    assert {name: unclip.decoder_kind(pipe) for name, pipe in loaded.items()} == {
        "kandinsky": unclip.KANDINSKY22, "stable_unclip": unclip.STABLE_UNCLIP, "karlo": unclip.KARLO}
    assert {name: unclip.expected_embedding_dim(pipe) for name, pipe in loaded.items()} == DIMS


@pytest.mark.parametrize("name", list(DIMS))
def test_shapes_and_determinism_per_seed(decoders, name):
    decoder = decoders[1][name]
    embeds = _embeds(name)
    first, again, other = (_decode(decoder, name, embeds, seed) for seed in (1, 1, 2))
    assert first.shape == (2, SIZE, SIZE, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-4
    changed = _decode(decoder, name, _embeds(name, seed=5), 1)  # the embedding steers the image
    assert np.abs(first - changed).max() > 1e-4


def test_pil_output(decoders):
    pil = unclip.decode_image_embeds(decoders[1]["kandinsky"], _embeds("kandinsky"), None, num_inference_steps=1,
                                     guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                                     height=SIZE, width=SIZE)
    assert len(pil) == 2 and pil[0].size == (SIZE, SIZE)


def test_kandinsky_unet_sees_exactly_the_given_embeddings(decoders, monkeypatch):
    decoder = decoders[1]["kandinsky"]
    embeds, negative = _embeds("kandinsky", seed=3), _embeds("kandinsky", seed=4)
    seen = []
    forward = decoder.unet.forward

    def spy(*args, added_cond_kwargs=None, **kwargs):
        seen.append(added_cond_kwargs["image_embeds"].clone())
        return forward(*args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(decoder.unet, "forward", spy)
    unclip.decode_image_embeds(decoder, embeds, negative, num_inference_steps=2, guidance_scale=3.0,
                               generator=torch.Generator().manual_seed(0), height=SIZE, width=SIZE, output_type="np")
    assert len(seen) == 2
    for batch in seen:  # [negative; conditional], bit for bit
        torch.testing.assert_close(batch, torch.cat([negative, embeds]), rtol=0, atol=0)


def test_stable_unclip_pipeline_gets_exactly_the_given_embeddings(decoders, monkeypatch):
    decoder = decoders[1]["stable_unclip"]
    embeds = _embeds("stable_unclip", seed=3)
    seen, labels_seen = [], []
    noise = decoder.noise_image_embeddings
    forward = decoder.unet.forward

    def spy_noise(image_embeds, noise_level, **kwargs):
        seen.append((image_embeds.clone(), int(noise_level)))
        return noise(image_embeds=image_embeds, noise_level=noise_level, **kwargs)

    def spy_forward(*args, class_labels=None, **kwargs):
        labels_seen.append(class_labels.clone())
        return forward(*args, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(decoder, "noise_image_embeddings", spy_noise)
    monkeypatch.setattr(decoder.unet, "forward", spy_forward)
    unclip.decode_image_embeds(decoder, embeds, num_inference_steps=2, guidance_scale=3.0, noise_level=0,
                               generator=torch.Generator().manual_seed(0), height=SIZE, width=SIZE, output_type="np")
    assert len(seen) == 1
    torch.testing.assert_close(seen[0][0], embeds, rtol=0, atol=0)
    assert seen[0][1] == 0
    # UNet class input: [zeros (unconditional); noised embedding + noise-level embedding], 2 D wide
    labels = labels_seen[0]
    assert labels.shape == (4, 2 * UNCLIP_DIM)
    assert torch.count_nonzero(labels[:2]) == 0
    torch.testing.assert_close(labels[2:, :UNCLIP_DIM], embeds, atol=0.05, rtol=0)  # noise_level 0: tiny noise


def test_karlo_text_proj_gets_exactly_the_given_embeddings(decoders, monkeypatch):
    decoder = decoders[1]["karlo"]
    embeds = _embeds("karlo", seed=3)
    seen = []
    forward = decoder.text_proj.forward

    def spy(*, image_embeddings, **kwargs):
        seen.append(image_embeddings.clone())
        return forward(image_embeddings=image_embeddings, **kwargs)

    monkeypatch.setattr(decoder.text_proj, "forward", spy)
    unclip.decode_image_embeds(decoder, embeds, num_inference_steps=2, guidance_scale=3.0,
                               generator=torch.Generator().manual_seed(0), output_type="np",
                               super_res_num_inference_steps=2)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], embeds, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("name", list(DIMS))
def test_dim_mismatch_names_both_dims(decoders, name):
    decoder = decoders[1][name]
    wrong = DIMS[name] + 3
    with pytest.raises(ValueError, match=rf"embedding dim is {wrong} but this {unclip.decoder_kind(decoder)} "
                                         rf"expects {DIMS[name]}"):
        unclip.check_embedding_dim(wrong, decoder)
    unclip.check_embedding_dim(DIMS[name], decoder)  # the right dim passes
    with pytest.raises(ValueError, match="image_embeds: the prior's embedding dim"):
        _decode(decoder, name, torch.randn(2, wrong), 0)


def test_unknown_kind_names_what_was_found(tmp_path, decoders):
    folder = tmp_path / "sd"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match=r"_class_name is 'StableDiffusionPipeline'.*KandinskyV22Pipeline"):
        unclip.load_unclip_decoder(folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "UnCLIPPipeline"}))
    with pytest.raises(ValueError, match="karlo-v1-alpha-image-variations"):
        unclip.load_unclip_decoder(folder)
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        unclip.load_unclip_decoder(tmp_path)
    with pytest.raises(ValueError, match="kind: expected one of"):
        unclip.load_unclip_decoder(decoders[0] / "karlo", kind="dalle2")
    assert unclip.decoder_kind(unclip.load_unclip_decoder(decoders[0] / "karlo", kind="karlo")) == unclip.KARLO


def test_bad_inputs_are_refused(decoders):
    _, loaded = decoders
    common = dict(num_inference_steps=1, guidance_scale=3.0, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="negative_image_embeds: KandinskyV22Pipeline needs"):
        unclip.decode_image_embeds(loaded["kandinsky"], _embeds("kandinsky"), **common)
    with pytest.raises(ValueError, match="negative_image_embeds: expected 2 rows"):
        unclip.decode_image_embeds(loaded["kandinsky"], _embeds("kandinsky"), _embeds("kandinsky", 3), **common)
    with pytest.raises(ValueError, match="negative_image_embeds: StableUnCLIPImg2ImgPipeline uses its own"):
        unclip.decode_image_embeds(loaded["stable_unclip"], _embeds("stable_unclip"), _embeds("stable_unclip"),
                                   **common)
    with pytest.raises(ValueError, match="prompt: expected a string or 2 strings"):
        unclip.decode_image_embeds(loaded["stable_unclip"], _embeds("stable_unclip"), prompt=["a"] * 3, **common)
    with pytest.raises(ValueError, match="height: Karlo's decoder makes 32 x 32"):
        unclip.decode_image_embeds(loaded["karlo"], _embeds("karlo"), **{**common, "height": 64})
    with pytest.raises(ValueError, match=r"image_embeds: expected a \(B, D\) tensor"):
        unclip.decode_image_embeds(loaded["karlo"], torch.randn(KARLO_DIM), **common)
    with pytest.raises(ValueError, match="NaN or infinite"):
        unclip.decode_image_embeds(loaded["karlo"], torch.full((1, KARLO_DIM), float("nan")), **common)
    with pytest.raises(TypeError, match="decoder: expected one of"):
        unclip.check_embedding_dim(KARLO_DIM, object())


def test_karlo_loads_with_a_dtype(decoders):
    pipe = unclip.load_unclip_decoder(decoders[0] / "karlo", torch_dtype=torch.bfloat16)
    assert pipe.decoder.dtype == pipe.text_encoder.dtype == pipe.text_proj.dtype == torch.bfloat16
    assert pipe.decoder_scheduler.config.variance_type == "learned_range"  # each component from its own folder
    assert pipe.super_res_scheduler.config.variance_type == "fixed_small_log"
