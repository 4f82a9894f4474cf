"""The toy decoder (tiny VAE + UNet through the decoder trainer), the attribute reader, the toy defaults of
image-to-image / text-to-image (test.py / text_to_image.py), the toy text-to-image benchmark
(shifted_diffusion.toy.text_to_image_eval: benchmarks/toy_text_to_image.py) and the toy shifted-vs-baseline comparison
through evaluate.py (shifted_diffusion.toy.comparison), all at fast size on the fast toy world."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shifted_diffusion import image_to_image, text_to_image
from shifted_diffusion.toy import ToyWorldConfig, decoder_recipe, ensure_toy_assets
from shifted_diffusion.toy import comparison
from shifted_diffusion.toy import text_to_image_eval as benchmark
from shifted_diffusion.toy.attribute_scorer import ToyAttributeScorer
from shifted_diffusion.toy.decoder import build_scheduler, foreground_weights, kl_to_standard_normal
from shifted_diffusion.toy.reader import ToyAttributeReader, largest_blob, reader_accuracy
from shifted_diffusion.toy.text_to_image_report import format_table
from shifted_diffusion.toy.world import ATTRIBUTES, COLOUR_RGB, render_image, sample_record


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Fast toy assets + a fast toy decoder trained through decoder_training.train_decoder (a couple of steps)."""
    root = tmp_path_factory.mktemp("toy")
    assets = ensure_toy_assets(root / "assets", fast=True)
    decoder = decoder_recipe.train_toy_decoder(["--fast", "--toy_root", str(root / "assets"), "--output_dir",
                                                str(root / "dec")])
    text_image = decoder_recipe.train_toy_decoder(["--fast", "--toy_root", str(root / "assets"), "--output_dir",
                                                   str(root / "text_dec"), "--decoder_type", "text_and_image"])
    return {"root": root, "toy_root": str(root / "assets"), "decoder": Path(decoder), "text_image": Path(text_image),
            **assets}


def tiny_prior(directory, clip_dir, baseline: bool) -> Path:
    """A random tiny prior folder (prior_pipeline.save_prior) on the toy CLIP, shifted or baseline."""
    from shifted_diffusion.prior import PriorConfig, ShiftedPrior
    from shifted_diffusion.prior_pipeline import save_prior
    from shifted_diffusion.schedule import ScheduleConfig
    from shifted_diffusion.vocab import ClusterVocab, StandardNormalShift

    model_cfg = json.loads((Path(clip_dir) / "open_clip_config.json").read_text())["model_cfg"]
    clip_dim, text_dim = model_cfg["embed_dim"], model_cfg["text_cfg"]["width"]
    torch.manual_seed(0)
    config = PriorConfig.preset("tiny", clip_dim=clip_dim, text_dim=text_dim, text_len=8,
                                vocab_size=None if baseline else 4)
    shift = StandardNormalShift(clip_dim) if baseline else ClusterVocab(torch.randn(4, clip_dim),
                                                                         torch.rand(4, clip_dim) + 0.1)
    encoders = {"clip_models": [str(clip_dir)], "t5_model": f"clip-tokens:{clip_dir}", "text_max_length": 8}
    return save_prior(directory, ShiftedPrior.from_prior_config(config), shift, ScheduleConfig(), encoders, torch.randn(clip_dim),
                      torch.randn(8, text_dim))


# ---------------------------------------------------------------------------------------------- reader


def test_reader_reads_real_renders_exactly():
    """On freshly rendered world images the reader returns the renderer's own attribute indices."""
    accuracy = reader_accuracy(ToyAttributeReader(ToyWorldConfig()), ToyWorldConfig(), num_images=150)
    assert all(accuracy[a] == 1.0 for a in ATTRIBUTES), accuracy


def test_reader_other_world_size_and_palette_and_noise():
    """Thresholds follow the config (48 px, other colours); mild pixel noise does not change the reading."""
    config = ToyWorldConfig(num_images=10, image_size=48, colours=("red", "green", "blue"), backgrounds=("white", "black"),
                            seed=3)
    reader = ToyAttributeReader(config)
    records = [sample_record(config, i) for i in range(60)]
    rng = np.random.default_rng(0)
    images = [np.clip(np.asarray(render_image(config, r), np.float64) + rng.normal(0, 8, (48, 48, 3)), 0, 255)
              for r in records]
    predicted = reader.read(images)
    for a in ATTRIBUTES:
        truth = torch.tensor([r["indices"][a] for r in records])
        assert (predicted[a] == truth).float().mean() >= 0.95, a


