"""The decoder folder (load_decoder / Decoder.generate), image-to-image (shifted_diffusion.image_to_image: test.py)
and text-to-image (shifted_diffusion.text_to_image: sft_test.py) on a tiny decoder folder built from a saved
"stock" SD folder (text encoder present, unused), and text-to-image into a tiny stock Kandinsky 2.2 decoder."""

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shifted_diffusion import image_to_image, text_to_image
from shifted_diffusion.decoder import load_decoder, load_embedding, save_embedding, write_decoder_files
from shifted_diffusion.projection import ImageEmbeddingProjection

CLIP_DIM = 32 + 24  # the two tiny open_clips of conftest's tiny_decoder_clips


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory, tiny_decoder_clips):
    return tiny_decoder_clips(tmp_path_factory.mktemp("clips"))


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory, clip_dirs, tiny_sd_pipeline):
    directory = tiny_sd_pipeline(tmp_path_factory.mktemp("decoder") / "sd", with_text_encoder=True)
    torch.manual_seed(0)
    projection = ImageEmbeddingProjection(clip_dim=CLIP_DIM, cross_attention_dim=24, num_tokens=4, layer_norm=True)
    write_decoder_files(directory, projection, torch.randn(CLIP_DIM),
                        [(clip_dirs[0], ""), (clip_dirs[1], "")])
    return directory


def _pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_generate_equals_pipeline_on_projected_embeddings(decoder_dir):
    """Decoder.generate == the stock pipeline fed prompt_embeds = LayerNorm(W x0 + b) computed by hand."""
    decoder = load_decoder(decoder_dir)
    assert decoder.pipeline.text_encoder is None and decoder.clip_dim == CLIP_DIM
    x0 = torch.randn(2, CLIP_DIM)
    ours = decoder.generate(x0, guidance_scale=3.0, num_inference_steps=3,
                            generator=[torch.Generator().manual_seed(s) for s in (5, 6)])

    linear, norm = decoder.projection.proj, decoder.projection.norm

    def by_hand(e):
        tokens = (e @ linear.weight.T + linear.bias).reshape(e.shape[0], 4, 24)
        return torch.nn.functional.layer_norm(tokens, (24,), norm.weight, norm.bias)

    with torch.no_grad():
        reference = decoder.pipeline(
            prompt_embeds=by_hand(x0), negative_prompt_embeds=by_hand(decoder.empty_embedding.expand(2, -1)),
            guidance_scale=3.0, num_inference_steps=3, output_type="pil",
            generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).images
    for a, b in zip(ours, reference):
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 1
    # the negative matters: another negative embedding gives other images
    other = decoder.generate(x0, guidance_scale=3.0, num_inference_steps=3, negative_embeds=torch.randn(CLIP_DIM),
                             generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    assert np.abs(_pixels(other[0]) - _pixels(ours[0])).max() > 1
    with pytest.raises(ValueError, match=r"\(B, 56\).*\(2, 9\)"):
        decoder.generate(torch.randn(2, 9), num_inference_steps=1)


def test_img2img_folder_beside_and_output_dir(decoder_dir, tmp_path, capsys, small_images):
    inputs = small_images(tmp_path / "in", count=2)
    small_images(inputs / "nested", count=1, seed=1)
    (inputs / "broken.jpg").write_bytes(b"not a jpeg")  # reported and skipped
    common = ["--decoder", str(decoder_dir), "--num_inference_steps", "2", "--batch_size", "2"]
    beside = image_to_image.main(common + ["--images", str(inputs)])
    assert "skipping unreadable image" in capsys.readouterr().err
    assert sorted(p.relative_to(inputs).as_posix() for p in beside) == [
        "nested/re_img00.png", "re_img00.png", "re_img01.png"]
    for path in beside:
        with Image.open(path) as image:
            assert image.size == (32, 32)  # the UNet's sample_size x the VAE factor
    again = image_to_image.main(common + ["--images", str(inputs)])  # earlier re_ outputs are not inputs
    assert len(again) == 3
    out = image_to_image.main(common + ["--images", str(inputs), "--output_dir", str(tmp_path / "out"),
                                 "--num_images", "2", "--height", "16", "--width", "24"])
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in out) == [
        "in/nested/re_img00_0.png", "in/nested/re_img00_1.png", "in/re_img00_0.png", "in/re_img00_1.png",
        "in/re_img01_0.png", "in/re_img01_1.png"]
    with Image.open(out[0]) as image:
        assert image.size == (24, 16)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "euler", "pndm"])
