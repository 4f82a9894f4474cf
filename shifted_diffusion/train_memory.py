"""Training memory of the prior by parts, with and without gradient checkpointing, on any device.

* static: the fp32 parameters and AdamW's two moments (12 B per parameter), and the gradients (4 B);
* activations: what one training forward (B captions, one timestep each, autocast) leaves saved for
  backward, counted through autograd's saved-tensor hooks (``SavedTensorBytes``: distinct storages,
  parameters excluded) at two small batch sizes and split into a per-caption part and a batch-independent
  part (autocast's low-precision weight copies); with checkpointing, only each block's input is kept;
* the peak at a batch size, estimated as a range: weights + AdamW + activations (backward frees activations
  while it allocates gradients) up to that plus the gradients; backward's transient buffers, allocator
  slack and, with checkpointing, one block's recomputed activations come on top.

On CUDA ``memory_report`` can also run one real training step and report ``torch.cuda.max_memory_allocated``
beside the estimate. ``benchmarks/prior_memory.py`` is the command line.
"""

from __future__ import annotations

import platform
from typing import Any, Dict, Sequence

import torch

from .encoders import parse_dtype

from .prior import PriorConfig, ShiftedPrior

MIB = 2**20


class SavedTensorBytes:
    """Bytes of the distinct storages autograd saves for backward inside the context, `exclude`'s
    storages (the parameters) left out. A storage saved twice, or through two views, counts once."""

    def __init__(self, exclude=()):
        self.excluded = {p.untyped_storage().data_ptr() for p in exclude}
        self.storages: Dict[int, int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.excluded:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _inputs(config: PriorConfig, n: int, device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        x_t=torch.randn(n, config.clip_dim, generator=g).to(device),
        timesteps=torch.randint(0, 1000, (n,), generator=g).to(device),
        cluster_idx=torch.randint(0, config.vocab_size or 1, (n,), generator=g).to(device),
        text_tokens=torch.randn(n, config.text_len, config.text_dim, generator=g).to(device),
        clip_text_emb=torch.randn(n, config.clip_dim, generator=g).to(device),
    )


def _loss(model: ShiftedPrior, batch: Dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    device = batch["x_t"].device
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        x0_hat = model(batch["x_t"], batch["timesteps"], batch["cluster_idx"], batch["text_tokens"],
                       batch["clip_text_emb"])
    return (x0_hat.float() - batch["x_t"]).square().mean()


def saved_activations(model: ShiftedPrior, dtype: torch.dtype, batches=(1, 2)) -> Dict[str, float]:
    """Per-caption and batch-independent bytes saved for backward by one training forward."""
    device = next(model.parameters()).device
    counts = []
    for n in batches:
        batch = _inputs(model.config, n, device)
        with SavedTensorBytes(exclude=model.parameters()) as saved:
            loss = _loss(model, batch, dtype)
        counts.append(saved.total)
        del loss, saved
    (n1, n2), (c1, c2) = batches, counts
    per_caption = (c2 - c1) / (n2 - n1)
    return {"per_caption_mib": per_caption / MIB, "batch_independent_mib": (c1 - n1 * per_caption) / MIB}


def real_step_peak_mib(model: ShiftedPrior, dtype: torch.dtype, batch_size: int) -> float:
    """torch.cuda.max_memory_allocated over one forward + backward + fused AdamW step (the second one:
    the optimizer state exists from the first)."""
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    batch = _inputs(model.config, batch_size, device)
    for _ in range(2):
        torch.cuda.reset_peak_memory_stats(device)
        _loss(model, batch, dtype).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(device) / MIB
    del opt
    return peak


def sharded_estimates(params: int, largest_block_params: int, activations_mib: float,
                      num_processes: int) -> Dict[str, list]:
    """Per-process peak range (MiB) of one training step when the fp32 training state is split over
    ``num_processes`` data-parallel processes: weights 4 B, AdamW moments 8 B, gradients 4 B per parameter.
    As in ``memory_report``, the low end is the resident state + activations, the high end adds the gradients.

    ``ddp``: everything replicated. ``zero1`` (DeepSpeed stage 1): moments sharded. ``zero2`` (stage 2, FSDP
    SHARD_GRAD_OP): moments and gradients sharded (the gradients: a shard + one block's in flight). ``zero3``
    (stage 3, FSDP FULL_SHARD): weights too, plus two gathered blocks' weights (computing, prefetched)."""
    n, block = num_processes, 4 * largest_block_params
    state = {  # (resident bytes without gradients, gradient bytes at the peak)
        "ddp": (12 * params, 4 * params),
        "zero1": (4 * params + 8 * params / n, 4 * params),
        "zero2": (4 * params + 8 * params / n, 4 * params / n + block),
        "zero3": (12 * params / n + 2 * block, 4 * params / n + block),
    }
    return {name: [round(resident / MIB + activations_mib, 2), round((resident + grads) / MIB + activations_mib, 2)]
            for name, (resident, grads) in state.items()}


def memory_report(preset: str = "tiny", batch: int = 64, dtype: str = "bf16", device=None,
                  real_step: bool = True, shard_over: Sequence[int] = ()) -> Dict[str, Any]:
    """The parts of a training step's memory for the network preset at ``batch`` captions, as a JSON-ready
    dict: "plain" and "grad_checkpointing" entries (parameters, MiB of weights + AdamW, gradients,
    activations per caption / batch-independent / at ``batch``, the estimated peak range, and on CUDA with
    ``real_step`` the measured peak) and their activation ratio; for each N of ``shard_over``, the peak per
    process with the training state sharded over N processes (``sharded_estimates``)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    autocast_dtype = parse_dtype(dtype, "--dtype")
    result: Dict[str, Any] = {
        "preset": preset, "batch": batch, "dtype": str(autocast_dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
    }
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = ShiftedPrior.from_prior_config(PriorConfig.preset(preset, grad_checkpointing=checkpointing)).to(device).train()
        params = sum(p.numel() for p in model.parameters())
        acts = saved_activations(model, autocast_dtype)
        activations = acts["batch_independent_mib"] + batch * acts["per_caption_mib"]
        low = 12 * params / MIB + activations  # fp32 weights + AdamW exp_avg / exp_avg_sq + saved activations
        entry: Dict[str, Any] = {
            "parameters": params,
            "weights_and_adamw_mib": round(12 * params / MIB, 1),
            "gradients_mib": round(4 * params / MIB, 1),
            "activations_per_caption_mib": round(acts["per_caption_mib"], 3),
            "activations_batch_independent_mib": round(acts["batch_independent_mib"], 1),
            "activations_at_batch_mib": round(activations, 1),
            "estimated_peak_range_mib": [round(low, 1), round(low + 4 * params / MIB, 1)],
        }
        largest_block = max(sum(p.numel() for p in block.parameters()) for block in model.blocks)
        for n in shard_over:
            entry.setdefault("sharded_peak_range_mib", {})[str(n)] = sharded_estimates(
                params, largest_block, activations, n)
        if device.type == "cuda" and real_step:
            entry["measured_peak_mib"] = round(real_step_peak_mib(model, autocast_dtype, batch), 1)
        result["grad_checkpointing" if checkpointing else "plain"] = entry
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["activation_ratio_checkpointing_vs_plain"] = round(
        result["grad_checkpointing"]["activations_per_caption_mib"] / result["plain"]["activations_per_caption_mib"], 4)
    return result
