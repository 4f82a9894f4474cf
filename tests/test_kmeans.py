"""Spherical k-means: planted-cluster recovery, k-means++ seeding, re-seeding, nearest-by-cosine assignment."""

import numpy as np
import pytest
import torch

from shifted_diffusion.kmeans import kmeans_plus_plus, spherical_kmeans


def planted_mixture(seed, num_clusters=8, per_cluster=150, dim=32, noise=0.15):
    """Points around num_clusters orthonormal directions, with random raw norms; returns (x (N, D), labels (N,))."""
    rng = np.random.default_rng(seed)
    directions, _ = np.linalg.qr(rng.standard_normal((dim, num_clusters)))
    directions = directions.T  # (K, D) orthonormal rows
    labels = np.repeat(np.arange(num_clusters), per_cluster)
    x = directions[labels] + noise / np.sqrt(dim) * rng.standard_normal((labels.size, dim))
    x *= rng.uniform(0.5, 3.0, size=(labels.size, 1))
    order = rng.permutation(labels.size)
    return torch.from_numpy(x[order]).float(), labels[order]


def purity(found, labels):
    found = np.asarray(found)
    total = 0
    for k in np.unique(found):
        total += np.bincount(labels[found == k]).max()
    return total / labels.size


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_recovers_planted_clusters(seed):
    x, labels = planted_mixture(seed)
    result = spherical_kmeans(x, 8, seed=seed, iters=30)
    assert purity(result.assignments.numpy(), labels) >= 0.95
    # every true cluster is found (no two merged): the inverse purity is high too
    assert purity(labels, result.assignments.numpy()) >= 0.95
    assert torch.allclose(result.centroids.norm(dim=1), torch.ones(8), atol=1e-5)


def test_kmeans_plus_plus_seeds_land_in_distinct_clusters():
    # with tight, well separated clusters, D^2 seeding picks one seed per cluster (uniform seeding: 8!/8^8 = 0.24%)
    x, labels = planted_mixture(0, noise=0.02)
    x_unit = x / x.norm(dim=1, keepdim=True)
    for seed in range(5):
        for local_trials in (1, None):  # plain and greedy k-means++
            seeds = kmeans_plus_plus(x_unit, 8, torch.Generator().manual_seed(seed), local_trials=local_trials)
            nearest_point = (seeds @ x_unit.t()).argmax(dim=1).numpy()
            assert len(set(labels[nearest_point])) == 8
            assert bool((seeds[:, None, :] == x_unit[None]).all(dim=2).any(dim=1).all())  # seeds are data points


def test_assignments_are_nearest_by_cosine_numpy():
    rng = np.random.default_rng(5)
    x_np = rng.standard_normal((500, 12)) * rng.uniform(0.1, 10.0, size=(500, 1))
    result = spherical_kmeans(torch.from_numpy(x_np).float(), 10, seed=3, iters=4, tol=0.0)
    centroids = result.centroids.double().numpy()
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-6)
    x_unit = x_np / np.linalg.norm(x_np, axis=1, keepdims=True)
    cosines = x_unit @ centroids.T
    np.testing.assert_array_equal(result.assignments.numpy(), cosines.argmax(axis=1))
    np.testing.assert_allclose(result.inertia, (1.0 - cosines.max(axis=1)).sum(), rtol=1e-5)


def test_converged_centroids_are_normalised_member_means():
    rng = np.random.default_rng(11)
    x_np = rng.standard_normal((400, 6))
    result = spherical_kmeans(torch.from_numpy(x_np), 5, seed=0, iters=200, tol=0.0)
    assert result.iterations < 200, "did not converge"
    assignments = result.assignments.numpy()
    x_unit = x_np / np.linalg.norm(x_np, axis=1, keepdims=True)
    for k in range(5):
        member_mean = x_unit[assignments == k].mean(axis=0)
        np.testing.assert_allclose(result.centroids[k].numpy(), member_mean / np.linalg.norm(member_mean), atol=1e-10)


def test_empty_cluster_is_reseeded():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(np.abs(rng.standard_normal((300, 8)))).float()  # all in the positive orthant
    init = torch.cat([x[:3], -torch.ones(1, 8)])  # the last centroid has negative cosine to every point
    assert int(((x / x.norm(dim=1, keepdim=True)) @ (init / init.norm(dim=1, keepdim=True)).t()).argmax(1).eq(3).sum()) == 0
    result = spherical_kmeans(x, 4, init=init, iters=20)
    assert result.num_reseeded >= 1
    counts = torch.bincount(result.assignments, minlength=4)
    assert int(counts.min()) >= 1
    assert result.centroids[3] @ torch.ones(8) > 0  # moved onto the data


def test_reseeding_with_duplicate_points_leaves_no_empty_cluster():
    # 3 distinct directions, 4 clusters: ties make a cluster empty every iteration; re-seeding must keep it filled
    base = torch.eye(3)
    x = torch.cat([base[i].repeat(20, 1) for i in range(3)] + [torch.tensor([[1.0, 1.0, 0.0]])])
    result = spherical_kmeans(x, 4, seed=0, iters=10)
    assert int(torch.bincount(result.assignments, minlength=4).min()) >= 1


def test_deterministic_and_batch_size_independent():
    x, _ = planted_mixture(7, per_cluster=60)
    a = spherical_kmeans(x, 8, seed=4, iters=10)
    b = spherical_kmeans(x, 8, seed=4, iters=10)
    c = spherical_kmeans(x, 8, seed=4, iters=10, batch_size=37)
    assert torch.equal(a.assignments, b.assignments) and torch.equal(a.centroids, b.centroids)
    assert torch.equal(a.assignments, c.assignments)
    assert torch.allclose(a.centroids, c.centroids, atol=1e-6)


def test_progress_runs(capsys):
    x, _ = planted_mixture(1, per_cluster=20)
    result = spherical_kmeans(x, 8, iters=3, progress=True)
    assert result.assignments.shape == (160,)


@pytest.mark.parametrize(
    "x, k, match",
    [
        (torch.randn(5, 3), 6, r"num_clusters \(6\) must not exceed the number of points N \(5\)"),
        (torch.randn(10), 2, r"x must be 2-D \(N, D\); got shape \(10,\)"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1, "NaN or inf"),
        (torch.tensor([[1.0, 0.0], [0.0, 0.0]]), 1, "all-zero rows"),
        (torch.randn(5, 3), 0, "positive int"),
    ],
)
def test_errors(x, k, match):
    with pytest.raises(ValueError, match=match):
        spherical_kmeans(x, k)


def test_init_shape_error():
    with pytest.raises(ValueError, match=r"init must have shape"):
        spherical_kmeans(torch.randn(10, 3), 2, init=torch.randn(3, 3))
