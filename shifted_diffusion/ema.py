"""Exponential moving average of the trained weights, updated in one pass.

``FusedEMA`` is diffusers' ``EMAModel`` (its decay schedule, ``state_dict`` / ``load_state_dict``,
``store`` / ``copy_to`` / ``restore``, accelerate checkpointing) with another ``step``. EMAModel updates
weight by weight as ``s -= (1 - d) * (s - p)``: two temporaries per tensor, 32 bytes moved per fp32
parameter and three kernel launches per tensor (its ``foreach`` variant materialises ``s - p`` for all
weights at once, a whole extra model). Here one multi-tensor lerp, ``s += (1 - d) * (p - s)``, reads each
shadow and weight once and writes the shadow once: 12 bytes per parameter. Shadows kept in another dtype
or on another device than the weights take EMAModel's own step; DeepSpeed ZeRO-3 gathering and the
``foreach`` option are not supported.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from diffusers.training_utils import EMAModel


class FusedEMA(EMAModel):
    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        if isinstance(parameters, torch.nn.Module):
            parameters = parameters.parameters()
        parameters = list(parameters)
        if len(parameters) != len(self.shadow_params):
            raise ValueError(f"EMA tracks {len(self.shadow_params)} tensors, step got {len(parameters)}")
        if any(s.dtype != p.dtype or s.device != p.device for s, p in zip(self.shadow_params, parameters)):
            return super().step(parameters)  # shadows kept in another dtype / on another device: EMAModel's way
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        pairs = list(zip(self.shadow_params, parameters))
        trained = [(s, p) for s, p in pairs if p.requires_grad]
        frozen = [(s, p) for s, p in pairs if not p.requires_grad]
        if trained:
            torch._foreach_lerp_([s for s, _ in trained], [p for _, p in trained], 1.0 - decay)
        if frozen:  # as EMAModel: untrained tensors are copied
            torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen])


class EmaWeights:
    """Swap EMA weights into a module (or a list of parameters) for a block of code (validation, saving);
    the raw weights are back afterwards. With ``ema`` None it changes nothing."""

    def __init__(self, ema: Optional[EMAModel], weights: Union[torch.nn.Module, Iterable[torch.nn.Parameter]]):
        self.ema, self.weights = ema, weights
        self.parameters = list(weights.parameters() if isinstance(weights, torch.nn.Module) else weights)

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)
        return self.weights

    def __exit__(self, *exc) -> None:
        if self.ema is not None:
            self.ema.restore(self.parameters)
