"""Heun++: ComfyUI's "heunpp2" (comfy/k_diffusion/sampling.py, sample_heunpp2, from Carzit's MIT-licensed
sd-webui-samplers-scheduler). Not from a paper: Heun's method (Karras et al. 2022, Algorithm 1) extended with a third
slope, the slopes weighted by the levels they were taken at.

In the VE view x = x_0 + σ ε with the slope d(x; σ) = (x - D(x; σ))/σ = dx/dσ (euler.py), a step from σ_i with
Δ = σ_{i+1} - σ_i chains Euler predictions over the next two levels of the plan,

    x_1 = x + Δ d_0,                    d_0 = d(x; σ_i)
    x_2 = x_1 + (σ_{i+2} - σ_{i+1}) d_1, d_1 = d(x_1; σ_{i+1}),   d_2 = d(x_2; σ_{i+2}),

and steps x ← x + Δ (w_0 d_0 + w_1 d_1 + w_2 d_2) with w_1 = σ_{i+1}/(3σ_0), w_2 = σ_{i+2}/(3σ_0),
w_0 = 1 - w_1 - w_2 (σ_0 the run's first level, so late steps lean on d_0). The step before the last uses two slopes,
w_1 = σ_{i+1}/(2σ_0), w_0 = 1 - w_1; the last one is Euler's (into σ = 0: x̂_0). Three evaluations per step, two on
the step before the last, one on the last: 3n - 3 for n >= 2. "Last" is ComfyUI's test, σ equal to the plan's final
level. Deterministic: ComfyUI's function takes Karras et al.'s churn, which its KSampler never sets (and would draw
from torch's global generator); it is not taken here.
"""

from __future__ import annotations

import torch

from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.timesteps import SamplingPlan


def sample_heunpp2(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None):
    """Heun++ (module docstring). `noise` is unused (the sampler is deterministic)."""
    n = len(plan)
    sigmas = plan.sigmas.tolist()
    sigma_first, sigma_end = sigmas[0], sigmas[-1]

    def slope(x_at, i: int) -> torch.Tensor:  # d at the plan's level i
        return (x_at - denoiser.ve(x_at, plan.timesteps[i].item(), sigmas[i])) / sigmas[i]

    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser.ve(x, plan.timesteps[i].item(), sigma)
        d = (x - x0) / sigma
        dt = sigma_next - sigma
        x_1 = x + d * dt
        if sigma_next == sigma_end:  # Euler
            x_next = x_1
        else:
            d_1 = slope(x_1, i + 1)
            if sigmas[i + 2] == sigma_end:  # Heun, two slopes
                w_1 = sigma_next / (2 * sigma_first)
                x_next = x + (d * (1 - w_1) + d_1 * w_1) * dt
            else:  # Heun++, three slopes
                x_2 = x_1 + d_1 * (sigmas[i + 2] - sigma_next)
                d_2 = slope(x_2, i + 2)
                w_1, w_2 = sigma_next / (3 * sigma_first), sigmas[i + 2] / (3 * sigma_first)
                x_next = x + ((1 - w_1 - w_2) * d + w_1 * d_1 + w_2 * d_2) * dt
        x = denoiser.after_step(callback, i, n, x_next, x0)
    return x
