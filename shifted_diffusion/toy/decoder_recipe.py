"""The toy decoder recipe: a tiny Stable Diffusion on the toy world, conditioned on the toy CLIP's image embeddings.

    python train_toy_decoder.py        # -> outputs/toy_decoder: autoencoder 3000 steps + UNet 4000 steps, one thread
                                       # (wall time: the README, "Text-to-image in the toy world")
    python train_toy_decoder.py --output_dir DIR --unet_steps 2400 --config my_toy_decoder.yaml
    python train_toy_decoder.py --world_dir W --clip_dir C    # an existing world + toy CLIP
    python train_toy_decoder.py --decoder_type text_and_image  # -> outputs/toy_text_image_decoder (below)

1. the toy world and its tiny CLIP (shifted_diffusion.toy.ensure_toy_assets, cached under --toy_root);
2. the autoencoder (shifted_diffusion.toy.decoder.train_vae: 64 px -> 16 x 16 x 4 latents), cached;
3. a "pretrained" Stable Diffusion folder = fresh UNet + trained VAE + DDIM scheduler, fine-tuned by the
   normal decoder trainer (``decoder_training.train_decoder``) with the image-embedding projection.
The result is a decoder folder that test.py / sft_test.py / shifted_diffusion.decoder.load_decoder read
exactly like a fine-tuned SD2. ``--decoder_type text_and_image`` builds the decoder that reads the caption and the
image embedding instead: the same autoencoder (the language-free decoder's when it has the same settings), a toy
text-to-image "Stable Diffusion" (a fresh UNet on the toy text encoder, ``toy.text_encoder``, trained on the
captions: ``stages/text_base``) and the IP-Adapter trained on it with its UNet frozen, so that the adapter's image
scale 0 is that text-to-image model. A finished folder with the same settings and CLIP is reused, not retrained.
``add_toy_default_arguments`` / ``default_toy_decoder`` give the generation commands this decoder as their
default; ``ensure_toy_decoder`` returns a finished one, training it when missing; ``toy_decoder_world`` the
world it was trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..decoder_training import CONFIG_NAME, SUMMARY_NAME, DecoderTrainConfig, train_decoder
from ..threads import torch_threads
from ..training import setup_logging

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = "outputs/toy_decoder"
DEFAULT_FAST_OUTPUT_DIR = "outputs/toy_decoder_fast"
DEFAULT_TEXT_OUTPUT_DIR = "outputs/toy_text_image_decoder"
DEFAULT_TEXT_FAST_OUTPUT_DIR = "outputs/toy_text_image_decoder_fast"
TEXT_AND_IMAGE = "text_and_image"
# ToyDecoderConfig fields only the text + image recipe reads (a language-free decoder's cache ignores them)
TEXT_RECIPE_FIELDS = ("text_unet_steps", "adapter_steps", "adapter_learning_rate")
TOY_DECODER_FILE = "toy_decoder.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=None, help=f"decoder folder (default {DEFAULT_OUTPUT_DIR}, "
                                                           f"--fast: {DEFAULT_FAST_OUTPUT_DIR}; text_and_image: "
                                                           f"{DEFAULT_TEXT_OUTPUT_DIR}[_fast])")
    parser.add_argument("--decoder_type", default="image", choices=("image", TEXT_AND_IMAGE),
                        help="image: language-free (the image embedding alone); text_and_image: a toy text-to-image "
                             "model + an IP-Adapter for the image embedding")
    parser.add_argument("--toy_root", default="outputs/toy_assets", help="where the toy world and CLIP are cached")
    parser.add_argument("--fast", action="store_true", help="the tiny test world and a seconds-long decoder (tests)")
    parser.add_argument("--world_dir", default=None, help="an existing toy world folder (with --clip_dir): skip "
                                                          "building the toy assets")
    parser.add_argument("--clip_dir", default=None, help="an existing toy CLIP folder trained on --world_dir")
    parser.add_argument("--config", default=None, help="YAML of ToyDecoderConfig fields; flags below override")
    for name in ("vae_steps", "unet_steps", "seed"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--embedding_cache", default=None,
                        help="a prior embedding cache to reuse for the CLIP image embeddings (default: the toy prior's "
                             "outputs/toy_prior/embeddings when present and matching)")
    parser.add_argument("--num_threads", type=int, default=1,
                        help="torch intra-op threads (1 is fastest for tiny convolutions on a shared machine; 0: default)")
    parser.add_argument("--force", action="store_true", help="retrain even if a finished decoder folder matches")
    parser.add_argument("--log_every", type=int, default=50, help="autoencoder loss print interval (0: silent)")
    return parser


def resolve_config(args):
    """ToyDecoderConfig from the defaults (or the fast ones), the YAML file and the flags."""
    from .decoder import ToyDecoderConfig, fast_decoder_config

    config = fast_decoder_config() if args.fast else ToyDecoderConfig()
    overrides = {}
    if args.config:
        import yaml

        overrides.update(yaml.safe_load(Path(args.config).read_text()) or {})
    overrides.update({k: getattr(args, k) for k in ("vae_steps", "unet_steps", "seed") if getattr(args, k) is not None})
    known = {f.name for f in dataclasses.fields(ToyDecoderConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SystemExit(f"train_toy_decoder.py: --config: unknown keys {unknown} (known: {sorted(known)})")
    return dataclasses.replace(config, **overrides)


def clip_identity(clip_dir) -> dict:
    """What identifies the toy CLIP a decoder was trained with: its folder and a hash of its weights."""
    import hashlib

    weights = sorted(Path(clip_dir).glob("*.safetensors")) + sorted(Path(clip_dir).glob("*.bin"))
    digest = hashlib.sha1()
    for path in weights:
        digest.update(path.read_bytes())
    return {"path": str(Path(clip_dir).resolve()), "weights_sha1": digest.hexdigest() if weights else None}


def recipe_settings(config: dict, decoder_type: str) -> dict:
    """The ToyDecoderConfig entries (a to_dict()) that the recipe of decoder_type reads."""
    return {k: v for k, v in config.items() if decoder_type == TEXT_AND_IMAGE or k not in TEXT_RECIPE_FIELDS}


def decoder_is_cached(output_dir, config, clip_dir, decoder_type: str = "image") -> bool:
    """True when output_dir holds a finished toy decoder of this type and settings, trained on this CLIP."""
    path = Path(output_dir) / TOY_DECODER_FILE
    if not path.is_file() or not (Path(output_dir) / "model_index.json").is_file():
        return False
    saved = json.loads(path.read_text())
    return (saved.get("decoder_type", "image") == decoder_type
            and recipe_settings(saved.get("config") or {}, decoder_type) == recipe_settings(config.to_dict(), decoder_type)
            and saved.get("clip") == clip_identity(clip_dir) and saved.get("complete", False))


def default_output_dir(decoder_type: str, fast: bool) -> Path:
    if decoder_type == TEXT_AND_IMAGE:
        return Path(DEFAULT_TEXT_FAST_OUTPUT_DIR if fast else DEFAULT_TEXT_OUTPUT_DIR)
    return Path(DEFAULT_FAST_OUTPUT_DIR if fast else DEFAULT_OUTPUT_DIR)


def toy_decoder_config(config, init_dir, world, clip_dir, output_dir,
                       embedding_cache: Optional[str]) -> DecoderTrainConfig:
    """The decoder training settings for the toy UNet + projection, from the fresh initialisation."""
    return DecoderTrainConfig(
        pretrained_model_name_or_path=str(init_dir), train_data_dir=str(world), clip_models=(f"{clip_dir}:",),
        resolution=64, random_flip=False, center_crop=False, num_tokens=config.num_tokens, projection_lr_scale=1.0,
        train_batch_size=config.unet_batch_size, max_train_steps=config.unet_steps,
        learning_rate=config.unet_learning_rate, lr_scheduler="cosine", lr_warmup_steps=config.unet_warmup_steps,
        adam_weight_decay=0.0, use_ema=True, ema_decay=config.ema_decay,
        conditioning_dropout_prob=config.conditioning_dropout_prob, seed=config.seed, report_to="none",
        output_dir=str(output_dir), checkpointing_steps=max(1, config.unet_steps // 2), checkpoints_total_limit=1,
        num_validation_images=4, validation_steps=config.unet_steps, validation_num_inference_steps=25,
        clip_batch_size=256, embedding_cache=str(embedding_cache) if embedding_cache else None,
    )


def default_embedding_cache(fast: bool) -> Optional[str]:
    """The toy prior's embedding cache (train.py's or benchmarks/toy_prior_quality.py's), if one exists;
    the decoder trainer checks that it was built with the same CLIP from the same images before reusing it."""
    if fast:
        return None
    for candidate in (Path("outputs/toy_prior/embeddings"), Path("outputs/toy_prior_quality/embeddings")):
        if (candidate / "manifest.json").is_file():
            return str(candidate)
    return None


def train_toy_decoder(argv: Optional[Sequence[str]] = None) -> Path:
    """What `python train_toy_decoder.py ARGV` does: the decoder folder, trained now unless it is finished."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    with torch_threads(args.num_threads):
        return train(args)


