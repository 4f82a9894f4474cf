"""Quality of a prior on the toy world: held-out captions -> sampled image embeddings -> metrics.

For the held-out captions (the val split of the prior's own embedding cache) the prior samples
``samples_per_caption`` image embeddings per caption at several step counts; ``score_embeddings``
measures them against real held-out image embeddings:

* ``nn_attr_acc``  fraction of the caption's mentioned attributes that the generated embedding's nearest
                   (cosine) real held-out image has (mean over samples);
* ``cos_gt``       cosine to the caption's own image embedding, per CLIP block, averaged over blocks;
* ``fd``           Frechet distance between the generated set and the held-out image embeddings;
* ``diversity``    normalised entropy of each unmentioned attribute among the nearest neighbours of one
                   caption's samples (mean over (caption, unmentioned attribute) pairs);
* ``diversity_real`` the same for real training images drawn from those that match the caption's
                   mentioned attributes: what a perfect prior would give at this sample count.

Fidelity metrics that do not lean on one nearest neighbour (``fidelity_metrics``, ``embedding_metrics``):

* ``probe_acc``    linear attribute probes trained on the training images' embeddings: accuracy on the
                   generated samples for the attributes their caption mentions (``probe_acc_real``: on the
                   held-out real images, the ceiling);
* ``probe_tv``     total variation between a probe's predicted distribution over one caption's samples and the
                   attribute's real conditional distribution (training images matching the caption's mentioned
                   attributes), mean over (caption, attribute);
* ``precision`` / ``recall`` (k-NN manifolds) and ``density`` / ``coverage`` of the generated set against the
                   held-out images, on block-normalised embeddings.

``nn_attr_acc`` stays, with its caveat: one nearest neighbour in a finite bank rewards a sample that lands on
any matching real image, so it cannot tell a faithful distribution from a collapsed one.

The same real-image draw ("oracle prior") is scored with every metric and returned as ``reference``.
The metric part takes embeddings in (``score_embeddings``), so it can be checked on known inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from ..cache import EmbeddingDataset, load_image_embeddings, load_image_records
from ..embedding_metrics import conditional_total_variation, density_coverage, fit_linear_probe, precision_recall
from ..metrics import blockwise_cosine, frechet_distance
from .evaluate import load_attributes, mentioned_attribute_accuracy, nearest_neighbour_attributes, unmentioned_diversity
from .world import ATTRIBUTES

DEFAULT_STEPS = (4, 8, 16, 64)
TABLE_METRICS = ("nn_attr_acc", "cos_gt", "fd", "diversity", "diversity_real")


@dataclass(frozen=True)
class ToyEvalData:
    """Held-out captions with their ground truth, the real-image bank, and the training-image pool."""

    clip_text: torch.Tensor  # (C, D) CLIP text embeddings of the held-out captions
    text_tokens: torch.Tensor  # (C, L, E) word-level text states
    true_embeddings: torch.Tensor  # (C, D) the caption's own image embedding
    caption_attributes: torch.Tensor  # (C, 5) value index per attribute (ATTRIBUTES order)
    mentioned: torch.Tensor  # (C, 5) bool: attribute named by the caption
    bank: torch.Tensor  # (M, D) held-out (val) image embeddings: neighbour bank and real set of FD
    bank_attributes: torch.Tensor  # (M, 5)
    pool: torch.Tensor  # (P, D) training image embeddings (for the oracle draw)
    pool_attributes: torch.Tensor  # (P, 5)
    num_values: tuple  # values per attribute, ATTRIBUTES order
    block_sizes: tuple  # CLIP blocks of the concatenated embedding

    @property
    def num_captions(self) -> int:
        return int(self.true_embeddings.shape[0])


def _attribute_columns(attributes: dict, rows: torch.Tensor) -> torch.Tensor:
    """(N, 5) attribute value indices of the given world rows, ATTRIBUTES order."""
    return torch.stack([attributes[a][rows] for a in ATTRIBUTES], dim=1)


def _as_dict(columns: torch.Tensor) -> dict:
    return {a: columns[:, j] for j, a in enumerate(ATTRIBUTES)}


def load_eval_data(
    world_folder, cache_dir, *, val_fraction: float, split_seed: int, num_captions: Optional[int] = 200
) -> ToyEvalData:
    """The val split of an embedding cache of a toy world: first ``num_captions`` held-out pairs, the val
    images as bank, the training images as oracle pool. The split is ``split_image_indices(val_fraction,
    split_seed)``, i.e. the one the prior was trained without."""
    attributes = load_attributes(world_folder)
    world_row = {name: i for i, name in enumerate(attributes["file_name"])}
    records = load_image_records(cache_dir)
    missing = [r["file_name"] for r in records if r["file_name"] not in world_row]
    if missing:
        raise ValueError(f"cache {cache_dir} holds images that are not in the toy world {world_folder}: {missing[:5]}")
    image_rows = torch.tensor([world_row[r["file_name"]] for r in records], dtype=torch.long)  # cache image -> world row
    captions = [c for r in records for c in r["captions"]]

    val_set = EmbeddingDataset(cache_dir, "val", val_fraction=val_fraction, seed=split_seed, in_memory=True)
    if len(val_set) < 2:
        raise ValueError(f"the val split of {cache_dir} (val_fraction={val_fraction}) has {len(val_set)} captioned "
                         "image(s): at least 2 are needed (raise val_fraction)")
    count = len(val_set) if num_captions is None else min(int(num_captions), len(val_set))
    items = [val_set[i] for i in range(count)]
    clip_text = torch.stack([it["clip_text"] for it in items])
    text_tokens = torch.stack([it["text_tokens"] for it in items])
    true_embeddings = torch.stack([it["clip_image"] for it in items])
    caption_rows = image_rows[torch.stack([it["image_index"] for it in items])]
    for it, row in zip(items, caption_rows.tolist()):  # "mentioned" is the world's record of this very caption
        if captions[int(it["caption_index"])] != attributes["text"][row]:
            raise ValueError(f"caption {captions[int(it['caption_index'])]!r} of {attributes['file_name'][row]} is not "
                             f"the toy world's caption {attributes['text'][row]!r}: cache and world disagree")

    image_emb = load_image_embeddings(cache_dir)  # (N, D)
    val_images = val_set.image_indices
    train_mask = torch.ones(len(image_emb), dtype=torch.bool)
    train_mask[val_images] = False
    train_images = train_mask.nonzero().flatten()
    return ToyEvalData(
        clip_text=clip_text,
        text_tokens=text_tokens,
        true_embeddings=true_embeddings,
        caption_attributes=_attribute_columns(attributes, caption_rows),
        mentioned=attributes["mentioned"][caption_rows],
        bank=image_emb[val_images],
        bank_attributes=_attribute_columns(attributes, image_rows[val_images]),
        pool=image_emb[train_images],
        pool_attributes=_attribute_columns(attributes, image_rows[train_images]),
        num_values=tuple(len(attributes["values"][a]) for a in ATTRIBUTES),
        block_sizes=tuple(int(s) for s in val_set.block_sizes),
    )


def oracle_embeddings(data: ToyEvalData, samples_per_caption: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A perfect prior's samples: per caption, real training images matching its mentioned attributes, drawn
    with replacement -> (C * S, D), caption-major. A caption no training image matches gets its own image."""
    match = ((data.pool_attributes[None] == data.caption_attributes[:, None]) | ~data.mentioned[:, None]).all(-1)  # (C, P)
    rows = []
    for c in range(data.num_captions):
        candidates = match[c].nonzero().flatten()
        if candidates.numel() == 0:
            rows.append(data.true_embeddings[c].expand(samples_per_caption, -1))
            continue
        pick = candidates[torch.randint(candidates.numel(), (samples_per_caption,), generator=generator)]
        rows.append(data.pool[pick])
    return torch.cat(rows)