def test_reader_on_hand_drawn_pixels():
    """Shapes drawn with plain numpy (not the world's renderer): square / circle, sizes, grid cells, colours."""
    size = 64
    yy, xx = np.mgrid[:size, :size] + 0.5
    image = np.empty((size, size, 3), np.uint8)
    image[:] = COLOUR_RGB["white"]
    image[(np.abs(yy - 16) < 11) & (np.abs(xx - 16) < 11)] = COLOUR_RGB["red"]  # 22 px square at the top left
    second = np.empty((size, size, 3), np.uint8)
    second[:] = COLOUR_RGB["black"]
    second[(yy - 48) ** 2 + (xx - 32) ** 2 < 7.5 ** 2] = COLOUR_RGB["blue"]  # 15 px disc at the bottom centre
    config = ToyWorldConfig()
    names = ToyAttributeReader(config).names(ToyAttributeReader(config).read([image, second]))
    assert names[0] == {"shape": "square", "colour": "red", "size": "large", "position": "top left",
                        "background": "white"}
    assert names[1] == {"shape": "circle", "colour": "blue", "size": "small", "position": "bottom centre",
                        "background": "black"}


def test_largest_blob_keeps_the_biggest_component():
    mask = np.zeros((10, 10), bool)
    mask[0:2, 0:2] = True  # 4 pixels
    mask[5:9, 5:8] = True  # 12 pixels
    mask[0, 9] = True
    blob = largest_blob(mask)
    assert blob.sum() == 12 and blob[5:9, 5:8].all() and not blob[0:2, 0:2].any()
    assert not largest_blob(np.zeros((4, 4), bool)).any()


# ---------------------------------------------------------------------------------------------- decoder pieces


def test_kl_matches_torch_distributions():
    mean, logvar = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    posterior = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    expected = torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(kl_to_standard_normal(mean, logvar), expected)


def test_foreground_weights_mark_the_object_only():
    pixels = torch.full((1, 3, 8, 8), -0.5)
    pixels[0, :, 2:4, 3:6] = torch.tensor([0.8, -0.9, 0.1])[:, None, None]
    weights = foreground_weights(pixels, extra_weight=10.0)
    expected = torch.ones(1, 1, 8, 8)
    expected[0, 0, 2:4, 3:6] = 11.0
    assert torch.equal(weights, expected)


