"""The evaluation command's package side: evaluation sets, FID through torchmetrics with an injected feature
extractor, the CLIP scores, the prior-only cosines, resumable shards and the dim check (tiny models, CPU)."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from shifted_diffusion.eval_data import EvalPair, read_captioned_folder, read_coco_captions, sample_pairs
from shifted_diffusion.evaluation import (EncoderFeatures, EvalSettings, Evaluator, check_prior_fits_decoder,
                                          fid_from_features, images_to_uint8, make_fid_metric, real_fid_state)
from shifted_diffusion.metrics import blockwise_cosine, frechet_distance


class PoolFeatures(torch.nn.Module):
    """uint8 (N, 3, H, W) -> (N, 12): channel means over a 2 x 2 grid (no Inception download)."""

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 2).flatten(1)


class FakeCLIP:
    """A deterministic stand-in for MultiCLIP: image -> pooled pixels projected, caption -> hashed vector."""

    def __init__(self, block_sizes=(40, 24), seed=0):
        self.block_sizes = list(block_sizes)
        self.dim = sum(block_sizes)
        self.projection = torch.randn(48, self.dim, generator=torch.Generator().manual_seed(seed))
        self.spec = {"type": "fake", "block_sizes": self.block_sizes}

    def encode_image(self, images):
        pixels = images_to_uint8(images, 16)
        return torch.nn.functional.adaptive_avg_pool2d(pixels.float() / 255.0, 4).flatten(1) @ self.projection

    def encode_text(self, texts):
        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(
            int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))) for t in texts]
        return torch.stack(rows)


class FakeTextEncoder:
    def __init__(self, length, width):
        self.length, self.width = length, width

    def encode(self, texts):
        return torch.stack([torch.randn(self.length, self.width, generator=torch.Generator().manual_seed(
            int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))) for t in texts])


class FakeDecoder:
    """Images coloured by the embedding (one call counted per ``generate``)."""

    takes_negative = True
    device = torch.device("cpu")

    def __init__(self, clip_dim=64):
        self.clip_dim, self.calls = clip_dim, 0

    def generate(self, image_embeds, *, guidance_scale, num_inference_steps, negative_embeds=None, generator=None,
                 height=None, width=None):
        self.calls += 1
        images = []
        for row in image_embeds:
            colour = (torch.sigmoid(row[:3] * guidance_scale) * 255).byte().numpy()
            array = np.zeros((height, width, 3), np.uint8)
            array[...] = colour
            array[: height // 2, : width // 2] = 255 - colour
            images.append(Image.fromarray(array))
        return images


@pytest.fixture
def eval_folder(tmp_path, small_images):
    folder = small_images(tmp_path / "images", count=8)
    for i in range(8):
        (folder / f"img{i:02d}.txt").write_text(f"caption number {i}")
    return folder


@pytest.fixture
def prior(tiny_prior_pipeline):
    config = tiny_prior_pipeline.config
    return tiny_prior_pipeline().set_encoders(clip=FakeCLIP((32, 32), seed=1),
                                              text_encoder=FakeTextEncoder(config.text_len, config.text_dim))


def test_coco_captions_and_sampling(tmp_path, small_images):
    images = small_images(tmp_path / "val2014", count=3)
    data = {"images": [{"id": 7, "file_name": "img00.png"}, {"id": 9, "file_name": "img01.png"}],
            "annotations": [{"image_id": 7, "caption": " a cat "}, {"image_id": 9, "caption": "a dog"},
                            {"image_id": 7, "caption": "a cat again"}]}
    (tmp_path / "captions.json").write_text(json.dumps(data))
    pairs = read_coco_captions(tmp_path / "captions.json", images)
    assert pairs[0] == EvalPair("a cat", images / "img00.png") and len(pairs) == 3
    assert sample_pairs(pairs, 2, seed=3) == sample_pairs(pairs, 2, seed=3)
    assert len(sample_pairs(pairs, 2, seed=3)) == 2 and len(sample_pairs(pairs, 30000, seed=0)) == 3
    with pytest.raises(FileNotFoundError, match="--coco_captions"):
        read_coco_captions(tmp_path / "missing.json", images)
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a COCO captions file"):
        read_coco_captions(tmp_path / "bad.json", images)


def test_fid_known_answers():
    metric = make_fid_metric(PoolFeatures())
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 12, generator=g, dtype=torch.float64)
    fake = torch.randn(150, 12, generator=g, dtype=torch.float64) * 1.3 + 0.4
    assert abs(fid_from_features(metric, real_fid_state(real), real)) < 1e-6
    expected = frechet_distance(real, fake)
    assert expected > 1.0
    assert fid_from_features(metric, real_fid_state(real), fake) == pytest.approx(expected, rel=1e-4)
    # the states match torchmetrics' own update on images
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)
    reference = make_fid_metric(PoolFeatures())
    reference.update(images, real=True)
    reference.update(images.flip(0)[:5] // 2, real=False)
    fake_features = PoolFeatures()(images.flip(0)[:5] // 2).double()
    ours = fid_from_features(metric, real_fid_state(PoolFeatures()(images).double()), fake_features)
    assert ours == pytest.approx(float(reference.compute()), rel=1e-5)


def test_encoder_features_give_the_frechet_distance_in_that_encoders_space():
    """torchmetrics' FID with EncoderFeatures (uint8 tensors -> PIL -> encode_image) against frechet_distance of the
    encoder's embeddings of the same images."""
    clip = FakeCLIP(block_sizes=(5, 3))
    features = EncoderFeatures(clip)
    assert features.identity == clip.spec
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g)
    fake = (real.flip(0)[:30].float() * 0.6).to(torch.uint8)
    metric = make_fid_metric(features)
    metric.update(real, real=True)
    metric.update(fake, real=False)

    def pil(batch):
        return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in batch]

    expected = frechet_distance(clip.encode_image(pil(real)).double(), clip.encode_image(pil(fake)).double())
    assert expected > 0.1
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="expected uint8 images"):
        features(real.float())


