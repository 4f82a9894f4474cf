"""Training the decoders that read captions: text + image (``DecoderTrainConfig.decoder_type = "text_and_image"``)
and text only (``"text"``, the base model the first one adds the embedding to).

Stable Diffusion's own text encoder (frozen) reads each image's caption (its first caption in the folder's
metadata.jsonl / .txt convention, "" when it has none); an IP-Adapter (``ip_adapter``: image projection of
the frozen multi-CLIP embedding x0 to 4 tokens + to_k_ip / to_v_ip per cross-attention layer, initialised from
the text ones) adds x0. Per sample, one uniform draw u picks the condition, so guidance works on either:
    u < p_text: empty caption; next p_image: zero image embedding; next p_both: both dropped; else both kept.
The UNet stays frozen (only the adapter trains) unless ``train_unet``. Loss, data order, per-step randomness,
checkpoints and exact resume are the language-free trainer's (``decoder_training``, ``training``).

The output folder: the stock StableDiffusionPipeline (text encoder and tokenizer included, the UNet without
the adapter), ``ip_adapter.safetensors`` (stock ``load_ip_adapter`` reads it) and ``shifted_decoder.json`` with
``"decoder_type": "text_and_image"``. A pretrained folder that already holds ``ip_adapter.safetensors``
continues from that adapter.

``decoder_type = "text"`` is Stable Diffusion's own text-to-image training on the same loop: no adapter and no
CLIP image embedding, the whole UNet trained, the caption replaced by "" with probability
``conditioning_dropout_prob``. Its output is a stock StableDiffusionPipeline folder (no shifted_decoder.json):
a text-to-image model, e.g. the toy world's base "Stable Diffusion" that a text_and_image run then extends.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import ip_adapter, training
from .checkpoints import save_checkpoint

logger = logging.getLogger(__name__)

DECODER_TYPE = "text_and_image"
TEXT_ONLY = "text"


def image_captions(folder: str, paths: list[Path]) -> list[str]:
    """The first caption of each image (the image folder convention of ``data.read_image_folder``), or ""."""
    from .data import read_image_folder
    from .webdata import location

    by_path = {location(record.path): record.captions for record in read_image_folder(folder)}
    return [(by_path.get(location(p)) or ("",))[0] for p in paths]


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids (N, tokenizer.model_max_length), padded and truncated as StableDiffusionPipeline does."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class CaptionedDataset(torch.utils.data.Dataset):
    """An ImageEmbeddingDataset with each item's caption token ids ("input_ids") added."""

    def __init__(self, images, input_ids: torch.Tensor):
        if len(images) != input_ids.shape[0]:
            raise ValueError(f"input_ids: expected {len(images)} rows (one per image), got {input_ids.shape[0]}")
        self.images, self.input_ids = images, input_ids

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {**self.images[index], "input_ids": self.input_ids[index]}


def condition_masks(bsz: int, *, generator, device, text_prob: float, image_prob: float, both_prob: float):
    """(drop_text, drop_image) boolean masks (B,) from one uniform draw per sample."""
    u = torch.rand(bsz, generator=generator, device=device)
    only_text = u < text_prob
    only_image = (u >= text_prob) & (u < text_prob + image_prob)
    both = (u >= text_prob + image_prob) & (u < text_prob + image_prob + both_prob)
    return only_text | both, only_image | both


