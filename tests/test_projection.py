"""ImageEmbeddingProjection (closed form, save/load round trip, errors) and the decoder folder helpers."""

import numpy as np
import pytest
import torch

from shifted_diffusion.decoder import load_embedding, save_embedding
from shifted_diffusion.projection import ImageEmbeddingProjection


@pytest.mark.parametrize("layer_norm", [True, False])
def test_projection_matches_closed_form(layer_norm):
    torch.manual_seed(0)
    projection = ImageEmbeddingProjection(clip_dim=6, cross_attention_dim=5, num_tokens=4, layer_norm=layer_norm)
    if layer_norm:  # non-trivial affine parameters
        torch.nn.init.normal_(projection.norm.weight)
        torch.nn.init.normal_(projection.norm.bias)
    x0 = torch.randn(3, 6, dtype=torch.float64)
    weight = projection.proj.weight.detach().double()
    bias = projection.proj.bias.detach().double()
    tokens = (x0 @ weight.T + bias).reshape(3, 4, 5)  # token k = rows k*5 .. k*5+4 of the linear output
    if layer_norm:
        mean = tokens.mean(-1, keepdim=True)
        var = ((tokens - mean) ** 2).mean(-1, keepdim=True)
        tokens = (tokens - mean) / torch.sqrt(var + 1e-5) * projection.norm.weight.detach().double() \
            + projection.norm.bias.detach().double()
    out = projection(x0.float())
    assert out.shape == (3, 4, 5)
    torch.testing.assert_close(out.double(), tokens, rtol=1e-5, atol=1e-5)


def test_projection_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    projection = ImageEmbeddingProjection(clip_dim=12, cross_attention_dim=8, num_tokens=3, layer_norm=True)
    torch.nn.init.normal_(projection.norm.weight)
    projection.save_pretrained(tmp_path / "proj")
    loaded = ImageEmbeddingProjection.from_pretrained(tmp_path / "proj")
    keys = ("clip_dim", "cross_attention_dim", "num_tokens", "layer_norm")
    assert {k: loaded.config[k] for k in keys} == {"clip_dim": 12, "cross_attention_dim": 8, "num_tokens": 3,
                                                   "layer_norm": True}
    x0 = torch.randn(5, 12)
    assert torch.equal(loaded(x0), projection(x0))


def test_projection_rejects_wrong_dim_with_both_shapes():
    projection = ImageEmbeddingProjection(clip_dim=12, cross_attention_dim=8)
    with pytest.raises(ValueError, match=r"\(B, 12\).*\(2, 10\)"):
        projection(torch.randn(2, 10))
    with pytest.raises(ValueError, match=r"\(B, 12\)"):
        projection(torch.randn(12))
    with pytest.raises(ValueError, match="positive"):
        ImageEmbeddingProjection(clip_dim=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npy"])
def test_embedding_files(tmp_path, suffix):
    embedding = torch.randn(7)
    path = tmp_path / f"e{suffix}"
    if suffix == ".safetensors":
        save_embedding(path, embedding[None])  # (1, D) is stored as (D,)
    elif suffix == ".pt":
        torch.save({"whatever": embedding[None]}, path)
    else:
        np.save(path, embedding.numpy())
    assert torch.equal(load_embedding(path), embedding)


def test_embedding_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_embedding(tmp_path / "missing.pt")
    torch.save(torch.zeros(2, 3), tmp_path / "two.pt")
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        load_embedding(tmp_path / "two.pt")
    torch.save({"a": torch.zeros(3), "b": torch.zeros(3)}, tmp_path / "ab.pt")
    with pytest.raises(ValueError, match="one tensor"):
        load_embedding(tmp_path / "ab.pt")
