"""The language-free decoder: a stock diffusers Stable Diffusion pipeline fed by an image-embedding projection.

One folder holds everything (written by finetune.py):
    model_index.json, unet/, vae/, scheduler/          a StableDiffusionPipeline saved with text_encoder=None
    image_projection/                                  ImageEmbeddingProjection.save_pretrained
    empty_embedding.safetensors                        the "empty" (unconditional) image embedding (D,)
    shifted_decoder.json                               the CLIP specs and file names
`load_decoder(path)` loads it; `Decoder.generate(image_embeds)` turns (B, D) embeddings into images:
prompt_embeds = projection(x0), negative_prompt_embeds = projection(empty), then the pipeline's guidance.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .files import InvalidFileError, describe, load_torch_weights, read_json, read_safetensors
from .checks import check_count, check_finite, check_scale
from .projection import PROJECTION_SUBFOLDER, ImageEmbeddingProjection

DECODER_CONFIG_NAME = "shifted_decoder.json"
EMPTY_EMBEDDING_NAME = "empty_embedding.safetensors"
EMBEDDING_KEY = "embedding"

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "dpm_sde": "DPMSolverSDEScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def save_embedding(path: str | os.PathLike, embedding: torch.Tensor) -> None:
    """Write one embedding (D,) to a .safetensors file under the key 'embedding'."""
    save_file({EMBEDDING_KEY: embedding.detach().reshape(-1).float().cpu().contiguous()}, str(path))


def load_embedding(path: str | os.PathLike) -> torch.Tensor:
    """Read one embedding (D,) from .safetensors / .pt / .pth / .npy (a (D,) or (1, D) tensor, or a one-tensor dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {path} does not exist")
    suffix = path.suffix.lower()
    what = "an embedding (D,)"
    if suffix == ".safetensors":
        value = read_safetensors(path, what)
    elif suffix == ".npy":
        try:
            value = torch.from_numpy(np.load(path, allow_pickle=False))
        except (ValueError, OSError, EOFError) as err:
            raise InvalidFileError(f"embedding file {path}: not a readable .npy array ({describe(path)}): {err}") from None
    elif suffix in (".pt", ".pth", ".bin"):
        value = load_torch_weights(path, what)
    else:
        raise ValueError(f"embedding file {path}: unknown extension {suffix!r} (use .safetensors, .pt, .pth or .npy)")
    if isinstance(value, dict):
        tensors = [v for v in value.values() if isinstance(v, torch.Tensor)]
        if EMBEDDING_KEY in value:
            tensors = [value[EMBEDDING_KEY]]
        if len(tensors) != 1:
            raise ValueError(f"embedding file {path}: expected one tensor (or the key '{EMBEDDING_KEY}'), got keys {list(value)}")
        value = tensors[0]
    value = torch.as_tensor(value).float()
    if value.ndim == 2 and value.shape[0] == 1:
        value = value[0]
    if value.ndim != 1:
        raise ValueError(f"embedding file {path}: expected one embedding of shape (D,) or (1, D), got {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        raise InvalidFileError(f"embedding file {path}: holds NaN or inf values")
    return value


def make_scheduler(name: str, config):
    """A diffusers scheduler by short name (ddim, dpm, euler, pndm, ...) built from another scheduler's config."""
    import diffusers

    key = name.lower()
    class_name = SCHEDULERS.get(key, name)
    scheduler_cls = getattr(diffusers, class_name, None)
    if scheduler_cls is None or not hasattr(scheduler_cls, "from_config"):
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)} or a diffusers class name")
    overrides = {"skip_prk_steps": True} if class_name == "PNDMScheduler" else {}  # as Stable Diffusion's own PNDM
    return scheduler_cls.from_config(config, **overrides)


