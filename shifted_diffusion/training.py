"""The pieces both trainers (``prior_training``, ``decoder_training``) are built from: plain functions.

* ``build_accelerator`` / ``init_trackers``: one Accelerator recipe and the ``report_to`` handling
  (tensorboard, the default, only when it is installed);
* ``epoch_order`` / ``epoch_batches`` / ``epoch_loader``: the data order, a function of (seed, epoch) only,
  sharded disjointly over the processes, full batches only; a run resumed at micro-step N reads exactly
  the batches an uninterrupted run reads from N on;
* ``resume_step``: the step (and every state) recovered from a checkpoint, or 0;
* ``backward_step``: backward, clipping at the end of an accumulation window, optimizer and schedule steps;
* ``build_ema`` (FusedEMA) and ``ema.EmaWeights`` to swap its weights in;
* ``StepLog``: the progress bar and the loss (also written to ``logs/loss.jsonl``), summed on the device and
  read only when logged or before a checkpoint, where a non-finite loss stops the run (``check_finite_loss``);
* ``due`` / ``validate_if_due``: when the periodic hooks (checkpoint, validation) run;
* ``logger`` / ``setup_logging``: python ``logging`` (written through tqdm) for every message.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from tqdm.auto import tqdm

from .checkpoints import find_checkpoint, load_checkpoint

logger = logging.getLogger("shifted_diffusion")

EPOCH_SEED_FACTOR = 1_000_003


# ---- logging -----------------------------------------------------------------------------------


class _TqdmHandler(logging.StreamHandler):
    """Writes records above any running progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never stop training
            self.handleError(record)


def setup_logging(is_main_process: bool = True) -> logging.Logger:
    """The package logger: INFO on the main process, warnings only on the others; one tqdm-aware handler."""
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if is_main_process else logging.WARNING)
    logger.propagate = False  # a root handler (a library's basicConfig) would print every record a second time
    return logger


# ---- accelerator and trackers ------------------------------------------------------------------


def resolve_trackers(report_to: Optional[str]) -> Optional[str]:
    """accelerate's ``log_with`` for a ``report_to`` setting: None for "none" (or None); "tensorboard" only
    when tensorboard is installed (otherwise None, and the loss is in the progress bar only)."""
    if report_to is None or report_to == "none":
        return None
    if report_to == "tensorboard":
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            logger.info("tensorboard is not installed: the loss is shown in the progress bar only (report_to)")
            return None
    return report_to


def build_accelerator(output_dir, *, mixed_precision: Optional[str], gradient_accumulation_steps: int,
                      report_to: Optional[str], logging_dir: str = "logs"):
    """(Accelerator, trackers) for a run writing into ``output_dir``; trackers None when there are none. The
    process-group timeout is long: processes wait at barriers while the slowest embeds its share of the
    images, the main process fits the vocabulary, or the decoder's image embeddings are computed."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    output_dir = Path(output_dir)
    trackers = resolve_trackers(report_to)
    accelerator = Accelerator(
        mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps, log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / logging_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=12))],
    )
    setup_logging(accelerator.is_main_process)
    check_distributed_type(str(accelerator.distributed_type))
    return accelerator, trackers


def check_distributed_type(distributed_type: str) -> None:
    """Refuse FSDP / DeepSpeed launches: the EMA and the checkpoint writer expect whole parameters."""
    name = distributed_type.rsplit(".", 1)[-1].upper()
    if name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise SystemExit(f"accelerate launched this run with {name}, which this trainer does not support (its EMA "
                         "and checkpoints expect whole parameters on every process); run `accelerate config` "
                         "again and choose multi-GPU (DDP); the README's memory table shows the `large` prior "
                         "fits 40 GB GPUs under DDP with gradient checkpointing")


def init_trackers(accelerator, trackers: Optional[str], project: str, config: Mapping[str, Any]) -> None:
    """Start the trackers (main process) with the run's settings; values trackers cannot show become strings."""
    if trackers and accelerator.is_main_process:
        accelerator.init_trackers(project, config={
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()})


# ---- data order --------------------------------------------------------------------------------


