"""Adams–Bashforth samplers on the probability-flow ODE in σ, as ComfyUI runs them: iPNDM, iPNDM-v and DEIS
(Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator").

All three step the VE state x = x_0 + σ ε with the slope d = (x - D(x; σ))/σ = dx/dσ (Karras et al. 2022, eq. 3, as
in euler.py) and remember the slopes of the last steps:

    x_{i+1} = x_i + Σ_{j<p} w_j d_{i-j},   p = min(max_order, i + 1)

so the order grows 1, 2, 3, ... over the first steps (a multistep warm-up where PNDM, Liu et al. 2022, spends
Runge–Kutta steps). They differ in the weights w (h = σ_{i+1} - σ_i, h_k = σ_{i+1-k} - σ_{i-k}):

    ipndm    h times the classical Adams–Bashforth weights of a uniform grid, whatever the σ spacing (Zhang & Chen
             2023, iPNDM): (1), (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24
    ipndm_v  h times weights that follow the step ratios (`variable_step_weights`, ComfyUI's from zju-pi's
             diff-sampler); on a uniform grid orders 1-3 are ipndm's
    deis     tAB-DEIS (Zhang & Chen 2023, sec. 4): w_j = ∫_{t_i}^{t_{i+1}} (dσ/dτ) ℓ_j(τ) dτ, the slope extrapolated by
             the Lagrange polynomial ℓ_j through the last p levels in a VP time t(σ) (`deis_weights`)

ComfyUI (comfy/k_diffusion/sampling.py: sample_ipndm, sample_ipndm_v, sample_deis; comfy/k_diffusion/deis.py) runs
them with max_order 4 (the iPNDMs) and 3 (DEIS, in its default "tab" mode). Into σ = 0 the iPNDMs return x̂_0 and
DEIS takes an Euler step (the same, up to rounding). Each evaluates the model once per step: n evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.timesteps import SamplingPlan
from kedavra.validation import check_int

IPNDM_MAX_ORDER = 4  # ComfyUI's sample_ipndm / sample_ipndm_v default
DEIS_MAX_ORDER = 3  # ComfyUI's sample_deis default
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}  # uniform-grid weights, newest slope first
# ComfyUI's DEIS maps σ to the time of a VP-SDE with linear β (Song et al. 2021) fitted to EDM's σ range: σ(1) =
# EDM_SIGMA_MAX, σ(EDM_VP_EPS) = EDM_SIGMA_MIN, whatever the model's own range (deis.py, edm2t)
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0  # Karras et al. 2022, Table 1, their own sampler's σ range
EDM_VP_EPS = 1e-3  # ibid., the VP column's ε_s, the smallest time
# ComfyUI integrates the DEIS weights with a rectangle rule: the integrand at linspace(t_i, t_{i+1}, N), both ends
# included, each point weighted (t_{i+1} - t_i)/N (deis.py, get_deis_coeff_list, N = 10000)
DEIS_QUADRATURE_POINTS = 10_000

Weights = Callable[[list[float], int, int], list[float]]


def fixed_step_weights(sigmas: list[float], i: int, order: int) -> list[float]:
    """iPNDM's w_j for the step σ_i -> σ_{i+1}: (σ_{i+1} - σ_i) times the uniform-grid Adams–Bashforth weights."""
    return [(sigmas[i + 1] - sigmas[i]) * weight for weight in ADAMS_BASHFORTH[order]]


