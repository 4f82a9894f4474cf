"""Training checkpoints shared by the prior and decoder trainers: pickle-free, atomic, validated.

A checkpoint is a folder ``<output_dir>/checkpoint-N``::

    <name>.safetensors        the weights of each trained module (e.g. prior; unet, projection)
    state.safetensors         the tensors of the optimizer, learning-rate schedule, EMA and loss scaler
    rng_<process>.safetensors each process's torch (CPU, CUDA) generator states; Python's and numpy's in its metadata
    train_state.json          format, global step, config, the non-tensor state, every file's size: written last

Nothing in it is a pickle, so resuming a checkpoint someone else wrote cannot run code. (accelerate's
``save_state`` / ``load_state`` are not used: they unpickle the state of registered objects.) A save writes into ``.checkpoint-N.partial``, fsyncs every
file, writes ``train_state.json`` last and renames the folder into place; older checkpoints are pruned only
after that. ``find_checkpoint(.., "latest")`` takes the newest *complete* checkpoint, skipping (with a
warning) folders a crash left behind. Per-step random generators (``step_generator``) make resuming exact.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from .files import fsync, partial_folder, replace_folder, save_tensors, write_json

PREFIX = "checkpoint-"
STATE_NAME = "train_state.json"
TENSORS_NAME = "state.safetensors"
FORMAT = "shifted-diffusion-checkpoint/1"
PICKLE_FILES = ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin",
                "pytorch_model.bin", "scaler.pt", "sampler.bin")
# settings a resumed run may change without changing what the checkpoint holds
RUN_CONTROL = frozenset({
    "max_train_steps", "num_train_epochs", "resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit",
    "validation_steps", "logging_steps", "report_to", "output_dir", "dataloader_num_workers", "num_validation_samples",
    "evaluate_toy", "compile", "logging_dir", "validation_images", "num_validation_images", "clip_specs",
})


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed: incomplete, of another format, or not fitting this run."""


# ---- pickle-free (de)serialisation of nested state -----------------------------------------------