def text_image_loss(unet, text_encoder, vae, noise_scheduler, batch: dict, empty_ids: torch.Tensor, *,
                    generator: torch.Generator, cfg, weight_dtype: torch.dtype) -> torch.Tensor:
    """The noise-prediction loss with encoder_hidden_states = (text states, [projected image tokens])."""
    from .decoder_training import noised_latents, prediction_target

    device = empty_ids.device
    latents, noise, timesteps, noisy = noised_latents(vae, noise_scheduler, batch, generator=generator,
                                                      random_flip=cfg.random_flip, weight_dtype=weight_dtype,
                                                      device=device)
    bsz = latents.shape[0]
    if cfg.decoder_type == TEXT_ONLY:  # the text-to-image base: captions dropped for guidance, no embedding
        drop_text = torch.rand(bsz, generator=generator, device=device) < cfg.conditioning_dropout_prob
        added = {}
    else:
        drop_text, drop_image = condition_masks(bsz, generator=generator, device=device,
                                                text_prob=cfg.text_dropout_prob, image_prob=cfg.image_dropout_prob,
                                                both_prob=cfg.both_dropout_prob)
        image_embeds = batch["image_embeds"].to(device, torch.float32)  # (B, D)
        image_embeds = torch.where(drop_image[:, None], torch.zeros_like(image_embeds), image_embeds)
        added = {"added_cond_kwargs": {"image_embeds": [image_embeds[:, None]]}}
    input_ids = torch.where(drop_text[:, None], empty_ids[None], batch["input_ids"].to(device))  # (B, L)
    with torch.no_grad():
        text_states = text_encoder(input_ids)[0].to(weight_dtype)  # (B, L, C)
    model_pred = unet(noisy, timesteps, text_states, return_dict=False, **added)[0]
    target = prediction_target(noise_scheduler, latents, noise, timesteps)
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def load_text_encoder(cfg):
    """The pretrained folder's tokenizer and (frozen) CLIP text encoder; SystemExit when it has none."""
    from transformers import CLIPTextModel, CLIPTokenizer

    where = f"--pretrained_model_name_or_path {cfg.pretrained_model_name_or_path}"
    local = Path(cfg.pretrained_model_name_or_path)
    if local.is_dir():
        missing = [name for name in ("tokenizer", "text_encoder") if not (local / name).is_dir()]
        if missing:
            raise SystemExit(f"finetune: --decoder_type {cfg.decoder_type} needs the tokenizer and text_encoder of "
                             f"{where} (missing: {', '.join(missing)})")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(cfg.pretrained_model_name_or_path, subfolder="tokenizer",
                                                  revision=cfg.revision)
        text_encoder = CLIPTextModel.from_pretrained(cfg.pretrained_model_name_or_path, subfolder="text_encoder",
                                                     revision=cfg.revision, variant=cfg.variant)
    except (OSError, ValueError) as error:
        raise SystemExit(f"finetune: --decoder_type {cfg.decoder_type} needs the tokenizer and text_encoder of "
                         f"{where} ({error})") from error
    positions = text_encoder.config.max_position_embeddings
    if tokenizer.model_max_length > positions:
        raise SystemExit(f"finetune: {where}: the tokenizer pads to {tokenizer.model_max_length} tokens, the text "
                         f"encoder has {positions} positions")
    return tokenizer, text_encoder.requires_grad_(False).eval()


def initial_adapter(cfg, unet, clip_dim: int) -> dict:
    """The pretrained folder's adapter (continuing a text+image decoder) or a new one seeded by cfg.seed."""
    existing = Path(cfg.pretrained_model_name_or_path) / ip_adapter.ADAPTER_WEIGHT_NAME
    if existing.is_file():
        state = ip_adapter.load_adapter_state(existing)
        dim = ip_adapter.check_adapter_state(state, unet, source=str(existing))
        if dim != clip_dim:
            raise SystemExit(f"finetune: {existing} takes embeddings of dim {dim}; --clip_models give {clip_dim}")
        logger.info(f"continuing from the adapter in {existing}")
        return state
    return ip_adapter.init_adapter_state(unet, clip_dim, generator=torch.Generator().manual_seed(cfg.seed))


