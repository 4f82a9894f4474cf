"""Training the GAN decoder (``DecoderTrainConfig.decoder_type = "gan"``): Lafite's language-free recipe on the
training core of the other decoders (``training``: data order, accumulation, logging, EMA, checkpoints, exact
resume).

The first ``gan_generator_warmup_steps`` optimizer steps train the generator alone (its non-adversarial losses);
after them steps alternate: even steps (counted from the end of the warm-up) update the discriminator, odd steps the
generator (one optimizer holds both networks' weights in two parameter groups; Adam steps only the weights that
received gradients, so each step moves one player; the phase is a function of the step number, hence exact resume).
Without an adversarial or a discriminator-feature loss there are no D steps at all. Per step, from the batch's
images x and CLIP image embeddings c (the same folder and embedding cache as the diffusion decoder; captions unused):
c' = the perturbed, block-normalised conditioning (``losses.perturb_conditioning``), z ~ N(0, I), fake = G(z, c').
* D step: non-saturating loss on D(x, c') and D(fake, c'), the contrastive loss between D's features of x and c'
  (weight ``gan_d_contrastive_weight``), and every ``gan_r1_interval``-th D step R1 on x times the interval;
* G step: after the warm-up the non-saturating loss on D(fake, c') (``gan_adversarial_weight``) with D's weights
  detached (gradients reach only G) and the contrastive loss between D's features of fake and c'; always the
  contrastive loss between the CLIP image embedding of fake (the decoder's frozen CLIPs, gradients through their
  image towers) and c' (``gan_clip_contrastive_weight``) and the squared error between fake and x
  (``gan_reconstruction_weight``).
EMA (``--use_ema``) averages the generator only. ``--max_train_steps`` counts D and G steps together.

The output folder: ``generator/`` (diffusers ModelMixin folder), ``shifted_decoder.json`` (``"decoder_type":
"gan"``, the CLIP specs, the truncation) and the run's config; checkpoints also hold the discriminator.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from .. import training
from ..checkpoints import save_checkpoint
from .losses import (contrastive_loss, discriminator_adversarial, generator_adversarial, perturb_conditioning,
                     r1_penalty, reconstruction_loss)
from .networks import Discriminator, Generator, normalize_blocks

logger = logging.getLogger(__name__)

DECODER_TYPE = "gan"
GENERATOR_SUBFOLDER = "generator"


def build_networks(cfg, clip_dim: int, block_sizes) -> tuple:
    """(Generator, Discriminator) of the config, initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    common = dict(clip_dim=clip_dim, block_sizes=list(block_sizes), resolution=cfg.resolution,
                  channel_base=cfg.gan_channel_base, channel_max=cfg.gan_channel_max)
    generator = Generator(z_dim=cfg.gan_z_dim, w_dim=cfg.gan_w_dim, mapping_layers=cfg.gan_mapping_layers,
                          input_from_style=cfg.gan_input_from_style, mapping_lr_mul=cfg.gan_mapping_lr_mul, **common)
    return generator, Discriminator(**common)


def build_optimizer(cfg, generator, discriminator) -> torch.optim.AdamW:
    """One AdamW over both networks: group 0 the generator (``--adam_beta1``), group 1 the discriminator
    (``--gan_d_adam_beta1`` when given)."""
    d_beta1 = cfg.adam_beta1 if cfg.gan_d_adam_beta1 is None else cfg.gan_d_adam_beta1
    return torch.optim.AdamW(
        [{"params": list(generator.parameters())},
         {"params": list(discriminator.parameters()), "betas": (d_beta1, cfg.adam_beta2)}],
        lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon)


def uses_discriminator(cfg) -> bool:
    """Whether the generator's losses read the discriminator (otherwise D never trains)."""
    return cfg.gan_adversarial_weight > 0 or cfg.gan_d_contrastive_weight > 0


def is_discriminator_step(step: int, warmup_steps: int = 0, adversarial: bool = True) -> bool:
    """Optimizer step ``step`` (0-based: the step being computed) updates D when, past the generator's
    ``warmup_steps``, it is an even step counted from there; every other step updates G."""
    return adversarial and step >= warmup_steps and (step - warmup_steps) % 2 == 0


def updates_discriminator(cfg, step: int) -> bool:
    """Whether optimizer step ``step`` of this run is a D step (its warm-up and losses decide)."""
    return is_discriminator_step(step, cfg.gan_generator_warmup_steps, uses_discriminator(cfg))


def discriminator_step_index(step: int, warmup_steps: int = 0) -> int:
    """How many D steps came before D step ``step`` (R1's lazy schedule counts these)."""
    return (step - warmup_steps) // 2


