"""Generating with the text + image decoder (text_image_decoder; through decoder.load_decoder, sft_test.py's
text_to_image and test.py's image_to_image) on a folder the trainer wrote from tiny random models."""

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from shifted_diffusion import image_to_image, text_to_image
from shifted_diffusion.decoder import load_decoder
from shifted_diffusion.decoder_training import parse_decoder_config, train_decoder
from shifted_diffusion.text_image_decoder import TextImageDecoder

CLIP_DIM = 56
STEPS = {"guidance_scale": 3.0, "num_inference_steps": 2, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_sd_pipeline, tiny_decoder_clips, small_images, tiny_clip_tokenizer):
    """A text+image decoder folder: 2 steps of finetune.py --decoder_type text_and_image."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("ti_decoder")
    small_images(root / "images", count=4)
    (root / "tok").mkdir()
    StableDiffusionPipeline.from_pretrained(
        tiny_sd_pipeline(root / "base"), tokenizer=tiny_clip_tokenizer(root / "tok", model_max_length=16),
        safety_checker=None, requires_safety_checker=False).save_pretrained(root / "sd")
    return train_decoder(parse_decoder_config([
        "--decoder_type", "text_and_image", "--pretrained_model_name_or_path", str(root / "sd"), "--train_data_dir",
        str(root / "images"), "--clip_models", *tiny_decoder_clips(root), "--resolution", "32", "--center_crop",
        "--train_batch_size", "2", "--learning_rate", "1e-1", "--lr_warmup_steps", "0", "--num_validation_images", "0",
        "--report_to", "none", "--max_train_steps", "2", "--output_dir", str(root / "decoder")]))


def _px(images):
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def _gens(n):
    return [torch.Generator().manual_seed(i) for i in range(n)]


def test_load_generate_prompts_and_image_scale(folder):
    from diffusers import StableDiffusionPipeline

    decoder = load_decoder(folder)
    assert isinstance(decoder, TextImageDecoder) and decoder.clip_dim == CLIP_DIM and len(decoder.clip_specs) == 2
    embeds = torch.randn(2, CLIP_DIM, generator=torch.Generator().manual_seed(0)) * 3
    a = _px(decoder.generate(embeds, prompts=["a cat", "a dog"], generator=_gens(2), **STEPS))
    assert a.shape == (2, 32, 32, 3)
    assert np.array_equal(a, _px(decoder.generate(embeds, prompts=["a cat", "a dog"], generator=_gens(2), **STEPS)))
    assert np.abs(a - _px(decoder.generate(embeds, prompts=["zzz", "qqq"], generator=_gens(2), **STEPS))).max() > 0
    assert np.abs(a - _px(decoder.generate(-embeds, prompts=["a cat", "a dog"], generator=_gens(2), **STEPS))).max() > 0
    with pytest.raises(ValueError, match="expected 2 captions"):
        decoder.generate(embeds, prompts=["a cat"], **STEPS)
    with pytest.raises(ValueError, match=r"\(B, 56\)"):
        decoder.generate(torch.zeros(2, 5), **STEPS)

    # image scale 0 is the stock text-only pipeline
    decoder.set_image_scale(0.0)
    zero = _px(decoder.generate(embeds, prompts=["a cat", "a dog"], generator=_gens(2), **STEPS))
    stock = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    text_only = _px(stock(["a cat", "a dog"], generator=_gens(2), output_type="pil", **STEPS).images)
    assert np.array_equal(zero, text_only)
    with pytest.raises(ValueError, match="image_scale"):
        decoder.set_image_scale(-1.0)
    assert load_decoder(folder, image_scale=0.0).image_scale == 0.0


def test_a_batch_row_reads_its_own_embedding_only(folder):
    """Row i of a batched call == the stock pipeline called with row i alone (stock diffusers repeats a batch of
    ip_adapter_image_embeds for every prompt, so each image would attend to every row's image tokens)."""
    from shifted_diffusion import ip_adapter

    decoder = load_decoder(folder)
    embeds = torch.randn(3, CLIP_DIM, generator=torch.Generator().manual_seed(1)) * 3
    prompts = ["a cat", "a dog", "a red bus"]
    batch = _px(decoder.generate(embeds, prompts=prompts, generator=_gens(3), **STEPS))
    for i in range(3):
        alone = decoder.pipeline(prompt=[prompts[i]], ip_adapter_image_embeds=ip_adapter.pipeline_image_embeds(
            embeds[i:i + 1], guidance=True), generator=_gens(3)[i:i + 1], output_type="pil", **STEPS).images
        assert np.abs(batch[i] - _px(alone)[0]).max() <= 1
    # the rows differ from each other (each reads its own embedding and caption)
    assert np.abs(batch[0] - batch[1]).max() > 0
    with pytest.raises(ValueError, match="ip_adapter_image_embeds"):
        with ip_adapter.rows_as_given(decoder.pipeline):
            decoder.pipeline(prompt=["a cat"], ip_adapter_image=Image.new("RGB", (32, 32)), **STEPS)
    assert "prepare_ip_adapter_image_embeds" not in vars(decoder.pipeline)  # the context restored the method


class _StandInPrior:
    """The prior pipeline's call: prompts -> image_embeds (P * N, D) and negative_image_embeds."""

    clip_dim = CLIP_DIM

    def __call__(self, prompts, *, num_images_per_prompt=1, num_inference_steps=8, guidance_scale=1.0, generator=None):
        rows = [torch.randn(num_images_per_prompt, CLIP_DIM, generator=torch.Generator().manual_seed(len(p)))
                for p in prompts]
        embeds = torch.cat(rows)
        return types.SimpleNamespace(image_embeds=embeds, negative_image_embeds=torch.zeros_like(embeds))


def test_sft_text_to_image_feeds_caption_and_embedding(folder, tmp_path, monkeypatch):
    module = types.ModuleType("shifted_diffusion.prior_pipeline")
    module.load_prior = lambda path: _StandInPrior()
    monkeypatch.setitem(sys.modules, "shifted_diffusion.prior_pipeline", module)
    (tmp_path / "prior").mkdir()
    prompts = ["a red circle", "two blue squares"]
    written = text_to_image.main(["--prior", str(tmp_path / "prior"), "--decoder", str(folder), "--prompt", prompts[0],
                                  "--prompt", prompts[1], "--num_inference_steps", "2", "--guidance_scale", "3",
                                  "--negative", "empty", "--image_scale", "0.5", "--output_dir", str(tmp_path / "out"),
                                  "--device", "cpu", "--dtype", "float32", "--no-grid"])
    assert [p.name for p in written] == ["000_a_red_circle_0.png", "001_two_blue_squares_0.png"]
    decoder = load_decoder(folder, image_scale=0.5)
    embeds = _StandInPrior()(prompts).image_embeds
    expected = _px(decoder.generate(embeds, prompts=prompts, generator=_gens(2), **STEPS))
    saved = _px([Image.open(p).convert("RGB") for p in written])
    assert np.abs(saved - expected).max() <= 1
    with pytest.raises(SystemExit):
        text_to_image.main(["--prior", str(tmp_path / "prior"), "--decoder", str(folder), "--prompt", "x",
                            "--image_scale", "-1"])


def test_img2img_with_and_without_prompt(folder, tmp_path, small_images):
    images = small_images(tmp_path / "in", count=2)
    common = ["--decoder", str(folder), "--images", str(images), "--num_inference_steps", "2", "--height", "32",
              "--width", "32", "--device", "cpu", "--dtype", "float32"]
    plain = image_to_image.main([*common, "--output_dir", str(tmp_path / "plain")])
    prompted = image_to_image.main([*common, "--output_dir", str(tmp_path / "prompted"), "--prompt", "a red square"])
    assert len(plain) == len(prompted) == 2 and all(p.is_file() for p in plain + prompted)
    a = _px([Image.open(p).convert("RGB") for p in plain])
    b = _px([Image.open(p).convert("RGB") for p in prompted])
    assert a.shape == (2, 32, 32, 3) and np.abs(a - b).max() > 0
