"""Embedding cache (DESIGN.md §4): embed an image folder once, train the prior from shards on disk.

Layout of ``cache_dir``::

    manifest.json                 encoders (specs), dims, counts, block_sizes, text_len, skipped images, shards
    null_embeddings.safetensors   null_clip_text (D,), null_text_tokens (L, E): encodings of the empty caption ""
    shard_00000.safetensors       clip_image (n, D), clip_text (m, D)   [clip_dtype, default float16]
                                  text_tokens (m, L, E) float16, caption_image (m,) int64 = shard-local image row
    shard_00000.json              file list of the shard's input images, embedded images (file_name, captions,
                                  metadata), skipped images (file_name, error); written last = shard done

Images are numbered densely (``image_index``) in file-name order over all shards, skipped images excluded.
``precompute`` is resumable: a shard whose .json exists and lists the same input files is not recomputed.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from .data import ImageRecord, read_image_folder

CACHE_FORMAT = "shifted-diffusion-embedding-cache"
CACHE_VERSION = 1
MANIFEST_NAME = "manifest.json"
NULL_NAME = "null_embeddings.safetensors"

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------
# writing


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def check_encoders(cached: dict, given: dict, cache_dir: PathLike) -> None:
    """Refuse a cache built with other encoders; the message names the first differing setting."""
    old, new = _flatten(json.loads(json.dumps(cached))), _flatten(json.loads(json.dumps(given)))
    for key in sorted(set(old) | set(new), key=lambda k: (not k.endswith(".type"), k)):  # type first
        if old.get(key) != new.get(key):
            raise ValueError(
                f"embedding cache {str(cache_dir)!r} was built with encoders.{key}={old.get(key)!r}, but the given "
                f"encoders have encoders.{key}={new.get(key)!r}; use another cache_dir (or delete this one) "
                "to embed with these encoders")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _save_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class _PixelDataset(Dataset):
    """Records -> (position, one preprocessed tensor per transform, or the error of an unreadable image)."""

    def __init__(self, records: Sequence[ImageRecord], transforms: Sequence):
        self.records, self.transforms = records, list(transforms)  # picklable for DataLoader workers

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        from PIL import Image

        try:
            with Image.open(self.records[i].path) as image:
                image.load()
                image = image.convert("RGB")
                pixels = [transform(image) for transform in self.transforms]
            return i, pixels, None
        except Exception as e:  # any unreadable / corrupt file is reported, never dropped silently
            return i, None, f"{type(e).__name__}: {e}"


def _collate_list(items):
    return items


def _shard_done(cache_dir: Path, name: str, files: list[str]) -> Optional[dict]:
    info_path, tensor_path = cache_dir / f"{name}.json", cache_dir / f"{name}.safetensors"
    if not (info_path.is_file() and tensor_path.is_file()):
        return None
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return info if info.get("files") == files else None


def _embed_shard(records, clip, text_encoder, *, batch_size, num_workers, clip_dtype, pbar) -> tuple[dict, dict]:
    """Embed one shard's images and captions -> (tensors, info)."""
    loader = torch.utils.data.DataLoader(_PixelDataset(records, clip.transforms), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate_list)
    image_chunks, kept, skipped = [], [], []
    for batch in loader:
        ok = [(i, pixels) for i, pixels, error in batch if error is None]
        for i, _, error in batch:
            if error is not None:
                skipped.append({"file_name": records[i].file_name, "error": error})
        if ok:
            stacked = [torch.stack([p[t] for _, p in ok]) for t in range(len(ok[0][1]))]
            image_chunks.append(clip.encode_pixels(stacked).to("cpu", clip_dtype))  # (b, D)
            kept.extend(i for i, _ in ok)
        if pbar is not None:
            pbar.update(len(batch))
    captions, caption_image = [], []
    for row, i in enumerate(kept):
        captions.extend(records[i].captions)
        caption_image.extend([row] * len(records[i].captions))
    clip_text = clip.encode_text(captions).to("cpu", clip_dtype) if captions else \
        torch.zeros(0, clip.dim, dtype=clip_dtype)
    token_chunks = [text_encoder.encode(captions[s:s + batch_size]).to("cpu", torch.float16)
                    for s in range(0, len(captions), batch_size)]
    text_tokens = torch.cat(token_chunks) if token_chunks else \
        torch.zeros(0, text_encoder.max_length, text_encoder.dim, dtype=torch.float16)
    tensors = {
        "clip_image": torch.cat(image_chunks) if image_chunks else torch.zeros(0, clip.dim, dtype=clip_dtype),
        "clip_text": clip_text,  # (m, D)
        "text_tokens": text_tokens,  # (m, L, E)
        "caption_image": torch.tensor(caption_image, dtype=torch.long),  # (m,)
    }
    info = {
        "files": [r.file_name for r in records],
        "images": [{"file_name": records[i].file_name, "captions": list(records[i].captions),
                    "metadata": records[i].metadata} for i in kept],
        "skipped": skipped,
        "num_images": len(kept),
        "num_captions": len(captions),
    }
    return tensors, info


