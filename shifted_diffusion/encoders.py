"""Frozen encoders: concatenated open_clip CLIPs and word-level caption encoders.

* ``MultiCLIP`` — a list of open_clip models; image / text embeddings concatenated in list order,
  un-normalised (the prior's x0). The paper's default is ViT-B-16 + ViT-B-32 + RN101 with ``openai``
  weights, D = 512 + 512 + 512 = 1536.
* Word-level encoders, common interface ``.encode(list[str]) -> (B, max_length, dim)``, ``.dim``,
  ``.max_length``, ``.spec``: ``T5TextEncoder`` (paper: t5-11b, 80 tokens, no attention mask),
  ``CLIPTokenTextEncoder`` (token states of an open_clip text tower; the toy world's encoder) and
  ``NoTextEncoder`` (CLIP-only conditioning, zero tokens).
* ``save_open_clip`` / ``load_open_clip``: a self-contained local open_clip model folder in open_clip's
  own hub layout (``open_clip_config.json`` + ``open_clip_model.safetensors``), loadable with plain
  ``open_clip.create_model_and_transforms("local-dir:<folder>")``.

Every encoder carries a ``spec`` dict (what identifies its outputs) and a ``weights_fingerprint()``
(which weights: for local files and folders the size and mtime of every file, optionally their SHA-256;
for hub names the resolved identity, e.g. open_clip's download URL / hub id or the transformers commit);
the embedding cache stores both and refuses to mix outputs of different encoders or retrained weights.
``fingerprint_difference`` compares two fingerprints (naming each differing file).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_NAME = "open_clip_model.safetensors"
LOCAL_DIR_PREFIX = "local-dir:"
CLIP_TOKENS_PREFIX = "clip-tokens:"

# the paper's encoders: three OpenAI CLIPs (D = 512 + 512 + 512) and T5-11b's token states (80 x 1024)
PAPER_CLIP_MODELS: tuple[str, ...] = ("ViT-B-16:openai", "ViT-B-32:openai", "RN101:openai")
PAPER_T5_MODEL = "t5-11b"
PAPER_TEXT_MAX_LENGTH = 80


def parse_clip_specs(clip_models: Sequence[str]) -> list[tuple[str, str]]:
    """"MODEL:PRETRAINED" entries -> (model, pretrained); a bare entry (a local open_clip folder, or
    "local-dir:..." / "hf-hub:...") has no separate weights: ("ViT-B-16:openai", "/m/dir") ->
    [("ViT-B-16", "openai"), ("/m/dir", "")]."""
    specs = []
    for entry in clip_models:
        if entry.startswith((LOCAL_DIR_PREFIX, "hf-hub:")) or ":" not in entry:
            specs.append((entry, ""))
        else:
            model, _, pretrained = entry.partition(":")
            specs.append((model, pretrained))
    return specs


DEFAULT_CLIP_SPECS: tuple[tuple[str, str], ...] = tuple(parse_clip_specs(PAPER_CLIP_MODELS))

PathLike = Union[str, os.PathLike]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


# ----------------------------------------------------------------------------------------------
# small helpers


DTYPE_NAMES = tuple(sorted(_DTYPES))


def parse_dtype(name: str, what: str = "dtype") -> torch.dtype:
    """A dtype name ("fp32", "float16", "bf16", ...) -> torch.dtype; ``what`` (a flag) is named in the error."""
    if name not in _DTYPES:
        raise ValueError(f"{what}: expected one of {list(DTYPE_NAMES)}, got {name!r}")
    return _DTYPES[name]


def resolve_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    """Compute dtype: given one, else float16 on CUDA and float32 elsewhere."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    return parse_dtype(dtype)