def score_embeddings(generated: torch.Tensor, data: ToyEvalData, samples_per_caption: int) -> dict:
    """Metrics of generated embeddings (C * S, D), caption-major (S consecutive rows per caption)."""
    c, s = data.num_captions, int(samples_per_caption)
    d = data.true_embeddings.shape[1]
    if generated.ndim != 2 or generated.shape != (c * s, d):
        raise ValueError(f"generated: expected shape ({c * s}, {d}) = (captions x samples_per_caption, D), "
                         f"got {tuple(generated.shape)}")
    generated = generated.detach().float().cpu()
    group = torch.arange(c).repeat_interleave(s)  # (C*S,) caption id of each sample
    true = data.caption_attributes[group]  # (C*S, 5)
    mentioned = data.mentioned[group]  # (C*S, 5)

    neighbour = nearest_neighbour_attributes(generated, data.bank, _as_dict(data.bank_attributes))
    pred = torch.stack([neighbour[a] for a in ATTRIBUTES], dim=1)  # (C*S, 5)
    hits = ((pred == true) & mentioned).sum(1).double()
    nn_attr_acc = float((hits / mentioned.sum(1).clamp_min(1)).mean())
    by_attribute = mentioned_attribute_accuracy(neighbour, _as_dict(true), mentioned)

    _, cos = blockwise_cosine(generated, data.true_embeddings[group].float(), data.block_sizes)  # (C*S,)

    num_values = dict(zip(ATTRIBUTES, data.num_values))
    diversity_by_attribute = unmentioned_diversity(neighbour, group, mentioned, num_values)
    unmentioned_counts = (~data.mentioned).sum(0).tolist()  # captions leaving each attribute unmentioned
    weighted = [(diversity_by_attribute[a], n) for a, n in zip(ATTRIBUTES, unmentioned_counts) if n > 0]
    diversity = sum(v * n for v, n in weighted) / sum(n for _, n in weighted) if weighted else float("nan")

    real_norm = data.bank.float().norm(dim=1).mean()
    return {
        "nn_attr_acc": nn_attr_acc,
        "cos_gt": float(cos.mean()),
        "fd": frechet_distance(generated.double(), data.bank.double()),
        "diversity": float(diversity),
        "nn_attr_acc_by_attribute": by_attribute,
        "diversity_by_attribute": diversity_by_attribute,
        "norm_ratio": float(generated.norm(dim=1).mean() / real_norm),
        **fidelity_metrics(generated, data, s),
    }


