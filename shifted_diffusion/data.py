"""Image-folder reading (DESIGN.md §4): Hugging Face ``imagefolder`` convention plus ``.txt`` captions.

A folder is read into ``ImageRecord``s (one per image file, sorted by relative path):

* ``metadata.jsonl`` files (at the root or in sub-folders): one JSON object per line with the image
  column (default ``file_name``, relative to the metadata file's folder) and the caption column
  (default ``text``; a string or a list of captions). Other fields are kept in ``record.metadata``.
* fallback: ``<name>.txt`` beside ``<name>.png`` holds the caption(s), one per non-empty line.
* an image with neither is kept uncaptioned (it is still embedded and used to fit the vocabulary).

Images are not opened here; unreadable files are found (and reported) by the cache builder.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
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


def _read_metadata(path: Path, root: Path, image_column: str, caption_column: str) -> dict[str, tuple]:
    """metadata.jsonl -> {relative file name: (captions, extra fields)}."""
    rows: dict[str, tuple] = {}
    seen_caption_column = False
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
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
            name = (path.parent / str(row[image_column])).relative_to(root).as_posix()
            rows[name] = (captions, extra)
    if rows and not seen_caption_column:
        raise ValueError(f"{path}: caption column {caption_column!r} not found in any row "
                       f"(columns: {sorted(set().union(*(r[1] for r in rows.values())) | {image_column})}); "
                       "set caption_column=")
    return rows


def _read_txt_captions(path: Path) -> tuple[str, ...]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def read_image_folder(
    folder: Union[str, os.PathLike],
    *,
    image_column: str = "file_name",
    caption_column: str = "text",
) -> list[ImageRecord]:
    """All images under ``folder`` (recursive) with their captions and metadata, sorted by file name."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    metadata: dict[str, tuple] = {}
    for meta_path in sorted(root.rglob(METADATA_NAME)):
        metadata.update(_read_metadata(meta_path, root, image_column, caption_column))
    files = {p.relative_to(root).as_posix(): p for p in root.rglob("*")
             if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()}
    # metadata rows naming a missing file are kept: the cache builder reports them as unreadable
    for name in metadata:
        files.setdefault(name, root / name)
    records = []
    for name in sorted(files):
        path = files[name]
        captions, extra = metadata.get(name, ((), {}))
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
    try:
        return [record.path for record in read_image_folder(folder)]
    except (KeyError, ValueError) as error:
        warnings.warn(f"ignoring the captions of {os.fspath(folder)}: {error}")
        return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