def resolve_device(device: Union[None, str, torch.device]) -> torch.device:
    """Device: given one, else CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _batches(items: Sequence, batch_size: int):
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# open_clip local folders


def _local_open_clip_dir(model: str) -> Optional[Path]:
    """The folder when ``model`` names a saved open_clip folder ("local-dir:<dir>" or a directory)."""
    if model.startswith(LOCAL_DIR_PREFIX):
        return Path(model[len(LOCAL_DIR_PREFIX):])
    path = Path(model)
    if path.is_dir():
        return path
    return None


def _default_preprocess_cfg(model: torch.nn.Module, model_cfg: dict) -> dict:
    import open_clip
    from open_clip.transform import PreprocessCfg

    cfg = asdict(PreprocessCfg())
    image_size = model_cfg.get("vision_cfg", {}).get("image_size")
    if image_size is not None:
        cfg["size"] = image_size
    cfg.update(open_clip.get_model_preprocess_cfg(model))
    return cfg


def save_open_clip(
    model: torch.nn.Module,
    model_cfg: dict,
    directory: PathLike,
    preprocess_cfg: Optional[dict] = None,
) -> Path:
    """Save an open_clip model as a self-contained local folder in open_clip's hub layout.

    Writes ``open_clip_config.json`` = {"model_cfg": model_cfg, "preprocess_cfg": ...} and
    ``open_clip_model.safetensors`` (the state dict). ``preprocess_cfg`` entries override the model's own
    (size, mean, std, interpolation, resize_mode). Load with ``load_open_clip(directory)`` or plain
    ``open_clip.create_model_and_transforms("local-dir:" + directory)``; the tokenizer is open_clip's
    default for ``model_cfg["text_cfg"]`` (``get_tokenizer("local-dir:...")``).
    """
    from safetensors.torch import save_file

    if not isinstance(model_cfg, dict) or "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
        raise ValueError("model_cfg: expected an open_clip model config dict with 'embed_dim', "
                         f"'vision_cfg' and 'text_cfg', got {type(model_cfg).__name__} "
                         f"with keys {sorted(model_cfg) if isinstance(model_cfg, dict) else None}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pp = _default_preprocess_cfg(model, model_cfg)
    pp.update(preprocess_cfg or {})
    config = {"model_cfg": _jsonable(model_cfg), "preprocess_cfg": _jsonable(pp)}
    with open(directory / OPEN_CLIP_CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    # clone: safetensors refuses tensors sharing storage
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(directory / OPEN_CLIP_WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def _open_clip_precision(dtype: torch.dtype) -> str:
    # open_clip's "fp16"/"bf16" = OpenAI-style mixed precision (LayerNorms kept in float32)
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def load_open_clip(
    model: str,
    pretrained: Optional[str] = "",
    *,
    device: Union[None, str, torch.device] = "cpu",
    dtype: Union[None, str, torch.dtype] = torch.float32,
) -> tuple[torch.nn.Module, Callable, Callable]:
    """Load an open_clip model -> (model in eval mode, inference preprocess, tokenizer).

    ``model``: a built-in name ("ViT-B-16"), a folder written by ``save_open_clip`` (optionally prefixed
    "local-dir:"), or an "hf-hub:org/repo" id. ``pretrained``: a tag ("openai"), a checkpoint file
    (state dict, .pt/.bin/.safetensors), or ""/None (a folder's own weights; random init for a built-in
    name). The preprocess is open_clip's validation transform: resize shortest side, centre crop,
    to tensor, normalise.
    """
    import open_clip

    if not isinstance(model, str) or not model:
        raise ValueError(f"model: expected an open_clip model name or folder, got {model!r}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    precision = _open_clip_precision(dtype)
    local = _local_open_clip_dir(model)
    looks_like_path = bool(pretrained) and (local is not None or os.sep in pretrained
                                            or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")))
    if looks_like_path and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"pretrained: checkpoint file {pretrained!r} not found (expected an open_clip "
                                "tag such as 'openai', a checkpoint file, or '' for a local folder's own weights)")
    if local is not None:
        if not (local / OPEN_CLIP_CONFIG_NAME).is_file():
            raise FileNotFoundError(f"open_clip folder {str(local)!r}: missing {OPEN_CLIP_CONFIG_NAME} "
                                    "(write it with save_open_clip)")
        has_weights = any(local.glob("*.safetensors")) or any(local.glob("*.bin")) or any(local.glob("*.pth"))
        if not has_weights and not pretrained:
            raise FileNotFoundError(f"open_clip folder {str(local)!r}: no weights file "
                                    f"({OPEN_CLIP_WEIGHTS_NAME}) and no pretrained checkpoint given")
        name = LOCAL_DIR_PREFIX + str(local)
        clip, _, preprocess = open_clip.create_model_and_transforms(
            name, load_weights=not pretrained, precision=precision, device=device)
        if pretrained:
            open_clip.load_checkpoint(clip, pretrained)
    else:
        name = model
        clip, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained or None, precision=precision, device=device)
    tokenizer = open_clip.get_tokenizer(name)
    clip.eval().requires_grad_(False)
    return clip, preprocess, tokenizer


def _spec_path(value: str) -> str:
    """Identity string of a model / checkpoint reference: absolute path for local files."""
    if value and value.startswith(LOCAL_DIR_PREFIX):
        value = value[len(LOCAL_DIR_PREFIX):]
    if value and os.path.exists(value):
        return str(Path(value).resolve())
    return value or ""


# ----------------------------------------------------------------------------------------------
# weights fingerprints


def _file_stamp(path: Path, content_hash: bool) -> dict:
    """{"size", "mtime_ns"} of a file (symlinks followed), plus "sha256" of its bytes when ``content_hash``."""
    stat = path.stat()
    stamp = {"size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}
    if content_hash:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        stamp["sha256"] = digest.hexdigest()
    return stamp


def weights_fingerprint(reference: Optional[str], *, content_hash: bool = False) -> dict:
    """Fingerprint of the weights a model reference names.

    A local file -> {"path", "files": {name: stamp}}; a local folder ("local-dir:" prefix allowed) -> the same
    over every non-hidden file below it (weights, configs, tokenizer files); anything else (a hub name or tag)
    -> {"name": reference}. A stamp is {"size", "mtime_ns"} and, with ``content_hash``, "sha256".
    """
    if not reference:
        return {"name": ""}
    text = str(reference)
    path = Path(text[len(LOCAL_DIR_PREFIX):] if text.startswith(LOCAL_DIR_PREFIX) else text)
    if path.is_file():
        return {"path": str(path.resolve()), "files": {path.name: _file_stamp(path, content_hash)}}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        return {"path": str(path.resolve()),
                "files": {p.relative_to(path).as_posix(): _file_stamp(p, content_hash) for p in files}}
    return {"name": text}


def _open_clip_fingerprint(model: str, pretrained: str, content_hash: bool) -> dict:
    """Fingerprint of one open_clip (model, pretrained): local files, or open_clip's identity of a named tag."""
    out = {"model": weights_fingerprint(model, content_hash=content_hash)}
    if pretrained and not os.path.exists(pretrained):
        import open_clip

        cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
        out["pretrained"] = {"name": pretrained, "hf_hub": cfg.get("hf_hub", ""), "url": cfg.get("url", "")}
    else:
        out["pretrained"] = weights_fingerprint(pretrained, content_hash=content_hash)
    return out


