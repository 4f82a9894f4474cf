"""Stock diffusers decoders driven by a shifted prior: Kandinsky 2.2, Stable unCLIP and Karlo.

Each of these decoders turns one CLIP image embedding into an image, so a shifted prior trained on the same
CLIP (``configs/prior_kandinsky22.yaml``, ``prior_stable_unclip_l.yaml``, ``prior_stable_unclip_h.yaml``,
``prior_karlo.yaml``) drives it without training the decoder. The recipe is two calls::

    image_embeds = prior.generate(["a red double-decker bus"], num_images_per_prompt=4)       # (4, D)
    decoder = load_unclip_decoder("kandinsky-community/kandinsky-2-2-decoder")
    images = decode_image_embeds(decoder, image_embeds, negative_image_embeds,
                                 num_inference_steps=50, guidance_scale=4.0, generator=g)

This module takes plain tensors, so it works with any prior that returns (B, D) embeddings.

What each decoder expects (as read in diffusers' pipeline code):

* ``KandinskyV22Pipeline``: raw (un-normalised) CLIP ViT-bigG-14 ``image_embeds`` (D = the UNet's
  ``encoder_hid_dim``, 1280), and a ``negative_image_embeds`` of the same shape for classifier-free guidance.
* ``StableUnCLIPImg2ImgPipeline``: raw ``image_embeds`` (D = ``image_normalizer.config.embedding_dim``: 768 for
  ViT-L-14, 1024 for ViT-H-14). The pipeline itself standardises them (``image_normalizer`` mean / std),
  adds noise at ``noise_level`` and appends a noise-level embedding (hence the UNet's
  ``projection_class_embeddings_input_dim`` = 2 D); its unconditional embedding is zeros, so it takes no negative
  embedding. A text prompt is still required by the pipeline: "" unless given.
* ``UnCLIPImageVariationPipeline`` (Karlo): raw ``image_embeddings`` (D = ``text_proj.config.clip_embeddings_dim``,
  768); its unconditional embedding is learned (inside ``text_proj``), so no negative embedding either; the image
  size is fixed by the super-resolution UNet.

``MultiCLIP.encode_image`` returns raw open_clip embeddings (not L2-normalised), so a prior trained on its cache
samples raw embeddings: they go to all three decoders unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

KANDINSKY22 = "KandinskyV22Pipeline"
STABLE_UNCLIP = "StableUnCLIPImg2ImgPipeline"
KARLO = "UnCLIPImageVariationPipeline"
SUPPORTED_KINDS = (KANDINSKY22, STABLE_UNCLIP, KARLO)
_KIND_ALIASES = {
    "kandinsky22": KANDINSKY22, "kandinsky2.2": KANDINSKY22, "kandinsky": KANDINSKY22,
    "stable_unclip": STABLE_UNCLIP, "stable-unclip": STABLE_UNCLIP,
    "karlo": KARLO,
}
_HINTS = {  # kinds that are near misses: what to load instead
    "UnCLIPPipeline": "Karlo's text-to-image pipeline runs its own prior and takes no image embedding; load the "
                      "image-variation folder instead (kakaobrain/karlo-v1-alpha-image-variations)",
    "StableUnCLIPPipeline": "the text-to-image Stable unCLIP pipeline runs its own prior; load the img2img one "
                            "(e.g. stabilityai/stable-diffusion-2-1-unclip)",
    "KandinskyV22CombinedPipeline": "load the decoder alone (e.g. kandinsky-community/kandinsky-2-2-decoder)",
}
_CONFIG_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies", "subfolder")


# ----------------------------------------------------------------------------------------------
# loading


def resolve_kind(kind: str) -> str:
    """A pipeline class name from a kind ("kandinsky22", "stable_unclip", "karlo" or a supported class name)."""
    if kind in SUPPORTED_KINDS:
        return kind
    if isinstance(kind, str) and kind.lower() in _KIND_ALIASES:
        return _KIND_ALIASES[kind.lower()]
    raise ValueError(f"kind: expected one of {list(SUPPORTED_KINDS)} or {sorted(_KIND_ALIASES)}, got {kind!r}")


def _read_model_index(path_or_hub_id: Union[str, os.PathLike], kwargs: dict) -> dict:
    """The pipeline's model_index.json as a dict (a local folder's file, else diffusers' hub lookup)."""
    local = Path(path_or_hub_id)
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"decoder folder {local}: no model_index.json (expected a diffusers pipeline "
                                    f"folder saved by save_pretrained, one of {list(SUPPORTED_KINDS)})")
        try:
            return json.loads(index.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{index}: not valid JSON ({err})") from None
    from diffusers import DiffusionPipeline

    config_kwargs = {k: kwargs[k] for k in _CONFIG_KWARGS if k in kwargs}
    return dict(DiffusionPipeline.load_config(str(path_or_hub_id), **config_kwargs))


def detect_kind(model_index: dict, where: str = "model_index.json") -> str:
    """The supported pipeline class named by a model_index.json's ``_class_name``; ValueError otherwise."""
    found = model_index.get("_class_name") if isinstance(model_index, dict) else None
    if found in SUPPORTED_KINDS:
        return found
    hint = f" ({_HINTS[found]})" if found in _HINTS else ""
    raise ValueError(f"{where}: _class_name is {found!r}, which is not an image-embedding decoder this module "
                     f"drives; supported: {list(SUPPORTED_KINDS)}{hint}")


def load_unclip_decoder(path_or_hub_id: Union[str, os.PathLike], kind: Optional[str] = None,
                        **from_pretrained_kwargs: Any):
    """Load a stock diffusers decoder that takes CLIP image embeddings.

    ``kind``: None detects it from the folder's / hub repo's model_index.json ``_class_name``; else one of
    ``SUPPORTED_KINDS`` or an alias ("kandinsky22", "stable_unclip", "karlo"). Keyword arguments go to
    ``from_pretrained`` (``torch_dtype``, ``variant``, ``revision``, ...); ``use_safetensors`` defaults to True
    so no pickled weights are read (pass ``use_safetensors=False`` to allow them).
    """
    import diffusers

    kwargs = dict(from_pretrained_kwargs)
    kwargs.setdefault("use_safetensors", True)
    if kind is None:
        kind = detect_kind(_read_model_index(path_or_hub_id, kwargs), f"{path_or_hub_id}/model_index.json")
    else:
        kind = resolve_kind(kind)
    if kind == KARLO:
        return _load_karlo(path_or_hub_id, kwargs)
    pipeline_class = getattr(diffusers, kind)
    return pipeline_class.from_pretrained(str(path_or_hub_id), **kwargs)


_MODEL_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies", "variant",
                 "use_safetensors")


