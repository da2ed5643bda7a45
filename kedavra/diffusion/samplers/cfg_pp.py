"""ComfyUI's CFG++ samplers (comfy/k_diffusion/sampling.py: sample_euler_cfg_pp, sample_euler_ancestral_cfg_pp,
sample_dpmpp_2s_ancestral_cfg_pp, sample_dpmpp_2m_cfg_pp, res_multistep and sample_gradient_estimation with cfg_pp):
CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion Models").

Classifier-free guidance gives two x̂_0 at every evaluation: the guided D = U + w (x̂_c - U) (Ho and Salimans 2022,
eq. 6, kedavra.diffusion.guidance, on ε- or v-predictions, of which x̂_0 is the same affine function) and the
unconditional U = x̂_∅. A DDIM step denoises to D and renoises with the noise D implies, (x - D)/σ; CFG++ renoises
with the unconditional noise ε̂_∅ = (x - U)/σ instead (Chung et al. 2024, Algorithm 2). In the VE view
x = x_0 + σ ε (denoiser.py; ComfyUI's α = 1 for ε and v models):

    x_{i+1} = D + σ_{i+1} ε̂_∅                    (CFG: D + σ_{i+1} (x - D)/σ_i, Euler's step in σ)

Symbols: a step goes from σ_i to σ_{i+1}, or to σ_down with fresh noise σ_up z after it (the ancestral split of
euler.ancestral_step_sigmas; σ_down = σ_{i+1} at η = 0); λ = -log σ, h = λ(σ_to) - λ(σ_i), r = h_{i-1}/h_i,
g = D - U, primes the previous step's values, DDIM(x, X; σ_to) = (σ_to/σ_i) x + (1 - σ_to/σ_i) X the first-order
step onto X (dpm_solver.py). What ComfyUI computes, per sampler (x̂_0 = D into σ = 0 unless said):

    euler_cfg_pp, euler_ancestral_cfg_pp  x ← D + σ_down ε̂_∅ (+ σ_up z): Algorithm 2 with η = 0 / 1
    dpmpp_2m_cfg_pp                       x ← D + e^{-h} (x - U) + (1 - e^{-h})/(2r) (D - U'), the last term from the
                                          second step on (DPM-Solver++(2M)'s correction, on D - U')
    dpmpp_2s_ancestral_cfg_pp             x_s = DDIM(x, U; σ_s), σ_s = √(σ_i σ_down); U_s at x_s (its D unused);
                                          x ← DDIM(x, U_s; σ_down) + σ_up z + g; into σ_down = 0: x ← U + g = D
    res_multistep(_ancestral)_cfg_pp      first step, and into σ_down = 0: x ← D + σ_down ε̂_∅; then the RES step of
                                          res_multistep.py on U with the guidance added first: x ← e^{-h} (x + g)
                                          + h (b_1 U + b_2 U')
    gradient_estimation_cfg_pp            x ← D + σ_{i+1} ε̂_∅ + (γ - 1)(ε̂_∅ - ε̂_∅')(σ_{i+1} - σ_i), γ = 2

Where D = U, at w = 0 (unconditional sampling), each is its sampler without CFG++ (euler, euler_ancestral, dpmpp_2m,
dpmpp_2s_ancestral, res_multistep(_ancestral), gradient_estimation); at w = 1 it is not: D is then the conditional
x̂_0, and the renoising still follows ε̂_∅ (the paper's λ = 1). The second-order forms are ComfyUI's choices, kept:
the RES step scales g by e^{-h} where Algorithm 2 adds it whole, and 2S's intermediate point is unguided. ComfyUI
hands these functions its cfg as w unchanged (none of the seven rescales cond_scale) and computes U even at cfg 1
(its disable_cfg1_optimization); here the model must give `with_uncond` (Denoiser.ve_with_uncond). Its flow-model
(CONST) branch of dpmpp_2s_ancestral_cfg_pp is not written. Evaluations: n, 2n - 1 for dpmpp_2s_ancestral_cfg_pp.
"""

from __future__ import annotations

import math

import torch

from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.samplers.euler import ancestral_step_sigmas
from kedavra.diffusion.samplers.gradient_estimation import GE_GAMMA
from kedavra.diffusion.samplers.noise import NoiseSampler
from kedavra.diffusion.samplers.res_multistep import res_weights
from kedavra.diffusion.timesteps import SamplingPlan


def _ddim(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_to: float) -> torch.Tensor:
    """DDIM(x, x̂_0; σ_to) = (σ_to/σ) x + (1 - σ_to/σ) x̂_0, written as DPM-Solver++(1): (σ_to/σ) x - (e^{-h} - 1) x̂_0."""
    return (sigma_to / sigma) * x - math.expm1(math.log(sigma_to) - math.log(sigma)) * x0


def sample_euler_ancestral_cfg_pp(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan,
                                  noise: NoiseSampler = None, callback=None, eta: float = 1.0, s_noise: float = 1.0):
    """Euler (ancestral) with CFG++ (module docstring): η = 1 ComfyUI's euler_ancestral_cfg_pp, η = 0 and no noise its
    euler_cfg_pp."""
    n = len(plan)
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0, x0_uncond = denoiser.ve_with_uncond(x, plan.timesteps[i].item(), sigma)
        if sigma_next == 0:
            x_next = x0
        else:
            sigma_down, sigma_up = ancestral_step_sigmas(sigma, sigma_next, eta)
            x_next = x0 + sigma_down * (x - x0_uncond) / sigma  # Chung et al. 2024, Alg. 2: renoise along ε̂_∅
            if eta and s_noise:
                x_next = x_next + noise(x, sigma, sigma_next) * (s_noise * sigma_up)
        x = denoiser.after_step(callback, i, n, x_next, x0)
    return x


