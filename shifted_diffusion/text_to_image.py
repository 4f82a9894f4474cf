"""Text-to-image: caption -> prior (shifted or baseline, from train.py) -> CLIP image embedding -> decoder.

    python sft_test.py --prior runs/prior --decoder sd2-shifted-decoder \\
        --prompt "a red double-decker bus" --prompt "two cats on a sofa" --num_images 4 \\
        --prior_num_inference_steps 8 --prior_guidance_scale 2.0 --guidance_scale 5 --output_dir samples/
    python sft_test.py --prior runs/kandinsky_prior --decoder kandinsky-community/kandinsky-2-2-decoder \\
        --prompt "a red double-decker bus" --height 512 --width 512 --guidance_scale 4
    python sft_test.py    # no arguments: a few example toy-world captions with the toy prior
                          # (outputs/toy_prior/prior, `python train.py`) and the toy decoder
                          # (outputs/toy_decoder, `python train_toy_decoder.py`) -> outputs/toy_sft_test/

--decoder is a decoder folder written by finetune.py, or a stock unCLIP decoder pipeline (folder or hub id:
Kandinsky 2.2, Stable unCLIP img2img, Karlo image variation) driven by a prior trained on its CLIP. The
decoder's negative (unconditional) embedding is, by default, the prior's sample for the empty caption ""
computed now (as the original did); `--negative empty` uses the decoder's stored empty embedding (Stable
unCLIP / Karlo: their own unconditional embedding), `--negative FILE` any embedding file. Writes one image
per sample (caption in the name) and a grid (one row per prompt).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from .checks import check_embedding_file
from .decoder import SCHEDULERS, default_device_dtype, load_decoder, load_embedding, make_grid, save_embedding
from .decoder_choice import SHIFTED, decoder_kind, load_unclip
from .generation import check_flags, one_thread_for_toy_defaults, seeded_generators
from .threads import torch_threads
from .toy.decoder_recipe import add_toy_default_arguments, default_toy_decoder

SCRIPT = "sft_test.py"
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
    parser = argparse.ArgumentParser(prog=SCRIPT, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", default=None,
                        help=f"prior folder written by train.py (shifted or baseline); default: the toy prior "
                             f"{TOY_PRIOR} (with example captions when no --prompt is given)")
    parser.add_argument("--decoder", default=None,
                        help="decoder folder written by finetune.py (default: the toy decoder, train_toy_decoder.py), "
                             "or a stock unCLIP decoder pipeline folder / hub id (Kandinsky 2.2, Stable unCLIP, Karlo)")
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
                        help='"prior" (the prior\'s sample for ""), "empty" (the decoder\'s empty embedding; zeros for '
                             'a text+image decoder, what it was trained with) or a file')
    parser.add_argument("--image_scale", type=float, default=None,
                        help="text+image decoder (finetune.py --decoder_type text_and_image): weight of the image "
                             "embedding's attention (0: text only; default 1); the caption also goes to its text encoder")
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
    check_flags(parser, args, counts=("num_images", "batch_size", "prior_num_inference_steps", "num_inference_steps",
                                      "num_threads"), scales=("guidance_scale", "prior_guidance_scale",
                                                                   "image_scale"))
    if args.negative not in ("prior", "empty"):
        try:
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


def sample_path(output_dir: Path, prompt_index: int, prompt: str, k: int) -> Path:
    """<output_dir>/<prompt number>_<caption>_<sample number>.png"""
    return Path(output_dir) / f"{prompt_index:03d}_{sanitize(prompt)}_{k}.png"


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SystemExit(f"{SCRIPT}: --prompts_file {path} does not exist")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"{SCRIPT}: give at least one --prompt or a --prompts_file")
    return prompts


def load_prior_or_exit(path: str, device):
    """load_prior with a clear message when the folder is missing."""
    if not Path(path).exists():
        raise SystemExit(f"{SCRIPT}: prior folder {path} does not exist (train one with train.py)")
    import inspect

    from .prior_pipeline import load_prior  # imported here: tests stand a prior in for the module

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

    from .encoders import parse_clip_specs

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
    from .encoders import resolve_clip_spec

    return [resolve_clip_spec(*spec) for spec in a] == [resolve_clip_spec(*spec) for spec in b]


def check_prior_output(embeds: torch.Tensor, args, what: str = "the prior's image embeddings") -> None:
    """Stop before the decoder when the prior's samples hold NaN / inf (which would give black images)."""
    from .checks import check_finite

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
        raise SystemExit(f"{SCRIPT}: no --prior given and the toy prior {TOY_PRIOR} does not exist: "
                         f"train it with `python train.py` (or pass --prior)")
    if args.decoder is None:
        args.decoder = default_toy_decoder(args, SCRIPT)
    if toy_prior:
        args.prior = toy_prior_for(args.decoder)
        print(f"{SCRIPT}: no --prior given: using the toy prior {args.prior}", flush=True)
        if not args.prompt and not args.prompts_file:
            args.prompt = list(TOY_EXAMPLE_PROMPTS)
    if args.output_dir is None:
        args.output_dir = TOY_OUTPUT_DIR if toy_prior else "samples"


