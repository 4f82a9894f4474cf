"""Shared test settings: one intra-op thread (tiny tensors; avoids oversubscription on small CI machines).

Also the shared fixtures of the encoder / data / cache tests: two tiny random open_clip folders (written with
``encoders.save_open_clip``), a tiny random T5 encoder folder (ByT5 byte tokenizer: no download) and a small
image folder in the Hugging Face ``imagefolder`` convention with ``CAPTION_FOLDER_EXPECTED`` its expected parse.
The tiny decoder pieces (``tiny_sd_pipeline``: a Stable Diffusion folder, ``tiny_decoder_clips``: two tiny
open_clips, ``small_images``: an image folder), tiny stock unCLIP decoders (``tiny_unclip_decoder``: Kandinsky 2.2,
Stable unCLIP, Karlo), a tiny prior folder on those CLIPs (``tiny_clip_prior``) and the tiny prior pipeline with its caption inputs (``tiny_prior_pipeline``,
``prior_captions``), each a builder fixture. And the original prior's network (``reference_prior``:
tests/reference_prior.py, loaded here by path, the only way tests reach it: no test imports another file of tests/).
"""

import functools
import importlib.util
import json
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch


def pytest_configure(config):
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- tiny open_clips

# JSON-native values only: tests compare it with the model_cfg read back from open_clip_config.json
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# a second, different tiny open_clip: other embedding dim (24) and input size (48 px, so its own transform)
TINY_OPEN_CLIP_CFG_2 = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 48, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _save_tiny_open_clip(directory: Path, model_cfg: dict, seed: int) -> Path:
    """A randomly initialised (seeded) open_clip.CLIP saved as a local folder; global RNG left untouched."""
    import open_clip

    from shifted_diffusion.encoders import save_open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**model_cfg)
    return save_open_clip(model.eval(), model_cfg, directory)


@pytest.fixture(scope="session")
def tiny_open_clip_dir(tmp_path_factory) -> Path:
    """Tiny open_clip folder: D = 32, 64 px images, 16-token context, text width 64."""
    return _save_tiny_open_clip(tmp_path_factory.mktemp("tiny_open_clip"), TINY_OPEN_CLIP_CFG, seed=0)


@pytest.fixture(scope="session")
def tiny_open_clip_dir_2(tmp_path_factory) -> Path:
    """A second tiny open_clip folder: D = 24, 48 px images, other weights."""
    return _save_tiny_open_clip(tmp_path_factory.mktemp("tiny_open_clip_2"), TINY_OPEN_CLIP_CFG_2, seed=1)


