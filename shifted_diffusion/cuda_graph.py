"""A call of fixed-shape CUDA tensors captured once as a CUDA graph, then replayed.

Guided prior sampling at small batch is launch-bound: 8 steps x 16 layers of small kernels. Captured
whole (prefix encoding, every step, the noise draws), it is one graph launch. ``GraphedCall`` owns
static copies of the inputs; each call copies the new inputs into them, replays, and returns a copy
of the output.

Random draws: the graph draws from a generator of its own, registered with the graph. Each call hands
it the state of the caller's generator (or of the device's default CUDA generator) before the replay
and hands the advanced state back after, so a seeded graphed call equals the same call run eagerly,
advances the caller's generator by as much, and any generator object (a fresh one per call too) replays
the same graph. Without ``CUDAGraph.register_generator_state`` (torch < 2.5) the graph draws from the
default CUDA generator directly and a call cannot take a generator.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional

import torch

Inputs = Mapping[str, Optional[torch.Tensor]]


def _signature(inputs: Inputs) -> Dict[str, Optional[tuple]]:
    return {name: None if x is None else (tuple(x.shape), x.dtype, x.device) for name, x in inputs.items()}


class GraphedCall:
    """``fn(**inputs, generator=...) -> Tensor`` as one CUDA graph for inputs of this signature.

    ``fn`` must be capturable: CUDA work only (no host synchronisation, no host->device copies of new
    data, no data-dependent Python branches), and it must read every tensor that changes between calls
    from ``inputs``; anything else it reads (weights, tables) is read in place at every replay, so it
    must stay where it is. ``warmup`` eager runs on a side stream precede the capture (lazy
    initialisation of kernels and workspaces); they draw from the graph's own generator."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: Inputs, *, warmup: int = 2):
        tensors = [x for x in inputs.values() if x is not None]
        if not tensors or any(x.device.type != "cuda" for x in tensors):
            devices = sorted({str(x.device) for x in tensors})
            raise ValueError(f"a CUDA graph needs every input on a CUDA device; got inputs on {devices or 'none'}")
        self.device = tensors[0].device  # a CUDA tensor's device has its index
        self.fn = fn  # kept: the graph reads what fn's closure holds
        self.signature = _signature(inputs)
        self.static = {name: None if x is None else x.clone() for name, x in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device):
            if hasattr(graph, "register_generator_state"):
                self.generator: Optional[torch.Generator] = torch.Generator(self.device)
                graph.register_generator_state(self.generator)
            else:
                self.generator = None  # the default CUDA generator, registered by every capture
            warm_generator = self.generator if self.generator is not None else torch.Generator(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(**self.static, generator=warm_generator)
            torch.cuda.current_stream(self.device).wait_stream(side)
            with torch.cuda.graph(graph):
                self.output = fn(**self.static, generator=self.generator)
        self.graph = graph

    def __call__(self, generator: Optional[torch.Generator] = None, **inputs: Optional[torch.Tensor]) -> torch.Tensor:
        """Copy `inputs` in, replay drawing from `generator` (None: the device's default CUDA generator),
        return a copy of the output."""
        signature = _signature(inputs)
        if signature != self.signature:
            raise ValueError(f"inputs {signature} do not match the captured ones {self.signature}")
        if generator is not None and generator.device.type != "cuda":
            raise ValueError(f"a CUDA graph draws its noise on the GPU: generator must be a CUDA generator, "
                             f"got one on {generator.device}")
        if generator is not None and self.generator is None:
            raise RuntimeError(f"a generator in a CUDA graph needs torch >= 2.5 (this is {torch.__version__}); "
                               "pass generator=None and seed with torch.cuda.manual_seed")
        with torch.cuda.device(self.device):
            for name, x in inputs.items():
                if x is not None:
                    self.static[name].copy_(x)
            source = generator if generator is not None else torch.cuda.default_generators[self.device.index]
            if self.generator is not None:
                self.generator.set_state(source.get_state())
            self.graph.replay()
            if self.generator is not None:
                source.set_state(self.generator.get_state())
            return self.output.clone()
