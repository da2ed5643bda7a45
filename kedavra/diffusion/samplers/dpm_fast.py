"""DPM-Solver with fixed ("DPM fast") and adaptive ("DPM adaptive") step sizes (Lu et al. 2022, "DPM-Solver: A Fast
ODE Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps"), as k-diffusion runs it for A1111.

The solver works in λ = -log σ (the paper's half log-SNR for the VE view) with the noise prediction
ε̂ = (x - x̂_0)/σ. Single-step solvers of order k = 1, 2, 3 (the paper's DPM-Solver-1/2/3, Algorithms 1-2, eq. 3.7-3.9)
advance from λ to λ + h. "fast" spends a budget of n evaluations as order-3 steps on an even λ grid with a final
order 2 or 1 (sec. 3.4, "DPM-Solver-fast"); "adaptive" pairs orders 2/3 (or 1/2) as an embedded error estimate and
sizes the step with a PID controller (sec. 4, Algorithm 4). With η > 0 (A1111's default η = 1 for both) each step
lands below its target level and noise brings it back (the ancestral split of `ancestral_step_sigmas`).
Both end at the plan's smallest positive σ, not at 0, as in A1111.
"""

from __future__ import annotations

import math

import torch

from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.samplers.euler import ancestral_step_sigmas
from kedavra.diffusion.samplers.noise import NoiseSampler
from kedavra.diffusion.timesteps import SamplingPlan

ADAPTIVE_DEFAULTS = {"order": 3, "rtol": 0.05, "atol": 0.0078, "h_init": 0.05, "pcoeff": 0.0, "icoeff": 1.0,
                     "dcoeff": 0.0, "accept_safety": 0.81}  # k-diffusion's sample_dpm_adaptive defaults, A1111's
PID_EPS = 1e-8


