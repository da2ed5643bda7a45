"""Each sampler's trajectory against the diffusers scheduler that computes the same steps (fp32).

The model is a fixed smooth function of (x_t, t), so both loops see identical model outputs for identical
inputs; noise comes from generators with the same seed, drawn in the same order (initial noise first, then
one draw per stochastic step). Relative error at every step = max|ours - theirs| / max|theirs|.
"""

import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from kedavra.diffusion.samplers import SAMPLERS, sample  # noqa: E402
from kedavra.diffusion.schedule import NoiseSchedule  # noqa: E402
from kedavra.diffusion.timesteps import make_plan  # noqa: E402

REL_TOL = 1e-5  # the parity target, fp32
SHAPE = (2, 4, 8, 8)

BETA_SCHEDULES = {  # our kind -> (diffusers beta_schedule, beta_start, beta_end)
    "scaled_linear": ("scaled_linear", 0.00085, 0.012),
    "linear": ("linear", 1e-4, 0.02),
    "cosine": ("squaredcos_cap_v2", 1e-4, 0.02),
}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def toy_model(x, t):
    """A smooth, t-dependent stand-in for a U-Net (any fixed function of (x_t, t) serves parity)."""
    t = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * torch.tanh(x) + 0.3 * torch.sin(x * 2 + t / 150) + 0.05 * x


def diffusers_scheduler(name, kind, prediction, spacing, steps_offset, karras, zero_snr, final_sigma):
    beta_schedule, beta_start, beta_end = BETA_SCHEDULES[kind]
    common = dict(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
                  prediction_type=DIFFUSERS_PREDICTION[prediction], timestep_spacing=spacing,
                  steps_offset=steps_offset)
    s = diffusers.schedulers
    if name in ("ddpm", "ddpm_large"):
        return s.DDPMScheduler(**common, clip_sample=False, rescale_betas_zero_snr=zero_snr,
                               variance_type="fixed_small" if name == "ddpm" else "fixed_large")
    if name == "ddim":
        return s.DDIMScheduler(**common, clip_sample=False, rescale_betas_zero_snr=zero_snr,
                               set_alpha_to_one=final_sigma == "zero")
    if name == "euler":
        return s.EulerDiscreteScheduler(**common, use_karras_sigmas=karras, rescale_betas_zero_snr=zero_snr)
    if name == "euler_a":
        return s.EulerAncestralDiscreteScheduler(**common, rescale_betas_zero_snr=zero_snr)
    if name == "heun":
        return s.HeunDiscreteScheduler(**common, use_karras_sigmas=karras)
    if name in ("dpmpp_2m", "dpmpp_2m_sde"):
        algorithm = "dpmsolver++" if name == "dpmpp_2m" else "sde-dpmsolver++"
        return s.DPMSolverMultistepScheduler(**common, algorithm_type=algorithm, solver_order=2,
                                             rescale_betas_zero_snr=zero_snr)
    if name == "unipc":
        return s.UniPCMultistepScheduler(**common, solver_order=2, rescale_betas_zero_snr=zero_snr)
    raise AssertionError(name)


def diffusers_trajectory(sched, steps, noise, generator, view):
    """The standard diffusers loop; returns the sample after each full step."""
    sched.set_timesteps(steps)
    if noise.dtype == torch.float64:  # run the oracle's arithmetic in float64 too
        sched.alphas_cumprod, sched.one = sched.alphas_cumprod.double(), torch.tensor(1.0, dtype=torch.float64)
    stochastic = "generator" in inspect.signature(sched.step).parameters
    x = noise * (1 + sched.sigmas[0] ** 2) ** 0.5 if view == "ve" else noise.clone()
    trajectory = []
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        out = toy_model(x_in, t.expand(x.shape[0]).to(torch.float32))
        x = sched.step(out, t, x, **({"generator": generator} if stochastic else {})).prev_sample
        if getattr(sched, "state_in_first_order", True):  # Heun: only after its second evaluation
            trajectory.append(x)
    if not getattr(sched, "state_in_first_order", True):  # Heun's last step is a single Euler step
        trajectory.append(x)
    return trajectory


