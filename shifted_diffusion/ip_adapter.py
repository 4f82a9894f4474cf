"""A text + image decoder: IP-Adapter's decoupled cross-attention driven by our multi-CLIP image embedding.

Stable Diffusion keeps its text cross-attention; each cross-attention layer i gets a second key / value
projection (``to_k_ip`` / ``to_v_ip``, Linear C -> hidden_size without bias, initialised from the layer's text
``to_k`` / ``to_v``) that attends to ``NUM_TOKENS`` image tokens, added with weight ``scale``:
    tokens = LayerNorm_C( reshape( Linear_{D -> N*C}(x0), (N, C) ) )                 (the image projection)
    out_i  = Attn(q, K_text, V_text) + scale * Attn(q, to_k_ip(tokens), to_v_ip(tokens)).

Shapes. D is our embedding: the concatenation of the CLIP image embeddings of every model of the decoder
(e.g. 3 x 512 = 1536), where IP-Adapter uses one vision tower's projected embedding; diffusers only reads D
from ``proj.weight``'s second dimension, so any D loads. N must be 4: diffusers' plain IP-Adapter loader
fixes ``num_image_text_embeds = 4`` and reads C = ``proj.weight.shape[0] // 4``; C is the UNet's
``cross_attention_dim``.

File layout (``ADAPTER_WEIGHT_NAME``, safetensors), the one stock ``pipe.load_ip_adapter(folder, subfolder="",
weight_name="ip_adapter.safetensors", image_encoder_folder=None)`` reads:
    image_proj.proj.weight (N*C, D), image_proj.proj.bias (N*C,), image_proj.norm.weight (C,), .bias (C,)
    ip_adapter.{2k+1}.to_k_ip.weight, ip_adapter.{2k+1}.to_v_ip.weight (hidden_size_k, C)
for the k-th cross-attention processor in ``unet.attn_processors`` order (diffusers numbers the attention
processors 0, 1, 2, ... with the self-attentions on the even numbers; only the odd, cross-attention ones
carry weights).

Calling a loaded pipeline: ``ip_adapter_image_embeds`` is a list with one tensor per adapter (here one) of
shape (B, 1, D) (one image per prompt); with classifier-free guidance (guidance_scale > 1) the pipeline
splits it with ``chunk(2)`` into (negative, positive), so pass ``torch.cat([negative, positive])`` of shape
(2B, 1, D): ``pipeline_image_embeds`` builds it. The negative is the zero embedding (what the trainer's image
dropout feeds, and what diffusers' own ``encode_image`` uses for this projection).

One embedding per prompt needs ``rows_as_given``: stock StableDiffusionPipeline repeats the given embeds
``batch_size * num_images_per_prompt`` times (diffusers issue #9813, open), which is right for one embedding shared
by every prompt but, for B different ones, gives B^2 rows that the attention processor folds into B x (B*N)
tokens without an error: every image then attends to every row's image tokens. A stock call with B > 1 different
embeddings therefore mixes them; one prompt per call, or the context, avoids it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

import torch

ADAPTER_WEIGHT_NAME = "ip_adapter.safetensors"
NUM_TOKENS = 4  # fixed by diffusers' loader for the plain IP-Adapter image projection
_PROJ_KEYS = ("image_proj.proj.weight", "image_proj.proj.bias", "image_proj.norm.weight", "image_proj.norm.bias")


def cross_attention_processors(unet) -> list[str]:
    """Names of the UNet's cross-attention processors, in the order diffusers' loader numbers them."""
    return [name for name in unet.attn_processors
            if not name.endswith("attn1.processor") and "motion_modules" not in name]


def _attention_module(unet, processor_name: str):
    return unet.get_submodule(processor_name[: -len(".processor")])


def init_adapter_state(unet, clip_dim: int, num_tokens: int = NUM_TOKENS,
                       generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
    """A new adapter in the file layout: a random image projection (PyTorch's Linear initialisation, from
    ``generator``), LayerNorm (1, 0), and every to_k_ip / to_v_ip a copy of its layer's text to_k / to_v."""
    if num_tokens != NUM_TOKENS:
        raise ValueError(f"num_tokens: diffusers' IP-Adapter loader reads exactly {NUM_TOKENS} image tokens, got "
                         f"{num_tokens}")
    if clip_dim <= 0:
        raise ValueError(f"clip_dim: expected a positive embedding size, got {clip_dim}")
    width = unet.config.cross_attention_dim
    bound = clip_dim ** -0.5  # nn.Linear's default uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
    uniform = lambda *shape: (torch.rand(*shape, generator=generator) * 2 - 1) * bound  # noqa: E731
    state = {
        "image_proj.proj.weight": uniform(num_tokens * width, clip_dim),
        "image_proj.proj.bias": uniform(num_tokens * width),
        "image_proj.norm.weight": torch.ones(width),
        "image_proj.norm.bias": torch.zeros(width),
    }
    for k, name in enumerate(cross_attention_processors(unet)):
        attn = _attention_module(unet, name)
        state[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = attn.to_k.weight.detach().float().cpu().clone()
        state[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = attn.to_v.weight.detach().float().cpu().clone()
    return state


def check_adapter_state(state: dict[str, torch.Tensor], unet, source: str = "adapter") -> int:
    """Raise ValueError naming the first key missing or mis-shaped for ``unet``; returns D."""
    missing = [key for key in _PROJ_KEYS if key not in state]
    if missing:
        raise ValueError(f"{source}: missing image projection weights {missing}")
    width = unet.config.cross_attention_dim
    weight = state["image_proj.proj.weight"]
    if weight.ndim != 2 or weight.shape[0] != NUM_TOKENS * width:
        raise ValueError(f"{source}: image_proj.proj.weight has shape {tuple(weight.shape)}; expected "
                         f"({NUM_TOKENS} x cross_attention_dim {width} = {NUM_TOKENS * width}, D)")
    for key, shape in (("image_proj.proj.bias", (NUM_TOKENS * width,)), ("image_proj.norm.weight", (width,)),
                       ("image_proj.norm.bias", (width,))):
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected {shape}")
    names = cross_attention_processors(unet)
    expected = set(_PROJ_KEYS)
    for k, name in enumerate(names):
        attn = _attention_module(unet, name)
        for which, text in (("to_k_ip", attn.to_k), ("to_v_ip", attn.to_v)):
            key = f"ip_adapter.{2 * k + 1}.{which}.weight"
            expected.add(key)
            if key not in state:
                raise ValueError(f"{source}: missing {key} (cross-attention processor {name}; the UNet has "
                                 f"{len(names)} of them)")
            if tuple(state[key].shape) != tuple(text.weight.shape):
                raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected "
                                 f"{tuple(text.weight.shape)} (the text {which[:4]} of {name})")
    extra = sorted(set(state) - expected)
    if extra:
        raise ValueError(f"{source}: unexpected keys {extra[:4]} (an adapter for another UNet?)")
    return weight.shape[1]


def save_adapter(state: dict[str, torch.Tensor], folder: str | os.PathLike,
                 weight_name: str = ADAPTER_WEIGHT_NAME) -> Path:
    """Write ``state`` (file layout) as fp32 safetensors ``folder/weight_name``; returns the file."""
    from safetensors.torch import save_file

    path = Path(folder) / weight_name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(path))
    return path