def test_img2img_schedulers(decoder_dir, tmp_path, scheduler, small_images):
    small_images(tmp_path, count=1)
    written = image_to_image.main(["--decoder", str(decoder_dir), "--images", str(tmp_path / "img00.png"),
                            "--num_inference_steps", "3", "--scheduler", scheduler, "--output_dir", str(tmp_path / "o")])
    with Image.open(written[0]) as image:
        assert image.size == (32, 32) and np.asarray(image).std() > 0


def test_img2img_clip_mismatch_and_missing_input(decoder_dir, tmp_path, clip_dirs, small_images):
    small_images(tmp_path, count=1)
    with pytest.raises(SystemExit, match="dim 32.*expects 56"):
        image_to_image.main(["--decoder", str(decoder_dir), "--images", str(tmp_path / "img00.png"),
                      "--clip_models", clip_dirs[0]])
    with pytest.raises(SystemExit, match="no such file"):
        image_to_image.main(["--decoder", str(decoder_dir), "--images", str(tmp_path / "nope.png")])
    with pytest.raises(FileNotFoundError, match="not a shifted-diffusion decoder"):
        load_decoder(tmp_path)


class StandInPrior:
    """The prior pipeline's interface: (prompts, ...) -> output with image_embeds (P * N, D), prompt-major, and
    negative_image_embeds (the sample for "", every row); .clip_dim."""

    def __init__(self, clip_dim=CLIP_DIM):
        self.clip_dim = clip_dim
        self.calls = []

    def __call__(self, prompts, *, num_images_per_prompt=1, num_inference_steps=8, guidance_scale=1.0, generator=None):
        image_embeds = self.generate(prompts, num_images_per_prompt=num_images_per_prompt,
                                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        negative = self.generate([""], num_images_per_prompt=1, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale).expand_as(image_embeds)
        return types.SimpleNamespace(image_embeds=image_embeds, negative_image_embeds=negative)

    def generate(self, prompts, *, num_images_per_prompt=1, num_inference_steps=8, guidance_scale=1.0):
        self.calls.append((list(prompts), num_images_per_prompt, num_inference_steps, guidance_scale))
        rows = []
        for prompt in prompts:
            g = torch.Generator().manual_seed(sum(map(ord, prompt)) + 1)
            rows.append(torch.randn(num_images_per_prompt, self.clip_dim, generator=g))
        return torch.cat(rows)


@pytest.fixture
def stand_in_prior(monkeypatch, tmp_path):
    prior = StandInPrior()
    module = types.ModuleType("shifted_diffusion.prior_pipeline")
    module.load_prior = lambda path: prior
    monkeypatch.setitem(sys.modules, "shifted_diffusion.prior_pipeline", module)
    (tmp_path / "prior").mkdir()
    return prior, tmp_path / "prior"


def test_sft_text_to_image_with_prior_negative(decoder_dir, tmp_path, stand_in_prior):
    prior, prior_dir = stand_in_prior
    prompts = ["A red circle!", "two  blue/squares"]
    written = text_to_image.main(["--prior", str(prior_dir), "--decoder", str(decoder_dir), "--prompt", prompts[0],
                             "--prompt", prompts[1], "--num_images", "2", "--prior_num_inference_steps", "4",
                             "--prior_guidance_scale", "2.0", "--num_inference_steps", "2", "--guidance_scale", "3",
                             "--output_dir", str(tmp_path / "out"), "--seed", "0",
                             "--save_negative", str(tmp_path / "negative.safetensors")])
    names = [p.name for p in written]
    assert names == ["000_a_red_circle_0.png", "000_a_red_circle_1.png", "001_two_bluesquares_0.png",
                     "001_two_bluesquares_1.png", "grid.png"]
    assert prior.calls[0] == (prompts, 2, 4, 2.0) and prior.calls[1] == ([""], 1, 4, 2.0)
    with Image.open(written[-1]) as grid:
        assert grid.size == (2 * 32, 2 * 32)
    assert torch.equal(load_embedding(tmp_path / "negative.safetensors"), StandInPrior().generate([""])[0])
    # the same images as the decoder fed the prior's samples, with the prior's "" sample as negative
    decoder = load_decoder(decoder_dir)
    embeds = StandInPrior().generate(prompts, num_images_per_prompt=2)
    expected = decoder.generate(embeds, guidance_scale=3.0, num_inference_steps=2,
                                negative_embeds=StandInPrior().generate([""])[0],
                                generator=[torch.Generator().manual_seed(i) for i in range(4)])
    for path, image in zip(written[:4], expected):
        with Image.open(path) as saved:
            assert np.abs(_pixels(saved) - _pixels(image)).max() <= 1


def test_sft_prompts_file_and_empty_negative(decoder_dir, tmp_path, stand_in_prior):
    prior, prior_dir = stand_in_prior
    (tmp_path / "prompts.txt").write_text("first prompt\n\nsecond prompt\n")
    negative = tmp_path / "neg.safetensors"
    save_embedding(negative, torch.randn(CLIP_DIM))
    for mode in ("empty", str(negative)):
        written = text_to_image.main(["--prior", str(prior_dir), "--decoder", str(decoder_dir), "--prompts_file",
                                 str(tmp_path / "prompts.txt"), "--num_inference_steps", "1", "--negative", mode,
                                 "--no-grid", "--height", "16", "--width", "16", "--output_dir", str(tmp_path / "o")])
        assert [p.name for p in written] == ["000_first_prompt_0.png", "001_second_prompt_0.png"]
        with Image.open(written[0]) as image:
            assert image.size == (16, 16)


def test_sft_bad_inputs(decoder_dir, tmp_path, monkeypatch, stand_in_prior):
    with pytest.raises(SystemExit, match="prior folder .*missing_prior does not exist"):
        text_to_image.main(["--prior", str(tmp_path / "missing_prior"), "--decoder", str(decoder_dir), "--prompt", "x"])
    _, prior_dir = stand_in_prior
    with pytest.raises(SystemExit, match="at least one"):
        text_to_image.main(["--prior", str(prior_dir), "--decoder", str(decoder_dir)])
    wrong = StandInPrior(clip_dim=40)
    sys.modules["shifted_diffusion.prior_pipeline"].load_prior = lambda path: wrong
    with pytest.raises(SystemExit, match="dim 40.*expects 56"):
        text_to_image.main(["--prior", str(prior_dir), "--decoder", str(decoder_dir), "--prompt", "x"])


def test_sanitize():
    assert text_to_image.sanitize("  A photo of a Cat, on a mat!  ") == "a_photo_of_a_cat_on_a_mat"
    assert text_to_image.sanitize("../../etc/passwd") == "etcpasswd"
    assert text_to_image.sanitize("") == "empty"
    assert len(text_to_image.sanitize("x" * 500)) == 80


@pytest.mark.parametrize("baseline", [False, True])
def test_sft_with_a_real_tiny_prior_folder(decoder_dir, clip_dirs, tmp_path, baseline):
    """A prior folder written by prior_pipeline.save_prior (shifted or baseline) drives text_to_image end to end."""
    from shifted_diffusion.prior import PriorConfig, ShiftedPrior
    from shifted_diffusion.prior_pipeline import load_prior, save_prior
    from shifted_diffusion.schedule import ScheduleConfig
    from shifted_diffusion.vocab import ClusterVocab, StandardNormalShift

    torch.manual_seed(0)
    config = PriorConfig.preset("tiny", clip_dim=CLIP_DIM, text_dim=16, text_len=8,
                                vocab_size=None if baseline else 4)
    shift = StandardNormalShift(CLIP_DIM) if baseline else ClusterVocab(torch.randn(4, CLIP_DIM),
                                                                         torch.rand(4, CLIP_DIM) + 0.1)
    encoders = {"clip_models": list(clip_dirs), "t5_model": f"clip-tokens:{clip_dirs[0]}", "text_max_length": 8}
    save_prior(tmp_path / "prior", ShiftedPrior.from_prior_config(config), shift, ScheduleConfig(), encoders,
               torch.randn(CLIP_DIM), torch.randn(8, 16))
    written = text_to_image.main(["--prior", str(tmp_path / "prior"), "--decoder", str(decoder_dir), "--prompt",
                             "a red circle", "--num_images", "2", "--prior_num_inference_steps", "4", "--prior_guidance_scale", "2",
                             "--num_inference_steps", "2", "--output_dir", str(tmp_path / "out")])
    assert [p.name for p in written] == ["000_a_red_circle_0.png", "000_a_red_circle_1.png", "grid.png"]
    with Image.open(written[0]) as a, Image.open(written[1]) as b:
        assert a.size == (32, 32) and np.abs(_pixels(a) - _pixels(b)).max() > 0  # two different samples
    assert load_prior(tmp_path / "prior").clip_dim == CLIP_DIM


# ---------------------------------------------------------------------------------------------- reliability


@pytest.mark.parametrize("kwargs, error, expected", [
    ({"guidance_scale": float("nan")}, ValueError, r"guidance_scale: expected a finite number >= 0.0, got nan"),
    ({"guidance_scale": float("inf")}, ValueError, r"guidance_scale: expected a finite number >= 0.0, got inf"),
    ({"guidance_scale": -1.0}, ValueError, r"guidance_scale: expected a finite number >= 0.0, got -1"),
    ({"num_inference_steps": 0}, ValueError, r"num_inference_steps: expected an integer >= 1, got 0"),
    ({"guidance_scale": 1e30}, FloatingPointError,
     r"decoder's latents after sampling step \d of 3 .*NaN or inf.*guidance_scale=1e\+30 is too large"),
])
def test_decoder_refuses_bad_guidance_and_non_finite_latents(decoder_dir, kwargs, error, expected):
    decoder = load_decoder(decoder_dir)
    with pytest.raises(error, match=expected):
        decoder.generate(torch.randn(2, CLIP_DIM), **{"num_inference_steps": 3, **kwargs})


def test_decoder_refuses_non_finite_embeddings(decoder_dir):
    decoder = load_decoder(decoder_dir)
    x0 = torch.randn(2, CLIP_DIM)
    x0[1, 5] = float("nan")
    with pytest.raises(FloatingPointError, match=r"image_embeds .*1 of 112 values .*the prior"):
        decoder.generate(x0, num_inference_steps=1)
    with pytest.raises(FloatingPointError, match="negative_embeds"):
        decoder.generate(x0[:1], negative_embeds=torch.full((CLIP_DIM,), float("inf")), num_inference_steps=1)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a script loads or trains a model (argument errors must come first)."""
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for module in (text_to_image, image_to_image):
        monkeypatch.setattr(module, "load_decoder", boom)
        monkeypatch.setattr(module, "default_toy_decoder", boom)
    monkeypatch.setattr(text_to_image, "load_prior_or_exit", boom)


def _usage_error(main, argv, capsys) -> str:
    """main(argv)'s parser.error message (exit code 2, as argparse's own errors)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


