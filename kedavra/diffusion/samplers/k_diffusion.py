"""The samplers A1111 and ComfyUI list, run their way: k-diffusion's algorithms on σ sequences built from the
model's σ table (kedavra.diffusion.sigmas), with each program's defaults.

    A1111 (v1.10, modules/sd_samplers_kdiffusion.py)    ComfyUI (comfy/samplers.py, KSAMPLER_NAMES)
    the start x = σ_0 ε                                  x = √(1+σ_0²) ε when σ_0 is the table's σ_max, else σ_0 ε
    t(σ) interpolated in log σ                           t(σ) the nearest table timestep
    "Automatic": the sampler's own schedule type          a scheduler is always named ("normal" by default)
    DPM2, DPM2 a, DPM++ 3M SDE drop the penultimate σ     dpm_2, dpm_2_ancestral, uni_pc(_bh2) drop it
    ancestral η = 1, also for DPM fast / adaptive         η = 1 for ancestral and SDE samplers, 0 for dpm_fast/adaptive
    img2img: the last ⌊min(s, 0.999)·n⌋ + 1 σ-steps      denoise d: the last n of ⌊n/d⌋ steps
             of the n-step sequence, x = x_0 + σ ε

The noise of ancestral samplers comes from `noise_sampler` (A1111: each image's own generator, continuing after
the initial noise, kedavra.diffusion.rng); SDE samplers take a Brownian tree (kedavra.diffusion.brownian) from
`brownian(x, sigma_min, sigma_max)` when one is given.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kedavra.diffusion.forward_process import add_noise
from kedavra.diffusion.samplers.adams import sample_deis, sample_ipndm, sample_ipndm_v
from kedavra.diffusion.samplers.cfg_pp import (
    sample_dpmpp_2m_cfg_pp,
    sample_dpmpp_2s_ancestral_cfg_pp,
    sample_euler_ancestral_cfg_pp,
    sample_gradient_estimation_cfg_pp,
    sample_res_multistep_cfg_pp,
)
from kedavra.diffusion.samplers.consistency import make_lcm_sigma_plan, sample_lcm_kdiffusion
from kedavra.diffusion.samplers.ddpm import sample_ddim
from kedavra.diffusion.samplers.ddpm_comfyui import sample_ddpm_comfyui
from kedavra.diffusion.samplers.denoiser import Denoiser, StepCallback
from kedavra.diffusion.samplers.dpm_fast import sample_dpm_adaptive, sample_dpm_fast
from kedavra.diffusion.samplers.dpm_solver import (
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
)
from kedavra.diffusion.samplers.er_sde import sample_er_sde
from kedavra.diffusion.samplers.euler import (
    Churn,
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
)
from kedavra.diffusion.samplers.gradient_estimation import sample_gradient_estimation
from kedavra.diffusion.samplers.heunpp import sample_heunpp2
from kedavra.diffusion.samplers.noise import NoiseSampler
from kedavra.diffusion.samplers.pndm import a1111_img2img_plan, a1111_timesteps_plan, sample_plms
from kedavra.diffusion.samplers.res_multistep import sample_res_multistep
from kedavra.diffusion.samplers.restart import sample_restart
from kedavra.diffusion.samplers.sa_solver import sa_solver_options, sample_sa_solver
from kedavra.diffusion.samplers.seeds import sample_seeds_2, sample_seeds_3
from kedavra.diffusion.samplers.unipc import a1111_unipc_plan, a1111_unipc_steps, sample_unipc
from kedavra.diffusion.samplers.unipc_comfyui import sample_unipc_comfyui
from kedavra.diffusion.schedule import NoiseSchedule
from kedavra.diffusion.sigmas import (
    AUTOMATIC,
    CONVENTIONS,
    SigmaTable,
    a1111_img2img_steps,
    build_sigmas,
    resolve_schedule_type,
    schedule_type_label,
)
from kedavra.diffusion.timesteps import SamplingPlan
from kedavra.validation import check_number

COMFYUI_DEFAULT_SCHEDULE = "normal"  # ComfyUI's KSampler default scheduler
A1111_UNIPC_ORDER = 3  # A1111's settings "UniPC order" default
A1111_UNIPC_VARIANT = "bh1"  # A1111's settings "UniPC variant" default


@dataclass(frozen=True)
class KSamplerSpec:
    """One sampler of A1111's / ComfyUI's lists: the function, the names, and each program's defaults."""

    a1111: str  # A1111's label ("" where it has none)
    comfyui: str  # ComfyUI's sampler_name ("" where it has none)
    fn: Callable
    schedule: str = "uniform"  # A1111's "Automatic" for this sampler
    a1111_discard_penultimate: bool = False
    comfyui_discard_penultimate: bool = False
    brownian: bool = False  # SDE samplers: noise from a Brownian tree
    ancestral: bool = False  # draws fresh noise with η > 0
    # the function has an η (k-diffusion's ancestral and SDE samplers, DPM fast / adaptive): A1111 hands it its
    # "eta_ancestral" setting or the request's eta (default 1, even for DPM fast / adaptive whose own default is 0);
    # ComfyUI's KSampler calls it with its default
    eta: bool = False
    a1111_options: dict = field(default_factory=dict)
    comfyui_options: dict = field(default_factory=dict)
    whole_table: bool = False  # DPM fast / adaptive: A1111's txt2img runs from the table's σ_max to its σ_min
    distilled_table: bool = False  # A1111's LCM: the σ table of the 50-step distillation grid (consistency.py)
    # A1111's CompVis samplers (DDIM, PLMS, UniPC): "compvis" or "unipc", the timestep grid they run on instead
    # of a schedule type's σ's, in the VP view (pndm.py, unipc.py); "" for the k-diffusion samplers
    timestep_grid: str = ""
    # what of Karras et al. 2022's churn settings A1111 hands the function (its sampler_extra_params): "all" for
    # Euler, Heun, DPM2 (s_churn, s_tmin, s_tmax, s_noise), "noise" (s_noise) for the ancestral and SDE samplers
    churn: str = ""
    # options the function takes from the model's σ table, in either program's convention (SA-Solver's noise
    # interval, from ComfyUI's percent_to_sigma); None for the others
    table_options: Callable[[SigmaTable], dict] | None = None
    # a CFG++ sampler (cfg_pp.py): it needs the model's unconditional prediction too (Denoiser.ve_with_uncond)
    cfg_pp: bool = False
    # ComfyUI's inpainting noises the mask's kept region with noise of its own, not the initial noise (its "ddim":
    # inpaint_options {"random": True}; kedavra.diffusion.rng.comfyui_inpaint_noise)
    comfyui_inpaint_noise: bool = False

    @property
    def view(self) -> str:
        """The state the sampler keeps: "vp" (x_t) for A1111's CompVis samplers, "ve" (x_0 + σ ε) otherwise."""
        return "vp" if self.timestep_grid else "ve"

    @property
    def name(self) -> str:
        return self.a1111 or self.comfyui


