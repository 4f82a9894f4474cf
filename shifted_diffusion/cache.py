"""Embedding cache: embed an image folder once, train the prior from shards on disk.

Layout of ``cache_dir`` (format version 3)::

    manifest.json                 format, version, encoders (specs), encoder_weights (fingerprints), source
                                  (resolved image folder), dims, counts, block_sizes, text_len, skipped images,
                                  shards [{name, num_images, num_captions, tensor_bytes}]
    null_embeddings.safetensors   null_clip_text (D,), null_text_tokens (L, E): encodings of the empty caption ""
    shard_00000.safetensors       clip_image (n, D), clip_text (m, D)   [clip_dtype, default float16]
                                  text_tokens (T, E) [text_dtype, default float16]: each caption's token states
                                  without its trailing all-zero rows, captions one after another;
                                  text_offsets (m + 1,) int64: caption j's rows are [offsets[j], offsets[j+1]);
                                  caption_image (m,) int64 = shard-local image row
    shard_00000.json              version, encoders, encoder_weights, source, clip_dtype; inputs (per input image:
                                  file_name, size, mtime_ns), embedded images (file_name, captions, metadata),
                                  skipped images (file_name, error), tensor_bytes; written last = shard done

Images are numbered densely (``image_index``) in file-name order over all shards, skipped images excluded.
A caption's (L, E) token states are padded back with zero rows when read: exact. A masked encoder (T5 with
``t5_masked``) zeroes its pad positions, so only the real tokens are stored; an unmasked one (the paper's) has
no zero rows and keeps all L positions.

With ``num_processes`` > 1 (``torch.distributed`` initialised, e.g. under ``accelerate launch``) every process
embeds every ``num_processes``-th shard; the main process then writes the manifest. The files are byte for
byte those one process writes.

``precompute`` never serves stale data. It refuses (ValueError naming the cache, what differs and the fix) a
cache built from another source folder, with other encoders (``spec``) or other encoder weights
(``weights_fingerprint``: size + mtime of local weight files, SHA-256 with ``weights_content_hash=True``),
or by another format version. It reuses a finished shard only when its record matches: same input files
with the same size and mtime, same captions and metadata, same clip_dtype, a readable record and tensor
file of the recorded size and shapes; any other shard is recomputed, with a warning naming it and why
(a missing record, as after a kill, is recomputed silently). Writes are atomic (tmp file, fsync, rename)
and the record is written last, so a killed run resumes bit-exactly. Embeddings are checked for NaN / inf
when a shard is written and when a cache is opened (``EmbeddingDataset``, ``load_image_embeddings``);
corrupt or truncated files raise ``CacheFileError`` naming the file and how to rebuild it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from .data import ImageRecord, open_rgb, read_image_folder
from .encoders import fingerprint_difference
from .files import save_tensors, write_json
from .webdata import files_root, location, source_name, stat_path

CACHE_FORMAT = "shifted-diffusion-embedding-cache"
CACHE_VERSION = 3
MANIFEST_NAME = "manifest.json"
NULL_NAME = "null_embeddings.safetensors"
SHARD_KEYS = ("clip_image", "clip_text", "text_tokens", "text_offsets", "caption_image")
TEXT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

PathLike = Union[str, os.PathLike]


class CacheFileError(ValueError):
    """A cache file is missing, truncated or corrupt (the message names it and how to rebuild it)."""


def _rebuild_hint(path: Path) -> str:
    return (f"rerun precompute (train.py does it) with the same image folder and encoders: it recomputes "
            f"this file; or delete {str(path.parent)!r} to rebuild the whole cache")


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


def _plain(obj):
    """JSON round trip (tuples -> lists, keys -> str): how a value compares once read back from a record."""
    return json.loads(json.dumps(obj))


def check_encoders(cached: dict, given: dict, cache_dir: PathLike) -> None:
    """Refuse a cache built with other encoders; the message names the first differing setting."""
    old, new = _flatten(_plain(cached)), _flatten(_plain(given))
    for key in sorted(set(old) | set(new), key=lambda k: (not k.endswith(".type"), k)):  # type first
        if old.get(key) != new.get(key):
            raise ValueError(
                f"embedding cache {str(cache_dir)!r} was built with encoders.{key}={old.get(key)!r}, but the given "
                f"encoders have encoders.{key}={new.get(key)!r}; use another cache_dir (or delete this one) "
                "to embed with these encoders")


def encoder_weights(encoder, content_hash: bool = False) -> dict:
    """An encoder's ``weights_fingerprint()`` ({} for encoders without one)."""
    method = getattr(encoder, "weights_fingerprint", None)
    return _plain(method(content_hash=content_hash)) if method is not None else {}


def check_encoder_weights(cached: dict, given: dict, cache_dir: PathLike) -> None:
    """Refuse a cache built with other encoder weights (e.g. a CLIP retrained in the same folder)."""
    difference = fingerprint_difference(cached, given, "encoder_weights")
    if difference:
        raise ValueError(f"embedding cache {str(cache_dir)!r} was built with other encoder weights "
                         f"({difference}); use another cache_dir (or delete this one) to embed with these weights")


def check_source(cached: str, given: str, cache_dir: PathLike) -> None:
    """Refuse a cache built from another image folder."""
    if cached != given:
        raise ValueError(f"embedding cache {str(cache_dir)!r} was built from the image folder {cached!r}, not "
                         f"from {given!r}; use another cache_dir (or delete this one) for this folder")


