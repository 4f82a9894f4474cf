"""Prior training with accelerate: embedding cache -> vocabulary -> shifted diffusion prior.

Only this module and the scripts touch ``accelerate``. Randomness of each optimisation micro-step
(timesteps, noise, condition dropout) comes from a generator seeded by (seed, process, micro-step) and
the data order from (seed, epoch), so a resumed run takes exactly the steps of an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch

from . import training
from .checkpoints import save_checkpoint
from .cache import EmbeddingDataset, load_image_embeddings, load_manifest, precompute
from .eclipse import EclipseLoss
from .loss import LossConfig, ShiftedDiffusionLoss
from .metrics import blockwise_cosine
from .prior import PriorConfig, ShiftedPrior
from .prior_pipeline import ShiftedDiffusionPriorPipeline, build_pipeline, save_prior
from .schedule import DiffusionSchedule, ScheduleConfig
from .encoders import parse_clip_specs
from .train_config import TrainConfig
from .vocab import ClusterVocab, StandardNormalShift

logger = logging.getLogger(__name__)

# ---- pieces of the run, each from the config ---------------------------------------------------


def encoder_settings(cfg: TrainConfig) -> dict:
    """The encoder fields saved with the prior, so that sampling encodes prompts the same way."""
    return {
        "clip_models": list(cfg.clip_models),
        "t5_model": cfg.t5_model,
        "text_max_length": cfg.text_max_length,
        "t5_masked": cfg.t5_masked,
    }


def build_caption_encoder(cfg: TrainConfig, device):
    """The frozen word-level text encoder of ``cfg.t5_model`` on ``device`` ("none": no tokens)."""
    from .encoders import build_text_encoder

    if cfg.t5_model.lower() == "none":
        return build_text_encoder("none")
    return build_text_encoder(cfg.t5_model, max_length=cfg.text_max_length, masked=cfg.t5_masked,
                              offload=cfg.t5_offload, device=device, dtype=cfg.encoder_dtype)


def build_embedding_cache(cfg: TrainConfig, cache_dir: Path, device, process_index: int = 0,
                          num_processes: int = 1) -> dict:
    """Embed the image folder once with the frozen encoders (finished shards are reused); under several
    processes each embeds its share of the shards (``cache.precompute``). With ``text_encoding`` online the
    cache holds no token states (the text encoder runs in the training step)."""
    from .cache import TEXT_DTYPES
    from .encoders import MultiCLIP, build_text_encoder

    if cfg.train_data_dir is None:
        raise ValueError("train_data_dir is not set")
    clip = MultiCLIP(parse_clip_specs(cfg.clip_models), device=device, dtype=cfg.encoder_dtype)
    text_encoder = build_text_encoder("none") if cfg.text_encoding == "online" else build_caption_encoder(cfg, device)
    manifest = precompute(
        cfg.train_data_dir, cache_dir, clip, text_encoder, batch_size=cfg.encoder_batch_size,
        image_column=cfg.image_column, caption_column=cfg.caption_column,
        text_dtype=TEXT_DTYPES[cfg.cache_text_dtype], process_index=process_index, num_processes=num_processes,
    )
    del clip, text_encoder
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return manifest


def build_shift(cfg: TrainConfig, cache_dir: Path, train_images: torch.Tensor, vocab_file: Path, clip_dim: int, device):
    """The baseline N(0, I), a given vocabulary, the one fitted earlier in this run, or a new fit."""
    if cfg.baseline:
        return StandardNormalShift(clip_dim)
    path = Path(cfg.vocab_path) if cfg.vocab_path else vocab_file
    if path.is_file():
        vocab = ClusterVocab.load(path)
        if vocab.dim != clip_dim:
            raise ValueError(f"vocabulary {path} has dim {vocab.dim} but the cached CLIP image embeddings have dim {clip_dim}")
        if cfg.vocab_path is None and (vocab.num_clusters, vocab.std_scale) != (min(cfg.vocab_size, len(train_images)), cfg.std_scale):
            raise ValueError(f"{path} (K={vocab.num_clusters}, std_scale={vocab.std_scale}) was fitted with other "
                             f"settings than vocab_size={cfg.vocab_size}, std_scale={cfg.std_scale}; use another output_dir")
        return ClusterVocab(vocab.means, vocab.stds, std_scale=cfg.std_scale) if cfg.vocab_path else vocab
    if cfg.vocab_path:
        raise FileNotFoundError(f"vocab_path {cfg.vocab_path}: no such file")
    image_emb = load_image_embeddings(cache_dir)[train_images]
    num_clusters = min(cfg.vocab_size, len(image_emb))
    if num_clusters < cfg.vocab_size:
        logger.info(f"[vocab] only {len(image_emb)} training images: fitting {num_clusters} clusters instead of "
                    f"{cfg.vocab_size}")
    vocab = ClusterVocab.fit(image_emb, num_clusters, std_scale=cfg.std_scale, iters=cfg.kmeans_iters,
                             seed=cfg.seed, device=device, progress=True)
    vocab.save(vocab_file)
    return vocab


def build_pseudo_text(cfg: TrainConfig, cache_dir: Path, train_set: EmbeddingDataset, null_text_tokens: torch.Tensor,
                      device, sample_pairs: int = 4096):
    """The semi-supervised mixer (``pseudo_text.PseudoTextMixer``) over the uncaptioned training images, with
    the text-norm scale and (unless ``pseudo_text_noise`` is set) the matched noise levels measured on a seeded
    sample of the captioned training pairs -> (mixer, summary for the log and the prior's record)."""
    from .cache import load_image_records
    from .pseudo_text import PseudoTextMixer, block_norms, matched_noise

    records = load_image_records(cache_dir)
    uncaptioned = [i for i in train_set.image_indices.tolist() if not records[i]["captions"]]
    if not uncaptioned:
        raise ValueError(f"--pseudo_text_fraction {cfg.pseudo_text_fraction}: every training image in "
                         f"{cfg.train_data_dir} has a caption; there are no uncaptioned images to add")
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed))[:sample_pairs]
    items = [train_set[int(i)] for i in order]
    image_emb = torch.stack([item["clip_image"].float() for item in items])  # (n, D)
    text_emb = torch.stack([item["clip_text"].float() for item in items])  # (n, D)
    noise = matched_noise(image_emb, text_emb, train_set.block_sizes) if cfg.pseudo_text_noise is None \
        else torch.full((len(train_set.block_sizes),), float(cfg.pseudo_text_noise))
    storage = torch.float16 if train_set.manifest["clip_dtype"] == "float16" else torch.float32
    images = load_image_embeddings(cache_dir)[torch.tensor(uncaptioned)].to(device, storage)  # (N_u, D)
    mixer = PseudoTextMixer(images, train_set.block_sizes, block_norms(text_emb, train_set.block_sizes),
                            null_text_tokens, fraction=cfg.pseudo_text_fraction, noise=noise)
    if not 0 < mixer.rows(cfg.train_batch_size) < cfg.train_batch_size:
        raise ValueError(f"--pseudo_text_fraction {cfg.pseudo_text_fraction} of --train_batch_size "
                         f"{cfg.train_batch_size} rounds to {mixer.rows(cfg.train_batch_size)} pseudo text rows per "
                         "batch; choose a fraction that leaves at least one pseudo and one captioned row")
    summary = {"uncaptioned_images": len(uncaptioned), "rows_per_batch": mixer.rows(cfg.train_batch_size),
               "noise": [round(x, 4) for x in noise.tolist()],
               "noise_source": "matched to the captioned pairs" if cfg.pseudo_text_noise is None else "set"}
    return mixer, summary