def train(args) -> Path:
    from . import ensure_toy_assets
    from .decoder import build_scheduler, build_unet, ensure_vae, write_pretrained_folder

    config = resolve_config(args)
    output_dir = Path(args.output_dir or default_output_dir(args.decoder_type, args.fast))
    start = time.time()
    if (args.world_dir is None) != (args.clip_dir is None):
        raise SystemExit("train_toy_decoder.py: --world_dir and --clip_dir go together")
    if args.world_dir is not None:
        assets = {"world": args.world_dir, "clip": args.clip_dir}
    else:
        assets = ensure_toy_assets(args.toy_root, fast=args.fast)
    assets_seconds = time.time() - start
    if not args.force and decoder_is_cached(output_dir, config, assets["clip"], args.decoder_type):
        logger.info(f"{output_dir} already holds this toy decoder (use --force to retrain)")
        return output_dir
    marker = output_dir / TOY_DECODER_FILE
    if marker.exists():
        marker.unlink()
    stages = output_dir / "stages"

    start, start_cpu = time.time(), time.process_time()
    vae, vae_info = ensure_vae(vae_folder(stages, args, config, assets["world"]), assets["world"], config,
                               log_every=0 if args.fast else args.log_every)
    vae_seconds = time.time() - start
    logger.info(f"autoencoder ready ({vae_seconds:.0f} s; reconstruction MSE {vae_info['final_mse']:.4f}, "
                f"scaling_factor {vae_info['scaling_factor']:.3f})")

    image_size = int(vae.config.sample_size)
    cache = args.embedding_cache or default_embedding_cache(args.fast)
    start, start_cpu = time.time(), time.process_time()
    if args.decoder_type == TEXT_AND_IMAGE:
        trained = train_text_and_image(config, vae, image_size, assets, output_dir, cache)
    else:
        torch.manual_seed(config.seed)
        unet = build_unet(config, image_size)
        init_dir = write_pretrained_folder(stages / "init", vae, unet, build_scheduler(config.zero_terminal_snr))
        train_decoder(toy_decoder_config(config, init_dir, assets["world"], assets["clip"], output_dir, cache))
        trained = {"unet": stage_summary(output_dir, unet)}
    unet_seconds, unet_cpu = time.time() - start, time.process_time() - start_cpu
    record = {
        "decoder_type": args.decoder_type,
        "config": config.to_dict(),
        "clip": clip_identity(assets["clip"]),
        "world": str(assets["world"]),
        "vae": vae_info,
        **trained,
        # the autoencoder's own training time (also when it was reused from an earlier run) + this UNet run (the
        # text + image decoder: its text-to-image UNet and adapter, "unet" below)
        "wall_seconds": {"toy_assets": round(assets_seconds, 1), "vae": vae_info["train_seconds"],
                         "unet": round(unet_seconds, 1), "decoder_total": round(vae_info["train_seconds"] + unet_seconds, 1)},
        "cpu_seconds": {"vae": vae_info["train_cpu_seconds"], "unet": round(unet_cpu, 1),
                        "decoder_total": round(vae_info["train_cpu_seconds"] + unet_cpu, 1)},
        "vae_reused": vae_seconds < 0.5 * vae_info["train_seconds"],
        "torch_threads": torch.get_num_threads(),
        "complete": True,
    }
    marker.write_text(json.dumps(record, indent=1) + "\n")
    total = record["wall_seconds"]["decoder_total"]
    logger.info(f"toy decoder written to {output_dir} (autoencoder {vae_info['train_seconds']:.0f} s + UNet "
                f"{unet_seconds:.0f} s = {total / 60:.1f} min wall, {record['cpu_seconds']['decoder_total'] / 60:.1f} "
                "min CPU)")
    return output_dir