def variable_step_weights(sigmas: list[float], i: int, order: int) -> list[float]:
    """iPNDM-v's w_j for the step σ_i -> σ_{i+1} (ComfyUI's sample_ipndm_v). With h_k = σ_{i+1-k} - σ_{i-k}
    (h_0 this step, h_k k steps back), r = h_0/h_1, a = 1/2 - h_0²/(6 h_1 (h_1 + h_2)) and q = h_1 (h_1 + h_2) /
    (h_2 (h_2 + h_3)), w / h_0 is

        order 2   1 + r/2,  -r/2                       (Adams–Bashforth 2 with variable steps)
        order 3   1 + r/2 + a,  -r/2 - (1 + h_1/h_2) a,  (h_1/h_2) a
        order 4   order 3's, plus b times (1, -(1 + h_1/h_2 + q), h_1/h_2 + q (1 + h_2/h_3), -q h_1/h_2), with
                  b = (1/2 - h_0/(6 s_1) + (1 - h_0/(2 s_1)) h_0/(6 s_2)) h_0 s_1 s_2 / (h_1 (h_1+h_2) (h_1+h_2+h_3)),
                  s_1 = h_0 + h_1, s_2 = h_0 + h_1 + h_2.

    These are ComfyUI's, not the Lagrange weights of a variable-step Adams–Bashforth method (euler.lms_coefficient):
    orders 2 and 3 are ipndm's on a uniform grid, but order 3 is exact for slopes linear in σ only on others; order
    4 is (57, -65, 43, -11)/24 on a uniform grid, not Adams–Bashforth 4's, and its weights sum to
    h_0 (1 + b q (h_2/h_3 - h_1/h_2)), not h_0, on others."""
    h = [sigmas[i + 1 - k] - sigmas[i - k] for k in range(order)]
    if order == 1:
        return [h[0]]
    r = h[0] / h[1]
    w = [1 + r / 2, -r / 2]
    if order >= 3:
        a = 1 / 2 - h[0] ** 2 / (6 * h[1] * (h[1] + h[2]))
        w = [w[0] + a, w[1] - (1 + h[1] / h[2]) * a, h[1] / h[2] * a]
    if order == 4:
        s1, s2 = h[0] + h[1], h[0] + h[1] + h[2]
        b = ((1 / 2 - h[0] / (6 * s1) + (1 - h[0] / (2 * s1)) * h[0] / (6 * s2))
             * h[0] * s1 * s2 / (h[1] * (h[1] + h[2]) * (h[1] + h[2] + h[3])))
        q = h[1] * (h[1] + h[2]) / (h[2] * (h[2] + h[3]))
        w = [w[0] + b, w[1] - (1 + h[1] / h[2] + q) * b, w[2] + (h[1] / h[2] + q * (1 + h[2] / h[3])) * b,
             -q * h[1] / h[2] * b]
    return [h[0] * weight for weight in w]


def _vp_betas() -> tuple[float, float]:
    """(β_d, β_min) of the linear-β VP-SDE whose σ(t) = √(exp(β_d t²/2 + β_min t) - 1) (Karras et al. 2022, Table 1,
    "VP") is EDM_SIGMA_MAX at t = 1 and EDM_SIGMA_MIN at t = EDM_VP_EPS (ComfyUI's deis.edm2t)."""
    log_max, log_min = math.log1p(EDM_SIGMA_MAX**2), math.log1p(EDM_SIGMA_MIN**2)
    beta_d = 2 * (log_min / EDM_VP_EPS - log_max) / (EDM_VP_EPS - 1)
    return beta_d, log_max - beta_d / 2


def deis_time(sigma: float) -> float:
    """The VP time t of σ: the root of β_d t²/2 + β_min t = log(1 + σ²) (`_vp_betas`)."""
    beta_d, beta_min = _vp_betas()
    return (math.sqrt(beta_min**2 + 2 * beta_d * math.log1p(sigma**2)) - beta_min) / beta_d


