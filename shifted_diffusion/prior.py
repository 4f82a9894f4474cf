"""The shifted-diffusion prior network: a causal pre-norm transformer that predicts x0.

Token sequence, in order (W = width):
    [text tokens (L) | CLIP text emb (1) | timestep emb (1) | cluster-index emb (1, only with a vocab)
     | x_t (1) | learned final token (1)]
The output at the final token goes through `out_proj` to x0_hat (D = clip_dim).

Attention is causal and the caption tokens come first, so the hidden states of the first L + 1
positions (the "prefix") depend on the caption only. `encode_prefix` computes them once (per-layer
keys/values); `forward_cached` then runs only the 3-4 tail tokens against the cached prefix. A prefix
of batch B may serve x_t of batch B*K (K timesteps per caption, `repeat_interleave` order): the tail
tokens of the K timesteps attend to the shared prefix and, causally, to their own tail only.

Submodule names and layouts follow the original ClipPrior so that `convert.py` maps its checkpoints
one-to-one (the trunk is our own block; see convert.py for the key mapping).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

__all__ = [
    "check_tensor",
    "PriorConfig",
    "PrefixCache",
    "ShiftedPrior",
    "RMSNorm",
    "timestep_sinusoid",
]


# ----------------------------------------------------------------------------------------------
# config


_PRESETS: Dict[str, Dict[str, Any]] = {
    "small": dict(width=2048, depth=16, heads=32, dim_head=64, clip_dim=1536, text_dim=1024,
                  text_len=80, vocab_size=1024),
    "large": dict(width=2048, depth=20, heads=32, dim_head=64, clip_dim=1536, text_dim=1024,
                  text_len=80, vocab_size=1024),
    "tiny": dict(width=128, depth=2, heads=2, dim_head=64, clip_dim=64, text_dim=32, text_len=8,
                 vocab_size=16),
}


@dataclass(frozen=True)
class PriorConfig:
    """Architecture of the prior; saved inside every checkpoint (`to_dict` / `from_dict`)."""

    width: int = 2048
    depth: int = 16
    heads: int = 32
    dim_head: int = 64
    clip_dim: int = 1536
    text_dim: int = 1024
    text_len: int = 80
    vocab_size: Optional[int] = 1024  # None = baseline network (no cluster-index token)
    grad_checkpointing: bool = False  # torch.utils.checkpoint per block (training only)

    def __post_init__(self):
        for name in ("width", "depth", "heads", "dim_head", "clip_dim", "text_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PriorConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.text_len, int) or isinstance(self.text_len, bool) or self.text_len < 0:
            raise ValueError(f"PriorConfig.text_len must be an int >= 0, got {self.text_len!r}")
        if self.width % 2:
            raise ValueError(f"PriorConfig.width must be even (sinusoidal embeddings), got {self.width}")
        if self.vocab_size is not None and (
            not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool) or self.vocab_size < 1
        ):
            raise ValueError(f"PriorConfig.vocab_size must be a positive int or None, got {self.vocab_size!r}")
        if not isinstance(self.grad_checkpointing, bool):
            raise ValueError(f"PriorConfig.grad_checkpointing must be a bool, got {self.grad_checkpointing!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "PriorConfig":
        """A named preset ("tiny", "small", "large") with optional field overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown PriorConfig preset {name!r}; expected one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PriorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"PriorConfig.from_dict: unknown keys {unknown}; known keys {sorted(known)}")
        return cls(**d)

    @property
    def has_cluster_token(self) -> bool:
        return self.vocab_size is not None

    @property
    def prefix_len(self) -> int:
        """Caption positions: text tokens + CLIP text embedding."""
        return self.text_len + 1

    @property
    def tail_len(self) -> int:
        """Per-timestep positions: timestep, (cluster index), x_t, final token."""
        return 4 if self.has_cluster_token else 3

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.tail_len


# ----------------------------------------------------------------------------------------------
# building blocks