def _check_version(manifest: dict, path: Path) -> None:
    if manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not a {CACHE_FORMAT} manifest")
    version = manifest.get("version")
    if version != CACHE_VERSION:
        age = "an older" if isinstance(version, int) and version < CACHE_VERSION else "another"
        raise ValueError(f"embedding cache {str(path.parent)!r} was built by {age} version of shifted_diffusion "
                         f"(cache format version {version}, this one reads version {CACHE_VERSION}); "
                         "delete it or use another cache_dir")


def file_fingerprint(path) -> dict:
    """{"size", "mtime_ns"} of an image file (of its tar for a ``webdata.TarMember``), or {"size": None,
    "mtime_ns": None} when it does not exist."""
    try:
        stat = os.stat(stat_path(path))
    except OSError:
        return {"size": None, "mtime_ns": None}
    return {"size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}


class _PixelDataset(Dataset):
    """Records -> (position, one preprocessed tensor per transform, or the error of an unreadable image)."""

    def __init__(self, records: Sequence[ImageRecord], transforms: Sequence):
        self.records, self.transforms = records, list(transforms)  # picklable for DataLoader workers

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        try:
            image = open_rgb(self.records[i].path)  # 16-bit / float images scaled to 8 bits
            pixels = [transform(image) for transform in self.transforms]
            return i, pixels, None
        except Exception as e:  # any unreadable / corrupt file is reported, never dropped silently
            return i, None, f"{type(e).__name__}: {e}"


def _collate_list(items):
    return items


def _nonfinite_rows(tensor: torch.Tensor) -> list[int]:
    """Rows (first dim) of ``tensor`` holding a NaN or an infinity."""
    if tensor.numel() == 0:
        return []
    bad = ~torch.isfinite(tensor.float().reshape(tensor.shape[0], -1)).all(dim=1)
    return bad.nonzero().flatten().tolist()


def _listed(items: list, limit: int = 10) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(str(x) for x in items[:limit]) + more


def _check_finite_shard(name: str, tensors: dict, image_names: list[str], captions: list[tuple[str, str]]) -> None:
    """Refuse to write non-finite embeddings: name the shard, the image files and the captions."""
    problems = []
    rows = _nonfinite_rows(tensors["clip_image"])
    if rows:
        problems.append(f"clip_image of {len(rows)} image(s): {_listed([image_names[r] for r in rows])}")
    for key in ("clip_text", "text_tokens"):
        rows = _nonfinite_rows(tensors[key])
        if rows:
            described = [f"caption {r} ({captions[r][0]}: {captions[r][1]!r})" for r in rows]
            problems.append(f"{key} of {len(rows)} caption(s): {_listed(described)}")
    if problems:
        raise ValueError(f"precompute: {name}: the encoders produced NaN / inf embeddings ({'; '.join(problems)}), "
                         f"after conversion to the storage dtypes ({tensors['clip_image'].dtype}, "
                         f"{tensors['text_tokens'].dtype}; float16 overflows above 65504); nothing was written for "
                         "this shard. Check the encoders (weights, encoder_dtype) or store in float32 / bfloat16 "
                         "(clip_dtype, text_dtype)")


def trim_token_states(text_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, L, E) token states -> (rows (T, E): each caption without its trailing all-zero rows, offsets (m + 1,))."""
    m, length = text_tokens.shape[:2]
    nonzero = (text_tokens != 0).flatten(2).any(dim=2) if text_tokens.numel() else \
        torch.zeros(m, length, dtype=torch.bool)  # (m, L)
    positions = torch.arange(1, length + 1).expand(m, length)
    lengths = (positions * nonzero).amax(dim=1) if length else torch.zeros(m, dtype=torch.long)  # (m,)
    offsets = torch.zeros(m + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    keep = positions <= lengths[:, None]  # (m, L): the first lengths[j] positions of caption j
    return text_tokens[keep], offsets  # boolean indexing keeps row-major (caption, position) order


def pad_token_states(rows: torch.Tensor, length: int) -> torch.Tensor:
    """One caption's stored rows (l, E) -> (length, E), padded with zero rows."""
    if rows.shape[0] == length:
        return rows
    return torch.cat([rows, rows.new_zeros(length - rows.shape[0], rows.shape[1])])


def _embed_shard(records, clip, text_encoder, *, name, batch_size, num_workers, clip_dtype, text_dtype,
                 pbar) -> tuple[dict, dict]:
    """Embed one shard's images and captions -> (tensors, info); refuses non-finite embeddings."""
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
    captions, caption_image, caption_owner = [], [], []
    for row, i in enumerate(kept):
        captions.extend(records[i].captions)
        caption_image.extend([row] * len(records[i].captions))
        caption_owner.extend([records[i].file_name] * len(records[i].captions))
    clip_text = clip.encode_text(captions).to("cpu", clip_dtype) if captions else \
        torch.zeros(0, clip.dim, dtype=clip_dtype)
    token_chunks = [text_encoder.encode(captions[s:s + batch_size]).to("cpu", text_dtype)
                    for s in range(0, len(captions), batch_size)]
    text_tokens = torch.cat(token_chunks) if token_chunks else \
        torch.zeros(0, text_encoder.max_length, text_encoder.dim, dtype=text_dtype)
    tensors = {
        "clip_image": torch.cat(image_chunks) if image_chunks else torch.zeros(0, clip.dim, dtype=clip_dtype),
        "clip_text": clip_text,  # (m, D)
        "text_tokens": text_tokens,  # (m, L, E) here; trimmed below
        "caption_image": torch.tensor(caption_image, dtype=torch.long),  # (m,)
    }
    _check_finite_shard(name, tensors, [records[i].file_name for i in kept], list(zip(caption_owner, captions)))
    tensors["text_tokens"], tensors["text_offsets"] = trim_token_states(text_tokens)  # (T, E), (m + 1,)
    info = {
        "images": [{"file_name": records[i].file_name, "captions": list(records[i].captions),
                    "metadata": records[i].metadata} for i in kept],
        "skipped": skipped,
        "num_images": len(kept),
        "num_captions": len(captions),
    }
    return tensors, info


# ---------------------------------------------------------------------------------------------- shard reuse


def _read_shard_info(path: Path) -> dict:
    """A shard record (CacheFileError naming the file when it is unreadable, truncated or not a record)."""
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheFileError(f"{path}: unreadable or corrupt shard record ({type(e).__name__}: {e}); "
                             f"{_rebuild_hint(path)}") from e
    if not isinstance(info, dict) or not {"images", "skipped", "num_images", "num_captions"} <= set(info):
        raise CacheFileError(f"{path}: not a shard record (keys {sorted(info) if isinstance(info, dict) else info!r}); "
                             f"{_rebuild_hint(path)}")
    return info


def _open_tensors(path: Path):
    """safe_open of a cache tensor file, errors turned into CacheFileError naming the file."""
    from safetensors import safe_open

    if not path.is_file():
        raise CacheFileError(f"{path}: missing; {_rebuild_hint(path)}")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError (truncated / garbage header), OSError
        raise CacheFileError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {e}); "
                             f"{_rebuild_hint(path)}") from e