def _karlo_component(path_or_hub_id, name: str, library: str, class_name: str, kwargs: dict):
    """One component of Karlo's folder from its subfolder (model classes get the dtype / safetensors settings)."""
    import diffusers
    import transformers
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    if class_name == UnCLIPTextProjModel.__name__:
        cls = UnCLIPTextProjModel
    else:
        module = {"diffusers": diffusers, "transformers": transformers}.get(library)
        cls = getattr(module, class_name, None) if module is not None else None
        if cls is None:
            raise ValueError(f"{path_or_hub_id}/model_index.json: component {name!r} is [{library!r}, "
                             f"{class_name!r}], not a diffusers / transformers class")
    is_model = isinstance(cls, type) and issubclass(cls, (diffusers.ModelMixin, transformers.PreTrainedModel))
    load_kwargs = {k: kwargs[k] for k in _MODEL_KWARGS if k in kwargs and (is_model or k not in
                                                                          ("variant", "use_safetensors"))}
    subfolder = f"{kwargs['subfolder']}/{name}" if kwargs.get("subfolder") else name
    component = cls.from_pretrained(str(path_or_hub_id), subfolder=subfolder, **load_kwargs)
    if is_model and kwargs.get("torch_dtype") is not None:
        component = component.to(kwargs["torch_dtype"])
    return component


