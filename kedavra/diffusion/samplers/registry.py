"""The sampler table (names from kedavra, diffusers, A1111 and ComfyUI) and `sample`, the one entry point."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kedavra.diffusion.forward_process import add_noise, check_finite
from kedavra.diffusion.samplers.consistency import (
    TCD_GAMMA,
    lcm_timesteps,
    make_consistency_plan,
    sample_lcm,
    sample_tcd,
    tcd_timesteps,
)
from kedavra.diffusion.samplers.ddpm import sample_ddim, sample_ddpm
from kedavra.diffusion.samplers.denoiser import Denoiser, Model, StepCallback, StepRecord, with_state
from kedavra.diffusion.samplers.dpm_solver import sample_dpmpp_2m, sample_dpmpp_2m_sde
from kedavra.diffusion.samplers.euler import Churn, sample_euler, sample_euler_ancestral, sample_heun
from kedavra.diffusion.samplers.k_diffusion import (
    A1111_ETA_ANCESTRAL,
    K_SAMPLERS,
    KSamplerSpec,
    prepare_k_run,
    run_k_sampler,
)
from kedavra.diffusion.samplers.noise import NoiseSampler, generator_noise
from kedavra.diffusion.samplers.pndm import pndm_plan, sample_pndm
from kedavra.diffusion.samplers.unipc import sample_unipc
from kedavra.diffusion.schedule import SCHEDULE_PRESETS, NoiseSchedule
from kedavra.diffusion.sigmas import a1111_img2img_steps
from kedavra.diffusion.timesteps import (
    SPACINGS,
    ZERO_SNR_ALPHA_BAR_FLOOR,
    SamplingPlan,
    make_plan,
    start_index_for_strength,
)
from kedavra.validation import check_choice, check_number


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: its function, the view its state lives in ("vp" or "ve"), and the names users know."""

    name: str
    fn: Callable
    view: str
    stochastic: bool
    diffusers: str  # the diffusers scheduler (and settings) that computes the same trajectory
    a1111: str  # the name in AUTOMATIC1111's web UI ("" where it has none)
    comfyui: str  # the sampler_name in ComfyUI ("" where it has none)
    evaluations_per_step: int = 1  # Heun: 2 per step, minus one on the last
    extra_evaluations: int = 0  # PNDM: its repeated first step costs one more (runs of 2 steps or more)

    def evaluations(self, steps: int) -> int:
        """Model evaluations for a run of `steps` steps ending at σ = 0."""
        base = steps if self.evaluations_per_step == 1 else 2 * steps - 1
        return base + (self.extra_evaluations if steps > 1 else 0)


SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in [
        SamplerSpec("ddpm", sample_ddpm, "vp", True, "DDPMScheduler", "DDPM", "ddpm"),
        SamplerSpec("ddpm_large", functools.partial(sample_ddpm, variance="fixed_large"), "vp", True,
                    'DDPMScheduler(variance_type="fixed_large")', "", ""),
        SamplerSpec("ddim", sample_ddim, "vp", False, "DDIMScheduler", "DDIM", "ddim"),
        SamplerSpec("euler", sample_euler, "ve", False, "EulerDiscreteScheduler", "Euler", "euler"),
        SamplerSpec("euler_a", sample_euler_ancestral, "ve", True, "EulerAncestralDiscreteScheduler", "Euler a",
                    "euler_ancestral"),
        SamplerSpec("heun", sample_heun, "ve", False, "HeunDiscreteScheduler", "Heun", "heun", 2),
        SamplerSpec("dpmpp_2m", sample_dpmpp_2m, "ve", False, "DPMSolverMultistepScheduler", "DPM++ 2M",
                    "dpmpp_2m"),
        SamplerSpec("dpmpp_2m_sde", sample_dpmpp_2m_sde, "ve", True,
                    'DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")', "DPM++ 2M SDE",
                    "dpmpp_2m_sde"),
        SamplerSpec("unipc", sample_unipc, "vp", False, "UniPCMultistepScheduler", "UniPC", "uni_pc"),
        SamplerSpec("lcm", sample_lcm, "vp", True, "LCMScheduler", "", ""),
        SamplerSpec("tcd", sample_tcd, "vp", True, "TCDScheduler", "", ""),
        # A1111's "PLMS" is its own (CompVis) sampler, reached with a schedule type (k_diffusion.py)
        SamplerSpec("pndm", sample_pndm, "vp", False, "PNDMScheduler(skip_prk_steps=True)", "", "",
                    extra_evaluations=1),
    ]
}