def _check_shard_header(path: Path, num_images: int, num_captions: int, tensor_bytes: Optional[int],
                        clip_dim: int, text_shape: tuple) -> None:
    """Tensor file of the recorded size with the recorded keys and shapes (reads the header only)."""
    if tensor_bytes is not None and path.is_file() and path.stat().st_size != tensor_bytes:
        raise CacheFileError(f"{path}: {path.stat().st_size} bytes, the record says {tensor_bytes} (truncated or "
                             f"replaced); {_rebuild_hint(path)}")
    with _open_tensors(path) as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    text_rows = shapes.get("text_tokens", (None,))[0]  # captions' stored rows: at most L each
    expected = {"clip_image": (num_images, clip_dim), "clip_text": (num_captions, clip_dim),
                "text_tokens": (text_rows, text_shape[1]), "text_offsets": (num_captions + 1,),
                "caption_image": (num_captions,)}
    for key, shape in expected.items():
        if shapes.get(key) != shape or key == "text_tokens" and not 0 <= text_rows <= num_captions * text_shape[0]:
            shown = shape if key != "text_tokens" else f"(<= {num_captions} x {text_shape[0]}, {text_shape[1]})"
            raise CacheFileError(f"{path}: tensor {key} has shape {shapes.get(key)}, expected {shown}; "
                                 f"{_rebuild_hint(path)}")


def _stale_reason(info: dict, chunk: Sequence[ImageRecord], fingerprints: list[dict], context: dict) -> Optional[str]:
    """Why a readable shard record does not match the current images / captions / encoders (None: it matches)."""
    for key in ("source", "clip_dtype", "text_dtype"):
        if info.get(key) != context[key]:
            return f"built with {key}={info.get(key)!r}, now {context[key]!r}"
    if _plain(info.get("encoders")) != _plain(context["encoders"]):
        return "built with other encoders"
    difference = fingerprint_difference(info.get("encoder_weights"), context["encoder_weights"], "encoder_weights")
    if difference:
        return f"built with other encoder weights ({difference})"
    inputs = info.get("inputs", [])
    names = [r.file_name for r in chunk]
    if [x.get("file_name") for x in inputs] != names:
        old = [x.get("file_name") for x in inputs]
        first = next((i for i, (a, b) in enumerate(zip(old, names)) if a != b), min(len(old), len(names)))
        return (f"its image files changed (shard_size or the folder's file list: at position {first} it has "
                f"{old[first] if first < len(old) else None!r}, now {names[first] if first < len(names) else None!r})")
    for record, old, new in zip(chunk, inputs, fingerprints):
        if (old.get("size"), old.get("mtime_ns")) != (new["size"], new["mtime_ns"]):
            return (f"image {record.file_name} changed since it was embedded (size {old.get('size')} -> "
                    f"{new['size']}, mtime_ns {old.get('mtime_ns')} -> {new['mtime_ns']})")
    by_name = {r.file_name: r for r in chunk}
    for image in info["images"]:
        record = by_name.get(image["file_name"])
        if record is None:
            return f"its record lists {image['file_name']}, which is not among its input files"
        if image["captions"] != list(record.captions):
            return f"the captions of {record.file_name} changed ({image['captions']!r} -> {list(record.captions)!r})"
        if _plain(image["metadata"]) != _plain(record.metadata):
            return f"the metadata of {record.file_name} changed ({image['metadata']!r} -> {record.metadata!r})"
    return None


