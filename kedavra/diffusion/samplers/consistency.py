"""Few-step samplers for consistency-distilled models: LCM (and LCM-LoRA, Hyper-SD, Lightning-style), TCD, and the
"LCM" sampler of AUTOMATIC1111's web UI and ComfyUI.

A consistency model f(x_t, t) maps any point of a probability-flow ODE trajectory to its origin x_0 (Song et al.
2023, "Consistency Models", sec. 3). Multistep consistency sampling (their Algorithm 1; Luo et al. 2023, "Latent
Consistency Models", Algorithm 3) alternates a jump to x_0 with re-noising to the next, lower level:

    x̂_0     = f(x_t, t)                                    one evaluation of the model
    x_next  = √ᾱ_next x̂_0 + √(1-ᾱ_next) z,  z ~ N(0, I)    DDPM eq. 4 at the next level; x̂_0 itself on the last step

Symbols (as in kedavra.diffusion.schedule): t an integer training timestep, ᾱ_t alpha_bar, x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε
the VP state. f is built from the network's own x̂_0 with LCM's boundary-condition scalings, see `lcm_scalings`.

Which timesteps: a consistency model is distilled on a coarse grid of `original_steps` (50) training timesteps,
t_j = (j+1)k - 1 with k = ⌊T/original_steps⌋ (LCM sec. 4.3, "skipping-step" k = 20: 19, 39, ..., 999), and an n-step
run takes n of them, evenly spaced in index (`lcm_timesteps`, diffusers' LCMScheduler and TCDScheduler). Image-to-image
keeps only the first ⌊original_steps·strength⌋ grid points and picks the n steps among those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kedavra.diffusion.forward_process import randn_like
from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.samplers.noise import NoiseSampler
from kedavra.diffusion.schedule import NoiseSchedule, check_timesteps
from kedavra.diffusion.timesteps import FINAL_SIGMAS, ZERO_SNR_ALPHA_BAR_FLOOR, SamplingPlan, check_steps
from kedavra.validation import check_bool, check_choice, check_int, check_number, is_int

LCM_ORIGINAL_STEPS = 50  # the distillation grid of LCM / LCM-LoRA (diffusers' original_inference_steps default)
LCM_SIGMA_DATA = 0.5  # σ_data of the boundary-condition scalings (Song et al. 2023, appendix C; LCM's code)
LCM_TIMESTEP_SCALING = 10.0  # t is scaled by 10 before c_skip/c_out (LCM's code; diffusers' timestep_scaling)
TCD_GAMMA = 0.3  # TCD's default stochasticity γ (diffusers' TCDScheduler.step eta; Zheng et al. 2024's examples)
LCM_SIGMA_SPACINGS = ("normal", "sgm_uniform", "simple")  # ComfyUI scheduler names; "normal" is also A1111's


@dataclass(frozen=True)
class ConsistencyPlan(SamplingPlan):
    """A SamplingPlan on integer timesteps that also carries the training schedule's ᾱ_t, t = 0..T-1, shape (T,)
    float64: TCD re-noises from intermediate timesteps s that are not in the plan and reads ᾱ_s there."""

    train_alpha_bar: torch.Tensor | None = None  # always set by make_consistency_plan; kept by start_at


def _even_picks(table: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` entries of a descending table, at indices ⌊i·L/steps⌋, i = 0..steps-1, with L = len(table).

    The product i·(L/steps) is a float64 product rounded before the floor, as numpy's linspace(0, L, steps,
    endpoint=False) in LCM's reference code computes it: for some (L, steps), e.g. (30, 22), the exact integer
    ⌊i·L/steps⌋ is one higher."""
    positions = torch.arange(steps, dtype=torch.float64) * (len(table) / steps)
    return table[positions.floor().long()]


def _check_strength(strength) -> float:
    return check_number("strength", strength, 0, 1, low_inclusive=False)


def lcm_timesteps(schedule: NoiseSchedule, steps: int, original_steps: int = LCM_ORIGINAL_STEPS,
                  strength: float = 1.0) -> torch.Tensor:
    """The n integer timesteps (float64, descending, shape (steps,)) of an LCM run, as diffusers' LCMScheduler
    `set_timesteps(steps, original_inference_steps=original_steps, strength=strength)` picks them.

    The distillation grid is t_j = (j+1)k - 1, k = ⌊T/original_steps⌋, for j < ⌊original_steps·strength⌋ (LCM
    sec. 4.3); the run takes `steps` of them, evenly spaced in index from the top. So steps may not exceed
    ⌊original_steps·strength⌋ (at most original_steps: raise original_steps for longer runs). LCMScheduler's
    timestep_spacing and steps_offset play no part. Image-to-image starts the run from the first returned timestep.
    """
    T = schedule.num_train_timesteps
    original_steps = check_int("original_steps", original_steps, 1, T, note=" (the distillation grid size)")
    strength = _check_strength(strength)
    k = T // original_steps
    grid = torch.arange(int(original_steps * strength), dtype=torch.float64) * k + (k - 1)  # 19, 39, ..., 999
    _check_steps_in_grid(steps, len(grid), original_steps, strength)
    return _even_picks(grid.flip(0), steps)


