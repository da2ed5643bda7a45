"""ComfyUI's CFG++ samplers (euler_cfg_pp, euler_ancestral_cfg_pp, dpmpp_2s_ancestral_cfg_pp, dpmpp_2m_cfg_pp,
res_multistep_cfg_pp, res_multistep_ancestral_cfg_pp, gradient_estimation_cfg_pp; kedavra.diffusion.samplers.cfg_pp)
against transcriptions of ComfyUI's code written here: comfy/k_diffusion/sampling.py (sample_euler_ancestral_cfg_pp,
which sample_euler_cfg_pp calls with η = 0 and s_noise = 0, sample_dpmpp_2s_ancestral_cfg_pp, sample_dpmpp_2m_cfg_pp,
res_multistep with cfg_pp=True, sample_gradient_estimation with cfg_pp=True), straightforward float32 loops
following its lines for a discrete ε / v model (ModelSamplingDiscrete: λ = -log σ, α = 1), driven as its KSampler
drives them (tests/test_comfyui_samplers.py's σ's, start and nearest-table timestep).

The model is a guided toy: two smooth functions of x and t as the conditional and unconditional predictions.
ComfyUI's side combines their x̂_0 as its cfg_function does, uncond + (cond - uncond)·cfg, and hands its samplers
the unconditional x̂_0 through the post-CFG hook they install (computed at cfg 1 too: disable_cfg1_optimization);
kedavra's side folds guidance into the predictions (kedavra.diffusion.guidance) and gives both through
`with_uncond`, as the pipeline's GuidedUNet does. The ancestral samplers read one noise tape on both sides. x̂_0
after every step and the result agree within 1e-5 relative in fp32 (measured: 3.0e-6 at most, mostly 1e-7 to 1e-6),
and within 1e-12 when both sides run in float64 (measured: 1e-13 at most): the same arithmetic.

One case is compared in float64 only: zero terminal SNR with ε-prediction from σ_max ≈ 4519, where x̂_0 = x - σ ε̂
cancels four digits of x. ComfyUI combines guidance on the two x̂_0 (each carrying x's rounding, ~1e-3, and the
difference then multiplied by cfg), kedavra on the ε-predictions: their fp32 runs differ by up to 4e-4 there
(dpmpp_2s_ancestral_cfg_pp at cfg 3), kedavra's being the nearer to the float64 run (2e-5 from it, ComfyUI's 4e-4).

Left out: the flow-model (CONST) branch of dpmpp_2s_ancestral_cfg_pp, and model_sampling's noise_scale (1 here).
"""

from __future__ import annotations

import noise_tape
import pytest
import torch
from test_comfyui_samplers import SCHEDULES, comfy_sigmas, comfy_start, relative, toy_model
from test_comfyui_samplers_more import get_ancestral_step, to_d

from kedavra.diffusion.guidance import classifier_free_guidance
from kedavra.diffusion.samplers import sample
from kedavra.diffusion.samplers.cfg_pp import sample_dpmpp_2m_cfg_pp
from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.samplers.k_diffusion import (
    K_SAMPLERS,
    k_sampler_names,
    k_sigmas,
    plan_from_sigmas,
    resolve_k_sampler,
)
from kedavra.diffusion.sigmas import SigmaTable

