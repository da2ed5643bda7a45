"""SA-Solver: ComfyUI's "sa_solver" and "sa_solver_pece" (comfy/k_diffusion/sampling.py, sample_sa_solver;
comfy/k_diffusion/sa_solver.py), the stochastic Adams predictor-corrector of Xue et al. 2023 ("SA-Solver: Stochastic
Adams solver for fast sampling of diffusion models", NeurIPS 2023) in data prediction.

Symbols: the VE state x = x_0 + σ ε (every VP α is 1 in this view), λ = -log σ, τ the stochasticity of a step
(τ = 0: the probability-flow ODE). Over [λ_s, λ_t] (h = λ_t - λ_s) the data-prediction SDE with noise τ has the
exact solution

    x_t = (σ_t/σ_s) e^{-τ² h} x_s + ∫ (1+τ²) e^{(1+τ²)(λ - λ_t)} x̂_0(λ) dλ + σ_t √(1 - e^{-2τ²h}) z,

and the stochastic Adams methods put the Lagrange polynomial through the last K evaluations of x̂_0 (at λ_{j}) in
the integral, so that the step weights are b_j = (1+τ²) ∫_{λ_s}^{λ_t} e^{(1+τ²)(λ - λ_t)} ℓ_j(λ) dλ (the paper's
eqs. 15 and 18; `stochastic_adams_weights`). Step i, from the evaluation x̂_0^{(i)} = D(x̃_i; σ_i) at the predicted
state x̃_i:

    corrector (i > 0, K_c = min(4, i + 1) nodes λ_{i-K_c+1..i}, over [λ_{i-1}, λ_i], with the previous step's τ):
        x_i = (σ_i/σ_{i-1}) e^{-τ² h} x_{i-1} + Σ b_j x̂_0^{(j)} + (the predictor's noise, the same draw)
        PECE ("sa_solver_pece"): x̂_0^{(i)} is then re-evaluated at x_i and replaces the predictor's
    predictor (K_p = min(3, i + 1) nodes λ_{i-K_p+1..i}, over [λ_i, λ_{i+1}], τ = τ(σ_{i+1})):
        x̃_{i+1} = (σ_{i+1}/σ_i) e^{-τ² h} x_i + Σ b_j x̂_0^{(j)} + σ_{i+1} √(1 - e^{-2τ²h}) s_noise z

As ComfyUI runs it (KSampler's defaults): predictor order 3, corrector order 4, τ(σ) = 1 where σ lies in
[σ(t = 0.2·999), σ(t = 0.8·999)] (ModelSamplingDiscrete.percent_to_sigma(0.8) and (0.2), the model's σ table
interpolated in log σ: `sa_solver_noise_interval`) and 0 elsewhere; with a final σ = 0 the orders drop towards the
end (K_p at most n - 1 - i, K_c at most n - i) and the last step has no corrector unless PECE; into σ = 0 the
predictor returns x̂_0. A step reports x̂_0 at x̃_i (before PECE's re-evaluation, as ComfyUI's callback) and the
state x̃_{i+1}, the next step's model input (a replacement the callback returns replaces it).
n model evaluations (sa_solver), 2n - 1 (sa_solver_pece); one noise draw, σ_i -> σ_{i+1}, per stochastic predictor.
ComfyUI's simple_order_2 variant (off by default) is not written here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.samplers.noise import NoiseSampler
from kedavra.diffusion.sigmas import SigmaTable
from kedavra.diffusion.timesteps import SamplingPlan
from kedavra.validation import check_int

SA_PREDICTOR_ORDER = 3  # ComfyUI's sample_sa_solver defaults
SA_CORRECTOR_ORDER = 4
SA_TAU = 1.0  # τ inside the noise interval (ComfyUI's get_tau_interval_func, eta = 1)
# ComfyUI's default interval: from percent_to_sigma(0.2) down to percent_to_sigma(0.8), σ at t = (1 - p)·999
SA_NOISE_PERCENTS = (0.2, 0.8)
COMFYUI_LAST_TIMESTEP = 999.0  # percent_to_sigma's scale


def sa_solver_noise_interval(table: SigmaTable) -> tuple[float, float]:
    """(σ_low, σ_high): ComfyUI's default stochastic interval for the model's σ table, σ at timesteps 0.2·999 and
    0.8·999 interpolated in log σ (percent_to_sigma(0.8), percent_to_sigma(0.2))."""
    start, end = SA_NOISE_PERCENTS
    return (table.t_to_sigma((1.0 - end) * COMFYUI_LAST_TIMESTEP).item(),
            table.t_to_sigma((1.0 - start) * COMFYUI_LAST_TIMESTEP).item())


def sa_solver_options(table: SigmaTable) -> dict:
    """The options a run takes from the model's σ table (k_diffusion.KSamplerSpec.table_options)."""
    return {"noise_interval": sa_solver_noise_interval(table)}