def precompute(
    folder: PathLike,
    cache_dir: PathLike,
    clip,
    text_encoder,
    *,
    shard_size: int = 4096,
    batch_size: int = 256,
    progress: bool = True,
    image_column: str = "file_name",
    caption_column: str = "text",
    clip_dtype: torch.dtype = torch.float16,
    num_workers: int = 0,
) -> dict:
    """Embed ``folder`` (CLIP image, CLIP text per caption, word-level tokens) into shards -> manifest.

    ``clip``: a ``MultiCLIP``-like encoder (``spec``, ``dim``, ``block_sizes``, ``transforms``,
    ``encode_pixels``, ``encode_text``); ``text_encoder``: ``.encode(list[str]) -> (B, L, E)``, ``.spec``,
    ``.dim``, ``.max_length``. ``clip_dtype`` is the storage dtype of the CLIP embeddings (float16 keeps
    ~3 significant digits, plenty for x0 and the vocabulary); text tokens are always stored in float16.
    A shard holds ``shard_size`` input images (all their captions) and is held in RAM while it is built:
    with T5 80 x 1024 tokens that is ~164 KB per caption. ``num_workers`` > 0 decodes and preprocesses
    images in DataLoader worker processes. Unreadable images are skipped, listed in the manifest and warned
    about. Re-running with the same encoders resumes; with different encoders it raises ValueError.
    """
    from tqdm.auto import tqdm

    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size: expected >= 1, got {shard_size} and {batch_size}")
    records = read_image_folder(folder, image_column=image_column, caption_column=caption_column)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    encoders = {"clip": clip.spec, "text": text_encoder.spec}
    manifest_path = cache_dir / MANIFEST_NAME
    if manifest_path.is_file():
        with open(manifest_path, encoding="utf-8") as f:
            previous = json.load(f)
        if previous.get("format") != CACHE_FORMAT:
            raise ValueError(f"{manifest_path} is not a {CACHE_FORMAT} manifest")
        check_encoders(previous["encoders"], encoders, cache_dir)
    manifest = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "complete": False, "encoders": encoders,
        "source": str(Path(folder).resolve()), "image_column": image_column, "caption_column": caption_column,
        "clip_dim": int(clip.dim), "block_sizes": list(clip.block_sizes),
        "text_len": int(text_encoder.max_length), "text_dim": int(text_encoder.dim),
        "clip_dtype": str(clip_dtype).replace("torch.", ""), "text_dtype": "float16", "shard_size": shard_size,
        # compute precision, informational only (not compared on resume: bf16 vs fp16 differ by rounding)
        "encoder_dtypes": {"clip": str(getattr(clip, "dtype", "")).replace("torch.", ""),
                           "text": str(getattr(text_encoder, "dtype", "")).replace("torch.", "")},
    }
    _write_json(manifest_path, manifest)  # written first: an interrupted cache still names its encoders

    null_clip_text = clip.encode_text([""])[0].to("cpu", torch.float32)  # (D,)
    null_text_tokens = text_encoder.encode([""])[0].to("cpu", torch.float32)  # (L, E)
    _save_tensors(cache_dir / NULL_NAME, {"null_clip_text": null_clip_text, "null_text_tokens": null_text_tokens})

    shards, skipped, reused, computed = [], [], 0, 0
    num_captioned = 0
    pbar = tqdm(total=len(records), desc="embedding images", unit="img", disable=not progress)
    for shard_id, start in enumerate(range(0, len(records), shard_size)):
        chunk = records[start:start + shard_size]
        name = f"shard_{shard_id:05d}"
        info = _shard_done(cache_dir, name, [r.file_name for r in chunk])
        if info is not None:
            reused += 1
            pbar.update(len(chunk))
        else:
            tensors, info = _embed_shard(chunk, clip, text_encoder, batch_size=batch_size, num_workers=num_workers,
                                         clip_dtype=clip_dtype, pbar=pbar)
            _save_tensors(cache_dir / f"{name}.safetensors", tensors)
            _write_json(cache_dir / f"{name}.json", info)  # last: marks the shard finished
            computed += 1
        skipped.extend(info["skipped"])
        num_captioned += sum(1 for image in info["images"] if image["captions"])
        shards.append({"name": name, "num_images": info["num_images"], "num_captions": info["num_captions"]})
    pbar.close()

    num_images = sum(s["num_images"] for s in shards)
    manifest.update({
        "complete": True, "shards": shards, "null_file": NULL_NAME,
        "num_images": num_images, "num_captioned_images": num_captioned,
        "num_uncaptioned_images": num_images - num_captioned,
        "num_captions": sum(s["num_captions"] for s in shards),
        "num_skipped": len(skipped), "skipped": skipped,
        "last_run": {"shards_computed": computed, "shards_reused": reused},
    })
    _write_json(manifest_path, manifest)
    if skipped:
        listed = "; ".join(f"{s['file_name']} ({s['error']})" for s in skipped[:20])
        more = f"; ... {len(skipped) - 20} more" if len(skipped) > 20 else ""
        warnings.warn(f"precompute: skipped {len(skipped)} unreadable image(s) of {len(records)} "
                      f"(listed in {manifest_path}): {listed}{more}", stacklevel=2)
    if num_images == 0:
        raise ValueError(f"image folder {str(folder)!r}: none of its {len(records)} images could be read")
    return manifest