SHAPE = (2, 4, 5, 5)
REL_TOL = 1e-5
# comfy/samplers.py KSAMPLER_NAMES' CFG++ names, in its order
DETERMINISTIC = ("euler_cfg_pp", "dpmpp_2m_cfg_pp", "res_multistep_cfg_pp", "gradient_estimation_cfg_pp")
STOCHASTIC = ("euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "res_multistep_ancestral_cfg_pp")
CFG_PP = ("euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m_cfg_pp",
          "res_multistep_cfg_pp", "res_multistep_ancestral_cfg_pp", "gradient_estimation_cfg_pp")


def NoiseTape(seed: int) -> noise_tape.NoiseTape:  # noqa: N802 (the shared tape, for this file's SHAPE)
    return noise_tape.NoiseTape(seed, SHAPE)


def uncond_toy(x, t):
    """The guided toy's unconditional prediction: another smooth function of x and t than toy_model's."""
    t = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.5 * torch.tanh(0.8 * x) - 0.25 * torch.cos(x + t / 200) + 0.1 * x


class GuidedToy:
    """toy_model (conditional) and uncond_toy (unconditional) combined by classifier-free guidance at scale w, with
    `with_uncond` as the pipeline's GuidedUNet gives it."""

    def __init__(self, guidance_scale: float):
        self.guidance_scale = guidance_scale

    def __call__(self, x, t):
        return self.with_uncond(x, t)[0]

    def with_uncond(self, x, t):
        uncond = uncond_toy(x, t)
        return classifier_free_guidance(toy_model(x, t), uncond, self.guidance_scale), uncond


# --- ComfyUI's side: transcriptions of comfy/k_diffusion/sampling.py -------------------------------------------------


def comfy_guided_model(schedule, prediction: str, cfg: float):
    """(denoised, uncond_denoised) at (x, σ): ModelSamplingDiscrete's nearest table timestep and EPS / V_PREDICTION
    x̂_0 of each half, combined by cfg_function; the second is what the CFG++ samplers' post-CFG hook keeps."""
    log_sigmas = SigmaTable.from_schedule(schedule, "comfyui").sigmas.log()

    def denoise(x, sigma):
        t = (sigma.log()[None, :] - log_sigmas[:, None]).abs().argmin(dim=0).float()
        s = sigma.reshape(-1, 1, 1, 1)
        x_in = x / (s**2 + 1) ** 0.5

        def calculate_denoised(out):
            if prediction == "v":
                return x / (s**2 + 1) - out * s / (s**2 + 1) ** 0.5
            return x - out * s

        cond_pred, uncond_pred = calculate_denoised(toy_model(x_in, t)), calculate_denoised(uncond_toy(x_in, t))
        return uncond_pred + (cond_pred - uncond_pred) * cfg, uncond_pred

    return denoise


def comfy_euler_ancestral_cfg_pp(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0):
    """sample_euler_ancestral_cfg_pp; sample_euler_cfg_pp is eta=0, s_noise=0."""
    s_in = x.new_ones([x.shape[0]])
    lambda_fn = lambda sigma: sigma.log().neg()  # noqa: E731  sigma_to_half_log_snr, ModelSamplingDiscrete
    denoised_all = []
    for i in range(len(sigmas) - 1):
        denoised, uncond_denoised = model(x, sigmas[i] * s_in)
        denoised_all.append(denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            alpha_s = sigmas[i] * lambda_fn(sigmas[i]).exp()
            alpha_t = sigmas[i + 1] * lambda_fn(sigmas[i + 1]).exp()
            d = to_d(x, sigmas[i], alpha_s * uncond_denoised)
            sigma_down, sigma_up = get_ancestral_step(sigmas[i] / alpha_s, sigmas[i + 1] / alpha_t, eta=eta)
            sigma_down = alpha_t * sigma_down
            x = alpha_t * denoised + sigma_down * d
            if eta > 0 and s_noise > 0:
                x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return denoised_all, x


def comfy_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0):
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    denoised_all = []
    for i in range(len(sigmas) - 1):
        denoised, uncond_denoised = model(x, sigmas[i] * s_in)
        guidance_vector = denoised - uncond_denoised
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        denoised_all.append(denoised)
        if sigma_down == 0:
            d = to_d(x, sigmas[i], uncond_denoised)
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-h * r).expm1() * uncond_denoised
            _, uncond_denoised_2 = model(x_2, sigma_fn(s) * s_in)  # the hook's uncond_denoised of this call
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * uncond_denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        x += guidance_vector
    return denoised_all, x