def _stamp_difference(old: dict, new: dict, where: str) -> Optional[str]:
    """Two file stamps differ? SHA-256 decides when both have one, else size and mtime."""
    if "sha256" in old and "sha256" in new:
        same = old["sha256"] == new["sha256"]
        keys = ("sha256",)
    else:
        keys = ("size", "mtime_ns")
        same = all(old.get(k) == new.get(k) for k in keys)
    if same:
        return None
    then = ", ".join(f"{k}={old.get(k)}" for k in keys)
    now = ", ".join(f"{k}={new.get(k)}" for k in keys)
    return f"{where}: {then} when the cache was built, {now} now"


def fingerprint_differences(old: Any, new: Any, where: str = "weights") -> list[str]:
    """Every difference between two weights fingerprints, one sentence each naming the file / key."""
    if isinstance(old, dict) and isinstance(new, dict):
        if "size" in old and "size" in new:
            found = _stamp_difference(old, new, where)
            return [found] if found else []
        out = []
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new:
                state = "is new" if key not in old else "is gone"
                out.append(f"{where}.{key} {state} (was {old.get(key)!r}, now {new.get(key)!r})")
            else:
                out.extend(fingerprint_differences(old[key], new[key], f"{where}.{key}"))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in fingerprint_differences(a, b, f"{where}.{i}")]
    return [] if old == new else [f"{where}: {old!r} when the cache was built, {new!r} now"]


def fingerprint_difference(old: Any, new: Any, where: str = "weights", limit: int = 3) -> Optional[str]:
    """The differences between two weights fingerprints as one sentence (the first ``limit``), or None."""
    found = fingerprint_differences(old, new, where)
    if not found:
        return None
    more = f"; ... {len(found) - limit} more" if len(found) > limit else ""
    return "; ".join(found[:limit]) + more


