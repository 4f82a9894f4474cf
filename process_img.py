"""Centre-crop and resize an image folder tree (LANCZOS), in parallel, keeping the folder structure.

    python process_img.py --src raw_images/ --dest images_512/ --size 512 --num 8

Files already present in --dest are skipped; unreadable sources and failed writes are reported (the
path, and the reason) and counted; caption files (.txt, metadata.jsonl) are copied along so --dest stays
a training folder. 16-bit and float images are scaled to 8 bits (``data.to_rgb``). --dest must lie outside
--src (else the next run would process its outputs again) and be writable (checked before starting).
The work is ``shifted_diffusion.resize.resize_tree``.
"""

from __future__ import annotations

import argparse
import os
import sys

from shifted_diffusion.resize import resize_tree


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
    try:
        counts = resize_tree(args.src, args.dest, size=args.size, num_workers=args.num,
                             copy_captions=args.copy_captions,
                             report=lambda message: print(f"process_img: {message}", file=sys.stderr))
    except (ValueError, OSError) as error:
        raise SystemExit(f"process_img: {error}") from error
    print(
        f"process_img: {counts['total']} images under {args.src}: {counts['done']} written, {counts['skipped']} "
        f"already done (skipped), {counts['unreadable']} unreadable, {counts['unwritable']} not written; "
        f"{counts['captions_copied']} caption files copied -> {args.dest} ({args.size}x{args.size})"
    )
    return counts


if __name__ == "__main__":
    main()
