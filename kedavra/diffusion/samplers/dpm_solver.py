"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"):
2M, 2M SDE, 3M SDE, 2S ancestral and SDE, in the σ-space form of k-diffusion that A1111 and ComfyUI run.

Symbols: λ = -log σ is the half log-SNR (the paper's λ_t = log(α_t/σ_t) with VP α = 1/√(1+σ²), σ_VP = σ α), a step
from level i to i+1 has h = λ_{i+1} - λ_i > 0, and x is the VE state x_0 + σ ε. In data prediction ("++") the
first-order step is DDIM's: x_{i+1} = (σ_{i+1}/σ_i) x_i - (e^{-h} - 1) x̂_0 (the paper's eq. 9 divided by α_{i+1}).
Into σ = 0 every solver returns x̂_0 itself.
"""

from __future__ import annotations

import math

import torch

from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.samplers.euler import ancestral_step_sigmas
from kedavra.diffusion.samplers.noise import NoiseSampler
from kedavra.diffusion.timesteps import SamplingPlan

SDE_SOLVER_TYPES = ("midpoint", "heun")  # how DPM++ 2M SDE weights its second-order difference (k-diffusion)


def vp_scales(sigma: float) -> tuple[float, float, float]:
    """(a, s, λ) = (√ᾱ, √(1-ᾱ), log(a/s)) at VE level σ; λ = +inf at σ = 0."""
    a = 1 / math.sqrt(1 + sigma**2)
    s = sigma * a
    return a, s, (math.inf if sigma == 0 else -math.log(sigma))


def _first_order(x, x0, sigma: float, sigma_next: float, h: float):
    """DPM-Solver++(1) = DDIM in data prediction: (σ_next/σ) x - (e^{-h} - 1) x̂_0."""
    return (sigma_next / sigma) * x - math.expm1(-h) * x0


def _sde_noise(noise: NoiseSampler, x, sigma: float, sigma_next: float, eta_h: float, s_noise: float):
    """The fresh noise of a DPM-Solver++ SDE step: σ_{i+1} √(1 - e^{-2ηh}) s_noise z (Lu et al. 2022, sec. 5)."""
    return noise(x, sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)


def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None,
                    lower_order_final: bool = True):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): the midpoint difference
    D = x̂_0^{(i)} + (1/(2r)) (x̂_0^{(i)} - x̂_0^{(i-1)}), r = h_{i-1}/h_i, in the first-order step. The first step
    has no history and is first order, and so is the last one with `lower_order_final` (diffusers'; k-diffusion and
    so A1111 / ComfyUI only drop to first order into σ = 0)."""
    n = len(plan)
    x0_prev, h_prev = None, None
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0 = denoiser.ve(x, plan.timesteps[i].item(), sigma)
        if sigma_next == 0:
            x_next, h = x0, math.inf
        else:
            h = math.log(sigma) - math.log(sigma_next)
            first = x0_prev is None or (lower_order_final and i == n - 1)
            D = x0 if first else x0 + (x0 - x0_prev) * (h / h_prev) / 2  # 1/(2r) with r = h_prev/h
            x_next = _first_order(x, D, sigma, sigma_next, h)
        x = denoiser.after_step(callback, i, n, x_next, x0)
        x0_prev, h_prev = x0, h
    return x