def deis_weights(sigmas: list[float], i: int, order: int) -> list[float]:
    """tAB-DEIS's w_j for the step σ_i -> σ_{i+1} (Zhang & Chen 2023, sec. 4, in the σ form of ComfyUI's "tab"
    mode): ∫_{t_i}^{t_{i+1}} (dσ/dτ) ℓ_j(τ) dτ, t = deis_time(σ), ℓ_j the Lagrange basis polynomial through t_i, ...,
    t_{i-p+1} that is 1 at t_{i-j}; dσ/dτ = (β_d τ + β_min)(1 + σ²)/(2σ) from σ(τ)² = exp(β_d τ²/2 + β_min τ) - 1.
    Integrated by ComfyUI's rectangle rule (DEIS_QUADRATURE_POINTS; the exact integral is some 1e-5 away) in float64,
    within a few 1e-6 of ComfyUI's float32 weights. Order 1 is the Euler step σ_{i+1} - σ_i; the weights of any
    order sum to it up to the rule's error (about 3e-6 of it)."""
    if order == 1:
        return [sigmas[i + 1] - sigmas[i]]
    beta_d, beta_min = _vp_betas()
    nodes = [deis_time(sigmas[i - k]) for k in range(order)]  # t_i, t_{i-1}, ... (t grows with σ)
    t_next = deis_time(sigmas[i + 1])
    tau = torch.linspace(nodes[0], t_next, DEIS_QUADRATURE_POINTS, dtype=torch.float64)
    sigma_sq = torch.expm1(beta_d * tau**2 / 2 + beta_min * tau)  # σ(τ)²
    integrand = (beta_d * tau + beta_min) * (1 + sigma_sq) / (2 * sigma_sq.sqrt()) * (t_next - nodes[0])
    integrand = integrand / DEIS_QUADRATURE_POINTS
    weights = []
    for j in range(order):
        basis = torch.ones_like(tau)
        for k in range(order):
            if k != j:
                basis = basis * (tau - nodes[k]) / (nodes[j] - nodes[k])
        weights.append((integrand * basis).sum().item())
    return weights


def _sample_adams(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, callback, max_order: int,
                  weights: Weights, x0_at_zero: bool) -> torch.Tensor:
    """x_{i+1} = x_i + Σ_j w_j d_{i-j} with the order min(max_order, i + 1) (module docstring); into σ = 0 x̂_0 itself
    (x0_at_zero) or an Euler step."""
    max_order = check_int("max_order", max_order, 1, len(ADAMS_BASHFORTH))
    n = len(plan)
    sigmas = plan.sigmas.tolist()
    slopes: list[torch.Tensor] = []  # d at the last max_order levels, newest first
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser.ve(x, plan.timesteps[i].item(), sigma)
        slopes = [(x - x0) / sigma] + slopes[:max_order - 1]  # dx/dσ, Karras et al. 2022 eq. 3
        if sigma_next == 0 and x0_at_zero:
            x = x0
        else:
            order = min(max_order, i + 1) if sigma_next > 0 else 1
            x = x + sum(w * d for w, d in zip(weights(sigmas, i, order), slopes, strict=False))
        x = denoiser.after_step(callback, i, n, x, x0)
    return x


def sample_ipndm(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None,
                 max_order: int = IPNDM_MAX_ORDER):
    """iPNDM (Zhang & Chen 2023): Adams–Bashforth steps in σ with uniform-grid weights (module docstring), x̂_0 into
    σ = 0. `noise` is unused (the sampler is deterministic)."""
    return _sample_adams(denoiser, x, plan, callback, max_order, fixed_step_weights, x0_at_zero=True)


def sample_ipndm_v(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None,
                   max_order: int = IPNDM_MAX_ORDER):
    """iPNDM-v: iPNDM with weights that follow the step ratios (`variable_step_weights`), x̂_0 into σ = 0."""
    return _sample_adams(denoiser, x, plan, callback, max_order, variable_step_weights, x0_at_zero=True)


def sample_deis(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None,
                max_order: int = DEIS_MAX_ORDER):
    """DEIS (Zhang & Chen 2023), tAB-DEIS with ComfyUI's weights (`deis_weights`), an Euler step into σ = 0."""
    return _sample_adams(denoiser, x, plan, callback, max_order, deis_weights, x0_at_zero=False)
