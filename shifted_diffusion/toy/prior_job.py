"""The prior training job behind ``train.py``: parse the flags, fall back to the toy world, train, report.

With a ``--train_data_dir`` it is ``train_prior`` on the parsed settings. Without one it runs the embedded
toy world: the toy preset (``prior_toy.yaml``, shipped in this package, so an installed package finds it)
under the user's YAML files and flags, the generated world folder and its tiny CLIP as the data and the
encoders, and after training the toy quality table (``toy.prior_eval``) on the main process, with the other
prior's rows (shifted / baseline) when its sibling run folder (``<output_dir>_baseline``, or ``<output_dir>`` less
``_baseline`` for a baseline run) holds one trained on the same toy world, else a line saying how to train it.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import yaml

from ..prior_training import train_prior
from ..train_config import TrainConfig, parse_config

TOY_CONFIG = Path(__file__).resolve().with_name("prior_toy.yaml")


def toy_defaults() -> dict:
    """The toy preset's settings (``TOY_CONFIG``) as a dict of TrainConfig fields."""
    return yaml.safe_load(TOY_CONFIG.read_text(encoding="utf-8"))


def toy_config(argv: Sequence[str]) -> TrainConfig:
    """The toy world's settings under the user's YAML files and flags, with the generated world folder and
    its tiny CLIP filled in as the data and the encoders (built once, cached under ``toy_root``)."""
    from accelerate import PartialState

    from . import ensure_toy_assets

    cfg = parse_config(argv, defaults=toy_defaults())
    with PartialState().main_process_first():  # under `accelerate launch`, one process builds, the others reuse
        assets = ensure_toy_assets(cfg.toy_root, fast=cfg.toy_fast)
    return dataclasses.replace(
        cfg, train_data_dir=assets["world"], clip_models=(assets["clip"],), t5_model=f"clip-tokens:{assets['clip']}"
    )


BASELINE_SUFFIX = "_baseline"  # the baseline of the toy prior in outputs/toy_prior lives in outputs/toy_prior_baseline
# what the held-out captions and their embeddings depend on: a sibling differing in one is not comparable
SAME_WORLD_KEYS = ("toy_fast", "toy_root", "train_data_dir", "image_column", "caption_column", "clip_models",
                   "t5_model", "text_max_length", "val_fraction", "seed")
EVAL_SUFFIX = "_toy_eval.json"  # <output_dir>/prior_toy_eval.json: beside the prior folder (save_pretrained
# refuses to overwrite a pipeline folder holding other files)
COMPARE_BENCHMARK = "benchmarks/toy_shifted_vs_baseline.py"
# train.py's table: evaluate_toy_prior at these settings (also part of the evaluation cache's key)
EVAL_SETTINGS = {"steps": [4, 8, 16, 64], "num_captions": 200, "samples_per_caption": 8, "guidance_scale": 1.0}


def sibling_output_dir(cfg: TrainConfig) -> Optional[Path]:
    """The other prior's run folder: ``<output_dir>_baseline`` for a shifted run, ``<output_dir>`` less
    ``_baseline`` for a baseline run (None when its name does not end in ``_baseline``)."""
    out = Path(cfg.output_dir)
    if not cfg.baseline:
        return out.with_name(out.name + BASELINE_SUFFIX)
    if out.name.endswith(BASELINE_SUFFIX) and len(out.name) > len(BASELINE_SUFFIX):
        return out.with_name(out.name[: -len(BASELINE_SUFFIX)])
    return None


def _world_settings(train: dict) -> dict:
    plain = json.loads(json.dumps(train))  # tuples as lists, as the prior folder records them
    return {k: plain.get(k) for k in SAME_WORLD_KEYS}


def comparable_sibling(cfg: TrainConfig, sibling: Optional[Path]) -> Tuple[Optional[Path], str]:
    """(the sibling's finished prior folder, "") when it is the other kind of prior trained on the same toy
    world, held-out split and encoders as ``cfg``; else (None, why not)."""
    from ..prior_pipeline import read_prior_info

    if sibling is None:
        return None, f"{cfg.output_dir} does not end in {BASELINE_SUFFIX}: no shifted sibling folder to look in"
    prior_dir = sibling / "prior"
    if not (prior_dir / "model_index.json").is_file():
        return None, f"no finished prior in {prior_dir}"
    info = read_prior_info(prior_dir)
    if (info["prior"].get("vocab_size") is None) != (not cfg.baseline):
        return None, f"{prior_dir} is a {'baseline' if cfg.baseline else 'shifted'} prior too"
    theirs, ours = _world_settings(info["training"].get("train") or {}), _world_settings(cfg.to_dict())
    differing = [k for k in SAME_WORLD_KEYS if theirs[k] != ours[k]]
    if differing:
        return None, (f"{prior_dir} was trained on another toy world or split ("
                      + ", ".join(f"{k} {theirs[k]!r} vs {ours[k]!r}" for k in differing) + ")")
    return prior_dir, ""