SFT_BAD_FLAGS = [
    (["--num_images", "0"], "--num_images: expected an integer >= 1, got 0"),
    (["--num_images", "-1"], "--num_images: expected an integer >= 1, got -1"),
    (["--batch_size", "0"], "--batch_size: expected an integer >= 1, got 0"),
    (["--prior_num_inference_steps", "0"], "--prior_num_inference_steps: expected an integer >= 1, got 0"),
    (["--num_inference_steps", "0"], "--num_inference_steps: expected an integer >= 1, got 0"),
    (["--guidance_scale", "nan"], "--guidance_scale: expected a finite number >= 0.0, got nan"),
    (["--guidance_scale", "-2"], "--guidance_scale: expected a finite number >= 0.0, got -2.0"),
    (["--prior_guidance_scale", "inf"], "--prior_guidance_scale: expected a finite number >= 0.0, got inf"),
    (["--height", "20"], "--height: expected a positive multiple of 8, got 20"),
    (["--num_threads", "0"], "--num_threads: expected an integer >= 1, got 0"),
]


@pytest.mark.parametrize("extra, expected", SFT_BAD_FLAGS)
def test_sft_flags_are_checked_before_any_work(tmp_path, capsys, no_work, extra, expected):
    for base in ([], ["--prior", str(tmp_path), "--decoder", str(tmp_path), "--prompt", "x"]):  # toy defaults too
        assert expected in _usage_error(text_to_image.main, base + extra, capsys)