def test_fast_toy_decoder_is_a_standard_pipeline_folder_and_is_cached(toy):
    from shifted_diffusion.decoder import load_decoder

    decoder_dir = toy["decoder"]
    index = json.loads((decoder_dir / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["vae"][1] == "AutoencoderKL"
    record = json.loads((decoder_dir / "toy_decoder.json").read_text())
    assert record["complete"] and record["unet"]["global_step"] == 2
    assert record["clip"]["path"] == str(Path(toy["clip"]).resolve())
    decoder = load_decoder(decoder_dir)
    assert decoder.clip_specs == [(toy["clip"], "")]
    assert 2 ** (len(decoder.pipeline.vae.config.block_out_channels) - 1) == 4  # 64 px -> 16 x 16 latents
    images = decoder.generate(torch.randn(2, decoder.clip_dim), num_inference_steps=2, guidance_scale=2.0)
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    weights = decoder_dir / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert decoder_recipe.ensure_toy_decoder(decoder_dir, toy_root=toy["toy_root"], fast=True) == decoder_dir
    assert decoder_recipe.train_toy_decoder(["--fast", "--toy_root", toy["toy_root"], "--output_dir",
                                             str(decoder_dir)]) == decoder_dir
    assert weights.stat().st_mtime_ns == before  # reused, not retrained
    scheduler = json.loads((decoder_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"]
    assert scheduler["timestep_spacing"] == "trailing"


def test_fast_toy_text_image_decoder_scale_zero_is_its_text_to_image_model(toy):
    """train_toy_decoder.py --decoder_type text_and_image: a text-to-image model on the toy text encoder
    (stages/text_base, a stock pipeline) and an adapter on its frozen UNet; image scale 0 draws exactly what the
    text-to-image model draws; the autoencoder is the language-free decoder's when cached with the same settings;
    a second call reuses the folder."""
    from diffusers import StableDiffusionPipeline

    from shifted_diffusion.decoder import load_decoder

    folder = toy["text_image"]
    record = json.loads((folder / "toy_decoder.json").read_text())
    assert record["complete"] and record["decoder_type"] == "text_and_image"
    assert record["text_base"]["global_step"] == 2 and record["adapter"]["global_step"] == 2
    assert record["adapter"]["num_params"] < record["text_base"]["num_params"]
    decoder = load_decoder(folder)
    assert decoder.takes_prompts and decoder.clip_specs == [(toy["clip"], "")]
    base = StableDiffusionPipeline.from_pretrained(folder / "stages" / "text_base", safety_checker=None,
                                                   requires_safety_checker=False)
    base.set_progress_bar_config(disable=True)
    assert base.text_encoder.config.hidden_size == base.unet.config.cross_attention_dim
    captions = ["a red circle", "a blue star on a black background"]
    decoder.set_image_scale(0.0)
    ours = decoder.generate(torch.randn(2, decoder.clip_dim), prompts=captions, num_inference_steps=2, guidance_scale=2.0,
                            generator=[torch.Generator().manual_seed(i) for i in range(2)])
    stock = base(captions, num_inference_steps=2, guidance_scale=2.0, output_type="pil",
                 generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, stock))
    decoder.set_image_scale(1.0)
    with_image = decoder.generate(torch.randn(2, decoder.clip_dim), prompts=captions, num_inference_steps=2,
                                  guidance_scale=2.0, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(with_image, stock))

    weights = folder / "ip_adapter.safetensors"
    before = weights.stat().st_mtime_ns
    assert decoder_recipe.ensure_toy_decoder(folder, toy_root=toy["toy_root"], fast=True,
                                             decoder_type="text_and_image") == folder
    assert weights.stat().st_mtime_ns == before
    # the language-free decoder's folder is not taken for a text + image one
    assert not decoder_recipe.decoder_is_cached(toy["decoder"], decoder_recipe.resolve_config(
        decoder_recipe.build_parser().parse_args(["--fast"])), toy["clip"], "text_and_image")


def test_zero_terminal_snr_schedule_against_the_formula():
    """Lin et al. (2024), Algorithm 1 written out: sqrt(abar) shifted so the last step is 0 and scaled so the
    first is unchanged; SD's scaled-linear betas before. The DDPM noise scheduler the trainer builds from the
    same config agrees, and the old schedule keeps sqrt(abar_T) = 0.068 of the image."""
    from diffusers import DDPMScheduler

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    root = torch.cumprod(1 - betas, 0).sqrt()
    first, last = root[0], root[-1]
    rescaled = (root - last) * first / (first - last)
    for scheduler in (build_scheduler(True), DDPMScheduler.from_config(build_scheduler(True).config)):
        assert torch.allclose(scheduler.alphas_cumprod.double().sqrt(), rescaled, atol=1e-6)
        assert float(scheduler.alphas_cumprod[-1]) == 0.0
    old = build_scheduler(False)
    assert old.config.prediction_type == "epsilon"
    assert abs(float(old.alphas_cumprod[-1].sqrt()) - float(last)) < 1e-6 and 0.06 < float(last) < 0.07
    sampler = build_scheduler(True)
    sampler.set_timesteps(25)
    assert int(sampler.timesteps[0]) == 999  # trailing: sampling starts at the pure-noise step


# ---------------------------------------------------------------------------------------------- script defaults


def test_test_py_defaults_reconstruct_toy_images(toy, tmp_path, capsys):
    out = tmp_path / "img2img"
    written = image_to_image.main(["--toy_fast", "--toy_root", toy["toy_root"], "--toy_decoder", str(toy["decoder"]),
                            "--num_toy_images", "2", "--num_inference_steps", "2", "--output_dir", str(out)])
    assert sorted(p.name for p in written) == ["re_toy00.png", "re_toy01.png"]
    assert (out / "inputs" / "toy00.png").is_file() and (out / "inputs" / "toy00.txt").read_text().strip()
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * 64, 2 * 64)  # [input | reconstruction] x 2 images
    printed = capsys.readouterr().out
    assert "toy decoder" in printed and str(out) in printed


def test_sft_test_defaults_use_the_toy_prior_and_example_captions(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="python train.py"):
        text_to_image.main(["--toy_fast", "--toy_root", toy["toy_root"], "--toy_decoder", str(toy["decoder"])])
    tiny_prior(tmp_path / text_to_image.TOY_PRIOR, toy["clip"], baseline=False)
    written = text_to_image.main(["--toy_fast", "--toy_root", toy["toy_root"], "--toy_decoder", str(toy["decoder"]),
                             "--num_inference_steps", "2", "--prior_num_inference_steps", "2"])
    prompts = text_to_image.TOY_EXAMPLE_PROMPTS
    assert [p.name for p in written] == [f"{i:03d}_{text_to_image.sanitize(p)}_0.png" for i, p in enumerate(prompts)] \
        + ["grid.png"]
    assert all(p.resolve().parent == (tmp_path / text_to_image.TOY_OUTPUT_DIR).resolve() for p in written)
    assert text_to_image.TOY_OUTPUT_DIR in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- benchmark


def test_attribute_scores_by_hand():
    truth = torch.tensor([[0, 1, 0, 2, 1], [3, 3, 1, 0, 0]])
    predicted = torch.tensor([[0, 2, 0, 2, 1], [3, 3, 0, 0, 1]])
    mask = torch.tensor([[True, True, False, False, False], [True, False, True, True, False]])
    scores = benchmark.attribute_scores(predicted, truth, mask)
    assert scores["mean"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert scores["all"] == 0.0
    assert scores["shape"] == 1.0 and scores["colour"] == 0.0 and scores["size"] == 0.0 and scores["position"] == 1.0
    assert np.isnan(scores["background"])


def test_benchmark_runs_end_to_end_at_fast_size(toy, tmp_path):
    priors = {name: tiny_prior(tmp_path / name, toy["clip"], baseline=name == "baseline") for name in ("shifted", "baseline")}
    out = tmp_path / "results.json"
    results = benchmark.run_text_to_image_eval(["--fast", "--toy_root", toy["toy_root"], "--decoder", str(toy["decoder"]),
                              "--text_image_decoder", str(toy["text_image"]),
                              "--shifted_prior", str(priors["shifted"]), "--baseline_prior", str(priors["baseline"]),
                              "--output_dir", str(tmp_path / "bench"), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["text_to_image"]) == {"shifted", "baseline"}
    for name in ("shifted", "baseline"):
        m = saved["text_to_image"][name]
        assert 0.0 <= m["attribute_accuracy"]["mean"] <= 1.0 and np.isfinite(m["fd"]) and m["fd"] >= 0
        assert len(m["cos_text_per_block"]) == len(saved["config"]["block_sizes"]) == 1
        assert m["prior_source"] == "given"
    real = saved["reference"]["real_images"]
    assert real["attribute_accuracy"]["all"] == 1.0  # the reader on ground-truth renders
    assert real["cos_gt"] == pytest.approx(1.0)  # each real image against itself
    assert 0.0 <= saved["image_to_image"]["attribute_accuracy"]["mean"] <= 1.0
    assert set(saved["text_and_image"]) == {"text_only", "shifted", "baseline"}
    for name, m in saved["text_and_image"].items():
        assert 0.0 <= m["attribute_accuracy"]["mean"] <= 1.0 and np.isfinite(m["fd"])
        # the prior's own embedding score is that of the language-free row (the same embeddings); none for text only
        assert m.get("prior_embedding_nn_attribute_accuracy") == (
            None if name == "text_only" else saved["text_to_image"][name]["prior_embedding_nn_attribute_accuracy"])
    with Image.open(saved["grid"]) as grid:
        c, s = saved["config"]["num_captions"], saved["config"]["samples_per_caption"]
        assert grid.size == (300 + 64 * (2 + 2 * s + 3), 16 + 64 * c)
    table = format_table(results)
    assert "text→image, shifted prior" in table and "text-only decoder" in table
    assert "text + baseline prior embedding" in table

    skipped = benchmark.run_text_to_image_eval([
        "--fast", "--toy_root", toy["toy_root"], "--decoder", str(toy["decoder"]), "--no_text_image",
        "--shifted_prior", str(priors["shifted"]), "--baseline_prior", str(priors["baseline"]), "--num_captions", "2",
        "--output_dir", str(tmp_path / "bench2"), "--out", str(tmp_path / "skipped.json")])
    assert "text_and_image" not in skipped and skipped["config"]["text_image_decoder"] is None
    with pytest.raises(SystemExit, match="not a text \\+ image decoder"):
        benchmark.run_text_to_image_eval(["--fast", "--toy_root", toy["toy_root"], "--decoder", str(toy["decoder"]),
                                          "--text_image_decoder", str(toy["decoder"]), "--out", str(tmp_path / "x.json"),
                                          "--output_dir", str(tmp_path / "bench3")])


# ---------------------------------------------------------------------------------------------- evaluate.py, toy world


def test_attribute_scorer_reads_ground_truth_exactly_and_names_bad_pairs(toy, tmp_path):
    from shifted_diffusion.eval_data import EvalPair, read_captioned_folder
    from shifted_diffusion.toy.world import generate_world, load_world_config

    world = generate_world(tmp_path / "held", load_world_config(toy["world"]).heldout(12, offset=99))
    pairs = read_captioned_folder(world)
    scorer = ToyAttributeScorer(pairs)
    images = [Image.open(p.image) for p in pairs]
    truth = scorer.summarize(scorer.score(images, range(len(pairs))))["attribute_accuracy"]
    assert truth["all"] == 1.0 and truth["mean"] == 1.0  # the reader reads real renders exactly
    # the images of a rotated pairing: only attributes shared by chance are right
    rotated = scorer.summarize(scorer.score(images[1:] + images[:1], range(len(pairs))))["attribute_accuracy"]
    assert rotated["mean"] < 0.8
    with pytest.raises(ValueError, match="pair 0 has caption 'a blue cat'"):
        ToyAttributeScorer([EvalPair("a blue cat", pairs[0].image), *pairs[1:]])
    with pytest.raises(ValueError, match="is not in a toy world"):
        ToyAttributeScorer([EvalPair("x", tmp_path / "elsewhere" / "a.png")])


def test_toy_comparison_through_evaluate(toy, tmp_path):
    """benchmarks/toy_shifted_vs_baseline.py at fast size: evaluate.py with the toy CLIP's Frechet distance (fd_clip,
    against metrics.frechet_distance of the stored toy-CLIP features) and the pixel reader; JSON, plots, command."""
    from safetensors.torch import load_file

    from shifted_diffusion.metrics import frechet_distance

    priors = {name: tiny_prior(tmp_path / name, toy["clip"], baseline=name == "baseline")
              for name in ("shifted", "baseline")}
    out = comparison.run_toy_comparison([
        "--shifted_prior", str(priors["shifted"]), "--baseline_prior", str(priors["baseline"]),
        "--decoder", str(toy["decoder"]), "--toy_root", toy["toy_root"], "--output_dir", str(tmp_path / "cmp"),
        "--results_dir", str(tmp_path / "res"), "--num_captions", "6", "--guidance_scales", "1,3",
        "--prior_num_inference_steps", "2", "--num_inference_steps", "2", "--shard_size", "4", "--num_threads", "1"])
    results = out["results"]
    assert results["settings"]["fd_name"] == "fd_clip" and results["settings"]["negative"] == "empty"
    for name in ("shifted", "baseline"):
        entries = results["priors"][name]
        assert [e["guidance_scale"] for e in entries] == [1.0, 3.0]
        for e in entries:
            assert "fid" not in e and np.isfinite(e["fd_clip"]) and e["fd_clip"] >= 0
            assert 0.0 <= e["attribute_accuracy"]["mean"] <= 1.0
    shards = tmp_path / "cmp" / "eval" / "shards"
    real = torch.cat([load_file(p)["fid"] for p in sorted((shards / "real").glob("*.safetensors"))]).double()
    fake = torch.cat([load_file(p)["fid"] for p in sorted((shards / "shifted" / "pg1" / "g3").glob("*.safetensors"))])
    assert real.shape == (6, toy_clip_dim(toy["clip"]))
    assert results["priors"]["shifted"][1]["fd_clip"] == pytest.approx(float(frechet_distance(fake.double(), real)),
                                                                       rel=1e-4, abs=1e-4)
    assert sorted(Path(p).name for p in out["plots"]) == ["toy_shifted_vs_baseline_fd_clip_vs_clip_image_image.png",
                                                           "toy_shifted_vs_baseline_fd_clip_vs_clip_image_text.png"]
    saved = json.loads((tmp_path / "res" / "toy_shifted_vs_baseline.json").read_text())
    assert saved["command"].startswith("python evaluate.py --prior shifted=") and "--toy_attributes" in saved["command"]
    assert saved["results"]["priors"]["baseline"] == results["priors"]["baseline"]


def toy_clip_dim(clip_dir) -> int:
    return json.loads((Path(clip_dir) / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"]
