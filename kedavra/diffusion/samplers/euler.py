"""The σ-space samplers of Karras et al. 2022 and k-diffusion: Euler, Euler ancestral, Heun, DPM2 (ancestral), LMS.

They step the VE view x = x_0 + σ ε along the probability-flow ODE dx/dσ = (x - D(x; σ))/σ (Karras et al. 2022,
eq. 3 with σ(t) = t, written with the denoiser D = x̂_0 of their eq. 7); `d` below is that slope. The algorithms are
k-diffusion's (Crowson, k_diffusion/sampling.py), which A1111 and ComfyUI run; diffusers' Euler, Euler ancestral and
Heun schedulers compute the same steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.samplers.noise import NoiseSampler
from kedavra.diffusion.timesteps import SamplingPlan

LMS_ORDER = 4  # k-diffusion's sample_lms default order
MAX_GAMMA = math.sqrt(2) - 1  # Karras et al. 2022, Algorithm 2: γ_i at most √2 - 1, so σ̂ at most √2 σ
_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(8)  # exact for the order-4 Lagrange basis


@dataclass(frozen=True)
class Churn:
    """Karras et al. 2022's stochastic sampling (Algorithm 2, lines 4-6), as k-diffusion's sample_euler, sample_heun
    and sample_dpm_2 take it and A1111 sets it ("Sigma churn", "Sigma tmin", "Sigma tmax", "Sigma noise"): before
    step i of n, where s_tmin <= σ_i <= s_tmax, the level is raised to σ̂ = σ_i (1 + γ), γ = min(s_churn / n,
    √2 - 1), by adding fresh noise z·s_noise of std √(σ̂² - σ_i²); the step then runs from σ̂. s_noise alone also
    scales the fresh noise of the ancestral and SDE samplers A1111 hands it to. The defaults change nothing."""

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def __post_init__(self):
        for name in ("s_churn", "s_tmin", "s_noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.s_tmax, bool) or not isinstance(self.s_tmax, int | float) or not self.s_tmax > 0:
            raise ValueError(f"s_tmax must be a number > 0 or inf (A1111's 0 means inf), got {self.s_tmax!r}")

    @property
    def is_default(self) -> bool:
        return self == Churn()

    def raise_level(self, x: torch.Tensor, sigma: float, n: int, noise: NoiseSampler, sigma_next: float):
        """(x at σ̂, σ̂) for step i of n at level σ (Algorithm 2, lines 4-6). The noise is drawn at every step, γ or
        not, as k-diffusion draws it (A1111's noise sequence depends on it)."""
        gamma = min(self.s_churn / n, MAX_GAMMA) if self.s_tmin <= sigma <= self.s_tmax else 0.0
        eps = noise(x, sigma, sigma_next) * self.s_noise
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            x = x + eps * math.sqrt(sigma_hat**2 - sigma**2)
        return x, sigma_hat


def _start(plan: SamplingPlan, i: int, n: int, x: torch.Tensor, noise, churn: Churn | None):
    """(x, σ, t) a step starts from: the plan's level i, or σ̂ after churn (its timestep mapped from σ̂)."""
    sigma, sigma_next = _levels(plan, i)
    if churn is None or churn.s_churn == 0:
        return x, sigma, plan.timesteps[i].item()
    x, sigma_hat = churn.raise_level(x, sigma, n, noise, sigma_next)
    return x, sigma_hat, plan.timesteps[i].item() if sigma_hat == sigma else plan.t_at(sigma_hat)


def _levels(plan: SamplingPlan, i: int) -> tuple[float, float]:
    return plan.sigmas[i].item(), plan.sigmas[i + 1].item()


def _next_t(plan: SamplingPlan, i: int, sigma_next: float) -> float:
    """The timestep of level i+1 (the plan's own, or mapped from σ after the last step)."""
    return plan.timesteps[i + 1].item() if i + 1 < len(plan) else plan.t_at(sigma_next)


def sample_euler(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None,
                 churn: Churn | None = None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2; churn: its lines 4-6)."""
    n = len(plan)
    for i in range(n):
        x, sigma, t = _start(plan, i, n, x, noise, churn)
        sigma_next = plan.sigmas[i + 1].item()
        x0 = denoiser.ve(x, t, sigma)
        d = (x - x0) / sigma  # dx/dσ, Karras et al. 2022 eq. 3
        x = x + d * (sigma_next - sigma)
        x = denoiser.after_step(callback, i, n, x, x0)
    return x


def ancestral_step_sigmas(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step σ -> σ_next into a deterministic move to σ_down and fresh noise of std σ_up, with
    σ_down² + σ_up² = σ_next² and σ_up = min(σ_next, η σ_next √(1 - σ_next²/σ²)) (η = 1: the ancestral DDPM step's
    variance in the VE view; k-diffusion's `get_ancestral_step`)."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise: NoiseSampler = None,
                           callback=None, eta: float = 1.0, s_noise: float = 1.0):
    """Euler ancestral ("Euler a"): an Euler step to σ_down, then noise of std σ_up back up to σ_next."""
    n = len(plan)
    for i in range(n):
        sigma, sigma_next = _levels(plan, i)
        x0 = denoiser.ve(x, plan.timesteps[i].item(), sigma)
        sigma_down, sigma_up = ancestral_step_sigmas(sigma, sigma_next, eta)
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise(x, sigma, sigma_next) * (s_noise * sigma_up)
        x = denoiser.after_step(callback, i, n, x, x0)
    return x


def sample_heun(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None,
                churn: Churn | None = None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1; churn: Algorithm 2): an Euler step, then the
    slope is averaged with the slope at the Euler step's end; a plain Euler step into σ = 0. 2n-1 evaluations."""
    n = len(plan)
    for i in range(n):
        x, sigma, t = _start(plan, i, n, x, noise, churn)
        sigma_next = plan.sigmas[i + 1].item()
        x0 = denoiser.ve(x, t, sigma)
        d = (x - x0) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            x0_next = denoiser.ve(x_euler, _next_t(plan, i, sigma_next), sigma_next)
            d_next = (x_euler - x0_next) / sigma_next
            x = x + (d + d_next) / 2 * (sigma_next - sigma)  # Karras et al. 2022, Algorithm 1, line 8
        x = denoiser.after_step(callback, i, n, x, x0)
    return x


def _dpm2_step(denoiser: Denoiser, plan: SamplingPlan, x, x0, sigma: float, sigma_to: float):
    """DPM-Solver-2's midpoint step from σ to σ_to (Lu et al. 2022, "DPM-Solver", Algorithm 1 with r = 1/2, in the
    σ-space form of k-diffusion): the slope at the geometric mean σ_mid = √(σ σ_to) after an Euler half step."""
    d = (x - x0) / sigma
    sigma_mid = math.exp((math.log(sigma) + math.log(sigma_to)) / 2)
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = (x_mid - denoiser.ve(x_mid, plan.t_at(sigma_mid), sigma_mid)) / sigma_mid
    return x + d_mid * (sigma_to - sigma)


def sample_dpm_2(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None,
                 churn: Churn | None = None):
    """DPM2 (k-diffusion's sample_dpm_2): DPM-Solver-2 steps in σ, Euler into σ = 0. 2n-1 evaluations. churn: as
    `sample_euler`'s."""
    n = len(plan)
    for i in range(n):
        x, sigma, t = _start(plan, i, n, x, noise, churn)
        sigma_next = plan.sigmas[i + 1].item()
        x0 = denoiser.ve(x, t, sigma)
        if sigma_next == 0:
            x = x + (x - x0) / sigma * (sigma_next - sigma)
        else:
            x = _dpm2_step(denoiser, plan, x, x0, sigma, sigma_next)
        x = denoiser.after_step(callback, i, n, x, x0)
    return x


def sample_dpm_2_ancestral(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise: NoiseSampler = None,
                           callback=None, eta: float = 1.0, s_noise: float = 1.0):
    """DPM2 ancestral ("DPM2 a"): a DPM-Solver-2 step to σ_down, then noise of std σ_up
    (see `ancestral_step_sigmas`)."""
    n = len(plan)
    for i in range(n):
        sigma, sigma_next = _levels(plan, i)
        x0 = denoiser.ve(x, plan.timesteps[i].item(), sigma)
        sigma_down, sigma_up = ancestral_step_sigmas(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + (x - x0) / sigma * (sigma_down - sigma)
        else:
            x = _dpm2_step(denoiser, plan, x, x0, sigma, sigma_down)
            x = x + noise(x, sigma, sigma_next) * (s_noise * sigma_up)
        x = denoiser.after_step(callback, i, n, x, x0)
    return x


def lms_coefficient(order: int, sigmas: list[float], i: int, j: int) -> float:
    """∫_{σ_i}^{σ_{i+1}} ℓ_j(σ) dσ, with ℓ_j the Lagrange basis polynomial through σ_i, σ_{i-1}, ..., σ_{i-order+1}
    that is 1 at σ_{i-j}: the weight of the slope j steps back in a linear multistep step (Adams-Bashforth on the
    σ grid, as k-diffusion's sample_lms; its scipy quadrature and this Gauss-Legendre rule are both exact here to
    rounding)."""
    a, b = sigmas[i], sigmas[i + 1]
    total = 0.0
    for node, weight in zip(_GAUSS_NODES, _GAUSS_WEIGHTS, strict=True):
        tau = (b - a) / 2 * node + (a + b) / 2
        product = 1.0
        for k in range(order):
            if k != j:
                product *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        total += weight * product
    return total * (b - a) / 2


def sample_lms(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None,
               order: int = LMS_ORDER):
    """Linear multistep (LMS; k-diffusion's sample_lms): x_{i+1} = x_i + Σ_j c_j d_{i-j} with the last `order`
    slopes and the Lagrange weights of `lms_coefficient` (order grows from 1 over the first steps)."""
    n = len(plan)
    sigmas = plan.sigmas.tolist()
    slopes = []
    for i in range(n):
        sigma = sigmas[i]
        x0 = denoiser.ve(x, plan.timesteps[i].item(), sigma)
        slopes = (slopes + [(x - x0) / sigma])[-order:]
        current = min(i + 1, order)
        for j, d in enumerate(reversed(slopes)):
            x = x + lms_coefficient(current, sigmas, i, j) * d
        x = denoiser.after_step(callback, i, n, x, x0)
    return x
