"""Shifted vs baseline prior in the toy world, same budget and seed, scored at 4 / 8 / 16 / 64 sampling steps.

The work of ``benchmarks/toy_prior_quality.py`` (``run_prior_quality(argv)`` takes its flags): builds the toy
world and its tiny CLIP once (cached under --toy_root; ``--clip_config`` picks other CLIP settings,
``--world_dir`` + ``--clip_dir`` use existing ones), trains a shifted prior and a baseline prior
(``--baseline``) through train.py's job (``prior_job.run_prior_job``) with the toy preset (``prior_toy.yaml``)
and otherwise identical flags, sharing one embedding cache, then scores both with ``prior_eval`` on the same
held-out captions with the same sampling seed. Extra flags go to both trainings unchanged (e.g.
``--std_scale 2``). Writes {"shifted": {"4": metrics, ...}, "baseline": {...}, "reference": oracle metrics,
"config": {... wall_seconds ...}} and prints the markdown table. ``--fast``: the tiny test world, a tiny
network, 8 training steps (tests).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..prior_pipeline import read_prior_info
from ..files import write_results_json
from ..threads import torch_threads
from . import ToyClipConfig, ensure_toy_assets, fast_configs, generate_world, train_toy_clip
from .prior_eval import DEFAULT_STEPS, evaluate_toy_prior, format_table
from .prior_job import TOY_CONFIG, run_prior_job
from .world import ToyWorldConfig

# how the toy preset is recorded in the results: its path inside the package's source tree
TOY_CONFIG_NAME = TOY_CONFIG.relative_to(Path(__file__).resolve().parents[2]).as_posix()

# tiny everything, for tests: the fast world (256 images), a 2-layer width-64 network, a few steps
FAST_TRAIN_ARGS = [
    "--val_fraction", "0.25", "--train_batch_size", "32", "--model_width", "64", "--model_layers", "2",
    "--model_num_heads", "2", "--vocab_size", "8", "--kmeans_iters", "5", "--lr_warmup_steps", "2",
    "--text_max_length", "24", "--validation_steps", "0", "--checkpointing_steps", "0", "--num_validation_samples", "8",
]
FAST_EVAL = {"num_captions": 16, "samples_per_caption": 4}
FAST_MAX_TRAIN_STEPS = 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy_prior_quality.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="results JSON file")
    parser.add_argument("--seed", type=int, default=0, help="training seed (both priors) and sampling seed")
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help="training steps of each prior (default: the toy preset's; --fast: 8)")
    parser.add_argument("--fast", action="store_true", help="tiny world, network and evaluation (tests)")
    parser.add_argument("--output_dir", default=None, help="work folder (default outputs/toy_prior_quality[_fast])")
    parser.add_argument("--cache_dir", default=None, help="embedding cache shared by both priors (default <output_dir>/embeddings)")
    parser.add_argument("--toy_root", default="outputs/toy_assets", help="where the toy world and CLIP are cached")
    parser.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)), help="sampling step counts")
    parser.add_argument("--num_captions", type=int, default=None, help="held-out captions (default 200; --fast 16)")
    parser.add_argument("--samples_per_caption", type=int, default=None, help="samples per caption (default 8; --fast 4)")
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--world_dir", default=None, help="an existing toy world folder (with --clip_dir): skip building assets")
    parser.add_argument("--clip_dir", default=None, help="an existing toy CLIP folder trained on --world_dir")
    parser.add_argument("--clip_config", default=None,
                        help="JSON overrides of ToyClipConfig (default: the toy world's own CLIP, ensure_toy_assets); "
                             "the CLIP is trained once into <toy_root>/clip_custom_<hash>")
    parser.add_argument("--num_threads", type=int, default=1,
                        help="torch intra-op threads (1: tiny matrices on a shared machine; 0: torch's default)")
    return parser


def toy_assets(root, fast: bool, clip_overrides: Optional[dict] = None) -> dict:
    """{"world": dir, "clip": dir}: the toy world's own assets, or its world with a CLIP of other settings."""
    if not clip_overrides:
        return ensure_toy_assets(root, fast=fast)
    world_config = fast_configs()[0] if fast else ToyWorldConfig()
    clip_config = ToyClipConfig(**{**dict(image_size=world_config.image_size), **clip_overrides})
    tag = hashlib.sha1(json.dumps(clip_config.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    world = generate_world(Path(root) / f"world_{'fast' if fast else 'default'}", world_config)
    return {"world": str(world), "clip": str(train_toy_clip(world, Path(root) / f"clip_custom_{tag}", clip_config)),
            "clip_config": clip_config.to_dict()}


def run_prior_quality(argv: Sequence[str]) -> dict:
    """The comparison for command-line arguments ``argv`` (see ``build_parser``; unknown flags go to both
    trainings): the results written to ``--out``."""
    args, passthrough = build_parser().parse_known_args(list(argv))
    output_dir = Path(args.output_dir or ("outputs/toy_prior_quality_fast" if args.fast else "outputs/toy_prior_quality"))
    steps = [int(s) for s in args.steps.split(",") if s]
    eval_kwargs = dict(num_captions=200, samples_per_caption=8)
    if args.fast:
        eval_kwargs = dict(FAST_EVAL)
    if args.num_captions is not None:
        eval_kwargs["num_captions"] = args.num_captions
    if args.samples_per_caption is not None:
        eval_kwargs["samples_per_caption"] = args.samples_per_caption
    max_train_steps = args.max_train_steps if args.max_train_steps is not None else (FAST_MAX_TRAIN_STEPS if args.fast else None)

    with torch_threads(args.num_threads):
        return run(args, passthrough, output_dir, steps, eval_kwargs, max_train_steps)


def run(args, passthrough, output_dir: Path, steps: list, eval_kwargs: dict, max_train_steps: Optional[int]) -> dict:
    """Assets, two trainings, two evaluations, the JSON file and the table."""
    start = time.time()
    if (args.world_dir is None) != (args.clip_dir is None):
        raise ValueError("--world_dir and --clip_dir go together")
    if args.world_dir is not None:
        assets = {"world": args.world_dir, "clip": args.clip_dir}
    else:
        assets = toy_assets(args.toy_root, args.fast, json.loads(args.clip_config) if args.clip_config else None)
    clip_info = Path(assets["clip"]) / "toy_clip_train.json"
    if clip_info.is_file():  # the CLIP's settings and zero-shot accuracy, for the record
        assets["clip_train"] = {k: v for k, v in json.loads(clip_info.read_text()).items() if k != "world"}
    wall = {"toy_assets": round(time.time() - start, 1)}

    cache_dir = Path(args.cache_dir) if args.cache_dir else output_dir / "embeddings"
    # train.py's toy settings (the toy preset) on the world folder and CLIP resolved above
    common = ["--config", str(TOY_CONFIG), "--train_data_dir", assets["world"], "--clip_models", assets["clip"],
              "--t5_model", f"clip-tokens:{assets['clip']}", "--seed", str(args.seed), "--cache_dir", str(cache_dir),
              "--report_to", "none"]
    if args.fast:
        common += FAST_TRAIN_ARGS
    if max_train_steps is not None:
        common += ["--max_train_steps", str(max_train_steps)]
    common += list(passthrough)  # the user's flags last: they override ours, for both priors alike

    results: dict = {}
    train_info = {}
    for name, extra in (("shifted", ["--no-baseline"]), ("baseline", ["--baseline"])):
        argv_prior = [*common, "--output_dir", str(output_dir / name), *extra]
        start = time.time()
        prior_dir = run_prior_job(argv_prior)
        wall[f"train_{name}"] = round(time.time() - start, 1)
        start = time.time()
        evaluation = evaluate_toy_prior(prior_dir, assets["world"], cache_dir, steps=steps, guidance_scale=args.guidance_scale,
                                        seed=args.seed, **eval_kwargs)
        wall[f"eval_{name}"] = round(time.time() - start, 1)
        if evaluation["baseline"] != (name == "baseline"):
            raise RuntimeError(f"the {name} prior folder {prior_dir} says baseline={evaluation['baseline']}")
        results[name] = evaluation["steps"]
        results.setdefault("reference", evaluation["reference"])
        info = read_prior_info(prior_dir)
        saved = {**info["training"], "prior": info["prior"]}
        recorded = [TOY_CONFIG_NAME if a == str(TOY_CONFIG) else a for a in argv_prior]
        train_info[name] = {"argv": recorded, "prior_dir": str(prior_dir), "global_step": saved.get("global_step"),
                            "train": saved.get("train"), "prior": saved.get("prior"), "validation": saved.get("validation")}

    results["config"] = {
        "seed": args.seed, "fast": args.fast, "max_train_steps": max_train_steps, "steps": steps,
        "guidance_scale": args.guidance_scale, **eval_kwargs, "num_bank_images": evaluation["num_bank_images"],
        "evaluated_captions": evaluation["num_captions"], "assets": assets, "cache_dir": str(cache_dir),
        "passthrough": list(passthrough), "wall_seconds": wall, "train": train_info,
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results_json(out, results)
    print(format_table({"shifted": results["shifted"], "baseline": results["baseline"]}, reference=results["reference"]))
    print("wall seconds: " + ", ".join(f"{k} {v}" for k, v in wall.items()))
    return results