def tcd_timesteps(schedule: NoiseSchedule, steps: int, original_steps: int = LCM_ORIGINAL_STEPS,
                  strength: float = 1.0, every_timestep: bool = False) -> torch.Tensor:
    """The n integer timesteps (float64, descending) of a TCD run, as diffusers' TCDScheduler picks them.

    By default these are `lcm_timesteps` (TCDScheduler's `set_timesteps(steps)` with original_inference_steps from
    its config). every_timestep: pick from all T training timesteps below ⌊T·strength⌋ instead of the distillation
    grid (what TCDScheduler does when `set_timesteps` is passed original_inference_steps explicitly: for 4 steps,
    999, 749, 499, 249); steps must still be <= original_steps.
    """
    if not check_bool("every_timestep", every_timestep):
        return lcm_timesteps(schedule, steps, original_steps, strength)
    T = schedule.num_train_timesteps
    original_steps = check_int("original_steps", original_steps, 1, note=" (the most steps allowed)")
    strength = _check_strength(strength)
    grid = torch.arange(int(T * strength), dtype=torch.float64)  # 0, 1, ..., ⌊T·strength⌋ - 1
    _check_steps_in_grid(steps, min(len(grid), original_steps), original_steps, strength)
    return _even_picks(grid.flip(0), steps)


def _check_steps_in_grid(steps, available: int, original_steps: int, strength: float) -> None:
    if available == 0:
        raise ValueError(f"strength {strength} keeps no timestep of the {original_steps}-step grid; "
                         f"use strength >= {1 / original_steps:.3g}")
    if not is_int(steps) or not 1 <= steps <= available:
        raise ValueError(f"steps must be an integer from 1 to {available}, got {steps!r}: a consistency model takes "
                         f"its steps from a grid of {available} timesteps ({original_steps} original steps at "
                         f"strength {strength}); raise original_steps or strength for more")


def make_consistency_plan(schedule: NoiseSchedule, timesteps: torch.Tensor,
                          final_sigma: str = "zero") -> ConsistencyPlan:
    """A plan visiting the given integer timesteps (descending), with the training schedule's ᾱ table attached.

    final_sigma: "zero" ends on the clean sample (ᾱ = 1; diffusers' LCMScheduler returns its last x̂_0 there);
    "sigma_min" ends on t = 0 (ᾱ_0, where diffusers' TCDScheduler ends: its last step lands on t = 0).
    """
    check_choice("final_sigma", final_sigma, FINAL_SIGMAS)
    timesteps = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
    check_timesteps(timesteps, schedule.num_train_timesteps)
    if len(timesteps) == 0 or (timesteps != timesteps.round()).any() or (timesteps.diff() >= 0).any():
        raise ValueError(f"timesteps must be integers in strictly descending order, got {timesteps.tolist()}")
    final = torch.ones(1, dtype=torch.float64) if final_sigma == "zero" else schedule.alpha_bar[:1]
    alpha_bar = torch.cat([schedule.alpha_bar[timesteps.long()], final])
    floored = alpha_bar.clamp(min=ZERO_SNR_ALPHA_BAR_FLOOR)
    return ConsistencyPlan(timesteps, alpha_bar, ((1 - floored) / floored).sqrt(),
                           train_alpha_bar=schedule.alpha_bar)


