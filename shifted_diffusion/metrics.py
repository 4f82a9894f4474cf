"""Embedding-space metrics: per-CLIP-block cosine, Frechet distance, cosine nearest neighbours.

A concatenated multi-CLIP embedding is compared block by block (one cosine per CLIP model, then
averaged), as the paper does; a cosine on the whole concatenation would weigh the blocks by norm.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "blockwise_cosine",
    "embedding_statistics",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "nearest_neighbors",
]

ArrayLike = Union[torch.Tensor, np.ndarray]


def _as_2d(x: ArrayLike, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    return x


def blockwise_cosine(
    a: ArrayLike, b: ArrayLike, block_sizes: Sequence[int], eps: float = 1e-8
) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos(a_j, b_j) for each CLIP block j of the concatenated embeddings, and their mean: -> ((N, J), (N,))."""
    a, b = _as_2d(a, "a"), _as_2d(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    block_sizes = [int(s) for s in block_sizes]
    if not block_sizes or min(block_sizes) < 1:
        raise ValueError(f"block_sizes must be a non-empty list of positive ints; got {block_sizes}")
    if sum(block_sizes) != a.shape[1]:
        raise ValueError(f"block_sizes {block_sizes} sum to {sum(block_sizes)} but the embeddings have dim {a.shape[1]}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a, b = a.to(dtype), b.to(device=a.device, dtype=dtype)
    blocks = zip(a.split(block_sizes, dim=1), b.split(block_sizes, dim=1))
    per_block = torch.stack([F.cosine_similarity(a_j, b_j, dim=1, eps=eps) for a_j, b_j in blocks], dim=1)  # (N, J)
    return per_block, per_block.mean(dim=1)


def embedding_statistics(x: ArrayLike) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of the rows of x, in float64."""
    x = _as_2d(x, "x").to(torch.float64)
    if x.shape[0] < 2:
        raise ValueError(f"x needs at least 2 rows for a covariance; got {x.shape[0]}")
    mu = x.mean(dim=0)
    centred = x - mu
    sigma = centred.t() @ centred / (x.shape[0] - 1)
    return mu, sigma


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped to 0)."""
    matrix = 0.5 * (matrix + matrix.t())
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp_min(0.0).sqrt()) @ eigenvectors.t()


def frechet_distance_from_statistics(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike
) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), in float64."""
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    sigma1 = torch.as_tensor(sigma1, dtype=torch.float64)
    sigma2 = torch.as_tensor(sigma2, dtype=torch.float64, device=sigma1.device)
    mu2 = mu2.to(mu1.device)
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"expected mu1, mu2 (D,) and sigma1, sigma2 (D, D) with one D; got {tuple(mu1.shape)}, "
            f"{tuple(mu2.shape)}, {tuple(sigma1.shape)}, {tuple(sigma2.shape)}"
        )
    sqrt_sigma1 = _sqrt_psd(sigma1)
    # the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric PSD) are those of S1 S2; their square roots sum to tr sqrt(S1 S2)
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    product_eigenvalues = torch.linalg.eigvalsh(0.5 * (product + product.t()))
    trace_sqrt = product_eigenvalues.clamp_min(0.0).sqrt().sum()
    diff = mu1 - mu2
    distance = diff @ diff + torch.trace(sigma1) + torch.trace(sigma2) - 2.0 * trace_sqrt
    return float(distance)


def frechet_distance(x: ArrayLike, y: ArrayLike) -> float:
    """Frechet distance between Gaussians fitted to embedding sets x (N, D) and y (M, D), in float64."""
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dim; got x {tuple(x.shape)} and y {tuple(y.shape)}")
    mu1, sigma1 = embedding_statistics(x)
    mu2, sigma2 = embedding_statistics(y.to(x.device))
    return frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2)


@torch.no_grad()
def nearest_neighbors(
    queries: ArrayLike, bank: ArrayLike, k: int = 1, batch_size: int = 4096
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k rows of bank (M, D) with highest cosine to each query (Q, D): -> (cosines (Q, k), indices (Q, k) long)."""
    queries, bank = _as_2d(queries, "queries"), _as_2d(bank, "bank")
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries have dim {queries.shape[1]} but bank has dim {bank.shape[1]}")
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must lie in [1, {bank.shape[0]}] (rows of bank); got {k}")
    dtype = torch.promote_types(torch.promote_types(queries.dtype, bank.dtype), torch.float32)
    bank_unit = F.normalize(bank.to(device=queries.device, dtype=dtype), dim=1)  # (M, D)
    values, indices = [], []
    for start in range(0, queries.shape[0], batch_size):
        chunk = F.normalize(queries[start : start + batch_size].to(dtype), dim=1)  # (b, D)
        top = (chunk @ bank_unit.t()).topk(k, dim=1)
        values.append(top.values)
        indices.append(top.indices)
    if not values:
        empty = torch.empty(0, k, dtype=dtype, device=queries.device)
        return empty, empty.long()
    return torch.cat(values), torch.cat(indices)