def sample_dpmpp_2m_sde(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise: NoiseSampler = None,
                        callback=None, eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint"):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, sec. 5 and appendix; k-diffusion's sample_dpmpp_2m_sde, diffusers'
    "sde-dpmsolver++" at η = 1):
        x_{i+1} = (σ_{i+1}/σ_i) e^{-ηh} x_i + (1 - e^{-(1+η)h}) x̂_0 + c (1/r) (x̂_0 - x̂_0^{prev})
                  + σ_{i+1} √(1 - e^{-2ηh}) s_noise z,
    c = ½ (1 - e^{-(1+η)h}) ("midpoint") or (1 - e^{-(1+η)h})/(-(1+η)h) + 1 ("heun"); z from `noise`."""
    if solver_type not in SDE_SOLVER_TYPES:
        raise ValueError(f"unknown DPM++ 2M SDE solver_type {solver_type!r}; allowed: {', '.join(SDE_SOLVER_TYPES)}")
    n = len(plan)
    x0_prev, h_prev = None, None
    h = None
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0 = denoiser.ve(x, plan.timesteps[i].item(), sigma)
        if sigma_next == 0:
            x_next = x0
        else:
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)
            x_next = (sigma_next / sigma * math.exp(-eta_h)) * x + phi * x0
            if x0_prev is not None:
                r = h_prev / h
                c = phi / 2 if solver_type == "midpoint" else phi / (-h - eta_h) + 1
                x_next = x_next + (c / r) * (x0 - x0_prev)
            if eta:
                x_next = x_next + _sde_noise(noise, x, sigma, sigma_next, eta * h, s_noise)
        x = denoiser.after_step(callback, i, n, x_next, x0)
        x0_prev, h_prev = x0, h
    return x


def sample_dpmpp_3m_sde(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise: NoiseSampler = None,
                        callback=None, eta: float = 1.0, s_noise: float = 1.0):
    """DPM-Solver++(3M) SDE (k-diffusion's sample_dpmpp_3m_sde): the multistep update with the first and second
    divided differences of the last three x̂_0 (orders 1, 2, 3 as history allows), with h_η = (1+η)h,
        x_{i+1} = e^{-h_η} x_i + (1 - e^{-h_η}) x̂_0 + φ_2 d_1 - φ_3 d_2 + σ_{i+1} √(1 - e^{-2ηh}) s_noise z,
        φ_2 = (e^{-h_η} - 1)/h_η + 1,  φ_3 = φ_2/h_η - 1/2."""
    n = len(plan)
    x0_1 = x0_2 = None
    h_1 = h_2 = None
    h = None
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0 = denoiser.ve(x, plan.timesteps[i].item(), sigma)
        if sigma_next == 0:
            x_next = x0
        else:
            h = math.log(sigma) - math.log(sigma_next)
            h_eta = h * (eta + 1)
            x_next = math.exp(-h_eta) * x - math.expm1(-h_eta) * x0
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x_next = x_next + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x_next = x_next + phi_2 * ((x0 - x0_1) / (h_1 / h))
            if eta:
                x_next = x_next + _sde_noise(noise, x, sigma, sigma_next, eta * h, s_noise)
        x = denoiser.after_step(callback, i, n, x_next, x0)
        x0_1, x0_2 = x0, x0_1
        h_1, h_2 = h, h_1
    return x


def sample_dpmpp_2s_ancestral(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise: NoiseSampler = None,
                              callback=None, eta: float = 1.0, s_noise: float = 1.0):
    """DPM-Solver++(2S) ancestral ("DPM++ 2S a"): a single-step second-order move to σ_down (an intermediate
    evaluation at λ halfway), then noise of std σ_up (Lu et al. 2022, Algorithm 1 with r = 1/2; k-diffusion)."""
    n = len(plan)
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0 = denoiser.ve(x, plan.timesteps[i].item(), sigma)
        sigma_down, sigma_up = ancestral_step_sigmas(sigma, sigma_next, eta)
        if sigma_down == 0:
            x_next = x + (x - x0) / sigma * (sigma_down - sigma)
        else:
            h = math.log(sigma) - math.log(sigma_down)
            sigma_s = math.exp(-(-math.log(sigma) + h / 2))
            x_s = _first_order(x, x0, sigma, sigma_s, h / 2)
            x0_s = denoiser.ve(x_s, plan.t_at(sigma_s), sigma_s)
            x_next = _first_order(x, x0_s, sigma, sigma_down, h)
        if sigma_next > 0:
            x_next = x_next + noise(x, sigma, sigma_next) * (s_noise * sigma_up)
        x = denoiser.after_step(callback, i, n, x_next, x0)
    return x


def sample_dpmpp_sde(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise: NoiseSampler = None,
                     callback=None, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5):
    """DPM-Solver++ SDE ("DPM++ SDE", k-diffusion's sample_dpmpp_sde): per step, an ancestral first-order move to the
    intermediate level λ + r h with fresh noise, a second evaluation there, and an ancestral move to σ_{i+1} with
    D = (1 - 1/(2r)) x̂_0 + (1/(2r)) x̂_0^{(s)}; Euler into σ = 0. Two noise draws per step (a Brownian tree's
    increments σ_i -> σ_s and σ_i -> σ_{i+1} in A1111 and ComfyUI)."""
    n = len(plan)
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0 = denoiser.ve(x, plan.timesteps[i].item(), sigma)
        if sigma_next == 0:
            x_next = x + (x - x0) / sigma * (sigma_next - sigma)
        else:
            lam, lam_next = -math.log(sigma), -math.log(sigma_next)
            h = lam_next - lam
            sigma_s = math.exp(-(lam + h * r))
            fac = 1 / (2 * r)
            sd, su = ancestral_step_sigmas(sigma, sigma_s, eta)  # step 1: to the intermediate level
            x_s = (sd / sigma) * x - math.expm1(lam + math.log(sd)) * x0
            x_s = x_s + noise(x, sigma, sigma_s) * (s_noise * su)
            x0_s = denoiser.ve(x_s, plan.t_at(sigma_s), sigma_s)
            sd, su = ancestral_step_sigmas(sigma, sigma_next, eta)  # step 2: to σ_{i+1}
            D = (1 - fac) * x0 + fac * x0_s
            x_next = (sd / sigma) * x - math.expm1(lam + math.log(sd)) * D
            x_next = x_next + noise(x, sigma, sigma_next) * (s_noise * su)
        x = denoiser.after_step(callback, i, n, x_next, x0)
    return x