def stage_summary(folder, unet) -> dict:
    """What toy_decoder.json keeps of one training stage: its train_summary.json figures and the UNet's size."""
    summary = json.loads((Path(folder) / SUMMARY_NAME).read_text())
    return {"global_step": summary.get("global_step"), "last_train_loss": summary.get("last_train_loss"),
            "num_params": sum(p.numel() for p in unet.parameters()), "wall_s_per_step": summary.get("wall_s_per_step"),
            "wall_s": summary.get("wall_s")}


def vae_folder(stages: Path, args, config, world) -> Path:
    """Where the autoencoder lives: this decoder's stages/vae, or (text + image decoder) the language-free toy
    decoder's when that one was trained with the same settings on the same world."""
    from .decoder import vae_is_cached

    own = stages / "vae"
    if args.decoder_type == TEXT_AND_IMAGE and not vae_is_cached(own, config, world):
        shared = default_output_dir("image", args.fast) / "stages" / "vae"
        if vae_is_cached(shared, config, world):
            return shared
    return own


def stage_is_finished(folder: Path, cfg: DecoderTrainConfig) -> bool:
    """True when folder holds a finished decoder_training run with exactly these settings."""
    summary, saved = Path(folder) / SUMMARY_NAME, Path(folder) / CONFIG_NAME
    if not (summary.is_file() and saved.is_file() and (Path(folder) / "model_index.json").is_file()):
        return False
    return (json.loads(saved.read_text()) == json.loads(json.dumps(cfg.to_dict()))
            and json.loads(summary.read_text()).get("global_step") == cfg.max_train_steps)


