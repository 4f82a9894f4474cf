"""Generation with the GAN decoder (``finetune.py --decoder_type gan``): image embeddings -> images in one forward
pass.

``load_gan_decoder(folder, config)`` reads ``generator/`` and the folder's ``shifted_decoder.json``;
``GanDecoder.generate`` has the other decoders' call. A GAN has no classifier-free guidance and no sampling steps:
``guidance_scale`` and ``num_inference_steps`` are accepted for the common call and have no effect; its knob is
``truncation_psi`` (towards the average style: 1 = none). Each row's latent z comes from its own generator when a list
is given (the same image for the same seed whatever the batch), and the noise inputs are the trained constants.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .networks import Generator

__all__ = ["GanDecoder", "load_gan_decoder"]


class GanDecoder:
    """A trained ``Generator`` + the CLIP specs of its embeddings; ``generate(image_embeds) -> PIL images``."""

    takes_negative = False  # no guidance: no negative embedding
    empty_embedding = None

    def __init__(self, generator: Generator, clip_specs: Sequence, truncation_psi: float = 1.0):
        self.generator, self.clip_specs = generator, [tuple(s) for s in clip_specs]
        self.truncation_psi = float(truncation_psi)

    @property
    def clip_dim(self) -> int:
        return int(self.generator.config.clip_dim)

    @property
    def resolution(self) -> int:
        return int(self.generator.config.resolution)

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def load_clip(self, device=None, dtype=None):
        from ..encoders import MultiCLIP

        return MultiCLIP(self.clip_specs, device=device or self.device, dtype=dtype)

    def set_scheduler(self, name: str) -> None:
        raise ValueError(f"--scheduler {name}: the GAN decoder generates in one step (it has no scheduler)")

    def latents(self, batch: int, generator: Union[None, torch.Generator, Sequence[torch.Generator]]) -> torch.Tensor:
        """z (B, z_dim) on the decoder's device: row i from generator[i] when a list is given."""
        z_dim = self.generator.config.z_dim
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise ValueError(f"generator: expected {batch} generators (one per image embedding), got "
                                 f"{len(generator)}")
            rows = [torch.randn(z_dim, generator=g, device=g.device) for g in generator]
            return torch.stack(rows).to(self.device)
        device = generator.device if generator is not None else self.device
        return torch.randn(batch, z_dim, generator=generator, device=device).to(self.device)

    @torch.no_grad()
    def generate(self, image_embeds: torch.Tensor, *, guidance_scale: float = 1.0,
                 num_inference_steps: Optional[int] = None, negative_embeds: Optional[torch.Tensor] = None,
                 generator=None, height: Optional[int] = None, width: Optional[int] = None,
                 truncation_psi: Optional[float] = None, progress: bool = False) -> list:
        """PIL images for image embeddings (B, D); ``height`` / ``width`` must be the generator's resolution (or
        None); ``guidance_scale``, ``num_inference_steps`` and ``negative_embeds`` have no effect (no guidance)."""
        from ..checks import check_finite

        for name, value in (("height", height), ("width", width)):
            if value is not None and int(value) != self.resolution:
                raise ValueError(f"{name}: the GAN decoder makes {self.resolution} x {self.resolution} images "
                                 f"(its resolution), got {value}")
        image_embeds = torch.as_tensor(image_embeds)
        image_embeds = image_embeds[None] if image_embeds.ndim == 1 else image_embeds
        if image_embeds.ndim != 2 or image_embeds.shape[1] != self.clip_dim:
            raise ValueError(f"image_embeds: expected shape (B, {self.clip_dim}) (the decoder's clip_dim), got "
                             f"{tuple(image_embeds.shape)}")
        check_finite(image_embeds, "image_embeds (the decoder's input embeddings)",
                     "the prior (or the image encoder) produced NaN / inf")
        psi = self.truncation_psi if truncation_psi is None else float(truncation_psi)
        dtype = next(self.generator.parameters()).dtype
        z = self.latents(image_embeds.shape[0], generator).to(dtype)
        images = self.generator(z, image_embeds.to(self.device), truncation_psi=psi, noise_mode="const")
        check_finite(images, "the generated images", "the generator's weights are broken")
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        from PIL import Image

        return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def load_gan_decoder(path: Union[str, os.PathLike], config: dict, device=None,
                     dtype: Optional[torch.dtype] = None) -> GanDecoder:
    """The folder's generator (safetensors only) on ``device``; ``config``: its shifted_decoder.json."""
    from ..encoders import resolve_clip_spec

    path = Path(path)
    subfolder = path / config.get("generator_subfolder", "generator")
    if not subfolder.is_dir():
        raise FileNotFoundError(f"{path}: the GAN decoder's generator folder {subfolder.name}/ is missing")
    generator = Generator.from_pretrained(str(subfolder), use_safetensors=True, torch_dtype=dtype or torch.float32)
    if int(generator.config.clip_dim) != int(config.get("clip_dim", generator.config.clip_dim)):
        raise ValueError(f"{path}: the generator takes embeddings of dim {generator.config.clip_dim}, "
                         f"shifted_decoder.json says {config['clip_dim']}")
    generator.to(torch.device(device) if device is not None else torch.device("cpu")).eval()
    folder = path.resolve()
    specs = [resolve_clip_spec(*spec, bases=[folder, *folder.parents]) for spec in config["clip_models"]]
    return GanDecoder(generator, specs, config.get("truncation_psi", 1.0))