def _reusable_shard(cache_dir: Path, name: str, chunk: Sequence[ImageRecord], fingerprints: list[dict],
                    context: dict, dims: dict) -> tuple[Optional[dict], Optional[str]]:
    """(record, None) of a finished shard that matches; (None, why) otherwise (why None: not built yet)."""
    info_path, tensor_path = cache_dir / f"{name}.json", cache_dir / f"{name}.safetensors"
    if not info_path.is_file():
        return None, None
    try:
        info = _read_shard_info(info_path)
        reason = _stale_reason(info, chunk, fingerprints, context)
        if reason is None:
            _check_shard_header(tensor_path, info["num_images"], info["num_captions"], info.get("tensor_bytes"),
                                dims["clip_dim"], dims["text_shape"])
    except CacheFileError as e:
        return None, str(e)
    return (info, None) if reason is None else (None, reason)


def _read_previous_manifest(path: Path) -> Optional[dict]:
    """The manifest of an earlier run: None when absent, or corrupt (warned: it is rebuilt, shards are
    checked one by one against their own records); ValueError for another format or version."""
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(f"precompute: {path} is corrupt ({type(e).__name__}: {e}); rebuilding it (each shard is "
                      "reused only if its own record matches the images and encoders)", stacklevel=3)
        return None
    if not isinstance(previous, dict):
        warnings.warn(f"precompute: {path} is not a manifest object; rebuilding it", stacklevel=3)
        return None
    _check_version(previous, path)
    return previous


def _write_null_embeddings(cache_dir: Path, clip, text_encoder) -> None:
    """The encodings of the empty caption "" (the unconditional inputs), checked finite."""
    null_clip_text = clip.encode_text([""])[0].to("cpu", torch.float32)  # (D,)
    null_text_tokens = text_encoder.encode([""])[0].to("cpu", torch.float32)  # (L, E)
    if not (torch.isfinite(null_clip_text).all() and torch.isfinite(null_text_tokens).all()):
        raise ValueError("precompute: the encoders produced NaN / inf for the empty caption \"\" (null_clip_text "
                         f"finite: {bool(torch.isfinite(null_clip_text).all())}, null_text_tokens finite: "
                         f"{bool(torch.isfinite(null_text_tokens).all())}); check the encoders (weights, encoder_dtype)")
    save_tensors(cache_dir / NULL_NAME, {"null_clip_text": null_clip_text, "null_text_tokens": null_text_tokens})


