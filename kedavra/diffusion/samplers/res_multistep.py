"""RES multistep: ComfyUI's "res_multistep" and "res_multistep_ancestral" (comfy/k_diffusion/sampling.py,
res_multistep), the second-order exponential integrator of Zhang et al. 2023 ("Improved order analysis and design of
exponential integrator for diffusion models sampling", arXiv 2308.02157, RES) run as a multistep method.

Symbols: the VE state x = x_0 + σ ε, x̂_0 = D(x; σ), λ = -log σ (the half log-SNR, as in dpm_solver.py). Step i
goes from σ_i to σ_down (`ancestral_step_sigmas`: σ_{i+1} itself at η = 0), then adds noise of std σ_up. With
h = λ(σ_down) - λ_i and the data-prediction ODE solved exactly for x̂_0 varying along a line in λ:

    x ← e^{-h} x + h (b_1 x̂_0^{(i)} + b_2 x̂_0^{(i-1)}),   b_2 = φ_2(-h)/c_2,   b_1 = φ_1(-h) - b_2,
    φ_1(z) = (e^z - 1)/z,   φ_2(z) = (φ_1(z) - 1)/z,   c_2 = (λ_{i-1} - λ(σ_down^{(i-1)}))/h:

the 2-stage exponential Runge–Kutta tableau whose order conditions RES states (b_1 + b_2 = φ_1, c_2 b_2 = φ_2), with
the second stage replaced by the previous step's x̂_0, placed at c_2 h from λ_i, c_2 h being minus the previous
step's length before its noise. At η = 0 that is where x̂_0^{(i-1)} was evaluated, λ_{i-1} - λ_i (c_2 = -h_{i-1}/h);
with noise it is not (the noise moved the state from σ_down^{(i-1)} back up to σ_i): ComfyUI's choice, kept. With
b_2 = 0 the step is DPM-Solver++(1) (DDIM): e^{-h} x + (1 - e^{-h}) x̂_0. The first step (no history) and a step into
σ_down = 0 are Euler steps in σ. One model evaluation per step (n).

ComfyUI's sample_res_multistep is η = 0 (deterministic: its noise, drawn and multiplied by σ_up = 0, is not drawn
here), sample_res_multistep_ancestral η = 1; both s_noise = 1. Where ComfyUI's coefficients are 0/0 (a zero-length
step, h = 0) it zeroes them, leaving x: so does this module; a previous zero-length step (c_2 = 0), where ComfyUI's
b_2 overflows, gives a first-order step here.
"""

from __future__ import annotations

import math

import torch

from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.samplers.euler import ancestral_step_sigmas
from kedavra.diffusion.samplers.noise import NoiseSampler
from kedavra.diffusion.timesteps import SamplingPlan


def phi_1(z: float) -> float:
    """φ_1(z) = (e^z - 1)/z."""
    return math.expm1(z) / z


def phi_2(z: float) -> float:
    """φ_2(z) = (φ_1(z) - 1)/z."""
    return (phi_1(z) - 1) / z


def res_weights(h: float, c2: float) -> tuple[float, float]:
    """(b_1, b_2) of the RES step of length h whose second node lies at c_2 h (module docstring)."""
    b2 = phi_2(-h) / c2
    return phi_1(-h) - b2, b2


def sample_res_multistep(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise: NoiseSampler = None,
                         callback=None, eta: float = 0.0, s_noise: float = 1.0):
    """RES multistep (module docstring): η = 0 ComfyUI's res_multistep, η = 1 res_multistep_ancestral (noise of std
    σ_up s_noise after each step into σ_{i+1} > 0, from `noise`)."""
    n = len(plan)
    x0_prev, sigma_down_prev = None, None
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0 = denoiser.ve(x, plan.timesteps[i].item(), sigma)
        sigma_down, sigma_up = ancestral_step_sigmas(sigma, sigma_next, eta)
        h = math.log(sigma) - math.log(sigma_down) if sigma_down > 0 else math.inf
        c2 = None
        if x0_prev is not None and 0 < h < math.inf:
            c2 = (math.log(sigma_down_prev) - math.log(plan.sigmas[i - 1].item())) / h
        if not c2:  # Euler in σ (the first step, into σ_down = 0, or a first-order step: module docstring)
            x_next = x + (x - x0) / sigma * (sigma_down - sigma)
        else:
            b1, b2 = res_weights(h, c2)
            x_next = (sigma_down / sigma) * x + h * (b1 * x0 + b2 * x0_prev)  # e^{-h} = σ_down/σ
        if sigma_next > 0 and eta:
            x_next = x_next + noise(x, sigma, sigma_next) * (s_noise * sigma_up)
        x = denoiser.after_step(callback, i, n, x_next, x0)
        x0_prev, sigma_down_prev = x0, sigma_down
    return x
