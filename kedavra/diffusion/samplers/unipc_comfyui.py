"""ComfyUI's "uni_pc" and "uni_pc_bh2": kedavra's UniPC (unipc.py) on ComfyUI's σ's, taking and returning the VE
state as ComfyUI's other samplers do.

What ComfyUI's sample_unipc (comfy/extra_samplers/uni_pc.py, its copy of Zhao et al.'s UniPC) computes, from its code:
    - its UniPC "time" is σ itself (SigmaConvert: √ᾱ = 1/√(1+σ²), λ = -log σ), the model is called at σ (so at its
      nearest table timestep, as every ComfyUI sampler), and the state is the VP one, x_VE/√(1+σ_0²) at the start;
    - a final σ = 0 becomes COMFYUI_UNIPC_FINAL_SIGMA (λ must stay finite): the last step is an ordinary UniP step
      to that level, not x̂_0, and the result is the VE state there, x_VP·√(1+σ²) (ComfyUI divides by its √ᾱ);
    - multistep UniPC (Zhao et al. 2023, Algorithms 1-2), data prediction (predict_x0=True), B(h) "bh1" (uni_pc) or
      "bh2" (uni_pc_bh2), order min(3, n-1) for n steps, lower_order_final, UniC after every step but the last (no
      model runs at the final level): n evaluations. That is sample_unipc(order=3, lower_order_final=True) for every
      n >= 2, since its step orders min(3, i+1, n-i) never exceed n-1;
    - one step (n = 1: KSampler builds 2 σ's and drops the penultimate, leaving [σ_0, 0]; with denoise < 1 the last
      two of a longer sequence): its order is min(3, 0) = 0, and its loop's first pass only evaluates the model (the
      x̂_0 its callback shows) and takes no step, so the result is the start state rescaled, x_VE·√(1+σ_last²)/
      √(1+σ_0²) (its final division by √ᾱ at 0.001): about the unit noise at denoise 1, not an image. Reproduced
      here as it is (`sample_unipc_comfyui`), whatever it looks like: a user compares images;
    - KSampler drops the penultimate σ for both (comfy/samplers.py, DISCARD_PENULTIMATE_SIGMA_SAMPLERS), as for
      dpm_2: that is the σ sequence's business (k_diffusion.KSamplerSpec), not this module's.

ComfyUI computes in float32, and its λ at σ = 0.001 comes out as that of σ ≈ 0.00097656 (1 - ᾱ rounds to 2⁻²⁰, so
√(1-ᾱ) = 2⁻¹⁰): the level reproduced here is that one, COMFYUI_UNIPC_LAST_LEVEL (the rest of ComfyUI's float32
rounding is not). Against a float32 transcription of ComfyUI's loop the result is then within 2e-6
(tests/test_comfyui_samplers.py); ending at σ = 0.001 itself it would be 8e-6 away.
"""

from __future__ import annotations

import math

import torch

from kedavra.diffusion.samplers.denoiser import Denoiser, StepCallback, StepRecord, with_state
from kedavra.diffusion.samplers.unipc import UNIPC_VARIANTS, sample_unipc
from kedavra.diffusion.timesteps import SamplingPlan
from kedavra.validation import check_choice

COMFYUI_UNIPC_ORDER = 3  # ComfyUI's sample_unipc: order min(3, steps - 1)
COMFYUI_UNIPC_FINAL_SIGMA = 0.001  # what ComfyUI's sample_unipc puts in place of a final σ = 0
# The VE level ComfyUI's float32 arithmetic lands on for σ = 0.001: its √(1-ᾱ) = √(1 - exp(log(1/(1+σ²)))) is
# exactly 2⁻¹⁰ in float32, so its λ and last step are those of σ = 2⁻¹⁰/√(1 - 2⁻²⁰)
COMFYUI_UNIPC_LAST_LEVEL = 2.0**-10 / math.sqrt(1 - 2.0**-20)


def comfyui_unipc_plan(plan: SamplingPlan) -> SamplingPlan:
    """The plan ComfyUI's UniPC runs for the σ's of `plan` (a VE plan from k_diffusion.plan_from_sigmas): the same
    levels and model timesteps, a final σ = 0 replaced by ComfyUI's 0.001 (COMFYUI_UNIPC_LAST_LEVEL, as its float32
    arithmetic evaluates it)."""
    sigmas = plan.sigmas.clone()
    if sigmas[-1] == 0:
        sigmas[-1] = COMFYUI_UNIPC_LAST_LEVEL
    return SamplingPlan(plan.timesteps, 1 / (1 + sigmas**2), sigmas, plan.sigma_to_t)


def ve_callback(callback: StepCallback | None, plan: SamplingPlan) -> StepCallback | None:
    """`callback` seeing the state after each step in the VE view, x_VE = x_VP·√(1+σ²); a tensor it returns goes
    back to the VP view."""
    if callback is None:
        return None

    def report(step: StepRecord):
        scale = math.sqrt(1 + plan.sigmas[step.index + 1].item() ** 2)
        replacement = callback(with_state(step, step.x * scale))
        return replacement / scale if isinstance(replacement, torch.Tensor) else replacement

    return report


def sample_unipc_comfyui(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None, *,
                         variant: str = "bh1"):
    """ComfyUI's uni_pc (variant "bh1") / uni_pc_bh2 ("bh2") from the VE state x at the plan's first σ to the VE
    state at its last (module docstring); a one-step plan evaluates the model once and keeps the state, as ComfyUI's
    order-0 run does. `noise` is unused (the sampler is deterministic)."""
    variant = check_choice("UniPC variant", variant, UNIPC_VARIANTS)
    plan = comfyui_unipc_plan(plan)
    x = x / math.sqrt(1 + plan.sigmas[0].item() ** 2)  # x_VP = x_VE √ᾱ
    callback = ve_callback(callback, plan)
    if len(plan) == 1:  # ComfyUI's order min(3, 0) = 0: its first pass evaluates the model and takes no step
        x0 = denoiser.vp(x, plan.timesteps[0].item(), 1 / (1 + plan.sigmas[0].item() ** 2))[0]
        x = denoiser.after_step(callback, 0, 1, x, x0)
    else:
        x = sample_unipc(denoiser, x, plan, callback=callback, order=COMFYUI_UNIPC_ORDER, variant=variant,
                         lower_order_final=True)
    return x * math.sqrt(1 + plan.sigmas[-1].item() ** 2)  # x_VE = x_VP / √ᾱ at the last level