def _load_karlo(path_or_hub_id, kwargs: dict):
    """UnCLIPImageVariationPipeline built from its components.

    diffusers' pipeline loader cannot resolve Karlo's text_proj (its class lives in the deprecated unclip
    package, named ["unclip" | "diffusers", "UnCLIPTextProjModel"] in model_index.json), so each component is
    loaded from its own subfolder and the pipeline is constructed from them; components given in ``kwargs``
    (e.g. ``text_proj=...``) are used as they are.
    """
    import inspect

    from diffusers import UnCLIPImageVariationPipeline

    index = _read_model_index(path_or_hub_id, kwargs)
    names = [n for n in inspect.signature(UnCLIPImageVariationPipeline.__init__).parameters if n != "self"]
    components = {}
    for name in names:
        if name in kwargs:
            components[name] = kwargs[name]
            continue
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            raise ValueError(f"{path_or_hub_id}/model_index.json: expected component {name!r} as [library, class], "
                             f"got {entry!r}")
        components[name] = _karlo_component(path_or_hub_id, name, entry[0], entry[1], kwargs)
    return UnCLIPImageVariationPipeline(**components)


# ----------------------------------------------------------------------------------------------
# dims


def decoder_kind(decoder) -> str:
    """The supported pipeline class name of a loaded decoder; TypeError for anything else."""
    name = type(decoder).__name__
    if name not in SUPPORTED_KINDS:
        raise TypeError(f"decoder: expected one of {list(SUPPORTED_KINDS)} (see load_unclip_decoder), "
                        f"got {name}")
    return name


def expected_embedding_dim(decoder) -> int:
    """The image-embedding dim the decoder's config expects.

    Kandinsky 2.2: ``unet.config.encoder_hid_dim`` (its image_proj and image addition embedding read it).
    Stable unCLIP: ``image_normalizer.config.embedding_dim``, cross-checked against the UNet's
    ``projection_class_embeddings_input_dim`` (= 2 D: embedding + noise-level embedding). Karlo:
    ``text_proj.config.clip_embeddings_dim``.
    """
    kind = decoder_kind(decoder)
    if kind == KANDINSKY22:
        return int(decoder.unet.config.encoder_hid_dim)
    if kind == STABLE_UNCLIP:
        dim = int(decoder.image_normalizer.config.embedding_dim)
        projection_in = decoder.unet.config.projection_class_embeddings_input_dim
        if projection_in is not None and int(projection_in) != 2 * dim:
            raise ValueError(f"decoder: image_normalizer embedding_dim {dim} does not fit the UNet's "
                             f"projection_class_embeddings_input_dim {projection_in} (expected 2 x {dim})")
        return dim
    return int(decoder.text_proj.config.clip_embeddings_dim)


def check_embedding_dim(prior_dim: int, decoder) -> None:
    """ValueError when a prior's embedding dim differs from the decoder's (naming both and the config to use)."""
    expected = expected_embedding_dim(decoder)
    if int(prior_dim) != expected:
        raise ValueError(
            f"image_embeds: the prior's embedding dim is {int(prior_dim)} but this {type(decoder).__name__} expects "
            f"{expected}; train the prior on the decoder's own CLIP (one CLIP in --clip_models, e.g. "
            "configs/prior_kandinsky22.yaml, prior_stable_unclip_l.yaml, prior_stable_unclip_h.yaml, "
            "prior_karlo.yaml)")


