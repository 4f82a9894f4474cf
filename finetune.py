"""Fine-tune Stable Diffusion into a language-free decoder conditioned on multi-CLIP image embeddings.

The frozen multi-CLIP image embedding x0 (D) of each training image goes through a trained projection
(Linear D -> 4 x cross_attention_dim, optional LayerNorm) to `encoder_hidden_states`; UNet + projection
train on the noise-prediction loss of diffusers' train_text_to_image (epsilon or v target, from the
scheduler's prediction_type). Captions are ignored; the text encoder is never loaded. With probability
--conditioning_dropout_prob the embedding is replaced by the "empty" embedding (default: CLIP of a
black image; or --empty_embedding FILE, e.g. the prior's sample for the empty caption).

    accelerate launch finetune.py --pretrained_model_name_or_path stabilityai/stable-diffusion-2-base \\
        --train_data_dir coco_512/ --use_ema --resolution 512 --center_crop --random_flip \\
        --train_batch_size 16 --gradient_accumulation_steps 4 --gradient_checkpointing \\
        --max_train_steps 30000 --checkpointing_steps 2000 --learning_rate 1e-5 --max_grad_norm 1 \\
        --lr_scheduler constant --lr_warmup_steps 0 --mixed_precision fp16 --output_dir sd2-shifted-decoder

The output folder is a standard diffusers StableDiffusionPipeline folder (text_encoder=None) plus
image_projection/, empty_embedding.safetensors and shifted_decoder.json: load it with
shifted_diffusion.decoder.load_decoder(path).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shifted_diffusion.checkpoints import find_checkpoint, load_checkpoint, read_state, save_checkpoint, step_generator
from shifted_diffusion.checks import check_choice, check_range
from shifted_diffusion.data import list_image_files, open_rgb
from shifted_diffusion.decoder import load_embedding, make_grid, write_decoder_files
from shifted_diffusion.train_config import parse_clip_specs
from shifted_diffusion.projection import PROJECTION_SUBFOLDER, ImageEmbeddingProjection

logger = logging.getLogger("finetune")

DEFAULT_CLIP_MODELS = ["ViT-B-16:openai", "ViT-B-32:openai", "RN101:openai"]
EMBEDDINGS_NAME = "train_image_embeddings.safetensors"


# ----------------------------------------------------------------------------------------------
# arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file of defaults (keys = flag names); flags override")
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", default="stabilityai/stable-diffusion-2-base",
                       help="diffusers Stable Diffusion folder or hub id (its text encoder, if any, is not loaded)")
    model.add_argument("--revision", default=None)
    model.add_argument("--variant", default=None, help="weights variant of the pretrained folder, e.g. fp16")
    model.add_argument("--clip_models", nargs="+", default=DEFAULT_CLIP_MODELS,
                       help="open_clip specs MODEL:PRETRAINED (or a local open_clip folder); embeddings are concatenated")
    model.add_argument("--clip_batch_size", type=int, default=64, help="batch size for the one-off CLIP embedding pass")
    model.add_argument("--num_tokens", type=int, default=4, help="tokens the projection produces per embedding")
    model.add_argument("--projection_layer_norm", action=argparse.BooleanOptionalAction, default=True)
    model.add_argument("--projection_lr_scale", type=float, default=10.0,
                       help="learning rate of the (new) projection = learning_rate x this")
    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", required=False, default=None, help="folder of training images (captions ignored)")
    data.add_argument("--embedding_cache", default=None,
                      help="a cache folder of the prior pipeline (shifted_diffusion.cache) to reuse when it matches")
    data.add_argument("--resolution", type=int, default=512)
    data.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=False)
    data.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=False)
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    data.add_argument("--empty_embedding", default=None,
                      help="file of the 'empty' embedding (D,) used for guidance dropout; default: CLIP of a black image")
    data.add_argument("--conditioning_dropout_prob", type=float, default=0.1)
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="sd-shifted-decoder")
    train.add_argument("--seed", type=int, default=0, help="same on every process and on resume")
    train.add_argument("--train_batch_size", type=int, default=16)
    train.add_argument("--num_train_epochs", type=int, default=100)
    train.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False)
    train.add_argument("--learning_rate", type=float, default=1e-5)
    train.add_argument("--lr_scheduler", default="constant",
                       help="linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup")
    train.add_argument("--lr_warmup_steps", type=int, default=500)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=1e-2)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=False)
    train.add_argument("--ema_decay", type=float, default=0.9999)
    train.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    train.add_argument("--allow_tf32", action=argparse.BooleanOptionalAction, default=False)
    train.add_argument("--checkpointing_steps", type=int, default=500)
    train.add_argument("--checkpoints_total_limit", type=int, default=None)
    train.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint-N folder')
    train.add_argument("--report_to", default=None,
                       help="accelerate trackers: tensorboard, wandb, all, none (default: tensorboard when installed)")
    train.add_argument("--logging_dir", default="logs")
    val = parser.add_argument_group("validation")
    val.add_argument("--validation_images", nargs="*", default=None,
                     help="image files / folders for image-to-image validation (default: hold out training images)")
    val.add_argument("--num_validation_images", type=int, default=4,
                     help="images held out of the training folder when --validation_images is not given "
                          "(held out even when --validation_steps is 0, so the training set does not change)")
    val.add_argument("--validation_steps", type=int, default=500, help="validate every N steps (0: never)")
    val.add_argument("--validation_guidance_scale", type=float, default=3.0)
    val.add_argument("--validation_num_inference_steps", type=int, default=50)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        import yaml

        with open(known.config, encoding="utf-8") as f:
            defaults = yaml.safe_load(f) or {}
        unknown = sorted(set(defaults) - {a.dest for a in parser._actions})
        if unknown:
            parser.error(f"--config {known.config}: unknown keys {unknown}")
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if not args.train_data_dir:
        parser.error("--train_data_dir is required (a folder of training images)")
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))
    args.clip_specs = parse_clip_specs(args.clip_models)
    return args


# the lowest accepted value of each integer flag
INTEGER_FLAGS = {
    "clip_batch_size": 1, "num_tokens": 1, "resolution": 8, "dataloader_num_workers": 0, "seed": 0,
    "train_batch_size": 1, "num_train_epochs": 1, "gradient_accumulation_steps": 1, "lr_warmup_steps": 0,
    "checkpointing_steps": 0, "validation_steps": 0, "num_validation_images": 0, "validation_num_inference_steps": 1,
}
OPTIONAL_INTEGER_FLAGS = {"max_train_steps": 1, "checkpoints_total_limit": 1}
POSITIVE_FLAGS = ("learning_rate", "projection_lr_scale", "adam_epsilon", "max_grad_norm")


def check_args(args: argparse.Namespace) -> None:
    """Range checks of every numeric flag, before any work; ValueError naming the flag."""
    for name, low in INTEGER_FLAGS.items():
        check_range(f"--{name}", getattr(args, name), low, integer=True)
    for name, low in OPTIONAL_INTEGER_FLAGS.items():
        check_range(f"--{name}", getattr(args, name), low, integer=True, optional=True)
    for name in POSITIVE_FLAGS:
        check_range(f"--{name}", getattr(args, name), 0.0, low_open=True)
    for name in ("conditioning_dropout_prob", "ema_decay"):
        check_range(f"--{name}", getattr(args, name), 0.0, 1.0)
    for name in ("adam_beta1", "adam_beta2"):
        check_range(f"--{name}", getattr(args, name), 0.0, 1.0, high_open=True)
    check_range("--adam_weight_decay", args.adam_weight_decay, 0.0)
    check_range("--validation_guidance_scale", args.validation_guidance_scale, 0.0)
    from diffusers.optimization import SchedulerType

    check_choice("--lr_scheduler", args.lr_scheduler, {t.value for t in SchedulerType})
    if args.resolution % 8 != 0:
        raise ValueError(f"--resolution: expected a multiple of 8, got {args.resolution}")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        read_state(args.resume_from_checkpoint)


# ----------------------------------------------------------------------------------------------
# data


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation that is a function of (seed, epoch) only, so resuming mid-epoch replays the same order."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


def load_training_image(path: Path, resolution: int, center_crop: bool) -> torch.Tensor:
    """Resize (shorter side, bilinear) and crop to resolution -> (3, H, W) in [-1, 1]."""
    image = open_rgb(path)  # 16-bit images scaled to 8 bits
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(new_size, resample=Image.Resampling.BILINEAR)
    if center_crop:
        left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    else:
        left, top = random.randint(0, new_size[0] - resolution), random.randint(0, new_size[1] - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)  # (3, H, W)
    return pixels / 127.5 - 1.0


class ImageEmbeddingDataset(torch.utils.data.Dataset):
    """(pixel_values (3, H, W), image_embeds (D,)) pairs: training images with their precomputed CLIP embedding."""

    def __init__(self, paths: list[Path], image_embeds: torch.Tensor, resolution: int, center_crop: bool):
        if len(paths) != image_embeds.shape[0]:
            raise ValueError(f"image_embeds: expected {len(paths)} rows (one per image), got {image_embeds.shape[0]}")
        self.paths, self.image_embeds = paths, image_embeds
        self.resolution, self.center_crop = resolution, center_crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {
            "pixel_values": load_training_image(self.paths[index], self.resolution, self.center_crop),
            "image_embeds": self.image_embeds[index],
            "index": index,
        }


def list_training_images(folder: str) -> list[Path]:
    """The image files of a folder; captions are ignored, even malformed ones."""
    paths = list_image_files(folder)
    if not paths:
        raise FileNotFoundError(f"image folder {folder!r} holds no images")
    return paths


def list_validation_images(items: list[str]) -> list[Path]:
    """Image files named directly or found in the named folders."""
    paths = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths.extend(list_training_images(str(path)))
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"--validation_images: {path} is neither an image file nor a folder")
    return paths


# ----------------------------------------------------------------------------------------------
# embeddings


def _embedding_metadata(clip, paths: list[Path]) -> dict:
    """What the saved embeddings depend on: the CLIP models and their weights, each image file's path, size and
    modification time (an edited image, or retrained CLIP weights at the same path, do not match)."""
    from shifted_diffusion.cache import encoder_weights, file_fingerprint

    files = [[str(p.resolve()), file_fingerprint(p)] for p in paths]
    return {"clip_spec": json.dumps(clip.spec, sort_keys=True), "clip_weights": json.dumps(encoder_weights(clip),
            sort_keys=True), "images": json.dumps(files)}


def cached_image_embeddings(cache_dir: str, clip, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(embeddings (N, D), readable (N,) bool) from a shifted_diffusion.cache folder built with the same CLIP
    models and weights from these very image files, unchanged since (cache.match_image_embeddings; images it
    skipped as unreadable stay unreadable); None, with a warning saying why, when it does not match."""
    from shifted_diffusion import cache

    matched, why = cache.match_image_embeddings(cache_dir, clip, paths)
    if matched is None:
        logger.warning(f"not reusing the embedding cache {cache_dir}: {why}")
    return matched