def load_adapter_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter file (safetensors, no pickle) as a state dict in the file layout."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter weights {path} not found")
    return load_file(str(path))


def attach_adapter(unet, state: dict[str, torch.Tensor]) -> None:
    """Install the adapter into a bare UNet exactly as stock ``load_ip_adapter`` does (same conversion, same
    diffusers processors), e.g. to train it: afterwards ``adapter_parameters(unet)`` are its weights."""
    check_adapter_state(state, unet)
    split = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        head, rest = key.split(".", 1)
        split[head][rest] = value
    unet._load_ip_adapter_weights([split], low_cpu_mem_usage=False)


def adapter_parameters(unet) -> list[torch.nn.Parameter]:
    """The attached adapter's trainable tensors: the image projection and every to_k_ip / to_v_ip."""
    if getattr(unet, "encoder_hid_proj", None) is None or unet.config.encoder_hid_dim_type != "ip_image_proj":
        raise ValueError("the UNet has no IP-Adapter attached (attach_adapter or load_ip_adapter first)")
    return [p for name, p in unet.named_parameters()
            if name.startswith("encoder_hid_proj.") or ".to_k_ip." in name or ".to_v_ip." in name]


def adapter_module(unet) -> torch.nn.Module:
    """The attached adapter as one module whose weights are the UNet's own (shared, not copied): the image
    projection and each cross-attention processor (its to_k_ip / to_v_ip), in ``cross_attention_processors``
    order. What a checkpoint of a frozen UNet stores instead of the whole UNet."""
    adapter_parameters(unet)  # raises when none is attached
    processors = unet.attn_processors
    return torch.nn.ModuleDict({"image_proj": unet.encoder_hid_proj, "processors": torch.nn.ModuleList(
        [processors[name] for name in cross_attention_processors(unet)])})