def _block_normalised(x: torch.Tensor, block_sizes) -> torch.Tensor:
    """Each CLIP block scaled to unit norm (concatenation / sqrt(J)): Euclidean distance tracks block cosine."""
    blocks = [torch.nn.functional.normalize(b.double(), dim=1) for b in x.split(list(block_sizes), dim=1)]
    return torch.cat(blocks, dim=1) / len(blocks) ** 0.5


def fidelity_metrics(generated: torch.Tensor, data: ToyEvalData, samples_per_caption: int, k: int = 3) -> dict:
    """probe_acc / probe_acc_real / probe_tv (per attribute too) and precision / recall / density / coverage of
    generated embeddings (C * S, D), caption-major."""
    c, s = data.num_captions, int(samples_per_caption)
    if generated.ndim != 2 or generated.shape[0] != c * s:
        raise ValueError(f"generated: expected {c * s} rows (captions x samples_per_caption), got {tuple(generated.shape)}")
    group = torch.arange(c).repeat_interleave(s)
    pool, bank, gen = (_block_normalised(x.float(), data.block_sizes) for x in (data.pool, data.bank, generated))
    match = ((data.pool_attributes[None] == data.caption_attributes[:, None]) | ~data.mentioned[:, None]).all(-1)
    acc, acc_real, tv = {}, {}, {}
    for j, (name, num_values) in enumerate(zip(ATTRIBUTES, data.num_values)):
        labels = data.pool_attributes[:, j]
        if labels.unique().numel() < 2:
            continue
        probe = fit_linear_probe(pool, labels, int(num_values))
        acc_real[name] = probe.accuracy(bank, data.bank_attributes[:, j])
        rows = data.mentioned[group, j]
        if rows.any():
            acc[name] = probe.accuracy(gen[rows], data.caption_attributes[group[rows], j])
        has_real = match.any(dim=1)
        if has_real.any():
            real = torch.stack([torch.bincount(labels[match[i]], minlength=int(num_values)).double()
                                for i in range(c) if has_real[i]])
            predicted = probe.predict(gen).view(c, s)[has_real]
            tv[name] = conditional_total_variation(predicted, real / real.sum(1, keepdim=True))

    def mean(values: dict) -> float:
        return float(np.mean(list(values.values()))) if values else float("nan")

    k_gen, k_bank = min(k, gen.shape[0] - 1), min(k, bank.shape[0] - 1)
    manifold = {}
    if min(k_gen, k_bank) >= 1:
        kk = min(k_gen, k_bank)
        manifold = {**precision_recall(bank, gen, kk), **density_coverage(bank, gen, kk)}
    return {"probe_acc": mean(acc), "probe_acc_real": mean(acc_real), "probe_tv": mean(tv),
            "probe_acc_by_attribute": acc, "probe_tv_by_attribute": tv, **manifold}


