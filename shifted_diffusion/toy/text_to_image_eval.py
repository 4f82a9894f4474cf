"""The whole chain on the toy world: text -> prior (shifted vs baseline) -> CLIP image embedding -> decoder -> image.

The work of ``benchmarks/toy_text_to_image.py`` (``run_text_to_image_eval(argv)`` takes its flags; the grid
and the markdown table are ``text_to_image_report``).

Held-out captions = freshly rendered toy-world images (another seed: seen by neither prior nor decoder), each
with its caption, attributes and which attributes the caption mentions. Measured, per method:

* text-to-image (shifted and baseline prior, ``--prior_num_inference_steps`` sampling steps, same decoder and seeds):
  attribute accuracy of the generated images (read by shifted_diffusion.toy.reader) on the attributes the
  caption mentions; CLIP-space cosine of the generated image to the caption (text embedding) and to the
  ground-truth image, per CLIP block; Frechet distance to real held-out images in the toy CLIP's image space;
  diversity of the unmentioned attributes (normalised entropy among one caption's samples);
* image-to-image (ground-truth image -> CLIP -> decoder): every attribute preserved, cosine to the input, FD;
* the decoder that reads the caption too (``--text_image_decoder``, the toy text + image decoder of
  ``train_toy_decoder.py --decoder_type text_and_image``; trained when missing, ``--no_text_image`` skips it): its
  text-only model (image scale 0: the toy text-to-image "Stable Diffusion" it was built on) from the caption, and
  caption + the shifted / baseline prior's embedding (the same embeddings and decoder seeds as above);
* references: real images through the same measures (the reader's accuracy, the CLIP's own caption-image
  cosine, the finite-sample FD floor) and the autoencoder's reconstructions (the decoder's attribute ceiling).

Priors are reused when found (this order: --shifted_prior/--baseline_prior, benchmarks/toy_prior_quality.py's
outputs, train.py's outputs/toy_prior/prior and outputs/toy_prior_baseline/prior) and trained with train.py's
job (``prior_job.run_prior_job``) otherwise; only priors trained with the decoder's CLIP are accepted. Writes the
JSON, prints the markdown table and writes a PNG grid (one row per caption: ground truth | shifted samples |
baseline samples | img2img).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..files import write_results_json
from ..threads import torch_threads
from .decoder_recipe import ensure_toy_decoder, toy_decoder_world
from .prior_job import run_prior_job
from .prior_quality import FAST_MAX_TRAIN_STEPS, FAST_TRAIN_ARGS
from .text_to_image_report import PRIORS, format_table, labelled_grid
from .world import ATTRIBUTES

# the tiny prior of benchmarks/toy_prior_quality.py (seconds of training)
FAST_PRIOR_ARGS = [*FAST_TRAIN_ARGS, "--max_train_steps", str(FAST_MAX_TRAIN_STEPS)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy_text_to_image.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="results JSON file")
    parser.add_argument("--fast", action="store_true", help="tiny world, decoder, priors and evaluation (tests)")
    parser.add_argument("--output_dir", default=None,
                        help="images, grid and (--fast) priors (default outputs/toy_text_to_image[_fast])")
    parser.add_argument("--toy_root", default="outputs/toy_assets", help="where the toy world and CLIP are cached")
    parser.add_argument("--world_dir", default=None,
                        help="toy world folder of the held-out renders (default: the decoder's, from toy_decoder.json)")
    parser.add_argument("--decoder", default=None, help="decoder folder (default: the toy decoder, trained if missing)")
    parser.add_argument("--text_image_decoder", default=None,
                        help="text + image decoder folder (default: the toy one, trained if missing)")
    parser.add_argument("--no_text_image", action="store_true", help="skip the text-only and text + image rows")
    parser.add_argument("--shifted_prior", default=None, help="shifted prior folder (default: found or trained)")
    parser.add_argument("--baseline_prior", default=None, help="baseline prior folder (default: found or trained)")
    parser.add_argument("--num_captions", type=int, default=None, help="held-out captions (default 100; --fast 4)")
    parser.add_argument("--samples_per_caption", type=int, default=None, help="images per caption (default 4; --fast 2)")
    parser.add_argument("--num_real", type=int, default=None, help="real held-out images for FD (default 1000; --fast 32)")
    parser.add_argument("--prior_num_inference_steps", type=int, default=8)
    parser.add_argument("--prior_guidance_scale", type=float, default=1.0)
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="decoder classifier-free guidance")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="decoder DDIM steps (default 25; --fast 2)")
    parser.add_argument("--batch_size", type=int, default=64, help="decoder batch size")
    parser.add_argument("--grid_captions", type=int, default=8, help="captions (rows) in the PNG grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    return parser


# ----------------------------------------------------------------------------------------------
# inputs


def held_out_set(world_folder, count: int, offset: int) -> dict:
    """Freshly rendered world images (seed offset): PIL images, captions, attributes (N, 5), mentioned (N, 5)."""
    from .world import load_world_config, render_image, sample_record

    config = load_world_config(world_folder).heldout(count, offset=offset)
    records = [sample_record(config, i) for i in range(count)]
    return {
        "images": [render_image(config, r) for r in records],
        "captions": [r["text"] for r in records],
        "attributes": torch.tensor([[r["indices"][a] for a in ATTRIBUTES] for r in records], dtype=torch.long),
        "mentioned": torch.tensor([[a in r["mentioned"] for a in ATTRIBUTES] for r in records], dtype=torch.bool),
        "num_values": {a: len(config.values(a)) for a in ATTRIBUTES},
    }


def _clip_hashes(specs) -> list:
    """Weight hashes of CLIP folders (so that a copied folder counts as the same CLIP)."""
    from .decoder_recipe import clip_identity

    return [clip_identity(m)["weights_sha1"] if Path(m).is_dir() else str(m) for m, _ in specs]


def _prior_clip_specs(prior_dir: Path):
    from ..prior_pipeline import read_prior_info
    from ..encoders import parse_clip_specs

    if not ((prior_dir / "model_index.json").is_file() or (prior_dir / "config.json").is_file()):
        return None
    info = read_prior_info(prior_dir)
    return parse_clip_specs(info["encoders"].get("clip_models", [])), info["training"].get("global_step") or 0


def prior_candidates(fast: bool, output_dir: Path) -> list:
    """(shifted, baseline) folder pairs trained together, in order of preference."""
    if fast:
        return [(output_dir / "priors" / "shifted" / "prior", output_dir / "priors" / "baseline" / "prior")]
    pairs = [(d / "shifted" / "prior", d / "baseline" / "prior") for d in sorted(Path("outputs").glob("toy_prior_quality*"))]
    return pairs + [(Path("outputs/toy_prior/prior"), Path("outputs/toy_prior_baseline/prior"))]


def find_or_train_priors(args, output_dir: Path, clip_specs) -> dict:
    """{name: (prior folder, how)}: given folders; else the matching pair (the decoder's CLIP) with the most
    training steps among benchmarks/toy_prior_quality.py's and train.py's outputs; else trained with train.py."""
    given = {name: getattr(args, f"{name}_prior") for name in PRIORS}
    wanted = _clip_hashes(clip_specs)
    best, best_steps = None, -1
    for pair in prior_candidates(args.fast, output_dir):
        found = [_prior_clip_specs(p) for p in pair]
        if any(f is None for f in found) or any(_clip_hashes(f[0]) != wanted for f in found):
            continue
        steps = min(f[1] for f in found)
        if steps > best_steps:
            best, best_steps = pair, steps
    out = {}
    for name, default in zip(PRIORS, best or (None, None)):
        if given[name]:
            out[name] = (Path(given[name]), "given")
        elif default is not None:
            out[name] = (default, f"reused ({best_steps} steps)")
        else:
            out[name] = (train_prior(name, args, output_dir), "trained")
    return out


def train_prior(name: str, args, output_dir: Path) -> Path:
    """Train one toy prior with train.py's job (prior_job.run_prior_job: the toy config; --fast: a seconds-long
    one, prior_quality's fast settings)."""
    target = output_dir / "priors" / name if args.fast else \
        Path("outputs/toy_prior" if name == "shifted" else "outputs/toy_prior_baseline")
    argv = ["--output_dir", str(target), "--baseline" if name == "baseline" else "--no-baseline",
            "--toy_root", args.toy_root, "--no-evaluate_toy", "--report_to", "none", "--seed", str(args.seed)]
    if args.fast:
        argv += ["--toy_fast", *FAST_PRIOR_ARGS]
    print(f"toy_text_to_image: training the {name} prior: python train.py {' '.join(argv)}", flush=True)
    return Path(run_prior_job(argv))


# ----------------------------------------------------------------------------------------------
# measures


def attribute_scores(predicted: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> dict:
    """Accuracy of predicted attributes (N, 5) against truth (N, 5) on the masked (N, 5) entries.

    "mean": per-sample fraction of its masked attributes that are right, averaged over samples;
    "all": fraction of samples with every masked attribute right; per attribute: accuracy where masked."""
    hit = (predicted == truth) & mask
    counted = mask.sum(1)
    keep = counted > 0
    out = {
        "mean": float((hit.sum(1)[keep].double() / counted[keep]).mean()) if keep.any() else float("nan"),
        "all": float((hit.sum(1) == counted)[keep].double().mean()) if keep.any() else float("nan"),
    }
    for j, a in enumerate(ATTRIBUTES):
        out[a] = float(hit[:, j][mask[:, j]].double().mean()) if mask[:, j].any() else float("nan")
    return out


def read_attributes(reader, images) -> torch.Tensor:
    predicted = reader.read(images)
    return torch.stack([predicted[a] for a in ATTRIBUTES], dim=1)  # (N, 5)


def clip_scores(generated: torch.Tensor, text: torch.Tensor, truth: torch.Tensor, real: torch.Tensor,
                block_sizes) -> dict:
    """Per-block and mean cosine to the caption and the ground truth (rows paired), FD to the real set."""
    from ..metrics import blockwise_cosine, frechet_distance

    cos_text_blocks, cos_text = blockwise_cosine(generated, text, block_sizes)  # (N, J), (N,)
    cos_gt_blocks, cos_gt = blockwise_cosine(generated, truth, block_sizes)
    return {
        "cos_text": float(cos_text.mean()), "cos_text_per_block": cos_text_blocks.mean(0).tolist(),
        "cos_gt": float(cos_gt.mean()), "cos_gt_per_block": cos_gt_blocks.mean(0).tolist(),
        "fd": float(frechet_distance(generated.double(), real.double())),
    }


def diversity(predicted: torch.Tensor, group: torch.Tensor, mentioned: torch.Tensor, num_values: dict) -> dict:
    """Normalised entropy of each unmentioned attribute among one caption's samples (toy.evaluate), and the mean."""
    from .evaluate import unmentioned_diversity

    by_attribute = unmentioned_diversity({a: predicted[:, j] for j, a in enumerate(ATTRIBUTES)}, group, mentioned,
                                         num_values)
    values = [v for v in by_attribute.values() if not np.isnan(v)]
    return {"mean": float(np.mean(values)) if values else float("nan"), **by_attribute}


def decode(decoder, embeds: torch.Tensor, seeds: Sequence[int], args, prompts: Optional[Sequence[str]] = None) -> list:
    """Decoder images for embeddings (N, D), one seeded generator per row; ``prompts`` (N captions) for a decoder
    that reads them (the text + image decoder)."""
    images = []
    for start in range(0, len(embeds), args.batch_size):
        rows = embeds[start:start + args.batch_size]
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start:start + args.batch_size]]
        extra = {} if prompts is None else {"prompts": list(prompts[start:start + args.batch_size])}
        images += decoder.generate(rows, guidance_scale=args.guidance_scale,
                                   num_inference_steps=args.num_inference_steps, generator=generators, **extra)
    return images


