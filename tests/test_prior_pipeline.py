"""PriorPipeline.sample: the caption's cluster drives the shift (not the cluster nearest x0_hat, the
original's defect), guidance's unconditional branch, save/load round trip (on conftest.py's tiny_prior_pipeline)."""

import json

import pytest
import torch

import shifted_diffusion.prior_pipeline as prior_pipeline
from shifted_diffusion.prior import PriorConfig, ShiftedPrior
from shifted_diffusion.prior_pipeline import build_pipeline, load_prior, save_prior
from shifted_diffusion.sampling import sample_ddim
from shifted_diffusion.schedule import DiffusionSchedule, ScheduleConfig
from shifted_diffusion.vocab import ClusterVocab

# the tiny pipeline and its caption inputs: conftest.py's tiny_prior_pipeline / prior_captions fixtures


def test_shift_is_the_captions_cluster(monkeypatch, tiny_prior_pipeline, prior_captions):
    pipe = tiny_prior_pipeline()
    seen = {}

    def spy(denoiser, schedule, shift_mean, shift_std, **kwargs):
        seen.update(shift_mean=shift_mean, shift_std=shift_std, steps=schedule.num_steps)
        return shift_mean

    monkeypatch.setattr(prior_pipeline, "sample_ancestral", spy)
    clip_text, tokens = prior_captions()
    pipe.sample(clip_text, tokens, num_images_per_prompt=3, num_inference_steps=8)
    # independent: nearest mean by cosine, computed here; then std_scale * s_k
    cos = torch.nn.functional.normalize(clip_text, dim=-1) @ torch.nn.functional.normalize(pipe.vocabulary.means, dim=-1).T
    k = cos.argmax(1).repeat_interleave(3)
    torch.testing.assert_close(seen["shift_mean"], pipe.vocabulary.means[k])
    torch.testing.assert_close(seen["shift_std"], 2.0 * pipe.vocabulary.stds[k])
    assert seen["steps"] == 8


def test_guidance_unconditional_branch_follows_the_saved_rule(monkeypatch, tiny_prior_pipeline, prior_captions):
    """The unconditional inputs come from the pipeline's UnconditionalInputs component, and its rule is saved."""
    calls = {}
    original = prior_pipeline.guided_denoiser

    def spy(prior, *args, **kwargs):
        calls.update(kwargs)
        return original(prior, *args, **kwargs)

    monkeypatch.setattr(prior_pipeline, "guided_denoiser", spy)
    clip_text, tokens = prior_captions(2)
    pipe = tiny_prior_pipeline()
    pipe.sample(clip_text, tokens, num_inference_steps=2, guidance_scale=3.0)
    assert calls["guidance_scale"] == 3.0 and calls["null_clip_text_emb"] is None  # tokens dropped, CLIP kept
    assert torch.equal(calls["null_text_tokens"], pipe.unconditional.null_text_tokens)
    dropping = tiny_prior_pipeline(uncond_clip_text="empty_caption")
    dropping.sample(clip_text, tokens, num_inference_steps=2, guidance_scale=3.0)
    assert torch.equal(calls["null_clip_text_emb"], dropping.unconditional.null_clip_text)


def test_clip_only_prior_cannot_guide_without_dropping_clip(tiny_prior_pipeline):
    config = PriorConfig.preset("tiny", text_len=0, vocab_size=None)
    from shifted_diffusion.vocab import StandardNormalShift

    def build(rule):
        return build_pipeline(ShiftedPrior.from_prior_config(config), StandardNormalShift(config.clip_dim), ScheduleConfig(),
                              tiny_prior_pipeline.encoders, torch.zeros(config.clip_dim), torch.zeros(0, config.text_dim), uncond_clip_text=rule)

    clip_text = torch.randn(2, config.clip_dim)
    with pytest.raises(ValueError, match="unconditional branch"):
        build("prompt").sample(clip_text, torch.zeros(2, 0, config.text_dim), num_inference_steps=2, guidance_scale=2.0)
    out = build("empty_caption").sample(clip_text, torch.zeros(2, 0, config.text_dim), num_inference_steps=2,
                                        guidance_scale=2.0)
    assert out.shape == (2, 64)