def comfy_dpmpp_2m_cfg_pp(model, x, sigmas):
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    s_in = x.new_ones([x.shape[0]])
    old_uncond_denoised = None
    denoised_all = []
    for i in range(len(sigmas) - 1):
        denoised, uncond_denoised = model(x, sigmas[i] * s_in)
        denoised_all.append(denoised)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_uncond_denoised is None or sigmas[i + 1] == 0:
            denoised_mix = -torch.exp(-h) * uncond_denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_mix = -torch.exp(-h) * uncond_denoised - torch.expm1(-h) * (1 / (2 * r)) * (
                denoised - old_uncond_denoised)
        x = denoised + denoised_mix + torch.exp(-h) * x
        old_uncond_denoised = uncond_denoised
    return denoised_all, x


def comfy_res_multistep_cfg_pp(model, x, sigmas, noise_sampler, eta, s_noise=1.0):
    """res_multistep with cfg_pp=True: sample_res_multistep_cfg_pp is eta=0, sample_res_multistep_ancestral_cfg_pp
    eta=1."""
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    phi1_fn = lambda t: torch.expm1(t) / t  # noqa: E731
    phi2_fn = lambda t: (phi1_fn(t) - 1.0) / t  # noqa: E731
    old_sigma_down = None
    old_denoised = None
    denoised_all = []
    for i in range(len(sigmas) - 1):
        denoised, uncond_denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        denoised_all.append(denoised)
        if sigma_down == 0 or old_denoised is None:
            d = to_d(x, sigmas[i], uncond_denoised)
            x = denoised + d * sigma_down
        else:
            t, t_old, t_next, t_prev = t_fn(sigmas[i]), t_fn(old_sigma_down), t_fn(sigma_down), t_fn(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            x = x + (denoised - uncond_denoised)
            x = sigma_fn(h) * x + h * (b1 * uncond_denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised = uncond_denoised
        old_sigma_down = sigma_down
    return denoised_all, x


def comfy_gradient_estimation_cfg_pp(model, x, sigmas, ge_gamma=2.0):
    s_in = x.new_ones([x.shape[0]])
    old_d = None
    denoised_all = []
    for i in range(len(sigmas) - 1):
        denoised, uncond_denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], uncond_denoised)
        denoised_all.append(denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1]
            if i >= 1:
                d_bar = (ge_gamma - 1) * (d - old_d)
                x = x + d_bar * dt
        old_d = d
    return denoised_all, x


def comfy_run(name, steps, schedule, kind, prediction, cfg, noise, tape, init=None, denoise=1.0,
              dtype=torch.float32):
    """ComfyUI's run as it computes, in float32 (or in float64 on its float32 σ's): x̂_0 (guided) of every step and
    the result."""
    sigmas = comfy_sigmas(name, steps, schedule, kind, denoise).to(dtype)
    model = comfy_guided_model(schedule, prediction, cfg)
    x = comfy_start(noise, sigmas, schedule, init)

    def noise_sampler(sigma, sigma_next):
        return tape.comfy(sigma, sigma_next).to(dtype)

    runs = {
        "euler_cfg_pp": lambda: comfy_euler_ancestral_cfg_pp(model, x, sigmas, None, eta=0.0, s_noise=0.0),
        "euler_ancestral_cfg_pp": lambda: comfy_euler_ancestral_cfg_pp(model, x, sigmas, noise_sampler),
        "dpmpp_2s_ancestral_cfg_pp": lambda: comfy_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, noise_sampler),
        "dpmpp_2m_cfg_pp": lambda: comfy_dpmpp_2m_cfg_pp(model, x, sigmas),
        "res_multistep_cfg_pp": lambda: comfy_res_multistep_cfg_pp(model, x, sigmas, noise_sampler, eta=0.0),
        "res_multistep_ancestral_cfg_pp": lambda: comfy_res_multistep_cfg_pp(model, x, sigmas, noise_sampler,
                                                                             eta=1.0),
        "gradient_estimation_cfg_pp": lambda: comfy_gradient_estimation_cfg_pp(model, x, sigmas),
    }
    return runs[name]()