# ----------------------------------------------------------------------------------------------
# reading


def load_manifest(cache_dir: PathLike) -> dict:
    """The manifest of a finished cache (clear error when missing or interrupted)."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the cache with precompute() first")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not a {CACHE_FORMAT} manifest")
    if not manifest.get("complete"):
        raise ValueError(f"embedding cache {str(cache_dir)!r} is incomplete (precompute was interrupted); "
                         "rerun precompute to finish it")
    return manifest


def load_null_embeddings(cache_dir: PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(null_clip_text (D,), null_text_tokens (L, E)) float32: the encodings of the empty caption ""."""
    from safetensors.torch import load_file

    manifest = load_manifest(cache_dir)
    tensors = load_file(str(Path(cache_dir) / manifest["null_file"]))
    return tensors["null_clip_text"], tensors["null_text_tokens"]


def load_image_embeddings(cache_dir: PathLike) -> torch.Tensor:
    """All embedded images' CLIP embeddings (N, D) float32, captioned or not, in image_index order."""
    from safetensors import safe_open

    manifest = load_manifest(cache_dir)
    chunks = []
    for shard in manifest["shards"]:
        with safe_open(str(Path(cache_dir) / f"{shard['name']}.safetensors"), framework="pt") as f:
            chunks.append(f.get_tensor("clip_image").float())
    return torch.cat(chunks) if chunks else torch.zeros(0, manifest["clip_dim"])


def load_image_records(cache_dir: PathLike) -> list[dict]:
    """Per embedded image (image_index order): {"file_name", "captions", "metadata"}."""
    manifest = load_manifest(cache_dir)
    records = []
    for shard in manifest["shards"]:
        with open(Path(cache_dir) / f"{shard['name']}.json", encoding="utf-8") as f:
            records.extend(json.load(f)["images"])
    return records


