"""Reading the files a prior / decoder / original checkpoint is made of, with errors that name the file.

Everything is read without running code from the file: safetensors, JSON, or ``torch.load(weights_only=True)``.
A file that is not what was expected (an image, a text file, a truncated download) is recognised from its first
bytes and described, so the error says what the file is rather than what the deserialiser tripped on.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]

# first bytes -> what the file is (formats one might pass by mistake)
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"BZh", "a bzip2 archive"),
)


class InvalidFileError(ValueError):
    """A file that is missing, truncated or of the wrong kind; the message names it and what was expected."""


def _safetensors_header_size(head: bytes, file_size: int):
    """The header length of a safetensors file (8-byte little-endian length, then a JSON object), else None."""
    if len(head) < 9:
        return None
    size = int.from_bytes(head[:8], "little")
    return size if 0 < size <= file_size - 8 and head[8:9] == b"{" else None


def sniff(path: PathLike) -> str:
    """What kind of file ``path`` is, from its first bytes: "zip" (torch.save), "pickle" (legacy torch.save),
    "safetensors", or a description such as "a PNG image", "a text file", "an empty file (0 bytes)"."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if _safetensors_header_size(head, size) is not None:
        return "safetensors"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    for magic, description in _MAGIC:
        if head.startswith(magic):
            return description
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text.rstrip("\x00")):
        stripped = text.lstrip()
        if stripped.startswith(("{", "[")):
            return f"a JSON/text file (starts with {stripped[:30]!r})"
        return f"a text file (starts with {stripped[:30]!r})"
    return f"an unrecognised binary file (first bytes {head[:8]!r})"


def describe(path: PathLike) -> str:
    """A human description of ``sniff(path)`` for error messages."""
    kind = sniff(path)
    return {"zip": "a torch.save zip archive", "pickle": "a legacy torch.save file",
            "safetensors": "a safetensors file"}.get(kind, kind)


def read_json(path: PathLike, what: str) -> Dict[str, Any]:
    """A JSON object from ``path``; errors name the file, the line / column and what the file is for (``what``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{os.fspath(path)}: missing ({what})")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidFileError(f"{os.fspath(path)}: not UTF-8 JSON text ({what}); it is {describe(path)}: {err}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        hint = " (the file looks truncated: it does not end with the closing brace)" if not text.rstrip().endswith("}") else ""
        raise InvalidFileError(f"{os.fspath(path)}: invalid JSON at line {err.lineno}, column {err.colno}: "
                               f"{err.msg}{hint} ({what})") from None
    if not isinstance(value, dict):
        raise InvalidFileError(f"{os.fspath(path)}: expected a JSON object ({what}), got a {type(value).__name__}")
    return value


def read_safetensors(path: PathLike, what: str, device: str = "cpu") -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file; errors name the file, what it is for (``what``) and what it really is."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{os.fspath(path)}: missing ({what})")
    kind = sniff(path)
    if kind != "safetensors":
        raise InvalidFileError(f"{os.fspath(path)}: expected a safetensors file ({what}), but it is "
                               f"{describe(path)}; the file is truncated or was replaced")
    try:
        return load_file(os.fspath(path), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise InvalidFileError(f"{os.fspath(path)}: unreadable safetensors file ({what}): {err}; the file is "
                               f"probably truncated (size {path.stat().st_size} bytes)") from None


def _torch_load_failure(err: Exception) -> str:
    """The reason a weights-only torch.load failed, in a few words (never torch's advice to unpickle code)."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"it pickles Python objects ({found.group(1)}), not only tensors; only state dicts of tensors "
                "are read (nothing in a checkpoint is unpickled as code)")
    if isinstance(err, EOFError) or "central directory" in text or "unexpected EOF" in text.lower():
        return "the file is truncated (it ends before the data does)"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    if "weights_only" in first or "Weights only load failed" in first:
        return "it holds something other than tensors and plain containers"
    return f"{type(err).__name__}: {first}"


def load_torch_weights(path: PathLike, what: str, map_location: Union[str, torch.device] = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` after checking the file is a torch.save file; errors name the file,
    what it is for (``what``) and, for a wrong kind of file, what it is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{os.fspath(path)}: missing ({what})")
    kind = sniff(path)
    if kind not in ("zip", "pickle"):
        raise InvalidFileError(f"{os.fspath(path)}: expected a torch.save file ({what}), but it is {describe(path)}")
    if kind == "zip" and not zipfile.is_zipfile(path):
        raise InvalidFileError(f"{os.fspath(path)}: a truncated or corrupt torch.save zip archive ({what}): its zip "
                               f"directory is missing (size {path.stat().st_size} bytes)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # any failure: the weights-only unpickler's text advises unpickling code; not ours
        raise InvalidFileError(f"{os.fspath(path)}: cannot be read as {what}: {_torch_load_failure(err)}") from None


# ---- durable writes: a file or folder is either the old one or the complete new one, never half -------------


def fsync(path: PathLike) -> None:
    """Flush a file's or a folder's entry to disk (a no-op where the platform cannot)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: PathLike, obj: Any, indent: int = 1) -> None:
    """JSON written to a temporary name, fsynced, renamed into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def write_results_json(path: PathLike, obj: Any) -> None:
    """A benchmark's results (``write_json``, indent 2) with every path under the working directory written
    relative to it: a committed results file names no machine's folders."""
    prefix = str(Path.cwd().resolve()) + os.sep
    write_json(path, json.loads(json.dumps(obj, default=str).replace(json.dumps(prefix)[1:-1], "")), indent=2)


def save_tensors(path: PathLike, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str] = None) -> int:
    """A safetensors file written to a temporary name, fsynced, renamed into place -> its size in bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)
    return path.stat().st_size


def partial_folder(final: PathLike) -> Path:
    """Where a folder is built before ``replace_folder`` publishes it: a hidden sibling."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial")


def replace_folder(partial: PathLike, final: PathLike) -> None:
    """Publish a finished folder under its final name; an older folder of that name is replaced (it stays
    complete until the new one is in place)."""
    import shutil

    partial, final = Path(partial), Path(final)
    for file in partial.rglob("*"):
        if file.is_file():
            fsync(file)
    fsync(partial)
    if final.exists():
        stale = final.with_name(f".{final.name}.replaced")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(partial, final)
    fsync(final.parent)