def test_process_shards_split_every_shard_once():
    from shifted_diffusion.eval_shards import process_shards

    parts = [list(process_shards(7, i, 3)) for i in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert list(process_shards(7, 0, 1)) == list(range(7))


def test_dim_mismatch_is_named(prior):
    with pytest.raises(ValueError, match=r"--prior shifted: .*dim 64 .*expects 56"):
        check_prior_fits_decoder("shifted", prior, FakeDecoder(clip_dim=56))


def _evaluator(pairs, prior, out, decoder, **settings):
    settings = EvalSettings(**{**dict(prior_guidance_scales=[1.0, 2.0], guidance_scales=[1.0, 3.0],
                                      prior_num_inference_steps="2", num_inference_steps=1, image_size=16,
                                      shard_size=3), **settings})
    return Evaluator(pairs, {"shifted": prior}, out, settings, decoder=decoder, eval_clip=FakeCLIP(),
                     fid_metric=make_fid_metric(PoolFeatures()), progress=False)


def test_evaluation_numbers_and_resume(tmp_path, eval_folder, prior):
    pairs = sample_pairs(read_captioned_folder(eval_folder), 7, seed=0)
    decoder = FakeDecoder()
    evaluator = _evaluator(pairs, prior, tmp_path / "out", decoder)
    results = evaluator.run()
    assert decoder.calls == 3 * 2 * 2  # 3 shards x 2 prior scales x 2 decoder scales
    entries = results["priors"]["shifted"]
    assert [(e["prior_guidance_scale"], e["guidance_scale"]) for e in entries] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results

    # hand computation of one entry from the images the fake decoder makes for the stored embeddings
    store = evaluator.store
    embeds = torch.cat([store.load(k, m)["embeds"] for k, m, _ in evaluator._embed_jobs("shifted", 2.0, mine=False)])
    assert embeds.shape == (7, 64)
    fake_images = FakeDecoder().generate(embeds, guidance_scale=3.0, num_inference_steps=1, height=16, width=16)
    real_images = [Image.open(p.image).convert("RGB") for p in pairs]
    clip = FakeCLIP()
    generated = clip.encode_image(fake_images)
    entry = entries[3]
    assert entry["clip_image_text"] == pytest.approx(
        float(blockwise_cosine(generated, clip.encode_text([p.caption for p in pairs]), [40, 24])[1].mean()), abs=1e-5)
    assert entry["clip_image_image"] == pytest.approx(
        float(blockwise_cosine(generated, clip.encode_image(real_images), [40, 24])[1].mean()), abs=1e-5)
    fid = frechet_distance(PoolFeatures()(images_to_uint8(real_images, 16)),
                           PoolFeatures()(images_to_uint8(fake_images, 16)))
    assert entry["fid"] == pytest.approx(fid, rel=1e-4, abs=1e-6)
    prior_clip = prior.clip
    own = prior_clip.encode_image(real_images)
    assert entry["prior_cos_image"] == pytest.approx(float(blockwise_cosine(embeds, own, [32, 32])[1].mean()), abs=1e-5)
    unrelated = own[[(i + 3) % 7 for i in range(7)]]
    assert entry["prior_cos_unrelated"] == pytest.approx(
        float(blockwise_cosine(embeds, unrelated, [32, 32])[1].mean()), abs=1e-5)

    # a rerun computes nothing; another decoder scale computes only its own shards
    again = FakeDecoder()
    rerun = _evaluator(pairs, prior, tmp_path / "out", again)
    assert rerun.run() == results and again.calls == 0 and rerun.store.computed == 0
    more = FakeDecoder()
    extended = _evaluator(pairs, prior, tmp_path / "out", more, guidance_scales=[1.0, 3.0, 5.0])
    extended.run()
    assert more.calls == 3 * 2 and extended.store.computed == 3 * 2


def test_prior_only_and_missing_image(tmp_path, eval_folder, prior):
    pairs = read_captioned_folder(eval_folder)
    results = Evaluator(pairs, {"shifted": prior}, tmp_path / "out",
                        EvalSettings(prior_guidance_scales=[1.0], prior_num_inference_steps="2"), progress=False).run()
    (entry,) = results["priors"]["shifted"]
    assert set(entry) == {"prior_guidance_scale", "prior_cos_image", "prior_cos_text", "prior_cos_unrelated"}
    assert all(-1.0 <= entry[k] <= 1.0 for k in entry if k.startswith("prior_cos"))
    with pytest.raises(FileNotFoundError, match="do not exist, e.g. .*nope.png"):
        Evaluator([EvalPair("x", tmp_path / "nope.png")], {"shifted": prior}, tmp_path / "o2", EvalSettings())
    with pytest.raises(ValueError, match="dim 64 .*expects 56"):
        _evaluator(pairs, prior, tmp_path / "o3", FakeDecoder(clip_dim=56))


def test_plots_written(tmp_path):
    from shifted_diffusion.eval_plots import PLOTS, plot_tradeoffs

    entry = dict(prior_guidance_scale=1.0, guidance_scale=3.0, fid=10.0, clip_image_image=0.5, clip_image_text=0.2)
    results = {"priors": {"a": [entry, {**entry, "guidance_scale": 5.0, "fid": 12.0}], "b": [entry]}}
    paths = plot_tradeoffs(results, tmp_path)
    assert sorted(p.name for p in paths) == sorted(PLOTS.values())
    assert all(Image.open(p).size[0] > 100 for p in paths)
    assert plot_tradeoffs({"priors": {"a": [{"prior_guidance_scale": 1.0, "prior_cos_image": 0.3}]}}, tmp_path / "x") == []
    # a Frechet distance in other features is plotted under its own name
    other = {"settings": {"fd_name": "fd_clip"}, "priors": {"a": [{**entry, "fd_clip": entry.pop("fid")}]}}
    assert sorted(p.name for p in plot_tradeoffs(other, tmp_path)) == ["fd_clip_vs_clip_image_image.png",
                                                                       "fd_clip_vs_clip_image_text.png"]


def test_cli_errors_name_the_input(tmp_path, eval_folder, capsys):
    from shifted_diffusion.eval_cli import main

    out = ["--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="--coco_captions .*missing.json: no such file"):
        main(["--prior", f"a={tmp_path}", "--coco_captions", str(tmp_path / "missing.json"),
              "--coco_images", str(eval_folder), *out])
    with pytest.raises(SystemExit, match=r"--prior a=.*nowhere: prior not found"):
        main(["--prior", f"a={tmp_path / 'nowhere'}", "--image_folder", str(eval_folder), *out])
    for argv in (["--prior", "no_equals_sign", "--image_folder", str(eval_folder)],
                 ["--prior", "a=x", "--image_folder", str(eval_folder), "--coco_images", str(eval_folder)],
                 ["--prior", "a=x", "--prior", "a=y", "--image_folder", str(eval_folder)],
                 ["--prior", f"a={tmp_path}", "--image_folder", str(eval_folder), "--fd_clip", "clip"],
                 ["--prior", f"a={tmp_path}", "--image_folder", str(eval_folder), "--toy_attributes"]):
        with pytest.raises(SystemExit) as error:
            main([*argv, *out])
        assert error.value.code == 2
    assert "NAME=PATH" in capsys.readouterr().err


def test_stock_unclip_decoder_end_to_end(tmp_path, eval_folder, prior, tiny_unclip_decoder):
    """The real generate call of a (tiny) Kandinsky 2.2 decoder behind decoder_choice, with the prior's negative."""
    from shifted_diffusion.decoder_choice import decoder_kind, load_unclip

    folder = tiny_unclip_decoder("kandinsky", tmp_path / "kandinsky", 64)
    decoder = load_unclip(str(folder), decoder_kind(str(folder), "test"), "test", "cpu", torch.float32)
    pairs = read_captioned_folder(eval_folder)[:4]
    results = _evaluator(pairs, prior, tmp_path / "out", decoder, prior_guidance_scales=[1.0], guidance_scales=[2.0],
                         image_size=32, shard_size=2, save_images=True).run()
    (entry,) = results["priors"]["shifted"]
    assert np.isfinite(entry["fid"]) and entry["fid"] >= 0
    assert -1 <= entry["clip_image_text"] <= 1 and -1 <= entry["clip_image_image"] <= 1
    written = sorted((tmp_path / "out" / "images" / "shifted" / "pg1_g2").glob("*.png"))
    assert len(written) == 4 and Image.open(written[0]).size == (32, 32)


def test_command_end_to_end(tmp_path, eval_folder, tiny_decoder_clips, tiny_unclip_decoder, tiny_clip_prior):
    """evaluate.py's main on a saved prior folder (its own tiny CLIPs), a tiny Kandinsky 2.2 folder, a caption
    folder: results.json, both plots; a second run resumes without computing anything."""
    from shifted_diffusion.eval_cli import main

    clips = tiny_decoder_clips(tmp_path / "clips")
    tiny_clip_prior(tmp_path / "prior", clips)
    decoder = tiny_unclip_decoder("kandinsky", tmp_path / "kandinsky", 56)
    argv = ["--prior", f"shifted={tmp_path / 'prior'}", "--decoder", str(decoder), "--image_folder", str(eval_folder),
            "--num_captions", "4", "--prior_guidance_scales", "1", "--guidance_scales", "1,2",
            "--prior_num_inference_steps", "2", "--num_inference_steps", "1", "--image_size", "32",
            "--clip_models", *clips, "--device", "cpu", "--output_dir", str(tmp_path / "out")]
    results = main(argv, fid_feature=PoolFeatures())
    assert len(results["priors"]["shifted"]) == 2 and results["settings"]["num_captions"] == 4
    assert (tmp_path / "out" / "fid_vs_clip_image_text.png").is_file()
    assert (tmp_path / "out" / "fid_vs_clip_image_image.png").is_file()
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "shards").rglob("*.safetensors")}
    assert main(argv, fid_feature=PoolFeatures()) == results
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # a prior rewritten at the same path is sampled again
    config_file = tmp_path / "prior" / "model_index.json"
    config_file.write_text(config_file.read_text() + " ")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "shards" / "shifted").rglob("*.safetensors")}
    main(argv, fid_feature=PoolFeatures())
    assert all(p.stat().st_mtime_ns != t for p, t in before.items())
    # a decoder of another dim is refused, naming both
    other = tiny_unclip_decoder("kandinsky", tmp_path / "kandinsky40", 40)
    with pytest.raises(SystemExit, match="dim 56 .*expects 40"):
        main([*argv[:3], str(other), *argv[4:]], fid_feature=PoolFeatures())


