"""Embedding metrics a fidelity claim can rest on (the generated embeddings against real ones).

* attribute probes: linear (softmax) classifiers trained on real embeddings; their accuracy on held-out real
  embeddings is the ceiling, their accuracy on generated embeddings (labelled by their captions) the score;
* ``conditional_total_variation``: per caption, TV between the probe's predicted label distribution over that
  caption's samples and the real conditional distribution of the label, averaged over captions;
* precision / recall (Kynkaenniemi et al. 2019, "Improved precision and recall metric for assessing generative
  models"): the real (generated) manifold is the union of balls around each real (generated) point with radius
  its distance to its k-th nearest neighbour in its own set; precision = share of generated points inside the real
  manifold, recall = share of real points inside the generated manifold;
* density / coverage (Naeem et al. 2020, "Reliable fidelity and diversity metrics for generative models"):
  density = (1 / (k M)) sum_j #{real balls containing generated point j}, coverage = share of real points whose
  ball holds at least one generated point.

Distances are Euclidean (normalise the embeddings first for cosine geometry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

__all__ = ["LinearProbe", "fit_linear_probe", "probe_accuracies", "conditional_total_variation",
           "knn_radii", "precision_recall", "density_coverage"]


def _rows(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D); got shape {tuple(x.shape)}")
    return x.to(torch.float64)


@dataclass
class LinearProbe:
    """A softmax classifier on standardised embeddings."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # (D, K)
    bias: torch.Tensor  # (K,)

    def logits(self, x) -> torch.Tensor:
        return ((_rows(x, "x") - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x) -> torch.Tensor:
        return self.logits(x).argmax(dim=1)

    def accuracy(self, x, labels) -> float:
        return float((self.predict(x) == torch.as_tensor(labels).long()).double().mean())


def fit_linear_probe(x, labels, num_classes: int, *, weight_decay: float = 1e-3, steps: int = 200) -> LinearProbe:
    """Multinomial logistic regression (L2 ``weight_decay``) fitted by full-batch L-BFGS on real embeddings."""
    x = _rows(x, "x")
    labels = torch.as_tensor(labels).long()
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels: expected shape ({x.shape[0]},), got {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}); got [{int(labels.min())}, {int(labels.max())}]")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8) if x.shape[0] > 1 else torch.ones(x.shape[1], dtype=x.dtype)
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, labels) + weight_decay * (weight ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


def probe_accuracies(train_x, train_labels, test_x, test_labels, generated, generated_labels,
                     num_classes: int, **fit) -> Dict[str, float]:
    """{"real": held-out real accuracy (the ceiling), "generated": accuracy on the generated embeddings}."""
    probe = fit_linear_probe(train_x, train_labels, num_classes, **fit)
    return {"real": probe.accuracy(test_x, test_labels), "generated": probe.accuracy(generated, generated_labels)}


def conditional_total_variation(predicted, real_distribution) -> float:
    """Mean over captions of 0.5 * sum_k |p_hat(k) - p(k)|: ``predicted`` (C, S) predicted labels of each caption's
    S samples, ``real_distribution`` (C, K) the label's real conditional distribution per caption (rows sum to 1)."""
    predicted = torch.as_tensor(predicted).long()
    real = torch.as_tensor(real_distribution, dtype=torch.float64)
    if predicted.dim() != 2 or real.dim() != 2 or predicted.shape[0] != real.shape[0]:
        raise ValueError(f"expected predicted (C, S) and real_distribution (C, K); got {tuple(predicted.shape)} "
                         f"and {tuple(real.shape)}")
    if not torch.allclose(real.sum(1), torch.ones(real.shape[0], dtype=torch.float64), atol=1e-6):
        raise ValueError("real_distribution: every row must sum to 1")
    histogram = torch.nn.functional.one_hot(predicted, real.shape[1]).double().mean(dim=1)  # (C, K)
    return float(0.5 * (histogram - real).abs().sum(dim=1).mean())


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (A, B) computed directly (not through a matrix product, whose rounding makes
    d(a, b) != d(b, a) and d(a, a) != 0: a point would fall just outside the ball it defines)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _within(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int):
    """Per query row: how many balls (centres, radii) contain it (Q,), in row chunks (bounded memory)."""
    counts = [(_distances(queries[i:i + chunk], centres) <= radii[None, :]).sum(dim=1)
              for i in range(0, queries.shape[0], chunk)]
    return torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)


def knn_radii(x, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row (N,)."""
    x = _rows(x, "x")
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k must lie in [1, {x.shape[0] - 1}] (rows - 1); got {k}")
    # the 1st smallest distance is the row's own (0)
    return torch.cat([_distances(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, x.shape[0], chunk)])


def precision_recall(real, generated, k: int = 3, chunk: int = 1024) -> Dict[str, float]:
    """Kynkaenniemi et al.'s improved precision and recall with k-NN radii."""
    real, generated = _rows(real, "real"), _rows(generated, "generated")
    precision = (_within(generated, real, knn_radii(real, k, chunk), chunk) > 0).double().mean()
    recall = (_within(real, generated, knn_radii(generated, k, chunk), chunk) > 0).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


def density_coverage(real, generated, k: int = 3, chunk: int = 1024) -> Dict[str, float]:
    """Naeem et al.'s density and coverage with the real points' k-NN radii."""
    real, generated = _rows(real, "real"), _rows(generated, "generated")
    radii = knn_radii(real, k, chunk)
    density = _within(generated, real, radii, chunk).double().sum() / (k * generated.shape[0])
    # real point i is covered when its nearest generated point lies inside its ball
    nearest = torch.cat([_distances(real[i:i + chunk], generated).min(dim=1).values
                         for i in range(0, real.shape[0], chunk)])
    coverage = (nearest <= radii).double().mean()
    return {"density": float(density), "coverage": float(coverage)}