def test_sft_negative_must_be_prior_empty_or_an_embedding_file(tmp_path, capsys, no_work):
    base = ["--prior", str(tmp_path), "--decoder", str(tmp_path), "--prompt", "x", "--negative"]
    assert f"--negative {tmp_path}: is a directory; expected an embedding file (.safetensors" in \
        _usage_error(text_to_image.main, base + [str(tmp_path)], capsys)
    assert "--negative neg.safetensors: no such file" in _usage_error(text_to_image.main, base + ["neg.safetensors"], capsys)
    (tmp_path / "neg.png").write_bytes(b"\x89PNG")
    assert "unknown extension '.png'" in _usage_error(text_to_image.main, base + [str(tmp_path / "neg.png")], capsys)
    assert "--prompts_file nope.txt: no such file" in _usage_error(
        text_to_image.main, base[:-1] + ["--prompts_file", "nope.txt"], capsys)


@pytest.mark.parametrize("extra, expected", [
    (["--num_inference_steps", "0"], "--num_inference_steps: expected an integer >= 1, got 0"),
    (["--guidance_scale", "nan"], "--guidance_scale: expected a finite number >= 0.0, got nan"),
    (["--guidance_scale", "-1"], "--guidance_scale: expected a finite number >= 0.0, got -1.0"),
    (["--batch_size", "0"], "--batch_size: expected an integer >= 1, got 0"),
    (["--num_images", "-3"], "--num_images: expected an integer >= 1, got -3"),
    (["--num_toy_images", "0"], "--num_toy_images: expected an integer >= 1, got 0"),
    (["--width", "0"], "--width: expected a positive multiple of 8, got 0"),
    (["--negative", "."], "--negative .: is a directory"),
    (["--negative", "missing.pt"], "--negative missing.pt: no such file"),
])
def test_img2img_flags_are_checked_before_any_work(tmp_path, capsys, no_work, extra, expected):
    for base in ([], ["--decoder", str(tmp_path), "--images", str(tmp_path)]):
        assert expected in _usage_error(image_to_image.main, base + extra, capsys)


