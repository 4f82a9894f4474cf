"""Centre-crop and resize an image folder tree (LANCZOS), in parallel, keeping the folder structure.

    python process_img.py --src raw_images/ --dest images_512/ --size 512 --num 8

Files already present in --dest are skipped; unreadable files are reported (path and reason) and
counted; caption files (.txt, metadata.jsonl) are copied along so --dest stays a training folder.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
from pathlib import Path

from PIL import Image

from shifted_diffusion.data import METADATA_NAME, list_image_files

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


def _process_one(job: tuple[str, str, int]) -> tuple[str, str, str]:
    """Process one file; returns (status, source path, message) with status in done|skipped|failed."""
    source, destination, size = job
    if os.path.exists(destination):
        return "skipped", source, ""
    try:
        suffix = Path(destination).suffix.lower()
        with Image.open(source) as image:
            image.load()
            keep_alpha = "A" in image.getbands() or "transparency" in image.info
            mode = "RGBA" if keep_alpha and suffix in (".png", ".webp", ".tif", ".tiff") else "RGB"
            out = center_crop_resize(image.convert(mode), size)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        partial = destination + ".partial" + suffix
        out.save(partial, **({"quality": 95} if suffix in (".jpg", ".jpeg") else {}))
        os.replace(partial, destination)  # never leave a half-written file that a rerun would skip
        return "done", source, ""
    except Exception as error:  # reported with its path and counted by the caller
        return "failed", source, f"{type(error).__name__}: {error}"


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
    jobs = [(str(src / rel), str(dest / rel), args.size) for rel in images]
    counts = {"done": 0, "skipped": 0, "failed": 0}
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
            if status == "failed":
                failures.append((source, message))
                print(f"process_img: could not process {source}: {message}", file=sys.stderr)
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
    counts["captions_copied"] = copied
    counts["total"] = len(images)
    print(
        f"process_img: {len(images)} images under {src}: {counts['done']} written, {counts['skipped']} already done "
        f"(skipped), {counts['failed']} unreadable; {copied} caption files copied -> {dest} ({args.size}x{args.size})"
    )
    return counts


if __name__ == "__main__":
    main()