def _exponential_moments(h: float, tau: float, count: int) -> list[float]:
    """I_p = (1+τ²) ∫_{-h}^{0} e^{(1+τ²) u} u^p du for p < count, by parts: I_0 = 1 - e^{-(1+τ²)h},
    I_p = -e^{-(1+τ²)h} (-h)^p - (p/(1+τ²)) I_{p-1}."""
    c = 1 + tau**2
    decay = math.exp(-c * h)
    moments = [-math.expm1(-c * h)]
    for p in range(1, count):
        moments.append(-decay * (-h) ** p - p / c * moments[-1])
    return moments


def stochastic_adams_weights(nodes: list[float], lambda_s: float, lambda_t: float, tau: float) -> list[float]:
    """b_j = (1+τ²) ∫_{λ_s}^{λ_t} e^{(1+τ²)(λ - λ_t)} ℓ_j(λ) dλ, ℓ_j the Lagrange basis polynomial through the
    nodes λ_j (oldest first) that is 1 at λ_j; in u = λ - λ_t, ℓ_j's power coefficients against the moments I_p."""
    moments = _exponential_moments(lambda_t - lambda_s, tau, len(nodes))
    shifted = [node - lambda_t for node in nodes]
    weights = []
    for j, node in enumerate(shifted):
        others = shifted[:j] + shifted[j + 1:]
        scale = math.prod(node - other for other in others)
        coefficients = np.polynomial.polynomial.polyfromroots(others) / scale if others else np.ones(1)
        weights.append(float(sum(a * moment for a, moment in zip(coefficients, moments, strict=True))))
    return weights


def _combine(weights: list[float], x0s: list[torch.Tensor]) -> torch.Tensor:
    """Σ_j b_j x̂_0^{(j)} over the last len(weights) evaluations, oldest first."""
    return sum(w * x0 for w, x0 in zip(weights, x0s[-len(weights):], strict=True))


def sample_sa_solver(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise: NoiseSampler = None,
                     callback=None, noise_interval: tuple[float, float] = (0.0, math.inf), tau: float = SA_TAU,
                     s_noise: float = 1.0, predictor_order: int = SA_PREDICTOR_ORDER,
                     corrector_order: int = SA_CORRECTOR_ORDER, pece: bool = False):
    """SA-Solver (module docstring): τ = tau at the steps into σ_{i+1} within noise_interval (σ_low, σ_high), 0 at
    the others; pece: re-evaluate the model at each corrected state (sa_solver_pece)."""
    predictor_order = check_int("predictor_order", predictor_order, 1)
    corrector_order = check_int("corrector_order", corrector_order, 1)
    n = len(plan)
    sigmas = plan.sigmas.tolist()
    lambdas = [-math.log(s) if s > 0 else math.inf for s in sigmas]
    low, high = noise_interval
    lower_order_to_end = sigmas[-1] == 0
    x0s: list[torch.Tensor] = []  # the last max(orders) evaluations, oldest first
    x_pred = x
    tau_step, h, sde_noise = 0.0, 0.0, None  # the last predictor's τ, step and noise
    for i in range(n):
        x0 = x0_reported = denoiser.ve(x_pred, plan.timesteps[i].item(), sigmas[i])
        x0s = (x0s + [x0])[-max(predictor_order, corrector_order):]
        k_p = min(predictor_order, len(x0s))
        k_c = 0 if i == 0 or (sigmas[i + 1] == 0 and not pece) else min(corrector_order, len(x0s))
        if lower_order_to_end:
            k_p, k_c = min(k_p, n - 1 - i), min(k_c, n - i)
        if k_c == 0:
            x = x_pred
        else:
            weights = stochastic_adams_weights(lambdas[i - k_c + 1:i + 1], lambdas[i - 1], lambdas[i], tau_step)
            x = (sigmas[i] / sigmas[i - 1] * math.exp(-tau_step**2 * h)) * x + _combine(weights, x0s)
            if sde_noise is not None:
                x = x + sde_noise
            if pece:
                x0 = denoiser.ve(x, plan.timesteps[i].item(), sigmas[i])
                x0s[-1] = x0
        if sigmas[i + 1] == 0:
            x_pred = x0
        else:
            tau_step = tau if low <= sigmas[i + 1] <= high else 0.0
            h = lambdas[i + 1] - lambdas[i]
            weights = stochastic_adams_weights(lambdas[i - k_p + 1:i + 1], lambdas[i], lambdas[i + 1], tau_step)
            x_pred = (sigmas[i + 1] / sigmas[i] * math.exp(-tau_step**2 * h)) * x + _combine(weights, x0s)
            sde_noise = None
            if tau_step > 0 and s_noise > 0:
                std = sigmas[i + 1] * math.sqrt(-math.expm1(-2 * tau_step**2 * h)) * s_noise
                sde_noise = noise(x, sigmas[i], sigmas[i + 1]) * std
                x_pred = x_pred + sde_noise
        x_pred = denoiser.after_step(callback, i, n, x_pred, x0_reported)  # x̂_0 at x̃_i, as ComfyUI reports it
    return x_pred