class NonFinitePrior(StandInPrior):
    """A prior whose samples overflowed."""

    def generate(self, prompts, **kwargs):
        out = super().generate(prompts, **kwargs)
        out[0, 0] = float("inf")
        return out


def test_sft_stops_before_writing_images_on_non_finite_values(decoder_dir, tmp_path, stand_in_prior):
    _, prior_dir = stand_in_prior
    common = ["--prior", str(prior_dir), "--decoder", str(decoder_dir), "--prompt", "x", "--num_inference_steps", "2",
              "--output_dir", str(tmp_path / "out")]
    with pytest.raises(FloatingPointError, match=r"decoder.s latents after sampling step \d of 2.*guidance_scale=1e\+30"):
        text_to_image.main(common + ["--guidance_scale", "1e30"])
    assert not list((tmp_path / "out").glob("*.png"))
    sys.modules["shifted_diffusion.prior_pipeline"].load_prior = lambda path: NonFinitePrior()
    with pytest.raises(FloatingPointError, match=r"prior's image embeddings: 1 of 56 .*--prior_guidance_scale 3.0 is too large"):
        text_to_image.main(common + ["--prior_guidance_scale", "3"])
    assert not list((tmp_path / "out").glob("*.png"))


def test_sft_no_clip_warning_for_the_same_clip_given_relative_and_absolute(decoder_dir, clip_dirs, tmp_path,
                                                                          monkeypatch, capsys, stand_in_prior):
    """CLIP folders given relative on one side (an older prior or decoder) and absolute on the other are the
    same models: no warning; other models (here: another order) still warn."""
    prior, prior_dir = stand_in_prior
    monkeypatch.chdir(Path(clip_dirs[0]).parent)
    prior.encoders = {"clip_models": [os.path.relpath(c) for c in clip_dirs]}
    text_to_image.main(["--prior", str(prior_dir), "--decoder", str(decoder_dir), "--prompt", "x", "--num_inference_steps",
                   "1", "--output_dir", str(tmp_path / "o"), "--no-grid"])
    assert "warning" not in capsys.readouterr().err
    prior.encoders = {"clip_models": [clip_dirs[1], clip_dirs[0]]}
    text_to_image.main(["--prior", str(prior_dir), "--decoder", str(decoder_dir), "--prompt", "x", "--num_inference_steps",
                   "1", "--output_dir", str(tmp_path / "o"), "--no-grid"])
    assert "warning: the prior was trained with CLIP models" in capsys.readouterr().err