K_SAMPLERS: tuple[KSamplerSpec, ...] = (
    KSamplerSpec("Euler", "euler", sample_euler, churn="all"),
    KSamplerSpec("Euler a", "euler_ancestral", sample_euler_ancestral, ancestral=True, eta=True),
    KSamplerSpec("LMS", "lms", sample_lms),
    KSamplerSpec("Heun", "heun", sample_heun, churn="all"),
    KSamplerSpec("DPM2", "dpm_2", sample_dpm_2, "karras", True, True, churn="all"),
    KSamplerSpec("DPM2 a", "dpm_2_ancestral", sample_dpm_2_ancestral, "karras", True, True, ancestral=True, eta=True,
                 churn="noise"),
    KSamplerSpec("DPM++ 2S a", "dpmpp_2s_ancestral", sample_dpmpp_2s_ancestral, "karras", ancestral=True, eta=True,
                 churn="noise"),
    KSamplerSpec("DPM++ 2M", "dpmpp_2m", functools.partial(sample_dpmpp_2m, lower_order_final=False), "karras"),
    KSamplerSpec("DPM++ SDE", "dpmpp_sde", sample_dpmpp_sde, "karras", brownian=True, ancestral=True, eta=True,
                 churn="noise"),
    KSamplerSpec("DPM++ 2M SDE", "dpmpp_2m_sde", sample_dpmpp_2m_sde, "exponential", brownian=True, ancestral=True,
                 eta=True, churn="noise"),
    KSamplerSpec("DPM++ 2M SDE Heun", "", functools.partial(sample_dpmpp_2m_sde, solver_type="heun"), "exponential",
                 brownian=True, ancestral=True, eta=True, churn="noise"),
    KSamplerSpec("DPM++ 3M SDE", "dpmpp_3m_sde", sample_dpmpp_3m_sde, "exponential", True, brownian=True,
                 ancestral=True, eta=True, churn="noise"),
    KSamplerSpec("DPM fast", "dpm_fast", sample_dpm_fast, ancestral=True, eta=True, whole_table=True, churn="noise"),
    KSamplerSpec("DPM adaptive", "dpm_adaptive", sample_dpm_adaptive, ancestral=True, eta=True, whole_table=True),
    KSamplerSpec("Restart", "", sample_restart, "karras"),
    # LCM (Luo et al. 2023): A1111 on the distillation grid's σ's with the boundary scalings; ComfyUI's "lcm" on the
    # model's own table, the boundary left to a model patch (ModelSamplingDiscrete "lcm") kedavra does not apply
    KSamplerSpec("LCM", "lcm", sample_lcm_kdiffusion, ancestral=True, a1111_options={"boundary": True},
                 comfyui_options={"boundary": False}, distilled_table=True),
    # A1111's CompVis samplers (modules/sd_samplers_timesteps*.py): DDIM (η from its "eta_ddim", default 0), PLMS,
    # and UniPC with A1111's defaults (bh1, order 3, time-uniform, lower order at the end)
    KSamplerSpec("DDIM", "", sample_ddim, timestep_grid="compvis"),
    KSamplerSpec("PLMS", "", sample_plms, timestep_grid="compvis"),
    KSamplerSpec("UniPC", "", functools.partial(sample_unipc, order=A1111_UNIPC_ORDER, variant=A1111_UNIPC_VARIANT),
                 timestep_grid="unipc"),
    # ComfyUI's samplers A1111 does not list: the Adams–Bashforth family of Zhang & Chen 2023 (adams.py), UniPC on its
    # σ's, penultimate σ dropped (unipc_comfyui.py), and its "ddim", which is Euler (comfy/samplers.py sampler_object:
    # ksampler("euler", inpaint_options={"random": True}); the option only changes the noise of an inpainting mask's
    # kept region: comfyui_inpaint_noise). "ddim" is also an alias of A1111's DDIM: see resolve_k_sampler
    KSamplerSpec("", "ipndm", sample_ipndm),
    KSamplerSpec("", "ipndm_v", sample_ipndm_v),
    KSamplerSpec("", "deis", sample_deis),
    KSamplerSpec("", "uni_pc", functools.partial(sample_unipc_comfyui, variant="bh1"),
                 comfyui_discard_penultimate=True),
    KSamplerSpec("", "uni_pc_bh2", functools.partial(sample_unipc_comfyui, variant="bh2"),
                 comfyui_discard_penultimate=True),
    KSamplerSpec("", "ddim", sample_euler, comfyui_inpaint_noise=True),
    # ComfyUI's newer samplers (comfy/k_diffusion/sampling.py): RES multistep (Zhang et al. 2023), ER-SDE-Solver-3
    # (Cui et al. 2025), gradient estimation (Permenter & Yuan 2024), Heun++ (Carzit), DDPM (Ho et al. 2020) in the VE
    # view, SEEDS-2 / 3 (Gonzalez et al. 2023) and their exponential Heun, SA-Solver (Xue et al. 2023); each module's
    # docstring says what it computes, ComfyUI's defaults as its KSampler calls them
    KSamplerSpec("", "res_multistep", sample_res_multistep),
    KSamplerSpec("", "res_multistep_ancestral", functools.partial(sample_res_multistep, eta=1.0), ancestral=True),
    KSamplerSpec("", "gradient_estimation", sample_gradient_estimation),
    KSamplerSpec("", "er_sde", sample_er_sde, ancestral=True),
    KSamplerSpec("", "heunpp2", sample_heunpp2),
    KSamplerSpec("", "ddpm", sample_ddpm_comfyui, ancestral=True),
    KSamplerSpec("", "seeds_2", sample_seeds_2, ancestral=True),
    KSamplerSpec("", "seeds_3", sample_seeds_3, ancestral=True),
    KSamplerSpec("", "exp_heun_2_x0", functools.partial(sample_seeds_2, eta=0.0, s_noise=0.0, r=1.0,
                                                         solver_type="phi_2")),
    KSamplerSpec("", "exp_heun_2_x0_sde", functools.partial(sample_seeds_2, r=1.0, solver_type="phi_2"),
                 ancestral=True),
    KSamplerSpec("", "sa_solver", sample_sa_solver, ancestral=True, table_options=sa_solver_options),
    KSamplerSpec("", "sa_solver_pece", functools.partial(sample_sa_solver, pece=True), ancestral=True,
                 table_options=sa_solver_options),
    # ComfyUI's CFG++ samplers (Chung et al. 2024; cfg_pp.py): its Euler, Euler ancestral, DPM++ 2S a, DPM++ 2M, RES
    # multistep (ancestral) and gradient estimation renoising along the unconditional prediction
    KSamplerSpec("", "euler_cfg_pp", functools.partial(sample_euler_ancestral_cfg_pp, eta=0.0, s_noise=0.0),
                 cfg_pp=True),
    KSamplerSpec("", "euler_ancestral_cfg_pp", sample_euler_ancestral_cfg_pp, ancestral=True, cfg_pp=True),
    KSamplerSpec("", "dpmpp_2s_ancestral_cfg_pp", sample_dpmpp_2s_ancestral_cfg_pp, ancestral=True, cfg_pp=True),
    KSamplerSpec("", "dpmpp_2m_cfg_pp", sample_dpmpp_2m_cfg_pp, cfg_pp=True),
    KSamplerSpec("", "res_multistep_cfg_pp", sample_res_multistep_cfg_pp, cfg_pp=True),
    KSamplerSpec("", "res_multistep_ancestral_cfg_pp", functools.partial(sample_res_multistep_cfg_pp, eta=1.0),
                 ancestral=True, cfg_pp=True),
    KSamplerSpec("", "gradient_estimation_cfg_pp", sample_gradient_estimation_cfg_pp, cfg_pp=True),
)
ETA_K_SAMPLERS = ("DDIM",)  # the A1111 samplers a request's eta reaches (A1111's eta_ddim)
A1111_ETA_ANCESTRAL = 1.0  # A1111's "eta_ancestral" default: the η of the samplers that take one (KSamplerSpec.eta)
# A1111's LCM schedule types and the distillation-grid spacing each gives (its "Uniform" and "Normal" are the same
# linspace in t there); others are refused by name
A1111_LCM_SPACINGS = {"uniform": "normal", "normal": "normal", "sgm_uniform": "sgm_uniform", "simple": "simple"}
# A1111's older labels that carry their schedule type in the name (still accepted by its API)
_LEGACY_KARRAS = {"lms karras": "LMS", "dpm2 karras": "DPM2", "dpm2 a karras": "DPM2 a",
                  "dpm++ 2s a karras": "DPM++ 2S a", "dpm++ 2m karras": "DPM++ 2M", "dpm++ sde karras": "DPM++ SDE",
                  "dpm++ 2m sde karras": "DPM++ 2M SDE", "dpm++ 2m sde exponential": "DPM++ 2M SDE",
                  "dpm++ 3m sde karras": "DPM++ 3M SDE", "dpm++ 3m sde exponential": "DPM++ 3M SDE"}
