"""Semi-supervised priors in the toy world: a few captioned images plus many uncaptioned ones.

    python benchmarks/toy_semi_supervised.py --out benchmarks/results/toy_semi_supervised.json
        [--fractions 0.02,0.1] [--pseudo_text_fraction 0.5] [--seed 1] [--max_train_steps N] [--fast]
        [--text_to_image [--decoder DIR] [--t2i_captions 100] [--t2i_samples 2]]

For each captioned fraction f, a copy of the toy world keeps the captions of a seeded random f of its images
(links to the same image files; the other images stay, uncaptioned). On it, with the toy preset and the same
budget and seed, four priors train: shifted and baseline, each on the captioned pairs only and semi-supervised
(``--pseudo_text_fraction``: that share of every batch are uncaptioned images with a pseudo text condition,
``shifted_diffusion/pseudo_text.py``, noise matched to the captioned pairs). Two more train on the fully
captioned world (f = 1). Every prior is scored on the same held-out captions of the full world (its val split
holds no training image of any run) at ``--sampling_steps`` with the toy evaluation (nn_attr_acc, cos_gt, FD,
diversity). Prints the table and writes one JSON object; nothing is asserted. The pseudo text fraction is set
a priori (half of each batch), not tuned on these numbers.

``--text_to_image`` also draws each prior's samples through a decoder (the language-free toy decoder of
``train_toy_decoder.py`` unless ``--decoder``; trained when missing) with ``benchmarks/toy_text_to_image.py``'s
evaluation (``shifted_diffusion.toy.text_to_image_eval``: the same held-out captions, decoder seeds and pixel
reader for every prior) and adds its attribute accuracy, FD and diversity to the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from shifted_diffusion.files import write_results_json
from shifted_diffusion.threads import torch_threads
from shifted_diffusion.toy import ensure_toy_assets
from shifted_diffusion.toy.prior_eval import evaluate_toy_prior
from shifted_diffusion.toy.prior_job import TOY_CONFIG, run_prior_job
from shifted_diffusion.toy.prior_quality import FAST_EVAL, FAST_MAX_TRAIN_STEPS, FAST_TRAIN_ARGS

METRICS = ("nn_attr_acc", "cos_gt", "fd", "diversity")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results JSON file")
    p.add_argument("--fractions", default="0.02,0.1", help="captioned fractions of the images (besides 1.0)")
    p.add_argument("--pseudo_text_fraction", type=float, default=0.5, help="share of each batch with pseudo text")
    p.add_argument("--seed", type=int, default=1, help="captioned subset, training and sampling seed")
    p.add_argument("--max_train_steps", type=int, default=None, help="default: the toy preset's (500); --fast 8")
    p.add_argument("--sampling_steps", type=int, default=8)
    p.add_argument("--num_captions", type=int, default=200)
    p.add_argument("--samples_per_caption", type=int, default=8)
    p.add_argument("--output_dir", default="outputs/toy_semi_supervised")
    p.add_argument("--toy_root", default="outputs/toy_assets")
    p.add_argument("--fast", action="store_true", help="the tiny test world and network, a few steps")
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--text_to_image", action="store_true", help="also score every prior through a decoder")
    p.add_argument("--decoder", default=None, help="--text_to_image: decoder folder (default: the toy decoder)")
    p.add_argument("--t2i_captions", type=int, default=100, help="--text_to_image: held-out captions")
    p.add_argument("--t2i_samples", type=int, default=2, help="--text_to_image: images per caption")
    return p


def text_to_image_rows(args, pair: dict, name: str, out_dir: Path) -> dict:
    """{prior kind: text-to-image scores} of a (shifted, baseline) pair through the decoder
    (toy.text_to_image_eval, the language-free rows only)."""
    from shifted_diffusion.toy.text_to_image_eval import run_text_to_image_eval

    argv = ["--out", str(out_dir / f"t2i_{name}.json"), "--output_dir", str(out_dir / f"t2i_{name}"),
            "--toy_root", args.toy_root, "--no_text_image", "--shifted_prior", str(pair["shifted"]),
            "--baseline_prior", str(pair["baseline"]), "--prior_num_inference_steps", str(args.sampling_steps),
            "--num_threads", str(args.num_threads), "--seed", str(args.seed),
            *(["--decoder", args.decoder] if args.decoder else []), *(["--fast"] if args.fast else
                                                                     ["--num_captions", str(args.t2i_captions),
                                                                      "--samples_per_caption", str(args.t2i_samples)])]
    results = run_text_to_image_eval(argv)["text_to_image"]
    return {kind: {"t2i_attr_acc": m["attribute_accuracy"]["mean"], "t2i_all_attrs": m["attribute_accuracy"]["all"],
                   "t2i_fd": m["fd"], "t2i_diversity": m["diversity"]["mean"]} for kind, m in results.items()}


def captioned_subset_world(world: Path, folder: Path, fraction: float, seed: int) -> tuple[Path, int]:
    """``folder``: links to ``world``'s images and a metadata.jsonl with the captions of a seeded ``fraction``
    of them (at least one) -> (folder, captioned images)."""
    rows = [json.loads(line) for line in (world / "metadata.jsonl").read_text().splitlines() if line.strip()]
    keep = max(1, round(fraction * len(rows)))
    # not the seed itself: the held-out split is a seeded permutation too, and would pick the same images
    chosen = set(torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 2**20))[:keep].tolist())
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        link = folder / row["file_name"]
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((world / row["file_name"]).resolve(), link)
    tmp = folder / "metadata.jsonl.tmp"
    tmp.write_text("".join(json.dumps({**row, "text": row["text"] if i in chosen else []}) + "\n"
                           for i, row in enumerate(rows)))
    os.replace(tmp, folder / "metadata.jsonl")
    return folder, keep


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    start_all = time.time()
    with torch_threads(args.num_threads):
        assets = ensure_toy_assets(args.toy_root, fast=args.fast)
        world, out_dir = Path(assets["world"]), Path(args.output_dir)
        steps = args.max_train_steps if args.max_train_steps is not None else (FAST_MAX_TRAIN_STEPS if args.fast else None)
        common = ["--config", str(TOY_CONFIG), "--clip_models", assets["clip"], "--t5_model",
                  f"clip-tokens:{assets['clip']}", "--seed", str(args.seed), "--report_to", "none",
                  "--validation_steps", "0", *(FAST_TRAIN_ARGS if args.fast else [])]
        if steps is not None:
            common += ["--max_train_steps", str(steps)]
        eval_kwargs = dict(FAST_EVAL) if args.fast else dict(num_captions=args.num_captions,
                                                             samples_per_caption=args.samples_per_caption)
        full_cache = out_dir / "cache_full"
        plans = [("1.0", world, full_cache, 0.0, len((world / "metadata.jsonl").read_text().splitlines()))]
        for fraction in [float(f) for f in args.fractions.split(",") if f]:
            folder, kept = captioned_subset_world(world, out_dir / f"world_{fraction:g}", fraction, args.seed)
            for pseudo in (0.0, args.pseudo_text_fraction):
                plans.append((f"{fraction:g}", folder, out_dir / f"cache_{fraction:g}", pseudo, kept))
        rows, wall = [], {}
        for captioned, folder, cache, pseudo, kept in plans:
            pair = {}
            for prior in ("shifted", "baseline"):
                name = f"{prior}_f{captioned}_pseudo{pseudo:g}"
                start = time.time()
                prior_dir = pair[prior] = run_prior_job([
                    *common, "--train_data_dir", str(folder), "--cache_dir", str(cache), "--output_dir",
                    str(out_dir / name), "--pseudo_text_fraction", str(pseudo),
                    "--baseline" if prior == "baseline" else "--no-baseline"])
                wall[f"train_{name}"] = round(time.time() - start, 1)
                start = time.time()
                evaluation = evaluate_toy_prior(prior_dir, world, full_cache, steps=[args.sampling_steps],
                                                seed=args.seed, **eval_kwargs)
                wall[f"eval_{name}"] = round(time.time() - start, 1)
                info = json.loads((prior_dir / "model_index.json").read_text())["training"]
                metrics = evaluation["steps"][str(args.sampling_steps)]
                rows.append({"prior": prior, "captioned_fraction": float(captioned), "captioned_images": kept,
                             "training": "semi-supervised" if pseudo else ("captioned only" if captioned != "1.0"
                                                                            else "fully captioned"),
                             "pseudo_text_fraction": pseudo, "pseudo_text": info.get("pseudo_text"),
                             **{k: metrics[k] for k in METRICS}})
                print(json.dumps(rows[-1]), flush=True)
            if args.text_to_image:
                start = time.time()
                scores = text_to_image_rows(args, pair, f"f{captioned}_pseudo{pseudo:g}", out_dir)
                wall[f"text_to_image_f{captioned}_pseudo{pseudo:g}"] = round(time.time() - start, 1)
                for row in rows[-2:]:
                    row.update(scores[row["prior"]])
                    print(json.dumps(row), flush=True)
            write_results_json(args.out, results(args, rows, evaluation, steps, eval_kwargs, wall, start_all,
                                                  complete=False))  # what is measured so far survives a stop
    result = results(args, rows, evaluation, steps, eval_kwargs, wall, start_all, complete=True)
    write_results_json(args.out, result)
    print_table(args, rows)
    return result


def results(args, rows, evaluation, steps, eval_kwargs, wall, start_all, complete: bool) -> dict:
    """The JSON object: the rows so far, the evaluation's references, the settings and wall times."""
    text_to_image = None if not args.text_to_image else {
        "decoder": args.decoder or "the toy decoder", "num_captions": args.t2i_captions,
        "samples_per_caption": args.t2i_samples}
    return {"rows": rows, "reference": {k: evaluation["reference"][k] for k in METRICS if k in evaluation["reference"]},
            "config": {"seed": args.seed, "fractions": args.fractions, "pseudo_text_fraction": args.pseudo_text_fraction,
                       "max_train_steps": steps, "sampling_steps": args.sampling_steps, "fast": args.fast,
                       "text_to_image": text_to_image, **eval_kwargs,
                       "wall_seconds": {**wall, "total": round(time.time() - start_all, 1)},
                       "torch_threads": args.num_threads, "platform": platform.platform(), "torch": torch.__version__,
                       "complete": complete}}


def print_table(args, rows) -> None:
    t2i = " t2i attr acc | t2i all attrs | t2i FD | t2i diversity |" if args.text_to_image else ""
    print(f"| prior | captioned | training | nn_attr_acc | cos_gt | fd | diversity |{t2i}\n"
          f"|---|---|---|---|---|---|---|{'---|' * 4 if t2i else ''}")
    for row in rows:
        cells = (f" {row['t2i_attr_acc']:.3f} | {row['t2i_all_attrs']:.3f} | {row['t2i_fd']:.1f} | "
                 f"{row['t2i_diversity']:.3f} |") if t2i else ""
        print(f"| {row['prior']} | {row['captioned_fraction']:g} ({row['captioned_images']} images) | {row['training']} | "
              f"{row['nn_attr_acc']:.3f} | {row['cos_gt']:.3f} | {row['fd']:.1f} | {row['diversity']:.3f} |{cells}")


if __name__ == "__main__":
    main()