def test_decoder_clip_paths_stored_absolute_and_old_relative_ones_load(decoder_dir, clip_dirs, tmp_path, monkeypatch):
    import json
    import shutil

    folder = tmp_path / "run" / "decoder"
    shutil.copytree(decoder_dir, folder)
    (tmp_path / "run" / "clips").symlink_to(Path(clip_dirs[0]).parent, target_is_directory=True)
    relative = [[f"run/clips/{Path(c).name}", ""] for c in clip_dirs]
    absolute = [(str(Path(c).resolve()), "") for c in clip_dirs]
    monkeypatch.chdir(tmp_path)
    projection = ImageEmbeddingProjection.from_pretrained(folder / "image_projection")
    write_decoder_files(folder, projection, torch.randn(CLIP_DIM), [tuple(spec) for spec in relative])
    assert [tuple(s) for s in json.loads((folder / "shifted_decoder.json").read_text())["clip_models"]] == absolute
    config = json.loads((folder / "shifted_decoder.json").read_text())
    (folder / "shifted_decoder.json").write_text(json.dumps({**config, "clip_models": relative}))  # an older folder
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_decoder(folder).clip_specs == absolute  # found from the folder's ancestors


# ---------------------------------------------------------------------------------------------- stock unCLIP decoder

KANDINSKY_DIM = 24


