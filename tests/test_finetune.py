"""Decoder training (shifted_diffusion.decoder_training, what finetune.py runs) on tiny random SD components
(saved + reloaded through from_pretrained) and tiny open_clips: checkpoints, exact resume (UNet + projection +
EMA + optimizer), the output folder, the shared epoch order and loss log, the config, bad inputs."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from shifted_diffusion import decoder_data, decoder_training, image_to_image
from shifted_diffusion.checkpoints import list_checkpoints
from shifted_diffusion.decoder_training import DecoderTrainConfig, parse_decoder_config, train_decoder

ROOT = Path(__file__).resolve().parents[1]

RESOLUTION = 32


def run(argv):
    """What `python finetune.py ARGV` does."""
    return train_decoder(parse_decoder_config(argv))


# ---------------------------------------------------------------------------------------------- builders


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd_pipeline, tiny_decoder_clips, small_images):
    root = tmp_path_factory.mktemp("finetune_world")
    small_images(root / "images")
    (root / "images" / "broken.png").write_bytes(b"not a png")
    return {
        "sd": tiny_sd_pipeline(root / "sd", resolution=RESOLUTION),
        "images": root / "images",  # 10 images + one corrupt file (reported and left out)
        "clips": tiny_decoder_clips(root),
        "root": root,
    }


def base_args(world, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", str(world["sd"]), "--train_data_dir", str(world["images"]),
        "--clip_models", *world["clips"], "--resolution", str(RESOLUTION), "--center_crop", "--random_flip",
        "--train_batch_size", "2", "--gradient_checkpointing", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0",
        "--num_validation_images", "2", "--report_to", "none", "--output_dir", str(output_dir), *extra,
    ]


def _trainer_state(checkpoint):
    """optimizer / lr_scheduler / ema state of a checkpoint, read without any pickle."""
    from shifted_diffusion.checkpoints import join_state, read_state

    return join_state(read_state(checkpoint)["state"], load_file(str(Path(checkpoint) / "state.safetensors")))


def _ema_state(checkpoint):
    return _trainer_state(checkpoint)["ema"]


def _assert_same_safetensors(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


# ---------------------------------------------------------------------------------------------- tests


def test_finetune_checkpoint_resume_and_output_folder(world, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from shifted_diffusion.decoder import load_decoder
    from shifted_diffusion.projection import ImageEmbeddingProjection

    run_a = tmp_path / "a"
    run(base_args(world, run_a, "--use_ema", "--max_train_steps", "3", "--checkpointing_steps", "1",
                            "--checkpoints_total_limit", "2", "--validation_steps", "2",
                            "--validation_num_inference_steps", "2"))
    summary = json.loads((run_a / "train_summary.json").read_text())
    print(f"\n[tiny finetune] {summary['cpu_s_per_step']:.3f} CPU s/step, {summary['wall_s_per_step']:.3f} wall s/step")
    assert summary["global_step"] == 3 and np.isfinite(summary["last_train_loss"]) and summary["last_train_loss"] > 0
    assert summary["num_train_images"] == 8 and summary["num_unreadable_images"] == 1  # 10 - 2 held out
    assert [p.name for p in list_checkpoints(run_a)] == ["checkpoint-2", "checkpoint-3"]  # limit 2
    with Image.open(run_a / "validation" / "step-0000002.png") as grid:
        assert grid.size == (2 * RESOLUTION, 2 * RESOLUTION)  # 2 held-out images x [original | reconstruction]

    ckpt2, ckpt3 = run_a / "checkpoint-2", run_a / "checkpoint-3"
    unet2, unet3 = load_file(str(ckpt2 / "unet.safetensors")), load_file(str(ckpt3 / "unet.safetensors"))
    assert any(not torch.equal(unet2[k], unet3[k]) for k in unet2), "step 3 did not change the UNet"
    proj3 = load_file(str(ckpt3 / "projection.safetensors"))
    ema3 = _ema_state(ckpt3)
    assert ema3["optimization_step"] == 3
    raw = list(unet3.values()) + list(proj3.values())
    assert len(ema3["shadow_params"]) == len(raw)
    assert any(not torch.equal(s, r) for s, r in zip(ema3["shadow_params"], raw)), "EMA equals raw weights"

    # resume from checkpoint-2 ("latest" of a fresh output folder) -> step 3 must be bit-identical
    run_b = tmp_path / "b"
    run_b.mkdir()
    shutil.copytree(ckpt2, run_b / "checkpoint-2")
    run(base_args(world, run_b, "--use_ema", "--max_train_steps", "3", "--checkpointing_steps", "1",
                            "--resume_from_checkpoint", "latest", "--validation_steps", "0"))
    assert json.loads((run_b / "train_summary.json").read_text())["steps_this_run"] == 1
    _assert_same_safetensors(ckpt3 / "unet.safetensors", run_b / "checkpoint-3" / "unet.safetensors")
    _assert_same_safetensors(ckpt3 / "projection.safetensors", run_b / "checkpoint-3" / "projection.safetensors")
    ema_b = _ema_state(run_b / "checkpoint-3")
    assert ema_b["optimization_step"] == 3
    for s_a, s_b in zip(ema3["shadow_params"], ema_b["shadow_params"]):
        assert torch.equal(s_a, s_b)
    opt_a = _trainer_state(ckpt3)["optimizer"]["state"]
    opt_b = _trainer_state(run_b / "checkpoint-3")["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)

    # the output folder: standard pipeline (no text encoder) + projection, carrying the EMA weights
    index = json.loads((run_a / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["unet"][1] == "UNet2DConditionModel"
    pipeline = StableDiffusionPipeline.from_pretrained(run_a, text_encoder=None, tokenizer=None)
    unet_final = UNet2DConditionModel.from_pretrained(run_a, subfolder="unet")
    projection = ImageEmbeddingProjection.from_pretrained(run_a / "image_projection")
    final = list(unet_final.parameters()) + list(projection.parameters())
    for shadow, param in zip(ema3["shadow_params"], final):
        assert torch.equal(shadow, param.detach())
    assert pipeline.unet.config.cross_attention_dim == projection.config.cross_attention_dim == 24
    decoder = load_decoder(run_a)
    assert decoder.clip_dim == 32 + 24 and decoder.clip_specs == [(c, "") for c in world["clips"]]

    # image-to-image from the fine-tuned folder, requested size
    out = tmp_path / "recon"
    written = image_to_image.main(["--decoder", str(run_a), "--images", str(world["images"] / "img00.png"),
                            str(world["images"] / "img01.png"), "--output_dir", str(out),
                            "--num_inference_steps", "2", "--height", "40", "--width", "24"])
    assert sorted(p.name for p in written) == ["re_img00.png", "re_img01.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.size == (24, 40)


def test_prediction_target_matches_closed_form():
    from diffusers import DDPMScheduler

    latents, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    timesteps = torch.tensor([0, 500, 999])
    eps_scheduler = DDPMScheduler(prediction_type="epsilon")
    assert torch.equal(decoder_training.prediction_target(eps_scheduler, latents, noise, timesteps), noise)
    v_scheduler = DDPMScheduler(prediction_type="v_prediction")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # DDPMScheduler's default "linear"
    alphas_cumprod = torch.cumprod(1 - betas, 0)[timesteps].float()[:, None, None, None]
    expected = alphas_cumprod.sqrt() * noise - (1 - alphas_cumprod).sqrt() * latents
    torch.testing.assert_close(decoder_training.prediction_target(v_scheduler, latents, noise, timesteps), expected,
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="sample"):
        decoder_training.prediction_target(DDPMScheduler(prediction_type="sample"), latents, noise, timesteps)


def test_condition_dropout_replaces_embedding(world):
    """dropout 1 -> the loss ignores the batch's embeddings (uses the empty one); dropout 0 -> it depends on them."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from shifted_diffusion.projection import ImageEmbeddingProjection

    unet = UNet2DConditionModel.from_pretrained(world["sd"], subfolder="unet")
    vae = AutoencoderKL.from_pretrained(world["sd"], subfolder="vae")
    scheduler = DDPMScheduler.from_pretrained(world["sd"], subfolder="scheduler")
    projection = ImageEmbeddingProjection(clip_dim=8, cross_attention_dim=24)
    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION) * 2 - 1
    empty = torch.randn(8)

    def loss(embeds, prob):
        batch = {"pixel_values": pixels, "image_embeds": embeds}
        with torch.no_grad():
            return decoder_training.diffusion_loss(unet, projection, vae, scheduler, batch, empty,
                                           generator=torch.Generator().manual_seed(0), dropout_prob=prob,
                                           random_flip=True, weight_dtype=torch.float32)

    first, second = torch.randn(2, 8), torch.randn(2, 8)
    assert loss(first, 1.0) == loss(second, 1.0) == loss(empty.expand(2, 8), 0.0)
    assert loss(first, 0.0) != loss(second, 0.0)