def sibling_pointer(cfg: TrainConfig, argv: Sequence[str], sibling: Optional[Path], why: str) -> str:
    """The one line printed instead of the other prior's rows: why there are none, how to train them."""
    if sibling is None:
        return (f"(no comparison: {why}; `python train.py --output_dir X` and `python train.py --baseline "
                f"--output_dir X{BASELINE_SUFFIX}` train a pair, `python {COMPARE_BENCHMARK}` compares them through "
                "a decoder)")
    flag = "--no-baseline" if cfg.baseline else "--baseline"  # appended last: overrides the user's own
    command = shlex.join(["python", "train.py", *argv, flag, "--output_dir", str(sibling)])
    other = "shifted" if cfg.baseline else "baseline"
    return (f"(no {other} rows: {why}; `{command}` trains it for this table, `python {COMPARE_BENCHMARK}` "
            "compares both through a decoder)")


def cached_evaluation(prior_dir, world_folder, cache_dir, *, seed: int) -> dict:
    """``evaluate_toy_prior`` of a prior, read back from ``<prior_dir>_toy_eval.json`` when that file was
    written for the same prior files (size, mtime of each) and evaluation settings, else computed and stored there."""
    from ..encoders import weights_fingerprint
    from ..files import read_json, write_json
    from .prior_eval import evaluate_toy_prior

    prior_dir = Path(prior_dir)
    path = prior_dir.with_name(prior_dir.name + EVAL_SUFFIX)
    key = {"weights": weights_fingerprint(str(prior_dir))["files"], "world": str(world_folder), "cache_dir": str(cache_dir), "seed": seed,
           **EVAL_SETTINGS}
    if path.is_file():
        try:
            stored = read_json(path, "the cached toy evaluation of " + str(prior_dir))
        except ValueError as err:  # a corrupt cache file is recomputed, not fatal
            warnings.warn(f"{err}; evaluating again", stacklevel=2)
            stored = {}
        if stored.get("key") == key:
            return stored["results"]
    results = evaluate_toy_prior(prior_dir, world_folder, cache_dir, seed=seed, **EVAL_SETTINGS)
    write_json(path, {"key": key, "results": results})
    return json.loads(json.dumps(results))  # as a later run reads it back


def print_toy_table(cfg: TrainConfig, prior_dir: Path, argv: Sequence[str] = ()) -> dict:
    """Score the toy prior in ``prior_dir`` (held-out captions of the world in ``cfg``) and print the table,
    with the other prior's rows (shifted / baseline, from the sibling run folder ``sibling_output_dir``,
    evaluated on the same captions and seed) when one was trained on the same toy world, else a line saying
    how to train it. Evaluations are cached beside each prior folder. Returns this prior's evaluation."""
    from .prior_eval import format_table

    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "embeddings"
    results = cached_evaluation(prior_dir, cfg.train_data_dir, cache_dir, seed=cfg.seed)
    name = "baseline" if results["baseline"] else "shifted"
    rows = {name: results["steps"]}
    sibling = sibling_output_dir(cfg)
    sibling_prior, why = comparable_sibling(cfg, sibling)
    if sibling_prior is not None:
        other = cached_evaluation(sibling_prior, cfg.train_data_dir, cache_dir, seed=cfg.seed)
        rows["baseline" if other["baseline"] else "shifted"] = other["steps"]
        rows = {k: rows[k] for k in ("shifted", "baseline") if k in rows}
    print(format_table(rows, reference=results.get("reference")))
    if sibling_prior is None:
        print(sibling_pointer(cfg, argv, sibling, why))
    return results


def run_prior_job(argv: Sequence[str]) -> Path:
    """``train.py``'s work for command-line arguments ``argv``: the trained prior folder."""
    argv = list(argv)
    cfg = parse_config(argv)
    toy = cfg.train_data_dir is None
    if toy:
        cfg = toy_config(argv)
    prior_dir = train_prior(cfg)
    if toy and cfg.evaluate_toy:
        from accelerate import PartialState

        if PartialState().is_main_process:
            print_toy_table(cfg, prior_dir, argv)
    return prior_dir