def write_output_folder(cfg, output_dir: Path, vae, text_encoder, tokenizer, unet, scheduler, clip_dim: int) -> None:
    """Stock pipeline (the UNet without the adapter) + ip_adapter.safetensors + shifted_decoder.json; the text-only
    decoder (clip_dim 0): the stock pipeline alone."""
    from diffusers import StableDiffusionPipeline

    from .decoder import DECODER_CONFIG_NAME
    from .encoders import resolve_clip_spec

    state = ip_adapter.detach_adapter(unet) if clip_dim else None
    pipeline = StableDiffusionPipeline(
        vae=vae.to(torch.float32), text_encoder=text_encoder.to(torch.float32), tokenizer=tokenizer,
        unet=unet.to(torch.float32), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipeline.save_pretrained(str(output_dir))
    if state is None:
        return
    ip_adapter.save_adapter(state, output_dir)
    config = {"decoder_type": DECODER_TYPE, "clip_models": [list(resolve_clip_spec(*s)) for s in cfg.clip_specs],
              "clip_dim": int(clip_dim), "adapter_weights": ip_adapter.ADAPTER_WEIGHT_NAME,
              "num_tokens": ip_adapter.NUM_TOKENS, "negative_image_embedding": "zeros"}
    (output_dir / DECODER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def run_validation(cfg, accelerator, vae, text_encoder, tokenizer, unet, scheduler, clip_dim: int, val_paths,
                   val_embeds, val_captions, step: int) -> Path:
    """A grid under validation/, one row per held-out image: the image | from its embedding alone (caption "") |
    embedding + its caption | its caption alone (image scale 0: the text-only model); the text-only decoder
    (clip_dim 0): the image | its caption."""
    from diffusers import StableDiffusionPipeline

    from .decoder_training import save_validation_grid, validation_original
    from .text_image_decoder import TextImageDecoder

    model = accelerator.unwrap_model(unet)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=model, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    generator = torch.Generator(device=accelerator.device).manual_seed(cfg.seed or 0)
    common = dict(guidance_scale=cfg.validation_guidance_scale, num_inference_steps=cfg.validation_num_inference_steps,
                  generator=generator, height=cfg.resolution, width=cfg.resolution)
    model.eval()
    rows = []
    if not clip_dim:
        pipeline.set_progress_bar_config(disable=True)
        try:
            for path, caption in zip(val_paths, val_captions):
                with accelerator.autocast():
                    rows.append([validation_original(path, cfg.resolution), *pipeline(caption, **common).images])
        finally:
            model.train()
        return save_validation_grid(cfg, rows, step, "image | its caption")
    decoder = TextImageDecoder(pipeline, clip_dim, cfg.clip_specs)
    try:
        for path, embed, caption in zip(val_paths, val_embeds, val_captions):
            embed = embed[None].to(accelerator.device)
            row = [validation_original(path, cfg.resolution)]
            with accelerator.autocast():
                row += decoder.generate(embed, prompts="", **common)
                row += decoder.generate(embed, prompts=caption, **common)
                decoder.set_image_scale(0.0)
                row += decoder.generate(embed, prompts=caption, **common)
                decoder.set_image_scale(1.0)
            rows.append(row)
    finally:
        decoder.set_image_scale(1.0)
        model.train()
    return save_validation_grid(cfg, rows, step, "image | embedding | embedding + caption | caption")


def train_text_image_decoder(cfg) -> Path:
    """Train the text + image (or the text-only) decoder as configured; returns the output folder."""
    from .decoder_data import ImageEmbeddingDataset, readable_training_embeddings
    from .decoder_training import SUMMARY_NAME, load_models, start_run, step_schedule, validation_embeddings
    from .ema import EmaWeights
    from .encoders import MultiCLIP

    output_dir = Path(cfg.output_dir)
    accelerator, trackers, paths, val_paths = start_run(cfg)
    device, world = accelerator.device, accelerator.num_processes
    weight_dtype = training.mixed_precision_dtype(accelerator)

    with_image = cfg.decoder_type != TEXT_ONLY
    if with_image:
        clip = MultiCLIP(cfg.clip_specs, device=device, dtype=weight_dtype)
        paths, image_embeds, _ = readable_training_embeddings(cfg, accelerator, clip, paths)
        val_paths, val_embeds = validation_embeddings(cfg, clip, val_paths)
        clip_dim = clip.dim
        del clip
    else:  # no CLIP pass: zero-width embeddings keep the dataset's items
        try:
            training.check_batches(len(paths), cfg.train_batch_size, world, f"training images in {cfg.train_data_dir}")
        except ValueError as error:
            raise SystemExit(f"finetune: {error}") from error
        image_embeds, val_embeds, clip_dim = torch.zeros(len(paths), 0), None, 0

    noise_scheduler, inference_scheduler, vae, unet = load_models(cfg)
    tokenizer, text_encoder = load_text_encoder(cfg)
    train_unet = cfg.train_unet or not with_image
    unet.requires_grad_(train_unet)
    if with_image:
        ip_adapter.attach_adapter(unet, initial_adapter(cfg, unet, clip_dim))
        for parameter in ip_adapter.adapter_parameters(unet):
            parameter.requires_grad_(True)
    vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    trained_params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained_params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    captions = image_captions(cfg.train_data_dir, paths)
    dataset = CaptionedDataset(ImageEmbeddingDataset(paths, image_embeds, cfg.resolution, cfg.center_crop),
                               tokenize(tokenizer, captions))
    empty_ids = tokenize(tokenizer, [""])[0].to(device)
    max_steps, lr_scheduler = step_schedule(cfg, optimizer, len(dataset), world)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    trained_params = [p for p in unet.parameters() if p.requires_grad]
    ema = training.build_ema(trained_params, cfg.use_ema, cfg.ema_decay, device)
    # a frozen UNet is the base model's: checkpoints hold only the adapter's weights (shared with the UNet)
    unwrapped = accelerator.unwrap_model(unet)
    trained = {"unet": unwrapped} if train_unet else {"ip_adapter": ip_adapter.adapter_module(unwrapped)}
    global_step = training.resume_step(accelerator, output_dir, cfg.resume_from_checkpoint, modules=trained,
                                       optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema, config=cfg.to_dict())
    training.init_trackers(accelerator, trackers, "shifted-diffusion-text-image-decoder" if with_image else
                           "shifted-diffusion-text-decoder", cfg.to_dict())
    val_captions = image_captions(cfg.train_data_dir, val_paths)

    def validation_hook(step: int) -> Path:
        with EmaWeights(ema, trained_params):
            return run_validation(cfg, accelerator, vae, text_encoder, tokenizer, unet, inference_scheduler, clip_dim,
                                  val_paths, val_embeds, val_captions, step)

    samples_per_step = cfg.train_batch_size * world * cfg.gradient_accumulation_steps
    logger.info(f"{len(val_paths)} validation images; "
                f"{len(dataset)} training images ({sum(bool(c) for c in captions)} captioned), clip_dim {clip_dim}, "
                f"{sum(p.numel() for p in trained_params)} trained weights, {max_steps} steps")
    step_log = training.StepLog(
        accelerator, max_steps=max_steps, initial_step=global_step, logging_steps=cfg.logging_steps,
        checkpointing_steps=cfg.checkpointing_steps, samples_per_step=samples_per_step,
        desc="text+image decoder training" if with_image else "text-to-image training",
        advice=f"Lower --learning_rate ({cfg.learning_rate}) or check the images")
    steps_run, wall_start = 0, time.perf_counter()

    def micro_batch_loss(batch, generator):
        return text_image_loss(unet, text_encoder, vae, noise_scheduler, batch, empty_ids, generator=generator,
                               cfg=cfg, weight_dtype=weight_dtype)

    for global_step in training.optimizer_steps(
            accelerator, dataset, global_step=global_step, max_steps=max_steps, micro_batch_loss=micro_batch_loss,
            accumulate=(unet,), parameters=trained_params, max_grad_norm=cfg.max_grad_norm, optimizer=optimizer,
            lr_scheduler=lr_scheduler, ema=ema, step_log=step_log, seed=cfg.seed, batch_size=cfg.train_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_workers=cfg.dataloader_num_workers):
        steps_run += 1
        if training.due(global_step, cfg.checkpointing_steps):
            path = save_checkpoint(accelerator, output_dir, global_step, modules=trained, optimizer=optimizer,
                                   lr_scheduler=lr_scheduler, ema=ema, config=cfg.to_dict(),
                                   total_limit=cfg.checkpoints_total_limit)
            logger.info(f"saved {path}")
        training.validate_if_due(accelerator, global_step, cfg.validation_steps if val_paths else 0,
                                 validation_hook, main_process_only=True)
    step_log.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(trained_params)
        write_output_folder(cfg, output_dir, vae, text_encoder, tokenizer, unwrapped, inference_scheduler,
                            clip_dim)
        summary = {"global_step": global_step, "steps_this_run": steps_run, "last_train_loss": step_log.last_loss,
                   "num_train_images": len(dataset), "decoder_type": cfg.decoder_type,
                   "wall_s": time.perf_counter() - wall_start}
        (output_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        logger.info(f"{'text+image decoder' if with_image else 'text-to-image model'} written to {output_dir}")
    accelerator.end_training()
    return output_dir