def epoch_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of one epoch: a function of (seed, epoch) only (the same on every process)."""
    generator = torch.Generator().manual_seed(seed * EPOCH_SEED_FACTOR + epoch)
    return torch.randperm(num_items, generator=generator)


def batches_per_epoch(num_items: int, batch_size: int, world: int) -> int:
    """Full batches each process takes per epoch (every process the same number)."""
    return num_items // (world * batch_size)


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list:
    """This process's batches of one epoch: ``epoch_order`` sharded over the processes (rank::world),
    disjoint, full batches only (the last items of the permutation that fill no batch on every process
    are left out of this epoch)."""
    usable = batches_per_epoch(num_items, batch_size, world) * world * batch_size
    mine = epoch_order(num_items, seed, epoch)[:usable][rank::world]
    return [mine[i:i + batch_size] for i in range(0, len(mine) - batch_size + 1, batch_size)]


def check_batches(num_items: int, batch_size: int, world: int, what: str) -> int:
    """Micro-batches per epoch; ValueError when the data fill not even one batch on every process."""
    count = batches_per_epoch(num_items, batch_size, world)
    if count == 0:
        raise ValueError(f"{num_items} {what}: fewer than one batch of {batch_size} (--train_batch_size) x {world} "
                         "processes")
    return count


def epoch_loader(dataset, micro_step: int, *, batch_size: int, seed: int, rank: int, world: int,
                 num_workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A loader over the rest of the epoch that ``micro_step`` (micro-batches since the start of training)
    falls in, from that very batch on. Loading touches no global generator."""
    epoch, offset = divmod(micro_step, check_batches(len(dataset), batch_size, world, "training items"))
    batches = epoch_batches(len(dataset), batch_size, seed, epoch, rank, world)[offset:]
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=[b.tolist() for b in batches], num_workers=num_workers, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed * EPOCH_SEED_FACTOR + epoch),
    )


