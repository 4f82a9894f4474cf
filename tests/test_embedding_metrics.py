"""Probes, conditional total variation, precision / recall and density / coverage against known answers."""

import pytest
import torch

from shifted_diffusion.embedding_metrics import (conditional_total_variation, density_coverage, fit_linear_probe,
                                                 knn_radii, precision_recall, probe_accuracies)


def test_probe_separable_and_shuffled():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 4
    labels = torch.randint(0, 3, (300,), generator=g)
    x = centres[labels] + torch.randn(300, 8, generator=g) * 0.3
    scores = probe_accuracies(x[:200], labels[:200], x[200:], labels[200:], x[200:] + 0.05, labels[200:], 3)
    assert scores["real"] == 1.0 and scores["generated"] == 1.0
    # generated embeddings labelled by the wrong caption: the probe sees it
    wrong = probe_accuracies(x[:200], labels[:200], x[200:], labels[200:], x[200:], (labels[200:] + 1) % 3, 3)
    assert wrong["generated"] == 0.0
    with pytest.raises(ValueError, match="labels must lie in"):
        fit_linear_probe(x, labels + 5, 3)


def test_conditional_total_variation_by_hand():
    predicted = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]])
    real = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    # caption 0: histogram (.5, .5, 0) -> 0; caption 1: (0, 0, 1) vs (0, .5, .5) -> 0.5 * (0.5 + 0.5) = 0.5
    assert conditional_total_variation(predicted, real) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="sum to 1"):
        conditional_total_variation(predicted, real * 2)


def test_knn_radii_by_hand():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    assert knn_radii(x, 1).tolist() == [1.0, 1.0, 2.0, 3.0]
    assert knn_radii(x, 2).tolist() == [3.0, 2.0, 3.0, 5.0]


def test_identical_disjoint_and_hand_cases():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 4, generator=g)
    assert precision_recall(x, x, k=3) == {"precision": 1.0, "recall": 1.0}
    same = density_coverage(x, x, k=3)
    # each real point lies in its own ball and in the balls of those that count it among their 3 neighbours:
    # every ball holds itself + 3 points, so density = 50 * 4 / (3 * 50)
    assert same["coverage"] == 1.0 and same["density"] == pytest.approx(4 / 3)
    far = x + 100.0
    assert precision_recall(x, far, k=3) == {"precision": 0.0, "recall": 0.0}
    assert density_coverage(x, far, k=3) == {"density": 0.0, "coverage": 0.0}
    # 1-D by hand: real radii (k=1) [1, 1, 2, 3] around 0, 1, 3, 6
    real = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    generated = torch.tensor([[0.5], [4.5], [20.0]])
    # 0.5: in balls of 0, 1 (2 balls); 4.5: in balls of 3 (|1.5| <= 2), 6 (|1.5| <= 3); 20: none
    assert density_coverage(real, generated, k=1) == {"density": pytest.approx(4 / 3), "coverage": 1.0}
    # generated radii (k=1): [4, 4, 15.5]; real 0, 1 near 0.5 (<= 4), 3, 6 near 4.5 (<= 4) -> recall 1
    assert precision_recall(real, generated, k=1) == {"precision": pytest.approx(2 / 3), "recall": 1.0}
    # chunking changes nothing
    assert density_coverage(x, x * 1.1, k=3, chunk=7) == density_coverage(x, x * 1.1, k=3)
    assert precision_recall(x, x * 1.1, k=3, chunk=7) == precision_recall(x, x * 1.1, k=3)
