"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling"), in the VP view.

Symbols at noise level σ (VE): a = √ᾱ = 1/√(1+σ²) and s = √(1-ᾱ) = σ a are the VP signal and noise
scales (the paper's α_t and σ_t); λ = log(a/s) = -log σ is the half log-SNR; a step from level i to i+1
has h = λ_{i+1} - λ_i > 0. The solvers integrate the ODE in data prediction x̂_0 ("++").
"""

from __future__ import annotations

import math

import torch

from kedavra.diffusion.forward_process import randn_like
from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.timesteps import SamplingPlan


def vp_scales(sigma: float) -> tuple[float, float, float]:
    """(a, s, λ) = (√ᾱ, √(1-ᾱ), log(a/s)) at VE level σ; λ = +inf at σ = 0."""
    a = 1 / math.sqrt(1 + sigma**2)
    s = sigma * a
    return a, s, (math.inf if sigma == 0 else -math.log(sigma))


def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, generator=None, callback=None,
                    stochastic: bool = False):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), or with `stochastic` its SDE variant (2M SDE, sec. 5
    and appendix of the same paper; the "DPM++ 2M SDE" of A1111/diffusers' "sde-dpmsolver++").

    First order (DDIM in data prediction, eq. 9 of the paper): x_{i+1} = (s_{i+1}/s_i) x_i - a_{i+1}(e^{-h}-1) x̂_0.
    Second order uses the midpoint difference D = x̂_0^{(i)} + (1/(2r)) (x̂_0^{(i)} - x̂_0^{(i-1)}),
    r = h_{i-1}/h_i. The first step has no history and the last step is first order: with σ_n = 0 it
    returns x̂_0 itself (the "final step" of DPM-Solver++; diffusers' lower_order_final).
    SDE: x_{i+1} = (s_{i+1}/s_i) e^{-h} x_i + a_{i+1}(1 - e^{-2h}) D + s_{i+1} √(1-e^{-2h}) z.
    """
    n = len(plan)
    x0_prev, h_prev = None, None
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0 = denoiser.vp(x, plan.timesteps[i].item(), 1 / (1 + sigma**2))[0]
        a, s, lam = vp_scales(sigma)
        a_next, s_next, lam_next = vp_scales(sigma_next)
        h = lam_next - lam
        first_order = x0_prev is None or i == n - 1
        D = x0 if first_order else x0 + (x0 - x0_prev) * (h / h_prev) / 2  # 1/(2r) with r = h_prev/h
        if stochastic:
            noise = randn_like(x, generator)
            x_next = (s_next / s * math.exp(-h)) * x + a_next * (-math.expm1(-2 * h)) * D
            x_next = x_next + s_next * math.sqrt(-math.expm1(-2 * h)) * noise
        else:
            x_next = (s_next / s) * x - a_next * math.expm1(-h) * D
        x_next = denoiser.after_step(callback, i, n, x_next, x0)
        x, x0_prev, h_prev = x_next, x0, h
    return x


def sample_dpmpp_2m_sde(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, generator=None, callback=None):
    """DPM-Solver++(2M) SDE: see `sample_dpmpp_2m`."""
    return sample_dpmpp_2m(denoiser, x, plan, generator, callback, stochastic=True)