def write_decoder_files(
    directory: str | os.PathLike,
    projection: ImageEmbeddingProjection,
    empty_embedding: torch.Tensor,
    clip_specs: list[tuple[str, str]],
) -> None:
    """Save the projection, the empty embedding and the CLIP specs beside a saved pipeline."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if empty_embedding.reshape(-1).shape[0] != projection.config.clip_dim:
        raise ValueError(
            f"empty embedding has dim {empty_embedding.reshape(-1).shape[0]}, the projection expects "
            f"clip_dim={projection.config.clip_dim}"
        )
    projection.save_pretrained(directory / PROJECTION_SUBFOLDER)
    save_embedding(directory / EMPTY_EMBEDDING_NAME, empty_embedding)
    from .encoders import resolve_clip_spec

    config = {  # local CLIP folders stored absolute: the decoder then loads from any working directory
        "clip_models": [list(resolve_clip_spec(*spec)) for spec in clip_specs],
        "clip_dim": int(projection.config.clip_dim),
        "projection_subfolder": PROJECTION_SUBFOLDER,
        "empty_embedding": EMPTY_EMBEDDING_NAME,
    }
    (directory / DECODER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


@dataclass
class Decoder:
    """A Stable Diffusion pipeline + projection + empty embedding: image embeddings (B, D) -> images."""

    pipeline: object  # diffusers StableDiffusionPipeline (text_encoder=None)
    projection: ImageEmbeddingProjection
    empty_embedding: torch.Tensor  # (D,)
    clip_specs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def clip_dim(self) -> int:
        return int(self.projection.config.clip_dim)

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device

    def load_clip(self, device=None, dtype=None):
        """The frozen multi-CLIP the decoder was fine-tuned with (shifted_diffusion.encoders.MultiCLIP)."""
        from .encoders import MultiCLIP

        return MultiCLIP([tuple(spec) for spec in self.clip_specs], device=device or self.device, dtype=dtype)

    def set_scheduler(self, name: str) -> None:
        """Swap the sampling scheduler (ddim, dpm, euler, pndm, ...) keeping the trained noise schedule."""
        self.pipeline.scheduler = make_scheduler(name, self.pipeline.scheduler.config)

    def _as_batch(self, embeds: torch.Tensor, batch: int, name: str) -> torch.Tensor:
        embeds = torch.as_tensor(embeds)
        if embeds.ndim == 1:
            embeds = embeds[None]
        self.projection.check_image_embeds(embeds, source=name)
        if embeds.shape[0] == 1 and batch > 1:
            embeds = embeds.expand(batch, -1)
        if embeds.shape[0] != batch:
            raise ValueError(f"{name}: expected 1 or {batch} rows (the batch of image_embeds), got {embeds.shape[0]}")
        return embeds

    @torch.no_grad()
    def prompt_embeds(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """projection(x0): (B, D) -> (B, num_tokens, cross_attention_dim) in the UNet's dtype."""
        param = next(self.projection.parameters())
        out = self.projection(image_embeds.to(device=param.device, dtype=param.dtype))
        return out.to(self.pipeline.unet.dtype)

    @torch.no_grad()
    def generate(
        self,
        image_embeds: torch.Tensor,
        *,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        negative_embeds: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        progress: bool = False,
    ) -> list:
        """Images (list of PIL) for image embeddings (B, D); negative defaults to the empty embedding.

        ``guidance_scale`` must be finite and >= 0, ``num_inference_steps`` >= 1. The embeddings, the latents
        after every sampling step and the decoded images are checked for NaN / inf: a non-finite stage raises
        FloatingPointError naming it (instead of black images)."""
        guidance_scale = check_scale("guidance_scale", guidance_scale)
        check_count("num_inference_steps", num_inference_steps)
        image_embeds = torch.as_tensor(image_embeds)
        if image_embeds.ndim == 1:
            image_embeds = image_embeds[None]
        batch = image_embeds.shape[0]
        image_embeds = self._as_batch(image_embeds, batch, "image_embeds")
        negative = self.empty_embedding if negative_embeds is None else negative_embeds
        negative = self._as_batch(negative, batch, "negative_embeds")
        check_finite(image_embeds, "image_embeds (the decoder's input embeddings)",
                     "the prior (or the image encoder) produced NaN / inf")
        check_finite(negative, "negative_embeds", "the negative embedding file or the prior's sample for '' is broken")
        prompt_embeds, negative_prompt_embeds = self.prompt_embeds(image_embeds), self.prompt_embeds(negative)
        check_finite(torch.cat([prompt_embeds, negative_prompt_embeds]), "the projected prompt embeddings",
                     "the projection's weights, or embeddings too large for the decoder's dtype")
        self.pipeline.set_progress_bar_config(disable=not progress)
        result = self.pipeline(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            generator=generator,
            height=height,
            width=width,
            output_type="pt",
            callback_on_step_end=_LatentCheck(guidance_scale, num_inference_steps),
            callback_on_step_end_tensor_inputs=["latents"],
        )
        images = result.images  # (B, 3, H, W) in [0, 1]; NaN survives the clamp
        check_finite(images, "the VAE's decoded images", "the VAE overflowed in its dtype (try float32 or bfloat16)")
        return list(self.pipeline.image_processor.numpy_to_pil(self.pipeline.image_processor.pt_to_numpy(images)))


class _LatentCheck:
    """A step-end callback of the diffusers pipeline: stop at the first step whose latents hold NaN / inf."""

    def __init__(self, guidance_scale: float, num_steps: int):
        self.guidance_scale, self.num_steps = guidance_scale, num_steps

    def __call__(self, pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        cause = (f"guidance_scale={self.guidance_scale} is too large" if self.guidance_scale > 1.0 else
                 "the UNet overflowed in its dtype (try float32 or bfloat16) or its weights hold NaN / inf")
        check_finite(callback_kwargs["latents"], f"the decoder's latents after sampling step {step + 1} of "
                     f"{self.num_steps} (timestep {int(timestep)})", cause)
        return callback_kwargs


def make_grid(rows: list[list]):
    """Paste rows of PIL images into one image (cells take the first image's size; short rows are padded)."""
    from PIL import Image

    from .data import to_rgb

    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(row) for row in rows), height * len(rows)))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(to_rgb(image).resize((width, height)), (j * width, i * height))
    return grid


