"""Classifier-free guidance on the x0 prediction (Ho & Salimans 2022, applied to x0 as in the paper)."""

from __future__ import annotations

import math
import numbers
from typing import Union

import torch


def classifier_free_guidance(
    x0_cond: torch.Tensor, x0_uncond: torch.Tensor, scale: Union[float, torch.Tensor]
) -> torch.Tensor:
    """x0_hat = x0_uncond + g * (x0_cond - x0_uncond), over the whole embedding (not halves of it)."""
    if x0_cond.shape != x0_uncond.shape:
        raise ValueError(
            f"classifier_free_guidance: x0_cond has shape {tuple(x0_cond.shape)} but x0_uncond has "
            f"shape {tuple(x0_uncond.shape)}; they must match"
        )
    return x0_uncond + scale * (x0_cond - x0_uncond)


def check_guidance_scale(scale, name: str = "guidance_scale") -> float:
    """``scale`` as a float, refused unless it is a finite number >= 0 (1 = no guidance, 0 = unconditional).

    NaN would otherwise compare unequal to 1 and turn every guided value into NaN, and huge scales overflow
    to inf / NaN (black images); ``name`` is the argument or flag named in the error."""
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a number >= 0; got {scale!r} ({type(scale).__name__})")
    if not math.isfinite(float(scale)) or scale < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (1 = no guidance); got {scale!r}")
    return float(scale)


def check_finite(tensor: torch.Tensor, what: str, cause: str) -> None:
    """Raise when ``tensor`` holds NaN or inf, naming the stage (``what``), how many values, and the likely cause."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise FloatingPointError(f"{what}: {bad} of {tensor.numel()} values are NaN or inf "
                                 f"(shape {tuple(tensor.shape)}); likely cause: {cause}")