# --- parity ----------------------------------------------------------------------------------------------------------

ZSNR_EPS = ("sgm_uniform", 20, "zsnr", "eps", 1.0, 3.0)  # compared in float64 only (module docstring)
CASES = [  # (schedule type, steps, schedule, prediction, denoise, guidance scale)
    ("normal", 12, "sd", "eps", 1.0, 2.0),
    ("karras", 10, "sd", "v", 1.0, 1.5),
    ("exponential", 3, "sd", "eps", 1.0, 0.6),
    ("normal", 8, "sd", "eps", 0.6, 1.0),
    ("karras", 10, "zsnr", "v", 1.0, 2.0),
    ("simple", 15, "sd", "v", 0.75, 3.0),
]
FLOAT64_TOL = 1e-12


def largest_difference(name, case, dtype=torch.float32) -> float:
    """The largest relative difference of x̂_0 after a step or of the result, kedavra's against ComfyUI's
    transcription, both in `dtype` (the σ's ComfyUI's float32 ones), on the same noise tape."""
    kind, steps, schedule_name, prediction, denoise, cfg = case
    schedule = SCHEDULES[schedule_name]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps)).to(dtype)
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100)).tanh().to(dtype) if denoise < 1 else None
    tape = NoiseTape(steps + 7)
    theirs, their_result = comfy_run(name, steps, schedule, kind, prediction, cfg, noise, tape, init, denoise, dtype)
    tape.rewind()
    ours = []
    result = sample(GuidedToy(cfg), noise, sampler=name, steps=steps, schedule=schedule, prediction_type=prediction,
                    schedule_type=kind, convention="comfyui", init=init, strength=denoise,
                    noise_sampler=lambda x, sigma, sigma_next: tape.kedavra(x, sigma, sigma_next).to(dtype),
                    callback=lambda step: ours.append(step.x0.clone()))
    assert len(ours) == len(theirs) == steps and result.dtype == dtype
    return max([relative(a, b) for a, b in zip(ours, theirs, strict=True)] + [relative(result, their_result)])


@pytest.mark.parametrize("name", CFG_PP)
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case)))
def test_cfg_pp_samplers_follow_comfyuis_code(name, case):
    assert largest_difference(name, case) < REL_TOL


@pytest.mark.parametrize("name", CFG_PP)
@pytest.mark.parametrize("case", [*CASES, ZSNR_EPS], ids=lambda case: "-".join(map(str, case)))
def test_cfg_pp_samplers_compute_comfyuis_arithmetic(name, case):
    """Both sides in float64: what is left is the order of operations."""
    assert largest_difference(name, case, torch.float64) < FLOAT64_TOL


@pytest.mark.parametrize("name", CFG_PP)
def test_at_guidance_zero_each_is_its_sampler_without_cfg_pp(name):
    """At w = 0 the guided x̂_0 is the unconditional one (D = U), and every update of cfg_pp.py's docstring reduces to
    its sampler's own (D + σ' (x - U)/σ is then the Euler / DDIM step; the added g = D - U is 0). At w = 1 it does not:
    D is the conditional x̂_0 while the renoising follows the unconditional one."""
    schedule = SCHEDULES["sd"]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    run = {"steps": 9, "schedule": schedule, "schedule_type": "karras", "convention": "comfyui"}
    for scale in (0.0, 1.0, 2.5):
        cfg_pp, plain = (sample(GuidedToy(scale), noise, sampler=sampler, noise_sampler=NoiseTape(2).kedavra, **run)
                         for sampler in (name, name.removesuffix("_cfg_pp")))
        if scale == 0:
            assert relative(cfg_pp, plain) < 1e-6
        else:
            assert relative(cfg_pp, plain) > 1e-2  # the unconditional renoising shows


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_use_their_noise(name):
    runs = [sample(GuidedToy(2.0), torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)), sampler=name,
                   steps=8, schedule=SCHEDULES["sd"], schedule_type="karras", convention="comfyui",
                   noise_sampler=NoiseTape(seed).kedavra) for seed in (1, 2)]
    assert relative(runs[0], runs[1]) > 1e-3


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_draw_no_noise(name):
    def refuse(x, sigma, sigma_next):
        raise AssertionError("noise drawn")

    sample(GuidedToy(2.0), torch.randn(SHAPE), sampler=name, steps=6, schedule=SCHEDULES["sd"],
           schedule_type="karras", convention="comfyui", noise_sampler=refuse)


