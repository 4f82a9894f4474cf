"""Image-folder reading: Hugging Face ``imagefolder`` convention plus ``.txt`` captions.

A folder is read into ``ImageRecord``s (one per image file, sorted by relative path):

* ``metadata.jsonl`` files (at the root or in sub-folders): one JSON object per line with the image
  column (default ``file_name``, relative to the metadata file's folder) and the caption column
  (default ``text``; a string or a list of captions). Other fields are kept in ``record.metadata``.
* fallback: ``<name>.txt`` beside ``<name>.png`` holds the caption(s), one per non-empty line.
* an image with neither is kept uncaptioned (it is still embedded and used to fit the vocabulary).

Rules for ``metadata.jsonl`` (errors name the file and line):

* the file is UTF-8 (a leading byte-order mark is allowed); ``.txt`` captions too;
* the image column is a relative path inside the metadata file's folder: absolute names and names with a
  ``..`` component are refused;
* several rows naming the same image (in one file or across files) are merged: their captions are joined,
  in file then line order, into one list; the extra fields of the first row are kept, fields only later
  rows have are added, and a later row giving another value for a field warns (naming both lines) and
  loses.

Images are not opened here; unreadable files are found (and reported) by the cache builder. ``to_rgb`` /
``open_rgb`` turn any image into 8-bit RGB (16-bit and float images scaled, not clipped, to 8 bits): every
image going to CLIP or to training goes through them.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Union

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_NAME = "metadata.jsonl"


@dataclass(frozen=True)
class ImageRecord:
    """One image: its path, relative name, captions (possibly none) and extra metadata fields."""

    path: Path
    file_name: str  # relative to the folder root, "/"-separated
    captions: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict)


def _captions_from_value(value, *, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            if not isinstance(item, str):
                raise ValueError(f"{where}: captions must be strings, got {type(item).__name__} {item!r}")
            if item.strip():
                out.append(item)
        return tuple(out)
    raise ValueError(f"{where}: caption must be a string or a list of strings, got {type(value).__name__}")


def _metadata_lines(path: Path):
    """(line number, text) of a metadata.jsonl, decoded as UTF-8 line by line (error names the line)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid UTF-8 ({e}); save the metadata file as UTF-8") from e
            yield line_no, text


def _relative_name(value, metadata_path: Path, root: Path, *, where: str, image_column: str) -> str:
    """The "/"-separated name, relative to ``root``, of an image column value (refuses leaving the folder)."""
    text = str(value)
    pure = PurePosixPath(text.replace("\\", "/"))
    if not text.strip() or pure.is_absolute() or PureWindowsPath(text).is_absolute() or ".." in pure.parts:
        raise ValueError(f"{where}: {image_column} {text!r} must be a relative path inside "
                         f"{str(metadata_path.parent)!r} (no absolute path, no '..')")
    return (metadata_path.parent.relative_to(root) / pure).as_posix()


def _read_metadata(path: Path, root: Path, image_column: str, caption_column: str) -> dict[str, tuple]:
    """metadata.jsonl -> {relative file name: (captions, extra fields, where)}; duplicate rows merged."""
    rows: dict[str, tuple] = {}
    seen_caption_column = False
    for line_no, line in _metadata_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if image_column not in row:
            raise ValueError(f"{where}: image column {image_column!r} missing (columns: {sorted(row)}); "
                             "set image_column=")
        seen_caption_column |= caption_column in row
        captions = _captions_from_value(row.get(caption_column), where=where)
        extra = {k: v for k, v in row.items() if k not in (image_column, caption_column)}
        name = _relative_name(row[image_column], path, root, where=where, image_column=image_column)
        _merge_row(rows, name, (captions, extra, where))
    if rows and not seen_caption_column:
        raise ValueError(f"{path}: caption column {caption_column!r} not found in any row "
                         f"(columns: {sorted(set().union(*(r[1] for r in rows.values())) | {image_column})}); "
                         "set caption_column=")
    return rows


def _merge_row(rows: dict, name: str, row: tuple) -> None:
    """Add (captions, extra, where) for ``name``: captions joined, first extra values kept (conflicts warned)."""
    if name not in rows:
        rows[name] = row
        return
    captions, extra, where = rows[name]
    new_captions, new_extra, new_where = row
    merged = dict(extra)
    for key, value in new_extra.items():
        if key not in merged:
            merged[key] = value
        elif merged[key] != value:
            warnings.warn(f"{new_where}: {name!r} is also named at {where} with {key}={merged[key]!r}; "
                          f"keeping that value, not {key}={value!r} (captions of both rows are kept)", stacklevel=4)
    rows[name] = (captions + new_captions, merged, where)


