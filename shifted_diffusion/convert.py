"""Convert checkpoints of the original ClipPrior (x_transformers 0.28.4 trunk) to ShiftedPrior.

Key mapping (original -> ours), i = block index:
    t5_proj.{0,3}.gamma                   -> t5_proj.{0,3}.weight        (the zero `beta` buffers are dropped)
    {clip_sentence_proj,x_proj}.2.gamma   -> {...}.2.weight
    transformer.layers.{2i}.0.0.g         -> blocks.{i}.attn_norm.weight
    transformer.layers.{2i}.1.to_{q,k,v}  -> blocks.{i}.attn.to_qkv.weight   (rows concatenated [q | k | v])
    transformer.layers.{2i}.1.to_out      -> blocks.{i}.attn.to_out.weight
    transformer.layers.{2i+1}.0.0.g       -> blocks.{i}.ff_norm.weight
    transformer.layers.{2i+1}.1.net.0.proj -> blocks.{i}.ff.proj_in
    transformer.layers.{2i+1}.1.net.3     -> blocks.{i}.ff.proj_out
    everything else (linears, final_emb) keeps its name; `vocab.*` (the original's learnable vocab)
    is not part of the network and is dropped.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import Tensor

from .files import load_torch_weights, read_safetensors, sniff
from .prior import PriorConfig, ShiftedPrior

__all__ = [
    "unwrap_original_state_dict",
    "infer_config_from_original",
    "convert_original_state_dict",
    "load_original_checkpoint",
]

_LAYER_KEY = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")
_LN_GAMMA = re.compile(r"^(t5_proj\.[03]|clip_sentence_proj\.2|x_proj\.2)\.gamma$")
_LN_BETA = re.compile(r"^(t5_proj\.[03]|clip_sentence_proj\.2|x_proj\.2)\.beta$")
_ATTN_PARTS = {"0.0.g": "attn_norm.weight", "1.to_out.weight": "attn.to_out.weight"}
_FF_PARTS = {
    "0.0.g": "ff_norm.weight",
    "1.net.0.proj.weight": "ff.proj_in.weight",
    "1.net.0.proj.bias": "ff.proj_in.bias",
    "1.net.3.weight": "ff.proj_out.weight",
    "1.net.3.bias": "ff.proj_out.bias",
}
_PLAIN = re.compile(
    r"^(t5_proj\.[14]|clip_sentence_proj\.[03]|x_proj\.[03]|time_embed\.[02]|pos_embed\.[02]|out_proj\.[02])"
    r"\.(weight|bias)$|^final_emb$"
)


def unwrap_original_state_dict(obj: Mapping[str, Any]) -> Dict[str, Tensor]:
    """Strip {"state_dict": ...} / {"model": ...} wrappers and DDP "module." prefixes."""
    sd: Any = obj
    while isinstance(sd, Mapping) and not any(isinstance(v, Tensor) for v in sd.values()):
        for wrapper in ("state_dict", "model", "module"):
            if wrapper in sd and isinstance(sd[wrapper], Mapping):
                sd = sd[wrapper]
                break
        else:
            raise ValueError(
                f"original checkpoint: no tensors found; top-level keys {sorted(map(str, sd))[:20]}"
            )
    if not isinstance(sd, Mapping):
        raise TypeError(f"original checkpoint: expected a state dict, got {type(sd).__name__}")
    out = {}
    for key, value in sd.items():
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


def _count_blocks(sd: Mapping[str, Tensor]) -> int:
    layer_ids = {int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))}
    if not layer_ids:
        raise ValueError("original state dict: no 'transformer.layers.*' keys found")
    n = max(layer_ids) + 1
    if n % 2 or layer_ids != set(range(n)):
        raise ValueError(f"original state dict: expected alternating attention/feed-forward layers 0..2*depth-1, "
                         f"got layer indices {sorted(layer_ids)}")
    return n // 2


def infer_config_from_original(
    sd: Mapping[str, Tensor],
    *,
    text_len: int = 80,
    vocab_size: int = 1024,
    dim_head: int = 64,
) -> PriorConfig:
    """PriorConfig from tensor shapes. text_len (no positional embedding), dim_head (x_transformers'
    default 64) and the vocab size (the cluster token is a sinusoid, not a table) are not stored in the
    weights; `vocab_size` is used when the checkpoint has a `pos_embed` (else None = baseline)."""
    sd = unwrap_original_state_dict(sd)
    for required in ("time_embed.0.weight", "t5_proj.0.gamma", "x_proj.0.weight", "out_proj.2.weight",
                     "transformer.layers.0.1.to_q.weight"):
        if required not in sd:
            raise ValueError(f"original state dict: missing key {required!r} (is this a ClipPrior checkpoint?)")
    width = sd["time_embed.0.weight"].shape[0]
    clip_dim = sd["x_proj.0.weight"].shape[1]
    out_dim = sd["out_proj.2.weight"].shape[0]
    if out_dim != clip_dim:
        raise ValueError(
            f"original state dict: out_proj outputs {out_dim} values for clip_dim {clip_dim} "
            "(a learn_sigma checkpoint?); only x0 prediction (out dim == clip dim) is supported"
        )
    inner = sd["transformer.layers.0.1.to_q.weight"].shape[0]
    if inner % dim_head:
        raise ValueError(f"original state dict: attention inner width {inner} is not a multiple of dim_head {dim_head}")
    has_vocab = "pos_embed.0.weight" in sd
    if has_vocab and "vocab.mean.weight" in sd:  # learnable vocab: its table gives the size
        vocab_size = int(sd["vocab.mean.weight"].shape[0])
    return PriorConfig(
        width=int(width),
        depth=_count_blocks(sd),
        heads=int(inner // dim_head),
        dim_head=dim_head,
        clip_dim=int(clip_dim),
        text_dim=int(sd["t5_proj.0.gamma"].shape[0]),
        text_len=text_len,
        vocab_size=vocab_size if has_vocab else None,
    )


def convert_original_state_dict(sd: Mapping[str, Any]) -> Dict[str, Tensor]:
    """Rename/fuse the original ClipPrior state dict into ShiftedPrior's (see module docstring)."""
    sd = unwrap_original_state_dict(sd)
    out: Dict[str, Tensor] = {}
    qkv: Dict[int, Dict[str, Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        if key.startswith("vocab."):
            continue
        if _LN_BETA.match(key):
            if not value.is_meta and torch.count_nonzero(value):
                raise ValueError(f"original state dict: LayerNorm bias {key!r} is not zero; "
                                 "ShiftedPrior's LayerNorms have no bias")
            continue
        if m := _LN_GAMMA.match(key):
            out[f"{m.group(1)}.weight"] = value
            continue
        if _PLAIN.match(key):
            out[key] = value
            continue
        m = _LAYER_KEY.match(key)
        if m:
            layer, rest = int(m.group(1)), m.group(2)
            block, is_ff = divmod(layer, 2)
            if not is_ff and (q := re.match(r"^1\.to_([qkv])\.weight$", rest)):
                qkv.setdefault(block, {})[q.group(1)] = value
                continue
            table = _FF_PARTS if is_ff else _ATTN_PARTS
            if rest in table:
                out[f"blocks.{block}.{table[rest]}"] = value
                continue
        unknown.append(key)
    if unknown:
        raise ValueError(f"original state dict: unexpected keys {unknown[:20]}" + (" ..." if len(unknown) > 20 else ""))
    for block, parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise ValueError(f"original state dict: block {block} lacks attention weights to_{missing}")
        out[f"blocks.{block}.attn.to_qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def load_original_checkpoint(
    path: Union[str, os.PathLike],
    *,
    text_len: int = 80,
    vocab_size: int = 1024,
    dim_head: int = 64,
    map_location: Union[str, torch.device] = "cpu",
    config: Optional[PriorConfig] = None,
) -> ShiftedPrior:
    """ShiftedPrior with the weights of an original ClipPrior checkpoint (.pt / .pth / .bin / .safetensors).

    The file is read without unpickling code (safetensors, or ``torch.load(weights_only=True)``); a file of
    another kind (an image, a text file, a truncated download) is refused with what it is."""
    path = os.fspath(path)
    what = "an original ClipPrior checkpoint (a state dict of tensors)"
    if sniff(path) == "safetensors" or path.endswith(".safetensors"):
        raw: Mapping[str, Any] = read_safetensors(path, what, device=str(map_location))
    else:
        raw = load_torch_weights(path, what, map_location=map_location)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected {what}, got a {type(raw).__name__}")
    sd = unwrap_original_state_dict(raw)
    if config is None:
        config = infer_config_from_original(sd, text_len=text_len, vocab_size=vocab_size, dim_head=dim_head)
    model = ShiftedPrior.from_prior_config(config)
    converted = convert_original_state_dict(sd)
    result = model.load_state_dict(converted, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"original checkpoint {path!r} does not fit {config}: missing {result.missing_keys[:20]}, "
            f"unexpected {result.unexpected_keys[:20]}"
        )
    return model