def main(argv=None) -> list[Path]:
    """What `python sft_test.py ARGV` does: the written image paths (the grid last)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(parser, args)
    one_thread_for_toy_defaults(args, args.prior is None or args.decoder is None)
    with torch_threads(args.num_threads):
        return run(args)


def load_any_decoder(args, kind: str, device, dtype):
    """Our decoder folder (load_decoder) or a stock unCLIP pipeline (decoder_choice.UnclipDecoder), with
    the --negative / --scheduler choices that decoder cannot take refused before it is loaded."""
    if kind == SHIFTED:
        try:
            return load_decoder(args.decoder, device=device, dtype=dtype, scheduler=args.scheduler,
                                image_scale=args.image_scale)
        except ValueError as error:
            raise SystemExit(f"{SCRIPT}: --decoder {args.decoder}: {error}") from None
    if args.image_scale is not None:
        raise SystemExit(f"{SCRIPT}: --image_scale: {args.decoder} is not a text+image decoder")
    decoder = load_unclip(args.decoder, kind, SCRIPT, device, dtype)
    if decoder.takes_negative and args.negative == "empty":
        raise SystemExit(f"{SCRIPT}: --negative empty: {decoder.kind} stores no empty embedding; use --negative prior "
                         f"(the prior's sample for \"\") or an embedding file")
    if not decoder.takes_negative and args.negative not in ("prior", "empty"):
        raise SystemExit(f"{SCRIPT}: --negative {args.negative}: {decoder.kind} uses its own unconditional embedding "
                         f"and takes no negative embedding (leave --negative out)")
    if args.scheduler:
        try:
            decoder.set_scheduler(args.scheduler)
        except ValueError as error:
            raise SystemExit(f"{SCRIPT}: {error}") from None
    return decoder


def check_dims(prior, decoder, args) -> int:
    """The prior's embedding dim, SystemExit when the decoder expects another; a warning when the prior and our
    decoder name other CLIP models of the same dim."""
    from .decoder_choice import UnclipDecoder

    prior_dim = int(getattr(prior, "clip_dim", decoder.clip_dim))
    if isinstance(decoder, UnclipDecoder):
        from .unclip import check_embedding_dim

        try:
            check_embedding_dim(prior_dim, decoder.pipeline)
        except ValueError as error:
            raise SystemExit(f"{SCRIPT}: the prior ({args.prior}) and the decoder ({args.decoder}) do not fit: "
                             f"{error}") from None
        return prior_dim
    if prior_dim != decoder.clip_dim:
        raise SystemExit(f"{SCRIPT}: the prior ({args.prior}) makes embeddings of dim {prior_dim}, the decoder "
                         f"({args.decoder}/image_projection) expects {decoder.clip_dim}: they use different CLIP models")
    prior_clips = getattr(prior, "encoders", {}).get("clip_models")
    if prior_clips is not None:
        from .encoders import parse_clip_specs

        if not same_clip_specs(parse_clip_specs(prior_clips), decoder.clip_specs):
            print(f"{SCRIPT}: warning: the prior was trained with CLIP models {list(prior_clips)} but the decoder "
                  f"with {decoder.clip_specs}; same dim {prior_dim}, but the embeddings may not match", file=sys.stderr)
    return prior_dim


def choose_negative(args, decoder, prior_negative: torch.Tensor):
    """The decoder's negative embedding (D,), or None for the decoder's own (stored empty / built-in one)."""
    if getattr(decoder, "takes_negative", True) is False:
        return None
    if args.negative == "prior":
        negative = prior_negative[0]
        check_prior_output(negative, args, 'the negative embedding (the prior\'s sample for "")')
        return negative
    if args.negative == "empty":
        return None
    return load_embedding(args.negative)


def run(args) -> list[Path]:
    toy_defaults(args)
    prompts = read_prompts(args)
    kind = decoder_kind(args.decoder, SCRIPT)
    device, dtype = default_device_dtype(args.device, args.dtype)
    prior = load_prior_or_exit(args.prior, device)
    decoder = load_any_decoder(args, kind, device, dtype)
    check_dims(prior, decoder, args)

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
    negative = choose_negative(args, decoder, prior_negative)

    if args.save_negative:
        stored = decoder.empty_embedding if decoder.empty_embedding is not None else prior_negative[0]
        save_embedding(args.save_negative, stored if negative is None else negative)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(p, k) for p in range(len(prompts)) for k in range(args.num_images)]  # prompt-major, as the prior
    images = []
    for start in range(0, len(jobs), args.batch_size):
        rows = slice(start, start + args.batch_size)
        generators = seeded_generators(device, args.seed, range(start, min(start + args.batch_size, len(jobs))))
        captions = {"prompts": [prompts[p] for p, _ in jobs[rows]]} if getattr(decoder, "takes_prompts", False) else {}
        images += decoder.generate(image_embeds[rows], **captions, guidance_scale=args.guidance_scale,
                                   num_inference_steps=args.num_inference_steps, negative_embeds=negative,
                                   generator=generators, height=args.height, width=args.width)
    written = []
    for (p, k), image in zip(jobs, images):
        path = sample_path(output_dir, p, prompts[p], k)
        image.save(path)
        written.append(path)
    if args.grid:
        grid_path = output_dir / "grid.png"
        make_grid([images[p * args.num_images:(p + 1) * args.num_images] for p in range(len(prompts))]).save(grid_path)
        written.append(grid_path)
    print(f"{SCRIPT}: {len(prompts)} prompts x {args.num_images} images -> {output_dir}"
          + (f" (grid: {output_dir / 'grid.png'})" if args.grid else ""))
    return written
