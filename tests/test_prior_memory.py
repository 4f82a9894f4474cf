"""shifted_diffusion.train_memory (benchmarks/prior_memory.py's counting): the saved-tensor counter against
hand-counted cases, and the report at tiny size (gradient checkpointing keeps far fewer activations; the
parts add up)."""

import json

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from shifted_diffusion import train_memory as memory


def test_saved_tensor_bytes_counts_distinct_storages_without_parameters():
    w = torch.nn.Parameter(torch.randn(4))
    x = torch.randn(3, 4, requires_grad=True)  # 48 bytes
    with memory.SavedTensorBytes(exclude=[w]) as saved:
        (x * w).sum()  # mul saves x and w: w is excluded
    assert saved.total == 48
    with memory.SavedTensorBytes() as saved:
        (x * x).sum()  # x saved twice: one storage
        (x[:, :2] * x[:, 2:]).sum()  # two views of x: still x's storage
    assert saved.total == 48
    with memory.SavedTensorBytes() as saved:
        y = x.double() * 2  # the float64 copy (96 bytes) is not saved by `* 2`; exp saves its output
        y.exp()
    assert saved.total == 96
    with memory.SavedTensorBytes() as saved:  # checkpointing keeps the input alone
        checkpoint(lambda a: (a * a).exp().sin(), x, use_reentrant=False)
    assert saved.total == 48


def test_prior_memory_tiny_report():
    report = memory.memory_report("tiny", batch=16, dtype="fp32", device="cpu")
    assert json.loads(json.dumps(report)) == report  # JSON-ready as it is
    assert (report["preset"], report["batch"], report["dtype"]) == ("tiny", 16, "float32")
    plain, ckpt = report["plain"], report["grad_checkpointing"]
    assert plain["parameters"] == ckpt["parameters"] > 0
    assert plain["weights_and_adamw_mib"] == pytest.approx(12 * plain["parameters"] / 2**20, abs=0.06)
    for entry in (plain, ckpt):
        assert entry["activations_at_batch_mib"] == pytest.approx(
            entry["activations_batch_independent_mib"] + 16 * entry["activations_per_caption_mib"], abs=0.1)
        low, high = entry["estimated_peak_range_mib"]
        assert high - low == pytest.approx(entry["gradients_mib"], abs=0.11)
    assert 0 < ckpt["activations_per_caption_mib"] < 0.5 * plain["activations_per_caption_mib"]
    with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
        memory.memory_report("tiny", batch=0, device="cpu")


def test_sharded_estimates_split_the_training_state():
    """1 Mi parameters (16 MiB of fp32 weights + moments + gradients), blocks of 64 Ki, 10 MiB of activations,
    4 processes: the figures written out per stage."""
    params, block = 2**20, 2**16
    est = memory.sharded_estimates(params, block, 10.0, 4)
    assert est["ddp"] == pytest.approx([12 + 10, 16 + 10], abs=0.006)  # rounded to 0.01 MiB
    assert est["zero1"] == pytest.approx([4 + 2 + 10, 4 + 2 + 4 + 10], abs=0.006)  # moments 8 MiB / 4
    assert est["zero2"] == pytest.approx([4 + 2 + 10, 4 + 2 + 1 + 0.25 + 10], abs=0.006)  # + gradients 4 MiB / 4 + a block's
    assert est["zero3"] == pytest.approx([3 + 0.5 + 10, 3 + 0.5 + 1 + 0.25 + 10], abs=0.006)  # 12 MiB / 4 + 2 blocks
    assert memory.sharded_estimates(params, block, 0.0, 1)["zero1"] == [12, 16]  # one process: nothing to split
    report = memory.memory_report("tiny", batch=2, dtype="fp32", device="cpu", real_step=False, shard_over=[2, 8])
    sharded = report["grad_checkpointing"]["sharded_peak_range_mib"]
    assert sharded.keys() == {"2", "8"} and sharded["8"]["zero3"][0] < sharded["2"]["zero3"][0]
    assert sharded["2"]["ddp"] == pytest.approx(report["grad_checkpointing"]["estimated_peak_range_mib"], abs=0.06)
