"""Euler, Euler ancestral and Heun: ODE/SDE steps in the VE view x = x_0 + σ ε.

The probability-flow ODE in this view is dx/dσ = (x - D(x; σ))/σ (Karras et al. 2022, eq. 3 with
σ(t) = t, written with the denoiser D = x̂_0 of their eq. 7); `d` below is that slope.
"""

from __future__ import annotations

import torch

from kedavra.diffusion.forward_process import randn_like
from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.timesteps import SamplingPlan


def sample_euler(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, generator=None, callback=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    n = len(plan)
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0 = denoiser.ve(x, plan.timesteps[i].item(), sigma)
        d = (x - x0) / sigma  # dx/dσ, Karras et al. 2022 eq. 3
        x = x + d * (sigma_next - sigma)
        x = denoiser.after_step(callback, i, n, x, x0)
    return x


def ancestral_step_sigmas(sigma: float, sigma_next: float) -> tuple[float, float]:
    """Split a step σ -> σ_next into a deterministic move to σ_down and fresh noise of std σ_up, with
    σ_down² + σ_up² = σ_next² and σ_up = σ_next √(1 - σ_next²/σ²) (the ancestral DDPM step's variance in
    the VE view, as k-diffusion's `get_ancestral_step` with η = 1)."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, generator=None,
                           callback=None):
    """Euler ancestral ("Euler a"): an Euler step to σ_down, then noise of std σ_up back up to σ_next."""
    n = len(plan)
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0 = denoiser.ve(x, plan.timesteps[i].item(), sigma)
        sigma_down, sigma_up = ancestral_step_sigmas(sigma, sigma_next)
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + sigma_up * randn_like(x, generator)
        x = denoiser.after_step(callback, i, n, x, x0)
    return x


def sample_heun(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, generator=None, callback=None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1): an Euler step, then the slope is
    averaged with the slope at the Euler step's end; a plain Euler step into σ = 0. 2n-1 evaluations."""
    n = len(plan)
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0 = denoiser.ve(x, plan.timesteps[i].item(), sigma)
        d = (x - x0) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0 or i == n - 1:
            x = x_euler
        else:
            x0_next = denoiser.ve(x_euler, plan.timesteps[i + 1].item(), sigma_next)
            d_next = (x_euler - x0_next) / sigma_next
            x = x + (d + d_next) / 2 * (sigma_next - sigma)  # Karras et al. 2022, Algorithm 1, line 8
        x = denoiser.after_step(callback, i, n, x, x0)
    return x