_EXTRA_ALIASES = {"k_euler": "euler", "k_euler_a": "euler_a", "k_euler_ancestral": "euler_a", "k_heun": "heun",
                  "dpm++ 2m": "dpmpp_2m", "dpmsolvermultistep": "dpmpp_2m", "unipcmultistep": "unipc"}
# where diffusers' own rules pick the levels (pndm.py): the evaluation plan comes from pndm_plan
PNDM = "pndm"
# diffusers' multistep solvers: n of n+1 spaced points, and Karras timesteps rounded to integers (diffusers_rules)
MULTISTEP_SOLVERS = ("dpmpp_2m", "dpmpp_2m_sde", "unipc")
# diffusers starts its σ-space schedulers (Euler, Euler a, Heun; not DPM-Solver, which starts from x_T = ε) from
# σ_max·ε, not √(σ_max²+1)·ε, with these spacings (their init_noise_sigma)
SIGMA_MAX_START_SPACINGS = ("linspace", "trailing")
SIGMA_SPACE_SCHEDULERS = ("euler", "euler_a", "heun")
SET_ALPHA_TO_ONE_SAMPLERS = ("ddim", "pndm")  # diffusers' schedulers with set_alpha_to_one (their final level)


def _normalise(name: str) -> str:
    return " ".join(name.strip().lower().replace("-", " ").split())


def _alias_table() -> dict[str, str]:
    table = {}
    for spec in SAMPLERS.values():
        for alias in (spec.name, spec.a1111, spec.comfyui, spec.diffusers.split("(")[0]):
            if alias and _normalise(alias) not in table:
                table[_normalise(alias)] = spec.name
    table.update({_normalise(k): v for k, v in _EXTRA_ALIASES.items()})
    return table


_ALIASES = _alias_table()


def resolve_sampler(name: str) -> tuple[SamplerSpec, bool]:
    """(spec, karras) for a sampler name of kedavra, diffusers, A1111 or ComfyUI, case-insensitive.

    A trailing " Karras" (A1111's "DPM++ 2M Karras") or "_karras" asks for Karras σ spacing."""
    if not isinstance(name, str):
        raise ValueError(f"sampler must be a name (str), got {name!r}")
    key = _normalise(name)
    karras = False
    for suffix in (" karras", "_karras"):
        if key.endswith(suffix):
            key, karras = key[: -len(suffix)].strip(), True
    if key not in _ALIASES:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)} "
                         "(or their diffusers / A1111 / ComfyUI names, optionally with ' Karras')")
    return SAMPLERS[_ALIASES[key]], karras


ETA_SAMPLERS = ("ddim", "tcd")  # DDIM's η; TCD's γ (diffusers' TCDScheduler calls it eta too)
CONSISTENCY_SAMPLERS = ("lcm", "tcd")  # their own timesteps from the distillation grid (consistency.py)


def check_eta(spec: SamplerSpec, eta) -> float:
    """DDIM's η (Song et al. 2021, eq. 16), or TCD's γ (Zheng et al. 2024; 0 means its default 0.3): a number in
    [0, 1] (η may exceed 1 for DDIM), and only for those samplers."""
    eta = check_number("eta", eta, low=0, high=None if spec.name == "ddim" else 1)
    if eta and spec.name not in ETA_SAMPLERS:
        raise ValueError(f"eta={eta} applies only to the {' and '.join(ETA_SAMPLERS)} samplers, not {spec.name!r}")
    return eta