class StandInTextEncoders:
    """The prior pipeline's CLIP text encoder (encode_text -> (B, D)) and word-level encoder (encode -> (B, L, E)):
    a fixed random vector per caption, so the tiny prior pipeline needs no CLIP or T5 weights."""

    def __init__(self, clip_dim, text_len, text_dim):
        self.shapes = {"clip": (clip_dim,), "tokens": (text_len, text_dim)}

    def _rows(self, prompts, kind):
        return torch.stack([torch.randn(self.shapes[kind], generator=torch.Generator().manual_seed(
            sum(map(ord, p)) * 2 + (kind == "tokens"))) for p in prompts])

    def encode_text(self, prompts):
        return self._rows(prompts, "clip")

    def encode(self, prompts):
        return self._rows(prompts, "tokens")


@pytest.fixture(scope="module")
def kandinsky_dir(tmp_path_factory, tiny_unclip_decoder):
    return tiny_unclip_decoder("kandinsky", tmp_path_factory.mktemp("kandinsky") / "decoder", KANDINSKY_DIM)


@pytest.fixture
def kandinsky_prior(tmp_path, monkeypatch, tiny_prior_pipeline):
    """A tiny ShiftedDiffusionPriorPipeline of the decoder's dim saved to <tmp>/prior; text_to_image loads it with
    load_prior and the stand-in text encoders. Returns (folder, a function loading it the same way)."""
    from shifted_diffusion.prior_pipeline import load_prior

    tiny_prior_pipeline(clip_dim=KANDINSKY_DIM).save_pretrained(tmp_path / "prior")
    config = tiny_prior_pipeline.config
    encoders = StandInTextEncoders(KANDINSKY_DIM, config.text_len, config.text_dim)

    def load(path, device=None):
        return load_prior(path, device=device, clip=encoders, text_encoder=encoders)

    monkeypatch.setattr(text_to_image, "load_prior_or_exit", load)
    return tmp_path / "prior", load