def sample_dpmpp_2s_ancestral_cfg_pp(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan,
                                     noise: NoiseSampler = None, callback=None, eta: float = 1.0,
                                     s_noise: float = 1.0):
    """DPM-Solver++(2S) ancestral with CFG++ (module docstring; dpm_solver.sample_dpmpp_2s_ancestral on U, with the
    guidance g of the step's first evaluation added after the noise)."""
    n = len(plan)
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0, x0_uncond = denoiser.ve_with_uncond(x, plan.timesteps[i].item(), sigma)
        sigma_down, sigma_up = ancestral_step_sigmas(sigma, sigma_next, eta)
        if sigma_down == 0:
            x_next = x + (x - x0_uncond) / sigma * (sigma_down - sigma)  # Euler onto U
        else:
            sigma_s = math.sqrt(sigma * sigma_down)  # λ halfway: -log σ_s = (λ_i + λ(σ_down))/2
            x_s = _ddim(x, x0_uncond, sigma, sigma_s)
            _, x0_uncond_s = denoiser.ve_with_uncond(x_s, plan.t_at(sigma_s), sigma_s)
            x_next = _ddim(x, x0_uncond_s, sigma, sigma_down)
        if sigma_next > 0:
            x_next = x_next + noise(x, sigma, sigma_next) * (s_noise * sigma_up)
        x_next = x_next + (x0 - x0_uncond)  # g = D - U: D + σ ε̂_∅ from U + σ ε̂_∅
        x = denoiser.after_step(callback, i, n, x_next, x0)
    return x


def sample_dpmpp_2m_cfg_pp(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None):
    """DPM-Solver++(2M) with CFG++ (module docstring): ComfyUI's dpmpp_2m_cfg_pp. `noise` is unused."""
    n = len(plan)
    x0_uncond_prev, h_prev = None, None
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0, x0_uncond = denoiser.ve_with_uncond(x, plan.timesteps[i].item(), sigma)
        if sigma_next == 0:
            x_next, h = x0, math.inf
        else:
            h = math.log(sigma) - math.log(sigma_next)
            x_next = x0 + (sigma_next / sigma) * (x - x0_uncond)  # Chung et al. 2024, Alg. 2 (e^{-h} = σ_{i+1}/σ_i)
            if x0_uncond_prev is not None:  # (1 - e^{-h})/(2r) (D - U'), r = h_prev/h
                x_next = x_next - math.expm1(-h) * (h / h_prev) / 2 * (x0 - x0_uncond_prev)
        x = denoiser.after_step(callback, i, n, x_next, x0)
        x0_uncond_prev, h_prev = x0_uncond, h
    return x


def sample_res_multistep_cfg_pp(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise: NoiseSampler = None,
                                callback=None, eta: float = 0.0, s_noise: float = 1.0):
    """RES multistep with CFG++ (module docstring): η = 0 ComfyUI's res_multistep_cfg_pp, η = 1
    res_multistep_ancestral_cfg_pp. c_2, zero-length steps and the first-order fallback as res_multistep.py."""
    n = len(plan)
    x0_uncond_prev, sigma_down_prev = None, None
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0, x0_uncond = denoiser.ve_with_uncond(x, plan.timesteps[i].item(), sigma)
        sigma_down, sigma_up = ancestral_step_sigmas(sigma, sigma_next, eta)
        h = math.log(sigma) - math.log(sigma_down) if sigma_down > 0 else math.inf
        c2 = None
        if x0_uncond_prev is not None and 0 < h < math.inf:
            c2 = (math.log(sigma_down_prev) - math.log(plan.sigmas[i - 1].item())) / h
        if not c2:
            x_next = x0 + sigma_down * (x - x0_uncond) / sigma  # Chung et al. 2024, Alg. 2
        else:
            b1, b2 = res_weights(h, c2)
            x_next = (sigma_down / sigma) * (x + x0 - x0_uncond) + h * (b1 * x0_uncond + b2 * x0_uncond_prev)
        if sigma_next > 0 and eta:
            x_next = x_next + noise(x, sigma, sigma_next) * (s_noise * sigma_up)
        x = denoiser.after_step(callback, i, n, x_next, x0)
        x0_uncond_prev, sigma_down_prev = x0_uncond, sigma_down
    return x


def sample_gradient_estimation_cfg_pp(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None,
                                      callback=None, ge_gamma: float = GE_GAMMA):
    """Gradient estimation (gradient_estimation.py) with CFG++ on ε̂_∅ (module docstring): ComfyUI's
    gradient_estimation_cfg_pp. `noise` is unused."""
    n = len(plan)
    eps_prev = None
    for i in range(n):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0, x0_uncond = denoiser.ve_with_uncond(x, plan.timesteps[i].item(), sigma)
        eps = (x - x0_uncond) / sigma  # ε̂_∅, the unconditional slope dx/dσ
        if sigma_next == 0:
            x_next = x0
        else:
            x_next = x0 + eps * sigma_next  # Chung et al. 2024, Alg. 2
            if eps_prev is not None:  # Permenter & Yuan 2024: γ ε̂_i + (1 - γ) ε̂_{i-1}
                x_next = x_next + (ge_gamma - 1) * (eps - eps_prev) * (sigma_next - sigma)
        x = denoiser.after_step(callback, i, n, x_next, x0)
        eps_prev = eps
    return x