def sample(
    model: Model,
    noise: torch.Tensor,
    *,
    sampler: str = "euler",
    steps: int = 20,
    schedule: NoiseSchedule = SCHEDULE_PRESETS["sd"],
    prediction_type: str = "eps",
    spacing: str = "leading",
    steps_offset: int = 0,
    karras: bool = False,
    final_sigma: str = "zero",
    eta: float = 0.0,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    schedule_type: str | None = None,
    convention: str = "a1111",
    noise_sampler: NoiseSampler | None = None,
    brownian: Callable | None = None,
    sdxl: bool = False,
    diffusers_rules: bool = False,
    sigmas=None,
    fix_steps: bool = False,
    churn: Churn | None = None,
    eta_ancestral: float = A1111_ETA_ANCESTRAL,
    inpaint_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the reverse process from `noise` (standard normal, the shape of a sample) to a sample.

    init/strength: image-to-image; the run starts part-way, at the step a fraction `strength` of the way
    from the end, from init noised to that level (x_t = √ᾱ_t init + √(1-ᾱ_t) noise, DDPM eq. 4).
    Without init it starts from x_T = noise (VP), as Stable Diffusion does; so does a mask with strength 1
    (diffusers' inpainting pipelines: `inpaints_from_noise`).
    mask (with init): 1 where to generate, 0 where to keep init, broadcastable to the sample (e.g. (B, 1, h, w)).
    After every step the kept region is replaced by init noised to the next step's level with the same noise,
    so only the masked region is generated (inpainting with an ordinary model, as SD's img2img scripts and
    diffusers' inpainting pipeline do for 4-channel U-Nets).
    callback(step) is called after each step with its `StepRecord` (index, count, t, ᾱ, x_t, x̂_0, new state);
    a tensor it returns replaces the new state. Returns the sample at the final level (the clean
    sample when final_sigma is "zero"; with "sigma_min" the state at σ(t=0) in the sampler's view).

    schedule_type: run the sampler as A1111 (convention "a1111") or ComfyUI ("comfyui") does, on the σ's of this
    schedule type ("Automatic", "Karras", "sgm_uniform", ...; kedavra.diffusion.sigmas) built from the model's σ
    table (kedavra.diffusion.samplers.k_diffusion): `sampler` is then an A1111 label or ComfyUI name, spacing,
    steps_offset, karras and final_sigma do not apply, and strength follows that program's img2img rule.
    noise_sampler: where ancestral steps draw fresh noise (default: `generator`); brownian(x, σ_min, σ_max): the
    noise of SDE samplers (k-diffusion's seeded Brownian tree; default: noise_sampler). sdxl: picks SDXL's Align
    Your Steps table.

    diffusers_rules: build kedavra's plan as diffusers' scheduler of this sampler builds its timesteps from a model
    folder's config (kedavra.diffusion.timesteps.TIMESTEP_RULES): DPM-Solver++ and UniPC on n of n+1 spaced points
    with Karras timesteps rounded to integers, and the σ-space samplers (Euler, Euler a, Heun) starting from σ_max·ε
    with "linspace" and "trailing" spacing (diffusers' init_noise_sigma).

    sigmas: explicit noise levels, one per step, descending (diffusers' `sigmas=`; e.g. an optimised schedule,
    kedavra.diffusion.step_schedule): kedavra's plan visits them, the model at each σ's fractional timestep, and
    ends at σ = 0; spacing, steps_offset, karras and final_sigma do not apply, and steps must be len(sigmas).

    fix_steps (with init): image-to-image runs exactly `steps` steps, the last ones of a plan of
    ⌊steps / min(strength, 0.999)⌋ steps (A1111's img2img_fix_steps rule, which its hires fix always follows;
    kedavra.diffusion.sigmas.a1111_img2img_steps) instead of the last ⌊strength·steps⌋ of `steps`. ComfyUI's
    denoise (convention "comfyui") always works this way; the consistency samplers' strength picks among their
    grid and ignores it.

    churn: Karras et al. 2022's stochastic settings (euler.Churn: s_churn, s_tmin, s_tmax, s_noise) for an A1111 /
    ComfyUI run (schedule_type given), handed to the samplers A1111 hands them to; kedavra's plans refuse them.
    eta_ancestral: A1111's η of its ancestral and SDE samplers (its "eta_ancestral" setting, default 1), for an A1111
    run of a sampler that takes one (k_diffusion.KSamplerSpec.eta); refused elsewhere unless it is 1.
    inpaint_noise: the noise of a ComfyUI run's kept region (mask 0) where its sampler draws its own
    (KSamplerSpec.comfyui_inpaint_noise: its "ddim", kedavra.diffusion.rng.comfyui_inpaint_noise(seed, shape)), which
    such a run with a mask needs; refused elsewhere (ComfyUI's other samplers use the initial noise there).
    """
    noise_sampler = noise_sampler or generator_noise(generator)
    if schedule_type is not None:
        return _sample_k(model, noise, sampler, steps, schedule, prediction_type, schedule_type, convention, init,
                         strength, mask, noise_sampler, brownian, callback, sdxl, eta, fix_steps, churn, eta_ancestral,
                         inpaint_noise)
    if inpaint_noise is not None:
        raise ValueError("inpaint_noise applies to ComfyUI's inpainting with its ddim: give a schedule type, e.g. "
                         "normal, and convention 'comfyui' (kedavra's plans noise the kept region with the initial "
                         "noise)")
    if eta_ancestral != A1111_ETA_ANCESTRAL:
        raise ValueError(f"eta_ancestral={eta_ancestral} applies to A1111's ancestral and SDE samplers: give a "
                         "schedule type, e.g. Automatic (kedavra's own samplers take eta)")
    if churn is not None and not churn.is_default:
        raise ValueError("s_churn, s_tmin, s_tmax and s_noise apply to A1111's / ComfyUI's samplers (Euler, Heun, "
                         "DPM2, and s_noise to the ancestral and SDE ones): give a schedule type, e.g. Automatic")
    spec, karras_from_name = resolve_sampler(sampler)
    check_choice("timestep spacing", spacing, SPACINGS)
    eta = check_eta(spec, eta)
    check_finite(noise, "noise")
    run_steps = steps  # with fix_steps, the plan has more steps and the run takes the last run_steps
    fixed = fix_steps and init is not None and spec.name not in CONSISTENCY_SAMPLERS and sigmas is None
    if fixed:
        steps = a1111_img2img_steps(run_steps, strength, fix_steps=True)[0]
    if spec.name in CONSISTENCY_SAMPLERS:  # the distillation grid's timesteps; strength picks among them
        pick = lcm_timesteps if spec.name == "lcm" else tcd_timesteps
        timesteps = pick(schedule, steps, strength=strength if init is not None else 1.0)
        plan = make_consistency_plan(schedule, timesteps, "zero" if spec.name == "lcm" else "sigma_min")
    elif sigmas is not None:
        if spec.name == PNDM or karras or karras_from_name:
            raise ValueError(f"explicit sigmas replace the plan's levels: not with {spec.name}"
                             f"{' and Karras σ' if karras or karras_from_name else ''}")
        plan = plan_from_levels(schedule, sigmas, steps)
    elif spec.name == PNDM:  # diffusers' PNDMScheduler(skip_prk_steps=True): its own evaluations and final level
        if karras or karras_from_name:
            raise ValueError("pndm runs on diffusers' PNDM timesteps; Karras σ's do not apply to it")
        if init is not None:
            raise ValueError("pndm cannot start part-way (its warm-up belongs to the start): for image-to-image use "
                             "ddim, or A1111's PLMS (sampler 'PLMS' with a schedule type)")
        plan = pndm_plan(schedule, steps, steps_offset, skip_prk_steps=True,
                         set_alpha_to_one=final_sigma == "zero", spacing=spacing)
    else:
        multistep = diffusers_rules and spec.name in MULTISTEP_SOLVERS
        plan = make_plan(schedule, steps, spacing, steps_offset, karras or karras_from_name, final_sigma,
                         solver_grid=multistep)
    denoiser = model if isinstance(model, Denoiser) else Denoiser(model, prediction_type)
    if init is not None:
        check_finite(init, "init")
        if init.shape != noise.shape:
            raise ValueError(f"init has shape {tuple(init.shape)} but noise has {tuple(noise.shape)}; they must match")
        if spec.name not in CONSISTENCY_SAMPLERS:
            plan = plan.start_at(steps - run_steps if fixed else start_index_for_strength(steps, strength))
        x = noise if inpaints_from_noise(mask, strength) else add_noise(init, noise, plan.alpha_bar[0].item())
    elif strength != 1.0:
        raise ValueError(f"strength={strength} needs an init sample (image-to-image); without one it must be 1.0")
    else:
        x = noise
    if spec.view == "ve":
        from_noise = init is None or inpaints_from_noise(mask, strength)
        if diffusers_rules and from_noise and spacing in SIGMA_MAX_START_SPACINGS and \
                spec.name in SIGMA_SPACE_SCHEDULERS:
            x = x * plan.sigmas[0].item()  # diffusers' init_noise_sigma = σ_max for these spacings
        else:
            x = x * (1 + plan.sigmas[0].item() ** 2) ** 0.5  # x_VE = x_t / √ᾱ
    if mask is not None:
        callback = _keep_outside_mask(init, noise, mask, plan, spec.view, callback)
    options = {"eta": eta} if spec.name == "ddim" else {"gamma": eta or TCD_GAMMA} if spec.name == "tcd" else {}
    return spec.fn(denoiser, x, plan, noise=noise_sampler, callback=callback, **options)


def inpaints_from_noise(mask: torch.Tensor | None, strength: float) -> bool:
    """Whether a run starts from pure noise although it has an init sample: inpainting (a mask) at full strength,
    as diffusers' inpainting pipelines do (their `is_strength_max`); the init then only supplies the kept region.
    Image to image at strength 1 starts from the init noised to the first level (diffusers' img2img does too)."""
    return mask is not None and strength == 1.0


def plan_from_levels(schedule: NoiseSchedule, sigmas, steps: int) -> SamplingPlan:
    """A plan visiting explicit noise levels (descending, one per step), each evaluated at its fractional timestep,
    then σ = 0; ValueError naming what is wrong."""
    levels = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if len(levels) != steps:
        raise ValueError(f"sigmas gives {len(levels)} levels for {steps} steps; give one per step")
    if not torch.isfinite(levels).all() or (levels <= 0).any() or (levels[1:] >= levels[:-1]).any():
        raise ValueError(f"sigmas must be finite, positive and strictly descending, got {levels.tolist()}")
    timesteps = schedule.sigma_to_t(levels, alpha_bar_floor=ZERO_SNR_ALPHA_BAR_FLOOR)
    sigmas = torch.cat([levels, torch.zeros(1, dtype=torch.float64)])
    return SamplingPlan(timesteps.double(), 1 / (1 + sigmas**2), sigmas)


def _sample_k(model, noise, sampler, steps, schedule, prediction_type, schedule_type, convention, init, strength,
              mask, noise_sampler, brownian, callback, sdxl, eta, fix_steps, churn, eta_ancestral,
              inpaint_noise) -> torch.Tensor:
    """`sample` for an A1111 / ComfyUI run (schedule_type given)."""
    check_finite(noise, "noise")
    if init is not None:
        check_finite(init, "init")
        if init.shape != noise.shape:
            raise ValueError(f"init has shape {tuple(init.shape)} but noise has {tuple(noise.shape)}; they must match")
    run = prepare_k_run(sampler, noise, steps, schedule, schedule_type, convention, init, strength, sdxl, eta,
                        fix_steps, churn, eta_ancestral)
    denoiser = model if isinstance(model, Denoiser) else Denoiser(model, prediction_type)
    if run.spec.cfg_pp:
        denoiser.require_uncond(run.spec.comfyui)
    kept_noise = _kept_region_noise(run.spec, convention, mask, noise, inpaint_noise)
    if mask is None:
        return run_k_sampler(denoiser, run, noise_sampler, brownian, callback)
    _check_mask(init, mask)
    inpainting = InpaintingDenoiser(denoiser, init, mask, kept_noise, convention)
    samples = run_k_sampler(inpainting, run, noise_sampler, brownian, callback)
    return samples * mask + init * (1 - mask) if convention == "a1111" else samples


def _kept_region_noise(spec: KSamplerSpec, convention: str, mask: torch.Tensor | None, noise: torch.Tensor,
                       inpaint_noise: torch.Tensor | None) -> torch.Tensor:
    """The noise ComfyUI's inpainting adds to the kept region's init (x_0 + σ·noise): the initial noise, or
    `inpaint_noise` for a sampler that draws its own (KSamplerSpec.comfyui_inpaint_noise), which that run with a mask
    then needs, cast to the initial noise's dtype and device as ComfyUI casts it; ValueError where it does not
    apply."""
    own = convention == "comfyui" and spec.comfyui_inpaint_noise and mask is not None
    if inpaint_noise is None:
        if own:
            raise ValueError(f"ComfyUI's {spec.comfyui} noises an inpainting mask's kept region with noise of its own "
                             "(torch.randn from seed + 1): give it as inpaint_noise, "
                             "kedavra.diffusion.rng.comfyui_inpaint_noise(seed, noise.shape)")
        return noise
    if not own:
        takers = ", ".join(s.comfyui for s in K_SAMPLERS if s.comfyui_inpaint_noise)
        name = (spec.comfyui if convention == "comfyui" else spec.a1111) or spec.name
        raise ValueError(f"inpaint_noise applies to ComfyUI's {takers} with a mask (convention 'comfyui'), not "
                         f"{name} ({convention}, {'with' if mask is not None else 'without'} a mask)")
    check_finite(inpaint_noise, "inpaint_noise")
    if inpaint_noise.shape != noise.shape:
        raise ValueError(f"inpaint_noise has shape {tuple(inpaint_noise.shape)} but noise has {tuple(noise.shape)}; "
                         "they must match")
    return inpaint_noise.to(noise)


class InpaintingDenoiser:
    """A1111's and ComfyUI's inpainting with an ordinary model, inside the denoiser (not after each step, as
    diffusers' pipelines and kedavra's plans do): mask is 1 where to paint, 0 where to keep init.

    A1111 (modules/sd_samplers_cfg_denoiser.py): the prediction x̂_0 is blended, init where kept, and the final
    sample is blended again (processing.py, StableDiffusionProcessingImg2Img.sample); its CompVis samplers (DDIM,
    PLMS, UniPC: mask_before_denoising) blend the model's input x_t with the clean init instead.
    ComfyUI (comfy/samplers.py, KSamplerX0Inpaint): the input is blended with init noised to the level with the run's
    initial noise (x_0 + σ ε; its ddim's own noise instead: `_kept_region_noise`), and the prediction x̂_0 with init;
    the CFG++ samplers' unconditional x̂_0 is left as the model gave it (ComfyUI's post-CFG hook sees it inside the
    model KSamplerX0Inpaint wraps). Its UniPC, in the VP view, asks the same blend through the VE state
    (uni_pc.py's predict_eps_sigma)."""

    def __init__(self, inner: Denoiser, init: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, convention: str):
        self.inner, self.init, self.mask, self.noise, self.convention = inner, init, mask, noise, convention
        self.prediction_type = inner.prediction_type

    def _keep(self, known: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return known * (1 - self.mask) + x * self.mask

    def _input(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        if self.convention == "comfyui":
            return self._keep(self.init + sigma * self.noise, x)  # ComfyUI's scale_latent_inpaint for ε and v
        return x

    def ve(self, x: torch.Tensor, t: float, sigma: float) -> torch.Tensor:
        return self._keep(self.init, self.inner.ve(self._input(x, sigma), t, sigma))

    def ve_with_uncond(self, x: torch.Tensor, t: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        guided, uncond = self.inner.ve_with_uncond(self._input(x, sigma), t, sigma)
        return self._keep(self.init, guided), uncond

    def vp(self, x_t: torch.Tensor, t: float, alpha_bar: float):
        if self.convention == "comfyui":  # ComfyUI's UniPC: x_VE = x_t/√ᾱ through KSamplerX0Inpaint, ε = (x_VE - x̂_0)/σ
            sigma = math.sqrt((1 - alpha_bar) / alpha_bar)
            x = x_t / math.sqrt(alpha_bar)
            x0 = self.ve(x, t, sigma)
            return x0, (x - x0) / sigma
        return self.inner.vp(self._keep(self.init, x_t), t, alpha_bar)  # A1111's mask_before_denoising

    def after_step(self, *args, **kwargs) -> torch.Tensor:
        return self.inner.after_step(*args, **kwargs)

    @property
    def evaluations(self) -> int:
        return self.inner.evaluations


def _check_mask(init, mask) -> None:
    """ValueError when a mask comes without init, has values outside [0, 1], or does not fit the sample."""
    if init is None:
        raise ValueError("mask needs an init sample (the image whose unmasked part is kept)")
    check_finite(mask, "mask")
    if mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"mask values must lie in [0, 1], got min {mask.min().item()} max {mask.max().item()}")
    try:
        torch.broadcast_shapes(mask.shape, init.shape)
    except RuntimeError:
        shapes = f"mask of shape {tuple(mask.shape)} does not broadcast to the sample's {tuple(init.shape)}"
        raise ValueError(shapes) from None


def _keep_outside_mask(init, noise, mask, plan, view: str, callback: StepCallback | None) -> StepCallback:
    """A step callback that puts init, noised to the level just reached, back where mask is 0."""
    _check_mask(init, mask)

    def blend(step: StepRecord) -> torch.Tensor:
        level = step.index + 1
        if view == "ve":
            known = init + plan.sigmas[level].item() * noise  # x_VE = x_0 + σ ε
        else:
            known = add_noise(init, noise, plan.alpha_bar[level].item())
        x = mask * step.x + (1 - mask) * known
        if callback is not None:
            replacement = callback(with_state(step, x))
            x = replacement if isinstance(replacement, torch.Tensor) else x
        return x

    return blend
