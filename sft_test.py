"""Text-to-image: caption -> prior (shifted or baseline, from train.py) -> CLIP image embedding -> decoder.

    python sft_test.py --prior runs/prior --decoder sd2-shifted-decoder \\
        --prompt "a red double-decker bus" --prompt "two cats on a sofa" --num_images 4 \\
        --prior_num_inference_steps 8 --prior_guidance_scale 2.0 --guidance_scale 5 --output_dir samples/
    python sft_test.py    # no arguments: a few example toy-world captions with the toy prior
                          # (outputs/toy_prior/prior, `python train.py`) and the toy decoder
                          # (outputs/toy_decoder, `python train_toy_decoder.py`) -> outputs/toy_sft_test/

The decoder's negative (unconditional) embedding is, by default, the prior's sample for the empty
caption "" computed now (as the original did); `--negative empty` uses the decoder's stored empty
embedding, `--negative FILE` any embedding file. Writes one image per sample (caption in the name)
and a grid (one row per prompt).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from shifted_diffusion.checks import check_count, check_embedding_file, check_image_size, check_scale
from shifted_diffusion.threads import torch_threads
from shifted_diffusion.decoder import (SCHEDULERS, default_device_dtype, load_decoder, load_embedding, make_grid,
                                      save_embedding)
from train_toy_decoder import add_toy_default_arguments, default_toy_decoder

TOY_PRIOR = "outputs/toy_prior/prior"
# where else a toy prior may be (benchmarks/toy_prior_quality.py); one on the decoder's CLIP is preferred
TOY_PRIOR_CANDIDATES = (TOY_PRIOR, "outputs/toy_prior_quality/shifted/prior")
TOY_OUTPUT_DIR = "outputs/toy_sft_test"
TOY_EXAMPLE_PROMPTS = (
    "a red circle",
    "a large blue square on a white background",
    "a green star in the top left",
    "a small yellow triangle on a black background",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", default=None,
                        help=f"prior folder written by train.py (shifted or baseline); default: the toy prior "
                             f"{TOY_PRIOR} (with example captions when no --prompt is given)")
    parser.add_argument("--decoder", default=None,
                        help="decoder folder written by finetune.py (default: the toy decoder, train_toy_decoder.py)")
    parser.add_argument("--prompt", action="append", default=[], help="a caption (repeatable)")
    parser.add_argument("--prompts_file", default=None, help="a text file, one caption per non-empty line")
    parser.add_argument("--num_images", type=int, default=1, help="images per prompt")
    parser.add_argument("--prior_num_inference_steps", type=int, default=8, help="prior sampling steps (re-spaced)")
    parser.add_argument("--prior_guidance_scale", type=float, default=None,
                        help="prior classifier-free guidance (default: the prior pipeline's own default)")
    parser.add_argument("--guidance_scale", type=float, default=5.0, help="decoder classifier-free guidance")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="decoder sampling steps")
    parser.add_argument("--scheduler", default=None, help=f"decoder scheduler, one of {sorted(SCHEDULERS)}")
    parser.add_argument("--negative", default="prior",
                        help='"prior" (the prior\'s sample for ""), "empty" (the decoder\'s empty embedding) or a file')
    parser.add_argument("--save_negative", default=None,
                        help="also write the negative embedding (D,) to this .safetensors file (e.g. for finetune.py "
                             "--empty_embedding: the prior's sample for the empty caption, as the original used)")
    parser.add_argument("--batch_size", type=int, default=4, help="decoder batch size")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help=f"default: samples ({TOY_OUTPUT_DIR} for the toy defaults)")
    parser.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="decoder dtype: float32, float16, bfloat16 (default fp16 on CUDA)")
    add_toy_default_arguments(parser, "--prior / --decoder")
    return parser




def validate_args(parser: argparse.ArgumentParser, args) -> None:
    """Check every flag before any work (no model is loaded or trained for a bad command line)."""
    try:
        for name in ("num_images", "batch_size", "prior_num_inference_steps", "num_inference_steps", "num_threads"):
            check_count(f"--{name}", getattr(args, name), optional=True)
        for name in ("guidance_scale", "prior_guidance_scale"):
            if getattr(args, name) is not None:
                check_scale(f"--{name}", getattr(args, name))
        for name in ("height", "width"):
            check_image_size(f"--{name}", getattr(args, name))
        if args.negative not in ("prior", "empty"):
            check_embedding_file("--negative", args.negative)
    except ValueError as error:
        parser.error(str(error))
    if args.save_negative and Path(args.save_negative).is_dir():
        parser.error(f"--save_negative {args.save_negative}: is a directory; expected a .safetensors file to write")
    if args.prompts_file and not Path(args.prompts_file).is_file():
        parser.error(f"--prompts_file {args.prompts_file}: no such file")


def sanitize(caption: str, max_length: int = 80) -> str:
    """A caption as a safe file-name part: letters, digits, '-' and '_' only."""
    text = re.sub(r"\s+", "_", caption.strip().lower())
    text = re.sub(r"[^a-z0-9_\-]", "", text)
    text = re.sub(r"_+", "_", text).strip("_-")
    return text[:max_length] or "empty"


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SystemExit(f"sft_test.py: --prompts_file {path} does not exist")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("sft_test.py: give at least one --prompt or a --prompts_file")
    return prompts


def load_prior_or_exit(path: str, device):
    """load_prior with a clear message when the folder is missing."""
    if not Path(path).exists():
        raise SystemExit(f"sft_test.py: prior folder {path} does not exist (train one with train.py)")
    from shifted_diffusion.prior_pipeline import load_prior

    import inspect

    takes_device = "device" in inspect.signature(load_prior).parameters
    return load_prior(path, device=device) if takes_device else load_prior(path)


def prior_generate(prior, prompts, *, num_images_per_prompt, num_inference_steps, guidance_scale, generator):
    """(image_embeds (P*N, D), negative_image_embeds (P*N, D): the prior's sample for "") from the prior pipeline."""
    kwargs = {"num_images_per_prompt": num_images_per_prompt, "num_inference_steps": num_inference_steps,
              "generator": generator}
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    out = prior(list(prompts), **kwargs)
    return torch.as_tensor(out.image_embeds).float(), torch.as_tensor(out.negative_image_embeds).float()


def _clip_paths(folder, key_path) -> list:
    import json

    from shifted_diffusion.train_config import parse_clip_specs

    config = Path(folder) / key_path[0]
    if not config.is_file():
        return []
    value = json.loads(config.read_text())
    for key in key_path[1:]:
        value = value.get(key, {}) if isinstance(value, dict) else {}
    entries = [e if isinstance(e, str) else ":".join(e) for e in (value or [])]  # "M:P" strings or [M, P] lists
    return [str(Path(m).resolve()) for m, _ in parse_clip_specs(entries)]


def same_clip_specs(a, b) -> bool:
    """Whether two lists of (model, pretrained) name the same CLIP models (local paths compared resolved)."""
    from shifted_diffusion.encoders import resolve_clip_spec

    return [resolve_clip_spec(*spec) for spec in a] == [resolve_clip_spec(*spec) for spec in b]


def check_prior_output(embeds: torch.Tensor, args, what: str = "the prior's image embeddings") -> None:
    """Stop before the decoder when the prior's samples hold NaN / inf (which would give black images)."""
    from shifted_diffusion.checks import check_finite

    scale = args.prior_guidance_scale
    cause = (f"--prior_guidance_scale {scale} is too large" if scale is not None and scale > 1 else
             f"the prior {args.prior} is broken (NaN / inf weights or an overflowing dtype)")
    check_finite(embeds, what, cause)


def toy_prior_for(decoder: str) -> str:
    """The first existing toy prior trained with the decoder's CLIP (else the first existing one)."""
    existing = [p for p in TOY_PRIOR_CANDIDATES if Path(p).exists()]
    wanted = _clip_paths(decoder, ("shifted_decoder.json", "clip_models"))
    for prior in existing:
        if _clip_paths(prior, ("config.json", "encoders", "clip_models")) == wanted:
            return prior
    return existing[0]


def toy_defaults(args) -> None:
    """Fill in the toy prior / toy decoder / example captions / output folder where none were given."""
    toy_prior = args.prior is None
    if toy_prior and not any(Path(p).exists() for p in TOY_PRIOR_CANDIDATES):
        raise SystemExit(f"sft_test.py: no --prior given and the toy prior {TOY_PRIOR} does not exist: "
                         f"train it with `python train.py` (or pass --prior)")
    if args.decoder is None:
        args.decoder = default_toy_decoder(args, "sft_test.py")
    if toy_prior:
        args.prior = toy_prior_for(args.decoder)
        print(f"sft_test.py: no --prior given: using the toy prior {args.prior}", flush=True)
        if not args.prompt and not args.prompts_file:
            args.prompt = list(TOY_EXAMPLE_PROMPTS)
    if args.output_dir is None:
        args.output_dir = TOY_OUTPUT_DIR if toy_prior else "samples"


def main(argv=None) -> list[Path]:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(parser, args)
    if args.num_threads is None and (args.prior is None or args.decoder is None):
        args.num_threads = 1
    with torch_threads(args.num_threads):
        return run(args)


def run(args) -> list[Path]:
    toy_defaults(args)
    prompts = read_prompts(args)
    if not Path(args.decoder).exists():
        raise SystemExit(f"sft_test.py: decoder folder {args.decoder} does not exist (fine-tune one with finetune.py)")
    device, dtype = default_device_dtype(args.device, args.dtype)
    prior = load_prior_or_exit(args.prior, device)
    decoder = load_decoder(args.decoder, device=device, dtype=dtype, scheduler=args.scheduler)
    prior_dim = int(getattr(prior, "clip_dim", decoder.clip_dim))
    if prior_dim != decoder.clip_dim:
        raise SystemExit(f"sft_test.py: the prior ({args.prior}) makes embeddings of dim {prior_dim}, the decoder "
                         f"({args.decoder}/image_projection) expects {decoder.clip_dim}: they use different CLIP models")

    prior_clips = getattr(prior, "encoders", {}).get("clip_models")
    if prior_clips is not None:
        from shifted_diffusion.train_config import parse_clip_specs

        if not same_clip_specs(parse_clip_specs(prior_clips), decoder.clip_specs):
            print(f"sft_test.py: warning: the prior was trained with CLIP models {list(prior_clips)} but the decoder "
                  f"with {decoder.clip_specs}; same dim {prior_dim}, but the embeddings may not match", file=sys.stderr)
    prior_device = torch.device(getattr(prior, "device", None) or "cpu")
    prior_generator = torch.Generator(device=prior_device).manual_seed(args.seed)
    image_embeds, prior_negative = prior_generate(
        prior, prompts, num_images_per_prompt=args.num_images, num_inference_steps=args.prior_num_inference_steps,
        guidance_scale=args.prior_guidance_scale, generator=prior_generator)  # (P*N, D) each
    expected = (len(prompts) * args.num_images, decoder.clip_dim)
    if tuple(image_embeds.shape) != expected:
        raise RuntimeError(f"the prior returned image embeddings of shape {tuple(image_embeds.shape)}, "
                           f"expected {expected} (prompts x num_images, clip_dim)")
    check_prior_output(image_embeds, args)
    if args.negative == "prior":
        negative = prior_negative[0]
        check_prior_output(negative, args, 'the negative embedding (the prior\'s sample for "")')
    elif args.negative == "empty":
        negative = None
    else:
        negative = load_embedding(args.negative)

    if args.save_negative:
        save_embedding(args.save_negative, decoder.empty_embedding if negative is None else negative)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(p, k) for p in range(len(prompts)) for k in range(args.num_images)]  # prompt-major, as the prior
    images = []
    for start in range(0, len(jobs), args.batch_size):
        rows = slice(start, start + args.batch_size)
        generators = [torch.Generator(device=device).manual_seed(args.seed + i)
                      for i in range(start, min(start + args.batch_size, len(jobs)))]
        images += decoder.generate(image_embeds[rows], guidance_scale=args.guidance_scale,
                                   num_inference_steps=args.num_inference_steps, negative_embeds=negative,
                                   generator=generators, height=args.height, width=args.width)
    written = []
    for (p, k), image in zip(jobs, images):
        path = output_dir / f"{p:03d}_{sanitize(prompts[p])}_{k}.png"
        image.save(path)
        written.append(path)
    if args.grid:
        grid_path = output_dir / "grid.png"
        make_grid([images[p * args.num_images:(p + 1) * args.num_images] for p in range(len(prompts))]).save(grid_path)
        written.append(grid_path)
    print(f"sft_test.py: {len(prompts)} prompts x {args.num_images} images -> {output_dir}"
          + (f" (grid: {output_dir / 'grid.png'})" if args.grid else ""))
    return written


if __name__ == "__main__":
    main()