def timestep_sinusoid(values: Tensor, dim: int) -> Tensor:
    """emb = [cos(v * f), sin(v * f)], f_i = exp(-ln(10000) * i / half), half = dim // 2 (float32)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=values.device) / half
    )
    args = values.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class RMSNorm(nn.Module):
    """x / max(||x||_2 / sqrt(dim), eps) * g, eps = 1e-8 (x_transformers 0.28.4's RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # fused kernel: x / sqrt(mean(x^2) + eps^2) equals x / max(rms, eps) except for rms ~ eps. It
        # computes in fp32 for bf16/fp16 inputs too (one rounding of the output), so no fp32 copies of x.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), eps=self.eps**2)


def _layer_norm(dim: int) -> nn.LayerNorm:
    """The original's "LN": learned gain, zero (fixed) bias, eps 1e-5."""
    return nn.LayerNorm(dim, eps=1e-5, bias=False)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention, softmax(q k^T / sqrt(dim_head)) v; no biases."""

    def __init__(self, width: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.to_qkv = nn.Linear(width, 3 * inner, bias=False)  # rows: [q | k | v]
        self.to_out = nn.Linear(inner, width, bias=False)

    def qkv(self, h: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Queries, keys, values of h (B, N, W), each (B, H, N, dh)."""
        b, n, _ = h.shape
        qkv = self.to_qkv(h).view(b, n, 3, self.heads, self.dim_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(
        self,
        h: Tensor,
        past_key_value: Optional[Tuple[Tensor, Tensor]] = None,
        attn_mask: Optional[Tensor] = None,
        rows: Optional[slice] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Returns (output (B, N', W), keys (B, H, N, dh), values (B, H, N, dh)) of the N new tokens.

        Without `past_key_value` the N tokens attend causally to each other; with it they attend to
        the cached P positions and to the new ones allowed by `attn_mask` (N', P + N), True = attend.
        `rows` keeps only those query positions (N' of them; all N keys/values are still returned);
        without a past it must select the last position alone, which sees every key (no mask).
        """
        b, n = h.shape[:2]
        q, k, v = self.qkv(h)
        if rows is not None:
            if past_key_value is None and range(n)[rows] != range(n - 1, n):
                raise ValueError(f"rows={rows}: without a past, only the last position can be computed alone")
            q = q[:, :, rows]
        if past_key_value is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=rows is None)
        elif isinstance(past_key_value, KVBuffer):  # inference: write the N new keys after the prefix, no copy of it
            k_all, v_all = past_key_value.write(k, v)  # (B, H, P + N, dh)
            out = F.scaled_dot_product_attention(q.to(k_all.dtype), k_all, v_all, attn_mask=attn_mask).to(q.dtype)
        else:
            past_k, past_v = past_key_value
            k_all = torch.cat([past_k.to(k.dtype).expand(b, -1, -1, -1), k], dim=2)  # (B, H, P + N, dh)
            v_all = torch.cat([past_v.to(v.dtype).expand(b, -1, -1, -1), v], dim=2)
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(b, q.shape[2], self.heads * self.dim_head)  # (B, N', H*dh)
        return self.to_out(out), k, v


class GEGLUFeedForward(nn.Module):
    """proj_out(a * gelu(gate)), [a | gate] = proj_in(x) (W -> 2 * 4W -> W)."""

    def __init__(self, width: int, mult: int = 4):
        super().__init__()
        inner = width * mult
        self.proj_in = nn.Linear(width, 2 * inner)
        self.proj_out = nn.Linear(inner, width)

    def forward(self, x: Tensor) -> Tensor:
        proj_in = self.proj_in
        plain = type(proj_in) is nn.Linear and not (proj_in._forward_hooks or proj_in._forward_pre_hooks)
        if torch.is_grad_enabled() or not plain:  # training (one weight gradient; compile fuses the rest), or a
            a, gate = proj_in(x).chunk(2, dim=-1)  # wrapped / hooked proj_in (e.g. LoRA), which must be called
            return self.proj_out(a * F.gelu(gate))
        # inference: the halves as two matmuls come out contiguous, so GELU and the product are vectorised
        inner = self.proj_out.in_features
        weight, bias = self.proj_in.weight, self.proj_in.bias
        a = F.linear(x, weight[:inner], bias[:inner])
        gate = F.linear(x, weight[inner:], bias[inner:])
        return self.proj_out(a.mul_(F.gelu(gate)))


class PriorBlock(nn.Module):
    """Pre-norm block: h = h + attn(rms(h)); h = h + ff(rms(h))."""

    def __init__(self, width: int, heads: int, dim_head: int):
        super().__init__()
        self.attn_norm = RMSNorm(width)
        self.attn = SelfAttention(width, heads, dim_head)
        self.ff_norm = RMSNorm(width)
        self.ff = GEGLUFeedForward(width)

    def forward(
        self,
        h: Tensor,
        past_key_value: Optional[Tuple[Tensor, Tensor]] = None,
        attn_mask: Optional[Tensor] = None,
        rows: Optional[slice] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """(h', keys, values); `rows` computes h' at those positions only (see SelfAttention)."""
        attn_out, k, v = self.attn(self.attn_norm(h), past_key_value, attn_mask, rows)
        if rows is not None:
            h = h[:, rows]
        h = h + attn_out
        h = h + self.ff(self.ff_norm(h))
        return h, k, v

    def keys_values(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        """Keys and values of h alone: all a cached prefix needs from the last block (its submodules run
        as usual; hooks on the block itself do not fire)."""
        _, k, v = self.attn.qkv(self.attn_norm(h))
        return k, v


# ----------------------------------------------------------------------------------------------
# prefix cache


@dataclass(frozen=True)
class PrefixCache:
    """Per-layer keys/values of the caption positions: depth x (B, heads, L + 1, dim_head)."""

    keys: Tuple[Tensor, ...]
    values: Tuple[Tensor, ...]
    # inference buffers [prefix | tail] per (tail length, dtype), filled with the prefix once (see KVBuffer)
    buffers: Dict[Any, Tuple["KVBuffer", ...]] = field(default_factory=dict, compare=False, repr=False)
    # tail attention masks per (tail length, groups)
    masks: Dict[Tuple[int, int], Tensor] = field(default_factory=dict, compare=False, repr=False)

    def kv_buffers(self, tail_len: int, dtype: torch.dtype) -> Tuple["KVBuffer", ...]:
        """One KVBuffer per layer with room for `tail_len` new positions (created on first use)."""
        key = (tail_len, dtype)
        if key not in self.buffers:
            self.buffers[key] = tuple(
                KVBuffer.around([(k, v)], tail_len, dtype) for k, v in zip(self.keys, self.values)
            )
        return self.buffers[key]

    def tail_mask(self, tail_len: int, groups: int, device: torch.device) -> Tensor:
        """`_tail_attention_mask` for this prefix, built once per (tail length, groups)."""
        key = (tail_len, groups)
        if key not in self.masks:
            self.masks[key] = _tail_attention_mask(self.length, tail_len, groups, device)
        return self.masks[key]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    @property
    def depth(self) -> int:
        return len(self.keys)

    @classmethod
    def cat_for_sampling(cls, caches: Sequence["PrefixCache"], tail_len: int) -> "PrefixCache":
        """The caches concatenated along the batch, copied straight into sampling buffers with room for
        `tail_len` positions: one copy of the prefix (the cache's keys/values are views of the buffers). Used as is with one
        sample per caption; K samples per caption (K * tail_len positions) get buffers of their own."""
        depth = caches[0].depth
        if any(c.depth != depth or c.length != caches[0].length for c in caches):
            raise ValueError("PrefixCache.cat_for_sampling: caches differ in depth or length")
        dtype = caches[0].keys[0].dtype
        buffers = tuple(
            KVBuffer.around([(c.keys[i], c.values[i]) for c in caches], tail_len, dtype) for i in range(depth)
        )
        p = caches[0].length
        keys = tuple(buf.keys[:, :, :p] for buf in buffers)
        values = tuple(buf.values[:, :, :p] for buf in buffers)
        return cls(keys, values, {(tail_len, dtype): buffers})

    @classmethod
    def cat_positions(cls, first: "PrefixCache", second: "PrefixCache") -> "PrefixCache":
        """The positions of `second` after those of `first` (same batch and depth)."""
        keys = tuple(torch.cat([a, b], dim=2) for a, b in zip(first.keys, second.keys))
        values = tuple(torch.cat([a, b], dim=2) for a, b in zip(first.values, second.values))
        return cls(keys, values)

    def expand(self, batch: int) -> "PrefixCache":
        """A batch-1 cache seen as `batch` identical captions (views, no copy)."""
        if self.batch_size not in (1, batch):
            raise ValueError(f"PrefixCache.expand: batch {self.batch_size} cannot expand to {batch}")
        grow = lambda t: t.expand(batch, -1, -1, -1)  # noqa: E731
        return PrefixCache(tuple(map(grow, self.keys)), tuple(map(grow, self.values)))


class KVBuffer:
    """Keys/values (B, H, P + N, dh) whose first P positions hold a cached prefix; each sampling step
    writes its N tail positions in place instead of concatenating the prefix again."""

    def __init__(self, keys: Tensor, values: Tensor, prefix_len: int):
        self.keys, self.values, self.prefix_len = keys, values, prefix_len

    @classmethod
    def around(cls, parts: Sequence[Tuple[Tensor, Tensor]], tail_len: int, dtype: torch.dtype) -> "KVBuffer":
        """Buffers with the (keys, values) `parts` stacked along the batch, then `tail_len` free positions."""
        keys = parts[0][0]
        _, h, p, dh = keys.shape
        b = sum(k.shape[0] for k, _ in parts)
        buf_k = keys.new_empty(b, h, p + tail_len, dh, dtype=dtype)
        buf_v = keys.new_empty(b, h, p + tail_len, dh, dtype=dtype)
        start = 0
        for k, v in parts:
            buf_k[start:start + k.shape[0], :, :p] = k
            buf_v[start:start + k.shape[0], :, :p] = v
            start += k.shape[0]
        return cls(buf_k, buf_v, p)

    def write(self, keys: Tensor, values: Tensor) -> Tuple[Tensor, Tensor]:
        self.keys[:, :, self.prefix_len:] = keys.to(self.keys.dtype)
        self.values[:, :, self.prefix_len:] = values.to(self.values.dtype)
        return self.keys, self.values


def _tail_attention_mask(prefix_len: int, tail_len: int, groups: int, device: torch.device) -> Tensor:
    """(K*T, P + K*T) bool: every tail token sees the prefix and, causally, its own group's tail."""
    n = groups * tail_len
    idx = torch.arange(n, device=device)
    same_group = (idx[:, None] // tail_len) == (idx[None, :] // tail_len)
    causal = idx[:, None] >= idx[None, :]
    prefix = torch.ones(n, prefix_len, dtype=torch.bool, device=device)
    return torch.cat([prefix, same_group & causal], dim=1)


# ----------------------------------------------------------------------------------------------
# shape checks


def require_tensor(name: str, tensor: Any) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(tensor).__name__}")


def check_tensor(
    name: str, tensor: Any, expected: Tuple[Any, ...], meaning: str, given: Optional[Tensor] = None
) -> None:
    """Raise a ValueError naming the tensor when its shape does not match `expected` (None = any).

    `given` is the tensor as the caller passed it, reported in the message (default `tensor`)."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name}: expected a tensor of shape {meaning}, got {type(tensor).__name__}")
    if tensor.dim() != len(expected) or any(
        e is not None and e != s for e, s in zip(expected, tensor.shape)
    ):
        got = tensor if given is None else given
        raise ValueError(f"{name}: expected shape {meaning}, got {tuple(got.shape)}")


# ----------------------------------------------------------------------------------------------
# the network


class ShiftedPrior(ModelMixin, ConfigMixin):
    """x0_hat = f(x_t, t, cluster_idx, text tokens, CLIP text emb), a causal transformer.

    A diffusers model: ``save_pretrained`` / ``from_pretrained`` (config.json + safetensors weights); the
    architecture is also available as a ``PriorConfig`` (``.arch``, with its derived sizes), and
    ``enable_gradient_checkpointing()`` recomputes each block in backward."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, width: int = 2048, depth: int = 16, heads: int = 32, dim_head: int = 64, clip_dim: int = 1536,
                 text_dim: int = 1024, text_len: int = 80, vocab_size: Optional[int] = 1024):
        super().__init__()
        config = PriorConfig(width=width, depth=depth, heads=heads, dim_head=dim_head, clip_dim=clip_dim,
                             text_dim=text_dim, text_len=text_len, vocab_size=vocab_size)
        self.arch = config
        self.gradient_checkpointing = False
        w, d, e = config.width, config.clip_dim, config.text_dim

        self.t5_proj = nn.Sequential(
            _layer_norm(e), nn.Linear(e, w), nn.SiLU(), _layer_norm(w), nn.Linear(w, w)
        )
        self.clip_sentence_proj = nn.Sequential(nn.Linear(d, w), nn.SiLU(), _layer_norm(w), nn.Linear(w, w))
        self.x_proj = nn.Sequential(nn.Linear(d, w), nn.SiLU(), _layer_norm(w), nn.Linear(w, w))
        self.time_embed = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.pos_embed = (
            nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w)) if config.has_cluster_token else None
        )
        self.final_emb = nn.Parameter(torch.randn(1, 1, w))
        self.blocks = nn.ModuleList(
            [PriorBlock(w, config.heads, config.dim_head) for _ in range(config.depth)]
        )
        self.out_proj = nn.Sequential(nn.Linear(w, d), nn.SiLU(), nn.Linear(d, d))

    @classmethod
    def from_prior_config(cls, config: PriorConfig) -> "ShiftedPrior":
        """The network of a ``PriorConfig`` (its ``grad_checkpointing`` switches gradient checkpointing on)."""
        if not isinstance(config, PriorConfig):
            raise TypeError(f"ShiftedPrior.from_prior_config expects a PriorConfig, got {type(config).__name__}")
        model = cls(**{k: v for k, v in config.to_dict().items() if k != "grad_checkpointing"})
        model.gradient_checkpointing = config.grad_checkpointing
        return model

    # ---- input validation -------------------------------------------------------------------

    def _check_caption(self, text_tokens: Tensor, clip_text_emb: Tensor) -> int:
        cfg = self.arch
        check_tensor("clip_text_emb", clip_text_emb, (None, cfg.clip_dim), f"(B, clip_dim={cfg.clip_dim})")
        b = clip_text_emb.shape[0]
        check_tensor(
            "text_tokens", text_tokens, (b, cfg.text_len, cfg.text_dim),
            f"(B={b}, text_len={cfg.text_len}, text_dim={cfg.text_dim})",
        )
        return b

    def _check_tail(self, x_t: Tensor, timesteps: Tensor, cluster_idx: Optional[Tensor]) -> int:
        cfg = self.arch
        check_tensor("x_t", x_t, (None, cfg.clip_dim), f"(B, clip_dim={cfg.clip_dim})")
        n = x_t.shape[0]
        check_tensor("timesteps", timesteps, (n,), f"(B={n},)")
        if cfg.has_cluster_token:
            if cluster_idx is None:
                raise ValueError(
                    f"cluster_idx: required (shape (B={n},)) because vocab_size={cfg.vocab_size}; "
                    "pass vocab_size=None for the baseline network"
                )
            check_tensor("cluster_idx", cluster_idx, (n,), f"(B={n},)")
        return n

    # ---- embeddings --------------------------------------------------------------------------

    # the residual stream stays in the input dtype (fp32 under autocast; bf16 for a bf16 model)

    def _text_positions(self, text_tokens: Tensor, dtype: torch.dtype) -> Tensor:
        return self.t5_proj(text_tokens).to(dtype)  # (B, L, W)

    def _clip_position(self, clip_text_emb: Tensor) -> Tensor:
        return self.clip_sentence_proj(clip_text_emb)[:, None].to(clip_text_emb.dtype)  # (B, 1, W)

    def _prefix_tokens(self, text_tokens: Tensor, clip_text_emb: Tensor) -> Tensor:
        text = self._text_positions(text_tokens, clip_text_emb.dtype)
        return torch.cat([text, self._clip_position(clip_text_emb)], dim=1)  # (B, L+1, W)

    def _tail_tokens(self, x_t: Tensor, timesteps: Tensor, cluster_idx: Optional[Tensor]) -> Tensor:
        w = self.arch.width
        t_emb = self.time_embed(timestep_sinusoid(timesteps, w).to(x_t.dtype))[:, None]  # (N, 1, W)
        x_emb = self.x_proj(x_t)[:, None]  # (N, 1, W)
        final = self.final_emb.expand(x_t.shape[0], -1, -1)  # (N, 1, W)
        parts = [t_emb]
        if self.pos_embed is not None:
            parts.append(self.pos_embed(timestep_sinusoid(cluster_idx, w).to(x_t.dtype))[:, None])
        parts += [x_emb, final]
        return torch.cat([p.to(x_t.dtype) for p in parts], dim=1)  # (N, T, W)

    def _run_block(self, block: PriorBlock, h: Tensor, past=None, mask=None, rows: Optional[slice] = None):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, past, mask, rows, use_reentrant=False)
        return block(h, past, mask, rows)

    # ---- full forward ------------------------------------------------------------------------

    def forward(
        self,
        x_t: Tensor,
        timesteps: Tensor,
        cluster_idx: Optional[Tensor],
        text_tokens: Tensor,
        clip_text_emb: Tensor,
    ) -> Tensor:
        """x0_hat (N, D) from the whole sequence [text | clip | t | (cluster) | x_t | final].

        N = B: one timestep per caption. N = B*K: K timesteps per caption (row n uses caption n // K)
        share one caption prefix, computed once (prefix-shared training; exact).
        """
        b = self._check_caption(text_tokens, clip_text_emb)
        n = self._check_tail(x_t, timesteps, cluster_idx)
        if n != b:
            if n % b:
                raise ValueError(
                    f"x_t: batch {n} is not a multiple of the caption batch {b} (text_tokens/clip_text_emb)"
                )
            return self.forward_cached(self.encode_prefix(text_tokens, clip_text_emb), x_t, timesteps, cluster_idx)
        h = torch.cat(
            [self._prefix_tokens(text_tokens, clip_text_emb), self._tail_tokens(x_t, timesteps, cluster_idx)],
            dim=1,
        )  # (B, L + 1 + T, W)
        for block in self.blocks[:-1]:
            h, _, _ = self._run_block(block, h)
        # only the final token is read out: the last block computes its row alone (keys/values of all)
        h, _, _ = self._run_block(self.blocks[-1], h, rows=slice(-1, None))
        return self.out_proj(h[:, -1])  # (B, D)

    # ---- prefix cache ------------------------------------------------------------------------

    def encode_prefix(self, text_tokens: Tensor, clip_text_emb: Tensor) -> PrefixCache:
        """Per-layer keys/values of the L + 1 caption positions (independent of t, cluster, x_t)."""
        self._check_caption(text_tokens, clip_text_emb)
        return self._encode(self._prefix_tokens(text_tokens, clip_text_emb))

    def _encode(self, h: Tensor, past: Optional[PrefixCache] = None) -> PrefixCache:
        """Cache of the positions h (B, N, W), or of [past | h] when they follow `past` (batch 1 or B).

        The last block's outputs are never read (only its keys/values), so it runs no attention or MLP."""
        b, n = h.shape[:2]
        mask = None if past is None else causal_lower_right(n, past.length + n)
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            kv = None if past is None else (past.keys[i], past.values[i])
            if i + 1 < len(self.blocks):
                h, k, v = self._run_block(block, h, kv, mask)
            else:
                k, v = block.keys_values(h)
            keys.append(k)  # (B, H, N, dh)
            values.append(v)
        cache = PrefixCache(tuple(keys), tuple(values))
        return cache if past is None else PrefixCache.cat_positions(past.expand(b), cache)

    def forward_cached(
        self,
        prefix: PrefixCache,
        x_t: Tensor,
        timesteps: Tensor,
        cluster_idx: Optional[Tensor],
    ) -> Tensor:
        """x0_hat (N, D) for N = B*K tail sequences on a prefix of batch B (row n uses caption n // K)."""
        if not isinstance(prefix, PrefixCache):
            raise TypeError(f"prefix: expected a PrefixCache from encode_prefix, got {type(prefix).__name__}")
        cfg = self.arch
        if prefix.depth != cfg.depth or prefix.length != cfg.prefix_len:
            raise ValueError(
                f"prefix: expected depth {cfg.depth} and length {cfg.prefix_len}, "
                f"got depth {prefix.depth} and length {prefix.length}"
            )
        n = self._check_tail(x_t, timesteps, cluster_idx)
        b = prefix.batch_size
        if n % b:
            raise ValueError(
                f"x_t: batch {n} must be a multiple of the prefix batch {b} (K timesteps per caption)"
            )
        groups = n // b
        tail = cfg.tail_len
        h = self._tail_tokens(x_t, timesteps, cluster_idx)  # (B*K, T, W)
        h = h.reshape(b, groups * tail, cfg.width)  # (B, K*T, W): caption-major, timestep-minor
        if groups == 1:  # the T tail tokens see the whole prefix and each other causally: bottom-right causal
            mask = causal_lower_right(tail, prefix.length + tail)
        else:
            mask = prefix.tail_mask(tail, groups, x_t.device)  # (K*T, P + K*T), True = attend
        if torch.is_grad_enabled():  # training: gradients flow into the prefix through a concatenation
            past = list(zip(prefix.keys, prefix.values))
        else:  # sampling: the prefix is copied into per-layer buffers once, not at every step
            past = prefix.kv_buffers(groups * tail, prefix.keys[0].dtype)
        last = len(self.blocks) - 1
        for i, (block, kv) in enumerate(zip(self.blocks, past)):
            if i < last:
                h, _, _ = self._run_block(block, h, kv, mask)
            else:  # only each group's final token is read out; it sees the prefix and its whole group
                final_rows = slice(tail - 1, None, tail)
                h, _, _ = self._run_block(block, h, kv, None if groups == 1 else mask[final_rows], final_rows)
        return self.out_proj(h.reshape(n, cfg.width))  # (B, K, W) -> (B*K, D)

    # ---- the unconditional caption of guidance -------------------------------------------------

    def encode_null_prefix(self, null_tokens: Tensor, clip_text_emb: Tensor, batch: int) -> PrefixCache:
        """Cache of the unconditional captions [null text (1, L) | CLIP emb (1 or B, D)], batch `batch`.

        The L null-text positions are computed once; with a per-prompt CLIP embedding only that last
        position runs per prompt (causal attention: the text positions cannot see it)."""
        if clip_text_emb.shape[0] == 1:
            return self._encode(self._prefix_tokens(null_tokens, clip_text_emb)).expand(batch)
        if self.arch.text_len == 0:
            return self._encode(self._clip_position(clip_text_emb))
        text = self._encode(self._text_positions(null_tokens, clip_text_emb.dtype))  # batch 1, L positions
        return self._encode(self._clip_position(clip_text_emb), past=text)  # batch B, L + 1 positions
