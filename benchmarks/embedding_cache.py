"""Embedding the training set: throughput with 1 and 2 processes, and cache bytes per 1000 captions per storage.

    python benchmarks/embedding_cache.py [--num_images 512] [--json benchmarks/results/embedding_cache.json]

On a generated toy world (``--num_images`` images, one caption each) with randomly initialised encoders built
from configs (no download): an open_clip ViT (``--clip_width`` / ``--clip_layers``) and a T5 encoder of
``--t5_dim`` x ``--t5_layers`` with ByT5's byte tokenizer (no vocabulary file), 80 positions.

1. Throughput: ``cache.precompute`` of the whole folder as 1 process x ``--threads`` threads, 1 process x 1
   thread, and ``--threads`` processes x 1 thread (``torch.distributed.run``, gloo; every process embeds every
   other shard). Images/s and captions/s over the wall time of the launch (start-up excluded: each process
   times its own precompute call and the slowest counts), and whether the multi-process cache is byte for
   byte the one of the single process with as many threads per process (other thread counts change float
   summation order, hence the last bits).
2. Storage: the shard bytes of one cache per storage choice (T5 unmasked in float16 / bfloat16 / float32;
   T5 masked in float16: only the real tokens are kept), per 1000 captions. ByT5 tokens are bytes: a caption
   has several times more of them than T5's sentencepiece tokens, so the masked figure here is an upper
   bound for the same captions with T5's own tokenizer.

Prints one JSON object; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORKER = "--worker"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_images", type=int, default=512)
    p.add_argument("--shard_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--clip_width", type=int, default=256)
    p.add_argument("--clip_layers", type=int, default=4)
    p.add_argument("--t5_dim", type=int, default=1024, help="d_model: t5-large's 1024 (t5-11b's too)")
    p.add_argument("--t5_layers", type=int, default=2)
    p.add_argument("--text_len", type=int, default=80)
    p.add_argument("--threads", type=int, default=2, help="cores to use: the 1-process run's threads, "
                   "the multi-process run's processes")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    return p


def make_encoders(root: Path, args) -> tuple[str, str]:
    """A random open_clip folder and a random T5 encoder folder (seeded) -> their paths."""
    import open_clip
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    from shifted_diffusion.encoders import save_open_clip

    torch.manual_seed(0)
    clip_cfg = {"embed_dim": 128, "vision_cfg": {"image_size": 64, "layers": args.clip_layers, "width": args.clip_width,
                                                 "patch_size": 8, "head_width": 64},
                "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": args.clip_width, "heads": 4,
                             "layers": args.clip_layers}}
    clip_dir = save_open_clip(open_clip.CLIP(**clip_cfg).eval(), clip_cfg, root / "clip")
    tokenizer = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=args.t5_dim, d_kv=64, d_ff=4 * args.t5_dim,
                      num_layers=args.t5_layers, num_heads=args.t5_dim // 64, decoder_start_token_id=0)
    T5EncoderModel(config).eval().save_pretrained(root / "t5")
    tokenizer.save_pretrained(root / "t5")
    return str(clip_dir), str(root / "t5")


def embed(folder: str, clip_dir: str, t5_dir: str, cache_dir: str, args, masked: bool = False,
          text_dtype: torch.dtype = torch.float16) -> dict:
    """One process's precompute call (torch.distributed set up when launched by torch.distributed.run)."""
    import torch.distributed as dist

    from shifted_diffusion.cache import precompute
    from shifted_diffusion.encoders import MultiCLIP, T5TextEncoder

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    clip = MultiCLIP([(clip_dir, "")], device="cpu", batch_size=args.batch_size)
    t5 = T5TextEncoder(t5_dir, max_length=args.text_len, masked=masked, device="cpu", batch_size=args.batch_size)
    start = time.perf_counter()
    manifest = precompute(folder, cache_dir, clip, t5, shard_size=args.shard_size, batch_size=args.batch_size,
                          progress=False, text_dtype=text_dtype, process_index=rank, num_processes=world)
    seconds = time.perf_counter() - start
    if world > 1:
        dist.destroy_process_group()
    return {"rank": rank, "seconds": seconds, "num_images": manifest["num_images"],
            "num_captions": manifest["num_captions"]}


