"""Training checkpoints shared by the prior and decoder trainers: ``<output_dir>/checkpoint-N`` folders,
"latest" resolution, pruning, and per-step random generators that make resuming exact."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch

PREFIX = "checkpoint-"


def list_checkpoints(output_dir) -> list[Path]:
    """The checkpoint-N folders of a run, oldest (smallest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def find_checkpoint(output_dir, resume: Optional[str]) -> Optional[Path]:
    """``resume``: None (fresh run), "latest" (newest checkpoint-N, or None with a warning), or a folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            warnings.warn(f"resume_from_checkpoint=latest: no {PREFIX}N in {output_dir}; starting from scratch")
            return None
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint {resume}: no such checkpoint folder")
    return path


def prune_checkpoints(output_dir, total_limit: Optional[int]) -> None:
    """Keep at most total_limit - 1 checkpoints, before a new one is written."""
    if total_limit is None:
        return
    found = list_checkpoints(output_dir)
    for path in found[: max(0, len(found) - total_limit + 1)]:
        shutil.rmtree(path)


def step_generator(seed: int, process_index: int, counter: int, device) -> torch.Generator:
    """The generator of one micro-batch of one process, a function of (seed, process, counter) only."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + counter * 7919 + process_index) % (2**63))