def _as_embeds(name: str, value: Any, decoder, batch: Optional[int] = None) -> torch.Tensor:
    """A (B, D) finite tensor of the decoder's dim, on the decoder's device and dtype."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a (B, D) torch.Tensor, got {type(value).__name__}")
    if value.ndim != 2 or value.shape[0] == 0:
        raise ValueError(f"{name}: expected a (B, D) tensor with B >= 1, got shape {tuple(value.shape)}")
    if batch is not None and value.shape[0] != batch:
        raise ValueError(f"{name}: expected {batch} rows (one per image_embeds row), got shape {tuple(value.shape)}")
    check_embedding_dim(value.shape[-1], decoder)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    dtype = _decoder_dtype(decoder)
    return value.to(device=decoder.device, dtype=dtype)


def _decoder_dtype(decoder) -> torch.dtype:
    """The dtype of the network that consumes the embedding."""
    net = decoder.decoder if decoder_kind(decoder) == KARLO else decoder.unet
    return net.dtype


# ----------------------------------------------------------------------------------------------
# decoding


def _call_kandinsky(decoder, embeds, negative, common: dict, extra: dict):
    """KandinskyV22Pipeline: image_embeds + negative_image_embeds (required when guidance_scale > 1)."""
    if negative is None:
        if common["guidance_scale"] > 1.0:
            raise ValueError("negative_image_embeds: KandinskyV22Pipeline needs one (B, D) negative embedding per "
                             "row for guidance_scale > 1, e.g. the prior's sample for the empty caption "
                             "(prior.generate([''] * B)); got None")
        negative = torch.zeros_like(embeds)  # required by the signature, unused without guidance
    return decoder(image_embeds=embeds, negative_image_embeds=negative, **common, **extra).images


def _call_stable_unclip(decoder, embeds, prompt, noise_level: int, common: dict, extra: dict):
    """StableUnCLIPImg2ImgPipeline: image_embeds + one prompt per row ("" by default), no image."""
    batch = embeds.shape[0]
    prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
    if len(prompts) != batch:
        raise ValueError(f"prompt: expected a string or {batch} strings (one per image_embeds row), got {len(prompts)}")
    return decoder(image=None, prompt=prompts, image_embeds=embeds, noise_level=int(noise_level),
                   **common, **extra).images


def _call_karlo(decoder, embeds, common: dict, extra: dict):
    """UnCLIPImageVariationPipeline: image_embeddings; size fixed by super_res_first.config.sample_size."""
    size = int(decoder.super_res_first.config.sample_size)
    for name in ("height", "width"):
        value = common.pop(name)
        if value is not None and int(value) != size:
            raise ValueError(f"{name}: Karlo's decoder makes {size} x {size} images (super_res_first sample_size); "
                             f"got {name}={value} (pass None)")
    return decoder(image_embeddings=embeds, decoder_num_inference_steps=common["num_inference_steps"],
                   decoder_guidance_scale=common["guidance_scale"], generator=common["generator"],
                   output_type=common["output_type"], **extra).images


def decode_image_embeds(
    decoder,
    image_embeds: torch.Tensor,
    negative_image_embeds: Optional[torch.Tensor] = None,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    generator: Optional[torch.Generator] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    output_type: str = "pil",
    prompt: Union[str, Sequence[str]] = "",
    noise_level: int = 0,
    **pipeline_kwargs: Any,
):
    """(B, D) prior samples -> B images through the stock pipeline's own call.

    ``negative_image_embeds``: Kandinsky 2.2 only (its guidance needs one, e.g. the prior's sample for "");
    Stable unCLIP and Karlo have built-in unconditional embeddings and refuse one. ``height`` / ``width``: None =
    the pipeline's default (Karlo's size is fixed). ``prompt`` / ``noise_level``: Stable unCLIP only (text prompt
    beside the embedding, "" by default; embedding noise augmentation, 0 = least). Other keyword arguments go to
    the pipeline (e.g. ``super_res_num_inference_steps`` for Karlo). Returns the pipeline's ``images``
    (PIL list, or an array / tensor for output_type "np" / "pt").
    """
    kind = decoder_kind(decoder)
    embeds = _as_embeds("image_embeds", image_embeds, decoder)
    if negative_image_embeds is not None:
        if kind != KANDINSKY22:
            raise ValueError(f"negative_image_embeds: {kind} uses its own unconditional embedding "
                             "(zeros for Stable unCLIP, a learned one for Karlo) and takes none; pass None")
        negative_image_embeds = _as_embeds("negative_image_embeds", negative_image_embeds, decoder, embeds.shape[0])
    if kind != STABLE_UNCLIP and (prompt != "" or noise_level != 0):
        raise ValueError(f"prompt / noise_level: only StableUnCLIPImg2ImgPipeline takes them, not {kind}")
    common = {"num_inference_steps": int(num_inference_steps), "guidance_scale": float(guidance_scale),
              "generator": generator, "height": height, "width": width, "output_type": output_type}
    if kind == KANDINSKY22:
        common = {k: v for k, v in common.items() if v is not None or k not in ("height", "width")}
        return _call_kandinsky(decoder, embeds, negative_image_embeds, common, pipeline_kwargs)
    if kind == STABLE_UNCLIP:
        return _call_stable_unclip(decoder, embeds, prompt, noise_level, common, pipeline_kwargs)
    return _call_karlo(decoder, embeds, common, pipeline_kwargs)