# ---------------------------------------------------------------------------------------------- tiny T5


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """Tiny random T5 encoder (d_model 32, 2 layers) + ByT5 byte tokenizer, saved with save_pretrained."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    directory = tmp_path_factory.mktemp("tiny_t5")
    tokenizer = ByT5Tokenizer()  # bytes -> ids: needs no vocabulary file
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = T5EncoderModel(config)
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------------- image folder

# What read_image_folder / precompute must find in make_caption_image_folder's folder.
CAPTION_FOLDER_EXPECTED = {
    "num_files": 16,  # every image file, broken.png included
    "num_images": 15,  # readable images (broken.png is skipped by the cache builder)
    "num_captioned": 9,  # img00 01 05 06 07 09 10 11(jpg) sub/img08
    "num_uncaptioned": 6,  # img02 03 04 12 13 14
    "num_captions": 11,  # 1 + 2 + 1 + 1 + 1 + 2 + 1 + 1 + 1, broken.png's caption not counted
    "skipped": ["broken.png"],
}


def _shape_image(index: int, size: tuple, rng: np.random.Generator):
    """An RGB image (w, h) = size: a coloured rectangle on a noisy coloured background."""
    from PIL import Image

    w, h = size
    array = rng.integers(0, 64, size=(h, w, 3), dtype=np.uint8) + rng.integers(0, 192, 3).astype(np.uint8)
    top, left = h // 4 + index % 3, w // 4 + index % 5
    array[top:top + h // 2, left:left + w // 3] = rng.integers(0, 256, 3)
    return Image.fromarray(array)


def make_caption_image_folder(root) -> Path:
    """Write the test image folder under root (HF imagefolder convention) and return it.

    root/metadata.jsonl rows: string captions, a list of captions, extra fields, empty / null / [] captions,
    a caption for the corrupt broken.png; root/sub/metadata.jsonl names sub/img08.png relative to sub/;
    img09.png is captioned by img09.txt (one caption per non-empty line); img14.txt is blank (uncaptioned);
    img00.txt is ignored because metadata.jsonl captions img00.png; img02 and img13 appear nowhere.
    """
    root = Path(root)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = [(40, 40), (48, 32), (32, 56), (64, 64), (36, 44)]
    names = [f"img{i:02d}.png" for i in range(15) if i not in (8, 11)] + ["img11.jpg", "sub/img08.png"]
    for i, name in enumerate(sorted(names)):
        image = _shape_image(i, sizes[i % len(sizes)], rng)
        image.save(root / name, quality=95) if name.endswith(".jpg") else image.save(root / name)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a valid png file")

    rows = [
        {"file_name": "img00.png", "text": "a red circle"},
        {"file_name": "img01.png", "text": ["a blue square", "a square"]},
        {"file_name": "img03.png", "text": ""},
        {"file_name": "img04.png", "text": []},
        {"file_name": "img05.png", "text": "a yellow star"},
        {"file_name": "img06.png", "text": ["two orange dots", "  "]},
        {"file_name": "img07.png", "text": "a red square", "color": "red", "count": 3},
        {"file_name": "img10.png", "text": "a white cross"},
        {"file_name": "img11.jpg", "text": "a jpeg circle"},
        {"file_name": "img12.png", "text": None},
        {"file_name": "broken.png", "text": "a broken image"},
    ]
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (root / "sub" / "metadata.jsonl").write_text(
        json.dumps({"color": "purple", "file_name": "img08.png", "text": "in a subfolder", "count": 4}) + "\n\n",
        encoding="utf-8")
    (root / "img09.txt").write_text("green triangle\n\n  small green triangle  \n", encoding="utf-8")
    (root / "img14.txt").write_text("\n   \n", encoding="utf-8")
    (root / "img00.txt").write_text("a caption that metadata.jsonl overrides\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def caption_image_folder(tmp_path_factory) -> Path:
    """The image folder of make_caption_image_folder (read-only for tests)."""
    return make_caption_image_folder(tmp_path_factory.mktemp("caption_images"))


# ---------------------------------------------------------------------------------------------- older prior folders


def write_legacy_prior(directory, prior, shift, schedule_config, encoders, null_clip_text, null_text_tokens,
                       extra=None):
    """A prior folder in the format train.py wrote before the diffusers pipeline ("shifted-diffusion-prior/1"):
    config.json, model.safetensors, vocab.safetensors (not for the baseline), null_embeddings.safetensors."""
    from safetensors.torch import save_file

    from shifted_diffusion.vocab import ClusterVocab

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in prior.state_dict().items()},
              str(directory / "model.safetensors"))
    if isinstance(shift, ClusterVocab):
        shift.save(directory / "vocab.safetensors")
    save_file({"null_clip_text": null_clip_text.float().cpu().contiguous(),
               "null_text_tokens": null_text_tokens.float().cpu().contiguous()},
              str(directory / "null_embeddings.safetensors"))
    config = {"format": "shifted-diffusion-prior/1", "prior": prior.arch.to_dict(), "schedule": schedule_config.to_dict(),
              "encoders": encoders, "baseline": not isinstance(shift, ClusterVocab), **(extra or {})}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


@pytest.fixture
def legacy_prior_writer():
    return write_legacy_prior


# ---------------------------------------------------------------------------------------------- reference prior

REFERENCE_PRIOR_FILE = Path(__file__).resolve().with_name("reference_prior.py")


@functools.lru_cache(maxsize=None)
def _reference_prior_module():
    """tests/reference_prior.py as a module (by path: it is a file of the tests, not of the package)."""
    spec = importlib.util.spec_from_file_location("_reference_prior", REFERENCE_PRIOR_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def reference_prior():
    """Builder of the original ClipPrior network (real x_transformers 0.28.4 trunk) for a PriorConfig:
    ``reference_prior(config, seed=0)`` has every parameter randomised from ``seed`` and is in eval mode;
    ``seed=None`` keeps the default initialisation (e.g. on the meta device). Skips without x_transformers."""
    pytest.importorskip("x_transformers")
    module = _reference_prior_module()

    def build(config, seed: Optional[int] = 0):
        ref = module.ReferenceClipPrior.from_config(config)
        if seed is None:
            return ref
        return module.randomize_(ref, torch.Generator().manual_seed(seed)).eval()

    return build


# ---------------------------------------------------------------------------------------------- tiny decoders

def build_tiny_sd(directory, prediction_type="epsilon", with_text_encoder=True, resolution=32):
    """A complete tiny StableDiffusionPipeline folder (UNet resolution / 2 latents, VAE factor 2, DDIM, tiny text
    encoder), saved with save_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=resolution // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, sample_size=resolution)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    text_encoder = None
    if with_text_encoder:  # a "stock" folder: the text encoder is present but must never be needed
        from transformers import CLIPTextConfig, CLIPTextModel

        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=24, intermediate_size=32, num_attention_heads=2,
                                                    num_hidden_layers=1, vocab_size=100, max_position_embeddings=16,
                                                    projection_dim=24))
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(directory)
    return Path(directory)


