"""A diffusers folder's scheduler/scheduler_config.json as kedavra's sampling defaults.

diffusers builds the folder's scheduler from the file (`SchedulerMixin.from_config`): its `_class_name` picks the
algorithm, and the class's keys its settings. kedavra reads the same file into the sampler its own table computes
for that class (kedavra.diffusion.samplers.SAMPLERS, each within 1e-5 of the diffusers scheduler it names), and into
the timestep rules diffusers applies (kedavra.diffusion.timesteps.TIMESTEP_RULES: "diffusers"). The noise schedule,
prediction type, spacing and steps_offset of the same file are read by kedavra.checkpoint.sources.

    PNDMScheduler -> pndm     DDIMScheduler -> ddim      DDPMScheduler -> ddpm / ddpm_large
    EulerDiscreteScheduler -> euler      EulerAncestralDiscreteScheduler -> euler_a      HeunDiscreteScheduler -> heun
    DPMSolverMultistepScheduler -> dpmpp_2m / dpmpp_2m_sde      UniPCMultistepScheduler -> unipc
    LCMScheduler -> lcm       TCDScheduler -> tcd
use_karras_sigmas adds " karras"; set_alpha_to_one (DDIM, PNDM) sets where they end. A setting kedavra does not
carry out (a solver order other than 2, thresholding, ...) is named in `notes`, and another class leaves kedavra's
default sampler, also named there: the file is never refused for its scheduler.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# diffusers class -> kedavra sampler; the classes whose `use_karras_sigmas` kedavra follows
DIFFUSERS_SCHEDULERS = {
    "PNDMScheduler": "pndm",
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
}
KARRAS_CLASSES = ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
                  "UniPCMultistepScheduler")
# (class, key) -> the value kedavra computes; another value in the file is named in the notes. Defaults are
# diffusers' own for that class (a key left out of the file means its default).
_CARRIED_OUT: dict[tuple[str, str], tuple[Any, Any]] = {  # (value kedavra runs, diffusers' default)
    ("DDIMScheduler", "clip_sample"): (False, True),
    ("DDIMScheduler", "thresholding"): (False, False),
    ("DDPMScheduler", "clip_sample"): (False, True),
    ("DDPMScheduler", "thresholding"): (False, False),
    ("PNDMScheduler", "skip_prk_steps"): (True, False),
    ("DPMSolverMultistepScheduler", "solver_order"): (2, 2),
    ("DPMSolverMultistepScheduler", "solver_type"): ("midpoint", "midpoint"),
    ("DPMSolverMultistepScheduler", "thresholding"): (False, False),
    ("DPMSolverMultistepScheduler", "euler_at_final"): (False, False),
    ("DPMSolverMultistepScheduler", "use_lu_lambdas"): (False, False),
    ("DPMSolverMultistepScheduler", "final_sigmas_type"): ("zero", "zero"),
    ("UniPCMultistepScheduler", "solver_order"): (2, 2),
    ("UniPCMultistepScheduler", "solver_type"): ("bh2", "bh2"),
    ("UniPCMultistepScheduler", "predict_x0"): (True, True),
    ("UniPCMultistepScheduler", "disable_corrector"): ([], []),
    ("UniPCMultistepScheduler", "thresholding"): (False, False),
    ("EulerDiscreteScheduler", "interpolation_type"): ("linear", "linear"),
    ("EulerDiscreteScheduler", "timestep_type"): ("discrete", "discrete"),
    ("EulerDiscreteScheduler", "final_sigmas_type"): ("zero", "zero"),
    ("LCMScheduler", "original_inference_steps"): (50, 50),
    ("TCDScheduler", "original_inference_steps"): (50, 50),
}
_OTHER_SIGMAS = ("use_exponential_sigmas", "use_beta_sigmas")  # σ spacings kedavra's plans do not have
_DPM_ALGORITHMS = {"dpmsolver++": "dpmpp_2m", "sde-dpmsolver++": "dpmpp_2m_sde"}
_DDPM_VARIANCES = {"fixed_small": "ddpm", "fixed_large": "ddpm_large"}
SET_ALPHA_TO_ONE_DEFAULTS = {"DDIMScheduler": True, "PNDMScheduler": False}  # diffusers' defaults; the others end at 0


@dataclass(frozen=True)
class SchedulerDefaults:
    """sampler: kedavra's name for the file's scheduler (" karras" appended for use_karras_sigmas), None where the
    class is not one kedavra computes; set_alpha_to_one: DDIM / PNDM end at ᾱ = 1 (True) or ᾱ_0; notes: what of the
    file kedavra does not carry out."""

    scheduler_class: str
    sampler: str | None
    set_alpha_to_one: bool
    notes: tuple[str, ...]


def scheduler_defaults(config: Mapping[str, Any]) -> SchedulerDefaults:
    """The sampling defaults of a scheduler_config.json's contents (module docstring)."""
    name = config.get("_class_name")
    notes: list[str] = []
    if not isinstance(name, str) or name not in DIFFUSERS_SCHEDULERS:
        known = ", ".join(DIFFUSERS_SCHEDULERS)
        notes.append(f"scheduler class {name!r} is not one kedavra computes as diffusers does ({known}); kedavra's "
                     "default sampler runs instead")
        return SchedulerDefaults(str(name), None, True, tuple(notes))
    sampler = DIFFUSERS_SCHEDULERS[name]
    if name == "DPMSolverMultistepScheduler":
        algorithm = config.get("algorithm_type", "dpmsolver++")
        if algorithm not in _DPM_ALGORITHMS:
            notes.append(f"algorithm_type {algorithm!r} runs as 'dpmsolver++' (kedavra has "
                         f"{', '.join(_DPM_ALGORITHMS)})")
        sampler = _DPM_ALGORITHMS.get(algorithm, sampler)
    if name == "DDPMScheduler":
        variance = config.get("variance_type", "fixed_small")
        if variance not in _DDPM_VARIANCES:
            notes.append(f"variance_type {variance!r} runs as 'fixed_small' (kedavra has {', '.join(_DDPM_VARIANCES)})")
        sampler = _DDPM_VARIANCES.get(variance, sampler)
    for (cls, key), (carried_out, default) in _CARRIED_OUT.items():
        if cls == name and config.get(key, default) != carried_out:
            notes.append(f"{key}={config.get(key, default)!r} is not carried out (kedavra runs {carried_out!r})")
    for key in _OTHER_SIGMAS:
        if config.get(key):
            notes.append(f"{key} is not carried out (kedavra's plans space the model's own timesteps)")
    if name in KARRAS_CLASSES and config.get("use_karras_sigmas"):
        sampler += " karras"
    set_alpha_to_one = bool(config.get("set_alpha_to_one", SET_ALPHA_TO_ONE_DEFAULTS.get(name, True)))
    return SchedulerDefaults(name, sampler, set_alpha_to_one, tuple(notes))
