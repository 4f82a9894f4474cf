"""Checks of settings and values, run before any work: one sentence naming the setting (a flag, a field or
an argument), what is accepted and what came."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npy")  # what decoder.load_embedding reads


def _describe(low, high, low_open, high_open, integer) -> str:
    kind = "an integer" if integer else "a finite number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high}"
    return kind


def check_range(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None, *,
                low_open: bool = False, high_open: bool = False, integer: bool = False,
                optional: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite number (an int when ``integer``) in the range;
    ``optional`` accepts None. ``name`` is what the user wrote: a flag (``--batch_size``) or a field."""
    if value is None and optional:
        return
    expected = _describe(low, high, low_open, high_open, integer)
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if ok:
        ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {sorted(choices, key=str)}, got {value!r}")


def check_count(name: str, value: Any, *, optional: bool = False) -> None:
    """An integer >= 1 (a number of steps, images, a batch size)."""
    check_range(name, value, 1, integer=True, optional=optional)


def check_scale(name: str, value: Any) -> float:
    """A guidance scale as a float: finite and >= 0 (1 = no guidance, 0 = unconditional). NaN would silently
    disable guidance and huge scales overflow to black images."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    check_range(name, value, 0.0)
    return float(value)


def check_image_size(name: str, value: Any) -> None:
    """A positive multiple of 8 (the VAE's down-sampling factor), or None (the model's default)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8):
        raise ValueError(f"{name}: expected a positive multiple of 8, got {value!r}")


def check_embedding_file(name: str, value: str) -> None:
    """An existing embedding file with a suffix decoder.load_embedding reads."""
    path, expected = Path(value), f"expected an embedding file ({', '.join(EMBEDDING_SUFFIXES)})"
    if path.is_dir():
        raise ValueError(f"{name} {value}: is a directory; {expected}")
    if not path.is_file():
        raise ValueError(f"{name} {value}: no such file; {expected}")
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise ValueError(f"{name} {value}: unknown extension {path.suffix!r}; {expected}")


def check_finite(tensor: torch.Tensor, what: str, cause: str) -> None:
    """FloatingPointError when ``tensor`` holds NaN or inf, naming the stage (``what``), how many values, and
    the likely cause."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise FloatingPointError(f"{what}: {bad} of {tensor.numel()} values are NaN or inf "
                                 f"(shape {tuple(tensor.shape)}); likely cause: {cause}")
