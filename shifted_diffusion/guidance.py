"""Classifier-free guidance on the x0 prediction (Ho & Salimans 2022, applied to x0 as in the paper)."""

from __future__ import annotations

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
