"""The gradient-estimation sampler: ComfyUI's "gradient_estimation" (comfy/k_diffusion/sampling.py,
sample_gradient_estimation), Permenter & Yuan 2024 ("Interpreting and improving diffusion models from an optimization
perspective", ICML 2024, arXiv 2306.04848: their gradient-estimation sampler with γ = 2).

The paper reads the denoiser as an approximate projection onto the data manifold and DDIM as gradient descent on
the distance to it, with ε̂ = (x - x̂_0)/σ its gradient estimate; its sampler replaces ε̂ by the extrapolation
γ ε̂_i + (1 - γ) ε̂_{i-1}, correcting the estimate by its change since the last step (γ = 1 is DDIM). In the VE
view x = x_0 + σ ε, where ε̂ is the slope d = dx/dσ of euler.py, the step σ_i -> σ_{i+1} is

    x ← x + (σ_{i+1} - σ_i) (d_i + (γ - 1)(d_i - d_{i-1})),

Euler's step on the first one (no d_{i-1}), x̂_0 into σ = 0. One model evaluation per step (n); deterministic.
"""

from __future__ import annotations

import torch

from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.timesteps import SamplingPlan

GE_GAMMA = 2.0  # ComfyUI's ge_gamma default, the paper's choice


def sample_gradient_estimation(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None,
                               ge_gamma: float = GE_GAMMA):
    """Gradient estimation with γ = ge_gamma (module docstring). `noise` is unused (the sampler is deterministic)."""
    n = len(plan)
    d_prev = None
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0 = denoiser.ve(x, plan.timesteps[i].item(), sigma)
        d = (x - x0) / sigma  # dx/dσ, Karras et al. 2022 eq. 3
        if sigma_next == 0:
            x_next = x0
        else:
            dt = sigma_next - sigma
            x_next = x + d * dt
            if d_prev is not None:
                x_next = x_next + (ge_gamma - 1) * (d - d_prev) * dt
        x = denoiser.after_step(callback, i, n, x_next, x0)
        d_prev = d
    return x
