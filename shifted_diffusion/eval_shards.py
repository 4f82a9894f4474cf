"""Resumable work in shards: tensors in safetensors files under the output folder, each with the settings it
was computed for; a shard present with the same settings is loaded instead of recomputed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict

import torch

__all__ = ["ShardStore", "process_shards"]


class ShardStore:
    """``root/KEY.safetensors`` files; ``computed`` counts the shards this store computed (not loaded)."""

    def __init__(self, root):
        self.root = Path(root)
        self.computed = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str, meta: dict):
        """The shard's tensors when it exists and was computed for ``meta``; otherwise None."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(os.fspath(path), framework="pt") as handle:
                stored = json.loads((handle.metadata() or {}).get("meta", "null"))
        except Exception:  # a truncated or foreign file: recompute it
            return None
        if stored != json.loads(json.dumps(meta)):
            return None
        return load_file(os.fspath(path))

    def load_or_compute(self, key: str, meta: dict, compute: Callable[[], Dict[str, torch.Tensor]]):
        """The stored shard, or ``compute()`` written atomically (temp file + rename) and returned."""
        from safetensors.torch import save_file

        found = self.load(key, meta)
        if found is not None:
            return found
        tensors = {name: t.detach().cpu().contiguous() for name, t in compute().items()}
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, os.fspath(partial), metadata={"meta": json.dumps(meta, sort_keys=True)})
        os.replace(partial, path)
        self.computed += 1
        return tensors


def process_shards(num_shards: int, process_index: int, num_processes: int) -> range:
    """The shards one process computes: every ``num_processes``-th, from its index."""
    return range(process_index, num_shards, num_processes)