def adapter_state_from_unet(unet) -> dict[str, torch.Tensor]:
    """The attached adapter (one IP-Adapter) back in the file layout."""
    adapter_parameters(unet)  # raises when none is attached
    layers = unet.encoder_hid_proj.image_projection_layers
    if len(layers) != 1:
        raise ValueError(f"expected one IP-Adapter attached, found {len(layers)}")
    proj = layers[0]
    state = {"image_proj.proj.weight": proj.image_embeds.weight, "image_proj.proj.bias": proj.image_embeds.bias,
             "image_proj.norm.weight": proj.norm.weight, "image_proj.norm.bias": proj.norm.bias}
    processors = unet.attn_processors
    for k, name in enumerate(cross_attention_processors(unet)):
        state[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = processors[name].to_k_ip[0].weight
        state[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = processors[name].to_v_ip[0].weight
    return {k: v.detach().float().cpu().clone() for k, v in state.items()}


def pipeline_image_embeds(image_embeds: torch.Tensor, guidance: bool,
                          negative: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """``ip_adapter_image_embeds`` for StableDiffusionPipeline: [(B, 1, D)], or with classifier-free guidance
    [cat(negative, positive)] of shape (2B, 1, D); ``negative`` (B or 1, D) defaults to zeros."""
    if image_embeds.ndim != 2:
        raise ValueError(f"image_embeds: expected shape (B, D), got {tuple(image_embeds.shape)}")
    positive = image_embeds[:, None]  # (B, 1, D)
    if not guidance:
        return [positive]
    if negative is None:
        negative = torch.zeros_like(image_embeds)
    negative = negative.reshape(-1, image_embeds.shape[1]).to(image_embeds).expand_as(image_embeds)
    return [torch.cat([negative[:, None], positive])]  # (2B, 1, D)


@contextlib.contextmanager
def rows_as_given(pipeline):
    """Within the context ``pipeline(..., ip_adapter_image_embeds=[e])`` uses ``e`` as given, one row per image of
    the batch (with guidance: the negatives' rows first, as ``pipeline_image_embeds`` builds them), instead of
    repeating it for every prompt (see the module docstring)."""
    def as_given(ip_adapter_image, ip_adapter_image_embeds, device, num_images_per_prompt,
                 do_classifier_free_guidance):
        if ip_adapter_image_embeds is None:
            raise ValueError("rows_as_given: pass ip_adapter_image_embeds (one row per image), not ip_adapter_image")
        return [embeds.to(device) for embeds in ip_adapter_image_embeds]

    pipeline.prepare_ip_adapter_image_embeds = as_given  # an instance attribute shadows the method
    try:
        yield pipeline
    finally:
        del pipeline.prepare_ip_adapter_image_embeds


def detach_adapter(unet) -> dict[str, torch.Tensor]:
    """Remove the attached adapter (as stock ``unload_ip_adapter`` does: no image projection, the default
    attention processors back) and return it in the file layout; the UNet then saves as a stock one."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    state = adapter_state_from_unet(unet)
    unet.encoder_hid_proj = None
    unet.config.encoder_hid_dim_type = None
    unet.set_attn_processor({name: AttnProcessor2_0() if isinstance(proc, IPAdapterAttnProcessor2_0)
                             else proc.__class__() for name, proc in unet.attn_processors.items()})
    return state