def compute_image_embeddings(clip, paths: list[Path], batch_size: int, desc: str,
                             disable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLIP image embeddings (N, D), readable (N,) bool); unreadable files get a zero row and a warning."""
    from tqdm.auto import tqdm

    rows, readable = [], []
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, disable=disable):
        chunk = paths[start:start + batch_size]
        images, ok = [], []
        for path in chunk:
            try:
                images.append(open_rgb(path))
                ok.append(True)
            except Exception as error:
                logger.warning(f"skipping unreadable image {path}: {type(error).__name__}: {error}")
                ok.append(False)
        out = torch.zeros(len(chunk), clip.dim)
        if images:
            out[torch.tensor(ok)] = clip.encode_image(images).float().cpu()
        rows.append(out)
        readable += ok
    return torch.cat(rows), torch.tensor(readable, dtype=torch.bool)


def training_image_embeddings(args, accelerator, clip, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (N, D), readable (N,)) of the training images: from the prior's cache, from our own file
    in --output_dir (a resumed run), or computed once by the main process."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if args.embedding_cache:
        cached = cached_image_embeddings(args.embedding_cache, clip, paths)
        if cached is not None:
            logger.info(f"reusing {int(cached[1].sum())} image embeddings from the cache {args.embedding_cache}")
            return cached
        logger.info(f"the cache {args.embedding_cache} does not match these CLIP models / images; computing embeddings")
    file = Path(args.output_dir) / EMBEDDINGS_NAME
    metadata = _embedding_metadata(clip, paths)
    with accelerator.main_process_first():
        if file.is_file():
            with safe_open(str(file), framework="pt") as f:
                if f.metadata() == metadata:
                    logger.info(f"reusing the image embeddings saved in {file}")
                    return f.get_tensor("image_embeds"), f.get_tensor("readable")
        if accelerator.is_main_process:
            embeds, readable = compute_image_embeddings(clip, paths, args.clip_batch_size, "CLIP image embeddings",
                                                        disable=not accelerator.is_local_main_process)
            save_file({"image_embeds": embeds.contiguous(), "readable": readable}, str(file), metadata=metadata)
            return embeds, readable
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor("image_embeds"), f.get_tensor("readable")


def empty_image_embedding(args, clip) -> tuple[torch.Tensor, str]:
    """The unconditional embedding (D,) and where it came from."""
    if args.empty_embedding:
        return load_embedding(args.empty_embedding), f"--empty_embedding {args.empty_embedding}"
    black = Image.new("RGB", (args.resolution, args.resolution))
    return clip.encode_image([black])[0].float().cpu(), "CLIP embedding of a black image"


def check_dim(name: str, source: str, dim: int, projection_dim: int, projection_source: str) -> None:
    """Raise when an embedding's dim differs from the projection's clip_dim, naming both sources."""
    if dim != projection_dim:
        raise ValueError(
            f"{name} has dim {dim} ({source}) but the projection expects clip_dim={projection_dim} "
            f"({projection_source}); use the same --clip_models for both"
        )


# ----------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def run_validation(args, accelerator, vae, unet, projection, inference_scheduler, val_paths, val_embeds,
                   empty_embedding, step: int) -> Path:
    """Image-to-image on held-out images -> a grid [original | reconstruction] per row, saved under validation/."""
    from diffusers import StableDiffusionPipeline

    from shifted_diffusion.decoder import Decoder

    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=accelerator.unwrap_model(unet),
        scheduler=inference_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    decoder = Decoder(pipeline, accelerator.unwrap_model(projection), empty_embedding, list(args.clip_specs))
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed or 0)
    rows = []
    projection.eval()
    for path, embed in zip(val_paths, val_embeds):
        with accelerator.autocast():  # fp32 UNet/projection with a half-precision VAE under mixed precision
            image = decoder.generate(embed[None].to(accelerator.device), guidance_scale=args.validation_guidance_scale,
                                     num_inference_steps=args.validation_num_inference_steps, generator=generator,
                                     height=args.resolution, width=args.resolution)[0]
        pixels = load_training_image(path, args.resolution, center_crop=True)
        original = Image.fromarray(((pixels.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())
        rows.append([original, image])
    projection.train()
    out = Path(args.output_dir) / "validation" / f"step-{step:07d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows).save(out)
    logger.info(f"validation grid written to {out}")
    return out


# ----------------------------------------------------------------------------------------------
# main


def load_models(args, weight_dtype):
    """Frozen VAE, trainable UNet, training noise scheduler, inference scheduler (text encoder never loaded)."""
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    common = {"revision": args.revision}
    noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler", **common)
    scheduler_config = DDPMScheduler.load_config(args.pretrained_model_name_or_path, subfolder="scheduler", **common)
    scheduler_cls = getattr(diffusers, scheduler_config.get("_class_name", "DDIMScheduler"), diffusers.DDIMScheduler)
    inference_scheduler = scheduler_cls.from_config(scheduler_config)
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", variant=args.variant, **common)
    unet = UNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet",
                                                variant=args.variant, **common)
    vae.requires_grad_(False)
    return noise_scheduler, inference_scheduler, vae, unet


def build_projection(args, clip_dim: int, cross_attention_dim: int) -> ImageEmbeddingProjection:
    """A new projection, or the pretrained folder's own (continuing a fine-tuned decoder)."""
    existing = Path(args.pretrained_model_name_or_path) / PROJECTION_SUBFOLDER
    if existing.is_dir():
        projection = ImageEmbeddingProjection.from_pretrained(existing)
        check_dim("the multi-CLIP image embedding", f"--clip_models {' '.join(args.clip_models)}", clip_dim,
                  projection.config.clip_dim, f"{existing}/config.json")
        logger.info(f"continuing from the projection in {existing}")
        return projection
    return ImageEmbeddingProjection(clip_dim=clip_dim, cross_attention_dim=cross_attention_dim,
                                    num_tokens=args.num_tokens, layer_norm=args.projection_layer_norm)