class _Solver:
    """The model as ε̂(x, λ), with one cache of evaluations per step (keys: "eps", "eps_r1", "eps_r2")."""

    def __init__(self, denoiser: Denoiser, plan: SamplingPlan):
        self.denoiser, self.plan = denoiser, plan

    @staticmethod
    def sigma(lam: float) -> float:
        return math.exp(-lam)

    def eps(self, cache: dict, key: str, x, lam: float):
        if key not in cache:
            sigma = self.sigma(lam)
            x0 = self.denoiser.ve(x, self.plan.t_at(sigma), sigma)
            cache[key] = ((x - x0) / sigma, x0)
        return cache[key][0]

    def step_1(self, x, lam, lam_next, cache):
        """DPM-Solver-1 (DDIM): x - σ(λ') (e^h - 1) ε̂."""
        h = lam_next - lam
        return x - self.sigma(lam_next) * math.expm1(h) * self.eps(cache, "eps", x, lam)

    def step_2(self, x, lam, lam_next, cache, r1: float = 0.5):
        """DPM-Solver-2 (the paper's Algorithm 1 with intermediate point λ + r1 h)."""
        h = lam_next - lam
        eps = self.eps(cache, "eps", x, lam)
        s1 = lam + r1 * h
        u1 = x - self.sigma(s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return (x - self.sigma(lam_next) * math.expm1(h) * eps
                - self.sigma(lam_next) / (2 * r1) * math.expm1(h) * (eps_r1 - eps))

    def step_3(self, x, lam, lam_next, cache, r1: float = 1 / 3, r2: float = 2 / 3):
        """DPM-Solver-3 (the paper's Algorithm 2)."""
        h = lam_next - lam
        eps = self.eps(cache, "eps", x, lam)
        s1, s2 = lam + r1 * h, lam + r2 * h
        u1 = x - self.sigma(s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - self.sigma(s2) * math.expm1(r2 * h) * eps
              - self.sigma(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return (x - self.sigma(lam_next) * math.expm1(h) * eps
                - self.sigma(lam_next) / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps))

    def ancestral_target(self, lam: float, lam_next: float, lam_end: float, eta: float) -> tuple[float, float]:
        """(λ to solve to, std of the noise to add) for a step λ -> λ_next with ancestral η."""
        if not eta:
            return lam_next, 0.0
        sigma_down, _ = ancestral_step_sigmas(self.sigma(lam), self.sigma(lam_next), eta)
        lam_down = min(lam_end, -math.log(sigma_down))
        return lam_down, math.sqrt(max(self.sigma(lam_next) ** 2 - self.sigma(lam_down) ** 2, 0.0))


def _end_levels(plan: SamplingPlan) -> tuple[float, float]:
    positive = plan.sigmas[plan.sigmas > 0]
    return positive.min().item(), plan.sigmas[0].item()


def sample_dpm_fast(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise: NoiseSampler = None,
                    callback=None, eta: float = 0.0, s_noise: float = 1.0):
    """DPM-Solver-fast with len(plan) model evaluations from the plan's σ_max to its smallest positive σ."""
    sigma_min, sigma_max = _end_levels(plan)
    solver = _Solver(denoiser, plan)
    lam_start, lam_end = -math.log(sigma_max), -math.log(sigma_min)
    nfe = len(plan)
    m = nfe // 3 + 1
    grid = torch.linspace(lam_start, lam_end, m + 1, dtype=torch.float32).tolist()
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        lam, lam_next = grid[i], grid[i + 1]
        lam_to, sigma_up = solver.ancestral_target(lam, lam_next, lam_end, eta)
        cache = {}
        solver.eps(cache, "eps", x, lam)
        x0 = cache["eps"][1]
        step = {1: solver.step_1, 2: solver.step_2, 3: solver.step_3}[order]
        x = step(x, lam, lam_to, cache)
        if sigma_up:
            x = x + noise(x, solver.sigma(lam), solver.sigma(lam_next)) * (sigma_up * s_noise)
        x = denoiser.after_step(callback, i, len(orders), x, x0)
    return x


def sample_dpm_adaptive(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise: NoiseSampler = None,
                        callback=None, eta: float = 0.0, s_noise: float = 1.0, **options):
    """DPM-Solver-12/23 with adaptive step size from the plan's σ_max to its smallest positive σ (the step count
    of the plan is not used). options: k-diffusion's order (2 or 3), rtol, atol, h_init, pcoeff, icoeff, dcoeff,
    accept_safety (ADAPTIVE_DEFAULTS)."""
    unknown = set(options) - set(ADAPTIVE_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown DPM adaptive options {sorted(unknown)}; allowed: {', '.join(ADAPTIVE_DEFAULTS)}")
    o = {**ADAPTIVE_DEFAULTS, **options}
    if o["order"] not in (2, 3):
        raise ValueError(f"DPM adaptive order must be 2 or 3, got {o['order']!r}")
    sigma_min, sigma_max = _end_levels(plan)
    solver = _Solver(denoiser, plan)
    lam, lam_end = -math.log(sigma_max), -math.log(sigma_min)
    controller = _PIDController(abs(o["h_init"]), o["pcoeff"], o["icoeff"], o["dcoeff"],
                                1.5 if eta else o["order"], o["accept_safety"])
    x_prev, steps = x, 0
    while lam < lam_end - 1e-5:
        lam_next = min(lam_end, lam + controller.h)
        lam_to, sigma_up = solver.ancestral_target(lam, lam_next, lam_end, eta)
        cache = {}
        solver.eps(cache, "eps", x, lam)
        x0 = cache["eps"][1]
        if o["order"] == 2:
            x_low, x_high = solver.step_1(x, lam, lam_to, cache), solver.step_2(x, lam, lam_to, cache)
        else:
            x_low = solver.step_2(x, lam, lam_to, cache, r1=1 / 3)
            x_high = solver.step_3(x, lam, lam_to, cache)
        delta = torch.maximum(torch.tensor(o["atol"]), o["rtol"] * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5  # the paper's eq. 4.1
        if controller.propose_step(error.item()):
            x_prev = x_low
            x = x_high
            if sigma_up:
                x = x + noise(x, solver.sigma(lam), solver.sigma(lam_next)) * (sigma_up * s_noise)
            lam = lam_next
        x = denoiser.after_step(callback, steps, max(steps + 1, len(plan)), x, x0)
        steps += 1
    return x


class _PIDController:
    """Step-size control from the error history (Söderlind 2003's PID controller, as the paper's Algorithm 4 and
    k-diffusion use it): h ← h · limiter(ε_0^{b1} ε_1^{b2} ε_2^{b3}) with ε = 1/error, accepting the step when the
    factor reaches `accept_safety`."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.errors: list[float] = []

    def propose_step(self, error: float) -> bool:
        inverse = 1 / (error + PID_EPS)
        if not self.errors:
            self.errors = [inverse] * 3
        self.errors[0] = inverse
        factor = self.errors[0] ** self.b1 * self.errors[1] ** self.b2 * self.errors[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errors[2], self.errors[1] = self.errors[1], self.errors[0]
        self.h *= factor
        return accept