def prior_config(cfg: TrainConfig, manifest: dict, vocab_size: Optional[int]) -> PriorConfig:
    """The preset, with dims from the embedding cache and the width/depth/heads overrides."""
    overrides = dict(clip_dim=int(manifest["clip_dim"]), text_dim=max(int(manifest["text_dim"]), 1),
                     text_len=int(manifest["text_len"]), vocab_size=vocab_size,
                     grad_checkpointing=cfg.gradient_checkpointing)
    for name, field in (("model_width", "width"), ("model_layers", "depth"), ("model_num_heads", "heads")):
        if getattr(cfg, name) is not None:
            overrides[field] = getattr(cfg, name)
    return PriorConfig.preset(cfg.model_preset, **overrides)


def to_device(batch: dict, device, text_encoder=None) -> dict:
    """The embeddings of a batch on ``device`` as float32 (the loader may hand over their storage dtypes);
    with ``text_encoder`` (online text encoding) the token states are those of the batch's captions."""
    out = {key: batch[key].to(device, non_blocking=True).float() for key in ("clip_image", "clip_text", "text_tokens")}
    if text_encoder is not None:  # (B, L, E); a copy made outside inference mode, so autograd may save it
        out["text_tokens"] = text_encoder.encode(batch["caption"]).to(device).float().clone()
    return out


