"""Which timesteps a sampler visits: spacings, Karras σ, and starting part-way for image-to-image.

A sampler with n steps evaluates the model at n training timesteps t_0 > t_1 > ... > t_{n-1} and moves
the sample through the noise levels σ_0 > σ_1 > ... > σ_{n-1} > σ_n, where σ_n is the level it ends on
(0, the clean sample, by default). `SamplingPlan` holds both, plus ᾱ at each level.

Spacings (the names diffusers' `timestep_spacing` uses; Lin et al. 2023, table 2, compares them):
    leading   t_i = (n-1-i)·⌊T/n⌋ + offset       SD 1.x/2.x's default, with steps_offset = 1
    trailing  t_i = round(T - i·T/n) - 1          starts at the last step t = T-1 (needed with zero terminal SNR)
    linspace  t_i = round(linspace(T-1, 0, n))
diffusers' multistep solvers (DPMSolverMultistepScheduler, UniPCMultistepScheduler) take n of n+1 points instead
(`solver_grid`; "trailing" is unchanged):
    leading   t_i = (n-i)·⌊T/(n+1)⌋ + offset
    linspace  t_i = round(linspace(0, T-1, n+1))[n-i]
TIMESTEP_RULES: "kedavra" builds every sampler's plan by the one rule above; "diffusers" by the rules diffusers'
scheduler of each sampler applies to a model folder's scheduler_config.json (registry.sample's diffusers_rules).
Karras σ (Karras et al. 2022, eq. 5, ρ = 7) replaces the σ's of the spaced steps by
σ_i = (σ_max^{1/ρ} + i/(n-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ between the same end points, evaluated at the
fractional timesteps whose σ these are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from kedavra.diffusion.schedule import NoiseSchedule
from kedavra.validation import check_choice, check_int, check_number

SPACINGS = ("leading", "trailing", "linspace")
TIMESTEP_RULES = ("kedavra", "diffusers")
FINAL_SIGMAS = ("zero", "sigma_min")
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5 and table 1
# ᾱ floor where the σ-space samplers meet a zero-terminal-SNR schedule (σ = ∞ there): the value
# diffusers uses (2^-24, about fp32's resolution near 1), giving σ_max ≈ 4096.
ZERO_SNR_ALPHA_BAR_FLOOR = 2.0**-24


@dataclass(frozen=True)
class SamplingPlan:
    """timesteps (n,) float64; alpha_bar and sigmas (n+1,) float64: level of step i and the final level.

    `alpha_bar` is exact (0 at a zero-terminal-SNR start); `sigmas` is √((1-ᾱ)/ᾱ) with ᾱ floored at
    ZERO_SNR_ALPHA_BAR_FLOOR so σ stays finite for the σ-space samplers.
    """

    timesteps: torch.Tensor
    alpha_bar: torch.Tensor
    sigmas: torch.Tensor
    sigma_to_t: Callable[[float], float] | None = None  # the timestep of any σ, for evaluations between levels

    def __len__(self) -> int:
        return len(self.timesteps)

    def start_at(self, index: int) -> SamplingPlan:
        """The plan from step `index` on (image-to-image starts part-way)."""
        return replace(self, timesteps=self.timesteps[index:], alpha_bar=self.alpha_bar[index:],
                       sigmas=self.sigmas[index:])

    def t_at(self, sigma: float) -> float:
        """The timestep at which to evaluate the model for noise level σ (second-order samplers evaluate between
        the plan's levels); ValueError for a plan that has no σ -> t map."""
        if self.sigma_to_t is None:
            raise ValueError("this sampler evaluates the model between the plan's levels; its plan needs sigma_to_t")
        return self.sigma_to_t(sigma)


def check_steps(steps, num_train_timesteps: int) -> None:
    """Raise ValueError unless 1 <= steps <= num_train_timesteps."""
    check_int("steps", steps, 1, num_train_timesteps)


def spaced_timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "leading", steps_offset: int = 0,
                     solver_grid: bool = False):
    """Integer timesteps, descending, shape (steps,), by the named spacing (see the module docstring);
    solver_grid: the first n of n+1 points, as diffusers' multistep solvers space "leading" and "linspace"."""
    T = schedule.num_train_timesteps
    check_steps(steps, T)
    check_choice("timestep spacing", spacing, SPACINGS)
    points = steps + 1 if solver_grid and spacing != "trailing" else steps
    if spacing == "leading":
        ratio = T // points
        timesteps = torch.arange(points - 1, points - 1 - steps, -1, dtype=torch.float64) * ratio + steps_offset
    elif spacing == "trailing":
        timesteps = torch.round(T - torch.arange(steps, dtype=torch.float64) * (T / steps)) - 1
    else:  # linspace
        timesteps = torch.linspace(T - 1, 0, points, dtype=torch.float64).round()[:steps]
        if solver_grid:  # diffusers rounds the ascending linspace(0, T-1, n+1), which differs at exact halves
            timesteps = torch.linspace(0, T - 1, points, dtype=torch.float64).round().flip(0)[:steps]
    if timesteps.max() > T - 1:
        raise ValueError(f"steps_offset {steps_offset} puts the first timestep past {T - 1}; lower it")
    return timesteps


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = KARRAS_RHO) -> torch.Tensor:
    """σ_i = (σ_max^{1/ρ} + i/(n-1)(σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, i = 0..n-1 (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def make_plan(
    schedule: NoiseSchedule,
    steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    karras: bool = False,
    final_sigma: str = "zero",
    solver_grid: bool = False,
) -> SamplingPlan:
    """The timesteps and noise levels of an n-step sampler (see the module docstring).

    final_sigma: "zero" ends on the clean sample (σ_n = 0, ᾱ_n = 1); "sigma_min" ends on the training
    schedule's first level σ_n = σ(t=0) (DDIM's `set_alpha_to_one=False`, as Stable Diffusion's config has it).
    solver_grid: diffusers' multistep solvers' rules (DPMSolverMultistepScheduler, UniPCMultistepScheduler): n of
    n+1 spaced points (spaced_timesteps), and with Karras σ's the end points of the whole table, σ(0) and σ(T-1),
    whatever the spacing, evaluated at timesteps rounded to integers (not for the cosine schedule).
    """
    check_choice("final_sigma", final_sigma, FINAL_SIGMAS)
    timesteps = spaced_timesteps(schedule, steps, spacing, steps_offset, solver_grid)
    alpha_bar = schedule.alpha_bar[timesteps.long()]
    if karras:
        ends = schedule.alpha_bar[[0, -1]] if solver_grid else alpha_bar[[-1, 0]]  # (σ_min's ᾱ, σ_max's ᾱ)
        floored = ends.clamp(min=ZERO_SNR_ALPHA_BAR_FLOOR)
        sigma_ends = ((1 - floored) / floored).sqrt()
        sigmas = karras_sigmas(sigma_ends[0].item(), sigma_ends[1].item(), steps)
        timesteps = schedule.sigma_to_t(sigmas, alpha_bar_floor=ZERO_SNR_ALPHA_BAR_FLOOR)
        if solver_grid and schedule.kind != "cosine":
            timesteps = timesteps.round()
        alpha_bar = 1 / (1 + sigmas**2)
    final = torch.ones(1, dtype=torch.float64) if final_sigma == "zero" else schedule.alpha_bar[:1]
    alpha_bar = torch.cat([alpha_bar, final])
    floored = alpha_bar.clamp(min=ZERO_SNR_ALPHA_BAR_FLOOR)
    sigmas = ((1 - floored) / floored).sqrt()
    return SamplingPlan(timesteps, alpha_bar, sigmas)


def start_index_for_strength(steps: int, strength: float) -> int:
    """First step of an image-to-image run: strength 1 starts from pure noise (index 0), strength s runs
    the last ⌊s·n⌋ of the n steps (the convention of SD's img2img scripts and diffusers)."""
    check_number("strength", strength, 0, 1)
    denoise_steps = min(int(steps * strength), steps)
    if denoise_steps == 0:
        raise ValueError(
            f"strength {strength} with {steps} steps leaves no step to run; use strength >= {1 / steps:.3g} "
            "or more steps"
        )
    return steps - denoise_steps