def test_embedding_cache_reused_when_it_matches(world, tmp_path, small_images):
    from shifted_diffusion import cache
    from shifted_diffusion.data import read_image_folder
    from shifted_diffusion.encoders import MultiCLIP, NoTextEncoder

    clip = MultiCLIP([(c, "") for c in world["clips"]], device="cpu", dtype=torch.float32)
    with pytest.warns(UserWarning, match="broken.png"):
        cache.precompute(world["images"], tmp_path / "cache", clip, NoTextEncoder(), progress=False,
                         clip_dtype=torch.float32)
    paths = [r.path for r in read_image_folder(world["images"])][::-1][:5]  # another order, a subset
    cached, readable = decoder_data.cached_image_embeddings(tmp_path / "cache", clip, paths)
    direct = clip.encode_image([Image.open(p).convert("RGB") for p in paths])
    assert bool(readable.all())
    torch.testing.assert_close(cached, direct, rtol=1e-4, atol=1e-5)
    with_broken, readable = decoder_data.cached_image_embeddings(tmp_path / "cache", clip,
                                                             [world["images"] / "broken.png"] + paths)
    assert readable.tolist() == [False] + [True] * 5 and torch.equal(with_broken[1:], cached)
    other_clip = MultiCLIP([(world["clips"][0], "")], device="cpu", dtype=torch.float32)
    assert decoder_data.cached_image_embeddings(tmp_path / "cache", other_clip, paths) is None
    stranger = small_images(tmp_path / "other", count=1, seed=3) / "img00.png"
    assert decoder_data.cached_image_embeddings(tmp_path / "cache", clip, paths + [stranger]) is None