def split_image_indices(
    num_images: int, val_fraction: float = 0.05, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic held-out split by image: (train image indices, val image indices), each sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected in [0, 1), got {val_fraction}")
    num_val = int(round(val_fraction * num_images))
    if val_fraction > 0 and num_images > 1:
        num_val = min(max(num_val, 1), num_images - 1)
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return perm[num_val:].sort().values, perm[:num_val].sort().values


class EmbeddingDataset(Dataset):
    """(image, caption) pairs of a cache: clip_image (D,), clip_text (D,), text_tokens (L, E) float32,
    image_index, caption_index (long scalars).

    ``split``: None / "all" (every pair), "train" / "val" (held-out images from ``split_image_indices``
    with ``val_fraction``, ``seed``), or a sequence of image indices. Shards are memory-mapped and read
    per item; ``in_memory=True`` loads them whole (fast for small caches).
    """

    def __init__(
        self,
        cache_dir: PathLike,
        split: Union[None, str, Sequence[int], torch.Tensor] = None,
        *,
        val_fraction: float = 0.05,
        seed: int = 0,
        in_memory: bool = False,
    ):
        from safetensors import safe_open

        self.cache_dir = Path(cache_dir)
        self.manifest = load_manifest(cache_dir)
        self.clip_dim = int(self.manifest["clip_dim"])
        self.block_sizes = list(self.manifest["block_sizes"])
        self.text_len, self.text_dim = int(self.manifest["text_len"]), int(self.manifest["text_dim"])
        self.null_clip_text, self.null_text_tokens = load_null_embeddings(cache_dir)
        self.num_images = int(self.manifest["num_images"])
        self._paths = [str(self.cache_dir / f"{s['name']}.safetensors") for s in self.manifest["shards"]]

        shard_ids, caption_rows, image_rows, image_index = [], [], [], []
        offset = 0
        for shard_id, (shard, path) in enumerate(zip(self.manifest["shards"], self._paths)):
            with safe_open(path, framework="pt") as f:
                caption_image = f.get_tensor("caption_image")  # (m,) shard-local image row
            m = caption_image.shape[0]
            shard_ids.append(torch.full((m,), shard_id, dtype=torch.long))
            caption_rows.append(torch.arange(m))
            image_rows.append(caption_image)
            image_index.append(caption_image + offset)
            offset += shard["num_images"]
        cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
        self.pair_shard, self.pair_caption_row = cat(shard_ids), cat(caption_rows)
        self.pair_image_row, self.pair_image_index = cat(image_rows), cat(image_index)

        self.image_indices = self._split_images(split, val_fraction, seed)  # (n,) image indices in this split
        keep = torch.isin(self.pair_image_index, self.image_indices)
        self.pairs = keep.nonzero().flatten()  # (P,) positions into the pair_* tables
        self._handles: dict = {}
        self._tensors: Optional[list] = None
        if in_memory:
            from safetensors.torch import load_file
            self._tensors = [load_file(p) for p in self._paths]

    def _split_images(self, split, val_fraction, seed) -> torch.Tensor:
        if split is None or (isinstance(split, str) and split == "all"):
            return torch.arange(self.num_images)
        if isinstance(split, str):
            if split not in ("train", "val"):
                raise ValueError(f"split: expected None, 'all', 'train', 'val' or image indices, got {split!r}")
            train, val = split_image_indices(self.num_images, val_fraction, seed)
            return train if split == "train" else val
        indices = torch.as_tensor(split, dtype=torch.long).flatten()
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.num_images):
            raise ValueError(f"split: image indices must be in [0, {self.num_images}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return indices

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}  # safetensors handles are reopened in each DataLoader worker
        return state

    def _get(self, shard_id: int, key: str, row: int) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[shard_id][key][row]
        handle = self._handles.get(shard_id)
        if handle is None:
            from safetensors import safe_open
            handle = self._handles[shard_id] = safe_open(self._paths[shard_id], framework="pt")
        return handle.get_slice(key)[row:row + 1][0]

    def __len__(self) -> int:
        return int(self.pairs.numel())

    def __getitem__(self, i: int) -> dict:
        p = int(self.pairs[i])
        shard_id = int(self.pair_shard[p])
        caption_row, image_row = int(self.pair_caption_row[p]), int(self.pair_image_row[p])
        return {
            "clip_image": self._get(shard_id, "clip_image", image_row).float(),  # (D,)
            "clip_text": self._get(shard_id, "clip_text", caption_row).float(),  # (D,)
            "text_tokens": self._get(shard_id, "text_tokens", caption_row).float(),  # (L, E)
            "image_index": self.pair_image_index[p].clone(),  # dense index over embedded images
            "caption_index": torch.tensor(p),  # index into the flattened captions of load_image_records
        }