def default_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """CUDA + float16 when available, else CPU + float32; explicit --device / --dtype win."""
    resolved = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from .encoders import parse_dtype

    default = torch.float16 if resolved.type == "cuda" else torch.float32
    return resolved, parse_dtype(dtype, "--dtype") if dtype else default


def read_decoder_config(path: str | os.PathLike) -> dict:
    """The decoder's shifted_decoder.json (clear error if `path` is not a fine-tuned decoder folder)."""
    config_path = Path(path) / DECODER_CONFIG_NAME
    if not config_path.is_file():
        stock = (Path(path) / "model_index.json").is_file() and (Path(path) / "text_encoder").is_dir()
        hint = (" It holds a stock text-to-image pipeline (finetune.py --decoder_type text writes these): it reads "
                "captions, not image embeddings; load it with StableDiffusionPipeline.from_pretrained, or give it as "
                "--pretrained_model_name_or_path of finetune.py --decoder_type text_and_image") if stock else ""
        raise FileNotFoundError(
            f"{path} is not a shifted-diffusion decoder folder: {DECODER_CONFIG_NAME} is missing "
            f"(write one with finetune.py).{hint}"
        )
    return read_json(config_path, "the decoder's CLIP specs, written by finetune.py")


def load_decoder(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    scheduler: str | None = None,
    image_scale: float | None = None,
) -> Decoder:
    """Load pipeline (text encoder skipped), projection, empty embedding and CLIP specs from one folder.

    A text + image decoder folder (``"decoder_type": "text_and_image"``, finetune.py --decoder_type
    text_and_image) loads as ``text_image_decoder.TextImageDecoder`` instead, its image attention weighted by
    ``image_scale`` (default 1); the language-free decoder takes no ``image_scale``. A GAN decoder folder
    (``"decoder_type": "gan"``) loads as ``gan.decoder.GanDecoder``."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    config = read_decoder_config(path)
    decoder_type = config.get("decoder_type", "image")
    if decoder_type == "text_and_image":
        from .text_image_decoder import load_text_image_decoder

        return load_text_image_decoder(path, config, device=device, dtype=dtype, scheduler=scheduler,
                                       image_scale=1.0 if image_scale is None else image_scale)
    if decoder_type == "gan":
        from .gan.decoder import load_gan_decoder

        if image_scale is not None or scheduler:
            raise ValueError(f"{'image_scale' if image_scale is not None else 'scheduler'}: {path} is a GAN decoder "
                             "(one step, no text attention, no scheduler)")
        return load_gan_decoder(path, config, device=device, dtype=dtype)
    if decoder_type != "image":
        raise ValueError(f"{path / DECODER_CONFIG_NAME}: unknown decoder_type {decoder_type!r} (expected image, "
                         f"text_and_image or gan)")
    if image_scale is not None:
        raise ValueError(f"image_scale: {path} is a language-free decoder (no text + image attention to weight)")
    dtype = dtype or torch.float32
    device = torch.device(device) if device is not None else torch.device("cpu")
    pipeline = StableDiffusionPipeline.from_pretrained(
        str(path),
        text_encoder=None,
        tokenizer=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        torch_dtype=dtype,
        use_safetensors=True,
    )
    pipeline.to(device)
    projection = ImageEmbeddingProjection.from_pretrained(
        path / config.get("projection_subfolder", PROJECTION_SUBFOLDER), torch_dtype=dtype)
    projection.to(device).eval()
    empty = load_embedding(path / config.get("empty_embedding", EMPTY_EMBEDDING_NAME))
    projection.check_image_embeds(empty[None], source=f"{path / EMPTY_EMBEDDING_NAME}")
    cross_attention_dim = pipeline.unet.config.cross_attention_dim
    if projection.config.cross_attention_dim != cross_attention_dim:
        raise ValueError(
            f"{path}: projection outputs width {projection.config.cross_attention_dim}, the UNet's "
            f"cross_attention_dim is {cross_attention_dim}"
        )
    from .encoders import resolve_clip_spec

    folder = path.resolve()  # CLIP folders stored relative to the fine-tuning run's working directory still load
    specs = [resolve_clip_spec(*spec, bases=[folder, *folder.parents]) for spec in config["clip_models"]]
    decoder = Decoder(pipeline, projection, empty.to(device), specs)
    if scheduler:
        decoder.set_scheduler(scheduler)
    return decoder
