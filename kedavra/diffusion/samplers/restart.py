"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes"), as A1111's "Restart".

Heun steps along the plan's σ's; at σ ≈ 0.1 the run jumps back up to σ ≈ 2 by adding fresh noise (the forward
process, x + √(σ_hi² - σ_lo²) z) and descends again over a short Karras segment, `times` times. The restart
contracts the accumulated error of the ODE solver (the paper's Theorem 1) at a cost of extra evaluations.
A1111's automatic choice (modules/sd_samplers_extra.py): below 20 steps no restart (plain Heun); from 20 steps a
9-step segment once, from 36 steps a steps/4 segment twice, with the main schedule rebuilt as Karras σ's over the
remaining steps.
"""

from __future__ import annotations

import torch

from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.samplers.noise import NoiseSampler
from kedavra.diffusion.sigmas import karras_sigmas
from kedavra.diffusion.timesteps import SamplingPlan

RESTART_AT_SIGMA = 0.1  # where the restart segment begins (A1111's restart_list key)
RESTART_TO_SIGMA = 2.0  # the level it jumps back up to
RESTART_MIN_STEPS, RESTART_TWICE_STEPS, RESTART_DEFAULT_SEGMENT = 20, 36, 9


def restart_steps(sigmas: torch.Tensor) -> list[tuple[float, float]]:
    """The (σ, σ_next) pairs A1111's restart sampler walks for the σ sequence `sigmas` (n+1, ending in 0)."""
    steps = len(sigmas) - 1
    restart = None
    if steps >= RESTART_MIN_STEPS:
        segment, times = RESTART_DEFAULT_SEGMENT, 1
        if steps >= RESTART_TWICE_STEPS:
            segment, times = steps // 4, 2
        sigmas = karras_sigmas(steps - segment * times, sigmas[-2].item(), sigmas[0].item())
        restart = (segment + 1, times, RESTART_TO_SIGMA)
    pairs = []
    start = int(torch.argmin((sigmas - RESTART_AT_SIGMA).abs())) if restart else None
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i].item(), sigmas[i + 1].item()))
        if restart and i + 1 == start:
            segment, times, sigma_max = restart
            top = int(torch.argmin((sigmas - sigma_max).abs()))
            if top < start:
                levels = karras_sigmas(segment, sigmas[start].item(), sigmas[top].item())[:-1]
                pairs += [(levels[k].item(), levels[k + 1].item()) for k in range(len(levels) - 1)] * times
    return pairs


def sample_restart(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise: NoiseSampler = None,
                   callback=None, s_noise: float = 1.0):
    """Restart sampling over the plan's σ's (a txt2img or img2img plan ending at 0): Heun steps, Euler into 0,
    fresh noise wherever the walk goes back up."""
    pairs = restart_steps(plan.sigmas.float())
    last = None
    for i, (sigma, sigma_next) in enumerate(pairs):
        if last is not None and last < sigma:
            x = x + noise(x, last, sigma) * (s_noise * (sigma**2 - last**2) ** 0.5)
        x0 = denoiser.ve(x, plan.t_at(sigma), sigma)
        d = (x - x0) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - denoiser.ve(x_euler, plan.t_at(sigma_next), sigma_next)) / sigma_next
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        x = denoiser.after_step(callback, i, len(pairs), x, x0)
        last = sigma_next
    return x