def prediction_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """The UNet's regression target: eps (epsilon) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (v_prediction)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r} (expected epsilon or v_prediction)")


def diffusion_loss(unet, projection, vae, noise_scheduler, batch: dict, empty_embedding: torch.Tensor, *,
                   generator: torch.Generator, dropout_prob: float, random_flip: bool,
                   weight_dtype: torch.dtype) -> torch.Tensor:
    """train_text_to_image's loss with encoder_hidden_states = projection(x0 or, with prob. dropout_prob, empty)."""
    device = empty_embedding.device
    pixel_values = batch["pixel_values"].to(device, weight_dtype)  # (B, 3, H, W)
    bsz = pixel_values.shape[0]
    if random_flip:
        flip = torch.rand(bsz, generator=generator, device=device) < 0.5
        pixel_values = torch.where(flip[:, None, None, None], pixel_values.flip(-1), pixel_values)
    with torch.no_grad():
        latents = vae.encode(pixel_values).latent_dist.sample(generator=generator)
        latents = latents * vae.config.scaling_factor  # (B, 4, h, w)
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator, device=device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)  # (B, 4, h, w)
    image_embeds = batch["image_embeds"].to(device, torch.float32)  # (B, D)
    drop = torch.rand(bsz, generator=generator, device=device) < dropout_prob
    image_embeds = torch.where(drop[:, None], empty_embedding[None].float(), image_embeds)  # (B, D)
    encoder_hidden_states = projection(image_embeds)  # (B, num_tokens, C)
    target = prediction_target(noise_scheduler, latents, noise, timesteps)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def main(argv=None) -> Path:
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
    from diffusers import StableDiffusionPipeline
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from shifted_diffusion.ema import FusedEMA
    from shifted_diffusion.encoders import MultiCLIP

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if args.report_to is None:
        from accelerate.utils import is_tensorboard_available

        args.report_to = "tensorboard" if is_tensorboard_available() else "none"
        if args.report_to == "none":
            logger.info("tensorboard is not installed: the loss is shown in the progress bar only (--report_to)")
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        # the main process embeds the images while the others wait at a barrier
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=12))],
    )
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # ---- data + frozen CLIP embeddings
    try:
        paths = list_training_images(args.train_data_dir)
    except FileNotFoundError as error:
        raise SystemExit(f"finetune: --train_data_dir: {error}") from error
    if args.validation_images:
        val_paths = list_validation_images(args.validation_images)
    elif args.num_validation_images > 0:
        if len(paths) <= args.num_validation_images:
            raise SystemExit(f"finetune: {args.train_data_dir} has {len(paths)} images; holding out "
                             f"--num_validation_images {args.num_validation_images} would leave none to train on")
        val_paths, paths = paths[-args.num_validation_images:], paths[: -args.num_validation_images]
    else:
        val_paths = []
    clip = MultiCLIP(args.clip_specs, device=accelerator.device, dtype=weight_dtype)
    image_embeds, readable = training_image_embeddings(args, accelerator, clip, paths)
    num_unreadable = int((~readable).sum())
    if num_unreadable:
        logger.warning(f"{num_unreadable} of {len(paths)} training images are unreadable and left out")
        paths, image_embeds = [p for p, ok in zip(paths, readable.tolist()) if ok], image_embeds[readable]
    if not paths:
        raise SystemExit(f"finetune: none of the training images in {args.train_data_dir} could be read")
    val_embeds = None
    if val_paths:
        val_embeds, val_readable = compute_image_embeddings(clip, val_paths, args.clip_batch_size, "validation", True)
        val_paths, val_embeds = [p for p, ok in zip(val_paths, val_readable.tolist()) if ok], val_embeds[val_readable]
    empty_embedding, empty_source = empty_image_embedding(args, clip)
    clip_dim, clip_source = clip.dim, f"--clip_models {' '.join(args.clip_models)}"
    del clip
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    check_dim("the training image embeddings", f"{args.embedding_cache or 'computed'}", image_embeds.shape[1],
              clip_dim, clip_source)

    # ---- models
    noise_scheduler, inference_scheduler, vae, unet = load_models(args, weight_dtype)
    projection = build_projection(args, clip_dim, unet.config.cross_attention_dim)
    if projection.config.cross_attention_dim != unet.config.cross_attention_dim:
        raise ValueError(f"projection width {projection.config.cross_attention_dim} != the UNet's "
                         f"cross_attention_dim {unet.config.cross_attention_dim}")
    check_dim("the empty embedding", empty_source, empty_embedding.shape[0], projection.config.clip_dim,
              f"projection clip_dim from {clip_source}")
    vae.to(accelerator.device)
    if weight_dtype != torch.float32:
        vae.to(dtype=weight_dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    projection.train()

    optimizer = torch.optim.AdamW(
        [{"params": list(unet.parameters()), "lr": args.learning_rate},
         {"params": list(projection.parameters()), "lr": args.learning_rate * args.projection_lr_scale}],
        betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )
    dataset = ImageEmbeddingDataset(paths, image_embeds, args.resolution, args.center_crop)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, sampler=EpochShuffleSampler(len(dataset), args.seed),
        num_workers=args.dataloader_num_workers, drop_last=False,
    )
    # prepare() shards the loader over the processes: an epoch is len / num_processes batches per process
    steps_per_epoch_guess = math.ceil(math.ceil(len(dataloader) / accelerator.num_processes) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps if args.max_train_steps is not None else \
        args.num_train_epochs * steps_per_epoch_guess
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    unet, projection, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        unet, projection, optimizer, dataloader, lr_scheduler)
    trained_params = list(unet.parameters()) + list(projection.parameters())
    ema = None
    if args.use_ema:
        ema = FusedEMA(trained_params, decay=args.ema_decay)
        ema.to(accelerator.device)
    empty_on_device = empty_embedding.to(accelerator.device)

    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    if accelerator.is_main_process and accelerator.trackers == [] and args.report_to != "none":
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers("shifted-diffusion-decoder", config=config)

    global_step = 0
    trained = {"unet": accelerator.unwrap_model(unet), "projection": accelerator.unwrap_model(projection)}
    run_config = {k: (v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v))
                  for k, v in vars(args).items()}
    resume = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume is not None:
        accelerator.print(f"resuming from {resume}")
        state = load_checkpoint(accelerator, resume, modules=trained, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                ema=ema, config=run_config)
        if ema is not None:
            ema.to(accelerator.device)  # shadows are restored on the CPU
        global_step = int(state["global_step"])
    first_epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"{len(dataset)} training images, {len(val_paths)} validation images, clip_dim {clip_dim}, "
                f"batch {total_batch}, {max_train_steps} steps, prediction_type "
                f"{noise_scheduler.config.prediction_type}")
    progress = tqdm(range(max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    train_loss, last_loss = 0.0, float("nan")
    step_cpu_s, step_wall_s, steps_run = 0.0, 0.0, 0
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        dataloader.set_epoch(epoch)
        epoch_loader = dataloader
        if epoch == first_epoch and skip_batches > 0:
            epoch_loader = accelerator.skip_first_batches(dataloader, skip_batches)
            epoch_loader.set_epoch(epoch)
        batch_in_epoch = skip_batches if epoch == first_epoch else 0
        for batch in epoch_loader:
            counter = epoch * len(dataloader) + batch_in_epoch
            batch_in_epoch += 1
            generator = step_generator(args.seed, accelerator.process_index, counter, accelerator.device)
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            with accelerator.accumulate(unet, projection):
                loss = diffusion_loss(unet, projection, vae, noise_scheduler, batch, empty_on_device,
                                      generator=generator, dropout_prob=args.conditioning_dropout_prob,
                                      random_flip=args.random_flip, weight_dtype=weight_dtype)
                bsz = batch["pixel_values"].shape[0]
                avg_loss = accelerator.gather(loss.detach().repeat(bsz)).mean()
                train_loss += avg_loss.item() / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trained_params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients and ema is not None:
                ema.step(trained_params)
            step_cpu_s += time.process_time() - cpu_start
            step_wall_s += time.perf_counter() - wall_start
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            steps_run += 1
            last_loss = train_loss
            progress.update(1)
            logs = {"train_loss": train_loss, "lr": lr_scheduler.get_last_lr()[0]}
            progress.set_postfix(loss=f"{train_loss:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
            train_loss = 0.0
            if not math.isfinite(last_loss):
                raise FloatingPointError(
                    f"step {global_step}: the training loss is {last_loss}; stopping (the last checkpoint is kept, "
                    f"nothing more is saved). Lower --learning_rate ({args.learning_rate}) or check the images")
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                path = save_checkpoint(accelerator, args.output_dir, global_step, modules=trained, optimizer=optimizer,
                                       lr_scheduler=lr_scheduler, ema=ema, config=run_config,
                                       total_limit=args.checkpoints_total_limit)
                logger.info(f"saved {path}")
            if args.validation_steps and val_paths and global_step % args.validation_steps == 0 \
                    and accelerator.is_main_process:
                if ema is not None:
                    ema.store(trained_params)
                    ema.copy_to(trained_params)
                run_validation(args, accelerator, vae, unet, projection, inference_scheduler, val_paths, val_embeds,
                               empty_on_device, global_step)
                if ema is not None:
                    ema.restore(trained_params)
            if global_step >= max_train_steps:
                break
    progress.close()
    if steps_run:
        logger.info(f"trained {steps_run} steps: {step_cpu_s / steps_run:.3f} CPU s/step, "
                    f"{step_wall_s / steps_run:.3f} wall s/step (checkpointing and validation excluded)")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet_final = accelerator.unwrap_model(unet)
        projection_final = accelerator.unwrap_model(projection)
        if ema is not None:
            ema.copy_to(trained_params)
        pipeline = StableDiffusionPipeline(
            vae=vae if vae.dtype == torch.float32 else vae.to(torch.float32), text_encoder=None, tokenizer=None,
            unet=unet_final if unet_final.dtype == torch.float32 else unet_final.to(torch.float32),
            scheduler=inference_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipeline.save_pretrained(str(output_dir))
        write_decoder_files(output_dir, projection_final, empty_embedding, args.clip_specs)
        summary = {"global_step": global_step, "steps_this_run": steps_run, "last_train_loss": last_loss,
                   "num_train_images": len(dataset), "num_unreadable_images": num_unreadable,
                   "cpu_s_per_step": step_cpu_s / max(steps_run, 1), "wall_s_per_step": step_wall_s / max(steps_run, 1)}
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info(f"decoder written to {output_dir} (load with shifted_diffusion.decoder.load_decoder)")
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    main()