class _ProcessGroup:
    """Barrier and gather-to-main over ``torch.distributed`` when ``num_processes`` > 1 (no-ops for one)."""

    def __init__(self, process_index: int, num_processes: int):
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index}: expected in [0, num_processes={num_processes})")
        if num_processes > 1:
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() != num_processes:
                raise ValueError(f"precompute with num_processes={num_processes}: torch.distributed must be "
                                 "initialised with that many processes (launch with accelerate / torchrun)")
        self.process_index, self.num_processes = process_index, num_processes

    def barrier(self) -> None:
        if self.num_processes > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj) -> Optional[list]:
        if self.num_processes == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.num_processes if self.process_index == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out


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
    text_dtype: torch.dtype = torch.float16,
    num_workers: int = 0,
    weights_content_hash: bool = False,
    process_index: int = 0,
    num_processes: int = 1,
) -> dict:
    """Embed ``folder`` (CLIP image, CLIP text per caption, word-level tokens) into shards -> manifest.

    ``clip``: a ``MultiCLIP``-like encoder (``spec``, ``dim``, ``block_sizes``, ``transforms``,
    ``encode_pixels``, ``encode_text``, ``weights_fingerprint``); ``text_encoder``: ``.encode(list[str]) ->
    (B, L, E)``, ``.spec``, ``.dim``, ``.max_length``, ``.weights_fingerprint``. ``clip_dtype`` is the storage
    dtype of the CLIP embeddings (float16 keeps ~3 significant digits, plenty for x0 and the vocabulary),
    ``text_dtype`` that of the token states (float16, bfloat16 or float32; trailing all-zero positions, the
    pads of a masked encoder, are not stored). A shard holds ``shard_size`` input images (all their
    captions) and is held in RAM while it is built: with T5 80 x 1024 tokens that is ~164 KB per caption.
    ``process_index`` / ``num_processes``: this process's share under ``torch.distributed`` (every process
    calls precompute with the same arguments and embeds shards ``process_index``, ``process_index +
    num_processes``, ...; the main process writes the manifest; all return it).
    ``num_workers`` > 0 decodes and preprocesses images in DataLoader worker processes. Unreadable images
    are skipped, listed in the manifest and warned about. Re-running resumes: matching shards are reused,
    stale or corrupt ones recomputed (warned); another source folder, other encoders or other encoder
    weights raise ValueError. ``weights_content_hash`` adds the SHA-256 of local weight files to their
    fingerprint (reads them in full; a copied folder with the same bytes then still matches).
    """
    from tqdm.auto import tqdm

    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size: expected >= 1, got {shard_size} and {batch_size}")
    if text_dtype not in TEXT_DTYPES.values():
        raise ValueError(f"text_dtype: expected one of {sorted(TEXT_DTYPES)}, got {text_dtype}")
    sync = _ProcessGroup(process_index, num_processes)
    main = process_index == 0
    records = read_image_folder(folder, image_column=image_column, caption_column=caption_column)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    encoders = _plain({"clip": clip.spec, "text": text_encoder.spec})
    weights = {"clip": encoder_weights(clip, weights_content_hash),
               "text": encoder_weights(text_encoder, weights_content_hash)}
    source = source_name(folder)
    source_root = str(files_root(folder))
    manifest_path = cache_dir / MANIFEST_NAME
    previous = _read_previous_manifest(manifest_path)
    if previous is not None:
        check_source(previous.get("source"), source, cache_dir)
        check_encoders(previous["encoders"], encoders, cache_dir)
        check_encoder_weights(previous.get("encoder_weights"), weights, cache_dir)
    clip_dtype_name = str(clip_dtype).replace("torch.", "")
    text_dtype_name = str(text_dtype).replace("torch.", "")
    manifest = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "complete": False, "encoders": encoders,
        "encoder_weights": weights, "source": source, "source_root": source_root,
        "image_column": image_column, "caption_column": caption_column,
        "clip_dim": int(clip.dim), "block_sizes": list(clip.block_sizes),
        "text_len": int(text_encoder.max_length), "text_dim": int(text_encoder.dim),
        "clip_dtype": clip_dtype_name, "text_dtype": text_dtype_name, "shard_size": shard_size,
        # compute precision, informational only (not compared on resume: bf16 vs fp16 differ by rounding)
        "encoder_dtypes": {"clip": str(getattr(clip, "dtype", "")).replace("torch.", ""),
                           "text": str(getattr(text_encoder, "dtype", "")).replace("torch.", "")},
    }
    if main:
        write_json(manifest_path, manifest)  # written first: an interrupted cache still names its encoders
        _write_null_embeddings(cache_dir, clip, text_encoder)

    context = {"version": CACHE_VERSION, "encoders": encoders, "encoder_weights": weights, "source": source,
               "clip_dtype": clip_dtype_name, "text_dtype": text_dtype_name}
    dims = {"clip_dim": int(clip.dim), "text_shape": (int(text_encoder.max_length), int(text_encoder.dim))}
    starts = list(range(0, len(records), shard_size))
    mine = [(shard_id, start) for shard_id, start in enumerate(starts) if shard_id % num_processes == process_index]
    done = {}  # shard id -> (summary for the manifest, computed?)
    pbar = tqdm(total=sum(len(records[start:start + shard_size]) for _, start in mine), desc="embedding images",
                unit="img", disable=not progress or not main)
    for shard_id, start in mine:
        chunk = records[start:start + shard_size]
        name = f"shard_{shard_id:05d}"
        fingerprints = [file_fingerprint(r.path) for r in chunk]  # before reading: a later edit makes it stale
        info, reason = _reusable_shard(cache_dir, name, chunk, fingerprints, context, dims)
        if info is not None:
            if _plain(info.get("encoder_weights")) != weights:  # same bytes (SHA-256), other stamps: refresh them
                info["encoder_weights"] = weights
                write_json(cache_dir / f"{name}.json", info)
            computed = False
            pbar.update(len(chunk))
        else:
            if reason is not None:
                warnings.warn(f"precompute: recomputing {cache_dir / name} ({name}.json / .safetensors): {reason}",
                              stacklevel=2)
            tensors, info = _embed_shard(chunk, clip, text_encoder, name=str(cache_dir / name), batch_size=batch_size,
                                         num_workers=num_workers, clip_dtype=clip_dtype, text_dtype=text_dtype,
                                         pbar=pbar)
            tensor_bytes = save_tensors(cache_dir / f"{name}.safetensors", tensors)
            info = {**context, "inputs": [{"file_name": r.file_name, **fp} for r, fp in zip(chunk, fingerprints)],
                    **info, "tensor_bytes": tensor_bytes}
            write_json(cache_dir / f"{name}.json", info)  # last: marks the shard finished
            computed = True
        summary = {"name": name, "num_images": info["num_images"], "num_captions": info["num_captions"],
                   "tensor_bytes": info["tensor_bytes"], "skipped": info["skipped"],
                   "num_captioned": sum(1 for image in info["images"] if image["captions"])}
        done[shard_id] = (summary, computed)
    pbar.close()

    gathered = sync.gather(done)  # main: every process's {shard id: (summary, computed)}; others: None
    if main:
        merged = {shard_id: entry for part in gathered for shard_id, entry in part.items()}
        summaries = [merged[shard_id] for shard_id in range(len(starts))]  # shard order, as one process writes
        shards = [{k: summary[k] for k in ("name", "num_images", "num_captions", "tensor_bytes")}
                  for summary, _ in summaries]
        skipped = [item for summary, _ in summaries for item in summary["skipped"]]
        num_images = sum(s["num_images"] for s in shards)
        num_captioned = sum(summary["num_captioned"] for summary, _ in summaries)
        computed = sum(1 for _, was_computed in summaries if was_computed)
        manifest.update({
            "complete": True, "shards": shards, "null_file": NULL_NAME,
            "num_images": num_images, "num_captioned_images": num_captioned,
            "num_uncaptioned_images": num_images - num_captioned,
            "num_captions": sum(s["num_captions"] for s in shards),
            "num_skipped": len(skipped), "skipped": skipped,
            "last_run": {"shards_computed": computed, "shards_reused": len(shards) - computed},
        })
        write_json(manifest_path, manifest)
        if skipped:
            listed = "; ".join(f"{s['file_name']} ({s['error']})" for s in skipped[:20])
            more = f"; ... {len(skipped) - 20} more" if len(skipped) > 20 else ""
            warnings.warn(f"precompute: skipped {len(skipped)} unreadable image(s) of {len(records)} "
                          f"(listed in {manifest_path}): {listed}{more}", stacklevel=2)
    sync.barrier()  # the manifest is written before anyone reads it
    if not main:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    num_images = manifest["num_images"]
    if num_images == 0:
        raise ValueError(f"image folder {str(folder)!r}: none of its {len(records)} images could be read")
    return manifest