@pytest.mark.parametrize("loader", ["pipeline", "diffusion_pipeline", "load_prior"])
def test_save_pretrained_round_trip_samples_identically(tmp_path, loader, tiny_prior_pipeline, prior_captions):
    """save_pretrained writes model_index.json + one folder per component (safetensors); the pipeline's own
    from_pretrained, diffusers' DiffusionPipeline.from_pretrained and load_prior all sample bit-identically."""
    from diffusers import DiffusionPipeline

    from shifted_diffusion import ShiftedDiffusionPriorPipeline

    pipe = tiny_prior_pipeline(uncond_clip_text="empty_caption")
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == "ShiftedDiffusionPriorPipeline" and index["encoders"] == tiny_prior_pipeline.encoders
    assert {k: index[k][1] for k in ("prior", "vocabulary", "scheduler", "unconditional")} == {
        "prior": "ShiftedPrior", "vocabulary": "ClusterVocab", "scheduler": "ShiftedDiffusionScheduler",
        "unconditional": "UnconditionalInputs"}
    assert not list((tmp_path / "p").rglob("*.bin")) and not list((tmp_path / "p").rglob("*.pkl"))
    load = {"pipeline": ShiftedDiffusionPriorPipeline.from_pretrained, "diffusion_pipeline": DiffusionPipeline.from_pretrained,
            "load_prior": load_prior}[loader]
    loaded = load(tmp_path / "p")
    assert type(loaded) is ShiftedDiffusionPriorPipeline and loaded.unconditional.config.clip_text == "empty_caption"
    clip_text, tokens = prior_captions(2)
    a = pipe.sample(clip_text, tokens, num_inference_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    b = loaded.sample(clip_text, tokens, num_inference_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_older_prior_folder_loads_and_samples_identically(tmp_path, legacy_prior_writer, tiny_prior_pipeline, prior_captions):
    """A folder in the previous format (shifted-diffusion-prior/1) loads through load_prior into the pipeline."""
    pipe = tiny_prior_pipeline()
    legacy_prior_writer(tmp_path / "old", pipe.prior, pipe.vocabulary, ScheduleConfig(), tiny_prior_pipeline.encoders,
                        pipe.unconditional.null_clip_text, pipe.unconditional.null_text_tokens)
    loaded = load_prior(tmp_path / "old")
    clip_text, tokens = prior_captions(2)
    a = pipe.sample(clip_text, tokens, num_inference_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    b = loaded.sample(clip_text, tokens, num_inference_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and loaded.unconditional.config.clip_text == "prompt"


def test_save_prior_writes_the_pipeline_folder_with_the_ema_weights(tmp_path, tiny_prior_pipeline):
    pipe = tiny_prior_pipeline()
    other = {k: torch.randn_like(v) for k, v in pipe.prior.state_dict().items()}
    save_prior(tmp_path / "p", pipe.prior, pipe.vocabulary, ScheduleConfig(), tiny_prior_pipeline.encoders, pipe.unconditional.null_clip_text,
               pipe.unconditional.null_text_tokens, extra={"global_step": 7, "train": {"empty_clip_prob": 0.1}},
               state_dict=other)
    loaded = load_prior(tmp_path / "p")
    for key, value in loaded.prior.state_dict().items():
        assert torch.equal(value, other[key]), key
    assert loaded.config.training["global_step"] == 7 and loaded.unconditional.config.clip_text == "empty_caption"


def test_load_in_bfloat16_samples_float32_close_to_float32(tmp_path, tiny_prior_pipeline, prior_captions):
    pipe = tiny_prior_pipeline()
    pipe.save_pretrained(tmp_path / "p")
    low = load_prior(tmp_path / "p", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in low.prior.parameters())
    assert low.vocabulary.means.dtype == torch.float32
    clip_text, tokens = prior_captions(3)
    a = pipe.sample(clip_text, tokens, num_inference_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    b = low.sample(clip_text, tokens, num_inference_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert b.dtype == torch.float32 and b.shape == a.shape
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert (cos > 0.99).all(), cos
    assert (a - b).abs().max() > 0  # really computed in bf16


def test_ddim_is_finite_where_a_cluster_std_is_zero():
    mean, std = torch.zeros(2, 3), torch.tensor([[1.0, 0.0, 2.0]] * 2)
    out = sample_ddim(lambda x, t: 0.5 * x + 1.0, DiffusionSchedule.from_config(ScheduleConfig()).respace("8"), mean, std,
                      generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- reliability


@pytest.fixture
def saved_prior(legacy_prior_writer, tiny_prior_pipeline):
    """``saved_prior(directory, pipe=None, encoders=None)``: tiny_prior_pipeline() (or ``pipe``) written by the
    legacy_prior_writer fixture (the older folder format, whose files the reliability tests damage) to
    ``directory`` with placeholder encoder settings; returns the folder."""
    def write(directory, pipe=None, encoders=None):
        pipe = pipe or tiny_prior_pipeline()
        return legacy_prior_writer(directory, pipe.prior, pipe.vocabulary, ScheduleConfig(),
                                   encoders or tiny_prior_pipeline.encoders, pipe.unconditional.null_clip_text,
                                   pipe.unconditional.null_text_tokens)

    return write


def _shown(error) -> str:
    """What a traceback of ``error`` prints (its chained exceptions included)."""
    import traceback

    return "".join(traceback.format_exception(error))


def _torch_zip_bytes():
    import io

    buffer = io.BytesIO()
    torch.save({"time_embed.0.weight": torch.randn(4, 4)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name, content, kind", [
    ("image.png", b"\x89PNG\r\n\x1a\n" + bytes(64), "a PNG image"),
    ("notes.txt", b"this is a caption, not weights\n", "a text file"),
    ("prior.pt", b"", "an empty file"),
    ("prior.pt", None, "truncated"),  # the first half of a torch.save zip archive
])
def test_load_prior_of_a_non_checkpoint_file_says_what_it_is(tmp_path, name, content, kind):
    path = tmp_path / name
    data = _torch_zip_bytes()
    path.write_bytes(content if content is not None else data[: len(data) // 2])
    with pytest.raises(ValueError) as info:
        load_prior(path)
    message = str(info.value)
    assert str(path) in message and kind in message
    assert "weights_only" not in _shown(info.value)  # neither in the message nor in a chained exception
    if kind != "truncated":
        assert "prior pipeline folder" in message and "original ClipPrior checkpoint" in message


def test_load_prior_of_a_pickled_module_is_refused_without_unpickling_it(tmp_path, saved_prior):
    path = tmp_path / "prior.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # pickles a class: never unpickled
    with pytest.raises(ValueError, match=r"prior\.pt: .*pickles Python objects \(torch\.nn\.modules\.linear\.Linear\)") as info:
        load_prior(path)
    assert "weights_only" not in _shown(info.value)
    with pytest.raises(ValueError, match="pass the folder"):  # the weights file of a prior folder, not the folder
        load_prior(saved_prior(tmp_path / "p") / "model.safetensors")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name, damage, expected", [
    ("config.json", _truncate, r"config\.json: invalid JSON at line \d+, column \d+: .*truncated"),
    ("config.json", lambda p: p.write_text('{"format": "shifted-diffusion-prior/1", "prior": {}}'),
     r"config\.json: key 'schedule' must be a JSON object"),
    ("model.safetensors", _truncate, r"model\.safetensors: unreadable safetensors file \(the prior's weights\)"),
    ("model.safetensors", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)),
     r"model\.safetensors: expected a safetensors file .* but it is a PNG image"),
    ("vocab.safetensors", _truncate, r"vocab\.safetensors: unreadable vocabulary safetensors file"),
    ("vocab.safetensors", lambda p: p.write_text("hello"), r"vocab\.safetensors: expected a shifted-diffusion vocab"),
    ("null_embeddings.safetensors", _truncate, r"null_embeddings\.safetensors: unreadable safetensors file"),
])
def test_damaged_prior_folder_file_is_named(tmp_path, name, damage, expected, saved_prior):
    folder = saved_prior(tmp_path / "p")
    damage(folder / name)
    with pytest.raises(ValueError, match=expected):
        load_prior(folder)


def test_null_embeddings_of_the_wrong_shape_or_missing_are_named(tmp_path, saved_prior, tiny_prior_pipeline):
    from safetensors.torch import save_file

    config = tiny_prior_pipeline.config
    folder = saved_prior(tmp_path / "p")
    save_file({"null_clip_text": torch.zeros(config.clip_dim + 1), "null_text_tokens": torch.zeros(config.text_len, config.text_dim)},
              str(folder / "null_embeddings.safetensors"))
    with pytest.raises(ValueError, match=rf"null_embeddings\.safetensors: null_clip_text has shape \({config.clip_dim + 1},\)"):
        load_prior(folder)
    save_file({"null_clip_text": torch.zeros(config.clip_dim)}, str(folder / "null_embeddings.safetensors"))
    with pytest.raises(ValueError, match=r"no tensor 'null_text_tokens'"):
        load_prior(folder)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -0.5])
def test_guidance_scale_must_be_finite_and_non_negative(scale, tiny_prior_pipeline, prior_captions):
    clip_text, tokens = prior_captions(2)
    with pytest.raises(ValueError, match=r"guidance_scale: expected a finite number >= 0.0, got " + str(scale)):
        tiny_prior_pipeline().sample(clip_text, tokens, num_inference_steps=2, guidance_scale=scale)


def test_overflowing_guidance_is_refused_with_the_stage_and_cause(tiny_prior_pipeline, prior_captions):
    clip_text, tokens = prior_captions(2)
    pipe = tiny_prior_pipeline()
    with pytest.raises(FloatingPointError, match=r"prior's sampled image embeddings: \d+ of 128 .*guidance_scale=1e\+30"):
        pipe.sample(clip_text, tokens, num_inference_steps=4, guidance_scale=1e30)
    # a scale of 0 (unconditional) is allowed and equals sampling with the null caption at scale 1
    a = pipe.sample(clip_text, tokens, num_inference_steps=4, guidance_scale=0.0, generator=torch.Generator().manual_seed(0))
    null = pipe.unconditional.null_text_tokens.expand(2, -1, -1)
    b = pipe.sample(clip_text, null, num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def test_non_finite_samples_are_counted(monkeypatch, tiny_prior_pipeline, prior_captions):
    def broken(denoiser, schedule, shift_mean, shift_std, **kwargs):
        out = shift_mean.clone()
        out[1, 3] = float("nan")
        out[0, 0] = float("inf")
        return out

    monkeypatch.setattr(prior_pipeline, "sample_ancestral", broken)
    clip_text, tokens = prior_captions(3)
    with pytest.raises(FloatingPointError, match=r"2 of 192 values are NaN or inf \(shape \(3, 64\)\).*weights"):
        tiny_prior_pipeline().sample(clip_text, tokens, num_inference_steps=2)


def test_vocabulary_size_must_match_the_prior(tmp_path, saved_prior, tiny_prior_pipeline):
    from shifted_diffusion import ShiftedDiffusionPriorPipeline

    config = tiny_prior_pipeline.config
    g = torch.Generator().manual_seed(0)
    vocab = ClusterVocab(torch.randn(6, config.clip_dim, generator=g), torch.rand(6, config.clip_dim, generator=g) + 0.1)
    pipe = tiny_prior_pipeline()
    with pytest.raises(ValueError, match="the vocabulary has 6 clusters but the prior's vocab_size is 5"):
        ShiftedDiffusionPriorPipeline(pipe.prior, vocab, pipe.scheduler, pipe.unconditional)
    pipe.save_pretrained(tmp_path / "new")
    vocab.save_pretrained(tmp_path / "new" / "vocabulary")  # a vocabulary trained with another prior
    with pytest.raises(ValueError, match="6 clusters but the prior's vocab_size is 5"):
        load_prior(tmp_path / "new")
    folder = saved_prior(tmp_path / "p", pipe)
    vocab.save(folder / "vocab.safetensors")  # the older folder: both files named
    with pytest.raises(ValueError, match=r"6 clusters but the prior's vocab_size is 5.*vocab\.safetensors vs \"prior\" in .*config\.json"):
        load_prior(folder)
    from shifted_diffusion.vocab import StandardNormalShift

    with pytest.raises(ValueError, match="cluster token .*vocab_size 5.*no cluster vocabulary"):
        ShiftedDiffusionPriorPipeline(pipe.prior, StandardNormalShift(config.clip_dim), pipe.scheduler, pipe.unconditional)


def test_encoder_hub_names_are_stored_unchanged(tmp_path, monkeypatch, tiny_prior_pipeline):
    monkeypatch.chdir(tmp_path)
    encoders = {"clip_models": ["ViT-B-16:openai", "RN101:openai", "hf-hub:org/model"], "t5_model": "t5-11b",
                "text_max_length": 80, "t5_masked": False}
    pipe = tiny_prior_pipeline()
    folder = save_prior("p", pipe.prior, pipe.vocabulary, ScheduleConfig(), encoders, pipe.unconditional.null_clip_text,
                        pipe.unconditional.null_text_tokens)
    assert json.loads((folder / "model_index.json").read_text())["encoders"] == encoders
    assert load_prior(folder).encoders == encoders


@pytest.fixture
def toy_layout(tmp_path, monkeypatch, tiny_open_clip_dir):
    """A run folder as train.py writes it from its working directory: outputs/toy_assets/clip (the tiny CLIP,
    a link), the tiny prior trained with clip_models / t5_model given relative to that working directory."""
    from shifted_diffusion.vocab import StandardNormalShift

    (tmp_path / "outputs" / "toy_assets").mkdir(parents=True)
    (tmp_path / "outputs" / "toy_assets" / "clip").symlink_to(tiny_open_clip_dir, target_is_directory=True)
    config = PriorConfig.preset("tiny", clip_dim=32, text_dim=64, text_len=8, vocab_size=None)
    torch.manual_seed(0)
    prior = ShiftedPrior.from_prior_config(config)
    encoders = {"clip_models": ["outputs/toy_assets/clip"], "t5_model": "clip-tokens:outputs/toy_assets/clip",
                "text_max_length": 8, "t5_masked": False}
    monkeypatch.chdir(tmp_path)
    folder = save_prior("outputs/toy_prior/prior", prior, StandardNormalShift(32), ScheduleConfig(), encoders,
                        torch.randn(32), torch.randn(8, 64))
    (tmp_path / "elsewhere").mkdir()
    return tmp_path, folder.resolve(), encoders


def test_prior_saved_with_relative_encoder_paths_loads_and_samples_from_another_folder(toy_layout, monkeypatch):
    import json

    root, folder, _ = toy_layout
    clip = str((root / "outputs" / "toy_assets" / "clip").resolve())
    stored = json.loads((folder / "model_index.json").read_text())["encoders"]
    assert stored["clip_models"] == [clip] and stored["t5_model"] == "clip-tokens:" + clip
    monkeypatch.chdir(root / "elsewhere")
    pipe = load_prior(folder)
    a = pipe(["a red circle", "a blue square"], num_inference_steps=2, guidance_scale=2.0,
             generator=torch.Generator().manual_seed(0)).image_embeds
    assert a.shape == (2, 32) and torch.isfinite(a).all()
    # the same as sampling on the embeddings of the encoders built here from the absolute path
    from shifted_diffusion.encoders import MultiCLIP, build_text_encoder

    clip_text = MultiCLIP([(clip, "")]).encode_text(["a red circle", "a blue square"])
    tokens = build_text_encoder("clip-tokens:" + clip, max_length=8).encode(["a red circle", "a blue square"])
    b = pipe.sample(clip_text, tokens, num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def test_prior_folder_with_the_old_relative_paths_still_loads(toy_layout, monkeypatch):
    import json

    root, folder, relative = toy_layout
    config = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**config, "encoders": relative}))  # as written before the fix
    clip = str((root / "outputs" / "toy_assets" / "clip").resolve())
    for cwd in (root, root / "elsewhere"):  # from the training folder, and from one the path is not relative to
        monkeypatch.chdir(cwd)
        pipe = load_prior(folder)
        assert pipe.encoders["clip_models"] == [clip] and pipe.encoders["t5_model"] == "clip-tokens:" + clip
    assert pipe(["a red circle"], num_inference_steps=2).image_embeds.shape == (1, 32)


def test_encoder_path_found_nowhere_is_named(toy_layout, monkeypatch):
    import json

    root, folder, _ = toy_layout
    config = json.loads((folder / "model_index.json").read_text())
    gone = str(root / "gone" / "clip")  # e.g. a run folder copied to another machine without its assets
    (folder / "model_index.json").write_text(json.dumps({**config, "encoders": {**config["encoders"], "clip_models": [gone]}}))
    pipe = load_prior(folder)
    with pytest.raises(FileNotFoundError, match=r"encoder settings \(clip_models\) name .*gone/clip, which does not exist"):
        pipe(["a red circle"], num_inference_steps=2)


def test_clamp_std_counts_raw_cluster_stds(monkeypatch, tiny_prior_pipeline, prior_captions):
    """The original clamps x0_hat to mu +- 3 s_k with the raw cluster stds, not std_scale * s_k."""
    seen = {}

    def spy(denoiser, schedule, shift_mean, shift_std, **kwargs):
        seen.update(kwargs, shift_std=shift_std)
        return shift_mean

    monkeypatch.setattr(prior_pipeline, "sample_ancestral", spy)
    pipe = tiny_prior_pipeline()
    clip_text, tokens = prior_captions(3)
    pipe.sample(clip_text, tokens, num_inference_steps=2, clamp_std=3.0)
    k = (torch.nn.functional.normalize(clip_text, dim=-1) @ torch.nn.functional.normalize(pipe.vocabulary.means, dim=-1).T).argmax(1)
    assert seen["clamp_std"] == 3.0
    torch.testing.assert_close(seen["clamp_unit"], pipe.vocabulary.stds[k])  # raw s_k
    torch.testing.assert_close(seen["shift_std"], 2.0 * pipe.vocabulary.stds[k])  # the noise keeps std_scale * s_k


def test_clamp_bounds_x0_hat_by_raw_stds():
    from shifted_diffusion.sampling import sample_ancestral

    schedule = DiffusionSchedule.from_config(ScheduleConfig()).respace("2")
    mean, std, unit = torch.zeros(1, 3), torch.full((1, 3), 5.0), torch.ones(1, 3)
    seen = []
    sample_ancestral(lambda x, t: torch.full_like(x, 100.0), schedule, mean, std, clamp_std=3.0, clamp_unit=unit,
                     callback=lambda i, t, x, x0: seen.append(x0), generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(x0, torch.full((1, 3), 3.0)) for x0 in seen)  # 3 raw stds, not 3 x 5


def test_call_returns_image_and_negative_embeddings(monkeypatch, tiny_prior_pipeline, prior_captions):
    """__call__(prompt, ...) -> image_embeds (B * n, D) and negative_image_embeds, deterministic per seed."""
    pipe = tiny_prior_pipeline()
    clip_text, tokens = prior_captions(2)
    monkeypatch.setattr(pipe, "encode_prompt", lambda prompts: (clip_text[: len(prompts)], tokens[: len(prompts)]))
    out = pipe(["a", "b"], num_images_per_prompt=3, num_inference_steps=2, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(0))
    again = pipe(["a", "b"], num_images_per_prompt=3, num_inference_steps=2, guidance_scale=2.0,
                 generator=torch.Generator().manual_seed(0))
    assert out.image_embeds.shape == out.negative_image_embeds.shape == (6, pipe.clip_dim)
    assert torch.equal(out.image_embeds, again.image_embeds) and torch.equal(out.negative_image_embeds, again.negative_image_embeds)
    direct = pipe.sample(clip_text, tokens, num_images_per_prompt=3, num_inference_steps=2, guidance_scale=2.0,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.image_embeds, direct)
    arrays = pipe("a", num_inference_steps=2, output_type="np", return_dict=False)
    assert arrays[0].shape == (1, pipe.clip_dim) and type(arrays[1]).__name__ == "ndarray"
    with pytest.raises(ValueError, match="negative_prompt: 1 given for 2 prompts"):
        pipe(["a", "b"], negative_prompt=["x"], num_inference_steps=2)


def test_scheduler_steps_reproduce_the_pipeline(tiny_prior_pipeline, prior_captions):
    """A hand-written diffusers-style loop over ShiftedDiffusionScheduler.step equals pipeline.sample."""
    from shifted_diffusion.guidance import guided_denoiser

    pipe = tiny_prior_pipeline()
    clip_text, tokens = prior_captions(2)
    want = pipe.sample(clip_text, tokens, num_inference_steps="ddim4", sampler="ddim", eta=0.5, guidance_scale=2.0,
                       generator=torch.Generator().manual_seed(3))
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, sampler="ddim", eta=0.5)
    scheduler.set_timesteps("ddim4")
    idx = pipe.vocabulary.assign(clip_text)
    mean, std = pipe.vocabulary.shift(idx)
    null_tokens, _ = pipe.unconditional.inputs()
    denoise = guided_denoiser(pipe.prior, tokens, clip_text, idx, guidance_scale=2.0, null_text_tokens=null_tokens)
    g = torch.Generator().manual_seed(3)
    x = scheduler.init_noise(mean, std, generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(denoise(x, t.expand(len(x))), t, x, shift_mean=mean, shift_std=std, generator=g).prev_sample
    assert scheduler.config.sampler == "ddim"
    torch.testing.assert_close(x, want, atol=1e-6, rtol=0)  # the same steps (the pipeline casts its inputs once)
    # add_noise is q(x_t | x0), closed form
    x0, noise, t = torch.randn(2, pipe.clip_dim), torch.randn(2, pipe.clip_dim), torch.tensor([10, 900])
    abar = pipe.scheduler.schedule.alphas_cumprod[t].float()[:, None]
    torch.testing.assert_close(scheduler.add_noise(x0, noise, t, shift_mean=mean, shift_std=std),
                               abar.sqrt() * x0 + (1 - abar.sqrt()) * mean + (1 - abar).sqrt() * std * noise)
    with pytest.raises(ValueError, match="not one of this schedule's"):
        scheduler.step(x, torch.tensor(5), x, shift_mean=mean, shift_std=std)


def test_pipeline_to_and_dtype_keep_the_vocabulary_float32_and_save_refuses_foreign_folders(tmp_path, tiny_prior_pipeline):
    from shifted_diffusion import ShiftedDiffusionPriorPipeline

    pipe = tiny_prior_pipeline()
    pipe.save_pretrained(tmp_path / "p")
    pipe.save_pretrained(tmp_path / "p")  # over an earlier save: allowed
    low = ShiftedDiffusionPriorPipeline.from_pretrained(tmp_path / "p", torch_dtype=torch.bfloat16)
    assert next(low.prior.parameters()).dtype == torch.bfloat16
    assert low.vocabulary.means.dtype == low.unconditional.null_text_tokens.dtype == torch.float32
    pipe.to(torch.bfloat16)  # positional dtype, as DiffusionPipeline.to
    assert next(pipe.prior.parameters()).dtype == torch.bfloat16 and pipe.vocabulary.means.dtype == torch.float32
    pipe.to("cpu", silence_dtype_warnings=True)  # what enable_model_cpu_offload passes
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint-5").mkdir()
    with pytest.raises(FileExistsError, match=r"holds other files \(\['checkpoint-5'\]\)"):
        pipe.save_pretrained(tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint-5").is_dir()