_EXTRA = {"k_euler": "Euler", "k_euler_a": "Euler a", "k_euler_ancestral": "Euler a", "euler_a": "Euler a",
          "k_lms": "LMS", "k_heun": "Heun", "k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a", "k_dpmpp_2s_a": "DPM++ 2S a",
          "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_sde": "DPM++ SDE", "k_dpmpp_2m_sde": "DPM++ 2M SDE",
          "k_dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "k_dpmpp_3m_sde": "DPM++ 3M SDE", "k_dpm_fast": "DPM fast",
          "k_dpm_ad": "DPM adaptive", "restart": "Restart"}
# ComfyUI's names of samplers kedavra lists under another: DPM++ 2M SDE Heun (A1111's label), and its "_gpu"
# variants, which draw the SDE samplers' Brownian tree on the model's device. kedavra draws it as ComfyUI does on the
# CPU (kedavra.diffusion.brownian), and on a CPU ComfyUI's "_gpu" variants give the same numbers as the others
COMFYUI_ALIASES = {"dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "dpmpp_sde_gpu": "DPM++ SDE",
                   "dpmpp_2m_sde_gpu": "DPM++ 2M SDE", "dpmpp_2m_sde_heun_gpu": "DPM++ 2M SDE Heun",
                   "dpmpp_3m_sde_gpu": "DPM++ 3M SDE"}