# ----------------------------------------------------------------------------------------------
# reading


def load_manifest(cache_dir: PathLike) -> dict:
    """The manifest of a finished cache (clear error when missing, corrupt, of another version or interrupted)."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the cache with precompute() first")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheFileError(f"{path}: unreadable or corrupt manifest ({type(e).__name__}: {e}); rerun precompute "
                             "(train.py does it) with the same image folder and encoders to rebuild it (finished "
                             "shards are checked and reused)") from e
    if not isinstance(manifest, dict):
        raise CacheFileError(f"{path}: not a manifest (a JSON {type(manifest).__name__}); rerun precompute to rebuild it")
    _check_version(manifest, path)
    if not manifest.get("complete"):
        raise ValueError(f"embedding cache {str(cache_dir)!r} is incomplete (precompute was interrupted); "
                         "rerun precompute to finish it")
    return manifest


def load_null_embeddings(cache_dir: PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(null_clip_text (D,), null_text_tokens (L, E)) float32: the encodings of the empty caption ""."""
    manifest = load_manifest(cache_dir)
    path = Path(cache_dir) / manifest["null_file"]
    with _open_tensors(path) as f:
        try:
            tensors = {key: f.get_tensor(key) for key in ("null_clip_text", "null_text_tokens")}
        except Exception as e:
            raise CacheFileError(f"{path}: unreadable ({type(e).__name__}: {e}); {_rebuild_hint(path)}") from e
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise CacheFileError(f"{path}: {key} holds NaN / inf; {_rebuild_hint(path)}")
    return tensors["null_clip_text"], tensors["null_text_tokens"]


def _shard_paths(cache_dir: Path, shard: dict) -> tuple[Path, Path]:
    return cache_dir / f"{shard['name']}.safetensors", cache_dir / f"{shard['name']}.json"


# shards already checked in this process: (path, keys) -> (size, mtime_ns, inode) (train and val sets open the
# same cache: checked once)
_VERIFIED_SHARDS: dict[str, tuple] = {}


def _scan_rows(get_rows: Callable[[int, int], torch.Tensor], num_rows: int, row_elements: int) -> list[int]:
    """Non-finite rows of a tensor read in chunks of rows (~16M elements each)."""
    step = max(1, (1 << 24) // max(1, row_elements))
    bad = []
    for start in range(0, num_rows, step):
        bad.extend(start + r for r in _nonfinite_rows(get_rows(start, min(num_rows, start + step))))
    return bad


def _describe_rows(cache_dir: Path, shard: dict, key: str, rows: list[int]) -> str:
    """The image files / captions of non-finite shard rows (from the shard record, when readable)."""
    try:
        images = _read_shard_info(_shard_paths(cache_dir, shard)[1])["images"]
    except CacheFileError:
        return f"rows {_listed(rows)}"
    if key == "clip_image":
        return f"rows {_listed(rows)} (images {_listed([images[r]['file_name'] for r in rows if r < len(images)])})"
    captions = [(image["file_name"], c) for image in images for c in image["captions"]]
    return f"rows {_listed(rows)} (captions {_listed([captions[r] for r in rows if r < len(captions)])})"


def _verify_shard(cache_dir: Path, shard: dict, manifest: dict, tensors: Optional[dict] = None,
                  keys: Sequence[str] = SHARD_KEYS) -> None:
    """Check a shard's tensor file: recorded size and shapes (header), then one pass for NaN / inf.

    ``tensors``: the shard already loaded (in-memory datasets), else it is read in chunks of rows.
    Raises CacheFileError naming the file, the tensor and the rows (and their image files / captions).
    """
    path = _shard_paths(cache_dir, shard)[0]
    _check_shard_header(path, shard["num_images"], shard["num_captions"], shard.get("tensor_bytes"),
                        int(manifest["clip_dim"]), (int(manifest["text_len"]), int(manifest["text_dim"])))
    stat = path.stat()
    memo_key = (str(path.resolve()), tuple(keys))
    if _VERIFIED_SHARDS.get(memo_key) == (stat.st_size, stat.st_mtime_ns, stat.st_ino):
        return
    with _open_tensors(path) as f:
        offsets = tensors["text_offsets"] if tensors is not None else f.get_tensor("text_offsets")
        steps = offsets[1:] - offsets[:-1]
        num_rows = tuple(f.get_slice("text_tokens").get_shape())[0]
        if offsets[0] != 0 or offsets[-1] != num_rows or (steps < 0).any() or (steps > int(manifest["text_len"])).any():
            raise CacheFileError(f"{path}: text_offsets do not split the {num_rows} stored token rows into captions "
                                 f"of at most {manifest['text_len']} rows; {_rebuild_hint(path)}")
        for key in keys:
            if key in ("caption_image", "text_offsets"):
                continue  # integer rows, checked above / against the image count below
            if tensors is not None:
                bad = _nonfinite_rows(tensors[key])
            else:
                piece = f.get_slice(key)
                shape = piece.get_shape()
                row_elements = 1
                for size in shape[1:]:
                    row_elements *= size
                bad = _scan_rows(lambda a, b: piece[a:b], shape[0], row_elements)
            if key == "text_tokens":  # stored rows -> the captions they belong to
                bad = sorted(set(torch.searchsorted(offsets, torch.tensor(bad, dtype=torch.long), right=True)
                                 .sub(1).tolist()))
            if bad:
                raise CacheFileError(f"{path}: tensor {key} holds NaN / inf in {len(bad)} row(s): "
                                     f"{_describe_rows(cache_dir, shard, key, bad)}; a prior trained on it would be "
                                     f"NaN. {_rebuild_hint(path)}")
        if "caption_image" in keys:
            caption_image = tensors["caption_image"] if tensors is not None else f.get_tensor("caption_image")
            if caption_image.numel() and (caption_image.min() < 0 or caption_image.max() >= shard["num_images"]):
                raise CacheFileError(f"{path}: caption_image rows point outside [0, {shard['num_images']}); "
                                     f"{_rebuild_hint(path)}")
    _VERIFIED_SHARDS[memo_key] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)