def test_epoch_order_is_a_function_of_seed_and_epoch_sharded_disjointly():
    """Both trainers' data order (training.epoch_batches): a permutation fixed by (seed, epoch) alone,
    split over the processes without overlap, full batches only, the same number on every process."""
    from shifted_diffusion.training import epoch_batches, epoch_order

    first = epoch_order(10, seed=3, epoch=0)
    assert sorted(first.tolist()) == list(range(10))
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(epoch_order(10, seed=3, epoch=0), first)
    assert not torch.equal(epoch_order(10, seed=3, epoch=1), first)
    assert not torch.equal(epoch_order(10, seed=4, epoch=0), first)
    shards = [epoch_batches(23, 2, seed=5, epoch=2, rank=r, world=3) for r in range(3)]
    assert [len(b) for b in shards] == [3, 3, 3]  # 23 // (3 x 2) = 3 full batches each, 5 items left out
    taken = [i for shard in shards for batch in shard for i in batch.tolist()]
    assert all(len(batch) == 2 for shard in shards for batch in shard)
    assert len(taken) == len(set(taken)) == 18  # disjoint
    assert taken != sorted(taken)
    order = epoch_order(23, seed=5, epoch=2)[:18].tolist()
    assert sorted(taken) == sorted(order)  # the first 18 of the epoch's permutation
    assert [b.tolist() for b in epoch_batches(23, 2, seed=5, epoch=2, rank=1, world=3)] == \
        [b.tolist() for b in shards[1]]