def _normalise(name: str) -> str:
    return " ".join(name.strip().lower().replace("-", " ").split())


def _table() -> dict[str, KSamplerSpec]:
    """Every name, normalised, to its spec; where an A1111 label and a ComfyUI name meet ("ddim"), A1111's."""
    by_label = {spec.name: spec for spec in K_SAMPLERS}
    table = {_normalise(spec.comfyui): spec for spec in K_SAMPLERS if spec.comfyui}
    table.update({_normalise(spec.a1111): spec for spec in K_SAMPLERS if spec.a1111})
    for alias, label in {**_EXTRA, **_LEGACY_KARRAS, **COMFYUI_ALIASES}.items():
        table[_normalise(alias)] = by_label[label]
    return table


_K_ALIASES = _table()
_COMFYUI_NAMES = {spec.comfyui: spec for spec in K_SAMPLERS if spec.comfyui}  # as ComfyUI spells them


def k_sampler_names() -> list[str]:
    """A1111's labels and ComfyUI's names of the samplers run here (its names of samplers listed under another
    last: COMFYUI_ALIASES)."""
    return ([spec.a1111 for spec in K_SAMPLERS if spec.a1111] + [spec.comfyui for spec in K_SAMPLERS if spec.comfyui]
            + list(COMFYUI_ALIASES))


