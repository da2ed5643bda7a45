"""SEEDS: ComfyUI's "seeds_2" and "seeds_3" (comfy/k_diffusion/sampling.py, sample_seeds_2, sample_seeds_3),
Gonzalez et al. 2023 ("SEEDS: Exponential SDE solvers for fast high-quality sampling from diffusion models", NeurIPS
2023), the stochastic explicit exponential derivative-free solvers of stage 2 and 3 in data prediction (VP), and
ComfyUI's "exp_heun_2_x0" / "exp_heun_2_x0_sde", SEEDS-2's scheme with r = 1 and φ_2 weights.

Symbols as in dpm_solver.py: the VE state x = x_0 + σ ε (every VP α is 1 in this view), λ = -log σ, a step
σ_i -> σ_{i+1} of h = λ_{i+1} - λ_i > 0, η the stochasticity (h_η = (1 + η) h), and the exponential-integrator
functions h φ_1(h) = e^h - 1, h φ_2(h) = (e^h - 1 - h)/h at -h_η. The exact solution of the data-prediction SDE
(Gonzalez et al., their VP data-prediction SDE; Lu et al. 2022 sec. 5 for η) from λ_i to λ_i + c h with x̂_0
frozen is

    E(c, x̂) = (σ(λ_i + c h)/σ_i) e^{-c h η} x - (e^{-c h_η} - 1) x̂ + σ(λ_i + c h) s_noise ξ_c,

ξ_c a standard normal of the Brownian path, built incrementally over the stages: ξ_c = ξ_{c'} e^{(c' - c) h η} +
√(1 - e^{2(c' - c) h η}) z for the previous node c' < c and a fresh draw z (σ(λ) = e^{-λ}). The solvers replace x̂
by combinations of evaluations at intermediate nodes:

    SEEDS-2 (nodes 0, r):       x_r = E(r, x̂_0), x̂_r = D(x_r; σ(λ_i + r h)), then
                                "phi_1": x ← E(1, x̂_0 + (x̂_r - x̂_0)/(2r))
                                "phi_2": x ← E(1, ·) with weights b_2 = hφ_2(-h_η)/r on x̂_r, hφ_1(-h_η) - b_2 on x̂_0
    SEEDS-3 (nodes 0, r_1, r_2): x_1 = E(r_1, x̂_0); x_2 = E(r_2, ·) with weights a_2 = (r_2/r_1) hφ_2(-r_2 h_η) on
                                x̂_1, hφ_1(-r_2 h_η) - a_2 on x̂_0; x ← E(1, ·) with b_2 = hφ_2(-h_η)/r_2 on x̂_2,
                                hφ_1(-h_η) - b_2 on x̂_0

(a weighted E(c, ·) means the term -(e^{-c h_η} - 1) x̂ replaced by -Σ w_k x̂_k). ComfyUI's defaults: η = 1,
s_noise = 1, SEEDS-2 r = 1/2 with "phi_1" (so x̂_0's weight is 0: the midpoint's x̂ alone), SEEDS-3 r_1 = 1/3,
r_2 = 2/3; exp_heun_2_x0 is SEEDS-2 with r = 1, "phi_2" and η = 0 (Heun's method in λ, exponential form), and
exp_heun_2_x0_sde the same with η = 1. Into σ = 0 a step returns x̂_0. Per step 2 (SEEDS-2) or 3 (SEEDS-3) model
evaluations, and with η > 0 and s_noise > 0 as many noise draws from `noise`, over σ_i -> σ(node 1) -> ... -> σ_{i+1}.
"""

from __future__ import annotations

import math

import torch

from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.samplers.noise import NoiseSampler
from kedavra.diffusion.timesteps import SamplingPlan
from kedavra.validation import check_choice

SEEDS_2_SOLVER_TYPES = ("phi_1", "phi_2")


def h_phi_1(z: float) -> float:
    """z φ_1(z) = e^z - 1."""
    return math.expm1(z)


def h_phi_2(z: float) -> float:
    """z φ_2(z) = (e^z - 1 - z)/z."""
    return (math.expm1(z) - z) / z


