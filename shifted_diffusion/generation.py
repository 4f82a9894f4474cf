"""What the generation commands (``text_to_image`` and ``image_to_image``) share.

Numbered output paths, one seeded generator per image (the same seed gives the same image whatever the
batch size), the toy defaults' thread rule and the check of the counts / scales / image sizes of a command
line before any work.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .checks import check_count, check_image_size, check_scale


def numbered(path: Path, k: int, count: int) -> Path:
    """``path`` itself for a single image, else ``<stem>_<k><suffix>`` (the k-th of ``count`` images)."""
    return path if count == 1 else path.with_name(f"{path.stem}_{k}{path.suffix}")


def seeded_generators(device, seed: int, indices: Iterable[int]) -> list:
    """One torch.Generator per image, seeded ``seed + index``."""
    return [torch.Generator(device=device).manual_seed(seed + int(i)) for i in indices]


def one_thread_for_toy_defaults(args, uses_toy_defaults: bool) -> None:
    """The toy models are tiny convolutions, far faster on one thread: ``--num_threads`` 1 unless given."""
    if args.num_threads is None and uses_toy_defaults:
        args.num_threads = 1


def check_flags(parser: argparse.ArgumentParser, args, *, counts: Sequence[str], scales: Sequence[str] = (),
                sizes: Sequence[str] = ("height", "width")) -> None:
    """parser.error (exit code 2) for a count < 1, a scale that is not finite and >= 0, or an image size that
    is not a positive multiple of 8, naming the flag; None values (flag not given) pass."""
    try:
        for name in counts:
            check_count(f"--{name}", getattr(args, name), optional=True)
        for name in scales:
            if getattr(args, name) is not None:
                check_scale(f"--{name}", getattr(args, name))
        for name in sizes:
            check_image_size(f"--{name}", getattr(args, name))
    except ValueError as error:
        parser.error(str(error))
