"""The toy world's pixel reader as an image scorer of ``evaluation.Evaluator`` (``evaluate.py --toy_attributes``).

Every evaluation pair must be an image of a generated toy world (its folder's ``metadata.jsonl`` holds the
attributes and which of them the caption mentions). Each generated image's attributes are read from its pixels
(``toy.reader``) and compared with the ground-truth image's on the attributes its caption mentions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .world import ATTRIBUTES

__all__ = ["ToyAttributeScorer"]


class ToyAttributeScorer:
    """``score(images, rows)`` -> {"attributes": (n, 5) value indices read from the pixels};
    ``summarize`` -> {"attribute_accuracy": {"mean", "all", <attribute>: accuracy on the mentioned ones}}
    (``text_to_image_eval.attribute_scores``)."""

    name = "toy_attribute_reader/1"

    def __init__(self, pairs: Sequence):
        from .evaluate import load_attributes
        from .reader import ToyAttributeReader
        from .world import load_world_config

        worlds, truth, mentioned, config = {}, [], [], None
        for i, pair in enumerate(pairs):
            image = Path(pair.image)
            folder = image.parent
            if folder not in worlds:
                try:
                    folder_config = load_world_config(folder)
                except FileNotFoundError as error:
                    raise ValueError(f"--toy_attributes: evaluation image {image} is not in a toy world ({error})") \
                        from None
                if config is not None and folder_config.to_dict() != config.to_dict():
                    raise ValueError(f"--toy_attributes: {folder} is a toy world of another config than the first "
                                     "evaluation image's (other attribute values): one world per evaluation")
                config = folder_config
                table = load_attributes(folder)
                worlds[folder] = (table, {name: row for row, name in enumerate(table["file_name"])})
            table, rows = worlds[folder]
            row = rows.get(image.name)
            if row is None:
                raise ValueError(f"--toy_attributes: {image.name} is not listed in {folder / 'metadata.jsonl'}")
            if table["text"][row] != pair.caption:
                raise ValueError(f"--toy_attributes: pair {i} has caption {pair.caption!r}, but "
                                 f"{folder / 'metadata.jsonl'} gives {image.name} the caption {table['text'][row]!r}")
            truth.append(torch.stack([table[a][row] for a in ATTRIBUTES]))
            mentioned.append(table["mentioned"][row])
        if config is None:
            raise ValueError("--toy_attributes: the evaluation set is empty")
        self.reader = ToyAttributeReader(config)
        self.truth = torch.stack(truth)  # (N, 5)
        self.mentioned = torch.stack(mentioned)  # (N, 5) bool

    def score(self, images, rows) -> dict:
        from .text_to_image_eval import read_attributes

        return {"attributes": read_attributes(self.reader, images)}

    def summarize(self, scores: dict) -> dict:
        from .text_to_image_eval import attribute_scores

        predicted = scores["attributes"]
        if predicted.shape != self.truth.shape:
            raise ValueError(f"expected read attributes {tuple(self.truth.shape)}, got {tuple(predicted.shape)}")
        return {"attribute_accuracy": attribute_scores(predicted, self.truth, self.mentioned)}