def gan_loss(cfg, generator, discriminator, clip, batch: dict, step: int, rng: torch.Generator,
             device) -> torch.Tensor:
    """The loss of optimizer step ``step`` on one micro-batch: D's when ``is_discriminator_step(step)``, else G's."""
    images = batch["pixel_values"].to(device)
    embeds = batch["image_embeds"].to(device)
    block_sizes = generator_config(generator).block_sizes
    condition = perturb_conditioning(normalize_blocks(embeds, block_sizes), cfg.gan_perturbation, rng)
    z = torch.randn(images.shape[0], generator_config(generator).z_dim, device=device, generator=rng)
    tau = cfg.gan_contrastive_temperature
    warmup = cfg.gan_generator_warmup_steps
    if updates_discriminator(cfg, step):
        with torch.no_grad():
            fake = generator(z, condition, generator=rng)
        r1_due = cfg.gan_r1_gamma > 0 and discriminator_step_index(step, warmup) % cfg.gan_r1_interval == 0
        images = images.detach().requires_grad_(r1_due)
        real_logits, real_features = discriminator(images, condition)
        fake_logits, _ = discriminator(fake, condition)
        loss = discriminator_adversarial(real_logits, fake_logits)
        if cfg.gan_d_contrastive_weight > 0:
            loss = loss + cfg.gan_d_contrastive_weight * contrastive_loss(real_features, condition, tau)
        else:  # the feature head stays in the graph with a zero gradient (DDP expects every weight to get one)
            loss = loss + 0.0 * real_features.sum()
        if r1_due:
            loss = loss + 0.5 * cfg.gan_r1_gamma * cfg.gan_r1_interval * r1_penalty(real_logits, images)
        return loss
    fake = generator(z, condition, generator=rng, update_w_avg=True)
    loss = fake.new_zeros((), dtype=torch.float32)
    if uses_discriminator(cfg) and step >= warmup:
        model = getattr(discriminator, "module", discriminator)
        frozen = {name: value.detach() for name, value in [*model.named_parameters(), *model.named_buffers()]}
        fake_logits, fake_features = torch.func.functional_call(model, frozen, (fake, condition))
        if cfg.gan_adversarial_weight > 0:
            loss = loss + cfg.gan_adversarial_weight * generator_adversarial(fake_logits)
        if cfg.gan_d_contrastive_weight > 0:
            loss = loss + cfg.gan_d_contrastive_weight * contrastive_loss(fake_features, condition, tau)
    if cfg.gan_clip_contrastive_weight > 0:
        fake_clip = normalize_blocks(clip.encode_image_tensor(fake), block_sizes)
        loss = loss + cfg.gan_clip_contrastive_weight * contrastive_loss(fake_clip, condition, tau)
    if cfg.gan_reconstruction_weight > 0:
        loss = loss + cfg.gan_reconstruction_weight * reconstruction_loss(fake, images)
    return loss


def generator_config(generator):
    return getattr(generator, "module", generator).config


