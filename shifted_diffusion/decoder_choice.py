"""Which decoder a ``--decoder`` names, behind the one ``generate`` call text-to-image uses.

* a shifted-diffusion decoder folder (``shifted_decoder.json``, read by ``decoder.read_decoder_config``;
  written by finetune.py or the toy decoder recipe): ``decoder.load_decoder``, the default path; with
  ``"decoder_type": "text_and_image"`` it is the text + image decoder (``text_image_decoder``), which also
  takes the caption;
* a stock unCLIP decoder pipeline folder or hub id (Kandinsky 2.2, Stable unCLIP, Karlo image variation),
  detected by its ``model_index.json`` ``_class_name``: ``unclip.load_unclip_decoder`` wrapped in
  ``UnclipDecoder``, which feeds the prior's image embeddings (and, for Kandinsky 2.2, the negative
  embedding) to ``unclip.decode_image_embeds``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

SHIFTED = "shifted"  # our own decoder folder
HUB = "hub"  # not a local path but shaped like a hub id: the kind is read from the hub's model_index.json
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def decoder_kind(name: str, script: str) -> str:
    """SHIFTED, an unCLIP pipeline class name (``unclip.SUPPORTED_KINDS``) or HUB; SystemExit naming what
    was found for anything else."""
    from .decoder import DECODER_CONFIG_NAME, read_decoder_config
    from .unclip import SUPPORTED_KINDS

    path = Path(name)
    if path.is_dir():
        if (path / DECODER_CONFIG_NAME).is_file():
            read_decoder_config(path)  # a broken file is named here
            return SHIFTED
        index = path / "model_index.json"
        found = None
        if index.is_file():
            try:
                found = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
                raise SystemExit(f"{script}: --decoder {path}: model_index.json is not a JSON object ({error})")
            if found in SUPPORTED_KINDS:
                return found
        raise SystemExit(f"{script}: --decoder {path}: neither a shifted-diffusion decoder folder (no "
                         f"{DECODER_CONFIG_NAME}; fine-tune one with finetune.py) nor a stock unCLIP decoder pipeline "
                         f"(model_index.json _class_name {found!r}; supported: {list(SUPPORTED_KINDS)})")
    if not path.exists() and _HUB_ID.match(name):
        return HUB
    raise SystemExit(f"{script}: decoder folder {name} does not exist (fine-tune one with finetune.py)")


class UnclipDecoder:
    """A stock unCLIP pipeline (``unclip.load_unclip_decoder``) with the own decoder's ``generate`` call.

    ``clip_dim``: the image-embedding dim the pipeline expects; ``takes_negative``: whether it uses a negative
    image embedding (Kandinsky 2.2; Stable unCLIP and Karlo have their own unconditional embedding);
    ``empty_embedding`` is None (a stock pipeline stores none)."""

    empty_embedding = None
    clip_specs = None

    def __init__(self, pipeline):
        from .unclip import KANDINSKY22, decoder_kind as pipeline_kind, expected_embedding_dim

        self.pipeline = pipeline
        self.kind = pipeline_kind(pipeline)
        self.clip_dim = expected_embedding_dim(pipeline)
        self.takes_negative = self.kind == KANDINSKY22

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    def set_scheduler(self, name: str) -> None:
        """Swap the sampling scheduler (Kandinsky 2.2 and Stable unCLIP; Karlo has two and keeps its own)."""
        from .decoder import make_scheduler

        if not hasattr(self.pipeline, "scheduler"):
            raise ValueError(f"--scheduler: {self.kind} has no single sampling scheduler to replace (it keeps its own)")
        self.pipeline.scheduler = make_scheduler(name, self.pipeline.scheduler.config)

    def generate(self, image_embeds: torch.Tensor, *, guidance_scale: float, num_inference_steps: int,
                 negative_embeds: Optional[torch.Tensor] = None, generator=None, height=None, width=None) -> list:
        """PIL images for image embeddings (B, D); ``negative_embeds`` (D,) or (B, D), Kandinsky 2.2 only."""
        from .unclip import decode_image_embeds

        negative = None
        if negative_embeds is not None:
            negative = torch.as_tensor(negative_embeds).float()
            negative = negative.expand(image_embeds.shape[0], -1) if negative.ndim == 1 else negative
        return decode_image_embeds(self.pipeline, torch.as_tensor(image_embeds).float(), negative,
                                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                   generator=generator, height=height, width=width)


def load_unclip(name: str, kind: str, script: str, device, dtype) -> UnclipDecoder:
    """``unclip.load_unclip_decoder`` on the device and dtype; a hub id that cannot be loaded is a SystemExit
    naming the id and the cause."""
    from .unclip import load_unclip_decoder

    try:
        pipeline = load_unclip_decoder(name, kind=None if kind == HUB else kind, torch_dtype=dtype)
    except (OSError, ValueError) as error:
        if kind != HUB:
            raise
        raise SystemExit(f"{script}: decoder folder {name} does not exist (fine-tune one with finetune.py), and as a "
                         f"hub id of a stock unCLIP decoder it could not be loaded: {error}") from None
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return UnclipDecoder(pipeline)