@pytest.fixture
def unet_inputs(monkeypatch):
    """Every image embedding batch the Kandinsky UNet receives (spy on its forward)."""
    from diffusers import UNet2DConditionModel

    seen = []
    forward = UNet2DConditionModel.forward

    def spy(self, *args, added_cond_kwargs=None, **kwargs):
        seen.append(added_cond_kwargs["image_embeds"].detach().clone())
        return forward(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    return seen


KANDINSKY_PROMPTS = ["a red circle", "two blue squares"]


def _kandinsky_run(prior_dir, decoder, out, seed=5, *extra):
    return text_to_image.main(["--prior", str(prior_dir), "--decoder", str(decoder), "--prompt", KANDINSKY_PROMPTS[0],
                               "--prompt", KANDINSKY_PROMPTS[1], "--num_images", "2", "--batch_size", "3",
                               "--prior_num_inference_steps", "2", "--prior_guidance_scale", "2",
                               "--num_inference_steps", "2", "--guidance_scale", "3", "--height", "32", "--width", "32",
                               "--seed", str(seed), "--output_dir", str(out), *extra])


def test_sft_into_a_stock_kandinsky_decoder_feeds_it_the_priors_embeddings(kandinsky_dir, kandinsky_prior, unet_inputs,
                                                                          tmp_path):
    """--decoder a Kandinsky 2.2 pipeline folder: the UNet sees exactly the prior's image_embeds and its
    negative_image_embeds (the sample for ""), PNGs + grid are written as for our decoder, a seed fixes the images."""
    prior_dir, load = kandinsky_prior
    written = _kandinsky_run(prior_dir, kandinsky_dir, tmp_path / "a", 5, "--save_negative",
                             str(tmp_path / "negative.safetensors"))
    assert [p.name for p in written] == ["000_a_red_circle_0.png", "000_a_red_circle_1.png",
                                         "001_two_blue_squares_0.png", "001_two_blue_squares_1.png", "grid.png"]
    for path in written[:4]:
        with Image.open(path) as image:
            assert image.size == (32, 32) and np.asarray(image).std() > 0
    with Image.open(written[-1]) as grid:
        assert grid.size == (2 * 32, 2 * 32)

    expected = load(prior_dir)(KANDINSKY_PROMPTS, num_images_per_prompt=2, num_inference_steps=2, guidance_scale=2.0,
                               generator=torch.Generator().manual_seed(5))
    assert len(unet_inputs) == 2 * 2  # two batches (3 + 1 images) x two steps
    batches = [unet_inputs[0], unet_inputs[2]]  # each [negative; conditional] rows of one batch
    for batch in unet_inputs:
        assert batch.shape[1] == KANDINSKY_DIM
    negative = torch.cat([b[:len(b) // 2] for b in batches])
    conditional = torch.cat([b[len(b) // 2:] for b in batches])
    torch.testing.assert_close(conditional, expected.image_embeds, rtol=0, atol=0)
    torch.testing.assert_close(negative, expected.negative_image_embeds, rtol=0, atol=0)
    assert torch.equal(load_embedding(tmp_path / "negative.safetensors"), expected.negative_image_embeds[0])

    again = _kandinsky_run(prior_dir, kandinsky_dir, tmp_path / "b", 5)
    other = _kandinsky_run(prior_dir, kandinsky_dir, tmp_path / "c", 6)
    for a, b, c in zip(written[:4], again[:4], other[:4]):
        with Image.open(a) as first, Image.open(b) as same, Image.open(c) as different:
            assert np.array_equal(_pixels(first), _pixels(same))
            assert np.abs(_pixels(first) - _pixels(different)).max() > 0


def test_sft_kandinsky_hub_id_and_refusals(kandinsky_dir, kandinsky_prior, tmp_path, monkeypatch, tiny_prior_pipeline):
    """A hub id goes to unclip.load_unclip_decoder (kind read from the hub's model_index.json); a failing one, a
    prior of another dim, --negative empty and a folder of another pipeline are clear errors."""
    import json

    from shifted_diffusion import unclip

    prior_dir, _ = kandinsky_prior
    loaded = []
    real = unclip.load_unclip_decoder

    def from_hub(name, kind=None, **kwargs):
        loaded.append((name, kind))
        return real(kandinsky_dir, kind=kind, **kwargs)

    monkeypatch.setattr(unclip, "load_unclip_decoder", from_hub)
    written = text_to_image.main(["--prior", str(prior_dir), "--decoder", "someone/tiny-kandinsky", "--prompt", "x",
                                  "--num_inference_steps", "1", "--height", "32", "--width", "32", "--no-grid",
                                  "--output_dir", str(tmp_path / "hub")])
    assert loaded == [("someone/tiny-kandinsky", None)] and [p.name for p in written] == ["000_x_0.png"]

    def offline(name, kind=None, **kwargs):
        raise OSError("we couldn't connect to the hub")

    monkeypatch.setattr(unclip, "load_unclip_decoder", offline)
    with pytest.raises(SystemExit, match=r"someone/missing does not exist .*as a hub id .*couldn't connect"):
        text_to_image.main(["--prior", str(prior_dir), "--decoder", "someone/missing", "--prompt", "x"])
    monkeypatch.setattr(unclip, "load_unclip_decoder", real)

    common = ["--prior", str(prior_dir), "--decoder", str(kandinsky_dir), "--prompt", "x", "--num_inference_steps", "1",
              "--height", "32", "--width", "32", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="--negative empty: KandinskyV22Pipeline stores no empty embedding"):
        text_to_image.main(common + ["--negative", "empty"])
    tiny_prior_pipeline(clip_dim=40).save_pretrained(tmp_path / "prior40")
    with pytest.raises(SystemExit, match="embedding dim is 40 but this KandinskyV22Pipeline expects 24"):
        text_to_image.main(common + ["--prior", str(tmp_path / "prior40")])
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(SystemExit, match=r"neither a shifted-diffusion decoder folder .*'StableDiffusionPipeline'"):
        text_to_image.main(common + ["--decoder", str(other)])
    assert not list((tmp_path / "o").glob("*.png"))
