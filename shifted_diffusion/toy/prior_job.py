"""The prior training job behind ``train.py``: parse the flags, fall back to the toy world, train, report.

With a ``--train_data_dir`` it is ``train_prior`` on the parsed settings. Without one it runs the embedded
toy world: the toy preset (``prior_toy.yaml``, shipped in this package, so an installed package finds it)
under the user's YAML files and flags, the generated world folder and its tiny CLIP as the data and the
encoders, and after training the toy quality table (``toy.prior_eval``) on the main process.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import yaml

from ..prior_training import train_prior
from ..train_config import TrainConfig, parse_config

TOY_CONFIG = Path(__file__).resolve().with_name("prior_toy.yaml")


def toy_defaults() -> dict:
    """The toy preset's settings (``TOY_CONFIG``) as a dict of TrainConfig fields."""
    return yaml.safe_load(TOY_CONFIG.read_text(encoding="utf-8"))


def toy_config(argv: Sequence[str]) -> TrainConfig:
    """The toy world's settings under the user's YAML files and flags, with the generated world folder and
    its tiny CLIP filled in as the data and the encoders (built once, cached under ``toy_root``)."""
    from accelerate import PartialState

    from . import ensure_toy_assets

    cfg = parse_config(argv, defaults=toy_defaults())
    with PartialState().main_process_first():  # under `accelerate launch`, one process builds, the others reuse
        assets = ensure_toy_assets(cfg.toy_root, fast=cfg.toy_fast)
    return dataclasses.replace(
        cfg, train_data_dir=assets["world"], clip_models=(assets["clip"],), t5_model=f"clip-tokens:{assets['clip']}"
    )


def print_toy_table(cfg: TrainConfig, prior_dir: Path) -> dict:
    """Score the toy prior in ``prior_dir`` (held-out captions of the world in ``cfg``), print the table,
    return the evaluation."""
    from .prior_eval import evaluate_toy_prior, format_table

    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "embeddings"
    results = evaluate_toy_prior(prior_dir, cfg.train_data_dir, cache_dir, seed=cfg.seed)
    name = "baseline" if results["baseline"] else "shifted"
    print(format_table({name: results["steps"]}, reference=results.get("reference")))
    return results


def run_prior_job(argv: Sequence[str]) -> Path:
    """``train.py``'s work for command-line arguments ``argv``: the trained prior folder."""
    argv = list(argv)
    cfg = parse_config(argv)
    toy = cfg.train_data_dir is None
    if toy:
        cfg = toy_config(argv)
    prior_dir = train_prior(cfg)
    if toy and cfg.evaluate_toy:
        from accelerate import PartialState

        if PartialState().is_main_process:
            print_toy_table(cfg, prior_dir)
    return prior_dir
