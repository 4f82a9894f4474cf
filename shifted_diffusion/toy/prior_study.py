"""Shifted vs baseline vs a one-step ECLIPSE-style prior in the toy world, over the knobs that might explain
their difference: the work of ``benchmarks/prior_study.py`` (``run_prior_study(argv)`` takes its flags).

Every point is one training through train.py's job (toy preset, ``--validation_steps 0``, one shared embedding
cache) per seed, scored with the toy evaluation (``prior_eval.evaluate_toy_prior``: nn_attr_acc, cos_gt, FD,
diversity) on the same held-out captions with the sampling seed of its training seed. Axes (``--axes``):

* ``default``: shifted, baseline and ECLIPSE at the base length, at every sampling step count of ``--steps``
  (ECLIPSE: its one step), and at 8 steps with guidance ``--guidance_scales`` and ``--noise_temperatures``;
* ``std_scale``: the shifted prior at each of ``--std_scales`` (the preset's value is the default point);
* ``vocab_size``: the shifted prior at each of ``--vocab_sizes``;
* ``train_steps``: the three priors at each of ``--train_steps`` (the base length is the default point).

Writes one JSON object: ``rows`` (one per prior x seed x evaluation setting), ``summary`` (mean, sample std and
n over the seeds of each point), the oracle ``reference`` and ``config`` (wall times; trainings an earlier run
with the same settings finished are reused, not repeated); ``plot`` draws FD and
nn_attr_acc against sampling and training steps. ``--quick`` is the default axis alone at 250 training steps
on 100 captions x 4 samples (about 25 minutes on 2 CPU cores); ``--fast`` is the seconds-long test version.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..files import write_results_json
from ..threads import torch_threads
from . import ensure_toy_assets
from .prior_eval import DEFAULT_STEPS, evaluate_toy_prior
from .prior_job import TOY_CONFIG, run_prior_job, toy_defaults
from .prior_quality import FAST_EVAL, FAST_MAX_TRAIN_STEPS, FAST_TRAIN_ARGS

KINDS = ("shifted", "baseline", "eclipse")
KIND_FLAGS = {"shifted": ["--no-baseline"], "baseline": ["--baseline"],
              "eclipse": ["--baseline", "--prior_type", "eclipse", "--timesteps_per_caption", "1"]}
METRICS = ("nn_attr_acc", "cos_gt", "fd", "diversity")
AXES = ("default", "std_scale", "vocab_size", "train_steps")
SETTING_STEPS = 8  # sampling steps of the guidance and temperature settings
MOVABLE = ("output_dir", "cache_dir")  # the study's own folders, not settings of a training
QUICK = {"axes": "default", "base_steps": 250, "num_captions": 100, "samples_per_caption": 4}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prior_study.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="results JSON file (the plot goes beside it, .png)")
    p.add_argument("--axes", default=",".join(AXES), help=f"comma-separated, of {', '.join(AXES)}")
    p.add_argument("--seeds", default="1,2,3", help="training and sampling seeds (seed 0 is kept for choosing settings)")
    p.add_argument("--base_steps", type=int, default=None, help="training steps of every point but the train_steps "
                   "axis (default: the toy preset's; --quick 250; --fast 8)")
    p.add_argument("--train_steps", default="1000,4000", help="train_steps axis: the lengths besides the base one")
    p.add_argument("--std_scales", default="1,5", help="std_scale axis: the values besides the preset's")
    p.add_argument("--vocab_sizes", default="16,256", help="vocab_size axis: the values besides the preset's")
    p.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)), help="sampling step counts")
    p.add_argument("--guidance_scales", default="2,4", help=f"default axis: guidance scales besides 1 ({SETTING_STEPS} steps)")
    p.add_argument("--noise_temperatures", default="0.8,0.5",
                   help=f"default axis: noise temperatures besides 1 ({SETTING_STEPS} steps, guidance 1)")
    p.add_argument("--num_captions", type=int, default=200)
    p.add_argument("--samples_per_caption", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="the default axis at 250 steps, 100 captions x 4 samples")
    p.add_argument("--fast", action="store_true", help="the tiny test world and network, a few steps (tests)")
    p.add_argument("--output_dir", default="outputs/prior_study")
    p.add_argument("--toy_root", default="outputs/toy_assets")
    p.add_argument("--num_threads", type=int, default=2)
    return p


def _numbers(text: str, kind=float) -> list:
    return [kind(v) for v in str(text).split(",") if v.strip()]


def study_points(axes: Sequence[str], base_steps: int, preset: dict, args) -> list[dict]:
    """The trainings of the chosen axes: {"axis", "kind", "setting" (flag -> value), "train_steps"}; a point shared
    by two axes (the default one) is trained once."""
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise SystemExit(f"prior_study: --axes {','.join(unknown)}: expected some of {', '.join(AXES)}")
    points = [{"axis": "default", "kind": kind, "setting": {}, "train_steps": base_steps} for kind in KINDS]
    if "std_scale" in axes:
        points += [{"axis": "std_scale", "kind": "shifted", "setting": {"std_scale": v}, "train_steps": base_steps}
                   for v in _numbers(args.std_scales) if v != preset["std_scale"]]
    if "vocab_size" in axes:
        points += [{"axis": "vocab_size", "kind": "shifted", "setting": {"vocab_size": v}, "train_steps": base_steps}
                   for v in _numbers(args.vocab_sizes, int) if v != preset["vocab_size"]]
    if "train_steps" in axes:
        points += [{"axis": "train_steps", "kind": kind, "setting": {}, "train_steps": n}
                   for n in _numbers(args.train_steps, int) if n != base_steps for kind in KINDS]
    return points


def point_name(point: dict, seed: int) -> str:
    setting = "".join(f"_{k}{v:g}" for k, v in point["setting"].items())
    return f"{point['kind']}{setting}_steps{point['train_steps']}_seed{seed}"


def evaluation_settings(point: dict, args) -> list[dict]:
    """(sampling steps, guidance, temperature) to score a trained point at: every step count at guidance 1 and
    temperature 1; on the default axis also the guidance and temperature settings at SETTING_STEPS (a repeated
    value, or 1, would score the same samples twice and count them as two seeds: it is dropped)."""
    steps = [1] if point["kind"] == "eclipse" else _numbers(args.steps, int)
    settings = [{"steps": steps, "guidance_scale": 1.0, "noise_temperature": 1.0}]
    if point["axis"] == "default":
        setting_steps = [1] if point["kind"] == "eclipse" else [SETTING_STEPS]
        settings += [{"steps": setting_steps, "guidance_scale": g, "noise_temperature": 1.0}
                     for g in dict.fromkeys(_numbers(args.guidance_scales)) if g != 1]
        settings += [{"steps": setting_steps, "guidance_scale": 1.0, "noise_temperature": t}
                     for t in dict.fromkeys(_numbers(args.noise_temperatures)) if t != 1]
    return settings


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Mean, sample std (0 for one seed) and n over the seeds of each (axis, kind, setting, lengths, guidance,
    temperature)."""
    groups: dict = {}
    for row in rows:
        key = json.dumps({k: row[k] for k in ("axis", "kind", "setting", "train_steps", "sampling_steps",
                                                "guidance_scale", "noise_temperature")}, sort_keys=True)
        groups.setdefault(key, []).append(row)
    out = []
    for key, members in groups.items():
        entry = {**json.loads(key), "n": len(members), "seeds": [m["seed"] for m in members]}
        for metric in METRICS:
            values = [m[metric] for m in members]
            entry[metric] = statistics.fmean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def format_summary(summary: Sequence[dict]) -> str:
    """Markdown: one line per point and evaluation setting, mean +- std over seeds."""
    lines = ["| axis | prior | setting | train steps | sampling steps | guidance | temperature | n | nn_attr_acc | cos_gt "
             "| FD | diversity |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        setting = ", ".join(f"{k} {v:g}" for k, v in e["setting"].items()) or "preset"
        cells = " | ".join(f"{e[m]:.3f} ± {e[m + '_std']:.3f}" if m != "fd" else f"{e[m]:.1f} ± {e[m + '_std']:.1f}"
                           for m in METRICS)
        lines.append(f"| {e['axis']} | {e['kind']} | {setting} | {e['train_steps']} | {e['sampling_steps']} | "
                     f"{e['guidance_scale']:g} | {e['noise_temperature']:g} | {e['n']} | {cells} |")
    return "\n".join(lines)


def plot(summary: Sequence[dict], path) -> Optional[Path]:
    """FD and nn_attr_acc (mean +- std over seeds) against sampling steps (default axis, guidance 1, temperature
    1) and, with the train_steps axis, against training steps (at SETTING_STEPS sampling steps; ECLIPSE at 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = [e for e in summary if e["guidance_scale"] == 1 and e["noise_temperature"] == 1 and not e["setting"]]
    base = min((e["train_steps"] for e in plain if e["axis"] == "default"), default=None)
    lengths = sorted({e["train_steps"] for e in plain})
    columns = 2 if len(lengths) > 1 else 1
    figure, axes = plt.subplots(2, columns, figsize=(5.5 * columns, 7), squeeze=False)
    for row, metric in enumerate(("fd", "nn_attr_acc")):
        for kind in KINDS:
            points = sorted((e["sampling_steps"], e[metric], e[f"{metric}_std"]) for e in plain
                            if e["kind"] == kind and e["train_steps"] == base)
            if points:
                x, y, err = zip(*points)
                axes[row][0].errorbar(x, y, yerr=err, marker="o", capsize=3, label=kind)
            if columns == 2:
                wanted = 1 if kind == "eclipse" else SETTING_STEPS
                curve = sorted((e["train_steps"], e[metric], e[f"{metric}_std"]) for e in plain
                               if e["kind"] == kind and e["sampling_steps"] == wanted)
                if curve:
                    x, y, err = zip(*curve)
                    axes[row][1].errorbar(x, y, yerr=err, marker="o", capsize=3, label=kind)
        axes[row][0].set(xscale="log", xlabel="sampling steps (ECLIPSE: 1)", ylabel=metric,
                         title=f"{metric} vs sampling steps ({base} training steps)")
        axes[row][0].legend()
        if columns == 2:
            axes[row][1].set(xscale="log", xlabel="training steps", ylabel=metric,
                             title=f"{metric} vs training steps ({SETTING_STEPS} sampling steps)")
            axes[row][1].legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def finished_prior(flags: Sequence[str]) -> Optional[Path]:
    """The prior folder a training with these flags already wrote (same settings, all its steps), else None: a
    rerun with more axes or seeds reuses the points it shares with an earlier run."""
    from ..prior_pipeline import read_prior_info
    from ..train_config import parse_config

    cfg = parse_config(list(flags))
    prior_dir = Path(cfg.output_dir) / "prior"
    if not (prior_dir / "model_index.json").is_file():
        return None
    training = read_prior_info(prior_dir)["training"]

    def settings(train: dict) -> dict:  # where the run lives may move with it (a copied study folder)
        return {k: v for k, v in train.items() if k not in MOVABLE}

    same = settings(training.get("train", {})) == settings(json.loads(json.dumps(cfg.to_dict())))
    return prior_dir if same and training.get("global_step") == cfg.max_train_steps else None


def run_prior_study(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    start_all = time.time()
    preset = toy_defaults()
    axes = _numbers(QUICK["axes"] if args.quick else args.axes, str)
    base_steps = args.base_steps or (FAST_MAX_TRAIN_STEPS if args.fast else QUICK["base_steps"] if args.quick
                                     else int(preset["max_train_steps"]))
    eval_kwargs = (dict(FAST_EVAL) if args.fast else
                   {k: QUICK[k] for k in ("num_captions", "samples_per_caption")} if args.quick else
                   {"num_captions": args.num_captions, "samples_per_caption": args.samples_per_caption})
    seeds = _numbers(args.seeds, int)
    points = study_points(axes, base_steps, preset, args)
    out_dir = Path(args.output_dir)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows, wall, reused, reference = [], {}, [], None
    config = _config(args, axes, seeds, base_steps, preset, eval_kwargs)
    with torch_threads(args.num_threads):
        assets = ensure_toy_assets(args.toy_root, fast=args.fast)
        world, cache = Path(assets["world"]), out_dir / "embeddings"
        common = ["--config", str(TOY_CONFIG), "--train_data_dir", str(world), "--clip_models", assets["clip"],
                  "--t5_model", f"clip-tokens:{assets['clip']}", "--cache_dir", str(cache), "--report_to", "none",
                  "--validation_steps", "0", "--checkpointing_steps", "0", *(FAST_TRAIN_ARGS if args.fast else [])]
        for point in points:
            for seed in seeds:
                name = point_name(point, seed)
                flags = [*common, *KIND_FLAGS[point["kind"]], "--seed", str(seed), "--max_train_steps",
                         str(point["train_steps"]), "--output_dir", str(out_dir / name)]
                for key, value in point["setting"].items():
                    flags += [f"--{key}", f"{value:g}"]
                start = time.time()
                prior_dir = finished_prior(flags)
                if prior_dir is None:
                    prior_dir = run_prior_job(flags)
                    wall[f"train_{name}"] = round(time.time() - start, 1)
                else:
                    reused.append(name)
                    wall[f"train_{name}"] = 0.0
                start = time.time()
                for setting in evaluation_settings(point, args):
                    evaluation = evaluate_toy_prior(prior_dir, world, cache, steps=setting["steps"], seed=seed,
                                                    guidance_scale=setting["guidance_scale"],
                                                    noise_temperature=setting["noise_temperature"], **eval_kwargs)
                    reference = reference or evaluation["reference"]
                    for steps, metrics in evaluation["steps"].items():
                        rows.append({"axis": point["axis"], "kind": point["kind"], "setting": point["setting"],
                                     "train_steps": point["train_steps"], "seed": seed, "sampling_steps": int(steps),
                                     "guidance_scale": setting["guidance_scale"],
                                     "noise_temperature": setting["noise_temperature"],
                                     **{k: float(metrics[k]) for k in METRICS}})
                wall[f"eval_{name}"] = round(time.time() - start, 1)
                trained = "reused" if name in reused else f"trained in {wall[f'train_{name}']} s"
                print(f"[prior_study] {name}: {trained}, scored in "
                      f"{wall[f'eval_{name}']} s", flush=True)
                write_results_json(args.out, results(rows, reference, config, reused, wall, start_all, complete=False))
    result = results(rows, reference, config, reused, wall, start_all, complete=True)
    write_results_json(args.out, result)
    plot(result["summary"], Path(args.out).with_suffix(".png"))
    print(format_summary(result["summary"]))
    return result


def results(rows, reference, config: dict, reused: list, wall: dict, start_all: float, complete: bool) -> dict:
    """The study's JSON: rows, their summary, the data's own reference scores and the run's config with wall
    times; written after every scored point (``config.complete`` false until the last) so a stopped run keeps what
    it measured."""
    summary = summarize(rows)
    return {"rows": rows, "summary": summary,
            "reference": {k: reference[k] for k in METRICS if k in reference} if reference else {},
            "config": {**config, "reused_trainings": list(reused), "complete": complete,
                       "wall_seconds": {**wall, "total": round(time.time() - start_all, 1)}}}


def _config(args, axes, seeds, base_steps, preset, eval_kwargs) -> dict:
    return {"axes": axes, "seeds": seeds, "base_steps": base_steps, "quick": args.quick, "fast": args.fast,
            "std_scales": args.std_scales, "vocab_sizes": args.vocab_sizes, "train_steps": args.train_steps,
            "sampling_steps": args.steps, "guidance_scales": args.guidance_scales,
            "noise_temperatures": args.noise_temperatures, "setting_steps": SETTING_STEPS,
            "toy_preset": {k: preset[k] for k in ("std_scale", "vocab_size", "max_train_steps")},
            **eval_kwargs, "torch_threads": args.num_threads,
            "platform": platform.platform(), "torch": torch.__version__}
