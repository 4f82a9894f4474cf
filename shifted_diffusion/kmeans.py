"""Spherical (cosine) k-means with k-means++ initialisation, batched in torch.

Used to build the shifted-diffusion vocabulary: cluster the L2-normalised image
embeddings of the training set by cosine similarity. Assignment runs over row chunks of
``batch_size`` so a million 1536-d embeddings with K = 1024 never materialise an N x K matrix.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

__all__ = ["KMeansResult", "spherical_kmeans", "kmeans_plus_plus", "assign_nearest"]


class KMeansResult(NamedTuple):
    """Output of :func:`spherical_kmeans`."""

    centroids: torch.Tensor  # (K, D) unit-norm
    assignments: torch.Tensor  # (N,) long, index of the nearest centroid by cosine
    inertia: float  # sum over points of (1 - cos(x_i, centroid of x_i))
    iterations: int  # Lloyd iterations run
    num_reseeded: int  # empty clusters re-seeded over the whole run


def _check_embeddings(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D); got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty (N, D); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or inf values (in {bad} of {x.shape[0]} rows)")
    return x


def _normalize(x: torch.Tensor, name: str) -> torch.Tensor:
    """L2-normalise rows; zero rows have no direction and are an error."""
    norms = x.norm(dim=1, keepdim=True)
    zero = norms.squeeze(1) == 0
    if bool(zero.any()):
        first = int(zero.nonzero()[0])
        raise ValueError(
            f"{name} has {int(zero.sum())} all-zero rows (first at index {first}); "
            "cosine k-means needs a direction for every row"
        )
    return x / norms


@torch.no_grad()
def assign_nearest(x_unit: torch.Tensor, centroids: torch.Tensor, batch_size: int = 65536):
    """Nearest centroid by cosine for unit rows: returns (indices (N,) long, best cosine (N,))."""
    n = x_unit.shape[0]
    indices = torch.empty(n, dtype=torch.long, device=x_unit.device)
    best = torch.empty(n, dtype=x_unit.dtype, device=x_unit.device)
    centroids_t = centroids.t()
    for start in range(0, n, batch_size):
        sims = x_unit[start : start + batch_size] @ centroids_t  # (chunk, K)
        values, idx = sims.max(dim=1)
        best[start : start + batch_size] = values
        indices[start : start + batch_size] = idx
    return indices, best


def _sample_indices(weights: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Draw count indices with probability proportional to non-negative weights (any N): (count,) long."""
    cumulative = torch.cumsum(weights.double(), dim=0)
    total = float(cumulative[-1])
    if not total > 0.0:
        # every point coincides with a chosen centroid: fall back to uniform draws
        return torch.randint(weights.shape[0], (count,), generator=generator).to(weights.device)
    u = torch.rand(count, generator=generator, dtype=torch.float64).to(cumulative.device) * total
    return torch.searchsorted(cumulative, u, right=True).clamp_max(weights.shape[0] - 1)


@torch.no_grad()
def kmeans_plus_plus(
    x_unit: torch.Tensor,
    num_clusters: int,
    generator: torch.Generator,
    batch_size: int = 65536,
    progress: bool = False,
    local_trials: Optional[int] = None,
) -> torch.Tensor:
    """Greedy k-means++ seeding on the sphere: weights 1 - max cos (half the squared chordal distance).

    Each step draws ``local_trials`` candidates (default 2 + ln K, as in Arthur & Vassilvitskii's
    greedy variant) with probability proportional to the weights and keeps the one that lowers the
    potential sum_i (1 - max cos) the most; ``local_trials=1`` is plain k-means++.
    """
    n = x_unit.shape[0]
    trials = local_trials if local_trials is not None else 2 + int(math.log(num_clusters))
    if trials < 1:
        raise ValueError(f"local_trials must be >= 1; got {trials}")
    centroids = torch.empty(num_clusters, x_unit.shape[1], dtype=x_unit.dtype, device=x_unit.device)
    first = int(torch.randint(n, (1,), generator=generator))
    centroids[0] = x_unit[first]
    max_cos = torch.empty(n, dtype=x_unit.dtype, device=x_unit.device)
    for start in range(0, n, batch_size):
        max_cos[start : start + batch_size] = x_unit[start : start + batch_size] @ centroids[0]
    steps = range(1, num_clusters)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="k-means++ init", leave=False)
    candidate_cos = torch.empty(n, trials, dtype=x_unit.dtype, device=x_unit.device)  # (N, L)
    for k in steps:
        candidates = _sample_indices((1.0 - max_cos).clamp_min(0.0), trials, generator)  # (L,)
        candidate_vectors = x_unit[candidates]  # (L, D)
        potentials = torch.zeros(trials, dtype=torch.float64, device=x_unit.device)
        for start in range(0, n, batch_size):
            cos = candidate_cos[start : start + batch_size]  # (chunk, L)
            torch.matmul(x_unit[start : start + batch_size], candidate_vectors.t(), out=cos)
            potentials += (1.0 - torch.maximum(cos, max_cos[start : start + batch_size, None])).sum(dim=0).double()
        best = int(potentials.argmin())
        centroids[k] = candidate_vectors[best]
        torch.maximum(max_cos, candidate_cos[:, best], out=max_cos)
    return centroids


