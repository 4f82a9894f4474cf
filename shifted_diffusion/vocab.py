"""The shifted-diffusion vocabulary: K Gaussians N(mu_k, diag((std_scale * s_k)^2)) in raw CLIP image-embedding space.

A caption picks cluster k = argmax_j cos(c, mu_j) from its CLIP text embedding c;
the schedule and sampler then use shift_mean = mu_k and shift_std = std_scale * s_k.
``StandardNormalShift`` is the DALL-E 2 baseline (mu = 0, Sigma = I) with the same interface.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Tuple, Union

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .kmeans import spherical_kmeans

__all__ = ["ClusterVocab", "LearnableClusterVocab", "StandardNormalShift", "load_shift"]

VOCAB_FORMAT = "shifted-diffusion-vocab"
VOCAB_VERSION = 1
DEFAULT_ORIGINAL_DIM = 1536

PathLike = Union[str, "os.PathLike[str]"]


def _check_text_emb(text_emb: torch.Tensor, dim: int, name: str = "text_emb") -> None:
    if not isinstance(text_emb, torch.Tensor) or text_emb.dim() != 2:
        shape = tuple(text_emb.shape) if isinstance(text_emb, torch.Tensor) else type(text_emb).__name__
        raise ValueError(f"{name} must be a 2-D tensor (B, D); got {shape}")
    if not text_emb.is_floating_point():
        raise TypeError(f"{name} must be floating point; got dtype {text_emb.dtype}")
    if text_emb.shape[1] != dim:
        raise ValueError(
            f"{name} has dim {text_emb.shape[1]} but the vocabulary has dim {dim} "
            "(caption and image embeddings must come from the same CLIP set)"
        )


def _check_cluster_idx(cluster_idx: torch.Tensor, num_clusters: Optional[int]) -> None:
    if not isinstance(cluster_idx, torch.Tensor) or cluster_idx.dim() != 1:
        shape = tuple(cluster_idx.shape) if isinstance(cluster_idx, torch.Tensor) else type(cluster_idx).__name__
        raise ValueError(f"cluster_idx must be a 1-D tensor (B,); got {shape}")
    if cluster_idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"cluster_idx must be an integer tensor; got dtype {cluster_idx.dtype}")
    if num_clusters is not None and cluster_idx.numel() > 0:
        low, high = int(cluster_idx.min()), int(cluster_idx.max())
        if low < 0 or high >= num_clusters:
            raise IndexError(f"cluster_idx values must lie in [0, {num_clusters}); got min {low}, max {high}")


class ClusterVocab(ModelMixin, ConfigMixin):
    """K cluster Gaussians (means (K, D), per-dim stds (K, D)) and std_scale: Sigma_k = diag((std_scale * s_k)^2).

    A diffusers component: ``save_pretrained`` writes config.json (num_clusters, dim, std_scale) and the means /
    stds as safetensors; ``from_pretrained`` reads them back. ``save`` / ``load`` keep the one-file format."""

    ignore_for_config = ["means", "stds"]

    @register_to_config
    def __init__(self, means: Optional[torch.Tensor] = None, stds: Optional[torch.Tensor] = None,
                 std_scale: float = 5.0, num_clusters: Optional[int] = None, dim: Optional[int] = None):
        super().__init__()
        if means is None or stds is None:  # from_pretrained: shapes from the config, values from the weights file
            if not (isinstance(num_clusters, int) and isinstance(dim, int)):
                raise ValueError("ClusterVocab needs means and stds (K, D), or num_clusters and dim")
            means, stds = torch.zeros(num_clusters, dim), torch.ones(num_clusters, dim)
        means, stds = self._validate(means, stds, std_scale)
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.std_scale = float(std_scale)
        # the whole config again: diffusers maps positional (means, stds) onto the first config names
        self.register_to_config(std_scale=self.std_scale, num_clusters=int(means.shape[0]), dim=int(means.shape[1]))

    @staticmethod
    def _validate(means, stds, std_scale) -> Tuple[torch.Tensor, torch.Tensor]:
        means = torch.as_tensor(means)
        stds = torch.as_tensor(stds)
        if means.dim() != 2:
            raise ValueError(f"means must be 2-D (K, D); got shape {tuple(means.shape)}")
        if stds.shape != means.shape:
            raise ValueError(f"stds must have the shape of means {tuple(means.shape)}; got {tuple(stds.shape)}")
        if not means.is_floating_point() or not stds.is_floating_point():
            raise TypeError(f"means and stds must be floating point; got {means.dtype} and {stds.dtype}")
        if not bool(torch.isfinite(means).all()):
            raise ValueError("means contains NaN or inf")
        if not bool(torch.isfinite(stds).all()) or bool((stds < 0).any()):
            raise ValueError("stds must be finite and non-negative")
        if not (isinstance(std_scale, (int, float)) and math.isfinite(std_scale) and std_scale > 0):
            raise ValueError(f"std_scale must be a positive finite number; got {std_scale!r}")
        return means, stds

    @property
    def num_clusters(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def extra_repr(self) -> str:
        return f"num_clusters={self.num_clusters}, dim={self.dim}, std_scale={self.std_scale}"

    def _means(self) -> torch.Tensor:
        return self.means

    def _stds(self) -> torch.Tensor:
        return self.stds

    @torch.no_grad()
    def assign(self, text_emb: torch.Tensor, batch_size: int = 65536) -> torch.Tensor:
        """cluster_idx = argmax_k cos(text_emb, mu_k) (§2), in chunks of batch_size rows: (B, D) -> (B,) long."""
        _check_text_emb(text_emb, self.dim)
        dtype = torch.float64 if text_emb.dtype == torch.float64 else torch.float32
        means = self._means().detach().to(device=text_emb.device, dtype=dtype)
        means_unit = means / means.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)  # (K, D)
        cluster_idx = torch.empty(text_emb.shape[0], dtype=torch.long, device=text_emb.device)
        for start in range(0, text_emb.shape[0], batch_size):
            chunk = text_emb[start : start + batch_size].to(dtype)  # (b, D)
            # cos differs from the dot product with unit means only by the row's positive norm
            cluster_idx[start : start + batch_size] = (chunk @ means_unit.t()).argmax(dim=1)
        return cluster_idx

    def shift(self, cluster_idx: torch.Tensor, dtype: Optional[torch.dtype] = None, *,
              check: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """shift_mean = mu_k, shift_std = std_scale * s_k for each k in cluster_idx: (B,) -> ((B, D), (B, D)).
        ``check=False`` skips the range check of the indices (a host synchronisation on a GPU), for indices
        valid by construction, e.g. from ``assign``."""
        _check_cluster_idx(cluster_idx, self.num_clusters if check else None)
        means, stds = self._means(), self._stds()
        idx = cluster_idx.to(device=means.device, dtype=torch.long)
        shift_mean = means[idx].to(device=cluster_idx.device, dtype=dtype)  # (B, D)
        shift_std = (self.std_scale * stds[idx]).to(device=cluster_idx.device, dtype=dtype)  # (B, D)
        return shift_mean, shift_std

    def forward(self, text_emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cluster_idx, shift_mean, shift_std) for caption embeddings (B, D), in text_emb's dtype."""
        cluster_idx = self.assign(text_emb)
        shift_mean, shift_std = self.shift(cluster_idx, dtype=text_emb.dtype, check=False)
        return cluster_idx, shift_mean, shift_std

    # ------------------------------------------------------------------ building

    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        image_emb: torch.Tensor,
        num_clusters: int,
        *,
        std_scale: float = 5.0,
        iters: int = 50,
        seed: int = 0,
        std_floor: float = 1e-3,
        batch_size: int = 65536,
        device: Optional[Union[str, torch.device]] = None,
        progress: bool = False,
        tol: float = 1e-4,
    ) -> "ClusterVocab":
        """Spherical k-means on image_emb (N, D); mu_k, s_k = per-dim mean, std (ddof 0, floored) of the members' raw x0."""
        if not isinstance(std_floor, (int, float)) or not std_floor >= 0:
            raise ValueError(f"std_floor must be a non-negative number; got {std_floor!r}")
        result = spherical_kmeans(
            image_emb, num_clusters, iters=iters, tol=tol, seed=seed, batch_size=batch_size, device=device, progress=progress
        )
        means, stds = cluster_statistics(image_emb, result.assignments, num_clusters, batch_size=batch_size, device=device)
        stds = stds.clamp_min(std_floor)
        return cls(means.float().cpu(), stds.float().cpu(), std_scale=std_scale)

    @torch.no_grad()
    def update_running(self, x0: torch.Tensor, cluster_idx: torch.Tensor, momentum: float = 0.01) -> None:
        """EMA update of visited clusters to the (1-m, m) mixture of the current Gaussian and the batch members' moments.

        mu_k <- (1-m) mu_k + m mean_k(x0);  s_k^2 <- (1-m) s_k^2 + m var_k(x0) + m (1-m) (mean_k(x0) - mu_k)^2.
        Clusters with no member in the batch are left unchanged.
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1]; got {momentum}")
        _check_text_emb(x0, self.dim, "x0")
        _check_cluster_idx(cluster_idx, self.num_clusters)
        if cluster_idx.shape[0] != x0.shape[0]:
            raise ValueError(f"x0 has {x0.shape[0]} rows but cluster_idx has {cluster_idx.shape[0]}")
        means, stds = self._means(), self._stds()
        idx = cluster_idx.to(device=means.device, dtype=torch.long)
        batch_means, batch_stds = cluster_statistics(x0.to(means.device), idx, self.num_clusters)
        visited = torch.bincount(idx, minlength=self.num_clusters) > 0
        new_mean = (1 - momentum) * means.double() + momentum * batch_means
        delta = batch_means - means.double()
        new_var = (1 - momentum) * stds.double() ** 2 + momentum * batch_stds**2 + momentum * (1 - momentum) * delta**2
        means.data[visited] = new_mean[visited].to(means.dtype)
        stds.data[visited] = new_var[visited].sqrt().to(stds.dtype)

    # ------------------------------------------------------------------ files

    def save(self, path: PathLike) -> None:
        """Write means/stds to a safetensors file with metadata (format, version, std_scale, K, D)."""
        from safetensors.torch import save_file

        tensors = {
            "means": self._means().detach().cpu().contiguous(),
            "stds": self._stds().detach().cpu().contiguous(),
        }
        metadata = {
            "format": VOCAB_FORMAT,
            "version": str(VOCAB_VERSION),
            "std_scale": repr(float(self.std_scale)),
            "num_clusters": str(self.num_clusters),
            "dim": str(self.dim),
        }
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: PathLike, map_location: Union[str, torch.device] = "cpu") -> "ClusterVocab":
        """Read a file written by :meth:`save`."""
        from .files import InvalidFileError, describe, sniff

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        if sniff(path) != "safetensors":
            raise InvalidFileError(f"{path}: expected a shifted-diffusion vocabulary (a safetensors file written by "
                                   f"ClusterVocab.save), but it is {describe(path)}; the file is truncated or was replaced")
        with _open_safetensors(path, map_location) as f:
            metadata = f.metadata() or {}
            keys = set(f.keys())
            if metadata.get("format") != VOCAB_FORMAT or not {"means", "stds"} <= keys:
                raise ValueError(
                    f"{path} is not a shifted-diffusion vocabulary file (format={metadata.get('format')!r}, "
                    f"tensors={sorted(keys)}); for the original mean.pth/std.pth use ClusterVocab.from_original"
                )
            version = int(metadata.get("version", "0"))
            if version > VOCAB_VERSION:
                raise ValueError(f"{path} has vocabulary format version {version}; this code reads <= {VOCAB_VERSION}")
            means, stds = f.get_tensor("means"), f.get_tensor("stds")
        expected = (int(metadata["num_clusters"]), int(metadata["dim"]))
        if tuple(means.shape) != expected:
            raise ValueError(f"{path}: metadata says (K, D) = {expected} but means has shape {tuple(means.shape)}")
        return cls(means, stds, std_scale=float(metadata["std_scale"]))

    @classmethod
    def from_original(
        cls,
        mean_path: PathLike,
        std_path: PathLike,
        *,
        dim: Optional[int] = None,
        std_scale: float = 5.0,
        num_clusters: Optional[int] = None,
        std_floor: float = 0.0,
    ) -> "ClusterVocab":
        """Load the original release's torch-saved mean.pth / std.pth, each (K, D) or flattened (K*D,).

        The original's sft_test.py reads ``.view(-1, 1536)[:1024]``: pass num_clusters=1024 (the
        prior's vocab_size) when the files hold more rows. stds are clamped to >= std_floor.
        """
        means = _load_original_tensor(mean_path, "mean", dim)
        stds = _load_original_tensor(std_path, "std", dim)
        if means.shape != stds.shape:
            raise ValueError(
                f"{mean_path} gives means of shape {tuple(means.shape)} but {std_path} gives {tuple(stds.shape)}"
            )
        if num_clusters is not None:
            if not 1 <= num_clusters <= means.shape[0]:
                raise ValueError(f"num_clusters must lie in [1, {means.shape[0]}] (rows in {mean_path}); got {num_clusters}")
            means, stds = means[:num_clusters], stds[:num_clusters]
        if std_floor > 0:
            stds = stds.clamp_min(std_floor)
        return cls(means.float().contiguous(), stds.float().contiguous(), std_scale=std_scale)


def _open_safetensors(path: str, map_location):
    """safe_open, with a truncated / corrupt file reported as such (the file named)."""
    from safetensors import SafetensorError, safe_open

    from .files import InvalidFileError

    try:
        return safe_open(path, framework="pt", device=str(map_location))
    except (SafetensorError, OSError) as err:
        raise InvalidFileError(f"{path}: unreadable vocabulary safetensors file: {err}; the file is probably "
                               f"truncated (size {os.path.getsize(path)} bytes)") from None


def _load_original_tensor(path: PathLike, kind: str, dim: Optional[int]) -> torch.Tensor:
    """Unwrap one of the original's files to a (K, D) float tensor."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"original vocabulary {kind} file not found: {path}")
    from .files import load_torch_weights

    obj = load_torch_weights(path, f"the original vocabulary's {kind} tensor")
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        preferred = [k for k in (kind, kind + "s", "mean" if kind == "mean" else "std", "weight", "data") if k in tensors]
        if len(tensors) == 1:
            obj = next(iter(tensors.values()))
        elif preferred:
            obj = tensors[preferred[0]]
        else:
            raise ValueError(f"{path}: a dict without a single tensor or a '{kind}' key; keys: {sorted(map(str, obj))}")
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor (or a dict holding one); got {type(obj).__name__}")
    tensor = obj.detach()
    if not tensor.is_floating_point():
        raise ValueError(f"{path}: expected a floating-point tensor; got dtype {tensor.dtype}")
    if tensor.dim() == 1:
        d = DEFAULT_ORIGINAL_DIM if dim is None else dim
        if tensor.numel() % d != 0:
            raise ValueError(
                f"{path}: flattened {kind} of length {tensor.numel()} is not a multiple of dim {d}; pass dim="
            )
        return tensor.reshape(-1, d)
    if tensor.dim() == 3 and tensor.shape[1] == 1:  # (K, 1, D)
        tensor = tensor[:, 0]
    if tensor.dim() != 2:
        raise ValueError(f"{path}: expected {kind} of shape (K, D) or (K*D,); got {tuple(tensor.shape)}")
    if dim is not None and tensor.shape[1] != dim:
        raise ValueError(f"{path}: {kind} has dim {tensor.shape[1]} but dim={dim} was requested")
    return tensor


