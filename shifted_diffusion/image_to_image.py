"""Image-to-image with the fine-tuned decoder: image -> multi-CLIP embedding -> projection -> Stable Diffusion.

    python test.py --decoder sd2-shifted-decoder --images photos/ cat.jpg --output_dir recon/ \\
        --guidance_scale 5 --num_inference_steps 50 --scheduler dpm --seed 0
    python test.py        # no arguments: the toy decoder (outputs/toy_decoder, trained by train_toy_decoder.py
                          # first if missing) on a few held-out toy-world images -> outputs/toy_test/

Writes `re_<name>.png` beside each input (or under --output_dir, keeping sub-folders of input folders).
Without --images, a few held-out toy-world images are rendered into <output_dir>/inputs and a grid
[input | reconstructions] is written to <output_dir>/grid.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checks import check_embedding_file
from .data import open_rgb, read_image_folder
from .decoder import SCHEDULERS, default_device_dtype, load_decoder, load_embedding
from .generation import check_flags, numbered, one_thread_for_toy_defaults, seeded_generators
from .threads import torch_threads
from .toy.decoder_recipe import add_toy_default_arguments, default_toy_decoder, toy_decoder_world
from .encoders import parse_clip_specs

OUTPUT_PREFIX = "re_"
TOY_OUTPUT_DIR = "outputs/toy_test"
SCRIPT = "test.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=SCRIPT, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoder", default=None,
                        help="folder written by finetune.py (default: the toy decoder, see train_toy_decoder.py)")
    parser.add_argument("--images", nargs="+", default=None,
                        help="image files and/or folders (searched recursively); default: held-out toy-world images")
    parser.add_argument("--output_dir", default=None,
                        help=f"default: beside each input image ({TOY_OUTPUT_DIR} for the toy-world default images)")
    toy = add_toy_default_arguments(parser, "--decoder / --images")
    toy.add_argument("--num_toy_images", type=int, default=4, help="held-out toy-world images to reconstruct")
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--scheduler", default=None, help=f"one of {sorted(SCHEDULERS)} (default: the decoder's own)")
    parser.add_argument("--negative", default=None,
                        help="embedding file (D,) for the unconditional branch; default: the decoder's empty embedding")
    parser.add_argument("--prompt", default=None,
                        help="text+image decoder only: a caption for every image (default: none, image only)")
    parser.add_argument("--image_scale", type=float, default=None,
                        help="text+image decoder only: weight of the image embedding's attention (default 1)")
    parser.add_argument("--num_images", type=int, default=1, help="reconstructions per input image")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip_models", nargs="+", default=None,
                        help="override the decoder's CLIP specs (MODEL:PRETRAINED); must give the same dim")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default fp16 on CUDA)")
    parser.add_argument("--skip_existing", action=argparse.BooleanOptionalAction, default=False)
    return parser


def validate_args(parser: argparse.ArgumentParser, args) -> None:
    """Check every flag before any work (no model is loaded or trained for a bad command line)."""
    check_flags(parser, args, counts=("num_inference_steps", "num_images", "batch_size", "num_toy_images",
                                      "num_threads"), scales=("guidance_scale", "image_scale"))
    if args.negative is not None:
        try:
            check_embedding_file("--negative", args.negative)
        except ValueError as error:
            parser.error(str(error))


def collect_inputs(items: list[str], output_dir: str | None) -> list[tuple[Path, Path]]:
    """(input image, output path) pairs; folders keep their sub-folders under --output_dir."""
    pairs = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            for record in read_image_folder(path):
                if Path(record.file_name).name.startswith(OUTPUT_PREFIX):
                    continue  # our own earlier outputs
                relative = Path(record.file_name)
                base = Path(output_dir) / path.name / relative.parent if output_dir else record.path.parent
                pairs.append((record.path, base / f"{OUTPUT_PREFIX}{relative.stem}.png"))
        elif path.is_file():
            base = Path(output_dir) if output_dir else path.parent
            pairs.append((path, base / f"{OUTPUT_PREFIX}{path.stem}.png"))
        else:
            raise SystemExit(f"{SCRIPT}: --images {path}: no such file or folder")
    if not pairs:
        raise SystemExit(f"{SCRIPT}: no images found in {items}")
    return pairs


def write_toy_inputs(args, folder: Path) -> list[str]:
    """Render --num_toy_images held-out toy-world images into folder (the default --images)."""
    from .toy.world import load_world_config, render_image, sample_record

    world = toy_decoder_world(args.decoder, args.toy_root, args.toy_fast)
    config = load_world_config(world).heldout(args.num_toy_images, offset=3_000_017)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(args.num_toy_images):
        record = sample_record(config, index)
        path = folder / f"toy{index:02d}.png"
        render_image(config, record).save(path)
        (folder / f"toy{index:02d}.txt").write_text(record["text"] + "\n")
        paths.append(str(path))
    return paths


def main(argv=None) -> list[Path]:
    """What `python test.py ARGV` does: the written image paths."""
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(parser, args)
    toy_inputs = args.images is None
    one_thread_for_toy_defaults(args, toy_inputs or args.decoder is None)
    with torch_threads(args.num_threads):
        return run(args, toy_inputs)


def run(args, toy_inputs: bool) -> list[Path]:
    from tqdm.auto import tqdm

    from .encoders import MultiCLIP

    if args.decoder is None:
        args.decoder = default_toy_decoder(args, SCRIPT)
    if toy_inputs:
        args.output_dir = args.output_dir or TOY_OUTPUT_DIR
        args.images = write_toy_inputs(args, Path(args.output_dir) / "inputs")

    device, dtype = default_device_dtype(args.device, args.dtype)
    try:
        decoder = load_decoder(args.decoder, device=device, dtype=dtype, scheduler=args.scheduler,
                               image_scale=args.image_scale)
    except ValueError as error:
        raise SystemExit(f"{SCRIPT}: --decoder {args.decoder}: {error}") from None
    takes_prompts = getattr(decoder, "takes_prompts", False)
    if args.prompt is not None and not takes_prompts:
        raise SystemExit(f"{SCRIPT}: --prompt: {args.decoder} is a language-free decoder (it reads no caption)")
    specs = parse_clip_specs(args.clip_models) if args.clip_models else decoder.clip_specs
    clip = MultiCLIP(specs, device=device, dtype=dtype)
    if clip.dim != decoder.clip_dim:
        raise SystemExit(f"{SCRIPT}: the CLIP models {specs} give dim {clip.dim}, the decoder's projection expects "
                         f"{decoder.clip_dim} (from {args.decoder}/image_projection/config.json)")
    negative = load_embedding(args.negative) if args.negative else None
    pairs = collect_inputs(args.images, args.output_dir)
    jobs = [(source, numbered(target, k, args.num_images), index * args.num_images + k)
            for index, (source, target) in enumerate(pairs) for k in range(args.num_images)]
    if args.skip_existing:
        jobs = [job for job in jobs if not job[1].exists()]
    written, unreadable = [], set()
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="images", unit="batch"):
        batch, images = [], []
        for job in jobs[start:start + args.batch_size]:
            try:
                images.append(open_rgb(job[0]))
                batch.append(job)
            except Exception as error:
                print(f"{SCRIPT}: skipping unreadable image {job[0]}: {type(error).__name__}: {error}", file=sys.stderr)
                unreadable.add(job[0])
        if not batch:
            continue
        image_embeds = clip.encode_image(images)  # (B, D)
        generators = seeded_generators(device, args.seed, [seed_index for _, _, seed_index in batch])
        captions = {"prompts": args.prompt} if takes_prompts else {}
        outputs = decoder.generate(image_embeds, **captions, guidance_scale=args.guidance_scale,
                                   num_inference_steps=args.num_inference_steps, negative_embeds=negative,
                                   generator=generators, height=args.height, width=args.width)
        for (_, target, _), image in zip(batch, outputs):
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target)
            written.append(target)
    if toy_inputs and written:
        from .decoder import make_grid

        rows = [[open_rgb(source)] + [open_rgb(numbered(target, k, args.num_images)) for k in range(args.num_images)]
                for source, target in pairs]
        grid_path = Path(args.output_dir) / "grid.png"
        make_grid(rows).save(grid_path)
        print(f"{SCRIPT}: grid [input | reconstructions] written to {grid_path}")
    where = args.output_dir or "beside the inputs"
    print(f"{SCRIPT}: wrote {len(written)} images ({len(pairs)} inputs x {args.num_images}) to {where}; "
          f"{len(unreadable)} unreadable inputs skipped")
    return written