@torch.no_grad()
def sample_prior(pipeline, data: ToyEvalData, *, num_steps, samples_per_caption: int, guidance_scale: float,
                 generator: torch.Generator, captions_per_batch: int = 100, noise_temperature: float = 1.0) -> torch.Tensor:
    """The prior's samples for every held-out caption -> (C * S, D) float32 on CPU, caption-major."""
    device = pipeline.device
    out = []
    for start in range(0, data.num_captions, captions_per_batch):
        stop = start + captions_per_batch
        out.append(pipeline.sample(
            data.clip_text[start:stop].to(device), data.text_tokens[start:stop].to(device),
            num_images_per_prompt=samples_per_caption, num_inference_steps=num_steps, guidance_scale=guidance_scale,
            generator=generator, noise_temperature=noise_temperature,
        ).float().cpu())
    return torch.cat(out)


def evaluate_toy_prior(
    prior_dir,
    world_folder,
    cache_dir=None,
    *,
    steps: Sequence[int] = DEFAULT_STEPS,
    num_captions: int = 200,
    samples_per_caption: int = 8,
    guidance_scale: float = 1.0,
    noise_temperature: float = 1.0,
    seed: int = 0,
    device=None,
) -> dict:
    """{"baseline": bool, "steps": {"4": metrics, ...}, "reference": oracle metrics, "num_captions": C, ...}
    for a prior folder trained on the toy world (split settings read from its training record)."""
    from ..prior_pipeline import load_prior, read_prior_info

    prior_dir = Path(prior_dir)
    info = read_prior_info(prior_dir)
    train = info["training"].get("train")
    if not train:
        raise ValueError(f"{prior_dir} records no training settings ('train'): cannot recover the held-out split")
    if cache_dir is None:
        cache_dir = train.get("cache_dir") or Path(train["output_dir"]) / "embeddings"
    data = load_eval_data(world_folder, cache_dir, val_fraction=train["val_fraction"], split_seed=train["seed"],
                          num_captions=num_captions)
    pipeline = load_prior(prior_dir, device=device)

    reference = score_embeddings(
        oracle_embeddings(data, samples_per_caption, torch.Generator().manual_seed(seed)), data, samples_per_caption)
    results = {}
    for num_steps in steps:
        generator = torch.Generator(device=pipeline.device).manual_seed(seed)
        start = time.time()
        generated = sample_prior(pipeline, data, num_steps=num_steps, samples_per_caption=samples_per_caption,
                                 guidance_scale=guidance_scale, generator=generator,
                                 noise_temperature=noise_temperature)
        seconds = time.time() - start
        metrics = score_embeddings(generated, data, samples_per_caption)
        metrics["diversity_real"] = reference["diversity"]
        metrics["sample_seconds"] = round(seconds, 3)
        results[str(num_steps)] = metrics
    return {
        "baseline": info["prior"].get("vocab_size") is None,
        "steps": results,
        "reference": reference,
        "num_captions": data.num_captions,
        "samples_per_caption": int(samples_per_caption),
        "num_bank_images": int(data.bank.shape[0]),
        "guidance_scale": float(guidance_scale),
        "global_step": info["training"].get("global_step"),
    }


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.4g}" if abs(value) >= 10 else f"{value:.3f}"


def format_table(results_by_prior: Mapping[str, Mapping[str, dict]], reference: Optional[dict] = None) -> str:
    """Markdown table, one row per (prior, steps): {"shifted": {"4": metrics, ...}, "baseline": {...}};
    ``reference`` (oracle metrics) adds a row of real images matching the captions."""
    header = ["prior", "steps", "nn_attr_acc ↑", "cos_gt ↑", "fd ↓", "diversity", "diversity_real"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for prior, by_steps in results_by_prior.items():
        for steps in sorted(by_steps, key=lambda k: int(k)):
            m = by_steps[steps]
            lines.append("| " + " | ".join([prior, str(steps)] + [_cell(m.get(k)) for k in TABLE_METRICS]) + " |")
    if reference is not None:
        lines.append("| " + " | ".join(["real images (oracle)", "-"] + [_cell(reference.get(k)) for k in TABLE_METRICS[:-1]]
                                       + [_cell(reference.get("diversity"))]) + " |")
    return "\n".join(lines)
