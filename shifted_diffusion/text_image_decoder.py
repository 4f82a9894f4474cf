"""Generation with the text + image decoder (finetune.py --decoder_type text_and_image; ``ip_adapter``).

``load_text_image_decoder(folder)`` loads the stock StableDiffusionPipeline of the folder and its adapter with
stock ``load_ip_adapter``; ``TextImageDecoder.generate`` takes the image embeddings (B, D) and, per row, a
caption for the text encoder ("" when none: image-only, as test.py without --prompt). Classifier-free
guidance pairs the empty caption with the negative image embedding (zeros by default, what the trainer's
dropout feeds). ``set_image_scale`` is stock ``set_ip_adapter_scale``: 0 is the text-only Stable Diffusion.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from . import ip_adapter

DECODER_TYPE = "text_and_image"


class TextImageDecoder:
    """A StableDiffusionPipeline with our IP-Adapter loaded; the ``generate`` call of the other decoders plus
    ``prompts``."""

    takes_prompts = True

    def __init__(self, pipeline, clip_dim: int, clip_specs: list, image_scale: float = 1.0):
        self.pipeline, self.clip_specs = pipeline, clip_specs
        self._clip_dim = int(clip_dim)
        self.set_image_scale(image_scale)

    @property
    def clip_dim(self) -> int:
        return self._clip_dim

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device

    @property
    def empty_embedding(self) -> torch.Tensor:
        """The negative image embedding the adapter was trained with: zeros (D,)."""
        return torch.zeros(self.clip_dim, device=self.device)

    def load_clip(self, device=None, dtype=None):
        from .encoders import MultiCLIP

        return MultiCLIP([tuple(spec) for spec in self.clip_specs], device=device or self.device, dtype=dtype)

    def set_scheduler(self, name: str) -> None:
        from .decoder import make_scheduler

        self.pipeline.scheduler = make_scheduler(name, self.pipeline.scheduler.config)

    def set_image_scale(self, scale: float) -> None:
        """Weight of the image attention (stock set_ip_adapter_scale): 0 = text only, 1 = as trained."""
        if not (isinstance(scale, (int, float)) and scale >= 0 and scale == scale and scale != float("inf")):
            raise ValueError(f"image_scale: expected a finite number >= 0, got {scale!r}")
        self.image_scale = float(scale)
        self.pipeline.set_ip_adapter_scale(self.image_scale)

    @torch.no_grad()
    def generate(self, image_embeds: torch.Tensor, *, prompts: Union[None, str, Sequence[str]] = None,
                 guidance_scale: float = 7.5, num_inference_steps: int = 50,
                 negative_embeds: Optional[torch.Tensor] = None, generator=None, height=None, width=None,
                 progress: bool = False) -> list:
        """PIL images for image embeddings (B, D) and captions (None: "", a str: every row, or B strings)."""
        from .checks import check_count, check_finite, check_scale

        guidance_scale = check_scale("guidance_scale", guidance_scale)
        check_count("num_inference_steps", num_inference_steps)
        image_embeds = torch.as_tensor(image_embeds)
        image_embeds = image_embeds[None] if image_embeds.ndim == 1 else image_embeds
        if image_embeds.ndim != 2 or image_embeds.shape[1] != self.clip_dim:
            raise ValueError(f"image_embeds: expected shape (B, {self.clip_dim}) (the decoder's clip_dim), got "
                             f"{tuple(image_embeds.shape)}")
        batch = image_embeds.shape[0]
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts or ""] * batch
        prompts = list(prompts)
        if len(prompts) != batch:
            raise ValueError(f"prompts: expected {batch} captions (one per image embedding), got {len(prompts)}")
        check_finite(image_embeds, "image_embeds (the decoder's input embeddings)",
                     "the prior (or the image encoder) produced NaN / inf")
        guidance = guidance_scale > 1 and self.pipeline.unet.config.time_cond_proj_dim is None
        dtype = self.pipeline.unet.dtype
        negative = None if negative_embeds is None else torch.as_tensor(negative_embeds).to(self.device, dtype)
        embeds = ip_adapter.pipeline_image_embeds(image_embeds.to(self.device, dtype), guidance, negative)
        self.pipeline.set_progress_bar_config(disable=not progress)
        with ip_adapter.rows_as_given(self.pipeline):  # row i of the batch reads embedding i only
            return self.pipeline(prompt=prompts, ip_adapter_image_embeds=embeds, guidance_scale=guidance_scale,
                                 num_inference_steps=num_inference_steps, generator=generator, height=height,
                                 width=width, output_type="pil").images


def load_text_image_decoder(path: Union[str, os.PathLike], config: dict, device=None,
                            dtype: Optional[torch.dtype] = None, scheduler: Optional[str] = None,
                            image_scale: float = 1.0) -> TextImageDecoder:
    """The folder's pipeline + adapter (``config``: its shifted_decoder.json) on ``device`` in ``dtype``."""
    from diffusers import StableDiffusionPipeline

    from .encoders import resolve_clip_spec

    path = Path(path)
    weight_name = config.get("adapter_weights", ip_adapter.ADAPTER_WEIGHT_NAME)
    if not (path / weight_name).is_file():
        raise FileNotFoundError(f"{path}: the text+image decoder's adapter {weight_name} is missing")
    pipeline = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False, torch_dtype=dtype or torch.float32)
    state = ip_adapter.load_adapter_state(path / weight_name)
    dim = ip_adapter.check_adapter_state(state, pipeline.unet, source=str(path / weight_name))
    if dim != int(config.get("clip_dim", dim)):
        raise ValueError(f"{path}: the adapter takes embeddings of dim {dim}, shifted_decoder.json says "
                         f"{config['clip_dim']}")
    pipeline.load_ip_adapter(str(path), subfolder="", weight_name=weight_name, image_encoder_folder=None)
    pipeline.to(torch.device(device) if device is not None else torch.device("cpu"))
    folder = path.resolve()
    specs = [resolve_clip_spec(*spec, bases=[folder, *folder.parents]) for spec in config["clip_models"]]
    decoder = TextImageDecoder(pipeline, dim, specs, image_scale)
    if scheduler:
        decoder.set_scheduler(scheduler)
    return decoder
