"""Metrics: per-block cosine vs numpy, Frechet distance vs closed forms, cosine nearest neighbours vs brute force."""

import numpy as np
import pytest
import torch

from shifted_diffusion.metrics import (
    blockwise_cosine,
    frechet_distance,
    frechet_distance_from_statistics,
    nearest_neighbors,
)


def test_blockwise_cosine_matches_numpy():
    rng = np.random.default_rng(0)
    block_sizes = [5, 3, 8]
    # blocks of very different norms: the whole-vector cosine would be dominated by the last block
    scales = np.concatenate([np.full(5, 0.1), np.full(3, 1.0), np.full(8, 30.0)])
    a = rng.standard_normal((20, 16)) * scales
    b = rng.standard_normal((20, 16)) * scales
    per_block, mean = blockwise_cosine(torch.from_numpy(a), torch.from_numpy(b), block_sizes)
    expected = np.zeros((20, 3))
    offsets = np.cumsum([0] + block_sizes)
    for j in range(3):
        aj, bj = a[:, offsets[j] : offsets[j + 1]], b[:, offsets[j] : offsets[j + 1]]
        expected[:, j] = (aj * bj).sum(1) / (np.linalg.norm(aj, axis=1) * np.linalg.norm(bj, axis=1))
    assert per_block.shape == (20, 3) and mean.shape == (20,)
    np.testing.assert_allclose(per_block.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(mean.numpy(), expected.mean(1), rtol=1e-12)
    whole = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert not np.allclose(whole, expected.mean(1), atol=1e-3)
    # float32 inputs and numpy inputs
    per_block32, _ = blockwise_cosine(a.astype(np.float32), b.astype(np.float32), block_sizes)
    assert per_block32.dtype == torch.float32
    np.testing.assert_allclose(per_block32.numpy(), expected, atol=1e-5)


def test_blockwise_cosine_errors():
    with pytest.raises(ValueError, match=r"sum to 10 but the embeddings have dim 12"):
        blockwise_cosine(torch.randn(2, 12), torch.randn(2, 12), [5, 5])
    with pytest.raises(ValueError, match=r"same shape"):
        blockwise_cosine(torch.randn(2, 12), torch.randn(3, 12), [12])


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = torch.randn(300, 10, generator=torch.Generator().manual_seed(0)) * 3 + 2
    assert abs(frechet_distance(x, x)) < 1e-9
    y = x + torch.randn(300, 10, generator=torch.Generator().manual_seed(1))
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-9)


def test_frechet_distance_approaches_closed_form_diagonal():
    # independent dims: FD = ||mu1 - mu2||^2 + sum_d (s1_d - s2_d)^2
    rng = np.random.default_rng(0)
    dim, n = 6, 200_000
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    s1, s2 = rng.uniform(0.5, 2.0, dim), rng.uniform(0.5, 2.0, dim)
    x = mu1 + s1 * rng.standard_normal((n, dim))
    y = mu2 + s2 * rng.standard_normal((n // 2, dim))
    closed_form = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert frechet_distance(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(closed_form, rel=0.02, abs=0.02)
    assert frechet_distance(x.astype(np.float32), y.astype(np.float32)) == pytest.approx(closed_form, rel=0.02, abs=0.02)


def test_frechet_distance_from_statistics_non_commuting():
    # full, non-commuting covariances; reference: tr sqrt(S1 S2) = sum sqrt(eigenvalues of S1 S2) (real, >= 0)
    rng = np.random.default_rng(3)
    dim = 7
    a, b = rng.standard_normal((dim, dim)), rng.standard_normal((dim, dim))
    s1, s2 = a @ a.T + 0.1 * np.eye(dim), b @ b.T + 0.1 * np.eye(dim)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    eigenvalues = np.linalg.eigvals(s1 @ s2)
    assert np.all(np.abs(eigenvalues.imag) < 1e-8) and np.all(eigenvalues.real > 0)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eigenvalues.real).sum()
    assert frechet_distance_from_statistics(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # scaled covariance: FD = ||dmu||^2 + (1 - c)^2 tr(S1)
    expected_scaled = ((mu1 - mu2) ** 2).sum() + (1 - 3.0) ** 2 * np.trace(s1)
    assert frechet_distance_from_statistics(mu1, s1, mu2, 9.0 * s1) == pytest.approx(expected_scaled, rel=1e-9)


def test_frechet_distance_errors():
    with pytest.raises(ValueError, match=r"same dim"):
        frechet_distance(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"at least 2 rows"):
        frechet_distance(torch.randn(1, 3), torch.randn(5, 3))


def test_nearest_neighbors_matches_brute_force():
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((200, 9)) * rng.uniform(0.1, 10, size=(200, 1))
    queries = rng.standard_normal((37, 9))
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        bank / np.linalg.norm(bank, axis=1, keepdims=True)
    ).T
    expected = np.argsort(-cos, axis=1)[:, :3]
    values, indices = nearest_neighbors(torch.from_numpy(queries).float(), torch.from_numpy(bank).float(), k=3, batch_size=8)
    assert indices.shape == (37, 3) and indices.dtype == torch.long
    np.testing.assert_array_equal(indices.numpy(), expected)
    np.testing.assert_allclose(values.numpy(), np.take_along_axis(cos, expected, axis=1), atol=1e-5)
    with pytest.raises(ValueError, match=r"k must lie in \[1, 200\]"):
        nearest_neighbors(torch.randn(2, 9), torch.from_numpy(bank), k=201)
