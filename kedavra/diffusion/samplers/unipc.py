"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), order 2, B(h) = e^h - 1
("bh2"), data prediction, in the VP view; the variant A1111, ComfyUI and diffusers run for Stable Diffusion.

Each step: correct the current sample with the model output just computed (UniC, the paper's Alg. 1),
then predict the next one (UniP, Alg. 2). Symbols as in dpm_solver.py: a = √ᾱ, s = √(1-ᾱ), λ = log(a/s), and
h = λ_{i+1} - λ_i the step in λ. In data prediction the update is written with ĥ = -h and
B(h) = φ_1(ĥ) = e^{ĥ} - 1 (the paper's "bh2" choice of B, sec. 3.3):

    order-1 predictor (= DPM-Solver++ first order):  x_{i+1} = (s_{i+1}/s_i) x_i - a_{i+1} φ_1 x̂_0^{(i)}
    order-2 predictor:  subtract a_{i+1} φ_1 · ½ D_1 / r,   D_1 = x̂_0^{(i-1)} - x̂_0^{(i)},  r = (λ_{i-1} - λ_i)/h
    corrector (UniC):   the same update from x_{i-1}, with ρ-weighted differences that include the new x̂_0^{(i)},
                        ρ solving [[1, 1], [r, 1]] ρ = [b_1, b_2],
                        b_1 = (φ_1/ĥ - 1)/B(h),  b_2 = 2((φ_1/ĥ - 1)/ĥ - ½)/B(h)   (the paper's eq. 10, Thm. 3.1).
"""

from __future__ import annotations

import math

import torch

from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.samplers.dpm_solver import vp_scales
from kedavra.diffusion.timesteps import SamplingPlan

PREDICTOR_D1_WEIGHT = 0.5  # the order-2 predictor's fixed weight on D_1 (the paper's ρ for UniP-2 with bh2)


def _corrector_weights(h: float, r: float | None) -> tuple[float, float]:
    """(ρ of the previous difference D_1, ρ of the new output's difference) for UniC (module docstring).

    With ĥ = -h: b_1 = (φ_1/ĥ - 1)/B(h), b_2 = 2((φ_1/ĥ - 1)/ĥ - 1/2)/B(h), φ_1 = B(h) = e^{ĥ} - 1 (UniPC,
    Zhao et al. 2023, eq. 10 and Thm. 3.1); ρ solves [[1, 1], [r, 1]] ρ = [b_1, b_2], or is (0, 1/2) at order 1.
    """
    if r is None:
        return 0.0, 0.5
    hh = -h
    phi1 = math.expm1(hh)
    b1 = (phi1 / hh - 1) / phi1
    b2 = 2 * ((phi1 / hh - 1) / hh - 0.5) / phi1
    rho1 = (b1 - b2) / (1 - r)  # [[1, 1], [r, 1]] [ρ_1, ρ_2] = [b_1, b_2]
    return rho1, b1 - rho1


def _lam(plan: SamplingPlan, i: int) -> float:
    return vp_scales(plan.sigmas[i].item())[2]


def sample_unipc(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None):
    """UniPC-2 (bh2): n model evaluations; the last step is first order and uncorrected."""
    n = len(plan)
    x0s: list[torch.Tensor] = []  # data predictions at the levels visited so far
    x_before, order_before = None, 0  # the sample the previous predictor started from, and its order
    for i in range(n):
        x0 = denoiser.vp(x, plan.timesteps[i].item(), 1 / (1 + plan.sigmas[i].item() ** 2))[0]
        if x_before is not None:  # UniC: correct x_i using x̂_0 at x_i
            a, s, lam = vp_scales(plan.sigmas[i].item())
            _, s_prev, lam_prev = vp_scales(plan.sigmas[i - 1].item())
            h = lam - lam_prev
            m0 = x0s[-1]
            r = (_lam(plan, i - 2) - lam_prev) / h if order_before == 2 else None
            phi1 = math.expm1(-h)
            rho_d1, rho_new = _corrector_weights(h, r)
            correction = rho_new * (x0 - m0)
            if r is not None:
                correction = correction + rho_d1 * (x0s[-2] - m0) / r
            x = (s / s_prev) * x_before - a * phi1 * m0 - a * phi1 * correction
        x0s = (x0s + [x0])[-2:]
        order = min(2, n - i, len(x0s))  # warm-up and lower order at the final step
        a_next, s_next, lam_next = vp_scales(plan.sigmas[i + 1].item())
        _, s, lam = vp_scales(plan.sigmas[i].item())
        h = lam_next - lam
        phi1 = math.expm1(-h)
        x_next = (s_next / s) * x - a_next * phi1 * x0  # UniP, order 1 (= DPM-Solver++ first order)
        if order == 2:
            r = (_lam(plan, i - 1) - lam) / h
            x_next = x_next - a_next * phi1 * PREDICTOR_D1_WEIGHT * (x0s[-2] - x0) / r
        x_next = denoiser.after_step(callback, i, n, x_next, x0)
        x_before, order_before, x = x, order, x_next
    return x