# ----------------------------------------------------------------------------------------------
# local encoder paths stored with a model (saved resolved, so that the model loads from any folder)

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _resolve_local(value: str, bases: Sequence[PathLike], want_dir: bool) -> str:
    """``value`` (optionally "local-dir:"-prefixed) as an absolute path when it names an existing local folder
    (``want_dir``) or file relative to one of ``bases`` (the first is the working directory; the others are
    tried only for values that look like paths); anything else (a hub name) comes back unchanged."""
    prefix = LOCAL_DIR_PREFIX if value.startswith(LOCAL_DIR_PREFIX) else ""
    body = value[len(prefix):]
    if not body:
        return value
    path = Path(body).expanduser()
    looks_like_path = os.sep in body or body.startswith(".")
    candidates = [path] if path.is_absolute() else [Path(b) / path for b in (bases if looks_like_path else bases[:1])]
    for candidate in candidates:
        if candidate.is_dir() if want_dir else candidate.is_file():
            return prefix + str(candidate.resolve())
    return value


def _resolve_clip_entry(entry: str, bases: Sequence[PathLike]) -> str:
    """One clip_models entry ("MODEL:PRETRAINED", a bare folder, "local-dir:..." or "hf-hub:...") resolved."""
    if entry.startswith("hf-hub:"):
        return entry
    if entry.startswith(LOCAL_DIR_PREFIX) or ":" not in entry:
        resolved = _resolve_local(entry, bases, want_dir=True)
        # a bare absolute path holding ':' would be split into model and weights: mark it as a folder
        return LOCAL_DIR_PREFIX + resolved if ":" in resolved and not resolved.startswith(LOCAL_DIR_PREFIX) else resolved
    model, _, pretrained = entry.partition(":")
    resolved_model = _resolve_local(model, bases, want_dir=True)
    if ":" in resolved_model:
        resolved_model = model  # cannot be written as MODEL:PRETRAINED; kept as given
    if os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES):
        pretrained = _resolve_local(pretrained, bases, want_dir=False)
    return f"{resolved_model}:{pretrained}"


def _resolve_text_encoder(name: str, bases: Sequence[PathLike]) -> str:
    """A t5_model value ("none", "clip-tokens:<open_clip>", a T5 name or folder) with local folders resolved."""
    if name is None or str(name).lower() in ("", "none"):
        return name
    if name.startswith(CLIP_TOKENS_PREFIX):
        return CLIP_TOKENS_PREFIX + _resolve_local(name[len(CLIP_TOKENS_PREFIX):], bases, want_dir=True)
    return _resolve_local(name, bases, want_dir=True)


def resolve_clip_spec(model: str, pretrained: str = "", bases: Optional[Sequence[PathLike]] = None) -> tuple[str, str]:
    """A (model, pretrained) pair with local folders / checkpoint files as absolute paths (see
    ``resolve_encoder_paths``); hub names unchanged."""
    bases = [Path.cwd(), *(bases or [])]
    if not model.startswith("hf-hub:"):
        model = _resolve_local(model, bases, want_dir=True)
    if pretrained and (os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)):
        pretrained = _resolve_local(pretrained, bases, want_dir=False)
    return model, pretrained or ""


def resolve_encoder_paths(encoders: dict, bases: Optional[Sequence[PathLike]] = None) -> dict:
    """A copy of an encoder-settings dict (clip_models, t5_model, ...) whose local folders / checkpoint files are
    absolute paths: found relative to the working directory, then (for path-like values) to the other
    ``bases``. Hub names ("ViT-B-16:openai", "t5-11b", "hf-hub:...") and paths found nowhere are unchanged."""
    bases = [Path.cwd(), *(bases or [])]
    out = dict(encoders)
    if out.get("clip_models") is not None:
        out["clip_models"] = [_resolve_clip_entry(e, bases) if isinstance(e, str) else e for e in out["clip_models"]]
    if isinstance(out.get("t5_model"), str):
        out["t5_model"] = _resolve_text_encoder(out["t5_model"], bases)
    return out


# ----------------------------------------------------------------------------------------------
# concatenated CLIP


