"""Where a stochastic sampler's fresh noise comes from: `noise(x, sigma, sigma_next)`.

Every sampler that adds noise during a step asks a noise sampler for it, passing the current state x (the noise
has x's shape, device and dtype) and the step's levels σ -> σ_next; a source that does not care about the levels
ignores them. kedavra's sources:

    generator_noise(generator)        torch.randn from a generator (or one per batch row): kedavra's default
    kedavra.diffusion.rng.ImageNoise  A1111's per-image noise (its CPU / GPU / NV sources, variation seeds, ENSD)
    kedavra.diffusion.brownian        the seeded Brownian tree of k-diffusion's SDE samplers (A1111, ComfyUI)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kedavra.diffusion.forward_process import randn_like

NoiseSampler = Callable[[torch.Tensor, float, float], torch.Tensor]


def generator_noise(generator) -> NoiseSampler:
    """Standard normal noise drawn from `generator` (a torch.Generator, a list with one per batch row, or None
    for torch's global generator), whatever the levels (`randn_like`)."""

    def noise(x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        return randn_like(x, generator)

    return noise