def steps_per_epoch(num_items: int, batch_size: int, world: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps per epoch (at least 1), to turn ``num_train_epochs`` into steps."""
    return max(batches_per_epoch(num_items, batch_size, world) // gradient_accumulation_steps, 1)


# ---- steps -------------------------------------------------------------------------------------


def resume_step(accelerator, output_dir, resume: Optional[str], *, modules: Mapping[str, torch.nn.Module],
                optimizer, lr_scheduler, ema=None, config: Optional[dict] = None) -> int:
    """Restore the checkpoint ``resume`` names ("latest" or a folder; None: a fresh run) into the prepared
    objects and return its global step (0 for a fresh run)."""
    checkpoint = find_checkpoint(output_dir, resume)
    if checkpoint is None:
        return 0
    state = load_checkpoint(accelerator, checkpoint, modules=modules, optimizer=optimizer, lr_scheduler=lr_scheduler,
                            ema=ema, config=config)
    if ema is not None:
        ema.to(accelerator.device)  # shadows are restored on the CPU
    step = int(state["global_step"])
    logger.info(f"resuming from {checkpoint} at step {step}")
    return step


def backward_step(accelerator, loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter], max_grad_norm: float,
               optimizer, lr_scheduler) -> None:
    """One micro-batch inside ``accelerator.accumulate``: backward; at a window's end clip the gradients;
    optimizer and schedule steps (accelerate makes them no-ops inside a window)."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def build_ema(parameters: Iterable[torch.nn.Parameter], use_ema: bool, decay: float, device):
    """A FusedEMA of the trained weights on ``device``, or None without EMA."""
    if not use_ema:
        return None
    from .ema import FusedEMA

    ema = FusedEMA(list(parameters), decay=decay)
    ema.to(device)
    return ema


def due(step: int, every: int) -> bool:
    """Whether a hook run every ``every`` steps (0: never) runs at ``step``."""
    return bool(every) and step % every == 0


def validate_if_due(accelerator, step: int, every: int, hook: Callable[[int], Any], *, default: Any = None,
                    main_process_only: bool = False) -> Any:
    """``hook(step)`` when ``due`` (on the main process only with ``main_process_only``); its result, or
    ``default`` when it did not run here."""
    if not due(step, every) or (main_process_only and not accelerator.is_main_process):
        return default
    return hook(step)


def check_finite_loss(step: int, value: float, advice: str) -> None:
    """FloatingPointError naming the step when the loss is NaN or inf."""
    if not math.isfinite(value):
        raise FloatingPointError(f"step {step}: the training loss is {value}; stopping (the last checkpoint is kept, "
                                 f"nothing more is saved). {advice}")


def mixed_precision_dtype(accelerator) -> torch.dtype:
    """The dtype of the frozen models' weights under the accelerator's mixed precision (float32 without)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def optimizer_steps(accelerator, dataset, *, global_step: int, max_steps: int, micro_batch_loss: Callable,
                    accumulate: Iterable[torch.nn.Module], parameters, max_grad_norm: float, optimizer, lr_scheduler,
                    ema, step_log: "StepLog", seed: int, batch_size: int, gradient_accumulation_steps: int,
                    num_workers: int = 0, pin_memory: bool = False, timing: Optional[dict] = None,
                    ema_parameters=None):
    """The training loop both trainers share, as a generator of optimizer-step numbers.

    From ``global_step`` to ``max_steps``: the micro-batches of ``epoch_loader`` (the same batches an
    uninterrupted run reads), each with its own ``step_generator(seed, process, micro-step)``; the loss of
    ``micro_batch_loss(batch, generator)`` backpropagated inside ``accelerator.accumulate(*accumulate)``; at each
    window's end clipping, the optimizer and schedule steps, the EMA update and the loss log; then the new step
    number is yielded (the caller checkpoints / validates there). ``timing``: {"cpu_s", "wall_s"} summed over
    the micro-steps (hooks excluded). ``ema_parameters``: what the EMA averages (default ``parameters``)."""
    from .checkpoints import step_generator

    parameters = list(parameters)
    ema_parameters = parameters if ema_parameters is None else list(ema_parameters)
    rank, world = accelerator.process_index, accelerator.num_processes
    micro_step = global_step * gradient_accumulation_steps
    while global_step < max_steps:
        loader = epoch_loader(dataset, micro_step, batch_size=batch_size, seed=seed, rank=rank, world=world,
                              num_workers=num_workers, pin_memory=pin_memory)
        for batch in loader:
            generator = step_generator(seed, rank, micro_step, accelerator.device)
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            with accelerator.accumulate(*accumulate):
                loss = micro_batch_loss(batch, generator)
                backward_step(accelerator, loss, parameters, max_grad_norm, optimizer, lr_scheduler)
            micro_step += 1
            step_log.add(loss)  # summed on the device: no host sync per micro-step
            if accelerator.sync_gradients and ema is not None:
                ema.step(ema_parameters)
            if timing is not None:
                timing["cpu_s"] = timing.get("cpu_s", 0.0) + time.process_time() - cpu_start
                timing["wall_s"] = timing.get("wall_s", 0.0) + time.perf_counter() - wall_start
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            step_log.step(global_step, lr_scheduler.get_last_lr()[0])
            yield global_step
            if global_step >= max_steps:
                return


LOSS_LOG_NAME = "loss.jsonl"


def read_loss_log(path) -> list[dict]:
    """The lines of a run's ``loss.jsonl`` (``StepLog``), in order."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def keep_loss_log(path: Path, last_step: int) -> None:
    """Create ``path``'s folder; drop the lines of steps after ``last_step`` (a resumed run; atomic rewrite)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = read_loss_log(path)
    kept = [line for line in lines if line["step"] <= last_step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(line) + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)


class StepLog:
    """The progress bar and loss log of a run.

    ``add(loss)`` after every micro-batch sums the loss on the device (no host sync); ``step(step, lr)`` after
    every optimizer step closes its accumulation window. The window's mean, averaged over the processes, is
    read only at logging steps (logged as ``train/loss``), at checkpoint steps and at the last step; there a
    non-finite loss raises, before anything is saved.

    Every logged value is also a line of ``<logging_dir>/loss.jsonl`` (main process; ``{"step", "loss", "lr",
    "samples_per_s"}``), whatever the trackers: a resumed run first drops the lines after its step, so the file
    is the history of the weights it writes.
    """

    def __init__(self, accelerator, *, max_steps: int, initial_step: int, logging_steps: int,
                 checkpointing_steps: int, samples_per_step: int, advice: str, desc: str = "steps"):
        self.accelerator, self.max_steps, self.logging_steps = accelerator, max_steps, logging_steps
        self.checkpointing_steps, self.samples_per_step, self.advice = checkpointing_steps, samples_per_step, advice
        self.progress = tqdm(total=max_steps, initial=initial_step, desc=desc,
                             disable=not accelerator.is_local_main_process)
        self.window_sum: Any = 0.0
        self.window_count = 0
        self.last_loss = float("nan")
        self._since, self._steps_since = time.time(), 0
        self.loss_file = Path(accelerator.logging_dir) / LOSS_LOG_NAME
        if accelerator.is_main_process:
            keep_loss_log(self.loss_file, initial_step)

    def add(self, loss: torch.Tensor) -> None:
        self.window_sum = self.window_sum + loss.detach().float()
        self.window_count += 1

    def step(self, step: int, lr: float) -> Optional[float]:
        """Close the step's window; the loss when it was read at this step, else None."""
        mean = self.window_sum / max(self.window_count, 1)
        self.window_sum, self.window_count = 0.0, 0
        self.progress.update(1)
        self._steps_since += 1
        log = step % self.logging_steps == 0 or step == self.max_steps
        if not (log or due(step, self.checkpointing_steps)):
            return None
        value = float(self.accelerator.gather(torch.as_tensor(mean, device=self.accelerator.device)[None]).mean())
        check_finite_loss(step, value, self.advice)
        self.last_loss = value
        if log:
            elapsed = max(time.time() - self._since, 1e-9)
            self.progress.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            samples_per_s = self._steps_since * self.samples_per_step / elapsed
            self.accelerator.log({"train/loss": value, "train/lr": lr, "train/samples_per_s": samples_per_s},
                                 step=step)
            if self.accelerator.is_main_process:
                with open(self.loss_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": step, "loss": value, "lr": lr,
                                        "samples_per_s": round(samples_per_s, 3)}) + "\n")
            self._since, self._steps_since = time.time(), 0
        return value

    def close(self) -> None:
        self.progress.close()