def comfyui_names(spec: KSamplerSpec) -> list[str]:
    """ComfyUI's names of `spec`'s sampler: its own and those of COMFYUI_ALIASES."""
    return [name for name in [spec.comfyui] if name] + [alias for alias, label in COMFYUI_ALIASES.items()
                                                        if label == spec.name]


def resolve_k_sampler(name: str, convention: str | None = None) -> tuple[KSamplerSpec, str | None]:
    """(spec, schedule type the name carries or None) for an A1111 label or ComfyUI name, case-insensitive
    ("DPM++ 2M Karras" carries "karras").

    One name belongs to both programs: "ddim" is ComfyUI's ddim (Euler) and an alias of A1111's DDIM (its CompVis
    sampler; A1111 folds case, ComfyUI matches its names exactly). Spelt as ComfyUI spells it, "ddim" is ComfyUI's,
    except with convention "a1111"; any other spelling ("DDIM") is A1111's label, refused by convention "comfyui".
    So a request, which checks its name without the convention and keeps the spec's name, keeps "ddim", and its
    run resolves that again with the convention."""
    key = _normalise(name) if isinstance(name, str) else None
    if key not in _K_ALIASES:
        raise ValueError(f"unknown A1111 / ComfyUI sampler {name!r}; allowed: {', '.join(k_sampler_names())}")
    if convention != "a1111" and name.strip() in _COMFYUI_NAMES:
        return _COMFYUI_NAMES[name.strip()], None
    carried = None
    if key in _LEGACY_KARRAS:
        carried = key.rsplit(" ", 1)[1]
    return _K_ALIASES[key], carried


