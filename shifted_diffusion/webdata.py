"""Webdataset tar shards as a training source: read in place, without unpacking.

``--train_data_dir`` (prior and decoder) accepts, besides an image folder:

* a shard pattern in webdataset's syntax, ``data/{00000..00099}.tar`` (brace ranges and lists, several
  patterns joined by ``::``; expanded by ``webdataset``);
* one ``.tar`` file;
* a folder whose top level holds ``.tar`` files (and no images).

A sample is the group of members sharing a key (webdataset's convention: the member name up to the first
dot of its base name, e.g. ``00001234.jpg`` / ``00001234.txt`` / ``00001234.json`` as img2dataset writes).
Its image is the member with an image extension; its captions come from the ``.txt`` member (one caption
per non-empty line, as ``<name>.txt`` in an image folder) or else from the ``.json`` member's
``caption_column`` (default ``text``) or ``caption`` key (a string or a list); the json's other fields are
kept as metadata.

Each tar is indexed once with the standard ``tarfile`` module (member name, data offset, size; the headers
are read, the data is skipped), and an image is read by seeking to its offset: the sample list, the epoch
order, exact resume and the split over processes (cache shards, the distributed sampler) and DataLoader
workers are those of an image folder. Index files are never read or written (``wids`` keeps a pickled one
beside each tar; unpickling a file is running code).

Nothing is dropped silently. A sample without an image member, a caption member that is not UTF-8 / JSON,
a duplicated member, a member whose data runs past the end of the file (a truncated tar) and an unreadable
header with data after it (the members that follow are unreachable) each become an entry whose reading
raises ``ValueError`` naming the tar, the member and what is wrong: the cache builder lists it among the
skipped images of its manifest, the decoder among its unreadable training images, as for an image folder.
Compressed tars (``.tar.gz``) are refused: they cannot be read at an offset.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .data import IMAGE_EXTENSIONS, ImageRecord, _captions_from_value

COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
_ZERO_BLOCK = 1 << 16


@dataclass(frozen=True)
class TarMember:
    """An image inside an uncompressed tar: ``tar`` file, member ``name``, data ``offset`` and ``size`` in bytes.

    ``error`` set: the sample is corrupt and reading it raises ValueError with that text."""

    tar: Path
    name: str
    offset: int = 0
    size: int = 0
    error: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.tar}/{self.name}"

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    def resolve(self) -> "TarMember":
        return TarMember(self.tar.resolve(), self.name, self.offset, self.size, self.error)

    def read_bytes(self) -> bytes:
        if self.error is not None:
            raise ValueError(f"{self}: {self.error}")
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise ValueError(f"{self}: {len(data)} of {self.size} bytes readable (the tar changed or is truncated)")
        return data

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.read_bytes())


ImageLocation = Union[Path, TarMember]


def location(item) -> str:
    """The absolute, resolved name of an image file or tar member (``<tar>/<member>``): how caches key images."""
    return str(Path(str(item.resolve()) if isinstance(item, TarMember) else item).resolve())


def stat_path(item) -> Path:
    """The file whose size and mtime stamp ``item`` (the tar of a member)."""
    return item.tar if isinstance(item, TarMember) else Path(item)


def _is_pattern(text: str) -> bool:
    return "::" in text or ("{" in text and "}" in text)


def is_shard_source(source) -> bool:
    """Whether ``--train_data_dir`` names tar shards (a pattern, a .tar file, a folder of .tar files)."""
    text = os.fspath(source)
    if _is_pattern(text) or text.endswith(".tar") or text.endswith(COMPRESSED_SUFFIXES):
        return True
    path = Path(text)
    return path.is_dir() and any(p.is_file() for p in path.glob("*.tar"))


def expand_shards(source) -> tuple[list[Path], Path]:
    """(tar files in the given order, the folder their names are relative to); errors name what is missing."""
    from webdataset.shardlists import expand_urls

    text = os.fspath(source)
    path = Path(text)
    if path.is_dir():
        tars = sorted(p for p in path.glob("*.tar") if p.is_file())
        images = [p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if images:
            raise ValueError(f"{text}: holds both .tar shards ({len(tars)}) and image files ({images[:3]}, ...); "
                             "put the images or the shards in a folder of their own")
        root = path
    else:
        tars = [Path(name) for name in expand_urls(text)]
        missing = [str(p) for p in tars if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"--train_data_dir {text!r}: {len(missing)} of its {len(tars)} shard(s) do not "
                                    f"exist (e.g. {missing[0]})")
        root = Path(os.path.commonpath([str(p.resolve().parent) for p in tars])) if tars else path.parent
    compressed = [str(p) for p in tars if str(p).endswith(COMPRESSED_SUFFIXES)]
    if compressed:
        raise ValueError(f"{compressed[0]}: compressed tar shards cannot be read in place; decompress them "
                         "(gunzip / zstd -d) to .tar")
    if not tars:
        raise FileNotFoundError(f"--train_data_dir {text!r} names no .tar shards")
    return tars, root


def source_name(source) -> str:
    """What a cache records as its source: the resolved folder, or the pattern with its folder resolved."""
    text = os.fspath(source)
    path = Path(text)
    if path.is_dir():
        return str(path.resolve())
    return "::".join(str(Path(part).parent.resolve() / Path(part).name) for part in text.split("::"))


def files_root(source) -> Path:
    """The resolved folder the records' ``file_name``s are relative to (an image folder: itself)."""
    return expand_shards(source)[1].resolve() if is_shard_source(source) else Path(source).resolve()


