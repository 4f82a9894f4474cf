"""The seed's shifted-vs-baseline comparison in the toy world, through evaluate.py (the work of
``benchmarks/toy_shifted_vs_baseline.py``; ``run_toy_comparison(argv)`` takes its flags).

It renders a held-out toy world (captions and images neither prior nor decoder saw; another seed of the decoder's
world), then runs ``evaluate.py`` on it: the shifted and the baseline prior through the toy decoder, one image per
caption, at each decoder guidance scale. The numbers are evaluate.py's, with the toy CLIP in every role: the
Frechet distance in its image-embedding space (``fd_clip``: the toy world has no InceptionV3; not an FID), the
CLIP image-text and image-image scores, the prior-only cosines, plus the pixel reader's attribute accuracy on the
attributes each caption mentions (``--toy_attributes``). Written: evaluate.py's output folder, and a JSON (the
results, the exact evaluate.py command, wall times) and the two plots under ``--results_dir``.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch

from ..threads import torch_threads

PRIOR_HINTS = {"shifted": "python train.py",
               "baseline": "python train.py --baseline --output_dir outputs/toy_prior_baseline"}
HELD_OUT_OFFSET = 7_000_003  # the held-out world's seed offset (the toy benchmarks use others)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy_shifted_vs_baseline.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shifted_prior", default="outputs/toy_prior/prior")
    parser.add_argument("--baseline_prior", default="outputs/toy_prior_baseline/prior")
    parser.add_argument("--decoder", default="outputs/toy_decoder", help="a toy decoder folder (train_toy_decoder.py)")
    parser.add_argument("--toy_root", default="outputs/toy_assets", help="where the toy world and CLIP are cached")
    parser.add_argument("--output_dir", default=None,
                        help="the held-out world and evaluate.py's output folder, resumed when present (default "
                             "outputs/toy_shifted_vs_baseline[_TAG])")
    parser.add_argument("--results_dir", default="benchmarks/results",
                        help="where the JSON and the two plots are copied (toy_shifted_vs_baseline*)")
    parser.add_argument("--tag", default="", help="a suffix of the result names (e.g. gan: "
                        "toy_shifted_vs_baseline_gan.json), to keep one result per decoder")
    parser.add_argument("--num_captions", type=int, default=500, help="held-out captions (one image each)")
    parser.add_argument("--guidance_scales", default="1,2,3,4,5", help="decoder guidance scales")
    parser.add_argument("--prior_guidance_scales", default="1")
    parser.add_argument("--prior_num_inference_steps", default="8")
    parser.add_argument("--num_inference_steps", type=int, default=25, help="decoder DDIM steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard_size", type=int, default=100)
    parser.add_argument("--num_threads", type=int, default=2, help="torch intra-op threads (0: torch's default)")
    return parser


def evaluate_argv(args, world: Path, image_size: int, clip_dir: str) -> list:
    """The evaluate.py command line of the comparison."""
    return ["--prior", f"shifted={args.shifted_prior}", "--prior", f"baseline={args.baseline_prior}",
            "--decoder", str(args.decoder), "--image_folder", str(world), "--num_captions", str(args.num_captions),
            "--seed", str(args.seed), "--prior_guidance_scales", str(args.prior_guidance_scales),
            "--guidance_scales", str(args.guidance_scales),
            "--prior_num_inference_steps", str(args.prior_num_inference_steps),
            "--num_inference_steps", str(args.num_inference_steps), "--image_size", str(image_size),
            "--clip_models", clip_dir, "--fd_clip", clip_dir, "--toy_attributes", "--negative", "empty",
            "--shard_size", str(args.shard_size), "--device", "cpu",
            "--output_dir", str(Path(args.output_dir) / "eval")]


def format_table(results: dict) -> str:
    """Markdown: one row per prior and guidance setting."""
    lines = ["| prior | prior g | decoder g | attribute acc (mentioned) | shape | colour | fd_clip | CLIP img-img | "
             "CLIP img-text | prior cos img |", "|---" * 10 + "|"]
    for name, entries in results["priors"].items():
        for e in sorted(entries, key=lambda e: (e["prior_guidance_scale"], e["guidance_scale"])):
            acc = e["attribute_accuracy"]
            lines.append(f"| {name} | {e['prior_guidance_scale']:g} | {e['guidance_scale']:g} | {acc['mean']:.3f} | "
                         f"{acc['shape']:.3f} | {acc['colour']:.3f} | {e['fd_clip']:.1f} | "
                         f"{e['clip_image_image']:.3f} | {e['clip_image_text']:.3f} | {e['prior_cos_image']:.3f} |")
    return "\n".join(lines)


def run_toy_comparison(argv: Sequence[str]) -> dict:
    """What ``python benchmarks/toy_shifted_vs_baseline.py ARGV`` does: the JSON written under --results_dir."""
    args = build_parser().parse_args(list(argv))
    if args.output_dir is None:
        args.output_dir = f"outputs/{_stem(args)}"
    with torch_threads(args.num_threads):
        return run(args)


def run(args) -> dict:
    from ..decoder import read_decoder_config
    from ..eval_cli import main as evaluate
    from ..eval_plots import PLOTS, plot_path
    from ..files import write_results_json
    from .decoder_recipe import toy_decoder_world
    from .world import generate_world, load_world_config

    for name in ("shifted", "baseline"):
        path = Path(getattr(args, f"{name}_prior"))
        if not path.exists():
            raise SystemExit(f"toy_shifted_vs_baseline: --{name}_prior {path}: not found; train it with "
                             f"`{PRIOR_HINTS[name]}`")
    if not Path(args.decoder).is_dir():
        raise SystemExit(f"toy_shifted_vs_baseline: --decoder {args.decoder}: not found; train it with "
                         "`python train_toy_decoder.py`")
    clip_models = read_decoder_config(args.decoder)["clip_models"]
    if len(clip_models) != 1:
        raise SystemExit(f"toy_shifted_vs_baseline: --decoder {args.decoder}: expected one toy CLIP, got {clip_models}")
    clip_dir = clip_models[0][0]  # written relative to the working directory in the JSON (write_results_json)
    wall = {}
    start = time.time()
    world = load_world_config(toy_decoder_world(args.decoder, args.toy_root))
    held_out = Path(args.output_dir) / "held_out_world"
    generate_world(held_out, world.heldout(args.num_captions, offset=HELD_OUT_OFFSET))
    wall["held_out_world"] = round(time.time() - start, 1)

    argv = evaluate_argv(args, held_out, world.image_size, clip_dir)
    start = time.time()
    results = evaluate(argv)
    wall["evaluate"] = round(time.time() - start, 1)

    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    for key in PLOTS:
        source = plot_path(Path(args.output_dir) / "eval", key, results["settings"]["fd_name"])
        target = results_dir / f"{_stem(args)}_{source.name}"
        shutil.copyfile(source, target)
        plots.append(str(target))
    out = {
        "command": "python evaluate.py " + shlex.join(argv),
        "benchmark_command": "python benchmarks/toy_shifted_vs_baseline.py " + shlex.join(_given(args)),
        "note": "toy world: fd_clip is the Frechet distance in the toy CLIP's image-embedding space (not FID); "
                "attribute_accuracy is the pixel reader's on the attributes each caption mentions; one image per "
                "held-out caption; the real statistics are the held-out images'",
        "results": results, "plots": plots, "wall_seconds": wall, "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "torch": torch.__version__,
    }
    path = results_dir / f"{_stem(args)}.json"
    write_results_json(path, out)
    print(format_table(results))
    print(f"wall: {wall}; results: {path}; plots: {', '.join(plots)}")
    return out


def _stem(args) -> str:
    return "toy_shifted_vs_baseline" + (f"_{args.tag}" if args.tag else "")


def _given(args) -> list:
    """The flags that differ from the defaults (for the recorded command)."""
    defaults = vars(build_parser().parse_args([]))
    return [item for key, value in vars(args).items() if value != defaults[key] for item in (f"--{key}", str(value))]