def test_epoch_loader_resumes_mid_epoch_at_the_same_batch():
    from shifted_diffusion.training import epoch_loader

    dataset = list(range(9))  # 4 batches of 2 per epoch
    def batches(micro_step, count):
        out = []
        while len(out) < count:
            loader = epoch_loader(dataset, micro_step + len(out), batch_size=2, seed=1, rank=0, world=1)
            out += [b.tolist() for b in loader][: count - len(out)]
        return out

    straight = batches(0, 10)  # across epochs 0, 1, 2
    assert batches(6, 4) == straight[6:]
    assert straight[:4] != straight[4:8]  # each epoch its own order
    assert sorted(sum(straight[4:8], [])) != list(range(8))  # and not the first 8 items in order


def test_training_images_ignore_malformed_captions(tmp_path, small_images):
    folder = small_images(tmp_path / "imgs", count=2)
    (folder / "metadata.jsonl").write_text('{"file_name": "img00.png", "caption": "no text column"}\n')
    assert [p.name for p in decoder_data.list_training_images(str(folder))] == ["img00.png", "img01.png"]


def test_empty_folder_is_a_clear_error(world, tmp_path):
    (tmp_path / "empty").mkdir()
    args = base_args(world, tmp_path / "out", "--max_train_steps", "1")
    args[args.index("--train_data_dir") + 1] = str(tmp_path / "empty")
    with pytest.raises(SystemExit, match="holds no images"):
        run(args)


def test_empty_embedding_dim_mismatch_names_both_dims(world, tmp_path):
    from shifted_diffusion.decoder import save_embedding

    save_embedding(tmp_path / "empty.safetensors", torch.zeros(10))
    args = base_args(world, tmp_path / "out", "--max_train_steps", "1", "--empty_embedding",
                     str(tmp_path / "empty.safetensors"))
    with pytest.raises(ValueError, match=r"dim 10 \(--empty_embedding .*clip_dim=56"):
        run(args)


def test_pretrained_projection_dim_mismatch_names_both_dims(world, tmp_path):
    from shifted_diffusion.projection import ImageEmbeddingProjection

    base = tmp_path / "continued"
    shutil.copytree(world["sd"], base)
    ImageEmbeddingProjection(clip_dim=7, cross_attention_dim=24).save_pretrained(base / "image_projection")
    args = base_args(world, tmp_path / "out", "--max_train_steps", "1")
    args[args.index("--pretrained_model_name_or_path") + 1] = str(base)
    with pytest.raises(ValueError, match=r"dim 56 \(--clip_models.*clip_dim=7"):
        run(args)


def test_config_presets_parse_and_flags_override(tmp_path):
    for preset in sorted((ROOT / "configs").glob("finetune_*.yaml")):
        args = parse_decoder_config(["--config", str(preset), "--train_data_dir", "x", "--no-use_ema",
                                     "--resolution", "256"])
        assert args.use_ema is False and args.center_crop is True and args.resolution == 256
        if "toy" not in preset.name:  # the toy world's preset takes the toy CLIP on the command line
            assert args.clip_specs == [("ViT-B-16", "openai"), ("ViT-B-32", "openai"), ("RN101", "openai")]
    (tmp_path / "bad.yaml").write_text("learning_rat: 1.0\n")
    with pytest.raises(SystemExit):
        parse_decoder_config(["--config", str(tmp_path / "bad.yaml"), "--train_data_dir", "x"])
    with pytest.raises(SystemExit):
        parse_decoder_config([])  # no --train_data_dir