def cache_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(cache_dir).glob("*.safetensors"))


@torch.no_grad()
def validate(pipeline: ShiftedDiffusionPriorPipeline, dataset: EmbeddingDataset, cfg: TrainConfig, device,
             text_encoder=None) -> dict:
    """cosine(generated, ground-truth image embedding) per CLIP block and their mean, on held-out pairs."""
    count = min(len(dataset), cfg.num_validation_samples)
    if count == 0:
        return {}
    batch = to_device(torch.utils.data.default_collate([dataset[i] for i in range(count)]), device, text_encoder)
    generated = pipeline.sample(
        batch["clip_text"], batch["text_tokens"], num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
        generator=torch.Generator(device=device).manual_seed(cfg.seed),
    )
    per_block, mean = blockwise_cosine(generated.float().cpu(), batch["clip_image"].float().cpu(), dataset.block_sizes)
    metrics = {f"cos_gt_block{i}": float(v) for i, v in enumerate(per_block.mean(0))}
    metrics["cos_gt"] = float(mean.mean())
    return metrics


# ---- the run -----------------------------------------------------------------------------------


def preflight(cfg: TrainConfig) -> None:
    """The inputs a run reads later, checked before any work (embedding, k-means) is spent."""
    from .checkpoints import read_state

    if cfg.train_data_dir is not None:
        from .webdata import expand_shards, is_shard_source

        if is_shard_source(cfg.train_data_dir):
            expand_shards(cfg.train_data_dir)  # every named shard exists, none compressed
        elif not Path(cfg.train_data_dir).is_dir():
            raise FileNotFoundError(f"train_data_dir {cfg.train_data_dir}: no such folder")
    if cfg.vocab_path and not cfg.baseline:
        try:
            ClusterVocab.load(cfg.vocab_path)
        except FileNotFoundError:
            raise FileNotFoundError(f"vocab_path {cfg.vocab_path}: no such file") from None
        except Exception as error:  # safetensors / key errors of a file that is not a vocabulary
            raise ValueError(f"vocab_path {cfg.vocab_path}: not a vocabulary file written by ClusterVocab.save "
                             f"({type(error).__name__}: {error})") from error
    if cfg.resume_from_checkpoint and cfg.resume_from_checkpoint != "latest":
        read_state(cfg.resume_from_checkpoint)