def _reseed_empty(
    x_unit: torch.Tensor,
    centroids: torch.Tensor,
    assignments: torch.Tensor,
    best_cos: torch.Tensor,
    counts: torch.Tensor,
) -> int:
    """Move the points farthest from their centroids into empty clusters (in place); returns how many were re-seeded."""
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return 0
    distance = 1.0 - best_cos.clone()
    for k in empty:
        # only steal from clusters that keep at least one member
        candidates = torch.where(counts[assignments] > 1, distance, torch.full_like(distance, -float("inf")))
        index = int(candidates.argmax())
        if candidates[index] == -float("inf"):
            raise RuntimeError("cannot re-seed an empty cluster: fewer points than clusters")
        old = int(assignments[index])
        counts[old] -= 1
        counts[k] += 1
        assignments[index] = k
        centroids[k] = x_unit[index]
        best_cos[index] = 1.0
        distance[index] = -float("inf")
    return len(empty)


@torch.no_grad()
def spherical_kmeans(
    x: torch.Tensor,
    num_clusters: int,
    *,
    iters: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
    batch_size: int = 65536,
    device: Optional[Union[str, torch.device]] = None,
    init: Optional[torch.Tensor] = None,
    local_trials: Optional[int] = None,
    progress: bool = False,
) -> KMeansResult:
    """Spherical k-means: maximise sum_i cos(x_i, c_{a_i}) over unit centroids c (Lloyd iterations, k-means++ seeds).

    x: (N, D) embeddings (normalised here). Stops when at most ``tol * N`` assignments change in an
    iteration (``tol=0``: only when none change) or after ``iters`` iterations. Each iteration
    recomputes each centroid as the normalised mean of its members, then re-assigns; clusters left
    empty are re-seeded with the points farthest from their centroids. ``init`` (K, D) replaces
    the greedy k-means++ seeding (``local_trials`` candidates per seed, see kmeans_plus_plus).
    The returned assignments are the nearest centroids by cosine of the returned centroids
    (except points moved by a re-seed in the final iteration, if iters ran out).
    Computation is float32 (float64 if x is float64) on ``device`` (default: x's device).
    """
    x = _check_embeddings(x, "x")
    n, dim = x.shape
    if not isinstance(num_clusters, int) or isinstance(num_clusters, bool) or num_clusters < 1:
        raise ValueError(f"num_clusters must be a positive int; got {num_clusters!r}")
    if num_clusters > n:
        raise ValueError(f"num_clusters ({num_clusters}) must not exceed the number of points N ({n})")
    if iters < 1:
        raise ValueError(f"iters must be >= 1; got {iters}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")

    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    device = torch.device(device) if device is not None else x.device
    x_unit = _normalize(x.to(device=device, dtype=dtype), "x")
    generator = torch.Generator(device="cpu").manual_seed(seed)

    if init is None:
        centroids = kmeans_plus_plus(x_unit, num_clusters, generator, batch_size, progress, local_trials)
    else:
        init = _check_embeddings(init, "init")
        if init.shape != (num_clusters, dim):
            raise ValueError(f"init must have shape (num_clusters, D) = {(num_clusters, dim)}; got {tuple(init.shape)}")
        centroids = _normalize(init.to(device=device, dtype=dtype), "init").clone()

    steps = range(iters)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        steps = bar = tqdm(steps, desc="spherical k-means")

    assignments = None
    num_reseeded = 0
    iterations = 0
    for it in steps:
        if it > 0:
            centroids = _update_centroids(x_unit, assignments, centroids, batch_size)
        previous = assignments
        assignments, best_cos = assign_nearest(x_unit, centroids, batch_size)
        counts = torch.bincount(assignments, minlength=num_clusters)
        reseeded = _reseed_empty(x_unit, centroids, assignments, best_cos, counts)
        num_reseeded += reseeded
        iterations = it + 1
        changed = n if previous is None else int((assignments != previous).sum())
        if bar is not None:
            bar.set_postfix(inertia=float((1.0 - best_cos).sum()), changed=changed)
        if previous is not None and reseeded == 0 and changed <= tol * n:
            break
    if bar is not None:
        bar.close()

    inertia = float((1.0 - best_cos).double().sum())
    return KMeansResult(centroids, assignments, inertia, iterations, num_reseeded)


def _update_centroids(
    x_unit: torch.Tensor, assignments: torch.Tensor, previous: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """c_k = normalise(sum of members); a cluster whose members cancel out keeps its previous centroid."""
    sums = torch.zeros_like(previous)
    for start in range(0, x_unit.shape[0], batch_size):
        sums.index_add_(0, assignments[start : start + batch_size], x_unit[start : start + batch_size])
    norms = sums.norm(dim=1, keepdim=True)
    keep = norms.squeeze(1) <= torch.finfo(sums.dtype).eps
    centroids = sums / norms.clamp_min(torch.finfo(sums.dtype).tiny)
    centroids[keep] = previous[keep]
    return centroids