@dataclass(frozen=True)
class KRun:
    """What a k-diffusion run needs besides the model: its plan, where it starts and with what options."""

    plan: SamplingPlan
    start: torch.Tensor
    spec: KSamplerSpec
    options: dict


def effective_schedule_type(spec: KSamplerSpec, schedule_type: str, convention: str = "a1111") -> str:
    """The schedule type a run uses: `schedule_type`, or for "Automatic" the sampler's own (A1111) or ComfyUI's
    default scheduler."""
    kind = resolve_schedule_type(schedule_type)
    if kind == AUTOMATIC:
        kind = spec.schedule if convention == "a1111" else COMFYUI_DEFAULT_SCHEDULE
    return kind


def k_sigmas(spec: KSamplerSpec, steps: int, schedule: NoiseSchedule, schedule_type: str, convention: str,
             sdxl: bool = False) -> tuple[torch.Tensor, SigmaTable]:
    """The full n-step σ sequence (float32) the program builds for this sampler and schedule type, and the table."""
    table = SigmaTable.from_schedule(schedule, convention)
    kind = effective_schedule_type(spec, schedule_type, convention)
    discard = spec.a1111_discard_penultimate if convention == "a1111" else spec.comfyui_discard_penultimate
    sigmas = build_sigmas(kind, steps + int(discard), table, convention, sdxl)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas, table


def plan_from_sigmas(sigmas: torch.Tensor, table: SigmaTable) -> SamplingPlan:
    """A SamplingPlan visiting `sigmas` (float32, n+1), evaluating the model at the table's timestep of each σ."""
    levels = sigmas.double()
    timesteps = table.sigma_to_t(sigmas[:-1]).double()
    return SamplingPlan(timesteps, 1 / (1 + levels**2), levels, sigma_to_t=lambda s: table.sigma_to_t(s).item())