CASES = [
    # sampler, schedule kind, prediction, spacing, offset, karras, zero_snr, final_sigma, steps
    ("ddpm", "scaled_linear", "eps", "leading", 0, False, False, "zero", 10),
    # 1000 steps in float64: in float32 diffusers' coefficients near t = 0 (1 - ᾱ ≈ 1e-4 computed in fp32)
    # drift 6e-5 from the exact ones over the run, and ours (computed in float64) do not; in float64 the
    # two agree to 2e-6 (diffusers keeps ᾱ from a float32 cumprod).
    ("ddpm", "linear", "eps", "leading", 0, False, False, "zero", -1000),
    ("ddpm", "scaled_linear", "v", "trailing", 0, False, True, "zero", 20),
    ("ddpm_large", "linear", "eps", "leading", 0, False, False, "zero", 25),
    ("ddim", "scaled_linear", "eps", "leading", 1, False, False, "sigma_min", 20),
    # not linspace: diffusers' DDIM steps to t - T//n, which is not the next linspace timestep
    ("ddim", "cosine", "x0", "trailing", 0, False, False, "zero", 10),
    ("ddim", "scaled_linear", "v", "trailing", 0, False, True, "zero", 25),
    ("euler", "scaled_linear", "eps", "leading", 1, False, False, "zero", 20),
    ("euler", "scaled_linear", "v", "trailing", 0, False, False, "zero", 15),
    ("euler", "scaled_linear", "eps", "leading", 1, True, False, "zero", 12),
    ("euler", "linear", "x0", "linspace", 0, False, False, "zero", 10),
    ("euler_a", "scaled_linear", "eps", "leading", 1, False, False, "zero", 20),
    # not trailing: at t = T-1 the cosine schedule's ᾱ ≈ 4e-9 sits below fp32's resolution in diffusers
    ("euler_a", "cosine", "v", "leading", 1, False, False, "zero", 10),
    ("heun", "scaled_linear", "eps", "leading", 1, False, False, "zero", 10),
    ("heun", "scaled_linear", "v", "linspace", 0, True, False, "zero", 8),
    ("dpmpp_2m", "scaled_linear", "eps", "trailing", 0, False, False, "zero", 20),
    ("dpmpp_2m", "scaled_linear", "v", "trailing", 0, False, False, "zero", 7),
    ("dpmpp_2m", "linear", "x0", "trailing", 0, False, False, "zero", 16),
    ("dpmpp_2m_sde", "scaled_linear", "eps", "trailing", 0, False, False, "zero", 20),
    ("unipc", "scaled_linear", "eps", "trailing", 0, False, False, "zero", 20),
    ("unipc", "scaled_linear", "v", "trailing", 0, False, False, "zero", 9),
    ("unipc", "linear", "x0", "trailing", 0, False, False, "zero", 12),
]


def max_relative_error(name, kind, prediction, spacing, offset, karras, zero_snr, final_sigma, steps) -> float:
    """The largest relative error, over all steps, between our trajectory and diffusers' for one case."""
    schedule = NoiseSchedule(kind, 1000, *BETA_SCHEDULES[kind][1:], zero_terminal_snr=zero_snr)
    dtype = torch.float64 if steps < 0 else torch.float32  # negative steps mark the float64 case
    steps = abs(steps)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=dtype)
    ours = []
    x_final = sample(toy_model, noise, sampler=name, steps=steps, schedule=schedule, prediction_type=prediction,
                     spacing=spacing, steps_offset=offset, karras=karras, final_sigma=final_sigma,
                     generator=torch.Generator().manual_seed(3),
                     callback=lambda step: ours.append(step.x.clone()))
    torch.testing.assert_close(x_final, ours[-1])
    if SAMPLERS[name].view == "ve" and name.startswith("dpmpp"):  # ours steps x_t/√ᾱ, diffusers' DPM-Solver x_t
        plan = make_plan(schedule, steps, spacing, offset, karras, final_sigma)
        ours = [x / (1 + plan.sigmas[i + 1].item() ** 2) ** 0.5 for i, x in enumerate(ours)]
    sched = diffusers_scheduler(name, kind, prediction, spacing, offset, karras, zero_snr, final_sigma)
    view = "ve" if name in ("euler", "euler_a", "heun") else "vp"
    theirs = diffusers_trajectory(sched, steps, noise, torch.Generator().manual_seed(3), view)
    assert len(ours) == len(theirs) == steps
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_trajectory_matches_diffusers(case):
    assert max_relative_error(*case) <= REL_TOL


