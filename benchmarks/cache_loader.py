"""Does reading the embedding cache keep up with the prior's training step? Loader pairs/s vs step pairs/s.

    python benchmarks/cache_loader.py [--num_pairs 2048] [--json benchmarks/results/cache_loader.json]

A cache of the paper's sizes (CLIP D = 1536 in float16; unmasked T5 token states 80 x 1024 in float16,
164 KB per caption) is written by ``cache.precompute`` from a folder of tiny images, with stand-in encoders
that return seeded random embeddings of those shapes (the encoders' speed is not what is measured here).
Then the prior trainer's own loader (``training.epoch_loader`` over ``EmbeddingDataset``, shuffled,
``--batch_size`` = the ``small`` preset's train_batch_size 64) is drained for ``--batches`` batches per
setting: memory-mapped shards with 0, 1, 2 and 4 DataLoader workers, items as float32 (``EmbeddingDataset``'s
default) and in their float16 storage dtype (``float32=False``, what the trainer reads: cast on the device),
and the shards loaded in RAM. The first
batches of each setting are not timed (worker start-up, page cache warm-up: the shards are read once before,
so this is the page-cache rate, what a node with enough RAM sees after the first epoch).

The step's consumption is measured here too: a train step (forward, backward, AdamW) of the prior at
``--step_preset`` (default ``tiny``: the ``small`` preset does not fit 2 CPU cores in useful time) at the
same batch size, on this machine's CPU; and, for the GPU, the ``small`` preset's train step pairs/s from
the JSON of ``benchmarks/prior_speed.py`` given with ``--gpu_step_json`` (measured on an H200, bf16).
Prints one JSON object with the ratios loader / step; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_pairs", type=int, default=2048, help="images in the cache, one caption each")
    p.add_argument("--shard_size", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=64, help="the small preset's train_batch_size")
    p.add_argument("--batches", type=int, default=24, help="timed batches per setting")
    p.add_argument("--warmup_batches", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--step_preset", default="tiny", help="prior preset of the CPU train step")
    p.add_argument("--step_iters", type=int, default=5)
    p.add_argument("--gpu_step_json", type=Path, default=ROOT / "benchmarks/results/prior_speed_small_h200_bf16.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    return p


class RandomCLIP:
    """Stand-in for MultiCLIP: seeded random (D,) embeddings per image and per caption, no weights."""

    def __init__(self, dim: int = 1536):
        self.dim, self.block_sizes, self.spec = dim, [dim], {"stand_in": "random", "dim": dim}
        self.transforms = [lambda image: torch.zeros(1)]
        self._generator = torch.Generator().manual_seed(0)

    def encode_pixels(self, stacked):
        return torch.randn(stacked[0].shape[0], self.dim, generator=self._generator)

    def encode_text(self, captions):
        return torch.randn(len(captions), self.dim, generator=self._generator)


class RandomT5:
    """Stand-in for an unmasked T5 encoder: (B, 80, 1024) random states (no zero row: all 80 are stored)."""

    def __init__(self, dim: int = 1024, max_length: int = 80):
        self.dim, self.max_length, self.spec = dim, max_length, {"stand_in": "random", "dim": dim}
        self._generator = torch.Generator().manual_seed(1)

    def encode(self, captions):
        return torch.randn(len(captions), self.max_length, self.dim, generator=self._generator)


def build_cache(root: Path, num_pairs: int, shard_size: int) -> Path:
    from PIL import Image

    from shifted_diffusion.cache import precompute

    folder = root / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "blank.png")
    rows = []
    for i in range(num_pairs):
        (folder / f"{i:06d}.png").write_bytes((folder / "blank.png").read_bytes())
        rows.append(json.dumps({"file_name": f"{i:06d}.png", "text": f"caption {i}"}))
    (folder / "blank.png").unlink()
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    precompute(folder, root / "cache", RandomCLIP(), RandomT5(), shard_size=shard_size, batch_size=256,
               progress=False)
    return root / "cache"


def drain(dataset, args, num_workers: int) -> dict:
    from shifted_diffusion import training

    loader = training.epoch_loader(dataset, 0, batch_size=args.batch_size, seed=0, rank=0, world=1,
                                   num_workers=num_workers)
    batches = iter(loader)
    for _ in range(args.warmup_batches):
        next(batches)
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(batches)
    seconds = time.perf_counter() - start
    assert batch["text_tokens"].shape == (args.batch_size, 80, 1024)  # one caption's states per pair
    return {"num_workers": num_workers, "pairs_per_s": round(args.batch_size * args.batches / seconds, 1),
            "ms_per_batch": round(1000 * seconds / args.batches, 2)}


def cpu_step(dataset, args) -> dict:
    """pairs/s of a prior train step (forward, backward, AdamW; fp32) on this CPU, on batches of the cache."""
    import torch.nn.functional as F

    from shifted_diffusion.prior import PriorConfig, ShiftedPrior

    config = PriorConfig.preset(args.step_preset, clip_dim=1536, text_dim=1024, text_len=80)
    model = ShiftedPrior.from_prior_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=args.batch_size)))
    n = args.batch_size

    def step():
        timesteps = torch.randint(0, 1000, (n,), generator=generator)
        cluster = torch.randint(0, config.vocab_size or 1, (n,), generator=generator)
        x_t = batch["clip_image"] + torch.randn(n, config.clip_dim, generator=generator)
        out = model(x_t, timesteps, cluster, batch["text_tokens"], batch["clip_text"])
        F.mse_loss(out, batch["clip_image"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.step_iters):
        step()
    seconds = (time.perf_counter() - start) / args.step_iters
    return {"preset": args.step_preset, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "ms_per_step": round(1000 * seconds, 1), "pairs_per_s": round(n / seconds, 1)}


def gpu_step(path: Path) -> dict:
    """The small preset's train step on a GPU, from a committed benchmarks/prior_speed.py JSON."""
    if not path.is_file():
        return {}
    measured = json.loads(path.read_text())
    return {"source": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
            "preset": measured["preset"], "device": measured["device"], "dtype": measured["dtype"],
            "batch": measured["batch_captions"], "pairs_per_s": measured["ours"]["train_step"]["pairs_per_s"]}


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from shifted_diffusion.cache import EmbeddingDataset
    from shifted_diffusion.files import write_results_json
    from shifted_diffusion.prior_training import cache_bytes

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = build_cache(Path(tmp), args.num_pairs, args.shard_size)
        mapped = EmbeddingDataset(cache_dir)
        for path in cache_dir.glob("*.safetensors"):  # page cache warm
            path.read_bytes()
        loader = [drain(mapped, args, workers) for workers in args.workers]
        stored = EmbeddingDataset(cache_dir, float32=False)  # what the trainer reads: float16, cast on the device
        loader_stored = [drain(stored, args, workers) for workers in args.workers]
        in_memory = drain(EmbeddingDataset(cache_dir, in_memory=True), args, 0)
        step = cpu_step(mapped, args)
        size = cache_bytes(cache_dir)
    gpu = gpu_step(args.gpu_step_json)
    best = max(loader + loader_stored + [in_memory], key=lambda x: x["pairs_per_s"])
    ratios = {"best_loader_over_cpu_step": round(best["pairs_per_s"] / step["pairs_per_s"], 2)}
    if gpu:
        for name, runs in (("float32", loader), ("storage_dtype", loader_stored)):
            ratios[f"{name}_loader_over_gpu_step"] = {
                f"{x['num_workers']}_workers": round(x["pairs_per_s"] / gpu["pairs_per_s"], 2) for x in runs}
        ratios["in_memory_over_gpu_step"] = round(in_memory["pairs_per_s"] / gpu["pairs_per_s"], 2)
    result = {"num_pairs": args.num_pairs, "batch_size": args.batch_size, "cache_mb": round(size / 2**20, 1),
              "threads": args.threads, "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "memory_mapped_float32": loader,
              "memory_mapped_storage_dtype": loader_stored, "in_memory_float32": in_memory, "cpu_step": step,
              "gpu_step": gpu, "ratios": ratios}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_results_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