TINY_DECODER_CLIP_CFGS = (  # two different tiny open_clips: D = 32 + 24 = 56
    {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
     "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}},
    {"embed_dim": 24, "vision_cfg": {"image_size": 48, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
     "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}},
)


def build_tiny_clips(root) -> list[str]:
    """Two tiny random open_clip folders written with encoders.save_open_clip (loadable by MultiCLIP)."""
    import open_clip

    from shifted_diffusion.encoders import save_open_clip

    folders = []
    for i, cfg in enumerate(TINY_DECODER_CLIP_CFGS):
        torch.manual_seed(i)
        folders.append(str(save_open_clip(open_clip.CLIP(**cfg), cfg, Path(root) / f"clip{i}")))
    return folders


def make_small_images(directory, count=10, seed=0):
    """Small RGB images of a coloured rectangle on a coloured background, some with (ignored) captions."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        array = np.zeros((36 + 2 * (i % 3), 40, 3), np.uint8)
        array[...] = rng.integers(0, 256, 3)
        array[8:24, 10:30] = rng.integers(0, 256, 3)
        Image.fromarray(array).save(directory / f"img{i:02d}.png")
        if i % 2:
            (directory / f"img{i:02d}.txt").write_text("a caption that the decoder ignores")
    return directory


@pytest.fixture(scope="session")
def tiny_sd_pipeline():
    """Builder of a tiny StableDiffusionPipeline folder: ``tiny_sd_pipeline(directory, prediction_type="epsilon",
    with_text_encoder=True, resolution=32) -> directory`` (the decoder trainer's "pretrained" model)."""
    return build_tiny_sd


def save_tiny_clip_prior(directory, clips) -> Path:
    """A random tiny shifted prior folder (prior_pipeline.save_prior) on two tiny CLIPs of build_tiny_clips
    (D = 56; word-level text: the first CLIP's 16-wide token states)."""
    from shifted_diffusion.prior import PriorConfig, ShiftedPrior
    from shifted_diffusion.prior_pipeline import save_prior
    from shifted_diffusion.schedule import ScheduleConfig
    from shifted_diffusion.vocab import ClusterVocab

    torch.manual_seed(0)
    config = PriorConfig.preset("tiny", clip_dim=56, text_dim=16, text_len=8, vocab_size=4)
    encoders = {"clip_models": list(clips), "t5_model": f"clip-tokens:{clips[0]}", "text_max_length": 8}
    save_prior(directory, ShiftedPrior.from_prior_config(config),
               ClusterVocab(torch.randn(4, 56), torch.rand(4, 56) + 0.1), ScheduleConfig(), encoders,
               torch.randn(56), torch.randn(8, 16))
    return Path(directory)


@pytest.fixture(scope="session")
def tiny_clip_prior():
    """Writer of a random tiny prior on tiny_decoder_clips' CLIPs: ``tiny_clip_prior(directory, clips)``."""
    return save_tiny_clip_prior


@pytest.fixture(scope="session")
def tiny_decoder_clips():
    """Builder of two tiny open_clip folders (D = 32 + 24 = 56): ``tiny_decoder_clips(root) -> [folder, folder]``."""
    return build_tiny_clips


@pytest.fixture(scope="session")
def small_images():
    """Writer of small RGB images (some with ignored captions): ``small_images(directory, count=10, seed=0)``."""
    return make_small_images


# ---------------------------------------------------------------------------------------------- tiny unCLIP decoders

def _tokenizer(folder):
    """A CLIPTokenizer from a 54-token vocabulary written to disk (letters, bos / eos), 77 positions."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: len(vocab) for c in letters})
    vocab.update({c + "</w>": len(vocab) for c in letters})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                         pad_token="<|endoftext|>")


def build_clip_tokenizer(folder, model_max_length=77):
    """A CLIPTokenizer of 54 distinct tokens (bos 0, eos / pad 1, each letter, each letter ending a word), so
    different captions give different ids; vocab.json / merges.txt written to ``folder``."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length,
                         pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_clip_tokenizer():
    """Builder of a tiny offline CLIPTokenizer (54 distinct tokens, ids < 54; it survives save_pretrained):
    ``tiny_clip_tokenizer(folder, model_max_length=77)``."""
    return build_clip_tokenizer


def _text_config(hidden_size, projection_dim):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden_size,
                          projection_dim=projection_dim,
                          intermediate_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=60)


def _image_encoder(projection_dim):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, projection_dim=projection_dim, num_hidden_layers=1, num_attention_heads=2, image_size=8,
        intermediate_size=16, patch_size=4))


def _save_kandinsky(path, dim):
    """A tiny KandinskyV22Pipeline (image_proj UNet with learned variance, spatial-norm VQ movq, DDPM)."""
    from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=8, addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(8, 16), layers_per_block=1,
        encoder_hid_dim=dim, encoder_hid_dim_type="image_proj", cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=4, resnet_time_scale_shift="scale_shift", class_embed_type=None)
    movq = VQModel(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                   up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], in_channels=3, out_channels=3,
                   latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                   num_vq_embeddings=12, vq_embed_dim=4)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False)
    KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq).save_pretrained(path)


