"""The toy decoder recipe: a tiny Stable Diffusion on the toy world, conditioned on the toy CLIP's image embeddings.

    python train_toy_decoder.py        # -> outputs/toy_decoder: autoencoder 3000 steps + UNet 4000 steps, one thread
                                       # (wall time: the README, "Text-to-image in the toy world")
    python train_toy_decoder.py --output_dir DIR --unet_steps 2400 --config my_toy_decoder.yaml
    python train_toy_decoder.py --world_dir W --clip_dir C    # an existing world + toy CLIP

1. the toy world and its tiny CLIP (shifted_diffusion.toy.ensure_toy_assets, cached under --toy_root);
2. the autoencoder (shifted_diffusion.toy.decoder.train_vae: 64 px -> 16 x 16 x 4 latents), cached;
3. a "pretrained" Stable Diffusion folder = fresh UNet + trained VAE + DDIM scheduler, fine-tuned by the
   normal decoder trainer (``decoder_training.train_decoder``) with the image-embedding projection.
The result is a decoder folder that test.py / sft_test.py / shifted_diffusion.decoder.load_decoder read
exactly like a fine-tuned SD2. A finished folder with the same settings and CLIP is reused, not retrained.
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

from ..decoder_training import SUMMARY_NAME, DecoderTrainConfig, train_decoder
from ..threads import torch_threads
from ..training import setup_logging

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = "outputs/toy_decoder"
DEFAULT_FAST_OUTPUT_DIR = "outputs/toy_decoder_fast"
TOY_DECODER_FILE = "toy_decoder.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=None, help=f"decoder folder (default {DEFAULT_OUTPUT_DIR}, "
                                                           f"--fast: {DEFAULT_FAST_OUTPUT_DIR})")
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


def decoder_is_cached(output_dir, config, clip_dir) -> bool:
    """True when output_dir holds a finished toy decoder with these settings, trained on this CLIP."""
    path = Path(output_dir) / TOY_DECODER_FILE
    if not path.is_file() or not (Path(output_dir) / "model_index.json").is_file():
        return False
    saved = json.loads(path.read_text())
    return (saved.get("config") == config.to_dict() and saved.get("clip") == clip_identity(clip_dir)
            and saved.get("complete", False))


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
    output_dir = Path(args.output_dir or (DEFAULT_FAST_OUTPUT_DIR if args.fast else DEFAULT_OUTPUT_DIR))
    start = time.time()
    if (args.world_dir is None) != (args.clip_dir is None):
        raise SystemExit("train_toy_decoder.py: --world_dir and --clip_dir go together")
    if args.world_dir is not None:
        assets = {"world": args.world_dir, "clip": args.clip_dir}
    else:
        assets = ensure_toy_assets(args.toy_root, fast=args.fast)
    assets_seconds = time.time() - start
    if not args.force and decoder_is_cached(output_dir, config, assets["clip"]):
        logger.info(f"{output_dir} already holds this toy decoder (use --force to retrain)")
        return output_dir
    marker = output_dir / TOY_DECODER_FILE
    if marker.exists():
        marker.unlink()
    stages = output_dir / "stages"

    start, start_cpu = time.time(), time.process_time()
    vae, vae_info = ensure_vae(stages / "vae", assets["world"], config, log_every=0 if args.fast else args.log_every)
    vae_seconds = time.time() - start
    logger.info(f"autoencoder ready ({vae_seconds:.0f} s; reconstruction MSE {vae_info['final_mse']:.4f}, "
                f"scaling_factor {vae_info['scaling_factor']:.3f})")

    image_size = int(vae.config.sample_size)
    torch.manual_seed(config.seed)
    unet = build_unet(config, image_size)
    init_dir = write_pretrained_folder(stages / "init", vae, unet, build_scheduler(config.zero_terminal_snr))
    cache = args.embedding_cache or default_embedding_cache(args.fast)
    start, start_cpu = time.time(), time.process_time()
    train_decoder(toy_decoder_config(config, init_dir, assets["world"], assets["clip"], output_dir, cache))
    unet_seconds, unet_cpu = time.time() - start, time.process_time() - start_cpu
    summary = json.loads((output_dir / SUMMARY_NAME).read_text())
    record = {
        "config": config.to_dict(),
        "clip": clip_identity(assets["clip"]),
        "world": str(assets["world"]),
        "vae": vae_info,
        "unet": {"global_step": summary.get("global_step"), "last_train_loss": summary.get("last_train_loss"),
                 "num_params": sum(p.numel() for p in unet.parameters()),
                 "wall_s_per_step": summary.get("wall_s_per_step")},
        # the autoencoder's own training time (also when it was reused from an earlier run) + this UNet run
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


def ensure_toy_decoder(output_dir=None, toy_root: str = "outputs/toy_assets", fast: bool = False) -> Path:
    """A finished toy decoder folder (any settings; its CLIP unchanged), else one trained now with the defaults."""
    output_dir = Path(output_dir or (DEFAULT_FAST_OUTPUT_DIR if fast else DEFAULT_OUTPUT_DIR))
    if finished_decoder_record(output_dir) is not None:
        return output_dir
    return train_toy_decoder(["--toy_root", str(toy_root), "--output_dir", str(output_dir),
                              *(["--fast"] if fast else [])])


def toy_decoder_world(decoder_dir, toy_root: str = "outputs/toy_assets", fast: bool = False) -> str:
    """The toy world folder a decoder was trained on (a toy decoder names it in toy_decoder.json), else the
    cached toy world (built now if missing)."""
    from . import ensure_toy_assets

    record = Path(decoder_dir) / TOY_DECODER_FILE
    if record.is_file():
        return json.loads(record.read_text())["world"]
    return ensure_toy_assets(toy_root, fast=fast)["world"]
