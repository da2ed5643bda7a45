"""Ancestral DDPM and DDIM, in the VP view x_t, following their papers' equations.

Symbols: ᾱ_t at the current step, ᾱ_prev at the next (less noisy) one; with skipped steps the one-step
β becomes β_t = 1 - ᾱ_t/ᾱ_prev (DDIM sec. 4.2, "respaced" DDPM).
"""

from __future__ import annotations

import torch

from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.timesteps import SamplingPlan

DDPM_VARIANCES = ("fixed_small", "fixed_large")
DDPM_MIN_VARIANCE = 1e-20  # clamp on β̃ so its square root stays finite (as diffusers does)


def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None,
                variance: str = "fixed_small") -> torch.Tensor:
    """Ancestral sampling with p(x_prev | x_t) = N(μ̃(x_t, x̂_0), σ²I) (Ho et al. 2020, Algorithm 2).

    variance "fixed_small": σ² = β̃_t = (1-ᾱ_prev)/(1-ᾱ_t) β_t (DDPM eq. 7, the true posterior's);
             "fixed_large": σ² = β_t (DDPM sec. 3.2). No noise is added on the last step (Algorithm 2, z = 0).
    """
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}; allowed: {', '.join(DDPM_VARIANCES)}")
    n = len(plan)
    for i in range(n):
        t, alpha_bar, alpha_bar_prev = plan.timesteps[i].item(), plan.alpha_bar[i].item(), plan.alpha_bar[i + 1].item()
        x0, _ = denoiser.vp(x, t, alpha_bar)
        beta = 1 - alpha_bar / alpha_bar_prev
        # posterior mean μ̃ (DDPM eq. 7)
        x0_coef = alpha_bar_prev**0.5 * beta / (1 - alpha_bar)
        xt_coef = (1 - beta) ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)
        x_next = x0_coef * x0 + xt_coef * x
        if i < n - 1:
            posterior_variance = max((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, DDPM_MIN_VARIANCE)
            var = posterior_variance if variance == "fixed_small" else beta
            x_next = x_next + var**0.5 * noise(x, plan.sigmas[i].item(), plan.sigmas[i + 1].item())
        x_next = denoiser.after_step(callback, i, n, x_next, x0)
        x = x_next
    return x


def sample_ddim(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None,
                eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12):
        x_prev = √ᾱ_prev x̂_0 + √(1 - ᾱ_prev - σ_t²) ε̂ + σ_t z,
        σ_t = η √((1-ᾱ_prev)/(1-ᾱ_t)) √(1 - ᾱ_t/ᾱ_prev)                          (DDIM eq. 16)
    η = 0 is deterministic; η = 1 is ancestral DDPM with the fixed-small variance.
    """
    n = len(plan)
    for i in range(n):
        t, alpha_bar, alpha_bar_prev = plan.timesteps[i].item(), plan.alpha_bar[i].item(), plan.alpha_bar[i + 1].item()
        x0, eps = denoiser.vp(x, t, alpha_bar)
        sigma_t = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)) ** 0.5
        x_next = alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev - sigma_t**2) ** 0.5 * eps
        if sigma_t > 0:
            x_next = x_next + sigma_t * noise(x, plan.sigmas[i].item(), plan.sigmas[i + 1].item())
        x_next = denoiser.after_step(callback, i, n, x_next, x0)
        x = x_next
    return x