def test_evaluation_counts():
    """One evaluation (both halves in one call) per step; dpmpp_2s_ancestral_cfg_pp 2n - 1 (none at σ_s on the
    step into σ = 0)."""
    steps = 7
    for name in CFG_PP:
        denoiser = Denoiser(GuidedToy(2.0))
        sample(denoiser, torch.randn(SHAPE), sampler=name, steps=steps, schedule=SCHEDULES["sd"],
               schedule_type="normal", convention="comfyui", noise_sampler=NoiseTape(0).kedavra)
        assert denoiser.evaluations == (2 * steps - 1 if name == "dpmpp_2s_ancestral_cfg_pp" else steps), name


# --- names, errors -------------------------------------------------------------------------------------------------


def test_names_resolve_as_comfyui_lists_them():
    assert tuple(s.comfyui for s in K_SAMPLERS if s.cfg_pp) == CFG_PP
    for name in CFG_PP:
        spec, carried = resolve_k_sampler(name, "comfyui")
        assert spec.comfyui == name and spec.a1111 == "" and carried is None and spec.cfg_pp and not spec.eta
        assert spec.ancestral == (name in STOCHASTIC) and not spec.brownian and not spec.comfyui_discard_penultimate
        assert name in k_sampler_names() and resolve_k_sampler(name.upper())[0] == spec
    assert not any(s.cfg_pp for s in K_SAMPLERS if not s.comfyui.endswith("_cfg_pp"))


def test_a_model_without_guidance_is_refused_naming_the_sampler():
    """A plain callable (or an analytic toy) has no unconditional prediction: the run stops before the first
    evaluation, naming the sampler; a CFG++ function driven directly says the same without the name."""
    schedule = SCHEDULES["sd"]
    denoiser = Denoiser(toy_model)
    for name in CFG_PP:
        with pytest.raises(ValueError, match=f"^{name} needs classifier-free guidance's unconditional prediction "
                                             r"\(CFG\+\+, Chung et al. 2024.*toy_model"):
            sample(denoiser, torch.randn(SHAPE), sampler=name, steps=4, schedule=schedule, schedule_type="normal",
                   convention="comfyui")
    assert denoiser.evaluations == 0
    sigmas, table = k_sigmas(resolve_k_sampler("dpmpp_2m_cfg_pp")[0], 4, schedule, "normal", "comfyui")
    with pytest.raises(ValueError, match=r"^a CFG\+\+ sampler needs classifier-free guidance's unconditional"):
        sample_dpmpp_2m_cfg_pp(denoiser, torch.randn(SHAPE), plan_from_sigmas(sigmas, table))


def test_inpainting_keeps_the_init_where_the_mask_is_zero():
    """ComfyUI's inpainting (KSamplerX0Inpaint) blends the guided x̂_0 with the init; the step into σ = 0 returns it,
    so the kept region is the init exactly."""
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)).tanh()
    mask = torch.zeros(SHAPE[0], 1, *SHAPE[2:])
    mask[..., 1:4, 1:4] = 1
    for name in ("euler_cfg_pp", "res_multistep_ancestral_cfg_pp"):
        out = sample(GuidedToy(2.0), torch.randn(SHAPE, generator=torch.Generator().manual_seed(6)), sampler=name,
                     steps=5, schedule=SCHEDULES["sd"], schedule_type="karras", convention="comfyui", init=init,
                     strength=1.0, mask=mask, noise_sampler=NoiseTape(3).kedavra)
        assert torch.equal(out * (1 - mask), init * (1 - mask))
        assert not torch.allclose(out * mask, init * mask)