def _read_txt_captions(path: Path) -> tuple[str, ...]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"caption file {path}: not valid UTF-8 ({e}); save it as UTF-8") from e
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def read_image_folder(
    folder: Union[str, os.PathLike],
    *,
    image_column: str = "file_name",
    caption_column: str = "text",
) -> list[ImageRecord]:
    """All images under ``folder`` (recursive) with their captions and metadata, sorted by file name.

    ``folder`` may also name webdataset tar shards (``webdata.is_shard_source``): their samples, in shard and
    member order, each record's path a ``webdata.TarMember``."""
    from . import webdata

    if webdata.is_shard_source(folder):
        return webdata.read_shards(folder, caption_column=caption_column)
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    metadata: dict[str, tuple] = {}
    for meta_path in sorted(root.rglob(METADATA_NAME)):
        for name, row in _read_metadata(meta_path, root, image_column, caption_column).items():
            _merge_row(metadata, name, row)
    files = {p.relative_to(root).as_posix(): p for p in root.rglob("*")
             if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()}
    # metadata rows naming a missing file are kept: the cache builder reports them as unreadable
    for name in metadata:
        files.setdefault(name, root / name)
    records = []
    for name in sorted(files):
        path = files[name]
        captions, extra, _ = metadata.get(name, ((), {}, None))
        if not captions:
            txt = path.with_suffix(".txt")
            if txt.is_file():
                captions = _read_txt_captions(txt)
        records.append(ImageRecord(path=path, file_name=name, captions=captions, metadata=extra))
    if not records:
        raise FileNotFoundError(f"image folder {str(root)!r} holds no images "
                                f"(extensions {sorted(IMAGE_EXTENSIONS)}) and no {METADATA_NAME} rows")
    return records


def list_image_files(folder: Union[str, os.PathLike]) -> list:
    """Every image file under `folder`, captioned or not (for image-only uses: the decoder, resizing);
    a caption file that cannot be parsed is reported and ignored, since captions do not matter there."""
    from .webdata import is_shard_source

    if is_shard_source(folder):  # errors in a shard's captions are listed per sample, never raised
        return [record.path for record in read_image_folder(folder)]
    try:
        return [record.path for record in read_image_folder(folder)]
    except (KeyError, ValueError) as error:
        warnings.warn(f"ignoring the captions of {os.fspath(folder)}: {error}")
        return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------------------------
# pixels

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def _to_uint8(values, scale_max: float):
    """numpy array of values in [0, scale_max] -> uint8, rounded linear scaling (clipped outside the range)."""
    import numpy as np

    scaled = np.clip(values.astype(np.float64), 0.0, scale_max) * (255.0 / scale_max)
    return np.floor(scaled + 0.5).astype(np.uint8)


def to_rgb(image):
    """A PIL image of any mode -> 8-bit RGB PIL image.

    16-bit integer modes (``I;16``, ``I;16B``, ...) and ``I`` (how Pillow may open 16-bit PNGs) hold values in
    [0, 65535]: scaled to 8 bits as round(v / 257), where ``convert("RGB")`` would clip everything above 255
    to white. ``F`` (float) images are taken as [0, 1] when their maximum is <= 1, as [0, 255] when it is
    <= 255, else as [0, 65535]. Other modes use Pillow's own conversion.
    """
    import numpy as np
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image)
        if image.mode == "F":
            peak = float(np.nanmax(values)) if values.size else 0.0
            scale_max = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
        else:
            scale_max = 65535.0
        return Image.fromarray(_to_uint8(np.nan_to_num(values), scale_max)).convert("RGB")  # (H, W) uint8: "L"
    return image.convert("RGB")


def open_rgb(path):
    """Open an image file (or a ``webdata.TarMember``), decode it fully and return it as 8-bit RGB (``to_rgb``);
    the file is closed."""
    from PIL import Image

    from .webdata import TarMember

    with Image.open(path.open() if isinstance(path, TarMember) else path) as image:
        image.load()
        return to_rgb(image).copy() if image.mode == "RGB" else to_rgb(image)