def split_state(obj: Any, prefix: str, tensors: dict) -> Any:
    """A nested state (dicts, lists, tuples, tensors, JSON scalars) -> a JSON tree; tensors go into
    ``tensors`` under dotted names. Tuples and non-string dict keys round-trip exactly."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: split_state(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[split_state(k, f"{prefix}.key{i}", tensors), split_state(v, f"{prefix}.{i}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"{prefix}: cannot store a {type(obj).__name__} in a checkpoint (tensors, numbers, strings, "
                    "lists and dicts only)")


def join_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of ``split_state``."""
    if isinstance(tree, list):
        return [join_state(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__ndarray__" in tree:
            return np.asarray(tree["__ndarray__"], dtype=tree["dtype"])
        if "__tuple__" in tree:
            return tuple(join_state(v, tensors) for v in tree["__tuple__"])
        if "__items__" in tree:
            return {join_state(k, tensors): join_state(v, tensors) for k, v in tree["__items__"]}
        return {k: join_state(v, tensors) for k, v in tree.items()}
    return tree


# ---- durable writes --------------------------------------------------------------------------------


def _save_module(path: Path, module: torch.nn.Module) -> None:
    from safetensors.torch import save_model

    save_model(module, str(path))  # handles tensors that share memory
    fsync(path)


def rng_state() -> tuple[dict, dict]:
    """This process's generators -> (tensors, JSON-able metadata)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    np_state = np.random.get_state()
    meta = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, {"state": json.dumps(meta)}


def set_rng_state(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    meta = json.loads(metadata["state"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"torch_cuda_{i}"] for i in range(len(tensors) - 1) if f"torch_cuda_{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# ---- folders ---------------------------------------------------------------------------------------


def checkpoint_folder(output_dir, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step}"


def list_checkpoints(output_dir) -> list[Path]:
    """The checkpoint-N folders of a run, oldest (smallest N) first, complete or not."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def read_state(path) -> dict:
    """``train_state.json`` of a complete checkpoint; CheckpointError saying what is wrong otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    state_file = path / STATE_NAME
    if not state_file.is_file():
        pickles = [name for name in PICKLE_FILES if (path / name).exists()]
        if pickles:
            raise CheckpointError(
                f"{path} was written by accelerate's save_state (pickle files {pickles}); it is not loaded because "
                "unpickling can run code. Start a new run, or resume from a checkpoint written by this version")
        raise CheckpointError(f"{path} is not a complete checkpoint: {STATE_NAME} is missing (a save that was "
                              "interrupted, or not a checkpoint folder written by train.py / finetune.py)")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{state_file}: not valid JSON ({error}); the checkpoint is damaged") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{state_file}: format {found!r}, expected {FORMAT!r}")
    for name, size in state["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path} is incomplete: {name} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{path} is damaged: {name} has {file.stat().st_size} bytes, {size} were written")
    return state


def find_checkpoint(output_dir, resume: Optional[str]) -> Optional[Path]:
    """``resume``: None (fresh run), "latest" (the newest complete checkpoint-N; incomplete ones are skipped
    with a warning; None with a warning when there is none), or a checkpoint folder (must be complete)."""
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir() and (Path(output_dir) / path).is_dir():  # "checkpoint-500", relative to output_dir
            path = Path(output_dir) / path
        read_state(path)
        _refuse_newer(output_dir, path)
        return path
    found, pickled = list_checkpoints(output_dir), []
    for path in reversed(found):
        try:
            read_state(path)
            return path
        except CheckpointError as error:
            if "unpickling" in str(error):
                pickled.append(path.name)
            warnings.warn(f"resume_from_checkpoint=latest: skipping {path.name}: {error}")
    if pickled:  # an older run's checkpoints: starting over silently would waste it
        raise CheckpointError(f"resume_from_checkpoint=latest: {output_dir} holds only checkpoints in accelerate's "
                              f"pickle format ({', '.join(pickled)}), which are not loaded because unpickling can run "
                              "code; start without --resume_from_checkpoint or use another output_dir")
    warnings.warn(f"resume_from_checkpoint=latest: no complete {PREFIX}N in {output_dir}; starting from scratch")
    return None


def _refuse_newer(output_dir, path: Path) -> None:
    """Resuming an older checkpoint of this run would mix two histories: newer checkpoints stay the "latest" ones
    and pruning by step would delete the new saves first."""
    if Path(output_dir).resolve() != path.resolve().parent or not path.name[len(PREFIX):].isdigit():
        return
    step = int(path.name[len(PREFIX):])
    newer = [p.name for p in list_checkpoints(output_dir) if int(p.name[len(PREFIX):]) > step]
    if newer:
        raise CheckpointError(f"resume_from_checkpoint {path.name}: {output_dir} also holds newer checkpoints "
                              f"{newer[:4]}; move them away first (they would remain 'latest', and pruning would "
                              "delete the resumed run's saves), or resume the newest with 'latest'")


def prune_checkpoints(output_dir, total_limit: Optional[int]) -> None:
    """Keep the newest ``total_limit`` complete checkpoints; remove older complete ones and leftover partial
    saves. Folders that are not complete checkpoints of this format are left alone."""
    for partial in Path(output_dir).glob(f".{PREFIX}*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    if total_limit is None:
        return
    complete = []
    for path in list_checkpoints(output_dir):
        try:
            read_state(path)
            complete.append(path)
        except CheckpointError:
            pass
    for path in complete[: max(0, len(complete) - total_limit)]:
        shutil.rmtree(path)


# ---- save / load --------------------------------------------------------------------------------


def _trainer_state(optimizer, lr_scheduler, ema, scaler) -> dict:
    state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}
    if ema is not None:
        state["ema"] = ema.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def save_checkpoint(accelerator, output_dir, step: int, *, modules: Mapping[str, torch.nn.Module], optimizer,
                    lr_scheduler, ema=None, config: Optional[dict] = None,
                    total_limit: Optional[int] = None) -> Path:
    """Write ``<output_dir>/checkpoint-<step>`` atomically (every process calls this), then prune."""
    output_dir = Path(output_dir)
    final = checkpoint_folder(output_dir, step)
    partial = partial_folder(final)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    tensors, meta = rng_state()
    save_tensors(partial / f"rng_{accelerator.process_index}.safetensors", tensors, meta)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, module in modules.items():
            _save_module(partial / f"{name}.safetensors", module)
        tensors = {}
        tree = split_state(_trainer_state(optimizer, lr_scheduler, ema, accelerator.scaler), "state", tensors)
        save_tensors(partial / TENSORS_NAME, tensors)
        files = {p.name: p.stat().st_size for p in sorted(partial.iterdir())}
        write_json(partial / STATE_NAME, {
            "format": FORMAT, "global_step": step, "num_processes": accelerator.num_processes,
            "modules": sorted(modules), "config": config or {}, "state": tree, "files": files,
        })
        replace_folder(partial, final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def _differences(saved: Mapping, current: Mapping) -> list[str]:
    keys = sorted((set(saved) | set(current)) - RUN_CONTROL)
    return [f"{k}={saved.get(k)!r} (checkpoint) vs {current.get(k)!r} (now)" for k in keys
            if json.dumps(saved.get(k), default=str) != json.dumps(current.get(k), default=str)]


def _check_module(path: Path, name: str, module: torch.nn.Module, state: dict, config: Optional[dict]) -> None:
    """One sentence when the saved weights do not fit the module this run built."""
    from safetensors import safe_open

    file = path / f"{name}.safetensors"
    try:
        with safe_open(str(file), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{file}: unreadable safetensors file ({error})") from error
    current = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    # save_model stores one name per group of tensors sharing memory: only compare the names it kept
    wrong = [k for k in saved if k in current and saved[k] != current[k]]
    unknown = [k for k in saved if k not in current]
    if not wrong and not unknown and len(saved) <= len(current):
        return
    first = (f"{wrong[0]} is {saved[wrong[0]]} in the checkpoint but {current[wrong[0]]} in this run's model"
             if wrong else f"the checkpoint has tensors this run's model lacks (e.g. {unknown[0]})")
    diffs = _differences(state.get("config", {}), config or {})
    hint = ("; settings that differ: " + "; ".join(diffs[:8])) if diffs else ""
    raise CheckpointError(f"{path} does not fit this run's {name}: {len(wrong) + len(unknown)} tensors differ "
                          f"({first}){hint}. Resume with the checkpoint's settings, or use another output_dir")


def load_checkpoint(accelerator, path, *, modules: Mapping[str, torch.nn.Module], optimizer, lr_scheduler, ema=None,
                    config: Optional[dict] = None) -> dict:
    """Restore what ``save_checkpoint`` wrote into the given (prepared) objects; returns train_state.json."""
    from safetensors import safe_open
    from safetensors.torch import load_file, load_model

    path = Path(path)
    state = read_state(path)
    if sorted(modules) != state["modules"]:
        raise CheckpointError(f"{path} holds modules {state['modules']}, this run trains {sorted(modules)}")
    for name, module in modules.items():
        _check_module(path, name, module, state, config)
    changed = _differences(state.get("config", {}), config or {})
    if changed:
        warnings.warn(f"resuming {path} with settings that differ from the checkpoint's: {'; '.join(changed[:8])}. The "
                      "checkpoint's optimizer and learning-rate schedule state are restored as saved, and a changed "
                      "batch size, accumulation or seed changes which data the remaining steps read")
    for name, module in modules.items():
        load_model(module, str(path / f"{name}.safetensors"), strict=True, device=str(next(module.parameters()).device))
    trainer = join_state(state["state"], load_file(str(path / TENSORS_NAME)))
    try:
        optimizer.load_state_dict(trainer["optimizer"])
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: the optimizer state does not fit this run's optimizer ({error})") from error
    lr_scheduler.load_state_dict(trainer["lr_scheduler"])
    if ema is not None:
        if "ema" not in trainer:
            raise CheckpointError(f"{path} holds no EMA weights, but this run uses EMA (--use_ema)")
        ema.load_state_dict(trainer["ema"])
    if accelerator.scaler is not None and "scaler" in trainer:
        accelerator.scaler.load_state_dict(trainer["scaler"])
    rng_file = path / f"rng_{accelerator.process_index}.safetensors"
    if rng_file.is_file():
        with safe_open(str(rng_file), framework="pt") as f:
            set_rng_state({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    else:
        warnings.warn(f"{path} has no generator state for process {accelerator.process_index} (saved with "
                      f"{state['num_processes']} processes); its random numbers continue from the seed")
    return state


def step_generator(seed: int, process_index: int, counter: int, device) -> torch.Generator:
    """The generator of one micro-batch of one process, a function of (seed, process, counter) only."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + counter * 7919 + process_index) % (2**63))
