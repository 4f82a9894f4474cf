"""Fine-tune Stable Diffusion into a language-free decoder conditioned on multi-CLIP image embeddings.

The frozen multi-CLIP image embedding x0 (D) of each training image goes through a trained projection
(Linear D -> num_tokens x cross_attention_dim, optional LayerNorm) to ``encoder_hidden_states``; UNet +
projection train on the noise-prediction loss of diffusers' train_text_to_image (epsilon or v target, from
the scheduler's prediction_type). Captions are ignored; the text encoder is never loaded. With probability
``conditioning_dropout_prob`` the embedding is replaced by the "empty" embedding (default: CLIP of a black
image; or ``empty_embedding`` FILE, e.g. the prior's sample for the empty caption).

``DecoderTrainConfig`` holds every setting (flags and YAML keys are train_text_to_image's names);
``train_decoder(cfg)`` runs the loop on the shared trainer pieces (``training``) and writes a standard
diffusers StableDiffusionPipeline folder (text_encoder=None) plus image_projection/,
empty_embedding.safetensors and shifted_decoder.json, loaded by ``decoder.load_decoder``. Randomness of
each micro-step comes from (seed, process, micro-step) and the data order from (seed, epoch), so a resumed
run takes exactly the steps of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from . import config_cli, training
from .checkpoints import read_state, save_checkpoint
from .checks import check_choice, check_range
from .decoder_data import (ImageEmbeddingDataset, check_dim, compute_image_embeddings, empty_image_embedding,
                           list_training_images, list_validation_images, load_training_image,
                           readable_training_embeddings)
from .projection import PROJECTION_SUBFOLDER, ImageEmbeddingProjection
from .encoders import PAPER_CLIP_MODELS, parse_clip_specs

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODELS = PAPER_CLIP_MODELS
DECODER_TYPES = ("image", "text", "text_and_image", "gan")
CAPTION_TYPES = ("text", "text_and_image")  # the decoder types that read captions through SD's text encoder
CONFIG_NAME = "train_config.json"  # the resolved settings, in the output folder (and in every checkpoint)
SUMMARY_NAME = "train_summary.json"


def _field(default, help: str, **metadata):
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class DecoderTrainConfig(config_cli.FlagConfig):
    """Everything a decoder fine-tuning run depends on; saved in every checkpoint and in the output folder."""

    SCRIPT: ClassVar[str] = "finetune.py"

    # model
    pretrained_model_name_or_path: str = _field(
        "stabilityai/stable-diffusion-2-base", "diffusers Stable Diffusion folder or hub id (its text encoder, if "
        "any, is not loaded)")
    revision: Optional[str] = None
    variant: Optional[str] = _field(None, "weights variant of the pretrained folder, e.g. fp16")
    clip_models: Sequence[str] = _field(DEFAULT_CLIP_MODELS, "open_clip specs MODEL:PRETRAINED (or a local "
                                        "open_clip folder); embeddings are concatenated", nargs="+")
    clip_batch_size: int = _field(64, "batch size for the one-off CLIP embedding pass")
    num_tokens: int = _field(4, "tokens the projection produces per embedding")
    projection_layer_norm: bool = True
    projection_lr_scale: float = _field(10.0, "learning rate of the (new) projection = learning_rate x this")
    # data
    train_data_dir: Optional[str] = _field(None, "folder of training images, or webdataset tar shards "
                                          "(data/{00000..00099}.tar, a .tar, a folder of .tar); required")
    embedding_cache: Optional[str] = _field(None, "a cache folder of the prior pipeline (shifted_diffusion.cache) "
                                            "to reuse when it matches")
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    dataloader_num_workers: int = 0
    empty_embedding: Optional[str] = _field(None, "file of the 'empty' embedding (D,) used for guidance dropout; "
                                            "default: CLIP of a black image")
    conditioning_dropout_prob: float = _field(0.1, "image: probability of the empty embedding; text: of the empty "
                                              "caption")
    # decoder type
    decoder_type: str = _field("image", "image: language-free (the projection replaces the text); text: Stable "
                               "Diffusion's own text-to-image training (the UNet on captions, no embedding; a stock "
                               "pipeline folder, the base a text_and_image run adds the embedding to); text_and_image: "
                               "the SD text encoder (frozen) plus an IP-Adapter for the embedding (ip_adapter.py); "
                               "gan: a StyleGAN2-style generator trained from scratch, Lafite's language-free "
                               "recipe (shifted_diffusion.gan; the gan_* settings)")
    text_dropout_prob: float = _field(0.05, "text_and_image: probability of the empty caption alone")
    image_dropout_prob: float = _field(0.05, "text_and_image: probability of the zero image embedding alone")
    both_dropout_prob: float = _field(0.05, "text_and_image: probability of dropping both")
    train_unet: bool = _field(False, "text_and_image: fine-tune the UNet too (default: only the adapter trains)")
    # gan (decoder_type gan: shifted_diffusion.gan; --resolution is the generator's; Lafite's loss values)
    gan_z_dim: int = _field(512, "gan: latent z size")
    gan_w_dim: int = _field(512, "gan: style vector size")
    gan_mapping_layers: int = _field(8, "gan: layers of the mapping network")
    gan_channel_base: int = _field(16384, "gan: channels at resolution r = min(channel_base / r, channel_max)")
    gan_channel_max: int = 512
    gan_r1_gamma: float = _field(10.0, "gan: R1 weight on real images (Lafite: 10)")
    gan_r1_interval: int = _field(16, "gan: R1 every N discriminator steps (lazy), weighted x N")
    gan_contrastive_temperature: float = _field(0.5, "gan: temperature of the contrastive losses (Lafite: 0.5)")
    gan_clip_contrastive_weight: float = _field(10.0, "gan: generator's contrastive loss between the CLIP embedding "
                                                "of its image and the conditioning (Lafite's itc: 10)")
    gan_d_contrastive_weight: float = _field(10.0, "gan: contrastive loss between the discriminator's features and "
                                             "the conditioning, both players (Lafite's itd: 10)")
    gan_perturbation: float = _field(0.75, "gan: conditioning perturbation level xi (Lafite, image features: 0.75)")
    gan_truncation_psi: float = _field(1.0, "gan: truncation used at inference, saved with the decoder")
    gan_adversarial_weight: float = _field(1.0, "gan: weight of the generator's non-saturating adversarial loss")
    gan_reconstruction_weight: float = _field(0.0, "gan: mean squared error between the generation from an image's "
                                              "(perturbed) embedding and that image (0: Lafite, which has none)")
    gan_generator_warmup_steps: int = _field(0, "gan: optimizer steps that train the generator alone (on its "
                                             "non-adversarial losses) before D and G alternate (0: Lafite)")
    gan_input_from_style: bool = _field(False, "gan: the generator's 4x4 input is the constant plus a linear map "
                                        "of the style input (False: StyleGAN2's constant)")
    gan_mapping_lr_mul: float = _field(0.01, "gan: learning-rate multiplier of the mapping network (StyleGAN2: 0.01)")
    gan_d_adam_beta1: Optional[float] = _field(None, "gan: the discriminator's Adam beta1 (default: --adam_beta1)")
    # training
    output_dir: str = "sd-shifted-decoder"
    seed: int = _field(0, "same on every process and on resume")
    train_batch_size: int = 16
    num_train_epochs: int = 100
    max_train_steps: Optional[int] = _field(None, "overrides num_train_epochs")
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-5
    lr_scheduler: str = _field("constant", "linear, cosine, cosine_with_restarts, polynomial, constant, "
                               "constant_with_warmup")
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_ema: bool = False
    ema_decay: float = 0.9999
    mixed_precision: Optional[str] = _field(None, "no, fp16 or bf16 (default: accelerate's configuration)")
    allow_tf32: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = _field(None, '"latest" or a checkpoint-N folder')
    report_to: str = _field("tensorboard", "accelerate trackers: tensorboard (used when installed), wandb, all, none")
    logging_dir: str = "logs"
    logging_steps: int = _field(10, "read and log the loss every N steps (and at checkpoints and the last step)")
    # validation
    validation_images: Optional[Sequence[str]] = _field(
        None, "image files / folders for image-to-image validation (default: hold out training images)", nargs="*")
    num_validation_images: int = _field(4, "images held out of the training folder when validation_images is not "
                                        "given (held out even when validation_steps is 0, so the training set does "
                                        "not change)")
    validation_steps: int = _field(500, "validate every N steps (0: never)")
    validation_guidance_scale: float = 3.0
    validation_num_inference_steps: int = 50

    def __post_init__(self):
        self.validate()

    @property
    def clip_specs(self) -> list[tuple[str, str]]:
        return parse_clip_specs(self.clip_models)

    def validate(self) -> None:
        """Every numeric setting in its range and every name known: ValueError naming the flag otherwise."""
        from diffusers.optimization import SchedulerType

        ints = {  # field: (low, optional)
            "clip_batch_size": (1, False), "num_tokens": (1, False), "resolution": (8, False),
            "dataloader_num_workers": (0, False), "seed": (0, False), "train_batch_size": (1, False),
            "num_train_epochs": (1, False), "max_train_steps": (1, True), "gradient_accumulation_steps": (1, False),
            "lr_warmup_steps": (0, False), "checkpointing_steps": (0, False), "checkpoints_total_limit": (1, True),
            "logging_steps": (1, False), "validation_steps": (0, False), "num_validation_images": (0, False),
            "validation_num_inference_steps": (1, False), "gan_z_dim": (1, False), "gan_w_dim": (1, False),
            "gan_mapping_layers": (1, False), "gan_channel_base": (1, False), "gan_channel_max": (1, False),
            "gan_r1_interval": (1, False), "gan_generator_warmup_steps": (0, False),
        }
        for name, (low, optional) in ints.items():
            check_range(f"--{name}", getattr(self, name), low, integer=True, optional=optional)
        for name in ("learning_rate", "projection_lr_scale", "adam_epsilon", "max_grad_norm"):
            check_range(f"--{name}", getattr(self, name), 0.0, low_open=True)
        for name in ("conditioning_dropout_prob", "ema_decay", "text_dropout_prob", "image_dropout_prob",
                     "both_dropout_prob"):
            check_range(f"--{name}", getattr(self, name), 0.0, 1.0)
        for name in ("adam_beta1", "adam_beta2"):
            check_range(f"--{name}", getattr(self, name), 0.0, 1.0, high_open=True)
        check_range("--adam_weight_decay", self.adam_weight_decay, 0.0)
        for name in ("gan_r1_gamma", "gan_clip_contrastive_weight", "gan_d_contrastive_weight",
                     "gan_adversarial_weight", "gan_reconstruction_weight"):
            check_range(f"--{name}", getattr(self, name), 0.0)
        check_range("--gan_contrastive_temperature", self.gan_contrastive_temperature, 0.0, low_open=True)
        check_range("--gan_mapping_lr_mul", self.gan_mapping_lr_mul, 0.0, low_open=True)
        check_range("--gan_perturbation", self.gan_perturbation, 0.0, 1.0)
        check_range("--gan_truncation_psi", self.gan_truncation_psi, 0.0)
        if self.gan_d_adam_beta1 is not None:
            check_range("--gan_d_adam_beta1", self.gan_d_adam_beta1, 0.0, 1.0, high_open=True)
        if self.decoder_type == "gan" and (self.resolution < 4 or self.resolution & (self.resolution - 1)):
            raise ValueError(f"--resolution: the GAN decoder needs a power of two, got {self.resolution}")
        generator_losses = ("gan_adversarial_weight", "gan_d_contrastive_weight", "gan_clip_contrastive_weight",
                            "gan_reconstruction_weight")
        if self.decoder_type == "gan" and not any(getattr(self, name) > 0 for name in generator_losses):
            raise ValueError("the GAN decoder's generator has no loss: set one of " +
                             ", ".join(f"--{name}" for name in generator_losses) + " above 0")
        if self.decoder_type == "gan" and self.gan_generator_warmup_steps > 0 and not (
                self.gan_clip_contrastive_weight > 0 or self.gan_reconstruction_weight > 0):
            raise ValueError(f"--gan_generator_warmup_steps {self.gan_generator_warmup_steps}: the warm-up trains the "
                             "generator on its non-adversarial losses, and both are off: set "
                             "--gan_reconstruction_weight or --gan_clip_contrastive_weight above 0")
        check_range("--validation_guidance_scale", self.validation_guidance_scale, 0.0)
        check_choice("--decoder_type", self.decoder_type, set(DECODER_TYPES))
        total = self.text_dropout_prob + self.image_dropout_prob + self.both_dropout_prob
        if total > 1.0:
            raise ValueError(f"--text_dropout_prob + --image_dropout_prob + --both_dropout_prob: expected at most 1, "
                             f"got {total}")
        check_choice("--lr_scheduler", self.lr_scheduler, {t.value for t in SchedulerType})
        check_choice("--mixed_precision", self.mixed_precision, {None, "no", "fp16", "bf16"})
        if self.resolution % 8 != 0:
            raise ValueError(f"--resolution: expected a multiple of 8, got {self.resolution}")
        if not self.clip_models:
            raise ValueError("--clip_models: expected at least one MODEL:PRETRAINED pair, got none")


def build_decoder_parser() -> argparse.ArgumentParser:
    """The flags of ``DecoderTrainConfig`` (config_cli.build_parser, the mechanism of the prior's flags)."""
    return config_cli.build_parser(DecoderTrainConfig, __doc__.split("\n\n")[0], prog="finetune.py")


def preflight(cfg: DecoderTrainConfig) -> None:
    """The inputs checked before any work: the data folder is set, a named checkpoint is complete and ours."""
    if not cfg.train_data_dir:
        raise ValueError("--train_data_dir is required (a folder of training images or tar shards)")
    if cfg.resume_from_checkpoint and cfg.resume_from_checkpoint != "latest":
        read_state(cfg.resume_from_checkpoint)
    local = Path(cfg.pretrained_model_name_or_path)
    if cfg.decoder_type in CAPTION_TYPES and local.is_dir():
        missing = [name for name in ("tokenizer", "text_encoder") if not (local / name).is_dir()]
        if missing:
            raise ValueError(f"--decoder_type {cfg.decoder_type} needs the tokenizer and text_encoder of "
                             f"--pretrained_model_name_or_path {local} (missing: {', '.join(missing)})")


def parse_decoder_config(argv: Optional[Sequence[str]] = None, defaults: Optional[dict] = None) -> DecoderTrainConfig:
    """DecoderTrainConfig from (dataclass defaults) < ``defaults`` < ``--config`` YAML files < flags; a bad
    setting is a usage error (exit 2) naming the flag, before any work."""
    parser = build_decoder_parser()
    try:
        cfg = config_cli.parse_settings(DecoderTrainConfig, argv, defaults, parser=parser)
        preflight(cfg)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    return cfg


# ---- models and loss -----------------------------------------------------------------------------------


def load_models(cfg: DecoderTrainConfig):
    """Training noise scheduler, inference scheduler, frozen VAE, trainable UNet (text encoder never loaded)."""
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    common = {"revision": cfg.revision}  # safetensors weights only (no pickle fallback) for the models below
    noise_scheduler = DDPMScheduler.from_pretrained(cfg.pretrained_model_name_or_path, subfolder="scheduler", **common)
    scheduler_config = DDPMScheduler.load_config(cfg.pretrained_model_name_or_path, subfolder="scheduler", **common)
    scheduler_cls = getattr(diffusers, scheduler_config.get("_class_name", "DDIMScheduler"), diffusers.DDIMScheduler)
    inference_scheduler = scheduler_cls.from_config(scheduler_config)
    vae = AutoencoderKL.from_pretrained(cfg.pretrained_model_name_or_path, subfolder="vae", variant=cfg.variant,
                                        use_safetensors=True, **common)
    unet = UNet2DConditionModel.from_pretrained(cfg.pretrained_model_name_or_path, subfolder="unet", use_safetensors=True,
                                                variant=cfg.variant, **common)
    vae.requires_grad_(False)
    return noise_scheduler, inference_scheduler, vae, unet


def build_projection(cfg: DecoderTrainConfig, clip_dim: int, cross_attention_dim: int) -> ImageEmbeddingProjection:
    """A new projection, or the pretrained folder's own (continuing a fine-tuned decoder)."""
    existing = Path(cfg.pretrained_model_name_or_path) / PROJECTION_SUBFOLDER
    if existing.is_dir():
        projection = ImageEmbeddingProjection.from_pretrained(existing, use_safetensors=True)
        check_dim("the multi-CLIP image embedding", f"--clip_models {' '.join(cfg.clip_models)}", clip_dim,
                  projection.config.clip_dim, f"{existing}/config.json")
        logger.info(f"continuing from the projection in {existing}")
        return projection
    return ImageEmbeddingProjection(clip_dim=clip_dim, cross_attention_dim=cross_attention_dim,
                                    num_tokens=cfg.num_tokens, layer_norm=cfg.projection_layer_norm)


def prediction_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """The UNet's regression target: eps (epsilon) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (v_prediction)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r} (expected epsilon or v_prediction)")


def noised_latents(vae, noise_scheduler, batch: dict, *, generator: torch.Generator, random_flip: bool,
                   weight_dtype: torch.dtype, device):
    """(latents, noise, timesteps, noisy latents) of a batch: optional flip, VAE sample, noise, timestep."""
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
    return latents, noise, timesteps, noise_scheduler.add_noise(latents, noise, timesteps)  # noisy: (B, 4, h, w)


def diffusion_loss(unet, projection, vae, noise_scheduler, batch: dict, empty_embedding: torch.Tensor, *,
                   generator: torch.Generator, dropout_prob: float, random_flip: bool,
                   weight_dtype: torch.dtype) -> torch.Tensor:
    """train_text_to_image's loss with encoder_hidden_states = projection(x0 or, with prob. dropout_prob, empty)."""
    device = empty_embedding.device
    latents, noise, timesteps, noisy_latents = noised_latents(vae, noise_scheduler, batch, generator=generator,
                                                              random_flip=random_flip, weight_dtype=weight_dtype,
                                                              device=device)
    bsz = latents.shape[0]
    image_embeds = batch["image_embeds"].to(device, torch.float32)  # (B, D)
    drop = torch.rand(bsz, generator=generator, device=device) < dropout_prob
    image_embeds = torch.where(drop[:, None], empty_embedding[None].float(), image_embeds)  # (B, D)
    encoder_hidden_states = projection(image_embeds)  # (B, num_tokens, C)
    target = prediction_target(noise_scheduler, latents, noise, timesteps)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


# ---- validation ----------------------------------------------------------------------------------------


@torch.no_grad()
def run_validation(cfg: DecoderTrainConfig, accelerator, vae, unet, projection, inference_scheduler, val_paths,
                   val_embeds, empty_embedding, step: int) -> Path:
    """Image-to-image on held-out images -> a grid [original | reconstruction] per row, saved under validation/."""
    from diffusers import StableDiffusionPipeline

    from .decoder import Decoder

    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=accelerator.unwrap_model(unet),
        scheduler=inference_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    decoder = Decoder(pipeline, accelerator.unwrap_model(projection), empty_embedding, cfg.clip_specs)
    generator = torch.Generator(device=accelerator.device).manual_seed(cfg.seed or 0)
    rows = []
    projection.eval()
    for path, embed in zip(val_paths, val_embeds):
        with accelerator.autocast():  # fp32 UNet/projection with a half-precision VAE under mixed precision
            image = decoder.generate(embed[None].to(accelerator.device), guidance_scale=cfg.validation_guidance_scale,
                                     num_inference_steps=cfg.validation_num_inference_steps, generator=generator,
                                     height=cfg.resolution, width=cfg.resolution)[0]
        rows.append([validation_original(path, cfg.resolution), image])
    projection.train()
    return save_validation_grid(cfg, rows, step, "image | reconstruction")


def save_validation_grid(cfg: DecoderTrainConfig, rows: list, step: int, columns: str) -> Path:
    """``validation/step-N.png`` under the output folder: one row of PIL images per validation image."""
    from .decoder import make_grid

    out = Path(cfg.output_dir) / "validation" / f"step-{step:07d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows).save(out)
    logger.info(f"validation grid written to {out} (columns: {columns})")
    return out


def step_schedule(cfg: DecoderTrainConfig, optimizer, num_items: int, world: int) -> tuple:
    """(optimizer steps of the run, diffusers' learning-rate schedule over them)."""
    from diffusers.optimization import get_scheduler

    steps_per_epoch = training.steps_per_epoch(num_items, cfg.train_batch_size, world, cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps if cfg.max_train_steps is not None else cfg.num_train_epochs * steps_per_epoch
    return max_steps, get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps * world,
                                    num_training_steps=max_steps * world)


def start_run(cfg: DecoderTrainConfig) -> tuple:
    """What every decoder trainer starts with: (Accelerator, trackers, training images, validation images); the
    seed set, the resolved config saved in the output folder."""
    from accelerate.utils import set_seed

    accelerator, trackers = training.build_accelerator(
        cfg.output_dir, mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, report_to=cfg.report_to,
        logging_dir=cfg.logging_dir)
    set_seed(cfg.seed)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        paths = list_training_images(cfg.train_data_dir)
    except FileNotFoundError as error:
        raise SystemExit(f"finetune: --train_data_dir: {error}") from error
    paths, val_paths = _split_validation(cfg, paths)
    if accelerator.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        cfg.save(Path(cfg.output_dir) / CONFIG_NAME)
    return accelerator, trackers, paths, val_paths


# ---- the run -------------------------------------------------------------------------------------------


def validation_embeddings(cfg: DecoderTrainConfig, clip, val_paths: list[Path]) -> tuple:
    """(readable validation images, their CLIP image embeddings (N, D) or None when there are none)."""
    if not val_paths:
        return val_paths, None
    embeds, readable = compute_image_embeddings(clip, val_paths, cfg.clip_batch_size, "validation", True)
    return [p for p, ok in zip(val_paths, readable.tolist()) if ok], embeds[readable]


def validation_original(path, resolution: int) -> Image.Image:
    """A validation image as the trainer sees it (centre crop at the training resolution), for the grid."""
    pixels = load_training_image(path, resolution, center_crop=True)
    return Image.fromarray(((pixels.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())


def _split_validation(cfg: DecoderTrainConfig, paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training images, validation images): the named ones, or the last num_validation_images held out."""
    if cfg.validation_images:
        return paths, list_validation_images(list(cfg.validation_images))
    if cfg.num_validation_images > 0:
        if len(paths) <= cfg.num_validation_images:
            raise SystemExit(f"finetune: {cfg.train_data_dir} has {len(paths)} images; holding out "
                             f"--num_validation_images {cfg.num_validation_images} would leave none to train on")
        return paths[: -cfg.num_validation_images], paths[-cfg.num_validation_images:]
    return paths, []


def _write_output_folder(cfg, output_dir: Path, vae, unet, projection, inference_scheduler, empty_embedding) -> None:
    """The standard pipeline folder (fp32 weights, no text encoder) + projection, empty embedding, CLIP specs."""
    from diffusers import StableDiffusionPipeline

    from .decoder import write_decoder_files

    pipeline = StableDiffusionPipeline(
        vae=vae if vae.dtype == torch.float32 else vae.to(torch.float32), text_encoder=None, tokenizer=None,
        unet=unet if unet.dtype == torch.float32 else unet.to(torch.float32),
        scheduler=inference_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(output_dir))
    write_decoder_files(output_dir, projection, empty_embedding, cfg.clip_specs)


def train_decoder(cfg: DecoderTrainConfig) -> Path:
    """Fine-tune as configured; returns the output folder (load it with ``decoder.load_decoder``).
    ``decoder_type`` text_and_image trains an IP-Adapter instead, text a plain text-to-image UNet
    (``ip_adapter_training``)."""
    preflight(cfg)
    if cfg.decoder_type in CAPTION_TYPES:
        from .ip_adapter_training import train_text_image_decoder

        return train_text_image_decoder(cfg)
    if cfg.decoder_type == "gan":
        from .gan.training import train_gan_decoder

        return train_gan_decoder(cfg)
    from .ema import EmaWeights
    from .encoders import MultiCLIP

    output_dir = Path(cfg.output_dir)
    accelerator, trackers, paths, val_paths = start_run(cfg)
    device, world = accelerator.device, accelerator.num_processes
    weight_dtype = training.mixed_precision_dtype(accelerator)

    # ---- data + frozen CLIP embeddings
    clip = MultiCLIP(cfg.clip_specs, device=device, dtype=weight_dtype)
    paths, image_embeds, num_unreadable = readable_training_embeddings(cfg, accelerator, clip, paths)
    val_paths, val_embeds = validation_embeddings(cfg, clip, val_paths)
    empty_embedding, empty_source = empty_image_embedding(cfg, clip)
    clip_dim, clip_source = clip.dim, f"--clip_models {' '.join(cfg.clip_models)}"
    del clip
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    check_dim("the training image embeddings", f"{cfg.embedding_cache or 'computed'}", image_embeds.shape[1],
              clip_dim, clip_source)

    # ---- models, optimizer, schedule
    noise_scheduler, inference_scheduler, vae, unet = load_models(cfg)
    projection = build_projection(cfg, clip_dim, unet.config.cross_attention_dim)
    if projection.config.cross_attention_dim != unet.config.cross_attention_dim:
        raise ValueError(f"projection width {projection.config.cross_attention_dim} != the UNet's "
                         f"cross_attention_dim {unet.config.cross_attention_dim}")
    check_dim("the empty embedding", empty_source, empty_embedding.shape[0], projection.config.clip_dim,
              f"projection clip_dim from {clip_source}")
    vae.to(device)
    if weight_dtype != torch.float32:
        vae.to(dtype=weight_dtype)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    projection.train()
    optimizer = torch.optim.AdamW(
        [{"params": list(unet.parameters()), "lr": cfg.learning_rate},
         {"params": list(projection.parameters()), "lr": cfg.learning_rate * cfg.projection_lr_scale}],
        betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
    )
    dataset = ImageEmbeddingDataset(paths, image_embeds, cfg.resolution, cfg.center_crop)
    max_steps, lr_scheduler = step_schedule(cfg, optimizer, len(dataset), world)
    unet, projection, optimizer, lr_scheduler = accelerator.prepare(unet, projection, optimizer, lr_scheduler)
    trained_params = list(unet.parameters()) + list(projection.parameters())
    ema = training.build_ema(trained_params, cfg.use_ema, cfg.ema_decay, device)
    empty_on_device = empty_embedding.to(device)

    trained = {"unet": accelerator.unwrap_model(unet), "projection": accelerator.unwrap_model(projection)}
    global_step = training.resume_step(accelerator, output_dir, cfg.resume_from_checkpoint, modules=trained,
                                       optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema, config=cfg.to_dict())
    training.init_trackers(accelerator, trackers, "shifted-diffusion-decoder", cfg.to_dict())

    def validation_hook(step: int) -> Path:
        with EmaWeights(ema, trained_params):
            return run_validation(cfg, accelerator, vae, unet, projection, inference_scheduler, val_paths, val_embeds,
                                  empty_on_device, step)

    samples_per_step = cfg.train_batch_size * world * cfg.gradient_accumulation_steps
    logger.info(f"{len(dataset)} training images, {len(val_paths)} validation images, clip_dim {clip_dim}, batch "
                f"{samples_per_step}, {max_steps} steps, prediction_type {noise_scheduler.config.prediction_type}")
    step_log = training.StepLog(
        accelerator, max_steps=max_steps, initial_step=global_step, logging_steps=cfg.logging_steps,
        checkpointing_steps=cfg.checkpointing_steps, samples_per_step=samples_per_step, desc="decoder training",
        advice=f"Lower --learning_rate ({cfg.learning_rate}) or check the images")
    timing, steps_run = {"cpu_s": 0.0, "wall_s": 0.0}, 0

    def micro_batch_loss(batch, generator):
        return diffusion_loss(unet, projection, vae, noise_scheduler, batch, empty_on_device, generator=generator,
                              dropout_prob=cfg.conditioning_dropout_prob, random_flip=cfg.random_flip,
                              weight_dtype=weight_dtype)

    for global_step in training.optimizer_steps(
            accelerator, dataset, global_step=global_step, max_steps=max_steps, micro_batch_loss=micro_batch_loss,
            accumulate=(unet, projection), parameters=trained_params, max_grad_norm=cfg.max_grad_norm,
            optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema, step_log=step_log, seed=cfg.seed,
            batch_size=cfg.train_batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            num_workers=cfg.dataloader_num_workers, timing=timing):
        steps_run += 1
        if training.due(global_step, cfg.checkpointing_steps):
            path = save_checkpoint(accelerator, output_dir, global_step, modules=trained, optimizer=optimizer,
                                   lr_scheduler=lr_scheduler, ema=ema, config=cfg.to_dict(),
                                   total_limit=cfg.checkpoints_total_limit)
            logger.info(f"saved {path}")
        training.validate_if_due(accelerator, global_step, cfg.validation_steps if val_paths else 0,
                                 validation_hook, main_process_only=True)
    step_cpu_s, step_wall_s = timing["cpu_s"], timing["wall_s"]
    step_log.close()
    if steps_run:
        logger.info(f"trained {steps_run} steps: {step_cpu_s / steps_run:.3f} CPU s/step, "
                    f"{step_wall_s / steps_run:.3f} wall s/step (checkpointing and validation excluded)")

    # ---- the decoder folder, with the EMA weights when EMA is on
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(trained_params)
        _write_output_folder(cfg, output_dir, vae, trained["unet"], trained["projection"], inference_scheduler,
                             empty_embedding)
        summary = {"global_step": global_step, "steps_this_run": steps_run, "last_train_loss": step_log.last_loss,
                   "num_train_images": len(dataset), "num_unreadable_images": num_unreadable,
                   "cpu_s_per_step": step_cpu_s / max(steps_run, 1), "wall_s_per_step": step_wall_s / max(steps_run, 1)}
        (output_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        logger.info(f"decoder written to {output_dir} (load with shifted_diffusion.decoder.load_decoder)")
    accelerator.end_training()
    return output_dir