class _SdeStages:
    """The stages of one SEEDS step from σ_i (module docstring): `move(c, x̂ terms)` is E(c, ·) from the step's start,
    with the noise ξ_c continued from the last node moved to."""

    def __init__(self, x: torch.Tensor, sigma: float, sigma_next: float, eta: float, s_noise: float,
                 noise: NoiseSampler):
        self.x, self.sigma, self.eta, self.s_noise, self.noise = x, sigma, eta, s_noise, noise
        self.lam, self.h = -math.log(sigma), math.log(sigma) - math.log(sigma_next)
        self.inject = eta > 0 and s_noise > 0
        self.node, self.sigma_node, self.xi = 0.0, sigma, None  # the last node moved to, its σ and ξ

    def level(self, c: float) -> float:
        """σ at node c: σ(λ_i + c h)."""
        return math.exp(-(self.lam + c * self.h))

    def move(self, c: float, terms: list[tuple[float, torch.Tensor]], sigma_to: float | None = None) -> torch.Tensor:
        """E(c, ·) = (σ_c/σ_i) e^{-c h η} x - Σ w x̂ + σ_c s_noise ξ_c, for terms [(w, x̂), ...]; sigma_to: σ_c
        (the plan's σ_{i+1} for c = 1)."""
        sigma_c = self.level(c) if sigma_to is None else sigma_to
        out = (sigma_c / self.sigma * math.exp(-c * self.h * self.eta)) * self.x
        for weight, x0 in terms:
            out = out - weight * x0
        if self.inject:
            segment = (self.node - c) * self.h * self.eta  # <= 0
            z = self.noise(self.x, self.sigma_node, sigma_c)
            fresh = z * math.sqrt(-math.expm1(2 * segment))
            self.xi = fresh if self.xi is None else self.xi * math.exp(segment) + fresh
            out = out + self.xi * (sigma_c * self.s_noise)
        self.node, self.sigma_node = c, sigma_c
        return out


def sample_seeds_2(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise: NoiseSampler = None,
                   callback=None, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, solver_type: str = "phi_1"):
    """SEEDS-2 (module docstring): an intermediate evaluation at λ_i + r h, then the step with the "phi_1" midpoint
    combination or the "phi_2" weights."""
    check_choice("SEEDS-2 solver_type", solver_type, SEEDS_2_SOLVER_TYPES)
    n = len(plan)
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0 = denoiser.ve(x, plan.timesteps[i].item(), sigma)
        if sigma_next == 0:
            x_next = x0
        else:
            step = _SdeStages(x, sigma, sigma_next, eta, s_noise, noise)
            h_eta = step.h * (1 + eta)
            x_r = step.move(r, [(h_phi_1(-r * h_eta), x0)])
            sigma_r = step.sigma_node
            x0_r = denoiser.ve(x_r, plan.t_at(sigma_r), sigma_r)
            if solver_type == "phi_1":
                x0_mid = x0 + (x0_r - x0) / (2 * r)
                x_next = step.move(1.0, [(h_phi_1(-h_eta), x0_mid)], sigma_next)
            else:
                b2 = h_phi_2(-h_eta) / r
                x_next = step.move(1.0, [(h_phi_1(-h_eta) - b2, x0), (b2, x0_r)], sigma_next)
        x = denoiser.after_step(callback, i, n, x_next, x0)
    return x


def sample_seeds_3(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise: NoiseSampler = None,
                   callback=None, eta: float = 1.0, s_noise: float = 1.0, r_1: float = 1 / 3, r_2: float = 2 / 3):
    """SEEDS-3 (module docstring): evaluations at λ_i + r_1 h and λ_i + r_2 h, then the step."""
    n = len(plan)
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0 = denoiser.ve(x, plan.timesteps[i].item(), sigma)
        if sigma_next == 0:
            x_next = x0
        else:
            step = _SdeStages(x, sigma, sigma_next, eta, s_noise, noise)
            h_eta = step.h * (1 + eta)
            x_1 = step.move(r_1, [(h_phi_1(-r_1 * h_eta), x0)])
            x0_1 = denoiser.ve(x_1, plan.t_at(step.sigma_node), step.sigma_node)
            a2 = r_2 / r_1 * h_phi_2(-r_2 * h_eta)
            x_2 = step.move(r_2, [(h_phi_1(-r_2 * h_eta) - a2, x0), (a2, x0_1)])
            x0_2 = denoiser.ve(x_2, plan.t_at(step.sigma_node), step.sigma_node)
            b2 = h_phi_2(-h_eta) / r_2
            x_next = step.move(1.0, [(h_phi_1(-h_eta) - b2, x0), (b2, x0_2)], sigma_next)
        x = denoiser.after_step(callback, i, n, x_next, x0)
    return x