def worker(argv: list[str]) -> None:
    folder, clip_dir, t5_dir, cache_dir, threads, *rest = argv
    torch.set_num_threads(int(threads))
    print("RESULT " + json.dumps(embed(folder, clip_dir, t5_dir, cache_dir, build_parser().parse_args(rest))),
          flush=True)


def launch(processes: int, threads: int, paths: list[str], cache_dir: Path, argv: list[str]) -> dict:
    """Run precompute in ``processes`` processes of ``threads`` threads each -> images/s, captions/s."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", "29531",
         __file__]
    child = subprocess.run([*command, WORKER, *paths[:3], str(cache_dir), str(threads), *argv], env=env,
                           capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"precompute with {processes} process(es) failed:\n{child.stderr[-3000:]}")
    results = [json.loads(line[len("RESULT "):]) for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    seconds = max(r["seconds"] for r in results)
    return {"processes": processes, "threads_per_process": threads, "seconds": round(seconds, 2),
            "images_per_s": round(results[0]["num_images"] / seconds, 1),
            "captions_per_s": round(results[0]["num_captions"] / seconds, 1)}


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == WORKER:
        return worker(argv[1:])
    args = build_parser().parse_args(argv)
    from shifted_diffusion.toy.world import ToyWorldConfig, generate_world

    passed = ["--shard_size", str(args.shard_size), "--batch_size", str(args.batch_size), "--text_len",
              str(args.text_len)]  # what a worker's precompute call reads
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = generate_world(root / "world", ToyWorldConfig(num_images=args.num_images, seed=1))
        clip_dir, t5_dir = make_encoders(root, args)
        paths = [folder, clip_dir, t5_dir]
        runs = [launch(1, args.threads, paths, root / "one", passed), launch(1, 1, paths, root / "one_thread", passed),
                launch(args.threads, 1, paths, root / "multi", passed)]
        identical = same_files(root / "one_thread", root / "multi")  # same threads per process: same sums
        storage = {}
        torch.set_num_threads(args.threads)
        for name, masked, dtype in (("t5_unmasked_float16", False, torch.float16),
                                    ("t5_unmasked_bfloat16", False, torch.bfloat16),
                                    ("t5_unmasked_float32", False, torch.float32),
                                    ("t5_masked_float16", True, torch.float16)):
            cache_dir = root / name
            counts = embed(folder, clip_dir, t5_dir, str(cache_dir), args, masked=masked, text_dtype=dtype)
            shard_bytes = sum(p.stat().st_size for p in cache_dir.glob("shard_*.safetensors"))
            storage[name] = {"bytes_per_1000_captions": round(shard_bytes / counts["num_captions"] * 1000),
                             "gb_per_million_captions": round(shard_bytes / counts["num_captions"] * 1e6 / 1e9, 2)}
    result = {
        "benchmark": "embedding_cache", "num_images": args.num_images, "captions_per_image": 1,
        "encoders": {"clip": f"open_clip ViT width {args.clip_width} x {args.clip_layers} layers, 64 px, random",
                     "t5": f"T5 encoder d_model {args.t5_dim} x {args.t5_layers} layers, ByT5 bytes, "
                           f"{args.text_len} positions, random"},
        "throughput": runs, "multi_process_cache_identical": identical,
        "speedup_processes_vs_one_process_same_cores": round(runs[0]["seconds"] / runs[2]["seconds"], 2),
        "speedup_processes_vs_one_process_one_thread": round(runs[1]["seconds"] / runs[2]["seconds"], 2),
        "storage": storage, "clip_embedding_dim": 128,
        "machine": {"cpu_count": os.cpu_count(), "arch": platform.machine(), "torch": torch.__version__},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