class MultiCLIP:
    """Several open_clip models whose embeddings are concatenated in list order (D = sum of blocks)."""

    def __init__(
        self,
        specs: Sequence[Union[tuple[str, str], str]] = DEFAULT_CLIP_SPECS,
        device: Union[None, str, torch.device] = None,
        dtype: Union[None, str, torch.dtype] = None,
        batch_size: int = 256,
    ):
        if len(specs) == 0:
            raise ValueError("specs: expected at least one (model, pretrained) pair, got an empty list")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = int(batch_size)
        self.specs: list[tuple[str, str]] = []
        self.models: list[torch.nn.Module] = []
        self.tokenizers: list[Callable] = []
        self.block_sizes: list[int] = []
        transforms: list[Callable] = []
        preprocess_keys: list[str] = []
        for spec in specs:
            model_name, pretrained = (spec, "") if isinstance(spec, str) else (spec[0], spec[1] or "")
            clip, preprocess, tokenizer = load_open_clip(model_name, pretrained, device=self.device, dtype=self.dtype)
            self.specs.append((model_name, pretrained))
            self.models.append(clip)
            self.tokenizers.append(tokenizer)
            self.block_sizes.append(int(_embed_dim(clip)))
            transforms.append(preprocess)
            preprocess_keys.append(json.dumps(_jsonable(getattr(clip.visual, "preprocess_cfg", {})), sort_keys=True))
        # models with identical preprocessing share one transform (the paper's three all use 224 px)
        unique = sorted(set(preprocess_keys), key=preprocess_keys.index)
        self.transforms: list[Callable] = [transforms[preprocess_keys.index(k)] for k in unique]
        self.transform_index: list[int] = [unique.index(k) for k in preprocess_keys]
        self.dim = sum(self.block_sizes)

    @property
    def spec(self) -> dict:
        """What identifies this encoder's outputs (stored in cache manifests)."""
        return {
            "type": "open_clip",
            "models": [[_spec_path(m), _spec_path(p)] for m, p in self.specs],
            "block_sizes": list(self.block_sizes),
        }

    def weights_fingerprint(self, content_hash: bool = False) -> dict:
        """Which weights (``encoders.weights_fingerprint`` of each model's folder / checkpoint / tag)."""
        return {"type": "open_clip",
                "models": [_open_clip_fingerprint(m, p, content_hash) for m, p in self.specs]}

    def preprocess(self, image) -> list[torch.Tensor]:
        """One PIL image -> one (3, H, W) tensor per distinct transform (resize, centre crop, normalise);
        16-bit and float images are first scaled to 8-bit RGB (``data.to_rgb``)."""
        from .data import to_rgb

        image = to_rgb(image)
        return [transform(image) for transform in self.transforms]

    def preprocess_batch(self, images: Sequence) -> list[torch.Tensor]:
        """PIL images -> one (B, 3, H, W) tensor per distinct transform."""
        per_image = [self.preprocess(image) for image in images]
        return [torch.stack([p[i] for p in per_image]) for i in range(len(self.transforms))]

    @torch.inference_mode()
    def encode_pixels(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Preprocessed batches (one per transform, (B, 3, H, W)) -> (B, D) float32, blocks concatenated."""
        if len(pixels) != len(self.transforms):
            raise ValueError(f"pixels: expected {len(self.transforms)} tensors (one per transform), got {len(pixels)}")
        out = []
        for clip, t_idx in zip(self.models, self.transform_index):
            x = pixels[t_idx].to(self.device, self.dtype)  # (B, 3, H, W)
            out.append(clip.encode_image(x).float())  # (B, d_k)
        return torch.cat(out, dim=-1)  # (B, D)

    def encode_image_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> (B, D) float32, differentiable (gradients reach the images; the
        weights stay as they are): each model's input resized (bicubic, antialiased) to its square size and
        normalised with its mean / std. Square images match ``encode_image``'s resize + centre crop up to
        interpolation; for training signals (a GAN's contrastive loss), not for the cache."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        x = (images.float() + 1.0) / 2.0
        out = []
        for clip in self.models:
            cfg = getattr(clip.visual, "preprocess_cfg", {}) or {}
            size = cfg.get("size", 224)
            size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
            y = x if tuple(x.shape[-2:]) == size else torch.nn.functional.interpolate(
                x, size=size, mode="bicubic", align_corners=False, antialias=True)
            mean = torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN), device=y.device).view(1, 3, 1, 1)
            std = torch.tensor(cfg.get("std", OPENAI_DATASET_STD), device=y.device).view(1, 3, 1, 1)
            y = ((y - mean) / std).to(self.device, self.dtype)
            out.append(clip.encode_image(y).float())
        return torch.cat(out, dim=-1)

    def encode_image(self, images: Sequence) -> torch.Tensor:
        """PIL images -> (B, D) float32 un-normalised concatenated CLIP image embeddings."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            return torch.zeros(0, self.dim, device=self.device)
        chunks = [self.encode_pixels(self.preprocess_batch(batch)) for batch in _batches(images, self.batch_size)]
        return torch.cat(chunks)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> (B, D) float32 un-normalised concatenated CLIP text embeddings."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if len(texts) == 0:
            return torch.zeros(0, self.dim, device=self.device)
        chunks = []
        for batch in _batches(texts, self.batch_size):
            blocks = [clip.encode_text(tok(batch).to(self.device)).float()  # (B, d_k)
                      for clip, tok in zip(self.models, self.tokenizers)]
            chunks.append(torch.cat(blocks, dim=-1))  # (B, D)
        return torch.cat(chunks)

    def split_blocks(self, emb: torch.Tensor) -> list[torch.Tensor]:
        """(..., D) -> one (..., d_k) view per CLIP model."""
        if emb.shape[-1] != self.dim:
            raise ValueError(f"emb: expected last dim {self.dim}, got shape {tuple(emb.shape)}")
        return list(torch.split(emb, self.block_sizes, dim=-1))


def _embed_dim(clip: torch.nn.Module) -> int:
    """Output dim of an open_clip model's image embedding."""
    dim = getattr(clip, "embed_dim", None) or getattr(getattr(clip, "visual", None), "output_dim", None)
    if dim is None:
        raise ValueError(f"cannot find the embedding dim of {type(clip).__name__}")
    return int(dim)


# ----------------------------------------------------------------------------------------------
# word-level caption encoders


class NoTextEncoder:
    """No word-level tokens (CLIP-only conditioning): encode -> (B, 0, 0), text_len 0."""

    dim = 0
    max_length = 0

    @property
    def spec(self) -> dict:
        return {"type": "none"}

    def weights_fingerprint(self, content_hash: bool = False) -> dict:
        return {"type": "none"}

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return torch.zeros(len(texts), 0, 0)


class T5TextEncoder:
    """Last hidden state of a T5 encoder, captions padded to max_length (paper: t5-11b, 80, no mask).

    ``masked=False`` reproduces the original: the padded sequence is encoded without an attention mask,
    so pad positions attend and carry non-zero states. ``masked=True`` passes the attention mask and zeroes
    the pad positions. Default dtype: bfloat16 on CUDA (T5 was trained in bf16; fp16 can overflow in large
    T5s), float32 on CPU. t5-11b's encoder (~4.8B params) takes ~10 GB in bf16 and fits one 80 GB GPU;
    ``offload=True`` loads with ``device_map="auto"`` (accelerate) to spread it over GPU memory and CPU RAM.
    """

    def __init__(
        self,
        name_or_path: str = "t5-11b",
        max_length: int = 80,
        masked: bool = False,
        dtype: Union[None, str, torch.dtype] = None,
        device: Union[None, str, torch.device] = None,
        offload: bool = False,
        batch_size: int = 64,
    ):
        from transformers import AutoTokenizer, T5EncoderModel

        self.name_or_path = str(name_or_path)
        self.max_length = int(max_length)
        self.masked = bool(masked)
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
        if offload:
            self.model = T5EncoderModel.from_pretrained(self.name_or_path, dtype=self.dtype, device_map="auto",
                                                         use_safetensors=True)
            first = self.model.get_input_embeddings().weight.device  # accelerate hooks move inputs onward
            self.device = first if first.type != "meta" else torch.device("cpu")
        else:
            self.model = T5EncoderModel.from_pretrained(self.name_or_path, dtype=self.dtype,
                                                         use_safetensors=True).to(self.device)
        self.model.eval().requires_grad_(False)
        self.dim = int(self.model.config.d_model)

    @property
    def spec(self) -> dict:
        return {"type": "t5", "name_or_path": _spec_path(self.name_or_path), "max_length": self.max_length,
                "masked": self.masked, "dim": self.dim}

    def weights_fingerprint(self, content_hash: bool = False) -> dict:
        """Local folder: its files' stamps; a hub name: the resolved commit of the loaded snapshot."""
        out = {"type": "t5", "weights": weights_fingerprint(self.name_or_path, content_hash=content_hash)}
        if "name" in out["weights"]:
            out["commit"] = getattr(self.model.config, "_commit_hash", None) or ""
        return out

    def tokenize(self, texts: Sequence[str]) -> dict:
        """Captions -> input_ids, attention_mask (B, max_length), padded to max_length, truncated."""
        return self.tokenizer(list(texts), padding="max_length", max_length=self.max_length,
                              truncation=True, return_tensors="pt")

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> (B, max_length, d_model) float32 token states."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        chunks = []
        for batch in _batches(texts, self.batch_size):
            tokens = self.tokenize(batch)
            input_ids = tokens["input_ids"].to(self.device)  # (B, L)
            if self.masked:
                mask = tokens["attention_mask"].to(self.device)  # (B, L)
                hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, L, E)
                hidden = hidden * mask[..., None].to(hidden.dtype)
            else:
                hidden = self.model(input_ids=input_ids).last_hidden_state  # (B, L, E)
            chunks.append(hidden.float())
        if not chunks:
            return torch.zeros(0, self.max_length, self.dim)
        return torch.cat(chunks)


