"""Centre-crop and resize images and whole folder trees (LANCZOS), in parallel, keeping the structure.

``process_img.py``'s work. Decoding to 8-bit RGB stays in ``data.py`` (``to_rgb``, which scales 16-bit and
float images instead of clipping them to white) and listing images in ``data.list_image_files``; here only
the geometry, the per-file job and the folder walk. ``resize_tree`` skips files already in ``dest``, reports
and counts unreadable sources and failed writes (with the path and the reason), copies the caption files
(``.txt``, ``metadata.jsonl``) so ``dest`` stays a training folder, and refuses a ``dest`` inside ``src`` (the
next run would process its outputs again) or an unwritable one before any work.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

from PIL import Image

from .data import METADATA_NAME, list_image_files, to_rgb

SIDE_FILE_EXTENSIONS = (".txt",)
ALPHA_SUFFIXES = (".png", ".webp", ".tif", ".tiff")
STATUSES = ("done", "skipped", "unreadable", "unwritable")


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Largest centred square of `image`, resized to size x size with LANCZOS."""
    width, height = image.size
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side == size:
        return square
    return square.resize((size, size), resample=Image.Resampling.LANCZOS)


def list_tree(src: Path) -> tuple[list[str], list[Path]]:
    """Relative names of the images (data.list_image_files) and of the caption side files under `src`."""
    src = Path(src)
    images = [path.relative_to(src).as_posix() for path in list_image_files(src)]
    side_files = sorted(
        path.relative_to(src) for path in src.rglob("*")
        if path.is_file() and (path.name == METADATA_NAME or path.suffix.lower() in SIDE_FILE_EXTENSIONS)
    )
    return images, side_files


def load_processed(source: str, destination: str, size: int) -> Image.Image:
    """The centre-cropped, resized image of `source`, RGBA when it has alpha and `destination` keeps it."""
    suffix = Path(destination).suffix.lower()
    with Image.open(source) as image:
        image.load()
        keep_alpha = "A" in image.getbands() or "transparency" in image.info
        if keep_alpha and suffix in ALPHA_SUFFIXES:
            image = image.convert("RGBA")
        else:
            image = to_rgb(image)  # 16-bit / float images scaled to 8 bits, not clipped to white
        return center_crop_resize(image, size)


def save_atomic(image: Image.Image, destination: str) -> None:
    """Write through a partial file + rename: a rerun never skips a half-written file."""
    suffix = Path(destination).suffix.lower()
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    partial = destination + ".partial" + suffix
    image.save(partial, **({"quality": 95} if suffix in (".jpg", ".jpeg") else {}))
    os.replace(partial, destination)


def process_one(job: tuple[str, str, int]) -> tuple[str, str, str]:
    """The pool job: one file -> (status, source path, message); status is one of STATUSES."""
    source, destination, size = job
    if os.path.exists(destination):
        return "skipped", source, ""
    try:
        out = load_processed(source, destination, size)
    except Exception as error:  # reported with its path and counted by the caller
        return "unreadable", source, f"could not read {source}: {type(error).__name__}: {error}"
    try:
        save_atomic(out, destination)
    except Exception as error:
        return "unwritable", source, f"could not write {destination} (from {source}): {type(error).__name__}: {error}"
    return "done", source, ""


def check_folders(src: Path, dest: Path) -> None:
    """Refuse a `dest` inside `src` and an unwritable `dest` before any work (ValueError with the reason)."""
    src_resolved, dest_resolved = Path(src).resolve(), Path(dest).resolve()
    if dest_resolved == src_resolved or src_resolved in dest_resolved.parents:
        raise ValueError(f"--dest {dest} is inside --src {src}: the next run would process its outputs again; "
                         "choose a --dest outside --src")
    try:
        Path(dest).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=dest):
            pass
    except OSError as error:
        raise ValueError(f"--dest {dest} is not writable ({type(error).__name__}: {error}); "
                         "choose another --dest or fix its permissions") from error


def _print_failure(message: str) -> None:
    print(message, file=sys.stderr)


def resize_tree(src, dest, size: int = 512, num_workers: int = 1, copy_captions: bool = True,
                report: Optional[Callable[[str], None]] = None) -> dict[str, int]:
    """Centre-crop + resize every image under `src` into the same relative path under `dest`.

    `num_workers` > 1 runs the files in a process pool (spawned); `report` receives one message per failed
    file (default: printed to stderr). Returns counts: done, skipped (already in `dest`), unreadable,
    unwritable, failed (the last two summed), captions_copied, total (images found). Raises ValueError for a
    bad size / worker count or `dest` (see ``check_folders``), FileNotFoundError for a `src` that is not a
    folder or holds no images.
    """
    src, dest = Path(src), Path(dest)
    if size <= 0:
        raise ValueError(f"--size must be positive, got {size}")
    if num_workers <= 0:
        raise ValueError(f"--num must be positive, got {num_workers}")
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} is not a folder")
    images, side_files = list_tree(src)
    check_folders(src, dest)
    report = report or _print_failure
    jobs = [(str(src / rel), str(dest / rel), size) for rel in images]
    counts = dict.fromkeys(STATUSES, 0)
    pool = None
    if num_workers == 1:
        results = map(process_one, jobs)
    else:
        pool = multiprocessing.get_context("spawn").Pool(num_workers)
        results = pool.imap_unordered(process_one, jobs, chunksize=max(1, min(64, len(jobs) // (4 * num_workers))))
    try:
        for status, _, message in results:
            counts[status] += 1
            if message:
                report(message)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    copied = 0
    if copy_captions:
        for rel in side_files:
            target = dest / rel
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / rel, target)
                copied += 1
    counts["failed"] = counts["unreadable"] + counts["unwritable"]
    counts["captions_copied"] = copied
    counts["total"] = len(images)
    return counts
