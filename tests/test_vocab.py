"""ClusterVocab / StandardNormalShift: fit statistics, cosine assignment, shift values, files, original layout."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shifted_diffusion.kmeans import spherical_kmeans
from shifted_diffusion.vocab import ClusterVocab, LearnableClusterVocab, StandardNormalShift, load_shift


def planted(seed=0, num_clusters=6, per_cluster=40, dim=16, noise=0.1):
    rng = np.random.default_rng(seed)
    directions, _ = np.linalg.qr(rng.standard_normal((dim, num_clusters)))
    labels = np.repeat(np.arange(num_clusters), per_cluster)
    x = directions.T[labels] + noise * rng.standard_normal((labels.size, dim))
    x *= rng.uniform(0.5, 4.0, size=(labels.size, 1))  # raw norms vary: raw means != normalised means
    return x.astype(np.float32), labels


def random_vocab(k=5, d=8, seed=0, std_scale=5.0):
    g = torch.Generator().manual_seed(seed)
    return ClusterVocab(torch.randn(k, d, generator=g), torch.rand(k, d, generator=g) + 0.1, std_scale=std_scale)


# ---------------------------------------------------------------- fit


def test_fit_means_and_stds_are_numpy_member_statistics():
    x, labels = planted(noise=0.02)
    # a singleton cluster far from the (tight) rest, and a dimension constant inside cluster 0
    x[labels == 0, 5] = 0.25
    outlier = -20.0 * x.mean(axis=0, keepdims=True)  # negative cosine to every planted cluster
    x = np.concatenate([x, outlier])
    vocab = ClusterVocab.fit(torch.from_numpy(x), 7, seed=1, iters=30, std_floor=1e-3, std_scale=4.0)
    assignments = spherical_kmeans(torch.from_numpy(x), 7, seed=1, iters=30).assignments.numpy()

    assert vocab.num_clusters == 7 and vocab.dim == 16 and vocab.std_scale == 4.0
    assert np.bincount(assignments, minlength=7).min() >= 1
    x64 = x.astype(np.float64)
    for k in range(7):
        members = x64[assignments == k]
        np.testing.assert_allclose(vocab.means[k].numpy(), members.mean(axis=0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(vocab.stds[k].numpy(), np.maximum(members.std(axis=0), 1e-3), rtol=1e-5, atol=1e-7)
    singleton = assignments[-1]
    assert (assignments == singleton).sum() == 1
    np.testing.assert_allclose(vocab.means[singleton].numpy(), outlier[0])
    assert torch.all(vocab.stds[singleton] == torch.tensor(1e-3, dtype=torch.float32))
    # the constant dimension of planted cluster 0 is floored
    k0 = np.bincount(assignments[:-1][labels == 0]).argmax()
    assert vocab.stds[k0, 5] == torch.tensor(1e-3, dtype=torch.float32)
    # raw-space means, not unit vectors
    assert not torch.allclose(vocab.means.norm(dim=1), torch.ones(7), atol=0.1)


def test_fit_recovers_planted_assignment():
    x, labels = planted(3)
    vocab = ClusterVocab.fit(torch.from_numpy(x), 6, seed=0)
    found = vocab.assign(torch.from_numpy(x)).numpy()
    for k in range(6):  # each found cluster is one planted cluster
        assert len(set(labels[found == k])) == 1


# ---------------------------------------------------------------- assign / shift


def test_assign_is_argmax_cosine_not_dot_product():
    # means of very different norms: the dot product would always pick the long mean
    means = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 1.0]])
    vocab = ClusterVocab(means, torch.ones(3, 3))
    text_emb = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.2, 3.0], [5.0, 0.1, 0.2]])
    assert vocab.assign(text_emb).tolist() == [1, 2, 0]

    rng = np.random.default_rng(4)
    means_np = rng.standard_normal((9, 12)) * rng.uniform(0.1, 10, size=(9, 1))
    text_np = rng.standard_normal((50, 12)) * rng.uniform(0.1, 10, size=(50, 1))
    vocab = ClusterVocab(torch.from_numpy(means_np).float(), torch.ones(9, 12))
    cos = (text_np / np.linalg.norm(text_np, axis=1, keepdims=True)) @ (
        means_np / np.linalg.norm(means_np, axis=1, keepdims=True)
    ).T
    expected = cos.argmax(axis=1)
    got = vocab.assign(torch.from_numpy(text_np).float())
    assert got.dtype == torch.long and got.shape == (50,)
    np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_array_equal(vocab.assign(torch.from_numpy(text_np).float(), batch_size=7).numpy(), expected)
    np.testing.assert_array_equal(vocab.assign(torch.from_numpy(text_np)).numpy(), expected)  # float64 input


def test_shift_values():
    vocab = random_vocab(std_scale=3.5)
    cluster_idx = torch.tensor([4, 0, 4, 2])
    shift_mean, shift_std = vocab.shift(cluster_idx)
    assert torch.equal(shift_mean, vocab.means[[4, 0, 4, 2]])
    assert torch.allclose(shift_std, 3.5 * vocab.stds[[4, 0, 4, 2]])
    shift_mean16, shift_std16 = vocab.shift(cluster_idx, dtype=torch.float16)
    assert shift_mean16.dtype == torch.float16 and shift_std16.dtype == torch.float16
    idx, mean3, std3 = vocab(torch.randn(6, 8, dtype=torch.float64))
    assert idx.shape == (6,) and mean3.dtype == torch.float64 and std3.shape == (6, 8)
    assert torch.allclose(std3, 3.5 * vocab.stds[idx].double())


def test_baseline_shift():
    baseline = StandardNormalShift(8)
    assert baseline.num_clusters is None
    text_emb = torch.randn(5, 8, dtype=torch.float64)
    cluster_idx = baseline.assign(text_emb)
    assert cluster_idx.dtype == torch.long and torch.equal(cluster_idx, torch.zeros(5, dtype=torch.long))
    shift_mean, shift_std = baseline.shift(cluster_idx)
    assert torch.equal(shift_mean, torch.zeros(5, 8)) and torch.equal(shift_std, torch.ones(5, 8))
    shift_mean, shift_std = baseline.shift(cluster_idx, dtype=torch.bfloat16)
    assert shift_mean.dtype == torch.bfloat16 and shift_std.dtype == torch.bfloat16
    _, mean3, std3 = baseline(text_emb)
    assert mean3.dtype == torch.float64 and torch.equal(std3, torch.ones(5, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"text_emb has dim 7 but the vocabulary has dim 8"):
        baseline.assign(torch.randn(2, 7))


def test_vocab_moves_with_module_to():
    vocab = random_vocab()
    state = vocab.state_dict()
    assert set(state) == {"means", "stds"}
    vocab = vocab.to(torch.float64)
    assert vocab.means.dtype == torch.float64


# ---------------------------------------------------------------- files


def test_save_load_round_trip_bit_exact(tmp_path):
    vocab = random_vocab(k=7, d=10, std_scale=4.7)
    path = tmp_path / "vocab.safetensors"
    vocab.save(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["num_clusters"] == "7" and metadata["dim"] == "10"
    assert float(metadata["std_scale"]) == 4.7 and metadata["version"] == "1"
    loaded = ClusterVocab.load(path)
    assert torch.equal(loaded.means, vocab.means) and torch.equal(loaded.stds, vocab.stds)
    assert loaded.std_scale == 4.7
    assert load_shift(path, 10).num_clusters == 7
    assert isinstance(load_shift(None, 10), StandardNormalShift)
    with pytest.raises(ValueError, match=r"has dim 10 but the model expects dim 12"):
        load_shift(path, 12)


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="not a shifted-diffusion vocabulary file"):
        ClusterVocab.load(path)
    with pytest.raises(FileNotFoundError):
        ClusterVocab.load(tmp_path / "missing.safetensors")


def test_from_original_layouts(tmp_path):
    g = torch.Generator().manual_seed(0)
    means, stds = torch.randn(3, 1536, generator=g), torch.rand(3, 1536, generator=g)
    # (K, D)
    torch.save(means, tmp_path / "mean.pth")
    torch.save(stds, tmp_path / "std.pth")
    vocab = ClusterVocab.from_original(tmp_path / "mean.pth", tmp_path / "std.pth", std_scale=5.0)
    assert torch.equal(vocab.means, means) and torch.equal(vocab.stds, stds) and vocab.std_scale == 5.0
    # flattened (K*D,), D = 1536 by default, first num_clusters rows kept (as the original's sft_test.py)
    torch.save(means.flatten(), tmp_path / "mean_flat.pth")
    torch.save({"std": stds.flatten()}, tmp_path / "std_flat.pth")
    vocab = ClusterVocab.from_original(tmp_path / "mean_flat.pth", tmp_path / "std_flat.pth", num_clusters=2)
    assert torch.equal(vocab.means, means[:2]) and torch.equal(vocab.stds, stds[:2])
    # flattened with an explicit dim
    small = torch.arange(24.0)
    torch.save(small, tmp_path / "m.pth")
    torch.save(small + 1, tmp_path / "s.pth")
    vocab = ClusterVocab.from_original(tmp_path / "m.pth", tmp_path / "s.pth", dim=8)
    assert vocab.means.shape == (3, 8) and torch.equal(vocab.means[1], torch.arange(8.0, 16.0))
    # (K, 1, D) and a std floor
    torch.save(small.reshape(3, 1, 8), tmp_path / "m3.pth")
    torch.save(torch.zeros(3, 1, 8), tmp_path / "s3.pth")
    vocab = ClusterVocab.from_original(tmp_path / "m3.pth", tmp_path / "s3.pth", std_floor=0.01)
    assert torch.equal(vocab.means, small.reshape(3, 8)) and torch.equal(vocab.stds, torch.full((3, 8), 0.01))


def test_from_original_errors(tmp_path):
    torch.save(torch.arange(24.0), tmp_path / "m.pth")
    with pytest.raises(ValueError, match=r"length 24 is not a multiple of dim 1536"):
        ClusterVocab.from_original(tmp_path / "m.pth", tmp_path / "m.pth")
    torch.save({"a": torch.zeros(2, 4), "b": torch.zeros(2, 4)}, tmp_path / "d.pth")
    with pytest.raises(ValueError, match=r"keys: \['a', 'b'\]"):
        ClusterVocab.from_original(tmp_path / "d.pth", tmp_path / "d.pth")
    torch.save(torch.zeros(2, 4), tmp_path / "m2.pth")
    torch.save(torch.zeros(3, 4), tmp_path / "s3.pth")
    with pytest.raises(ValueError, match=r"\(2, 4\) but .* gives \(3, 4\)"):
        ClusterVocab.from_original(tmp_path / "m2.pth", tmp_path / "s3.pth")
    with pytest.raises(ValueError, match=r"has dim 4 but dim=8 was requested"):
        ClusterVocab.from_original(tmp_path / "m2.pth", tmp_path / "m2.pth", dim=8)
    with pytest.raises(FileNotFoundError):
        ClusterVocab.from_original(tmp_path / "nope.pth", tmp_path / "m2.pth")


# ---------------------------------------------------------------- errors


def test_errors():
    vocab = random_vocab(k=5, d=8)
    with pytest.raises(ValueError, match=r"text_emb has dim 6 but the vocabulary has dim 8"):
        vocab.assign(torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"text_emb must be a 2-D tensor \(B, D\); got \(8,\)"):
        vocab.assign(torch.randn(8))
    with pytest.raises(IndexError, match=r"\[0, 5\); got min 0, max 5"):
        vocab.shift(torch.tensor([0, 5]))
    # check=False (indices from assign, no host read of their range): the same lookup, shape checks kept
    idx = torch.tensor([4, 0, 2])
    for got, want in zip(vocab.shift(idx, check=False), (vocab.means[idx], vocab.std_scale * vocab.stds[idx])):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"cluster_idx must be a 1-D tensor"):
        vocab.shift(torch.zeros(2, 1, dtype=torch.long), check=False)
    with pytest.raises(ValueError, match=r"cluster_idx must be a 1-D tensor"):
        vocab.shift(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"stds must have the shape of means \(5, 8\); got \(5, 7\)"):
        ClusterVocab(torch.zeros(5, 8), torch.ones(5, 7))
    with pytest.raises(ValueError, match="non-negative"):
        ClusterVocab(torch.zeros(2, 3), -torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"num_clusters \(20\) must not exceed the number of points N \(10\)"):
        ClusterVocab.fit(torch.randn(10, 4), 20)


# ---------------------------------------------------------------- optional variants


def test_update_running_equals_pooled_statistics():
    # vocab fitted on set A; an update with batch B and momentum |B_k| / (|A_k| + |B_k|) gives the pooled moments of A u B
    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 4)) * 2 + 1
    b = rng.standard_normal((10, 4)) * 0.5 - 3
    means = torch.from_numpy(np.stack([a.mean(0), np.zeros(4)]))
    vocab = ClusterVocab(means, torch.from_numpy(np.stack([a.std(0), np.ones(4)])))
    vocab.update_running(torch.from_numpy(b), torch.zeros(10, dtype=torch.long), momentum=10 / 40)
    pooled = np.concatenate([a, b])
    np.testing.assert_allclose(vocab.means[0].numpy(), pooled.mean(0), rtol=1e-10)
    np.testing.assert_allclose(vocab.stds[0].numpy(), pooled.std(0), rtol=1e-10)
    assert torch.equal(vocab.means[1], torch.zeros(4, dtype=torch.float64))  # unvisited: unchanged
    assert torch.equal(vocab.stds[1], torch.ones(4, dtype=torch.float64))


def test_learnable_vocab_trains_and_saves(tmp_path):
    base = random_vocab(k=4, d=6, std_scale=2.0)
    vocab = LearnableClusterVocab.from_vocab(base)
    assert torch.allclose(vocab.stds, base.stds) and torch.equal(vocab.means, base.means)
    groups = vocab.param_groups(lr=1e-3, lr_scale=10.0)
    assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(1e-2) and len(groups[0]["params"]) == 2
    cluster_idx = torch.tensor([1, 1, 3])
    shift_mean, shift_std = vocab.shift(cluster_idx)
    (shift_mean.sum() + shift_std.sum()).backward()
    with torch.no_grad():  # one plain SGD step on the group (what torch.optim.SGD(groups).step() does)
        for param in groups[0]["params"]:
            param -= groups[0]["lr"] * param.grad
    # d(sum shift_mean)/d mu_1 = 2 per entry, so SGD moves mu_1 by -lr * 2; untouched rows stay
    assert torch.allclose(vocab.means[1].detach(), base.means[1] - 2e-2)
    assert torch.equal(vocab.means[0].detach(), base.means[0])
    assert bool((vocab.stds > 0).all())
    path = tmp_path / "learned.safetensors"
    vocab.save(path)
    loaded = ClusterVocab.load(path)
    assert torch.equal(loaded.means, vocab.means.detach()) and loaded.std_scale == 2.0