# ----------------------------------------------------------------------------------------------
# the run


def run_text_to_image_eval(argv: Sequence[str]) -> dict:
    """What `python benchmarks/toy_text_to_image.py ARGV` does: the results (also written to --out as JSON)."""
    args = build_parser().parse_args(list(argv))
    defaults = dict(num_captions=4, samples_per_caption=2, num_real=32, num_inference_steps=2) if args.fast else \
        dict(num_captions=100, samples_per_caption=4, num_real=1000, num_inference_steps=25)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    with torch_threads(args.num_threads):
        return run(args)


def run(args) -> dict:
    from ..decoder import load_decoder
    from ..encoders import MultiCLIP
    from ..metrics import blockwise_cosine, frechet_distance
    from ..prior_pipeline import load_prior
    from .decoder import reconstruct
    from .evaluate import nearest_neighbour_attributes
    from .reader import ToyAttributeReader, reader_accuracy
    from .world import load_world_config

    wall = {}
    start = time.time()
    output_dir = Path(args.output_dir or ("outputs/toy_text_to_image_fast" if args.fast else "outputs/toy_text_to_image"))
    output_dir.mkdir(parents=True, exist_ok=True)
    decoder_dir = Path(args.decoder) if args.decoder else ensure_toy_decoder(toy_root=args.toy_root, fast=args.fast)
    world = args.world_dir or toy_decoder_world(decoder_dir, args.toy_root, args.fast)
    decoder = load_decoder(decoder_dir)
    clip = MultiCLIP(decoder.clip_specs, device="cpu")
    text_image, text_image_dir = None, None
    if not args.no_text_image:
        text_image_dir = Path(args.text_image_decoder) if args.text_image_decoder else ensure_toy_decoder(
            toy_root=args.toy_root, fast=args.fast, decoder_type="text_and_image")
        text_image = load_decoder(text_image_dir)
        if not getattr(text_image, "takes_prompts", False):
            raise SystemExit(f"toy_text_to_image.py: --text_image_decoder {text_image_dir} is not a text + image "
                             "decoder (train_toy_decoder.py --decoder_type text_and_image, or finetune.py --decoder_type "
                             "text_and_image)")
        if _clip_hashes(text_image.clip_specs) != _clip_hashes(decoder.clip_specs):
            raise SystemExit(f"toy_text_to_image.py: --text_image_decoder {text_image_dir} reads another CLIP than "
                             f"--decoder {decoder_dir} ({text_image.clip_specs} vs {decoder.clip_specs}): the rows "
                             "would not share the priors' embeddings")
    priors = find_or_train_priors(args, output_dir, decoder.clip_specs)
    wall["setup"] = round(time.time() - start, 1)

    world_config = load_world_config(world)
    reader = ToyAttributeReader(world_config)
    start = time.time()
    accuracy_of_reader = reader_accuracy(reader, world_config, num_images=max(args.num_real, 200))
    held = held_out_set(world, args.num_captions, offset=4_000_037)
    real = held_out_set(world, args.num_real, offset=5_000_011)
    truth_emb = clip.encode_image(held["images"])  # (C, D)
    text_emb = clip.encode_text(held["captions"])  # (C, D)
    real_emb = clip.encode_image(real["images"])  # (R, D)
    blocks = clip.block_sizes
    wall["references"] = round(time.time() - start, 1)

    c, s = args.num_captions, args.samples_per_caption
    group = torch.arange(c).repeat_interleave(s)  # (C*S,) caption of each sample
    seeds = [args.seed * 1_000_003 + i for i in range(c * s)]  # the same decoder noise for both priors
    results = {"text_to_image": {}, "captions": held["captions"]}
    prompts = [held["captions"][i] for i in group.tolist()]  # (C*S,) each sample's caption

    def score(images, embeds: Optional[torch.Tensor]) -> dict:
        """A text-to-image row: the mentioned attributes, CLIP scores, diversity; with the prior's embeddings
        (C*S, D), how well those alone match (their nearest real image) and how close the images stay to them."""
        generated = clip.encode_image(images)  # (C*S, D)
        predicted = read_attributes(reader, images)
        row = {"attribute_accuracy": attribute_scores(predicted, held["attributes"][group], held["mentioned"][group]),
               **clip_scores(generated, text_emb[group], truth_emb[group], real_emb, blocks),
               "diversity": diversity(predicted, group, held["mentioned"][group], held["num_values"])}
        if embeds is not None:
            neighbour = nearest_neighbour_attributes(embeds, real_emb, {a: real["attributes"][:, j]
                                                                        for j, a in enumerate(ATTRIBUTES)})
            prior_predicted = torch.stack([neighbour[a] for a in ATTRIBUTES], dim=1)
            row["prior_embedding_nn_attribute_accuracy"] = attribute_scores(
                prior_predicted, held["attributes"][group], held["mentioned"][group])
            row["cos_generated_vs_prior_embedding"] = float(blockwise_cosine(generated, embeds, blocks)[1].mean())
        return row

    images_by_prior, embeds_by_prior = {}, {}
    for name, (prior_dir, how) in priors.items():
        start = time.time()
        prior = load_prior(prior_dir)
        generator = torch.Generator().manual_seed(args.seed)
        embeds = prior(held["captions"], num_images_per_prompt=s, num_inference_steps=args.prior_num_inference_steps,
                       guidance_scale=args.prior_guidance_scale, generator=generator).image_embeds.float()  # (C*S, D)
        images_by_prior[name], embeds_by_prior[name] = decode(decoder, embeds, seeds, args), embeds
        results["text_to_image"][name] = {"prior_dir": str(prior_dir), "prior_source": how,
                                          **score(images_by_prior[name], embeds),
                                          "seconds": round(time.time() - start, 1)}
        wall[f"text_to_image_{name}"] = round(time.time() - start, 1)

    if text_image is not None:  # the caption through SD's text encoder: alone (image scale 0), + each prior's embedding
        results["text_and_image"] = {}
        for name, embeds in [("text_only", None), *embeds_by_prior.items()]:
            start = time.time()
            text_image.set_image_scale(0.0 if embeds is None else 1.0)
            rows = torch.zeros(c * s, text_image.clip_dim) if embeds is None else embeds
            images_by_prior[f"text+{name}"] = decode(text_image, rows, seeds, args, prompts=prompts)
            results["text_and_image"][name] = {**score(images_by_prior[f"text+{name}"], embeds),
                                               "seconds": round(time.time() - start, 1)}
            wall[f"text_and_image_{name}"] = round(time.time() - start, 1)
        text_image.set_image_scale(1.0)

    start = time.time()
    img2img = decode(decoder, truth_emb, seeds[:c], args)
    all_attributes = torch.ones(c, len(ATTRIBUTES), dtype=torch.bool)
    results["image_to_image"] = {
        "attribute_accuracy": attribute_scores(read_attributes(reader, img2img), held["attributes"], all_attributes),
        **clip_scores(clip.encode_image(img2img), text_emb, truth_emb, real_emb, blocks),
    }
    wall["image_to_image"] = round(time.time() - start, 1)

    start = time.time()
    results["reference"] = {
        "real_images": {
            "attribute_accuracy": attribute_scores(read_attributes(reader, held["images"]), held["attributes"],
                                                   all_attributes),
            **clip_scores(truth_emb, text_emb, truth_emb, real_emb, blocks),
            # the FD floor at the text-to-image sample count: another C*S real renders against the real set
            "fd": float(frechet_distance(clip.encode_image(held_out_set(world, c * s, offset=6_000_001)["images"])
                                         .double(), real_emb.double())),
            "note": "ground-truth renders: reader accuracy, the CLIP's own caption-image cosine, the FD of C*S "
                    "other real renders (the finite-sample floor of the text-to-image rows)",
        },
    }
    vae = getattr(getattr(decoder, "pipeline", None), "vae", None)
    if vae is not None:  # the decoder's attribute ceiling: its autoencoder's reconstructions (no GAN row)
        reconstructions = reconstruct(vae, held["images"])
        results["reference"]["autoencoder"] = {
            "attribute_accuracy": attribute_scores(read_attributes(reader, reconstructions), held["attributes"],
                                                   all_attributes),
            **clip_scores(clip.encode_image(reconstructions), text_emb, truth_emb, real_emb, blocks),
        }
    wall["autoencoder"] = round(time.time() - start, 1)

    rows = []
    shown = min(args.grid_captions, c)
    # with the text + image decoder: the first sample of each of its rows (text only, text + shifted, + baseline)
    extra = [f"text+{name}" for name in ("text_only", *PRIORS)] if text_image is not None else []
    for i in range(shown):
        rows.append([held["images"][i]] + [images_by_prior[p][i * s + k] for p in PRIORS for k in range(s)]
                    + [img2img[i]] + [images_by_prior[name][i * s] for name in extra])
    header = ["truth"] + [f"{p[:5]} {k}" for p in PRIORS for k in range(s)] + ["img2img"] + \
        [{"text+text_only": "text", "text+shifted": "t+shift", "text+baseline": "t+base"}[n] for n in extra]
    grid_path = output_dir / "grid.png"
    labelled_grid(rows, held["captions"][:shown], header).save(grid_path)

    def training_record(folder) -> dict:
        path = Path(folder) / "toy_decoder.json" if folder is not None else None
        return json.loads(path.read_text()) if path is not None and path.is_file() else {}

    decoder_record, text_image_record = training_record(decoder_dir), training_record(text_image_dir)
    results["reader_accuracy_on_real_renders"] = accuracy_of_reader
    results["grid"] = str(grid_path)
    results["config"] = {
        "fast": args.fast, "num_captions": c, "samples_per_caption": s, "num_real": args.num_real,
        "prior_num_inference_steps": args.prior_num_inference_steps, "prior_guidance_scale": args.prior_guidance_scale,
        "guidance_scale": args.guidance_scale, "num_inference_steps": args.num_inference_steps, "seed": args.seed,
        "fd_note": "FD is biased by sample count: text-to-image rows and the real reference use C*S samples, "
                   "image-to-image and autoencoder rows C",
        "decoder": str(decoder_dir), "clip": [list(spec) for spec in decoder.clip_specs], "block_sizes": list(blocks),
        "priors": {name: str(path) for name, (path, _) in priors.items()},
        "decoder_training_wall_seconds": decoder_record.get("wall_seconds"),
        "decoder_training_cpu_seconds": decoder_record.get("cpu_seconds"),
        "text_image_decoder": None if text_image_dir is None else str(text_image_dir),
        "text_image_decoder_training_wall_seconds": text_image_record.get("wall_seconds"),
        "text_image_decoder_training_cpu_seconds": text_image_record.get("cpu_seconds"),
        "wall_seconds": wall, "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results_json(out, results)
    print(format_table(results))
    print(f"reader accuracy on real renders: {accuracy_of_reader}")
    print(f"grid: {grid_path}; results: {out}")
    return results