def _save_stable_unclip(path, dim, scratch):
    """A tiny StableUnCLIPImg2ImgPipeline (projection class embedding of 2 x D, normaliser, VAE, CLIP text)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline,
                           UNet2DConditionModel)
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), norm_num_groups=4, cross_attention_dim=16, class_embed_type="projection",
        projection_class_embeddings_input_dim=2 * dim, use_linear_projection=True)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1)
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=dim)
    with torch.no_grad():  # non-trivial statistics: the pipeline must standardise and restore
        normalizer.mean.copy_(torch.randn(1, dim))
        normalizer.std.copy_(torch.rand(1, dim) + 0.5)
    StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=8, size=8), image_encoder=_image_encoder(dim),
        image_normalizer=normalizer, image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=_tokenizer(scratch), text_encoder=CLIPTextModel(_text_config(16, dim)), unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1),
        vae=vae,
    ).save_pretrained(path)


def _save_karlo(path, dim, scratch, size):
    """A tiny UnCLIPImageVariationPipeline (16 px decoder with learned variance, 32 px super-resolution)."""
    from diffusers import UNet2DConditionModel, UNet2DModel, UnCLIPImageVariationPipeline, UnCLIPScheduler
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPImageProcessor, CLIPTextModelWithProjection

    torch.manual_seed(0)
    decoder = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=6, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=4, resnet_time_scale_shift="scale_shift", class_embed_type="identity")
    text_proj = UnCLIPTextProjModel(clip_embeddings_dim=dim, time_embed_dim=32, cross_attention_dim=16)

    def super_res():
        return UNet2DModel(sample_size=size, in_channels=6, out_channels=3, block_out_channels=(8, 16),
                           layers_per_block=1, norm_num_groups=4,
                           down_block_types=("ResnetDownsampleBlock2D",) * 2,
                           up_block_types=("ResnetUpsampleBlock2D",) * 2)

    UnCLIPImageVariationPipeline(
        decoder=decoder, text_encoder=CLIPTextModelWithProjection(_text_config(dim, dim)),
        tokenizer=_tokenizer(scratch), text_proj=text_proj, feature_extractor=CLIPImageProcessor(crop_size=8, size=8),
        image_encoder=_image_encoder(dim), super_res_first=super_res(), super_res_last=super_res(),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"),
    ).save_pretrained(path)


def save_tiny_unclip_decoder(kind: str, path, dim: int, size: int = 32) -> Path:
    """A tiny stock unCLIP decoder pipeline folder taking image embeddings of ``dim``: kind "kandinsky"
    (KandinskyV22Pipeline, 16 x 16 latents -> 32 px), "stable_unclip" (StableUnCLIPImg2ImgPipeline) or "karlo"
    (UnCLIPImageVariationPipeline, ``size`` px super-resolution). No download."""
    path = Path(path)
    scratch = path.parent / f"{path.name}_tokenizer_files"
    scratch.mkdir(parents=True, exist_ok=True)
    if kind == "kandinsky":
        _save_kandinsky(path, dim)
    elif kind == "stable_unclip":
        _save_stable_unclip(path, dim, scratch)
    elif kind == "karlo":
        _save_karlo(path, dim, scratch, size)
    else:
        raise ValueError(f"kind: expected kandinsky, stable_unclip or karlo, got {kind!r}")
    return path


@pytest.fixture(scope="session")
def tiny_unclip_decoder():
    """Builder of a tiny unCLIP decoder folder: ``tiny_unclip_decoder(kind, path, dim, size=32) -> path``."""
    return save_tiny_unclip_decoder


# ---------------------------------------------------------------------------------------------- tiny prior pipelines

TINY_PRIOR_VOCAB_SIZE = 5


class TinyPriorPipelines:
    """Builder of a random tiny ShiftedDiffusionPriorPipeline (the "tiny" preset, 5 clusters, std_scale 2, seeded):
    ``tiny_prior_pipeline(**build_pipeline_kwargs)``; ``.config`` (PriorConfig), ``.encoders`` (its encoders config).
    ``clip_dim`` builds one of another embedding dim (e.g. a decoder's)."""

    encoders = {"clip_models": ["x"], "t5_model": "none"}

    @property
    def config(self):
        from shifted_diffusion.prior import PriorConfig

        return PriorConfig.preset("tiny", vocab_size=TINY_PRIOR_VOCAB_SIZE)

    def __call__(self, clip_dim: Optional[int] = None, **kwargs):
        import dataclasses

        from shifted_diffusion.prior import ShiftedPrior
        from shifted_diffusion.prior_pipeline import build_pipeline
        from shifted_diffusion.schedule import ScheduleConfig
        from shifted_diffusion.vocab import ClusterVocab

        config = self.config if clip_dim is None else dataclasses.replace(self.config, clip_dim=clip_dim)
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        k = TINY_PRIOR_VOCAB_SIZE
        vocab = ClusterVocab(torch.randn(k, config.clip_dim, generator=g),
                             torch.rand(k, config.clip_dim, generator=g) + 0.1, std_scale=2.0)
        null_clip = torch.randn(config.clip_dim, generator=g)
        null_tokens = torch.randn(config.text_len, config.text_dim, generator=g)
        return build_pipeline(ShiftedPrior.from_prior_config(config), vocab, ScheduleConfig(), self.encoders, null_clip,
                              null_tokens, **kwargs)


@pytest.fixture(scope="session")
def tiny_prior_pipeline():
    """TinyPriorPipelines(): ``tiny_prior_pipeline(**kwargs)`` builds the pipeline; ``.config``, ``.encoders``."""
    return TinyPriorPipelines()


def make_prior_captions(n: int = 4, seed: int = 2, config=None):
    """Random caption inputs of the tiny prior: (clip_text (n, D), text_tokens (n, L, E))."""
    config = config or TinyPriorPipelines().config
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, config.clip_dim, generator=g),
            torch.randn(n, config.text_len, config.text_dim, generator=g))


@pytest.fixture(scope="session")
def prior_captions():
    """``prior_captions(n=4, seed=2)``: random (clip_text, text_tokens) inputs of ``tiny_prior_pipeline()``."""
    return make_prior_captions
