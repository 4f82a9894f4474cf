"""Evaluation sets: (caption, ground-truth image) pairs from COCO's captions file or a captioned image folder.

The COCO protocol (the paper's, and the seed's): val2014, ``num_captions`` captions drawn at random (one seeded
draw over every caption of every image), used as they are (no prompt templates).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

__all__ = ["EvalPair", "read_coco_captions", "read_captioned_folder", "sample_pairs", "pairs_fingerprint"]

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class EvalPair:
    """One caption and the image it describes."""

    caption: str
    image: Path


def read_coco_captions(captions_file: PathLike, images_dir: PathLike) -> list[EvalPair]:
    """Every (caption, image) of a COCO ``captions_*.json`` ("images": id + file_name, "annotations": image_id +
    caption), images under ``images_dir``; a missing file or a broken entry is a FileNotFoundError / ValueError
    naming it."""
    captions_file, images_dir = Path(captions_file), Path(images_dir)
    if not captions_file.is_file():
        raise FileNotFoundError(f"--coco_captions {captions_file}: no such file (COCO's annotations/captions_val2014.json)")
    if not images_dir.is_dir():
        raise FileNotFoundError(f"--coco_images {images_dir}: no such folder (COCO's val2014 images)")
    try:
        data = json.loads(captions_file.read_text(encoding="utf-8"))
        files = {int(entry["id"]): entry["file_name"] for entry in data["images"]}
        pairs = [EvalPair(str(a["caption"]).strip(), images_dir / files[int(a["image_id"])])
                 for a in data["annotations"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"--coco_captions {captions_file}: not a COCO captions file ({type(error).__name__}: {error})")
    if not pairs:
        raise ValueError(f"--coco_captions {captions_file}: no annotations")
    return pairs


def read_captioned_folder(folder: PathLike) -> list[EvalPair]:
    """Every (caption, image) of an image folder (``data.read_image_folder``: metadata.jsonl or .txt captions);
    images without a caption are skipped, a folder without any caption is a ValueError."""
    from .data import read_image_folder

    pairs = [EvalPair(caption, Path(record.path)) for record in read_image_folder(folder) for caption in record.captions]
    if not pairs:
        raise ValueError(f"--image_folder {folder}: no image has a caption (metadata.jsonl 'text' or a .txt file)")
    return pairs


def sample_pairs(pairs: Sequence[EvalPair], num: int, seed: int) -> list[EvalPair]:
    """``num`` pairs drawn at random without replacement (seeded; all of them, shuffled, when fewer)."""
    if num < 1:
        raise ValueError(f"--num_captions must be >= 1; got {num}")
    rng = random.Random(seed)
    return rng.sample(list(pairs), min(num, len(pairs)))


def pairs_fingerprint(pairs: Sequence[EvalPair]) -> str:
    """A hash of the captions and image paths, in order (what cached statistics and shards are valid for)."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(pair.caption.encode("utf-8") + b"\0" + os.fspath(pair.image).encode("utf-8") + b"\n")
    return digest.hexdigest()