def lcm_scalings(t: float) -> tuple[float, float]:
    """LCM's boundary-condition scalings (c_skip, c_out) at timestep t, with τ = 10 t (LCM_TIMESTEP_SCALING):

        c_skip = σ_d² / (τ² + σ_d²),   c_out = τ / √(τ² + σ_d²),   σ_d = 0.5

    so that f(x, 0) = x (Song et al. 2023, eq. 5 and appendix C, with ε = 0). This c_out is LCM's code's (and
    diffusers', A1111's, ComfyUI's); Song et al.'s is σ_d (t - ε)/√(σ_d² + t²), with an extra factor σ_d.
    """
    tau = t * LCM_TIMESTEP_SCALING
    c_skip = LCM_SIGMA_DATA**2 / (tau**2 + LCM_SIGMA_DATA**2)
    c_out = tau / (tau**2 + LCM_SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def sample_lcm(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None) -> torch.Tensor:
    """Multistep latent consistency sampling (Luo et al. 2023, Algorithm 3), in the VP view:

        x̂_0    = c_skip(t) x_t + c_out(t) x̂_θ(x_t, t)                 (LCM sec. 4.1: f_θ from the network's x̂_0)
        x_next = √ᾱ_next x̂_0 + √(1-ᾱ_next) z                          (fresh z each step; none when ᾱ_next = 1)

    With a `make_consistency_plan` plan (final ᾱ = 1) the last step returns its x̂_0: diffusers' LCMScheduler.
    The reported x0 is the consistency estimate f, not the network's raw x̂_θ.
    """
    n = len(plan)
    for i in range(n):
        t, alpha_bar, alpha_bar_next = plan.timesteps[i].item(), plan.alpha_bar[i].item(), plan.alpha_bar[i + 1].item()
        network_x0, _ = denoiser.vp(x, t, alpha_bar)
        c_skip, c_out = lcm_scalings(t)
        x0 = c_skip * x + c_out * network_x0
        x_next = x0
        if alpha_bar_next < 1:
            z = noise(x, plan.sigmas[i].item(), plan.sigmas[i + 1].item())
            x_next = alpha_bar_next**0.5 * x0 + (1 - alpha_bar_next) ** 0.5 * z
        x = denoiser.after_step(callback, i, n, x_next, x0)
    return x


def tcd_intermediate_timestep(t_next: float, gamma: float) -> int:
    """TCD's s = ⌊(1-γ) t_next⌋ (Zheng et al. 2024, strategic stochastic sampling), evaluated in float32 as TCD's
    reference code (diffusers' TCDScheduler) does: there (1-γ) and t meet as float32, so where (1-γ)·t lies within
    float32 rounding of an integer the floor comes out one higher than in exact arithmetic (for γ = 0.3 never on
    the 50-step grid, whose timesteps end in 9)."""
    product = torch.tensor(1 - gamma, dtype=torch.float32) * torch.tensor(t_next, dtype=torch.float32)
    return int(product.floor().item())


def sample_tcd(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None,
               gamma: float = TCD_GAMMA) -> torch.Tensor:
    """Strategic stochastic sampling of Trajectory Consistency Distillation (Zheng et al. 2024), in the VP view.

    Each step jumps along the trajectory from t to an intermediate s = ⌊(1-γ) t_next⌋ <= t_next with the
    first-order (DDIM) form of TCD's trajectory consistency function, then re-noises forward from s to t_next:

        x_s    = √ᾱ_s x̂_0 + √(1-ᾱ_s) ε̂                                    (DDIM eq. 12 with σ_t = 0, from t to s)
        x_next = √(ᾱ_next/ᾱ_s) x_s + √(1 - ᾱ_next/ᾱ_s) z                  (q(x_next | x_s): DDPM eq. 2, s to next)

    γ = 0 is deterministic DDIM on the plan's timesteps; γ = 1 jumps to t = 0 and re-noises, as LCM does. The last
    step lands on the plan's final level without noise: with final_sigma="sigma_min" (t = 0) as diffusers'
    TCDScheduler (eta = γ) ends. γ > 0 needs a `make_consistency_plan` plan (ᾱ at the intermediate s).
    """
    gamma = check_number("gamma", gamma, 0, 1)
    n = len(plan)
    table = getattr(plan, "train_alpha_bar", None)  # (T,) ᾱ of the training schedule
    if gamma > 0 and n > 1 and table is None:
        raise ValueError(f"TCD with gamma={gamma} needs ᾱ at timesteps between the plan's; build the plan with "
                         "make_consistency_plan (a ConsistencyPlan), or use gamma=0")
    for i in range(n):
        t, alpha_bar, alpha_bar_next = plan.timesteps[i].item(), plan.alpha_bar[i].item(), plan.alpha_bar[i + 1].item()
        x0, eps = denoiser.vp(x, t, alpha_bar)
        stochastic = gamma > 0 and i < n - 1
        alpha_bar_s = alpha_bar_next
        if stochastic:
            alpha_bar_s = table[tcd_intermediate_timestep(plan.timesteps[i + 1].item(), gamma)].item()
        x_next = alpha_bar_s**0.5 * x0 + (1 - alpha_bar_s) ** 0.5 * eps
        if stochastic:
            ratio = alpha_bar_next / alpha_bar_s
            z = noise(x, plan.sigmas[i].item(), plan.sigmas[i + 1].item())
            x_next = ratio**0.5 * x_next + (1 - ratio) ** 0.5 * z
        x = denoiser.after_step(callback, i, n, x_next, x0)
    return x


# --- The "LCM" sampler of AUTOMATIC1111's web UI and ComfyUI: the same idea in the VE view -------------------------

def sample_lcm_kdiffusion(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, generator=None, callback=None,
                          noise: NoiseSampler | None = None, boundary: bool = True) -> torch.Tensor:
    """The LCM loop of A1111 (modules/sd_samplers_lcm.py) and ComfyUI (comfy/k_diffusion/sampling.py, sample_lcm),
    a k-diffusion-style sampler over σ in the VE view x = x_0 + σ ε:

        x̂_0    = c_skip(t_i) x + c_out(t_i) D(x; σ_i)       (boundary; D = denoiser.ve, Karras et al. 2022 eq. 7)
        x      = x̂_0 + σ_{i+1} z                            (no noise where σ_{i+1} = 0)

    The model runs at plan.timesteps[i] with input x/√(σ_i²+1), where σ_i = plan.sigmas[i] need not be that
    timestep's own σ (see `make_lcm_sigma_plan`). boundary: apply LCM's scalings as A1111's LCMCompVisDenoiser and
    ComfyUI's "lcm" model sampling do, c_skip multiplying the VE state x (diffusers' LCMScheduler multiplies the
    VP x_t; c_skip <= 7e-6 on the 50-step grid); False is ComfyUI's "lcm" sampler on an unpatched model.
    noise(x, σ_i, σ_{i+1}) returns standard normal noise shaped like x (default: `randn_like(x, generator)`).
    """
    check_bool("boundary", boundary)
    if noise is None:
        def noise(x, sigma, sigma_next):
            return randn_like(x, generator)
    n = len(plan)
    for i in range(n):
        t, sigma, sigma_next = plan.timesteps[i].item(), plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x0 = denoiser.ve(x, t, sigma)
        if boundary:
            c_skip, c_out = lcm_scalings(t)
            x0 = c_skip * x + c_out * x0
        x_next = x0 + sigma_next * noise(x0, sigma, sigma_next) if sigma_next > 0 else x0
        x = denoiser.after_step(callback, i, n, x_next, x0)
    return x


def make_lcm_sigma_plan(schedule: NoiseSchedule, steps: int, spacing: str = "normal",
                        original_steps: int = LCM_ORIGINAL_STEPS) -> SamplingPlan:
    """The σ's and model timesteps of A1111's "LCM" sampler and of ComfyUI with "lcm" model sampling.

    Both replace the model's σ table by the distillation grid's, σ_j = σ(t_j) at t_j = (j+1)k - 1, j = 0..49
    (k = ⌊T/original_steps⌋; A1111's LCMCompVisDenoiser, ComfyUI's ModelSamplingDiscreteDistilled), with
      σ(t)      log-linear interpolation in that table at fractional index u = clamp((t - (k-1))/k, 0, 49)
      t(σ)      the grid timestep nearest in log σ, (j+1)k - 1 with j = round(u) (an exact tie, e.g. u = 24.5,
                goes to the lower j here; there float32 rounding decides)
    spacing (timesteps t in [k-1, T-1] before σ(t)):
      "normal"       t = linspace(T-1, k-1, steps): A1111's "Automatic" scheduler for LCM, ComfyUI's "normal"
      "sgm_uniform"  t = linspace(T-1, k-1, steps+1) without its last point (ComfyUI's "sgm_uniform")
      "simple"       the grid's own σ at j = 49 - ⌊i·50/steps⌋ (ComfyUI's "simple"; the timesteps of `lcm_timesteps`)
    plan.timesteps are t(σ_i), plan.sigmas the σ_i (σ_n = 0), plan.alpha_bar = 1/(1+σ²). With original_steps = T
    the table is the model's own: ComfyUI's "lcm" sampler on an unpatched model (with boundary=False).
    """
    T = schedule.num_train_timesteps
    check_steps(steps, T)
    check_choice("LCM sigma spacing", spacing, LCM_SIGMA_SPACINGS)
    original_steps = check_int("original_steps", original_steps, 1, T, note=" (the distillation grid size)")
    k = T // original_steps
    grid = torch.arange(original_steps) * k + (k - 1)  # 19, 39, ..., 999
    log_sigmas = schedule.sigmas.clamp(max=ZERO_SNR_ALPHA_BAR_FLOOR**-0.5)[grid].log()  # (original_steps,)
    top = original_steps - 1
    if spacing == "simple":
        u = top - (torch.arange(steps, dtype=torch.float64) * (original_steps / steps)).floor()
    else:
        count = steps + 1 if spacing == "sgm_uniform" else steps
        t = torch.linspace(float(grid[-1]), float(grid[0]), count, dtype=torch.float64)[:steps]
        u = ((t - (k - 1)) / k).clamp(0, top)
    low, high = u.floor().long(), u.ceil().long()
    w = u - low
    sigmas = ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
    nearest = (u - 0.5).ceil().long().clamp(0, top)  # round half down
    timesteps = (nearest * k + (k - 1)).to(torch.float64)
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
    return SamplingPlan(timesteps, 1 / (1 + sigmas**2), sigmas)