def load_image_embeddings(cache_dir: PathLike) -> torch.Tensor:
    """All embedded images' CLIP embeddings (N, D) float32, captioned or not, in image_index order
    (CacheFileError naming the shard file and rows when one is corrupt or holds NaN / inf)."""
    manifest = load_manifest(cache_dir)
    cache_dir = Path(cache_dir)
    chunks = []
    for shard in manifest["shards"]:
        path = _shard_paths(cache_dir, shard)[0]
        _check_shard_header(path, shard["num_images"], shard["num_captions"], shard.get("tensor_bytes"),
                            int(manifest["clip_dim"]), (int(manifest["text_len"]), int(manifest["text_dim"])))
        with _open_tensors(path) as f:
            clip_image = f.get_tensor("clip_image")
        bad = _nonfinite_rows(clip_image)
        if bad:
            raise CacheFileError(f"{path}: tensor clip_image holds NaN / inf in {len(bad)} row(s): "
                                 f"{_describe_rows(cache_dir, shard, 'clip_image', bad)}. {_rebuild_hint(path)}")
        chunks.append(clip_image.float())
    return torch.cat(chunks) if chunks else torch.zeros(0, manifest["clip_dim"])


def _load_shard_infos(cache_dir: PathLike, manifest: dict) -> list[dict]:
    """The shard records of a finished cache, in shard order (CacheFileError naming a corrupt one)."""
    infos = []
    for shard in manifest["shards"]:
        path = _shard_paths(Path(cache_dir), shard)[1]
        info = _read_shard_info(path)
        if info["num_images"] != shard["num_images"] or len(info["images"]) != shard["num_images"]:
            raise CacheFileError(f"{path}: lists {len(info['images'])} images, the manifest {shard['num_images']}; "
                                 f"{_rebuild_hint(path)}")
        infos.append(info)
    return infos


def load_image_records(cache_dir: PathLike) -> list[dict]:
    """Per embedded image (image_index order): {"file_name", "captions", "metadata"}."""
    manifest = load_manifest(cache_dir)
    return [image for info in _load_shard_infos(cache_dir, manifest) for image in info["images"]]


