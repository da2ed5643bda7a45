"""ComfyUI's "ddpm": kedavra's ancestral DDPM (ddpm.py, Ho et al. 2020, Algorithm 2 with the posterior variance β̃)
on ComfyUI's σ's, taking and returning the VE state as ComfyUI's other samplers do.

What ComfyUI's sample_ddpm (comfy/k_diffusion/sampling.py: generic_step_sampler with DDPMSampler_step) computes,
from its code: at each level σ_i it calls the model on the VE state x (so at its nearest table timestep, as every
ComfyUI sampler), forms ε̂ = (x - x̂_0)/σ_i and, in the VP view x_t = x/√(1+σ_i²) with ᾱ = 1/(1+σ²) and
α = ᾱ_i/ᾱ_{i+1}, takes DDPM's step (its eq. 11, the posterior mean written with ε̂, plus noise of variance
β̃ = (1-α)(1-ᾱ_{i+1})/(1-ᾱ_i) unless σ_{i+1} = 0), then returns to the VE view, x·√(1+σ_{i+1}²). That is
ddpm.sample_ddpm ("fixed_small") on the plan's ᾱ's: its mean, written with x̂_0 (DDPM eq. 7), is the same
posterior mean, and it adds noise on every step but the last, which is the step into σ = 0 on ComfyUI's σ's. So it
runs here with the model asked in the VE view (an inpainting denoiser blends as ComfyUI does) and its state carried
between the views. One evaluation and (but for the last step) one noise draw, σ_i -> σ_{i+1}, per step.
"""

from __future__ import annotations

import math

import torch

from kedavra.diffusion.samplers.ddpm import sample_ddpm
from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.samplers.noise import NoiseSampler
from kedavra.diffusion.samplers.unipc_comfyui import ve_callback
from kedavra.diffusion.timesteps import SamplingPlan


class _VpFromVe:
    """`denoiser` asked in the VP view: (x̂_0, ε̂) at x_t from its VE x̂_0 at x = x_t/√ᾱ, σ = √((1-ᾱ)/ᾱ)."""

    def __init__(self, denoiser: Denoiser):
        self.inner = denoiser

    def vp(self, x_t: torch.Tensor, t: float, alpha_bar: float) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = math.sqrt((1 - alpha_bar) / alpha_bar)
        x = x_t / math.sqrt(alpha_bar)
        x0 = self.inner.ve(x, t, sigma)
        return x0, (x - x0) / sigma  # x = x_0 + σ ε

    def after_step(self, *args) -> torch.Tensor:
        return self.inner.after_step(*args)


def sample_ddpm_comfyui(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise: NoiseSampler = None,
                        callback=None):
    """ComfyUI's ddpm from the VE state x at the plan's first σ to the VE state at its last (module docstring)."""
    x = x / math.sqrt(1 + plan.sigmas[0].item() ** 2)  # x_VP = x_VE √ᾱ
    x = sample_ddpm(_VpFromVe(denoiser), x, plan, noise=noise, callback=ve_callback(callback, plan))
    return x * math.sqrt(1 + plan.sigmas[-1].item() ** 2)