def _tar_entries(tar: Path) -> tuple[list[tuple], list[tuple[str, str]]]:
    """((member name, data offset, size, error or None) of each regular member, [(where, error)] of the tar)."""
    file_size = tar.stat().st_size
    entries, problems = [], []
    try:
        with tarfile.open(tar, "r:") as archive:
            for member in archive:
                if not member.isreg():
                    continue
                error = None
                if member.offset_data + member.size > file_size:
                    error = (f"truncated tar: member {member.name}'s data ends at byte "
                             f"{member.offset_data + member.size}, the file has {file_size} bytes")
                entries.append((member.name, member.offset_data, member.size, error))
            end = archive.offset
    except tarfile.TarError as error:
        return entries, problems + [("", f"not a readable tar ({type(error).__name__}: {error})")]
    stray = _first_nonzero_byte(tar, end)
    if stray is not None:  # tarfile stops silently at a bad header: what follows would be lost unseen
        problems.append(("", f"unreadable tar header at byte {end}; the {file_size - end} bytes after it (non-zero "
                             f"from byte {stray}) hold members that cannot be reached"))
    return entries, problems


def _first_nonzero_byte(path: Path, start: int) -> Optional[int]:
    """Offset of the first non-zero byte at or after ``start`` (a finished tar ends in zero blocks), or None."""
    with open(path, "rb") as f:
        f.seek(start)
        position = start
        while chunk := f.read(_ZERO_BLOCK):
            stripped = chunk.lstrip(b"\0")
            if stripped:
                return position + len(chunk) - len(stripped)
            position += len(chunk)
    return None


def _split_key(name: str) -> tuple[Optional[str], str]:
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    return key, (ext or "").lower()


def _sample_captions(tar: Path, members: dict, caption_column: str) -> tuple[tuple, dict]:
    """(captions, metadata) of one sample from its .txt or .json member (ValueError naming the member)."""
    def read(ext):
        name, offset, size, _ = members[ext]
        data = TarMember(tar, name, offset, size).read_bytes()
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise ValueError(f"{tar}/{name}: not valid UTF-8 ({error})") from error

    metadata, captions = {}, ()
    if "json" in members:
        where = f"{tar}/{members['json'][0]}"
        try:
            row = json.loads(read("json"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: invalid JSON ({error})") from error
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        column = next((c for c in (caption_column, "caption", "text") if c in row), None)
        captions = _captions_from_value(row.get(column), where=where) if column else ()
        metadata = {k: v for k, v in row.items() if k != column}
    if "txt" in members:
        captions = tuple(line.strip() for line in read("txt").splitlines() if line.strip())
    return captions, metadata


def _tar_records(tar: Path, root: Path, caption_column: str) -> list[ImageRecord]:
    """One record per sample of ``tar`` (corrupt samples carry the error, see the module docstring)."""
    prefix = tar.resolve().relative_to(root.resolve()).as_posix()
    entries, problems = _tar_entries(tar)
    samples: dict[str, dict] = {}
    records = []

    def corrupt(name: str, error: str) -> None:
        records.append(ImageRecord(path=TarMember(tar, name or "(tar)", error=error),
                                   file_name=f"{prefix}/{name}" if name else prefix))

    for name, offset, size, error in entries:
        key, ext = _split_key(name)
        if key is None or Path(name).name.startswith("__"):
            continue  # no extension, or webdataset's __key__-style metadata members
        members = samples.setdefault(key, {})
        if ext in members:
            corrupt(name, f"a second .{ext} member of sample {key!r} (the first, {members[ext][0]}, is used)")
            continue
        members[ext] = (name, offset, size, error)
    for key, members in samples.items():
        image_ext = next((ext for ext in members if f".{ext.rsplit('.', 1)[-1]}" in IMAGE_EXTENSIONS), None)
        if image_ext is None:
            corrupt(key, f"sample without an image member (members: {sorted(members)})")
            continue
        name, offset, size, _ = members[image_ext]
        broken = next((member[3] for member in members.values() if member[3]), None)
        if broken:  # a truncated image or caption member: the whole sample
            corrupt(name, broken)
            continue
        try:
            captions, metadata = _sample_captions(tar, members, caption_column)
        except ValueError as error:
            corrupt(name, f"its caption could not be read: {error}")
            continue
        records.append(ImageRecord(path=TarMember(tar, name, offset, size), file_name=f"{prefix}/{name}",
                                   captions=captions, metadata=metadata))
    for name, error in problems:
        corrupt(name, error)
    return records


def read_shards(source, *, caption_column: str = "text", progress: bool = False) -> list[ImageRecord]:
    """The samples of the tar shards ``source`` names, shard by shard in the given order, members in file order."""
    from tqdm.auto import tqdm

    tars, root = expand_shards(source)
    records = []
    for tar in tqdm(tars, desc="indexing tar shards", unit="tar", disable=not progress or len(tars) < 8):
        records.extend(_tar_records(tar, root, caption_column))
    if not records:
        raise FileNotFoundError(f"--train_data_dir {os.fspath(source)!r}: its {len(tars)} shard(s) hold no samples")
    return records
