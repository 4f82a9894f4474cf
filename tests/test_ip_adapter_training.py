"""Training the text + image decoder (finetune.py --decoder_type text_and_image) on tiny random models: finite
loss, only the adapter changes while the UNet is frozen, a folder stock diffusers loads, exact resume; and the
text-only decoder (--decoder_type text) it can be built on."""

import json

import pytest
import torch
from safetensors.torch import load_file

from shifted_diffusion import ip_adapter
from shifted_diffusion.decoder_training import DecoderTrainConfig, parse_decoder_config, train_decoder
from shifted_diffusion.ip_adapter_training import condition_masks

RESOLUTION = 32


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd_pipeline, tiny_decoder_clips, small_images, tiny_clip_tokenizer):
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("ip_train")
    small_images(root / "images", count=6)
    base = tiny_sd_pipeline(root / "base", resolution=RESOLUTION)
    (root / "tok").mkdir()
    StableDiffusionPipeline.from_pretrained(
        base, tokenizer=tiny_clip_tokenizer(root / "tok", model_max_length=16), safety_checker=None,
        requires_safety_checker=False).save_pretrained(root / "sd")
    return {"sd": root / "sd", "base": base, "images": root / "images", "clips": tiny_decoder_clips(root)}


def _args(world, out, *extra):
    return ["--decoder_type", "text_and_image", "--pretrained_model_name_or_path", str(world["sd"]),
            "--train_data_dir", str(world["images"]), "--clip_models", *world["clips"], "--resolution",
            str(RESOLUTION), "--center_crop", "--train_batch_size", "2", "--learning_rate", "1e-2",
            "--lr_warmup_steps", "0", "--num_validation_images", "0", "--report_to", "none",
            "--text_dropout_prob", "0.3", "--image_dropout_prob", "0.3", "--both_dropout_prob", "0.2",
            "--output_dir", str(out), *extra]


def test_condition_masks_bands():
    g = torch.Generator().manual_seed(0)
    text, image = condition_masks(20000, generator=g, device="cpu", text_prob=0.1, image_prob=0.2, both_prob=0.3)
    assert abs((text & ~image).float().mean() - 0.1) < 0.02
    assert abs((image & ~text).float().mean() - 0.2) < 0.02
    assert abs((text & image).float().mean() - 0.3) < 0.02


def test_bad_dropout_sum_is_a_usage_error():
    with pytest.raises(SystemExit):
        parse_decoder_config(["--train_data_dir", "x", "--text_dropout_prob", "0.6", "--image_dropout_prob", "0.6"])
    with pytest.raises(SystemExit):
        parse_decoder_config(["--train_data_dir", "x", "--decoder_type", "txt"])


def test_train_adapter_only_output_folder_and_resume(world, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = train_decoder(parse_decoder_config(_args(world, tmp_path / "run", "--max_train_steps", "3",
                                                   "--checkpointing_steps", "2")))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 3 and torch.isfinite(torch.tensor(summary["last_train_loss"]))
    assert json.loads((out / "shifted_decoder.json").read_text())["decoder_type"] == "text_and_image"

    # the UNet is frozen: saved UNet == pretrained UNet; the adapter moved away from its initialisation
    before = UNet2DConditionModel.from_pretrained(world["sd"], subfolder="unet").state_dict()
    after = UNet2DConditionModel.from_pretrained(out, subfolder="unet").state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    trained = load_file(str(out / ip_adapter.ADAPTER_WEIGHT_NAME))
    init = ip_adapter.init_adapter_state(UNet2DConditionModel.from_pretrained(world["sd"], subfolder="unet"), 56,
                                         generator=torch.Generator().manual_seed(0))
    assert trained.keys() == init.keys()
    assert all(not torch.equal(trained[k], init[k]) for k in ("image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight",
                                                              "ip_adapter.7.to_v_ip.weight"))

    # stock diffusers loads the folder and the adapter and generates
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    pipe.load_ip_adapter(str(out), subfolder="", weight_name=ip_adapter.ADAPTER_WEIGHT_NAME, image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a cat", ip_adapter_image_embeds=ip_adapter.pipeline_image_embeds(torch.randn(1, 56), True),
                  num_inference_steps=2, height=32, width=32, output_type="np").images
    assert images.shape == (1, 32, 32, 3)

    # the checkpoint of a frozen UNet holds the adapter's weights (every one), not the UNet's
    saved = load_file(str(out / "checkpoint-2" / "ip_adapter.safetensors"))
    assert not (out / "checkpoint-2" / "unet.safetensors").exists()
    assert sum(v.numel() for v in saved.values()) == sum(v.numel() for v in trained.values())
    assert not any(".to_k.weight" in k or "conv" in k for k in saved)

    # resuming from checkpoint-2 ends exactly where the uninterrupted run did
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    train_decoder(parse_decoder_config(_args(world, resumed, "--max_train_steps", "3", "--checkpointing_steps", "2",
                                             "--resume_from_checkpoint", "latest")))
    again = load_file(str(resumed / ip_adapter.ADAPTER_WEIGHT_NAME))
    assert all(torch.equal(again[k], trained[k]) for k in trained)


def test_train_unet_too(world, tmp_path):
    from diffusers import UNet2DConditionModel

    out = train_decoder(parse_decoder_config(_args(world, tmp_path / "run", "--max_train_steps", "1",
                                                   "--train_unet", "--checkpointing_steps", "1")))
    before = UNet2DConditionModel.from_pretrained(world["sd"], subfolder="unet").state_dict()
    after = UNet2DConditionModel.from_pretrained(out, subfolder="unet").state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "checkpoint-1" / "unet.safetensors").is_file()  # a trained UNet is checkpointed whole


