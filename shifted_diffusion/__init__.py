"""Shifted Diffusion (Zhou et al., CVPR 2023): a shifted diffusion prior from captions to CLIP
image embeddings, and decoders conditioned on those embeddings.

The prior's diffusers components are importable from here (``model_index.json`` names this package as their
library): ``ShiftedDiffusionPriorPipeline`` and its ``ShiftedPrior``, ``ClusterVocab`` /
``StandardNormalShift``, ``ShiftedDiffusionScheduler`` and ``UnconditionalInputs``.
"""

__version__ = "0.1.0"

from .guidance import UnconditionalInputs  # noqa: E402
from .prior import PriorConfig, ShiftedPrior  # noqa: E402
from .prior_pipeline import (  # noqa: E402
    ShiftedDiffusionPriorPipeline, ShiftedDiffusionPriorPipelineOutput, load_prior,
)
from .scheduler import ShiftedDiffusionScheduler  # noqa: E402
from .vocab import ClusterVocab, StandardNormalShift  # noqa: E402

__all__ = [
    "ClusterVocab", "PriorConfig", "ShiftedDiffusionPriorPipeline", "ShiftedDiffusionPriorPipelineOutput",
    "ShiftedDiffusionScheduler", "ShiftedPrior", "StandardNormalShift", "UnconditionalInputs", "load_prior",
]
