"""evaluate.py: the shifted-vs-baseline comparison as one command (the logic of ``evaluation.Evaluator``).

The paper's COCO protocol, end to end:
  1. COCO 2014: annotations/captions_val2014.json and the val2014 image folder (cocodataset.org);
  2. --num_captions 30000 captions drawn at random (one draw seeded by --seed over every caption of every image),
     used as written: no prompt templates; one generated image per caption;
  3. each prior samples an image embedding per caption (--prior_guidance_scales, --prior_num_inference_steps);
     the decoder turns it into an image (--guidance_scales, --num_inference_steps, --image_size);
  4. FID (torchmetrics, InceptionV3 pool features) of the generated images against the sampled captions' val2014
     images, centre-cropped to --image_size (their statistics computed once and cached in the output folder);
     CLIP image-text and image-image similarity per CLIP of --clip_models (default the paper's ViT-B/16, ViT-B/32,
     RN101), averaged over the CLIPs, then over the captions; without --decoder only the priors' embedding cosines;
  5. results.json (every number with its settings) and two plots: FID against CLIP image-image and against CLIP
     image-text similarity, one curve per prior, points labelled "prior guidance / decoder guidance".

    accelerate launch evaluate.py --prior shifted=runs/prior_shifted --prior baseline=runs/prior_baseline \\
        --decoder runs/decoder --coco_captions coco/annotations/captions_val2014.json --coco_images coco/val2014 \\
        --num_captions 30000 --seed 0 --prior_guidance_scales 1,2 --guidance_scales 1.5,3,5,7.5 \\
        --prior_num_inference_steps 64 --num_inference_steps 50 --image_size 256 --output_dir eval/coco

Each accelerate process computes its share of the shards; rerun the same command to resume (finished shards are
loaded; a new guidance scale computes only its own). Offline: --inception_weights. The toy world's version of the
comparison: benchmarks/toy_shifted_vs_baseline.py (--fd_clip, --toy_attributes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SCRIPT = "evaluate.py"

INCEPTION_HELP = (
    "InceptionV3 weights for FID on a machine without internet: torch-fidelity's file "
    "weights-inception-2015-12-05-6726825d.pth (download it once where there is internet: torch-fidelity fetches it "
    "from its GitHub release on first use of FID and keeps it in torch's hub cache, ~/.cache/torch/hub/checkpoints). "
    "Without this flag it is downloaded at first use into that cache. Either way the file is read here with "
    "weights_only=True (refused unless it holds plain tensors), and torch-fidelity is given a copy written from "
    "those tensors, never the file itself.")


def _floats(text: str) -> list:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _named(text: str) -> tuple:
    name, sep, path = text.partition("=")
    if not sep or not name or not path or "/" in name:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (a name without '/'), got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    from .encoders import PAPER_CLIP_MODELS

    p = argparse.ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", type=_named, action="append", required=True, metavar="NAME=PATH",
                   help="a prior to compare (any load_prior folder or checkpoint); repeat for several")
    p.add_argument("--decoder", default=None,
                   help="our decoder folder or a stock unCLIP pipeline (folder or hub id); without it only the "
                        "prior-only embedding metrics are computed")
    data = p.add_argument_group("evaluation set (one of)")
    data.add_argument("--image_folder", default=None, help="an image folder with captions (metadata.jsonl or .txt)")
    data.add_argument("--coco_captions", default=None, help="COCO's annotations/captions_val2014.json")
    data.add_argument("--coco_images", default=None, help="COCO's val2014 image folder")
    p.add_argument("--num_captions", type=int, default=30000, help="captions drawn at random (COCO protocol: 30000)")
    p.add_argument("--seed", type=int, default=0, help="the caption draw and every sampling seed")
    p.add_argument("--prior_guidance_scales", type=_floats, default=[1.0], help="comma-separated, e.g. 1,2,4")
    p.add_argument("--guidance_scales", type=_floats, default=[1.5, 3.0, 5.0, 7.5], help="decoder guidance, comma-separated")
    p.add_argument("--prior_num_inference_steps", default="8")
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--image_size", type=int, default=256, help="generated images, and real ones for FID (centre crop)")
    p.add_argument("--clip_models", nargs="+", default=list(PAPER_CLIP_MODELS),
                   help="the CLIPs of the image-text / image-image scores (MODEL:PRETRAINED or local folders)")
    p.add_argument("--inception_weights", default=None, help=INCEPTION_HELP)
    p.add_argument("--negative", choices=("prior", "empty"), default="prior",
                   help='the decoder guidance\'s negative embedding: the prior\'s sample for "" (as sft_test.py) or '
                        "the decoder's own empty embedding (what a decoder of finetune.py was trained with)")
    p.add_argument("--fd_clip", nargs="+", default=None, metavar="CLIP",
                   help="compute the Frechet distance in these CLIPs' image-embedding space (concatenated) instead "
                        "of InceptionV3's; reported as fd_clip, not fid (e.g. the toy world's CLIP folder)")
    p.add_argument("--toy_attributes", action="store_true",
                   help="toy world only (the evaluation images are a generated toy world): read each generated "
                        "image's attributes from its pixels and report their accuracy on the attributes its caption "
                        "mentions (attribute_accuracy)")
    p.add_argument("--shard_size", type=int, default=256)
    p.add_argument("--save_images", action="store_true", help="also write the generated images as PNG")
    p.add_argument("--output_dir", required=True, help="shards, results.json and the plots (resumed when present)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="the decoder's dtype (default: float16 on CUDA, else float32)")
    return p


def read_pairs(args, parser):
    """The sampled evaluation set; exactly one of --image_folder / --coco_captions + --coco_images."""
    from .eval_data import read_captioned_folder, read_coco_captions, sample_pairs

    coco = args.coco_captions is not None or args.coco_images is not None
    if coco == (args.image_folder is not None):
        parser.error("give either --image_folder or --coco_captions with --coco_images")
    if coco and (args.coco_captions is None or args.coco_images is None):
        parser.error("--coco_captions and --coco_images go together")
    try:
        pairs = (read_coco_captions(args.coco_captions, args.coco_images) if coco
                 else read_captioned_folder(args.image_folder))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"{SCRIPT}: {error}") from None
    return sample_pairs(pairs, args.num_captions, args.seed)


def source_stamp(path) -> str:
    """PATH#hash of its files' names, sizes and modification times: a retrained prior (or decoder) at the same
    path gets new shards instead of the old ones."""
    import hashlib

    path = Path(path)
    if not path.exists():
        return str(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if file != path else file.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return f"{path}#{digest.hexdigest()[:16]}"


def main(argv=None, *, fid_feature=None) -> dict:
    """What ``python evaluate.py ARGV`` does: the results (the main process; None on the others).
    ``fid_feature``: an ``nn.Module`` (uint8 images -> (N, d)) instead of InceptionV3 (tests, other extractors)."""
    from accelerate import PartialState

    from .decoder import default_device_dtype, load_decoder
    from .decoder_choice import SHIFTED, decoder_kind, load_unclip
    from .eval_plots import plot_tradeoffs
    from .evaluation import EncoderFeatures, EvalSettings, Evaluator, make_fid_metric
    from .prior_pipeline import load_prior

    parser = build_parser()
    args = parser.parse_args(argv)
    names = [name for name, _ in args.prior]
    if len(set(names)) != len(names):
        parser.error(f"--prior names must differ; got {names}")
    if args.decoder is None and (args.fd_clip or args.toy_attributes):
        parser.error("--fd_clip and --toy_attributes measure generated images: they need --decoder")
    pairs = read_pairs(args, parser)
    scorer = None
    if args.toy_attributes:
        from .toy.attribute_scorer import ToyAttributeScorer

        try:
            scorer = ToyAttributeScorer(pairs)
        except ValueError as error:
            raise SystemExit(f"{SCRIPT}: {error}") from None
    state = PartialState()
    device, dtype = default_device_dtype(args.device or str(state.device), args.dtype)
    priors = {}
    for name, path in args.prior:
        try:
            priors[name] = load_prior(path, device=device)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"{SCRIPT}: --prior {name}={path}: {error}") from None
    decoder = eval_clip = fid = None
    fd_name = "fid"
    if args.decoder is not None:
        kind = decoder_kind(args.decoder, SCRIPT)
        decoder = (load_decoder(args.decoder, device=device, dtype=dtype) if kind == SHIFTED
                   else load_unclip(args.decoder, kind, SCRIPT, device, dtype))
        if args.negative == "empty" and kind != SHIFTED and decoder.takes_negative:
            parser.error(f"--negative empty: {decoder.kind} stores no empty embedding; use --negative prior")
        from .encoders import MultiCLIP, parse_clip_specs

        eval_clip = MultiCLIP(parse_clip_specs(args.clip_models), device=device)
        if fid_feature is None and args.fd_clip:
            fid_feature = EncoderFeatures(eval_clip if args.fd_clip == args.clip_models
                                          else MultiCLIP(parse_clip_specs(args.fd_clip), device=device))
            fd_name = "fd_clip"
        try:
            fid = make_fid_metric(2048 if fid_feature is None else fid_feature, args.inception_weights).to(device)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"{SCRIPT}: {error}") from None
    settings = EvalSettings(prior_guidance_scales=args.prior_guidance_scales, guidance_scales=args.guidance_scales,
                            prior_num_inference_steps=str(args.prior_num_inference_steps),
                            num_inference_steps=args.num_inference_steps, image_size=args.image_size, seed=args.seed,
                            shard_size=args.shard_size, save_images=args.save_images, negative=args.negative)
    try:
        evaluator = Evaluator(pairs, priors, args.output_dir, settings, decoder=decoder, eval_clip=eval_clip,
                              fid_metric=fid, fd_name=fd_name,
                              prior_sources={name: source_stamp(path) for name, path in args.prior},
                              decoder_source=source_stamp(args.decoder) if args.decoder else "", image_scorer=scorer,
                              state=state)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"{SCRIPT}: {error}") from None
    results = evaluator.run()
    if results is not None:
        plots = plot_tradeoffs(results, args.output_dir)
        print(f"{SCRIPT}: {len(pairs)} captions, {len(priors)} priors -> {Path(args.output_dir) / 'results.json'}"
              + "".join(f", {p}" for p in plots), file=sys.stderr)
    return results