def test_gradient_checkpointing_with_frozen_unet_still_trains_every_adapter_layer(world, tmp_path):
    out = train_decoder(parse_decoder_config(_args(world, tmp_path / "run", "--max_train_steps", "1",
                                                   "--gradient_checkpointing")))
    from diffusers import UNet2DConditionModel

    init = ip_adapter.init_adapter_state(UNet2DConditionModel.from_pretrained(world["sd"], subfolder="unet"), 56,
                                         generator=torch.Generator().manual_seed(0))
    trained = load_file(str(out / ip_adapter.ADAPTER_WEIGHT_NAME))
    unchanged = [k for k in init if torch.equal(init[k], trained[k])]
    assert unchanged == []


def test_a_pretrained_folder_without_tokenizer_is_a_clear_error(world, tmp_path):
    args = _args(world, tmp_path / "run", "--max_train_steps", "1")
    args[args.index(str(world["sd"]))] = str(world["base"])  # the tiny SD folder has no tokenizer
    with pytest.raises(SystemExit):  # a usage error of the command line, before any work
        parse_decoder_config(args)
    with pytest.raises(ValueError, match="needs the tokenizer and text_encoder"):
        train_decoder(DecoderTrainConfig(**{**parse_decoder_config(_args(world, tmp_path)).to_dict(),
                                            "pretrained_model_name_or_path": str(world["base"])}))


def test_validation_grid_shows_embedding_caption_and_both(world, tmp_path):
    """Validation of the text+image decoder: one row per held-out image, [image | embedding | embedding + caption |
    caption (image scale 0)]; the image branch changes the picture."""
    import numpy as np
    from PIL import Image

    out = train_decoder(parse_decoder_config(_args(world, tmp_path / "run", "--max_train_steps", "2",
                                                   "--num_validation_images", "2", "--validation_steps", "2",
                                                   "--validation_num_inference_steps", "2")))
    with Image.open(out / "validation" / "step-0000002.png") as grid:
        assert grid.size == (4 * RESOLUTION, 2 * RESOLUTION)
        pixels = np.asarray(grid.convert("RGB"), dtype=np.float64)
    cell = [pixels[:RESOLUTION, j * RESOLUTION:(j + 1) * RESOLUTION] for j in range(4)]
    assert np.abs(cell[2] - cell[3]).mean() > 0.5  # embedding + caption vs caption alone
    assert json.loads((out / "train_summary.json").read_text())["num_train_images"] == 4  # 6 - 2 held out


def test_text_only_training_writes_a_stock_model_the_adapter_then_extends(world, tmp_path):
    """--decoder_type text trains the whole UNet on captions (no CLIP, no adapter), resumes exactly and writes a
    stock pipeline folder; a text_and_image run from that folder keeps its UNet and adds the adapter."""
    import shutil

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    def text_args(out, *extra):
        args = _args(world, out, "--max_train_steps", "3", "--checkpointing_steps", "2", *extra)
        args[args.index("text_and_image")] = "text"
        return args

    out = train_decoder(parse_decoder_config(text_args(tmp_path / "text", "--num_validation_images", "2",
                                                       "--validation_steps", "3",
                                                       "--validation_num_inference_steps", "2")))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["decoder_type"] == "text" and summary["global_step"] == 3 and summary["num_train_images"] == 4
    assert not (out / "shifted_decoder.json").exists() and not (out / ip_adapter.ADAPTER_WEIGHT_NAME).exists()
    assert (out / "checkpoint-2" / "unet.safetensors").is_file()
    from PIL import Image

    with Image.open(out / "validation" / "step-0000003.png") as grid:
        assert grid.size == (2 * RESOLUTION, 2 * RESOLUTION)  # image | its caption, one row per held-out image
    before = UNet2DConditionModel.from_pretrained(world["sd"], subfolder="unet").state_dict()
    text_unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet").state_dict()
    assert sum(not torch.equal(before[k], text_unet[k]) for k in before) > len(before) // 2

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np").images.shape == (1, 32, 32, 3)
    from shifted_diffusion.decoder import load_decoder

    with pytest.raises(FileNotFoundError, match="stock text-to-image pipeline.*--decoder_type text_and_image"):
        load_decoder(out)  # not an embedding decoder: the error says what it is and where it goes

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    train_decoder(parse_decoder_config(text_args(resumed, "--num_validation_images", "2", "--validation_steps", "3",
                                                 "--validation_num_inference_steps", "2",
                                                 "--resume_from_checkpoint", "latest")))
    again = UNet2DConditionModel.from_pretrained(resumed, subfolder="unet").state_dict()
    assert all(torch.equal(again[k], text_unet[k]) for k in text_unet)

    args = _args(world, tmp_path / "adapter", "--max_train_steps", "1", "--checkpointing_steps", "1")
    args[args.index(str(world["sd"]))] = str(out)
    adapter = train_decoder(parse_decoder_config(args))
    after = UNet2DConditionModel.from_pretrained(adapter, subfolder="unet").state_dict()
    assert all(torch.equal(after[k], text_unet[k]) for k in text_unet)
    assert json.loads((adapter / "shifted_decoder.json").read_text())["decoder_type"] == "text_and_image"
