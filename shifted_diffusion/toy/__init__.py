"""The toy world: seeded captioned shape images, a tiny CLIP trained on them, attribute metrics."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .clip import ToyClipConfig, train_toy_clip
from .evaluate import (
    load_attributes,
    mentioned_attribute_accuracy,
    nearest_neighbour_attributes,
    unmentioned_diversity,
    zero_shot_accuracy,
)
from .world import ATTRIBUTES, ToyWorldConfig, generate_world, load_world_config

__all__ = [
    "ATTRIBUTES",
    "ToyWorldConfig",
    "ToyClipConfig",
    "generate_world",
    "load_world_config",
    "train_toy_clip",
    "ensure_toy_assets",
    "fast_configs",
    "load_attributes",
    "zero_shot_accuracy",
    "nearest_neighbour_attributes",
    "mentioned_attribute_accuracy",
    "unmentioned_diversity",
]


def fast_configs() -> tuple:
    """(world, clip) configs small enough for tests: a few hundred images, a CLIP trained for seconds."""
    world = ToyWorldConfig(num_images=256)
    clip = ToyClipConfig(embed_dim=32, vision_width=8, text_width=32, text_layers=1, batch_size=64, steps=5)
    return world, clip


def ensure_toy_assets(root, fast: bool = False, world_config=None, clip_config=None) -> dict:
    """Generate the toy world and train its tiny CLIP under `root` unless cached: {"world": dir, "clip": dir}."""
    root = Path(root)
    if fast:
        fast_world, fast_clip = fast_configs()
        world_config = world_config or fast_world
        clip_config = clip_config or fast_clip
    world_config = world_config or ToyWorldConfig()
    clip_config = clip_config or ToyClipConfig()
    if clip_config.image_size != world_config.image_size:
        clip_config = dataclasses.replace(clip_config, image_size=world_config.image_size)
    tag = "fast" if fast else "default"
    world = generate_world(root / f"world_{tag}", world_config)
    clip = train_toy_clip(world, root / f"clip_{tag}", clip_config, eval_images=64 if fast else 1000, progress=not fast)
    return {"world": str(world), "clip": str(clip)}