def test_decoder_config_yaml_then_flags_and_real_booleans(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("learning_rate: 0.5\nuse_ema: true\nclip_models: [a:b, c]\nmax_train_steps: null\n"
                      "logging_steps: 7\n")
    later = tmp_path / "q.yaml"
    later.write_text("logging_steps: 3\nvalidation_images: [v1.png]\n")
    cfg = parse_decoder_config(["--config", str(preset), "--config", str(later), "--train_data_dir", "x",
                                "--learning_rate", "0.1", "--no-use_ema", "--center_crop"])
    assert (cfg.learning_rate, cfg.use_ema, cfg.center_crop, cfg.logging_steps) == (0.1, False, True, 3)
    assert cfg.clip_models == ("a:b", "c") and cfg.clip_specs == [("a", "b"), ("c", "")]
    assert cfg.max_train_steps is None and cfg.validation_images == ("v1.png",)
    assert parse_decoder_config(["--train_data_dir", "x"]) == DecoderTrainConfig(train_data_dir="x")
    assert DecoderTrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # the saved form round-trips
    with pytest.raises(ValueError, match="unknown training setting.*lerning_rate.*finetune.py --help"):
        DecoderTrainConfig.from_dict({"lerning_rate": 1.0})
    with pytest.raises(ValueError, match="--logging_steps: expected an integer >= 1"):
        DecoderTrainConfig(logging_steps=0)


def test_numbers_yaml_reads_as_strings_and_a_saved_config_as_preset(tmp_path):
    """PyYAML reads 1e-4 and 1e-08 (no dot) as strings; a preset with them, and a run's saved train_config.json
    given back as --config, parse to the same numbers."""
    preset = tmp_path / "p.yaml"
    preset.write_text("learning_rate: 1e-4\nadam_epsilon: 1e-08\nlogging_steps: '7'\n")
    cfg = parse_decoder_config(["--config", str(preset), "--train_data_dir", "x"])
    assert (cfg.learning_rate, cfg.adam_epsilon, cfg.logging_steps) == (1e-4, 1e-8, 7)
    saved = tmp_path / "train_config.json"
    cfg.save(saved)
    assert '1e-08' in saved.read_text()  # what json writes, and what YAML then reads as a string
    again = parse_decoder_config(["--config", str(saved), "--train_unet"])
    assert again == dataclasses.replace(cfg, train_unet=True)
    preset.write_text("learning_rate: 1e-4x\n")
    with pytest.raises(SystemExit):
        parse_decoder_config(["--config", str(preset), "--train_data_dir", "x"])
    with pytest.raises(ValueError, match=r"--logging_steps: expected an integer, got '1.5'"):
        DecoderTrainConfig.from_dict({"train_data_dir": "x", "logging_steps": "1.5"})


def test_logged_loss_is_the_mean_over_each_accumulation_window(world, tmp_path, monkeypatch):
    """Each logged train/loss is the mean of the micro-batch losses of that optimizer step's accumulation window,
    summed on the device and read only every --logging_steps (and at the last step)."""
    from accelerate import Accelerator

    micro_losses, logged, original_loss, original_log = [], [], decoder_training.diffusion_loss, Accelerator.log

    def spy_loss(*a, **k):
        loss = original_loss(*a, **k)
        micro_losses.append(loss.item())
        return loss

    def spy_log(self, values, step=None, **k):
        if "train/loss" in values:
            logged.append((step, values["train/loss"]))
        return original_log(self, values, step=step, **k)

    monkeypatch.setattr(decoder_training, "diffusion_loss", spy_loss)
    monkeypatch.setattr(Accelerator, "log", spy_log)

    run(base_args(world, tmp_path / "log", "--max_train_steps", "5", "--gradient_accumulation_steps", "2",
                  "--logging_steps", "2", "--validation_steps", "0", "--checkpointing_steps", "0"))
    assert len(micro_losses) == 10 and len({round(v, 6) for v in micro_losses}) > 1
    assert [step for step, _ in logged] == [2, 4, 5]
    for step, value in logged:
        window = micro_losses[2 * step - 2: 2 * step]
        assert value == pytest.approx(sum(window) / 2, rel=1e-5)
    summary = json.loads((tmp_path / "log" / "train_summary.json").read_text())
    assert summary["last_train_loss"] == pytest.approx(logged[-1][1])


def test_loss_is_read_only_at_logging_and_checkpoint_steps(world, tmp_path, monkeypatch):
    """No host sync per micro-step: the accumulated loss reaches the host (one gather) only at logging steps,
    checkpoint steps and the last step."""
    from shifted_diffusion import training

    reads, original = [], training.StepLog.step

    def spy(self, step, lr):
        value = original(self, step, lr)
        reads.append(step) if value is not None else None
        return value

    monkeypatch.setattr(training.StepLog, "step", spy)
    run(base_args(world, tmp_path / "reads", "--max_train_steps", "7", "--logging_steps", "3",
                  "--checkpointing_steps", "5", "--validation_steps", "0"))
    assert reads == [3, 5, 6, 7]


def test_one_state_file_and_the_resolved_config_in_checkpoints_and_output(world, tmp_path):
    """Both trainers write checkpoints through checkpoints.save_checkpoint: one state file, train_state.json,
    holding the resolved config, which is also in the output folder."""
    from shifted_diffusion.checkpoints import STATE_NAME, read_state

    out = tmp_path / "cfg"
    run(base_args(world, out, "--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_steps", "0",
                  "--num_tokens", "3"))
    checkpoint = out / "checkpoint-2"
    assert STATE_NAME == "train_state.json" and sorted(p.name for p in checkpoint.glob("*.json")) == [STATE_NAME]
    assert not list(checkpoint.glob("*.pkl")) and not list(checkpoint.glob("*.bin"))
    saved = read_state(checkpoint)["config"]
    assert saved["num_tokens"] == 3 and saved["clip_models"] == world["clips"] and saved["max_train_steps"] == 2
    assert json.loads((out / decoder_training.CONFIG_NAME).read_text()) == saved
    assert DecoderTrainConfig.from_dict(saved).num_tokens == 3


def test_v_prediction_base_trains_and_keeps_its_prediction_type(world, tmp_path, tiny_sd_pipeline):
    """An SD2-768-style base (v_prediction) trains on the v target and the output keeps prediction_type."""
    base = tiny_sd_pipeline(tmp_path / "sd_v", prediction_type="v_prediction", with_text_encoder=False,
                            resolution=RESOLUTION)
    args = base_args(world, tmp_path / "out", "--max_train_steps", "1", "--validation_steps", "0",
                     "--checkpointing_steps", "0", "--no-random_flip", "--no-projection_layer_norm")
    args[args.index("--pretrained_model_name_or_path") + 1] = str(base)
    out = run(args)
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert json.loads((out / "image_projection" / "config.json").read_text())["layer_norm"] is False
    assert np.isfinite(json.loads((out / "train_summary.json").read_text())["last_train_loss"])


@pytest.mark.parametrize("flag,value,message", [
    ("--max_train_steps", "0", "--max_train_steps: expected an integer >= 1"),
    ("--checkpointing_steps", "-1", "--checkpointing_steps: expected an integer >= 0"),
    ("--train_batch_size", "0", "--train_batch_size: expected an integer >= 1"),
    ("--gradient_accumulation_steps", "0", "--gradient_accumulation_steps: expected an integer >= 1"),
    ("--learning_rate", "0", "--learning_rate: expected a finite number > 0.0"),
    ("--ema_decay", "2", r"--ema_decay: expected a finite number in \[0.0, 1.0\]"),
    ("--validation_guidance_scale", "nan", "--validation_guidance_scale: expected a finite number >= 0.0"),
    ("--lr_scheduler", "cosin", "--lr_scheduler: expected one of"),
    ("--resolution", "36", "--resolution: expected a multiple of 8"),
])
def test_flags_are_checked_before_any_work(world, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        run(base_args(world, tmp_path / "out", flag, value))
    assert exit_info.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_pickle_checkpoint_is_refused_before_any_work(world, tmp_path, capsys):
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    folder = tmp_path / "old" / "checkpoint-2"
    folder.mkdir(parents=True)
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "model.safetensors"):
        (folder / name).write_bytes(pickle.dumps(Payload()))
    with pytest.raises(SystemExit):
        run(base_args(world, tmp_path / "out", "--resume_from_checkpoint", str(folder)))
    assert "unpickling can run code" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_non_finite_loss_stops_the_run_naming_the_step(world, tmp_path, monkeypatch):
    calls, original = [], decoder_training.diffusion_loss

    def poisoned(*a, **k):
        calls.append(1)
        loss = original(*a, **k)
        return loss * float("nan") if len(calls) >= 2 else loss

    monkeypatch.setattr(decoder_training, "diffusion_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="step 2: the training loss is nan"):
        run(base_args(world, out, "--max_train_steps", "3", "--checkpointing_steps", "1",
                                "--validation_steps", "0"))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"] and not (out / "model_index.json").exists()


def test_embedding_cache_not_reused_after_images_or_clip_weights_change(world, tmp_path, caplog):
    import logging
    import shutil

    import open_clip

    from shifted_diffusion import cache
    from shifted_diffusion.encoders import MultiCLIP, NoTextEncoder, save_open_clip

    images = Path(shutil.copytree(world["images"], tmp_path / "images"))
    clip_dir = Path(shutil.copytree(world["clips"][0], tmp_path / "clip0"))
    clip = MultiCLIP([(str(clip_dir), "")], device="cpu", dtype=torch.float32)
    with pytest.warns(UserWarning, match="broken.png"):
        cache.precompute(images, tmp_path / "cache", clip, NoTextEncoder(), progress=False, clip_dtype=torch.float32)
    paths = decoder_data.list_training_images(str(images))
    assert decoder_data.cached_image_embeddings(tmp_path / "cache", clip, paths) is not None

    Image.new("RGB", (40, 36), (9, 200, 90)).save(images / "img03.png")  # edited after the cache was built
    with caplog.at_level(logging.WARNING, logger="shifted_diffusion.decoder_data"):
        assert decoder_data.cached_image_embeddings(tmp_path / "cache", clip, paths) is None
    assert "img03.png changed since the cache was built" in caplog.text

    torch.manual_seed(7)  # retrained in place: same folder, same config, other weights
    model_cfg = json.loads((clip_dir / "open_clip_config.json").read_text())["model_cfg"]
    save_open_clip(open_clip.CLIP(**model_cfg), model_cfg, clip_dir)
    retrained = MultiCLIP([(str(clip_dir), "")], device="cpu", dtype=torch.float32)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shifted_diffusion.decoder_data"):
        assert decoder_data.cached_image_embeddings(tmp_path / "cache", retrained, paths[:1]) is None
    assert "other encoder weights" in caplog.text and "open_clip_model.safetensors" in caplog.text


def test_sixteen_bit_training_image_is_scaled_not_whitened(tmp_path):
    values = np.repeat(np.linspace(0, 65535, RESOLUTION).round().astype(np.uint16)[None], RESOLUTION, axis=0)
    Image.fromarray(values).save(tmp_path / "g16.png")
    pixels = decoder_data.load_training_image(tmp_path / "g16.png", RESOLUTION, center_crop=True)  # same size: no resize
    expected = torch.from_numpy(np.floor(values / 257.0 + 0.5)).float() / 127.5 - 1.0  # round(v / 257) in [-1, 1]
    for channel in range(3):
        torch.testing.assert_close(pixels[channel], expected)


def test_own_embeddings_file_is_recomputed_after_an_image_changes(world, tmp_path, monkeypatch):
    """The embeddings finetune.py saves in --output_dir are reused only for the very same image files."""
    images = tmp_path / "images"
    shutil.copytree(world["images"], images)
    calls, original = [], decoder_data.compute_image_embeddings

    def spy(clip, paths, *a, **k):
        calls.append(len(paths))
        return original(clip, paths, *a, **k)

    monkeypatch.setattr(decoder_data, "compute_image_embeddings", spy)
    args = base_args(world, tmp_path / "out", "--max_train_steps", "1", "--checkpointing_steps", "0",
                     "--validation_steps", "0", "--num_validation_images", "0")
    args[args.index("--train_data_dir") + 1] = str(images)
    run(args)
    run(args)
    assert calls == [11]  # 10 images + the corrupt one; the second run reused the file
    with Image.open(images / "img03.png") as image:
        edited = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    edited.save(images / "img03.png")
    run(args)
    assert calls == [11, 11]


def test_tar_shards_train_exactly_as_the_unpacked_folder(world, tmp_path):
    """--train_data_dir as a webdataset shard pattern: the same images in the same order give the same weights;
    the corrupt member is left out as broken.png is."""
    import io
    import tarfile

    files = sorted(p for p in world["images"].iterdir() if p.is_file())  # broken.png, img00.png, img00.txt, ...
    keys = sorted({p.stem for p in files})
    shards = tmp_path / "shards"
    shards.mkdir()
    for index, chunk_keys in enumerate((keys[:5], keys[5:])):
        chunk = [p for p in files if p.stem in chunk_keys]
        with tarfile.open(shards / f"{index:05d}.tar", "w") as archive:
            for path in chunk:
                data = path.read_bytes()
                info = tarfile.TarInfo(path.name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    extra = ("--max_train_steps", "2", "--validation_steps", "0", "--checkpointing_steps", "0")
    from_folder = run(base_args(world, tmp_path / "folder", *extra))
    args = base_args(world, tmp_path / "tars", *extra)
    args[args.index("--train_data_dir") + 1] = str(shards / "{00000..00001}.tar")
    from_tars = run(args)
    for weights in sorted(from_folder.rglob("*.safetensors")):
        _assert_same_safetensors(weights, from_tars / weights.relative_to(from_folder))
    summaries = [{k: v for k, v in json.loads((out / "train_summary.json").read_text()).items()
                  if not k.endswith("_per_step")} for out in (from_folder, from_tars)]
    assert summaries[0] == summaries[1] and summaries[1]["num_train_images"] == 8


@pytest.mark.slow
def test_two_process_ddp_decoder_training_checkpoints_once_and_resumes_exactly(world, tmp_path):
    """finetune.py in 2 CPU processes (torchrun + ACCELERATE_USE_CPU: gloo DDP): the loss log falls, each
    checkpoint is written once, validation on the main process does not stall the other, a resumed DDP run reaches
    the weights (EMA included) of an uninterrupted one, and they differ from one process's run."""
    import os
    import subprocess
    import sys

    from shifted_diffusion.training import read_loss_log

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    common = ("--use_ema", "--checkpointing_steps", "3", "--logging_steps", "1", "--validation_steps", "3",
              "--validation_num_inference_steps", "2", "--lr_scheduler", "constant")

    def launch(out, *extra):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                   str(ROOT / "finetune.py"), *base_args(world, out, *common, *extra)]
        child = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert child.returncode == 0, child.stderr[-4000:]

    launch(tmp_path / "a", "--max_train_steps", "6")
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["checkpoint-3", "checkpoint-6"]
    assert not list((tmp_path / "a").glob(".checkpoint-*"))  # no half-written or duplicate saves left behind
    assert sorted(p.name for p in (tmp_path / "a" / "validation").iterdir()) == ["step-0000003.png",
                                                                                 "step-0000006.png"]
    losses = [line["loss"] for line in read_loss_log(tmp_path / "a" / "logs" / "loss.jsonl")]
    assert len(losses) == 6 and sum(losses[3:]) < sum(losses[:3]), losses  # 1.09 1.08 0.94 | 0.90 0.87 0.91
    summary = json.loads((tmp_path / "a" / "train_summary.json").read_text())
    assert summary["global_step"] == 6 and summary["num_train_images"] == 8

    launch(tmp_path / "b", "--max_train_steps", "3")
    launch(tmp_path / "b", "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert [line["step"] for line in read_loss_log(tmp_path / "b" / "logs" / "loss.jsonl")] == [1, 2, 3, 4, 5, 6]
    for name in ("unet", "projection"):
        a = load_file(str(tmp_path / "a" / "checkpoint-6" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "b" / "checkpoint-6" / f"{name}.safetensors"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    for shadow_a, shadow_b in zip(_ema_state(tmp_path / "a" / "checkpoint-6")["shadow_params"],
                                  _ema_state(tmp_path / "b" / "checkpoint-6")["shadow_params"]):
        torch.testing.assert_close(shadow_a, shadow_b, rtol=0, atol=1e-6)

    single = run(base_args(world, tmp_path / "c", *common, "--max_train_steps", "6"))
    a, c = (load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors")) for out in (tmp_path / "a", single))
    assert any(not torch.allclose(a[k], c[k]) for k in a)  # two processes saw twice the data: other weights
