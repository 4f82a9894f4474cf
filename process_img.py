"""Centre-crop and resize an image folder tree (LANCZOS), in parallel, keeping the folder structure.

    python process_img.py --src raw_images/ --dest images_512/ --size 512 --num 8

Files already present in --dest are skipped; unreadable sources and failed writes are reported (the
path, and the reason) and counted; caption files (.txt, metadata.jsonl) are copied along so --dest stays
a training folder. 16-bit and float images are scaled to 8 bits (``data.to_rgb``). --dest must lie outside
--src (else the next run would process its outputs again) and be writable (checked before starting).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

from shifted_diffusion.data import METADATA_NAME, list_image_files, to_rgb

SIDE_FILE_EXTENSIONS = (".txt",)


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
    images = [path.relative_to(src).as_posix() for path in list_image_files(src)]
    side_files = sorted(
        path.relative_to(src) for path in src.rglob("*")
        if path.is_file() and (path.name == METADATA_NAME or path.suffix.lower() in SIDE_FILE_EXTENSIONS)
    )
    return images, side_files


def _load_processed(source: str, destination: str, size: int) -> Image.Image:
    """The centre-cropped, resized image of `source`, RGBA when it has alpha and `destination` keeps it."""
    suffix = Path(destination).suffix.lower()
    with Image.open(source) as image:
        image.load()
        keep_alpha = "A" in image.getbands() or "transparency" in image.info
        if keep_alpha and suffix in (".png", ".webp", ".tif", ".tiff"):
            image = image.convert("RGBA")
        else:
            image = to_rgb(image)  # 16-bit / float images scaled to 8 bits, not clipped to white
        return center_crop_resize(image, size)


def _save_atomic(image: Image.Image, destination: str) -> None:
    """Write through a partial file + rename: a rerun never skips a half-written file."""
    suffix = Path(destination).suffix.lower()
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    partial = destination + ".partial" + suffix
    image.save(partial, **({"quality": 95} if suffix in (".jpg", ".jpeg") else {}))
    os.replace(partial, destination)


def _process_one(job: tuple[str, str, int]) -> tuple[str, str, str]:
    """Process one file -> (status, source path, message); status in done|skipped|unreadable|unwritable."""
    source, destination, size = job
    if os.path.exists(destination):
        return "skipped", source, ""
    try:
        out = _load_processed(source, destination, size)
    except Exception as error:  # reported with its path and counted by the caller
        return "unreadable", source, f"could not read {source}: {type(error).__name__}: {error}"
    try:
        _save_atomic(out, destination)
    except Exception as error:
        return "unwritable", source, f"could not write {destination} (from {source}): {type(error).__name__}: {error}"
    return "done", source, ""


def check_folders(src: Path, dest: Path) -> None:
    """Refuse a --dest inside --src and an unwritable --dest, before any work (SystemExit with the reason)."""
    src_resolved, dest_resolved = src.resolve(), dest.resolve()
    if dest_resolved == src_resolved or src_resolved in dest_resolved.parents:
        raise SystemExit(f"process_img: --dest {dest} is inside --src {src}: the next run would process its "
                         "outputs again; choose a --dest outside --src")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=dest):
            pass
    except OSError as error:
        raise SystemExit(f"process_img: --dest {dest} is not writable ({type(error).__name__}: {error}); "
                         "choose another --dest or fix its permissions") from error


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--dest", required=True, help="output folder; the sub-folder structure is kept")
    parser.add_argument("--size", type=int, default=512, help="output side length in pixels")
    parser.add_argument("--num", type=int, default=os.cpu_count() or 1, help="number of worker processes")
    parser.add_argument("--copy_captions", action=argparse.BooleanOptionalAction, default=True,
                        help="copy .txt captions and metadata.jsonl into --dest")
    args = parser.parse_args(argv)
    if args.size <= 0:
        parser.error(f"--size must be positive, got {args.size}")
    if args.num <= 0:
        parser.error(f"--num must be positive, got {args.num}")
    return args


def main(argv=None) -> dict[str, int]:
    args = parse_args(argv)
    src, dest = Path(args.src), Path(args.dest)
    if not src.is_dir():
        raise SystemExit(f"process_img: --src {src} is not a folder")
    try:
        images, side_files = list_tree(src)
    except FileNotFoundError as error:
        raise SystemExit(f"process_img: {error}") from error
    check_folders(src, dest)
    jobs = [(str(src / rel), str(dest / rel), args.size) for rel in images]
    counts = {"done": 0, "skipped": 0, "unreadable": 0, "unwritable": 0}
    failures = []
    if args.num == 1:
        results = map(_process_one, jobs)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn").Pool(args.num)
        results = pool.imap_unordered(_process_one, jobs, chunksize=max(1, min(64, len(jobs) // (4 * args.num))))
    try:
        for status, source, message in results:
            counts[status] += 1
            if status in ("unreadable", "unwritable"):
                failures.append((source, message))
                print(f"process_img: {message}", file=sys.stderr)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    copied = 0
    if args.copy_captions:
        for rel in side_files:
            target = dest / rel
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / rel, target)
                copied += 1
    counts["failed"] = counts["unreadable"] + counts["unwritable"]
    counts["captions_copied"] = copied
    counts["total"] = len(images)
    print(
        f"process_img: {len(images)} images under {src}: {counts['done']} written, {counts['skipped']} already done "
        f"(skipped), {counts['unreadable']} unreadable, {counts['unwritable']} not written; {copied} caption files "
        f"copied -> {dest} ({args.size}x{args.size})"
    )
    return counts


if __name__ == "__main__":
    main()