@torch.no_grad()
def cluster_statistics(
    x: torch.Tensor,
    assignments: torch.Tensor,
    num_clusters: int,
    *,
    batch_size: int = 65536,
    device: Optional[Union[str, torch.device]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster per-dim mean and std (ddof 0) of raw x: (N, D), (N,) -> (K, D), (K, D) float64; empty clusters get 0."""
    device = torch.device(device) if device is not None else x.device
    n, dim = x.shape
    assignments = assignments.to(device=device, dtype=torch.long)
    sums = torch.zeros(num_clusters, dim, dtype=torch.float64, device=device)
    for start in range(0, n, batch_size):
        sums.index_add_(0, assignments[start : start + batch_size], x[start : start + batch_size].to(device, torch.float64))
    counts = torch.bincount(assignments, minlength=num_clusters).to(torch.float64).unsqueeze(1)  # (K, 1)
    means = sums / counts.clamp_min(1.0)
    # second pass on the centred values: no E[x^2] - E[x]^2 cancellation
    squares = torch.zeros_like(sums)
    for start in range(0, n, batch_size):
        idx = assignments[start : start + batch_size]
        centred = x[start : start + batch_size].to(device, torch.float64) - means[idx]
        squares.index_add_(0, idx, centred * centred)
    stds = (squares / counts.clamp_min(1.0)).sqrt()
    return means, stds


class LearnableClusterVocab(ClusterVocab):
    """ClusterVocab whose means and log-stds are trained with the prior (the original's learnable variant)."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, std_scale: float = 5.0, std_floor: float = 1e-6):
        nn.Module.__init__(self)
        means, stds = self._validate(means, stds, std_scale)
        self.mean_param = nn.Parameter(means.clone().float())
        self.log_std_param = nn.Parameter(stds.clamp_min(std_floor).log().float())
        self.std_scale = float(std_scale)

    @property
    def means(self) -> torch.Tensor:  # (K, D)
        return self.mean_param

    @property
    def stds(self) -> torch.Tensor:  # (K, D) = exp(log s_k) > 0
        return self.log_std_param.exp()

    def _means(self) -> torch.Tensor:
        return self.mean_param

    def _stds(self) -> torch.Tensor:
        return self.log_std_param.exp()

    @classmethod
    def from_vocab(cls, vocab: ClusterVocab) -> "LearnableClusterVocab":
        return cls(vocab._means().detach(), vocab._stds().detach(), std_scale=vocab.std_scale)

    def param_groups(self, lr: float, lr_scale: float = 1.0) -> List[Dict]:
        """One optimizer group for the vocabulary, with learning rate lr * lr_scale."""
        return [{"params": [self.mean_param, self.log_std_param], "lr": lr * lr_scale, "name": "vocab"}]

    def update_running(self, x0, cluster_idx, momentum=0.01):
        raise NotImplementedError("a learnable vocabulary is trained by the optimizer, not by running statistics")


class StandardNormalShift(ModelMixin, ConfigMixin):
    """The DALL-E 2 baseline: shift_mean = 0, shift_std = 1 for every caption (no vocabulary). A diffusers
    component like ClusterVocab (config: dim; its one buffer, the zero mean, is what the weights file holds)."""

    num_clusters = None

    @register_to_config
    def __init__(self, dim: int = 1536):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int; got {dim!r}")
        self.dim = dim
        self.std_scale = 1.0
        self.register_buffer("mean", torch.zeros(dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    def assign(self, text_emb: torch.Tensor, batch_size: int = 65536) -> torch.Tensor:
        """Every caption maps to index 0: (B, D) -> (B,) long zeros."""
        _check_text_emb(text_emb, self.dim)
        return torch.zeros(text_emb.shape[0], dtype=torch.long, device=text_emb.device)

    def shift(self, cluster_idx: torch.Tensor, dtype: Optional[torch.dtype] = None, *,
              check: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """(zeros (B, D), ones (B, D)) on cluster_idx's device, in dtype (default float32); any index is valid."""
        _check_cluster_idx(cluster_idx, None)
        dtype = dtype or torch.get_default_dtype()
        shape = (cluster_idx.shape[0], self.dim)
        return (
            torch.zeros(shape, dtype=dtype, device=cluster_idx.device),
            torch.ones(shape, dtype=dtype, device=cluster_idx.device),
        )

    def forward(self, text_emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cluster_idx, shift_mean, shift_std) for caption embeddings (B, D), in text_emb's dtype."""
        cluster_idx = self.assign(text_emb)
        shift_mean, shift_std = self.shift(cluster_idx, dtype=text_emb.dtype, check=False)
        return cluster_idx, shift_mean, shift_std


def load_shift(path_or_none: Optional[PathLike], dim: int) -> Union[ClusterVocab, StandardNormalShift]:
    """A ClusterVocab from a saved file, or the StandardNormalShift baseline when path is None."""
    if path_or_none is None:
        return StandardNormalShift(dim)
    vocab = ClusterVocab.load(path_or_none)
    if vocab.dim != dim:
        raise ValueError(f"vocabulary {os.fspath(path_or_none)} has dim {vocab.dim} but the model expects dim {dim}")
    return vocab