def prepare_k_run(sampler: str, noise: torch.Tensor, steps: int, schedule: NoiseSchedule, schedule_type: str,
                  convention: str = "a1111", init: torch.Tensor | None = None, strength: float = 1.0,
                  sdxl: bool = False, eta: float = 0.0, fix_steps: bool = False, churn: Churn | None = None,
                  eta_ancestral: float = A1111_ETA_ANCESTRAL) -> KRun:
    """The plan and starting state of an A1111 / ComfyUI run (see the module docstring for the conventions).
    eta: DDIM's η (ETA_K_SAMPLERS); the other samplers refuse a nonzero one. eta_ancestral: A1111's η of the
    samplers that take one (KSamplerSpec.eta; A1111 only: ComfyUI's KSampler has none). fix_steps: A1111's
    image-to-image runs `steps` steps of a longer schedule (sigmas.a1111_img2img_steps; ComfyUI's denoise always does).
    churn: Karras et al. 2022's churn settings, handed to the samplers that take them as A1111 hands them
    (`churn_options`); the others ignore them, as in A1111."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown sampling convention {convention!r}; allowed: {', '.join(CONVENTIONS)}")
    spec, carried = resolve_k_sampler(sampler, convention)
    eta = check_number("eta", eta, low=0)
    if eta and spec.name not in ETA_K_SAMPLERS:
        raise ValueError(f"eta={eta} applies to A1111's {', '.join(ETA_K_SAMPLERS)} here, not {spec.name!r}")
    check_eta_ancestral(spec, eta_ancestral, convention)
    if spec.timestep_grid:
        if convention != "a1111":
            raise ValueError(f"{spec.name} runs as A1111 runs it (its CompVis sampler); ComfyUI's own samplers are "
                             f"{', '.join(s.comfyui for s in K_SAMPLERS if s.comfyui)}")
        run = _prepare_a1111_timesteps(spec, noise, steps, schedule, init, strength, fix_steps)
        return KRun(run.plan, run.start, spec, {"eta": eta} if spec.name in ETA_K_SAMPLERS else {})
    if spec.distilled_table and convention == "a1111":
        return _prepare_a1111_lcm(spec, noise, steps, schedule, carried or schedule_type, init, strength, fix_steps)
    if init is not None and convention == "a1111":
        total, t_enc = a1111_img2img_steps(steps, strength, fix_steps)
        sigmas, table = k_sigmas(spec, total, schedule, carried or schedule_type, convention, sdxl)
        sigmas = sigmas[total - t_enc - 1:]
        options = {**spec.a1111_options, **churn_options(spec, churn), **_eta_option(spec, eta_ancestral),
                   **_table_options(spec, table)}
        return KRun(plan_from_sigmas(sigmas, table), init + noise * sigmas[0].item(), spec, options)
    sigmas, table = k_sigmas(spec, steps, schedule, carried or schedule_type, convention, sdxl)
    if init is None:
        if strength != 1.0:
            raise ValueError(f"strength={strength} needs an init sample (image-to-image); without one it must be 1.0")
        if convention == "a1111":
            start = noise * sigmas[0].item()
            if spec.whole_table:  # the schedule type sets only the start; the solver spans the whole table
                sigmas = build_sigmas("uniform", steps, table, convention)
        else:
            start = noise * _comfy_noise_scale(sigmas[0].item(), table)
    else:
        strength = check_number("strength", strength, 0, 1)
        if strength <= 0:
            raise ValueError("strength (ComfyUI's denoise) must be above 0")
        total = int(steps / strength)
        sigmas = k_sigmas(spec, total, schedule, carried or schedule_type, convention, sdxl)[0][-(steps + 1):]
        start = init + noise * _comfy_noise_scale(sigmas[0].item(), table)
    options = {**(spec.a1111_options if convention == "a1111" else spec.comfyui_options), **churn_options(spec, churn),
               **_table_options(spec, table)}
    if convention == "a1111":
        options.update(_eta_option(spec, eta_ancestral))
    return KRun(plan_from_sigmas(sigmas, table), start, spec, options)


def check_eta_ancestral(spec: KSamplerSpec, eta_ancestral, convention: str) -> float:
    """`eta_ancestral` (A1111's η of the ancestral / SDE samplers) when it applies, or is the default; else an
    error saying where it applies."""
    eta_ancestral = check_number("eta_ancestral", eta_ancestral, low=0)
    if eta_ancestral != A1111_ETA_ANCESTRAL and (not spec.eta or convention != "a1111"):
        takers = ", ".join(s.a1111 for s in K_SAMPLERS if s.eta and s.a1111)
        name = (spec.comfyui if convention == "comfyui" else spec.a1111) or spec.comfyui or spec.a1111
        raise ValueError(f"eta_ancestral={eta_ancestral} applies to A1111's {takers} (run as A1111 runs them), not "
                         f"{name} ({convention})")
    return eta_ancestral


def _table_options(spec: KSamplerSpec, table: SigmaTable) -> dict:
    """The options `spec`'s function takes from the model's σ table (KSamplerSpec.table_options)."""
    return spec.table_options(table) if spec.table_options is not None else {}


def _eta_option(spec: KSamplerSpec, eta_ancestral: float) -> dict:
    """The η A1111 hands a sampler that takes one (its KDiffusionSampler: the function's "eta" parameter)."""
    return {"eta": eta_ancestral} if spec.eta else {}


def churn_options(spec: KSamplerSpec, churn: Churn | None) -> dict:
    """The options `churn` gives the sampler: all of it for Euler, Heun and DPM2, s_noise for the ancestral and SDE
    samplers (A1111's sampler_extra_params), nothing otherwise or when it is the default."""
    if churn is None or churn.is_default or not spec.churn:
        return {}
    if spec.churn == "all":
        return {"churn": churn}
    return {"s_noise": churn.s_noise} if churn.s_noise != 1.0 else {}


def _prepare_a1111_lcm(spec: KSamplerSpec, noise: torch.Tensor, steps: int, schedule: NoiseSchedule,
                       schedule_type: str, init: torch.Tensor | None, strength: float, fix_steps: bool) -> KRun:
    """A1111's LCM run: the distillation grid's σ's (consistency.make_lcm_sigma_plan), the A1111 start and img2img
    rule of `prepare_k_run`."""
    kind = effective_schedule_type(spec, schedule_type)
    if kind not in A1111_LCM_SPACINGS:
        allowed = ", ".join(["Automatic"] + [schedule_type_label(name) for name in A1111_LCM_SPACINGS])
        raise ValueError(f"A1111's LCM sampler runs here with the schedule types {allowed}, not "
                         f"{schedule_type_label(kind)!r}")
    if init is None:
        if strength != 1.0:
            raise ValueError(f"strength={strength} needs an init sample (image-to-image); without one it must be 1.0")
        plan = make_lcm_sigma_plan(schedule, steps, A1111_LCM_SPACINGS[kind])
        start = noise * plan.sigmas[0].item()
    else:
        total, t_enc = a1111_img2img_steps(steps, strength, fix_steps)
        plan = make_lcm_sigma_plan(schedule, total, A1111_LCM_SPACINGS[kind]).start_at(total - t_enc - 1)
        start = init + noise * plan.sigmas[0].item()
    return KRun(plan, start, spec, dict(spec.a1111_options))


def _prepare_a1111_timesteps(spec: KSamplerSpec, noise: torch.Tensor, steps: int, schedule: NoiseSchedule,
                             init: torch.Tensor | None, strength: float, fix_steps: bool = False) -> KRun:
    """A1111's CompVis run (modules/sd_samplers_timesteps.py): the VP start x = ε, or for image-to-image the init
    noised to ᾱ one timestep above the first one evaluated (A1111's rule, pndm.a1111_img2img_plan); DDIM and PLMS on
    A1111's integer timesteps, UniPC on its continuous-time grid (unipc.a1111_unipc_plan). The schedule type does
    not apply (A1111 ignores it for these samplers)."""
    if init is None:
        if strength != 1.0:
            raise ValueError(f"strength={strength} needs an init sample (image-to-image); without one it must be 1.0")
        if spec.timestep_grid == "unipc":
            plan = a1111_unipc_plan(schedule, a1111_unipc_steps(steps, None, schedule.num_train_timesteps)[0])
        else:
            plan = a1111_timesteps_plan(schedule, steps)
        return KRun(plan, noise, spec, {})
    total, t_enc = a1111_img2img_steps(steps, strength, fix_steps)
    plan, alpha_bar_noise = a1111_img2img_plan(schedule, steps, strength, fix_steps)
    if spec.timestep_grid == "unipc":
        if t_enc < 1:
            raise ValueError(f"strength={strength} of {steps} steps leaves A1111's UniPC no step to run")
        unipc_steps, t_start = a1111_unipc_steps(total, t_enc, schedule.num_train_timesteps)
        plan = a1111_unipc_plan(schedule, unipc_steps, t_start)
    return KRun(plan, add_noise(init, noise, alpha_bar_noise), spec, {})


def _comfy_noise_scale(sigma: float, table: SigmaTable) -> float:
    """ComfyUI's noise_scaling: √(1+σ²) when the run starts at (or above) the table's σ_max, else σ."""
    at_max = math.isclose(table.sigma_max, sigma, rel_tol=1e-5) or sigma > table.sigma_max
    return math.sqrt(1 + sigma**2) if at_max else sigma


def run_k_sampler(denoiser: Denoiser, run: KRun, noise_sampler: NoiseSampler | None,
                  brownian: Callable[[torch.Tensor, float, float], NoiseSampler] | None = None,
                  callback: StepCallback | None = None) -> torch.Tensor:
    """Run a prepared A1111 / ComfyUI sampler; SDE samplers take their noise from `brownian(x, σ_min, σ_max)`
    when given (k-diffusion's seeded Brownian tree), otherwise from `noise_sampler`."""
    noise = noise_sampler
    if run.spec.brownian and brownian is not None:
        positive = run.plan.sigmas[run.plan.sigmas > 0]
        noise = brownian(run.start, positive.min().item(), run.plan.sigmas.max().item())
    return run.spec.fn(denoiser, run.start, run.plan, noise=noise, callback=callback, **run.options)