def test_inception_weights_file_is_read_without_unpickling(tmp_path):
    from shifted_diffusion.evaluation import check_inception_weights

    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "plain.pth")
    state = check_inception_weights(tmp_path / "plain.pth")  # plain tensors pass
    assert torch.equal(state["conv.weight"], torch.zeros(2, 2))
    torch.save({"conv.weight": torch.zeros(2, 2), "code": PoolFeatures()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="--inception_weights .*pickled.pth: not a plain state dict"):
        check_inception_weights(tmp_path / "pickled.pth")
    with pytest.raises(FileNotFoundError, match="--inception_weights .*missing.pth: no such file"):
        make_fid_metric(2048, tmp_path / "missing.pth")


def test_torch_fidelity_only_gets_a_copy_written_from_the_vetted_tensors(tmp_path, monkeypatch):
    import torchmetrics.image.fid as fid_module

    seen = {}

    class Recorder:
        def __init__(self, feature, reset_real_features, feature_extractor_weights_path):
            seen["path"] = feature_extractor_weights_path
            seen["state"] = torch.load(feature_extractor_weights_path, weights_only=True)  # what it would read

    monkeypatch.setattr(fid_module, "FrechetInceptionDistance", Recorder)
    weights = tmp_path / "inception.pth"
    torch.save({"fc.weight": torch.arange(6.0).reshape(2, 3)}, weights)
    make_fid_metric(2048, weights)
    assert seen["path"] != str(weights) and torch.equal(seen["state"]["fc.weight"], torch.arange(6.0).reshape(2, 3))


def test_results_json_names_paths_relative_to_the_working_directory(tmp_path, monkeypatch):
    from shifted_diffusion.files import write_results_json

    monkeypatch.chdir(tmp_path)
    inside, outside = str((tmp_path / "outputs" / "clip").resolve()), "/elsewhere/clip"
    write_results_json(tmp_path / "r.json", {"clip": [inside, outside], "n": 1.5})
    assert json.loads((tmp_path / "r.json").read_text()) == {"clip": ["outputs/clip", outside], "n": 1.5}