# --- the pipeline ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    from random_models import tiny_model

    from kedavra.pipeline.pipeline import Pipeline

    return Pipeline(tiny_model(), dtype="fp32")


def test_the_pipeline_runs_them_and_at_guidance_zero_euler_cfg_pp_is_euler(pipe):
    """Through the pipeline on the tiny model (ComfyUI's conventions and noise): each runs, is reproducible, and
    differs from its sampler without CFG++ at guidance 3 and at guidance 1 (the unconditional renoising; measured
    relative differences 1e-3 to 9e-2 for this random model, whose halves differ little); at guidance 0, where the
    guided prediction is the unconditional one, euler_cfg_pp is euler up to rounding (cfg_pp.py's docstring)."""
    run = {"steps": 4, "schedule_type": "normal", "convention": "comfyui", "seed": 5, "negative_prompt": "a square"}
    for name in CFG_PP:
        latents = [pipe("a red circle", sampler=sampler, guidance_scale=3.0, **run).latents
                   for sampler in (name, name, name.removesuffix("_cfg_pp"))]
        assert torch.isfinite(latents[0]).all() and torch.equal(latents[0], latents[1])
        assert relative(latents[0], latents[2]) > 1e-4, name  # rounding alone: 1e-6
    euler, euler_cfg_pp = ([pipe("a red circle", sampler=sampler, guidance_scale=scale, **run).latents
                            for scale in (0.0, 1.0)] for sampler in ("euler", "euler_cfg_pp"))
    assert relative(euler_cfg_pp[0], euler[0]) < 1e-5
    assert relative(euler_cfg_pp[1], euler[1]) > 1e-3


def test_at_guidance_one_the_unconditional_half_still_runs(pipe):
    """ComfyUI's disable_cfg1_optimization: at guidance 1 a CFG++ run evaluates the negative prompt too (the step
    records carry it), a plain run does not; GuidedUNet.with_uncond gives the guided prediction the call gives."""
    records = {name: [] for name in ("euler_cfg_pp", "euler")}
    for name, seen in records.items():
        pipe("a red circle", sampler=name, steps=2, guidance_scale=1.0, schedule_type="normal", convention="comfyui",
             seed=1, callback=seen.append)
    assert all(step.uncond is not None for step in records["euler_cfg_pp"])
    assert all(step.uncond is None for step in records["euler"])
    from kedavra.pipeline.request import GenerationRequest

    for scale in (1.0, 4.0):
        guided = pipe.guided_unet(GenerationRequest.build("a red circle", "a square", guidance_scale=scale).for_model(
            pipe.config))
        x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([600.0])
        prediction, uncond = guided.with_uncond(x, t)
        assert relative(prediction, guided(x, t)) < 1e-5 and relative(prediction, uncond) > 1e-3


def test_requests_and_the_cli_table_reach_them():
    """A request keeps the ComfyUI name (with a schedule type, or "Automatic" without one, as res_multistep), and
    `kedavra samplers` lists them."""
    from kedavra.commands.samplers import k_sampler_table
    from kedavra.pipeline.request import GenerationRequest

    table = k_sampler_table(markdown=False)
    for name in CFG_PP:
        request = GenerationRequest.build("a cat", sampler=name, schedule_type="normal", convention="comfyui")
        assert request.k_sampler.comfyui == name and request.sampler_spec is None
        assert GenerationRequest.build("a cat", sampler=name).k_sampler.comfyui == name
        assert name in table
