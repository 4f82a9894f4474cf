"""Attribute bookkeeping and accuracy measures for the toy world (zero-shot CLIP, nearest-neighbour attributes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data import to_rgb
from .world import ATTRIBUTES, ToyWorldConfig, caption_variants, load_world_config, render_image, sample_record


def load_attributes(world_folder) -> dict:
    """Per-image attributes of a world folder (metadata.jsonl order).

    Returns {"file_name": [str], "text": [str], <attribute>: LongTensor (N,) value index for each of
    ATTRIBUTES, "mentioned": BoolTensor (N, 5) in ATTRIBUTES order, "values": {attribute: tuple of names}}.
    """
    config = load_world_config(world_folder)
    values = {a: config.values(a) for a in ATTRIBUTES}
    records = [json.loads(line) for line in open(Path(world_folder) / "metadata.jsonl")]
    out = {"file_name": [r["file_name"] for r in records], "text": [r["text"] for r in records], "values": values}
    for a in ATTRIBUTES:
        out[a] = torch.tensor([values[a].index(r["attributes"][a]) for r in records], dtype=torch.long)
    out["mentioned"] = torch.tensor([[a in r["mentioned"] for a in ATTRIBUTES] for r in records], dtype=torch.bool)
    return out


def heldout_images(world_config: ToyWorldConfig, n: int) -> tuple:
    """n images of the world never written to its folder (another seed): (list of PIL images, {attribute: (n,)})."""
    config = world_config.heldout(n)
    records = [sample_record(config, i) for i in range(n)]
    images = [render_image(config, r) for r in records]
    attributes = {a: torch.tensor([r["indices"][a] for r in records], dtype=torch.long) for a in ATTRIBUTES}
    return images, attributes


def attribute_prompts(world_config: ToyWorldConfig, attribute: str) -> list:
    """For each value of `attribute`: all caption variants mentioning only that attribute."""
    filler = {a: world_config.values(a)[0] for a in ATTRIBUTES}
    return [caption_variants({**filler, attribute: value}, [attribute]) for value in world_config.values(attribute)]


def prompt_classifier(encode_text: Callable[[list], torch.Tensor], prompts_per_value: list) -> torch.Tensor:
    """(V, D) unit class vectors: the normalised mean of each value's normalised prompt embeddings."""
    rows = []
    for prompts in prompts_per_value:
        emb = torch.nn.functional.normalize(encode_text(prompts).float(), dim=-1)
        rows.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_from_encoders(
    encode_image: Callable[[list], torch.Tensor],
    encode_text: Callable[[list], torch.Tensor],
    world_config: ToyWorldConfig,
    n: int = 1000,
    batch_size: int = 250,
) -> dict:
    """Per-attribute top-1 accuracy of cosine(image, class prompts) on n held-out images."""
    images, attributes = heldout_images(world_config, n)
    image_emb = torch.cat([encode_image(images[i: i + batch_size]).float() for i in range(0, n, batch_size)])
    image_emb = torch.nn.functional.normalize(image_emb, dim=-1)
    out = {}
    for a in ATTRIBUTES:
        classifier = prompt_classifier(encode_text, attribute_prompts(world_config, a)).to(image_emb)
        pred = (image_emb @ classifier.T).argmax(-1)
        out[a] = float((pred.cpu() == attributes[a]).float().mean())
    return out


def zero_shot_accuracy(clip_dir, world_folder, n: int = 1000, device=None) -> dict:
    """Zero-shot per-attribute accuracy of a saved toy CLIP, loaded through encoders.MultiCLIP."""
    from ..encoders import MultiCLIP

    clip = MultiCLIP([(str(clip_dir), "")], device=device)
    return zero_shot_from_encoders(clip.encode_image, clip.encode_text, load_world_config(world_folder), n=n)


def model_encoders(model: torch.nn.Module, image_size: int, context_length: int) -> tuple:
    """(encode_image(list of PIL), encode_text(list of str)) for an in-memory open_clip model."""
    from .clip import CaptionTokenizer, normalize_images

    tokenizer = CaptionTokenizer(context_length)
    device = next(model.parameters()).device

    def encode_image(images):
        x = torch.from_numpy(np.stack([np.asarray(to_rgb(im)) for im in images])).permute(0, 3, 1, 2)
        return model.encode_image(normalize_images(x.to(device), image_size))

    def encode_text(texts):
        return model.encode_text(tokenizer(texts).to(device))

    return encode_image, encode_text


# ----------------------------------------------------------------------------------------------
# attribute accuracy of embeddings via their nearest real neighbour


@torch.no_grad()
def nearest_neighbour_index(query: torch.Tensor, reference: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index (B,) of the reference row (N, D) with the highest cosine to each query row (B, D)."""
    if query.ndim != 2 or reference.ndim != 2 or query.shape[1] != reference.shape[1]:
        raise ValueError(f"query (B, D) and reference (N, D) need the same D; got {tuple(query.shape)}, {tuple(reference.shape)}")
    q = torch.nn.functional.normalize(query.float(), dim=-1)
    r = torch.nn.functional.normalize(reference.float().to(q.device), dim=-1)
    return torch.cat([(q[i: i + chunk] @ r.T).argmax(-1) for i in range(0, q.shape[0], chunk)])


def nearest_neighbour_attributes(query: torch.Tensor, reference: torch.Tensor, reference_attributes: dict) -> dict:
    """{attribute: (B,)} attributes of each query's nearest (cosine) reference embedding."""
    idx = nearest_neighbour_index(query, reference).cpu()
    return {a: reference_attributes[a][idx] for a in ATTRIBUTES if a in reference_attributes}


def mentioned_attribute_accuracy(pred_attributes: dict, true_attributes: dict, mentioned: torch.Tensor) -> dict:
    """Per attribute: accuracy over the samples whose caption mentions it (nan if none does).

    pred_attributes, true_attributes: {attribute: (B,) value index}; mentioned: (B, 5) bool in ATTRIBUTES order.
    """
    if mentioned.ndim != 2 or mentioned.shape[1] != len(ATTRIBUTES):
        raise ValueError(f"mentioned must be (B, {len(ATTRIBUTES)}), got {tuple(mentioned.shape)}")
    out = {}
    for j, a in enumerate(ATTRIBUTES):
        mask = mentioned[:, j].bool()
        if mask.any():
            out[a] = float((pred_attributes[a][mask] == true_attributes[a][mask]).float().mean())
        else:
            out[a] = float("nan")
    return out


def normalized_entropy(values: torch.Tensor, num_values: int) -> float:
    """Entropy of the empirical distribution of integer values, divided by log(num_values) (1 = uniform)."""
    counts = torch.bincount(values.flatten().long(), minlength=num_values).double()
    p = counts / counts.sum()
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return float(h / np.log(num_values)) if num_values > 1 else 0.0


def unmentioned_diversity(pred_attributes: dict, group: torch.Tensor, mentioned: torch.Tensor, num_values: dict) -> dict:
    """Per attribute: mean normalised entropy of its predicted values within each group of samples
    (e.g. many samples of one caption) over the groups whose caption leaves it unmentioned.

    pred_attributes: {attribute: (B,)}; group: (B,) caption id; mentioned: (B, 5) bool; num_values: {attribute: V}.
    """
    out = {}
    for j, a in enumerate(ATTRIBUTES):
        scores = []
        for g in torch.unique(group):
            mask = group == g
            if not mentioned[mask][0, j]:
                scores.append(normalized_entropy(pred_attributes[a][mask], num_values[a]))
        out[a] = float(np.mean(scores)) if scores else float("nan")
    return out