def train_prior(cfg: TrainConfig) -> Path:
    """Train a prior as configured; returns the ``<output_dir>/prior`` folder."""
    preflight(cfg)
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from .ema import EmaWeights

    output_dir = Path(cfg.output_dir)
    # every process embeds its share of the dataset; the main process fits the vocabulary while the others wait
    accelerator, trackers = training.build_accelerator(
        output_dir, mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        report_to=cfg.report_to)
    device, world = accelerator.device, accelerator.num_processes
    log = logger.info
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(output_dir / "train_config.json")

    # embeddings, once (each process its share of the shards), then everyone reads the cache
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else output_dir / "embeddings"
    start = time.time()
    build_embedding_cache(cfg, cache_dir, device, accelerator.process_index, world)
    log(f"[cache] {cache_dir} ready in {time.time() - start:.1f}s (embedded by {world} process{'es' * (world > 1)})")
    manifest = load_manifest(cache_dir)
    online = cfg.text_encoding == "online"
    in_memory = cache_bytes(cache_dir) < 4 * 2**30  # small caches live in RAM; large ones are memory-mapped
    train_set = EmbeddingDataset(cache_dir, "train", val_fraction=cfg.val_fraction, seed=cfg.seed, in_memory=in_memory,
                                 float32=False, captions=online)  # cast on the device: half the bytes through the loader
    val_set = EmbeddingDataset(cache_dir, "val", val_fraction=cfg.val_fraction, seed=cfg.seed,
                               captions=online)  # memory-mapped
    if len(train_set) < cfg.train_batch_size * world:
        raise ValueError(f"{len(train_set)} training pairs (captioned images) in {cfg.train_data_dir}: fewer than one "
                         f"batch of {cfg.train_batch_size} x {world} processes")
    null_clip_text = train_set.null_clip_text.to(device)
    null_text_tokens = train_set.null_text_tokens.to(device)
    text_encoder = None
    if online:  # every process holds the frozen encoder and encodes its own batches
        text_encoder = build_caption_encoder(cfg, device)
        manifest = {**manifest, "text_len": int(text_encoder.max_length), "text_dim": int(text_encoder.dim)}
        null_text_tokens = text_encoder.encode([""])[0].to(device).float().clone()  # (L, E)
    log(f"[data] {manifest['num_images']} images ({len(train_set)} train / {len(val_set)} val caption pairs), "
        f"clip_dim {manifest['clip_dim']}, text tokens {manifest['text_len']}x{manifest['text_dim']}"
        f"{' encoded online in every step' if online else ''}")

    # vocabulary (fitted once, on the main process, on the training images)
    vocab_file = output_dir / "vocab.safetensors"
    if accelerator.is_main_process:
        shift = build_shift(cfg, cache_dir, train_set.image_indices, vocab_file, int(manifest["clip_dim"]), device)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        shift = build_shift(cfg, cache_dir, train_set.image_indices, vocab_file, int(manifest["clip_dim"]), device)
    shift = shift.to(device)
    pseudo, pseudo_summary = None, None
    if cfg.pseudo_text_fraction > 0:  # semi-supervised: uncaptioned images with a pseudo text condition
        pseudo, pseudo_summary = build_pseudo_text(cfg, cache_dir, train_set, null_text_tokens, device)
        log(f"[pseudo text] {pseudo_summary['uncaptioned_images']} uncaptioned training images, "
            f"{pseudo_summary['rows_per_batch']} of {cfg.train_batch_size} rows per batch, noise "
            f"{pseudo_summary['noise']} ({pseudo_summary['noise_source']})")

    # network, optimiser, schedule, loss
    set_seed(cfg.seed)
    model_config = prior_config(cfg, manifest, getattr(shift, "num_clusters", None))
    model = ShiftedPrior.from_prior_config(model_config)
    log(f"[model] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {model_config}")
    if cfg.compile:  # in place: state_dict names stay those of ShiftedPrior; sampling (validation) stays eager
        model.compile()
    schedule_config = ScheduleConfig(cfg.beta_schedule, cfg.num_timesteps, cfg.beta_min, cfg.beta_max)
    schedule = DiffusionSchedule.from_config(schedule_config)
    loss_config = LossConfig(cfg.p2_k, cfg.p2_gamma, cfg.empty_t5_prob, cfg.empty_clip_prob)
    if cfg.prior_type == "eclipse":
        loss_fn = EclipseLoss(schedule, loss_config, train_set.block_sizes,
                              contrastive_weight=cfg.eclipse_contrastive_weight, temperature=cfg.eclipse_temperature)
    else:
        loss_fn = ShiftedDiffusionLoss(schedule, loss_config)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, fused=device.type == "cuda",
    )
    steps_per_epoch = training.steps_per_epoch(len(train_set), cfg.train_batch_size, world,
                                               cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps if cfg.max_train_steps is not None else cfg.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * world,
                                 num_training_steps=max_steps * world)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    ema = training.build_ema(unwrapped.parameters(), cfg.use_ema, cfg.ema_decay, device)

    trained = {"prior": unwrapped}
    global_step = training.resume_step(accelerator, output_dir, cfg.resume_from_checkpoint, modules=trained,
                                       optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema, config=cfg.to_dict())
    training.init_trackers(accelerator, trackers, "shifted_diffusion_prior", cfg.to_dict())

    def write_checkpoint(step: int) -> None:
        path = save_checkpoint(accelerator, output_dir, step, modules=trained, optimizer=optimizer,
                               lr_scheduler=lr_scheduler, ema=ema, config=cfg.to_dict(),
                               total_limit=cfg.checkpoints_total_limit)
        log(f"[checkpoint] {path}")

    def run_validation(step: int) -> dict:
        unwrapped.eval()
        pipeline = build_pipeline(unwrapped, shift, schedule_config, encoder_settings(cfg), null_clip_text, null_text_tokens,
                                  uncond_clip_text="empty_caption" if cfg.empty_clip_prob > 0 else "prompt",
                                  training={"train": {"prior_type": cfg.prior_type}})
        metrics = {f"val/{k}": v for k, v in validate(pipeline, val_set, cfg, device, text_encoder).items()}
        if ema is not None:
            with EmaWeights(ema, unwrapped):
                metrics.update({f"val_ema/{k}": v
                                for k, v in validate(pipeline, val_set, cfg, device, text_encoder).items()})
        unwrapped.train()
        accelerator.log(metrics, step=step)
        log(f"[validation] step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("cos_gt")))
        return metrics

    # the loop
    model.train()
    step_log = training.StepLog(
        accelerator, max_steps=max_steps, initial_step=global_step, logging_steps=cfg.logging_steps,
        checkpointing_steps=cfg.checkpointing_steps, desc="prior training",
        samples_per_step=cfg.train_batch_size * world * cfg.gradient_accumulation_steps,
        advice=f"Lower learning_rate ({cfg.learning_rate}), use mixed_precision 'no' or 'bf16' (now "
               f"{cfg.mixed_precision!r}), or check the embedding cache for bad values")
    metrics = {}

    def micro_batch_loss(batch, generator):
        batch = to_device(batch, device, text_encoder)
        if pseudo is not None:
            batch = pseudo.mix(batch, generator)
        cluster_idx = shift.assign(batch["clip_text"])
        shift_mean, shift_std = shift.shift(cluster_idx, check=False)  # valid by construction: no host sync
        return loss_fn(
            model, batch["clip_image"], batch["text_tokens"], batch["clip_text"],
            cluster_idx if model_config.has_cluster_token else None, shift_mean, shift_std,
            null_text_tokens=null_text_tokens, null_clip_text_emb=null_clip_text, generator=generator,
            timesteps_per_caption=cfg.timesteps_per_caption,
        ).mean()

    for global_step in training.optimizer_steps(
            accelerator, train_set, global_step=global_step, max_steps=max_steps, micro_batch_loss=micro_batch_loss,
            accumulate=(model,), parameters=unwrapped.parameters(), max_grad_norm=cfg.max_grad_norm,
            optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema, step_log=step_log, seed=cfg.seed,
            batch_size=cfg.train_batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            num_workers=cfg.dataloader_num_workers, pin_memory=device.type == "cuda"):
        if training.due(global_step, cfg.checkpointing_steps):
            write_checkpoint(global_step)
        metrics = training.validate_if_due(accelerator, global_step, cfg.validation_steps, run_validation,
                                           default=metrics, main_process_only=True)
    step_log.close()

    # the prior folder: EMA weights when EMA is on, plus vocabulary, empty-caption encodings, config
    if accelerator.is_main_process and len(val_set) and not training.due(global_step, cfg.validation_steps):
        metrics = run_validation(global_step)  # unless the loop just validated this very step (main process only)
    accelerator.wait_for_everyone()
    prior_dir = output_dir / "prior"
    if accelerator.is_main_process:
        state_dict = None
        if ema is not None:
            with EmaWeights(ema, unwrapped):
                state_dict = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
        bad = [k for k, v in (state_dict or unwrapped.state_dict()).items() if not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(f"after {global_step} steps the {'EMA ' if ema is not None else ''}weights hold "
                                     f"non-finite values ({len(bad)} tensors, e.g. {bad[0]}); the prior is not saved")
        save_prior(
            prior_dir, unwrapped, shift.cpu(), schedule_config, encoder_settings(cfg), null_clip_text, null_text_tokens,
            extra={"train": cfg.to_dict(), "global_step": global_step, "validation": metrics,
                   "weights": "ema" if ema is not None else "raw",
                   **({"pseudo_text": pseudo_summary} if pseudo_summary else {})},
            state_dict=state_dict,
        )
        log(f"[done] prior saved to {prior_dir} after {global_step} steps")
    accelerator.end_training()
    return prior_dir
