"""The GAN decoder's losses (Lafite's language-free recipe, written out here).

* adversarial, non-saturating: D minimises ``softplus(D(fake)) + softplus(-D(real))``, G minimises
  ``softplus(-D(fake))``;
* R1 on real images: ``gamma / 2 * E ||grad_x D(x)||^2`` (applied lazily: every ``interval`` D steps, times
  ``interval``);
* contrastive (InfoNCE over the batch, temperature ``tau``): ``-mean_i log softmax_j(cos(a_i, b_j) / tau)[i]``;
  for G between the CLIP image embedding of each generated image and its conditioning, and between D's features of
  the generated image and its conditioning; for D between its features of the real image and the conditioning;
* reconstruction (not in Lafite; optional): ``mean (G(z, c'(x)) - x)^2``, the generation from an image's own perturbed
  embedding against that image -- the pairing image-only data gives for free; a dense signal that puts layout and
  colour in place far sooner than the adversarial game (what the toy preset's warm-up relies on);
* the conditioning perturbation (language-free training: an image embedding stands in for the text embedding a
  prior will give at inference): ``c' = normalize((1 - xi) normalize(c) + xi e)`` with ``e`` a random unit vector.

Lafite's published values: tau 0.5, both contrastive weights 10, R1 gamma 10, xi 0.75 for image features. (Its
code computes the contrastive term on ``exp(cos / tau)``, which it flags itself as a mistake kept for its published
numbers; the InfoNCE above is the intended form, so these weights are a starting point, not tuned values.)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def discriminator_adversarial(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def generator_adversarial(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """E ||d D(x) / d x||^2 over the batch (``real_images`` must require grad; the graph is kept for backward)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.square().sum(dim=(1, 2, 3)).mean()


def reconstruction_loss(generated: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean squared error between generated and target images (B, 3, H, W), in float32."""
    if generated.shape != images.shape:
        raise ValueError(f"reconstruction_loss: expected two image batches of one shape, got "
                         f"{tuple(generated.shape)}, {tuple(images.shape)}")
    return (generated.float() - images.float()).square().mean()


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: rows of a (B, D) against rows of b (B, D); the matching row is the positive."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"contrastive_loss: expected two (B, D) tensors of one shape, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


def perturb_conditioning(c: torch.Tensor, level: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """normalize((1 - level) normalize(c) + level e), e a random unit vector per row (level 0: normalize(c))."""
    noise = torch.randn(c.shape, device=c.device, dtype=torch.float32, generator=generator)
    mixed = (1.0 - level) * F.normalize(c.float(), dim=-1) + level * F.normalize(noise, dim=-1)
    return F.normalize(mixed, dim=-1)