# --- diffusers' own timestep rules for a folder's scheduler config (sample(..., diffusers_rules=True)) --------------

RULES_CASES = [
    # sampler, prediction, spacing, offset, karras, steps: what SD folders' configs and diffusers' defaults give
    ("dpmpp_2m", "eps", "leading", 1, False, 20),  # SD 1.5's config handed to DPMSolverMultistepScheduler
    ("dpmpp_2m", "eps", "linspace", 0, False, 25),  # DPMSolverMultistepScheduler's own default spacing
    ("dpmpp_2m", "v", "leading", 1, True, 15),  # Karras: diffusers evaluates at rounded timesteps
    ("dpmpp_2m_sde", "eps", "leading", 1, False, 12),
    ("unipc", "eps", "leading", 1, False, 20),
    ("unipc", "eps", "linspace", 0, True, 10),
    ("euler", "eps", "linspace", 0, False, 10),  # diffusers starts from σ_max·ε here
    ("euler", "v", "trailing", 0, False, 4),  # SD-Turbo's kind of config
    ("euler_a", "eps", "trailing", 0, False, 6),
    ("heun", "eps", "trailing", 0, True, 8),
]


@pytest.mark.parametrize("case", RULES_CASES, ids=lambda c: "-".join(map(str, c)))
def test_diffusers_rules_match_diffusers_from_its_own_start(case):
    """With diffusers_rules every case runs as diffusers runs the folder's config, from diffusers' own start
    (x = init_noise_sigma·ε for the σ-space schedulers, ε for the others)."""
    name, prediction, spacing, offset, karras, steps = case
    schedule = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    ours = []
    sample(toy_model, noise, sampler=name, steps=steps, schedule=schedule, prediction_type=prediction,
           spacing=spacing, steps_offset=offset, karras=karras, generator=torch.Generator().manual_seed(3),
           callback=lambda step: ours.append(step.x.clone()), diffusers_rules=True)
    if name.startswith("dpmpp"):  # ours steps x_t/√ᾱ, diffusers' DPM-Solver x_t
        plan = make_plan(schedule, steps, spacing, offset, karras, solver_grid=True)
        ours = [x / (1 + plan.sigmas[i + 1].item() ** 2) ** 0.5 for i, x in enumerate(ours)]
    sched = diffusers_scheduler(name, "scaled_linear", prediction, spacing, offset, karras, False, "zero")
    if name in ("dpmpp_2m", "dpmpp_2m_sde", "unipc") and karras:
        sched = type(sched).from_config(sched.config, use_karras_sigmas=True)
    sched.set_timesteps(steps)
    stochastic = "generator" in inspect.signature(sched.step).parameters
    x, theirs, generator = noise * sched.init_noise_sigma, [], torch.Generator().manual_seed(3)
    for t in sched.timesteps:
        out = toy_model(sched.scale_model_input(x, t), t.expand(x.shape[0]).to(torch.float32))
        x = sched.step(out, t, x, **({"generator": generator} if stochastic else {})).prev_sample
        if getattr(sched, "state_in_first_order", True):
            theirs.append(x)
    if not getattr(sched, "state_in_first_order", True):
        theirs.append(x)
    assert len(ours) == len(theirs) == steps
    error = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, theirs, strict=True))
    assert error <= REL_TOL