def match_image_embeddings(cache_dir: PathLike, clip, paths: Sequence[PathLike]) -> tuple[Optional[tuple], str]:
    """Reuse a cache's CLIP image embeddings for ``paths`` (e.g. the decoder's training images).

    -> ((embeddings (N, D) float32, readable (N,) bool), "") when the cache was built with ``clip`` (same
    ``spec`` and ``weights_fingerprint``) and holds every path with the size and mtime it has now (images the
    cache skipped as unreadable stay unreadable); else (None, why it does not match).
    """
    manifest = load_manifest(cache_dir)
    try:
        check_encoders(manifest["encoders"]["clip"], clip.spec, cache_dir)
        check_encoder_weights(manifest["encoder_weights"]["clip"], encoder_weights(clip), cache_dir)
    except ValueError as error:
        return None, str(error)
    source = manifest["source"]
    root = Path(manifest.get("source_root", source))  # file names are relative to it
    infos = _load_shard_infos(cache_dir, manifest)
    stamps = {str((root / x["file_name"]).resolve()): x for info in infos for x in info["inputs"]}
    row_of = {str((root / image["file_name"]).resolve()): i
              for i, image in enumerate(image for info in infos for image in info["images"])}
    resolved = [location(p) for p in paths]
    missing = [p for p in resolved if p not in stamps]
    if missing:
        return None, (f"{len(missing)} of the {len(paths)} images are not in it (e.g. {missing[0]}; the cache was "
                      f"built from {source})")
    for item, path in zip(paths, resolved):
        old, new = stamps[path], file_fingerprint(item)
        if (old["size"], old["mtime_ns"]) != (new["size"], new["mtime_ns"]):
            return None, (f"{path} changed since the cache was built (size {old['size']} -> {new['size']}, "
                          f"mtime_ns {old['mtime_ns']} -> {new['mtime_ns']})")
    embeds = load_image_embeddings(cache_dir)
    readable = torch.tensor([p in row_of for p in resolved], dtype=torch.bool)
    out = torch.zeros(len(resolved), embeds.shape[1])
    out[readable] = embeds[torch.tensor([row_of[p] for p in resolved if p in row_of], dtype=torch.long)]
    return (out, readable), ""


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
    """(image, caption) pairs of a cache: clip_image (D,), clip_text (D,), text_tokens (L, E) float32 (the
    storage dtypes with ``float32=False``: half the bytes through DataLoader workers, cast on the device
    instead, the same values), image_index, caption_index (long scalars); with ``captions=True`` also the
    caption itself (str: for a text encoder run in the training step).

    ``split``: None / "all" (every pair), "train" / "val" (held-out images from ``split_image_indices``
    with ``val_fraction``, ``seed``), or a sequence of image indices. Shards are memory-mapped and read
    per item; ``in_memory=True`` loads them whole (fast for small caches). Opening checks every shard once
    (recorded size and shapes, one pass for NaN / inf): CacheFileError names the file and rows.
    """

    def __init__(
        self,
        cache_dir: PathLike,
        split: Union[None, str, Sequence[int], torch.Tensor] = None,
        *,
        val_fraction: float = 0.05,
        seed: int = 0,
        in_memory: bool = False,
        float32: bool = True,
        captions: bool = False,
    ):
        self.cache_dir, self.float32 = Path(cache_dir), float32
        # pair p's caption is the p-th of the records' captions in order (what caption_index means)
        self.captions = [c for r in load_image_records(cache_dir) for c in r["captions"]] if captions else None
        self.manifest = load_manifest(cache_dir)
        self.clip_dim = int(self.manifest["clip_dim"])
        self.block_sizes = list(self.manifest["block_sizes"])
        self.text_len, self.text_dim = int(self.manifest["text_len"]), int(self.manifest["text_dim"])
        self.null_clip_text, self.null_text_tokens = load_null_embeddings(cache_dir)
        self.num_images = int(self.manifest["num_images"])
        self._paths = [str(self.cache_dir / f"{s['name']}.safetensors") for s in self.manifest["shards"]]

        self._tensors: Optional[list] = None
        if in_memory:
            self._tensors = [self._load_shard(shard) for shard in self.manifest["shards"]]
        else:
            for shard in self.manifest["shards"]:
                _verify_shard(self.cache_dir, shard, self.manifest)  # header + one NaN / inf pass, once per process

        shard_ids, caption_rows, image_rows, image_index = [], [], [], []
        self._text_offsets = []  # per shard (m + 1,): caption j's stored token rows
        offset = 0
        for shard_id, (shard, path) in enumerate(zip(self.manifest["shards"], self._paths)):
            if self._tensors is not None:
                caption_image = self._tensors[shard_id]["caption_image"]
                self._text_offsets.append(self._tensors[shard_id]["text_offsets"])
            else:
                with _open_tensors(Path(path)) as f:
                    caption_image = f.get_tensor("caption_image")  # (m,) shard-local image row
                    self._text_offsets.append(f.get_tensor("text_offsets"))
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

    def _load_shard(self, shard: dict) -> dict:
        """A whole shard in memory, checked (shapes, NaN / inf) on the loaded tensors."""
        path = _shard_paths(self.cache_dir, shard)[0]
        _check_shard_header(path, shard["num_images"], shard["num_captions"], shard.get("tensor_bytes"),
                            self.clip_dim, (self.text_len, self.text_dim))
        with _open_tensors(path) as f:
            tensors = {key: f.get_tensor(key) for key in SHARD_KEYS}
        _verify_shard(self.cache_dir, shard, self.manifest, tensors=tensors)
        return tensors

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
        """Row ``row`` of a shard tensor; for text_tokens, caption ``row``'s (L, E) states, padded back."""
        start, stop = row, row + 1
        if key == "text_tokens":
            start, stop = (int(x) for x in self._text_offsets[shard_id][row:row + 2])
        if self._tensors is not None:
            rows = self._tensors[shard_id][key][start:stop]
        else:
            handle = self._handles.get(shard_id)
            if handle is None:
                handle = self._handles[shard_id] = _open_tensors(Path(self._paths[shard_id]))
            rows = handle.get_slice(key)[start:stop]
        return pad_token_states(rows, self.text_len) if key == "text_tokens" else rows[0]

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.float() if self.float32 else tensor

    def __len__(self) -> int:
        return int(self.pairs.numel())

    def __getitem__(self, i: int) -> dict:
        p = int(self.pairs[i])
        shard_id = int(self.pair_shard[p])
        caption_row, image_row = int(self.pair_caption_row[p]), int(self.pair_image_row[p])
        item = {
            "clip_image": self._cast(self._get(shard_id, "clip_image", image_row)),  # (D,)
            "clip_text": self._cast(self._get(shard_id, "clip_text", caption_row)),  # (D,)
            "text_tokens": self._cast(self._get(shard_id, "text_tokens", caption_row)),  # (L, E)
            "image_index": self.pair_image_index[p].clone(),  # dense index over embedded images
            "caption_index": torch.tensor(p),  # index into the flattened captions of load_image_records
        }
        if self.captions is not None:
            item["caption"] = self.captions[p]
        return item
