"""A call of fixed-shape CUDA tensors captured once as a CUDA graph, then replayed.

Guided prior sampling at small batch is launch-bound: 8 steps x 16 layers of small kernels. Captured
whole (prefix encoding, every step, the noise draws), it is one graph launch. ``GraphedCall`` owns
static copies of the inputs; each call copies the new inputs into them, replays, and returns a copy
of the output. Random draws inside the graph come from the caller's generator (or the default CUDA
generator) at replay time, so a seeded graphed call equals the same call run eagerly.
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
    data, no data-dependent Python branches). ``warmup`` eager runs on a side stream precede the capture
    (lazy initialisation of kernels and workspaces); they draw from a private generator, so they do not
    advance the caller's. ``generator``: a CUDA generator to draw from at every replay (None: the
    default CUDA generator); a custom one needs torch >= 2.5 (``CUDAGraph.register_generator_state``).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: Inputs, *,
                 generator: Optional[torch.Generator] = None, warmup: int = 2):
        tensors = [x for x in inputs.values() if x is not None]
        if not tensors or any(x.device.type != "cuda" for x in tensors):
            devices = sorted({str(x.device) for x in tensors})
            raise ValueError(f"a CUDA graph needs every input on a CUDA device; got inputs on {devices or 'none'}")
        device = tensors[0].device
        if generator is not None and generator.device.type != "cuda":
            raise ValueError(f"a CUDA graph draws noise on the GPU: generator must be a CUDA generator, "
                             f"got one on {generator.device}")
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            if not hasattr(graph, "register_generator_state"):
                raise RuntimeError(f"a custom generator in a CUDA graph needs torch >= 2.5 (this is {torch.__version__}); "
                                   "pass generator=None and seed with torch.cuda.manual_seed")
            graph.register_generator_state(generator)
        self.signature = _signature(inputs)
        self.generator = generator
        self.static = {name: None if x is None else x.clone() for name, x in inputs.items()}
        private = torch.Generator(device).manual_seed(0)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(**self.static, generator=private)
        torch.cuda.current_stream(device).wait_stream(side)
        with torch.cuda.graph(graph):
            self.output = fn(**self.static, generator=generator)
        self.graph = graph

    def __call__(self, **inputs: Optional[torch.Tensor]) -> torch.Tensor:
        signature = _signature(inputs)
        if signature != self.signature:
            raise ValueError(f"inputs {signature} do not match the captured ones {self.signature}")
        for name, x in inputs.items():
            if x is not None:
                self.static[name].copy_(x)
        self.graph.replay()
        return self.output.clone()