def write_output_folder(cfg, output_dir: Path, generator) -> None:
    """generator/ + shifted_decoder.json (decoder_type gan)."""
    from ..decoder import DECODER_CONFIG_NAME
    from ..encoders import resolve_clip_spec

    generator.save_pretrained(str(output_dir / GENERATOR_SUBFOLDER))
    config = {"decoder_type": DECODER_TYPE, "clip_models": [list(resolve_clip_spec(*s)) for s in cfg.clip_specs],
              "clip_dim": int(generator.config.clip_dim), "generator_subfolder": GENERATOR_SUBFOLDER,
              "resolution": int(generator.config.resolution), "truncation_psi": float(cfg.gan_truncation_psi)}
    (output_dir / DECODER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def run_validation(cfg, accelerator, generator, clip_specs, val_paths, val_embeds, step: int) -> Path:
    """A grid under validation/: per held-out image, the image | two generations from its embedding."""
    from ..decoder_training import save_validation_grid, validation_original
    from .decoder import GanDecoder

    model = accelerator.unwrap_model(generator)
    model.eval()
    try:
        decoder = GanDecoder(model, clip_specs, cfg.gan_truncation_psi)
        rows = []
        for k, (path, embed) in enumerate(zip(val_paths, val_embeds)):
            seeds = [torch.Generator(device=accelerator.device).manual_seed(cfg.seed * 1000 + 2 * k + j)
                     for j in range(2)]
            images = decoder.generate(embed[None].expand(2, -1).to(accelerator.device), generator=seeds)
            rows.append([validation_original(path, cfg.resolution), *images])
    finally:
        model.train()
    return save_validation_grid(cfg, rows, step, "image | two generations from its embedding")


def train_gan_decoder(cfg) -> Path:
    """Train the GAN decoder as configured; returns the output folder (``decoder.load_decoder`` loads it)."""
    from ..decoder_data import ImageEmbeddingDataset, readable_training_embeddings
    from ..decoder_training import SUMMARY_NAME, start_run, step_schedule, validation_embeddings
    from ..ema import EmaWeights
    from ..encoders import MultiCLIP

    output_dir = Path(cfg.output_dir)
    accelerator, trackers, paths, val_paths = start_run(cfg)
    device, world = accelerator.device, accelerator.num_processes
    clip = MultiCLIP(cfg.clip_specs, device=device)  # float32: gradients flow through its image towers
    for model in clip.models:
        model.requires_grad_(False).eval()
    paths, image_embeds, num_unreadable = readable_training_embeddings(cfg, accelerator, clip, paths)
    val_paths, val_embeds = validation_embeddings(cfg, clip, val_paths)

    generator, discriminator = build_networks(cfg, clip.dim, clip.block_sizes)
    optimizer = build_optimizer(cfg, generator, discriminator)
    dataset = ImageEmbeddingDataset(paths, image_embeds, cfg.resolution, cfg.center_crop)
    max_steps, lr_scheduler = step_schedule(cfg, optimizer, len(dataset), world)
    generator, discriminator, optimizer, lr_scheduler = accelerator.prepare(generator, discriminator, optimizer,
                                                                             lr_scheduler)
    g_params = list(generator.parameters())
    parameters = g_params + list(discriminator.parameters())
    ema = training.build_ema(g_params, cfg.use_ema, cfg.ema_decay, device)
    trained = {"generator": accelerator.unwrap_model(generator),
               "discriminator": accelerator.unwrap_model(discriminator)}
    global_step = training.resume_step(accelerator, output_dir, cfg.resume_from_checkpoint, modules=trained,
                                       optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema, config=cfg.to_dict())
    training.init_trackers(accelerator, trackers, "shifted-diffusion-gan-decoder", cfg.to_dict())
    samples_per_step = cfg.train_batch_size * world * cfg.gradient_accumulation_steps
    logger.info(f"{len(dataset)} training images, {len(val_paths)} validation images, clip_dim {clip.dim}, "
                f"generator {sum(p.numel() for p in g_params)} weights, {max_steps} steps (D and G alternating)")
    step_log = training.StepLog(
        accelerator, max_steps=max_steps, initial_step=global_step, logging_steps=cfg.logging_steps,
        checkpointing_steps=cfg.checkpointing_steps, samples_per_step=samples_per_step, desc="GAN decoder training",
        advice=f"Lower --learning_rate ({cfg.learning_rate}) or raise --gan_r1_gamma ({cfg.gan_r1_gamma})")
    micro = {"count": global_step * cfg.gradient_accumulation_steps}
    phase_sums = {"d": torch.zeros((), device=device), "g": torch.zeros((), device=device)}
    phase_counts = {"d": 0, "g": 0}

    def micro_batch_loss(batch, rng):
        step = micro["count"] // cfg.gradient_accumulation_steps
        micro["count"] += 1
        loss = gan_loss(cfg, generator, discriminator, clip, batch, step, rng, device)
        phase = "d" if updates_discriminator(cfg, step) else "g"
        phase_sums[phase] += loss.detach().float()
        phase_counts[phase] += 1
        return loss

    def validation_hook(step: int) -> Path:
        with EmaWeights(ema, g_params):
            return run_validation(cfg, accelerator, generator, cfg.clip_specs, val_paths, val_embeds, step)

    steps_run, wall_start = 0, time.perf_counter()
    for global_step in training.optimizer_steps(
            accelerator, dataset, global_step=global_step, max_steps=max_steps, micro_batch_loss=micro_batch_loss,
            accumulate=(generator, discriminator), parameters=parameters, max_grad_norm=cfg.max_grad_norm,
            optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema, ema_parameters=g_params, step_log=step_log,
            seed=cfg.seed, batch_size=cfg.train_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_workers=cfg.dataloader_num_workers):
        steps_run += 1
        if global_step % cfg.logging_steps == 0 and any(phase_counts.values()):
            accelerator.log({f"train/{phase}_loss": float(phase_sums[phase]) / phase_counts[phase]
                             for phase in ("d", "g") if phase_counts[phase]}, step=global_step)
            for phase in ("d", "g"):
                phase_sums[phase].zero_()
                phase_counts[phase] = 0
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
            ema.copy_to(g_params)
        write_output_folder(cfg, output_dir, trained["generator"])
        summary = {"global_step": global_step, "steps_this_run": steps_run, "last_train_loss": step_log.last_loss,
                   "num_train_images": len(dataset), "num_unreadable_images": num_unreadable,
                   "decoder_type": DECODER_TYPE, "wall_s": time.perf_counter() - wall_start}
        (output_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        logger.info(f"GAN decoder written to {output_dir}")
    accelerator.end_training()
    return output_dir