def train_text_and_image(config, vae, image_size: int, assets: dict, output_dir: Path, cache) -> dict:
    """The toy text-to-image model (stages/text_base: a fresh UNet on the toy text encoder, trained on the captions;
    reused when finished with the same settings) and the IP-Adapter on it (output_dir) -> their summaries."""
    from diffusers import UNet2DConditionModel

    from .. import ip_adapter
    from .decoder import build_scheduler, build_unet, write_pretrained_folder
    from .text_encoder import toy_text_encoder

    stages = output_dir / "stages"
    common = toy_decoder_config(config, stages / "init_text", assets["world"], assets["clip"], stages / "text_base",
                                cache)
    base = dataclasses.replace(common, decoder_type="text", max_train_steps=config.text_unet_steps,
                               checkpointing_steps=max(1, config.text_unet_steps // 2),
                               validation_steps=config.text_unet_steps)
    if stage_is_finished(stages / "text_base", base):
        logger.info(f"{stages / 'text_base'} already holds this toy text-to-image model")
    else:
        tokenizer, text_encoder = toy_text_encoder(assets["clip"], stages / "tokenizer_files")
        torch.manual_seed(config.seed)
        unet = build_unet(dataclasses.replace(config, cross_attention_dim=text_encoder.config.hidden_size), image_size)
        write_pretrained_folder(stages / "init_text", vae, unet, build_scheduler(config.zero_terminal_snr),
                                text_encoder=text_encoder, tokenizer=tokenizer)
        train_decoder(base)
    adapter = dataclasses.replace(common, decoder_type=TEXT_AND_IMAGE, pretrained_model_name_or_path=base.output_dir,
                                  output_dir=str(output_dir), max_train_steps=config.adapter_steps,
                                  learning_rate=config.adapter_learning_rate,
                                  checkpointing_steps=max(1, config.adapter_steps // 2),
                                  validation_steps=config.adapter_steps)
    train_decoder(adapter)
    unet = UNet2DConditionModel.from_pretrained(base.output_dir, subfolder="unet")
    trained = stage_summary(output_dir, unet)
    trained["num_params"] = sum(v.numel() for v in ip_adapter.load_adapter_state(
        output_dir / ip_adapter.ADAPTER_WEIGHT_NAME).values())
    return {"text_base": stage_summary(base.output_dir, unet), "adapter": trained}


def finished_decoder_record(output_dir) -> Optional[dict]:
    """toy_decoder.json of a finished toy decoder whose CLIP folder still holds the same weights, else None."""
    marker = Path(output_dir) / TOY_DECODER_FILE
    if not marker.is_file():
        return None
    saved = json.loads(marker.read_text())
    clip_path = Path(saved.get("clip", {}).get("path", ""))
    if saved.get("complete") and clip_path.is_dir() and clip_identity(clip_path) == saved["clip"]:
        return saved
    logger.warning(f"{output_dir} is unfinished or its CLIP {clip_path} changed")
    return None


def add_toy_default_arguments(parser: argparse.ArgumentParser, used_when: str):
    """test.py / sft_test.py: the toy-world options (returned group) and --num_threads."""
    toy = parser.add_argument_group(f"toy-world defaults (used when {used_when} are not given)")
    toy.add_argument("--toy_root", default="outputs/toy_assets", help="where the toy world and its CLIP are cached")
    toy.add_argument("--toy_decoder", default=None, help=f"toy decoder folder (default {DEFAULT_OUTPUT_DIR})")
    toy.add_argument("--toy_fast", action="store_true", help="the tiny test world and decoder (tests)")
    parser.add_argument("--num_threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own; 1 for the toy defaults, where tiny "
                             "convolutions are far faster on one thread)")
    return toy


def default_toy_decoder(args, script: str) -> str:
    """The toy decoder folder (trained now if missing), the default --decoder of test.py / sft_test.py."""
    print(f"{script}: no --decoder given: using the toy decoder (built by `python train_toy_decoder.py`"
          f"{' --fast' if args.toy_fast else ''}; trained now if missing)", flush=True)
    return str(ensure_toy_decoder(args.toy_decoder, toy_root=args.toy_root, fast=args.toy_fast))


def ensure_toy_decoder(output_dir=None, toy_root: str = "outputs/toy_assets", fast: bool = False,
                       decoder_type: str = "image") -> Path:
    """A finished toy decoder folder of this type (any settings; its CLIP unchanged), else one trained now with the
    defaults."""
    output_dir = Path(output_dir or default_output_dir(decoder_type, fast))
    record = finished_decoder_record(output_dir)
    if record is not None and record.get("decoder_type", "image") == decoder_type:
        return output_dir
    return train_toy_decoder(["--toy_root", str(toy_root), "--output_dir", str(output_dir),
                              "--decoder_type", decoder_type, *(["--fast"] if fast else [])])


def toy_decoder_world(decoder_dir, toy_root: str = "outputs/toy_assets", fast: bool = False) -> str:
    """The toy world folder a decoder was trained on (a toy decoder names it in toy_decoder.json), else the
    cached toy world (built now if missing)."""
    from . import ensure_toy_assets

    record = Path(decoder_dir) / TOY_DECODER_FILE
    if record.is_file():
        return json.loads(record.read_text())["world"]
    return ensure_toy_assets(toy_root, fast=fast)["world"]
