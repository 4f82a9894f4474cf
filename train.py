"""Train a shifted diffusion prior (caption -> CLIP image embedding).

    accelerate launch train.py --config configs/prior_small.yaml --train_data_dir DIR
    python train.py            # no arguments: the embedded toy world, end to end, offline
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence

import yaml
from accelerate import PartialState

from shifted_diffusion.prior_training import train_prior
from shifted_diffusion.train_config import TrainConfig, parse_config

TOY_CONFIG = Path(__file__).resolve().parent / "configs" / "prior_toy.yaml"


def toy_config(argv: Sequence[str]) -> TrainConfig:
    """The toy world's settings (configs/prior_toy.yaml) under the user's YAML files and flags, with the
    generated world folder and its tiny CLIP filled in as the data and the encoders."""
    from shifted_diffusion.toy import ensure_toy_assets

    cfg = parse_config(argv, defaults=yaml.safe_load(TOY_CONFIG.read_text()))
    with PartialState().main_process_first():  # under `accelerate launch`, one process builds, the others reuse
        assets = ensure_toy_assets(cfg.toy_root, fast=cfg.toy_fast)
    return dataclasses.replace(
        cfg, train_data_dir=assets["world"], clip_models=(assets["clip"],), t5_model=f"clip-tokens:{assets['clip']}"
    )


def main(argv: Optional[Sequence[str]] = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(argv)
    toy = cfg.train_data_dir is None
    if toy:
        cfg = toy_config(argv)
    prior_dir = train_prior(cfg)
    if toy and cfg.evaluate_toy and PartialState().is_main_process:
        from shifted_diffusion.toy.prior_eval import evaluate_toy_prior, format_table

        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "embeddings"
        results = evaluate_toy_prior(prior_dir, cfg.train_data_dir, cache_dir, seed=cfg.seed)
        name = "baseline" if results["baseline"] else "shifted"
        print(format_table({name: results["steps"]}, reference=results.get("reference")))
    return prior_dir


if __name__ == "__main__":
    main()