class CLIPTokenTextEncoder:
    """Per-token states of an open_clip text tower (after ln_final, before pooling / projection).

    Tokens are the model's own (context length of its text_cfg); the states are truncated, or zero-padded,
    to ``max_length`` (default: the context length).
    """

    def __init__(
        self,
        model: str,
        pretrained: str = "",
        max_length: Optional[int] = None,
        dtype: Union[None, str, torch.dtype] = None,
        device: Union[None, str, torch.device] = None,
        batch_size: int = 256,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_name, self.pretrained = model, pretrained or ""
        self.model, _, self.tokenizer = load_open_clip(model, pretrained, device=self.device, dtype=self.dtype)
        if not hasattr(self.model, "forward_intermediates") or getattr(self.model, "text", None) is not None \
                and not hasattr(self.model.text, "forward_intermediates"):
            raise ValueError(f"model {model!r}: its text tower has no forward_intermediates (HF text towers "
                             "are not supported by CLIPTokenTextEncoder)")
        self.context_length = int(getattr(self.tokenizer, "context_length", None) or
                                  getattr(self.model, "context_length"))
        self.max_length = int(max_length) if max_length is not None else self.context_length
        self.batch_size = int(batch_size)
        text = getattr(self.model, "text", None)
        width = getattr(text, "width", None) if text is not None else self.model.transformer.width
        self.dim = int(width)

    @property
    def spec(self) -> dict:
        return {"type": "clip-tokens", "model": _spec_path(self.model_name), "pretrained": _spec_path(self.pretrained),
                "max_length": self.max_length, "dim": self.dim}

    def weights_fingerprint(self, content_hash: bool = False) -> dict:
        """Which weights (``encoders.weights_fingerprint`` of the open_clip folder / checkpoint / tag)."""
        return {"type": "clip-tokens", **_open_clip_fingerprint(self.model_name, self.pretrained, content_hash)}

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> (B, max_length, width) float32 final-layer token states (ln_final applied)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        chunks = []
        for batch in _batches(texts, self.batch_size):
            tokens = self.tokenizer(batch).to(self.device)  # (B, context_length)
            out = self.model.forward_intermediates(text=tokens, text_indices=1, normalize_intermediates=True,
                                                   intermediates_only=True)
            hidden = out["text_intermediates"][-1].float()  # (B, context_length, width)
            hidden = hidden[:, : self.max_length]
            if hidden.shape[1] < self.max_length:
                pad = hidden.new_zeros(hidden.shape[0], self.max_length - hidden.shape[1], hidden.shape[2])
                hidden = torch.cat([hidden, pad], dim=1)
            chunks.append(hidden)  # (B, max_length, width)
        if not chunks:
            return torch.zeros(0, self.max_length, self.dim)
        return torch.cat(chunks)


TextEncoder = Union[T5TextEncoder, CLIPTokenTextEncoder, NoTextEncoder]


def build_text_encoder(name_or_path: Optional[str], **kwargs) -> TextEncoder:
    """"none" -> NoTextEncoder; "clip-tokens:<open_clip folder or name>" -> CLIPTokenTextEncoder; else T5."""
    if name_or_path is None or str(name_or_path).lower() in ("", "none"):
        return NoTextEncoder()
    name = str(name_or_path)
    if name.startswith(CLIP_TOKENS_PREFIX):
        kwargs.pop("masked", None)
        kwargs.pop("offload", None)
        return CLIPTokenTextEncoder(name[len(CLIP_TOKENS_PREFIX):], **kwargs)
    return T5TextEncoder(name, **kwargs)
