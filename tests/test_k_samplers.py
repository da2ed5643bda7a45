"""A1111's samplers and schedule types against k-diffusion itself (PyPI 0.1.1.post1, the sampler code A1111 runs),
driven the way A1111's KDiffusionSampler drives it: CompVisDenoiser / CompVisVDenoiser over the model's float32 ᾱ,
x = σ_0 ε, the sampler's own schedule type for "Automatic", the penultimate σ dropped for DPM2 / DPM2 a / DPM++ 3M
SDE, η = 1 for DPM fast / adaptive, and img2img from sigmas[n - ⌊min(s, 0.999) n⌋ - 1:].

Every case compares x̂_0 after every step and the final sample, in fp32, with the same noise sequence handed to both
loops; the tolerance is the issue's 1e-5 relative. The schedule types A1111 builds in its own code
(modules/sd_schedulers.py) are rebuilt in `a1111_sigmas` from k-diffusion's DiscreteSchedule (sigma_to_t, t_to_sigma,
get_sigmas) and scipy's Beta quantiles, which are what A1111 calls.
"""

from __future__ import annotations

import inspect
import math

import noise_tape
import numpy as np
import pytest
import torch
from k_diffusion_oracle import load_k_diffusion

from kedavra.diffusion.samplers import sample
from kedavra.diffusion.samplers.k_diffusion import K_SAMPLERS, resolve_k_sampler
from kedavra.diffusion.schedule import NoiseSchedule
from kedavra.diffusion.sigmas import AYS_SIGMAS, SigmaTable, beta_quantile, build_sigmas, resolve_schedule_type
from kedavra.pipeline.infotext import request_parameters
from kedavra.pipeline.request import GenerationRequest

SHAPE = (2, 4, 6, 6)
REL_TOL = 1e-5
SCHEDULES = {"sd": NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012),
             "zsnr": NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012, zero_terminal_snr=True)}


def toy_model(x, t):
    """A smooth stand-in for a U-Net whose output depends on fractional t (so t(σ) differences show)."""
    t = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * torch.tanh(x) + 0.3 * torch.sin(x * 2 + t / 150) + 0.05 * x


class CompVisStandIn(torch.nn.Module):
    """What k-diffusion's CompVisDenoiser reads from an LDM model: alphas_cumprod (float32) and apply_model."""

    def __init__(self, schedule: NoiseSchedule):
        super().__init__()
        alpha_bar = schedule.alpha_bar.clone()
        if schedule.zero_terminal_snr:
            alpha_bar[-1] = 4.8973451890853435e-08  # A1111's rescale_zero_terminal_snr_abar
        self.alphas_cumprod = alpha_bar.float()

    def apply_model(self, x, t, cond=None, **kwargs):
        return toy_model(x, t)


def oracle(schedule: NoiseSchedule, prediction: str):
    sampling, external = load_k_diffusion()
    wrapper = external.CompVisVDenoiser if prediction == "v" else external.CompVisDenoiser
    return sampling, wrapper(CompVisStandIn(schedule))


def a1111_sigmas(kind: str, n: int, wrap, sampling, sdxl=False) -> torch.Tensor:
    """A1111 1.10's schedule types, built from k-diffusion's DiscreteSchedule as modules/sd_schedulers.py does."""
    sigma_min, sigma_max = wrap.sigmas[0].item(), wrap.sigmas[-1].item()
    if kind == "uniform":
        return wrap.get_sigmas(n)
    if kind == "karras":
        return sampling.get_sigmas_karras(n, sigma_min, sigma_max)
    if kind == "exponential":
        return sampling.get_sigmas_exponential(n, sigma_min, sigma_max)
    if kind == "polyexponential":
        return sampling.get_sigmas_polyexponential(n, sigma_min, sigma_max)
    if kind in ("sgm_uniform", "normal"):
        start, end = wrap.sigma_to_t(torch.tensor(sigma_max)), wrap.sigma_to_t(torch.tensor(sigma_min))
        ts = torch.linspace(start, end, n + 1)[:-1] if kind == "sgm_uniform" else torch.linspace(start, end, n)
        return torch.FloatTensor([wrap.t_to_sigma(t) for t in ts] + [0.0])
    if kind == "kl_optimal":
        steps = torch.arange(n + 1)
        a_min, a_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
        return torch.tan(steps / n * a_min + (1.0 - steps / n) * a_max)
    if kind == "align_your_steps":
        table = list(AYS_SIGMAS["sdxl" if sdxl else "sd15"])
        if n != len(table):
            xs, ys = np.linspace(0, 1, len(table)), np.log(table[::-1])
            table = list(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1])
        return torch.FloatTensor(table + [0.0])
    if kind == "simple":
        ss = len(wrap.sigmas) / n
        return torch.FloatTensor([float(wrap.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0])
    if kind == "ddim":
        ss, sigs, x = max(len(wrap.sigmas) // n, 1), [], 1
        while x < len(wrap.sigmas):
            sigs.append(float(wrap.sigmas[x]))
            x += ss
        return torch.FloatTensor(sigs[::-1] + [0.0])
    if kind == "beta":
        from scipy import stats

        ts = [stats.beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n)]
        return torch.FloatTensor([sigma_min + x * (sigma_max - sigma_min) for x in ts] + [0.0])
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "kl_optimal",
                                  "align_your_steps", "simple", "normal", "ddim", "beta"])
@pytest.mark.parametrize("n", [1, 7, 30])
def test_schedule_types_match_a1111(kind, n):
    if kind == "kl_optimal" and n == 1:
        n = 2
    sampling, wrap = oracle(SCHEDULES["sd"], "eps")
    ours = build_sigmas(kind, n, SigmaTable.from_schedule(SCHEDULES["sd"]), "a1111")
    theirs = a1111_sigmas(kind, n, wrap, sampling).float()
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=0)


def test_sigma_table_and_timestep_map_match_k_diffusion():
    _, wrap = oracle(SCHEDULES["sd"], "eps")
    table = SigmaTable.from_schedule(SCHEDULES["sd"])
    torch.testing.assert_close(table.sigmas, wrap.sigmas, rtol=0, atol=0)
    sigmas = torch.tensor([0.0292, 0.5, 1.0, 3.3, 14.6], dtype=torch.float32)
    torch.testing.assert_close(table.sigma_to_t(sigmas), wrap.sigma_to_t(sigmas))
    ts = torch.tensor([0.0, 12.5, 500.25, 998.9, 999.0])
    torch.testing.assert_close(table.t_to_sigma(ts), wrap.t_to_sigma(ts))


def test_beta_quantile_matches_scipy():
    from scipy import stats

    for a, b in [(0.6, 0.6), (2.0, 5.0), (0.5, 3.0)]:
        for q in [1e-6, 0.01, 0.3, 0.5, 0.77, 0.999]:
            assert beta_quantile(q, a, b) == pytest.approx(stats.beta.ppf(q, a, b), rel=1e-12, abs=1e-14)


def NoiseTape(seed: int) -> noise_tape.NoiseTape:  # noqa: N802 (the shared tape, for this file's SHAPE)
    return noise_tape.NoiseTape(seed, SHAPE)


def k_diffusion_run(label, steps, schedule, prediction, schedule_type, noise, tape, init=None, strength=1.0,
                    fix_steps=False, eta=None):
    """A1111's KDiffusionSampler.sample / sample_img2img with k-diffusion's function; x̂_0 per step and the result.
    fix_steps: sample_img2img handed a step count (its hires fix; setup_img2img_steps with steps given)."""
    sampling, wrap = oracle(schedule, prediction)
    t_enc = None
    if init is not None:
        t_enc = steps - 1 if fix_steps else int(min(strength, 0.999) * steps)
        steps = int(steps / min(strength, 0.999)) if fix_steps else steps
    spec, carried = resolve_k_sampler(label)
    kind = resolve_schedule_type(carried or schedule_type)
    kind = spec.schedule if kind == "automatic" else kind
    discard = spec.a1111_discard_penultimate
    sigmas = a1111_sigmas(kind, steps + int(discard), wrap, sampling).float()
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    funcname = {"Euler": "sample_euler", "Euler a": "sample_euler_ancestral", "LMS": "sample_lms",
                "Heun": "sample_heun", "DPM2": "sample_dpm_2", "DPM2 a": "sample_dpm_2_ancestral",
                "DPM++ 2S a": "sample_dpmpp_2s_ancestral", "DPM++ 2M": "sample_dpmpp_2m",
                "DPM++ SDE": "sample_dpmpp_sde", "DPM++ 2M SDE": "sample_dpmpp_2m_sde",
                "DPM++ 2M SDE Heun": "sample_dpmpp_2m_sde", "DPM++ 3M SDE": "sample_dpmpp_3m_sde",
                "DPM fast": "sample_dpm_fast", "DPM adaptive": "sample_dpm_adaptive"}[spec.a1111]
    fn = getattr(sampling, funcname)
    kwargs = {}
    if init is None:
        x = noise * sigmas[0]
        sched = sigmas
    else:
        sched = sigmas[steps - t_enc - 1:]
        x = init + noise * sched[0]
    if funcname in ("sample_dpm_fast", "sample_dpm_adaptive"):
        if init is None:
            kwargs.update(sigma_min=wrap.sigmas[0].item(), sigma_max=wrap.sigmas[-1].item(), eta=1.0)
        else:
            kwargs.update(sigma_min=sched[-2], sigma_max=sched[0], eta=1.0)
        if funcname == "sample_dpm_fast":
            kwargs["n"] = steps if init is None else len(sched) - 1
    else:
        kwargs["sigmas"] = sched
    if spec.a1111 == "DPM++ 2M SDE Heun":
        kwargs["solver_type"] = "heun"
    if eta is not None:  # A1111 hands every function with an "eta" parameter its eta (default 1)
        assert "eta" in inspect.signature(fn).parameters
        kwargs["eta"] = eta
    if "noise_sampler" in inspect.signature(fn).parameters:
        kwargs["noise_sampler"] = tape.k_diffusion
    denoised = []
    result = fn(wrap, x, extra_args={"cond": None}, callback=lambda d: denoised.append(d["denoised"].clone()),
                disable=True, **kwargs)
    return denoised, result


# k-diffusion's own samplers (Restart, LCM and the CompVis samplers are A1111's code: tested below and in test_pndm,
# test_unipc_orders and test_consistency_samplers; ComfyUI's samplers without an A1111 label in test_comfyui_samplers)
LABELS = [spec.a1111 for spec in K_SAMPLERS if spec.a1111 not in ("", "Restart", "LCM") and not spec.timestep_grid]


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("setting", [("sd", "eps", "Automatic", 9), ("sd", "v", "Karras", 12),
                                     ("zsnr", "v", "Exponential", 8), ("sd", "eps", "SGM Uniform", 6)])
def test_a1111_samplers_match_k_diffusion(label, setting):
    schedule_name, prediction, schedule_type, steps = setting
    if schedule_name == "zsnr" and label in ("DPM fast", "DPM adaptive"):
        # From σ_max ≈ 4519 these solvers' λ-space steps lose digits in fp32: k-diffusion in fp32 lands 5.6e-3
        # (fast) and 2.2e-4 (adaptive) from its own float64 run, ours 3.0e-3 and 3.2e-5; no fp32 tolerance holds.
        pytest.skip("fp32-ill-conditioned case (see comment)")
    schedule = SCHEDULES[schedule_name]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    tape = NoiseTape(5)
    theirs, their_result = k_diffusion_run(label, steps, schedule, prediction, schedule_type, noise, tape)
    tape.rewind()
    ours = []
    our_result = sample(toy_model, noise, sampler=label, steps=steps, schedule=schedule, prediction_type=prediction,
                        schedule_type=schedule_type, noise_sampler=tape.kedavra,
                        callback=lambda step: ours.append(step.x0.clone()))
    if label != "DPM adaptive":  # the adaptive solver reports rejected steps too; the results are compared below
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert ((a - b).abs().max() / b.abs().max()).item() <= REL_TOL
    scale = their_result.abs().max()
    assert ((our_result - their_result).abs().max() / scale).item() <= REL_TOL


@pytest.mark.parametrize("label", [spec.a1111 for spec in K_SAMPLERS if spec.eta])
@pytest.mark.parametrize("eta", [0.0, 0.4])
def test_a1111_eta_reaches_the_samplers_that_take_one(label, eta):
    """A1111's eta (its eta_ancestral setting or a request's eta) as k-diffusion's samplers take it."""
    schedule = SCHEDULES["sd"]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    tape = NoiseTape(6)
    _, theirs = k_diffusion_run(label, 8, schedule, "eps", "Automatic", noise, tape, eta=eta)
    tape.rewind()
    ours = sample(toy_model, noise, sampler=label, steps=8, schedule=schedule, schedule_type="Automatic",
                  noise_sampler=tape.kedavra, eta_ancestral=eta)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= REL_TOL
    default = sample(toy_model, noise, sampler=label, steps=8, schedule=schedule, schedule_type="Automatic",
                     noise_sampler=tape.kedavra)
    assert not torch.allclose(ours, default)


def test_eta_ancestral_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="eta_ancestral=0.5 applies to A1111's Euler a, DPM2 a"):
        sample(toy_model, torch.zeros(SHAPE), sampler="DPM++ 2M", steps=4, schedule=SCHEDULES["sd"],
               schedule_type="Automatic", eta_ancestral=0.5)
    with pytest.raises(ValueError, match="give a schedule type"):
        sample(toy_model, torch.zeros(SHAPE), sampler="euler_a", steps=4, schedule=SCHEDULES["sd"], eta_ancestral=0.5)
    with pytest.raises(ValueError, match="not euler_ancestral \\(comfyui\\)"):
        sample(toy_model, torch.zeros(SHAPE), sampler="euler_ancestral", steps=4, schedule=SCHEDULES["sd"],
               schedule_type="normal", convention="comfyui", eta_ancestral=0.5)
    request = GenerationRequest.build("x", sampler="Euler a", schedule_type="Automatic", eta_ancestral=0.25)
    assert request_parameters(request, 0, 1, 8, 8, None, None).extra["Eta"] == "0.25"
    with pytest.raises(ValueError, match="not kedavra's euler_a"):
        GenerationRequest.build("x", sampler="euler_a", eta_ancestral=0.25)


@pytest.mark.parametrize("label", ["Euler a", "DPM++ 2M", "DPM++ SDE", "DPM fast"])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_a1111_img2img_matches_k_diffusion(label, strength):
    schedule = SCHEDULES["sd"]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)).tanh()
    tape = NoiseTape(8)
    _, theirs = k_diffusion_run(label, 10, schedule, "eps", "Automatic", noise, tape, init, strength)
    tape.rewind()
    ours = sample(toy_model, noise, sampler=label, steps=10, schedule=schedule, schedule_type="Automatic",
                  init=init, strength=strength, noise_sampler=tape.kedavra)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= REL_TOL


@pytest.mark.parametrize("label", ["Euler a", "DPM++ 2M", "DPM++ SDE"])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_a1111_fixed_step_img2img_matches_k_diffusion(label, strength):
    """A1111's hires fix hands sample_img2img its step count: exactly `steps` steps of a longer schedule."""
    schedule = SCHEDULES["sd"]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)).tanh()
    tape = NoiseTape(9)
    theirs_x0, theirs = k_diffusion_run(label, 7, schedule, "eps", "Karras", noise, tape, init, strength,
                                        fix_steps=True)
    tape.rewind()
    ours_x0 = []
    ours = sample(toy_model, noise, sampler=label, steps=7, schedule=schedule, schedule_type="Karras", init=init,
                  strength=strength, noise_sampler=tape.kedavra, fix_steps=True,
                  callback=lambda step: ours_x0.append(step.x0))
    assert len(ours_x0) == len(theirs_x0) == 7
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= REL_TOL


def test_a1111_img2img_steps_rule():
    from kedavra.diffusion.sigmas import a1111_img2img_steps

    assert a1111_img2img_steps(20, 0.7) == (20, 14)
    assert a1111_img2img_steps(20, 0.7, fix_steps=True) == (28, 19)  # ⌊20 / 0.7⌋ = 28
    assert a1111_img2img_steps(10, 1.0, fix_steps=True) == (10, 9)  # ⌊10 / 0.999⌋ = 10: from σ_max
    assert a1111_img2img_steps(10, 0.5, fix_steps=True) == (20, 9)
    with pytest.raises(ValueError, match="strength 0 runs no step"):
        a1111_img2img_steps(10, 0.0, fix_steps=True)


def test_fixed_steps_run_exactly_the_steps_asked_on_every_path():
    """kedavra's plans, A1111's k-diffusion and CompVis samplers: fix_steps runs `steps` steps (evaluations for the
    single-evaluation samplers), starting on the longer schedule's level."""
    schedule = SCHEDULES["sd"]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).tanh()
    for sampler, schedule_type, expected in [("euler", None, 6), ("dpmpp_2m", None, 6), ("Euler", "Automatic", 6),
                                             ("DDIM", "Automatic", 4), ("LCM", "Automatic", 6)]:
        indices = []
        sample(toy_model, noise, sampler=sampler, steps=6, schedule=schedule, schedule_type=schedule_type,
               init=init, strength=0.4, fix_steps=True, callback=lambda step, seen=indices: seen.append(step.index))
        assert len(indices) == expected, sampler  # A1111's DDIM takes t_enc - 1 = steps - 2 (pndm.a1111_img2img_plan)
    # on kedavra's plans the run is the last 6 steps of a 15-step plan: it starts where that plan's step 9 does
    from kedavra.diffusion.timesteps import make_plan

    first = []
    sample(toy_model, noise, sampler="euler", steps=6, schedule=schedule, init=init, strength=0.4, fix_steps=True,
           callback=lambda step: first.append(step.t) if step.index == 0 else None)
    assert first[0] == make_plan(schedule, 15, "leading", 0, False, "zero").timesteps[9].item()


def test_restart_follows_a1111s_walk():
    """Restart at 20 steps: A1111 rebuilds 11 Karras steps and restarts once from σ ≈ 0.1 up to σ ≈ 2, descending
    again over 9 steps (10 Karras levels without their 0)."""
    from kedavra.diffusion.samplers.restart import restart_steps

    sigmas = build_sigmas("karras", 20, SigmaTable.from_schedule(SCHEDULES["sd"]))
    pairs = restart_steps(sigmas)
    ups = [i for i in range(1, len(pairs)) if pairs[i][0] > pairs[i - 1][1]]
    assert len(ups) == 1 and len(pairs) == 11 + 9
    assert math.isclose(pairs[ups[0]][0], 2.0, rel_tol=0.3) and pairs[-1][1] == 0
    evaluations = []
    sample(lambda x, t: (evaluations.append(t), toy_model(x, t))[1], torch.zeros(SHAPE), sampler="Restart",
           steps=20, schedule=SCHEDULES["sd"], schedule_type="Automatic", noise_sampler=NoiseTape(1).kedavra)
    assert len(evaluations) == 2 * len(pairs) - 1  # Heun everywhere, Euler into 0


def test_comfyui_convention_evaluates_at_table_timesteps():
    seen = []
    sample(lambda x, t: (seen.append(t[0].item()), toy_model(x, t))[1], torch.zeros(SHAPE), sampler="dpmpp_2m",
           steps=5, schedule=SCHEDULES["sd"], schedule_type="karras", convention="comfyui")
    assert all(t == int(t) for t in seen) and seen[0] == 999


def test_unknown_names_are_refused_with_the_list():
    with pytest.raises(ValueError, match="unknown schedule type 'Karas'.*Karras"):
        sample(toy_model, torch.zeros(SHAPE), sampler="Euler", schedule_type="Karas")
    with pytest.raises(ValueError, match="unknown A1111 / ComfyUI sampler 'Euler b'.*DPM\\+\\+ 2M"):
        sample(toy_model, torch.zeros(SHAPE), sampler="Euler b", schedule_type="Karras")


# --- A1111's CompVis samplers (DDIM, PLMS, UniPC) through sample() and the request -----------------------------------


def _zeros(x, sigma, sigma_next):
    return torch.zeros_like(x)


@pytest.mark.parametrize("steps", [1, 7, 20])
def test_a1111_compvis_samplers_run_on_a1111_grids(steps):
    """sample(sampler="DDIM" / "PLMS" / "UniPC", schedule_type=...) is A1111's CompVis run: x = ε on its integer
    timesteps (DDIM, PLMS: pndm.py) or its continuous-time grid (UniPC bh1, order 3: unipc.py), whatever the schedule
    type names (A1111 ignores it for these)."""
    from kedavra.diffusion.samplers.ddpm import sample_ddim
    from kedavra.diffusion.samplers.denoiser import Denoiser
    from kedavra.diffusion.samplers.pndm import a1111_timesteps_plan, sample_plms
    from kedavra.diffusion.samplers.unipc import a1111_unipc_plan, a1111_unipc_steps, sample_unipc

    schedule = SCHEDULES["sd"]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    plan = a1111_timesteps_plan(schedule, steps)
    unipc_plan = a1111_unipc_plan(schedule, a1111_unipc_steps(steps)[0])
    expected = {
        "DDIM": sample_ddim(Denoiser(toy_model), noise, plan),
        "PLMS": sample_plms(Denoiser(toy_model), noise, plan),
        "UniPC": sample_unipc(Denoiser(toy_model), noise, unipc_plan, order=3, variant="bh1"),
    }
    for name, reference in expected.items():
        for schedule_type in ("Automatic", "Karras"):
            out = sample(toy_model, noise, sampler=name, steps=steps, schedule=schedule, schedule_type=schedule_type)
            assert torch.equal(out, reference), (name, schedule_type)
    eta_noise = []
    sample(toy_model, noise, sampler="DDIM", steps=steps, schedule=schedule, schedule_type="Automatic", eta=0.5,
           noise_sampler=lambda x, s, s_next: (eta_noise.append(s_next), torch.zeros_like(x))[1])
    assert len(eta_noise) == len(plan)  # η > 0 draws noise at every step


def test_a1111_compvis_img2img_noises_one_timestep_above_the_first():
    from kedavra.diffusion.forward_process import add_noise
    from kedavra.diffusion.samplers.ddpm import sample_ddim
    from kedavra.diffusion.samplers.denoiser import Denoiser
    from kedavra.diffusion.samplers.pndm import a1111_img2img_plan

    schedule = SCHEDULES["sd"]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    plan, alpha_bar = a1111_img2img_plan(schedule, 20, 0.6)  # t_enc = 12: 11 steps from ts[11] = 551, noised at 601
    assert plan.timesteps[0].item() == 551 and alpha_bar == pytest.approx(schedule.alpha_bar[601].item(), rel=1e-6)
    expected = sample_ddim(Denoiser(toy_model), add_noise(init, noise, alpha_bar), plan)
    out = sample(toy_model, noise, sampler="DDIM", steps=20, schedule=schedule, schedule_type="Automatic", init=init,
                 strength=0.6)
    assert torch.equal(out, expected)
    assert sample(toy_model, noise, sampler="UniPC", steps=20, schedule=schedule, schedule_type="Automatic",
                  init=init, strength=0.6).shape == SHAPE


def test_a1111_compvis_bad_input():
    schedule = SCHEDULES["sd"]
    noise = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="DDIM runs as A1111 runs it"):
        sample(toy_model, noise, sampler="DDIM", steps=4, schedule=schedule, schedule_type="normal",
               convention="comfyui")
    with pytest.raises(ValueError, match="eta=0.5 applies to A1111's DDIM here, not 'Euler a'"):
        sample(toy_model, noise, sampler="Euler a", steps=4, schedule=schedule, schedule_type="Automatic", eta=0.5)


def test_requests_name_a1111_ddim_and_write_its_eta():
    from kedavra.pipeline.infotext import request_parameters
    from kedavra.pipeline.request import GenerationRequest

    request = GenerationRequest.build("a cat", sampler="DDIM", schedule_type="Automatic", eta=0.3)
    assert request.k_sampler.name == "DDIM" and request.sampler_spec is None
    params = request_parameters(request, 0, 1, 64, 64, None, None)
    assert (params.sampler, params.schedule_type, params.extra["Eta DDIM"]) == ("DDIM", "Automatic", "0.3")
    assert GenerationRequest.build("a cat", sampler="DDIM").sampler_spec.name == "ddim"  # kedavra's (diffusers')
    with pytest.raises(ValueError, match="eta=0.3 does not apply to Euler a"):
        GenerationRequest.build("a cat", sampler="Euler a", schedule_type="Automatic", eta=0.3)


class RandnHijack:
    """A1111's TorchHijack: k-diffusion's torch.randn_like answered from a NoiseTape (its ImageRNG draws)."""

    def __init__(self, tape):
        self.tape = tape

    def __getattr__(self, item):
        return self.tape.next if item == "randn_like" else getattr(torch, item)

    def randn_like(self, x):
        return self.tape.next()


@pytest.mark.parametrize("label, function", [("Euler", "sample_euler"), ("Heun", "sample_heun"),
                                             ("DPM2", "sample_dpm_2")])
@pytest.mark.parametrize("s_tmin, s_tmax", [(0.0, math.inf), (0.5, 5.0)])
def test_churn_matches_k_diffusion(label, function, s_tmin, s_tmax, monkeypatch):
    """s_churn / s_tmin / s_tmax / s_noise (Karras et al. 2022, Algorithm 2) as A1111 hands them to k-diffusion's
    Euler, Heun and DPM2, with the noise k-diffusion draws at every step (torch.randn_like, A1111's hijack)."""
    from kedavra.diffusion.samplers.euler import Churn

    sampling, wrap = oracle(SCHEDULES["sd"], "eps")
    schedule, steps = SCHEDULES["sd"], 8
    spec = resolve_k_sampler(label)[0]
    sigmas = a1111_sigmas("karras", steps + int(spec.a1111_discard_penultimate), wrap, sampling).float()
    if spec.a1111_discard_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(12))
    tape = NoiseTape(13)
    monkeypatch.setattr(sampling, "torch", RandnHijack(tape))
    theirs = getattr(sampling, function)(wrap, noise * sigmas[0], sigmas, extra_args={"cond": None}, disable=True,
                                         s_churn=3.0, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=1.003)
    monkeypatch.undo()
    tape.rewind()
    ours = sample(toy_model, noise, sampler=label, steps=steps, schedule=schedule, schedule_type="Karras",
                  noise_sampler=tape.kedavra, churn=Churn(3.0, s_tmin, s_tmax, 1.003))
    assert tape.position == steps  # one draw per step, γ or not
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= REL_TOL
    plain = sample(toy_model, noise, sampler=label, steps=steps, schedule=schedule, schedule_type="Karras")
    assert not torch.allclose(ours, plain)


def test_churn_bad_input():
    from kedavra.diffusion.samplers.euler import Churn

    with pytest.raises(ValueError, match="s_churn must be a finite number >= 0, got -1"):
        Churn(s_churn=-1)
    with pytest.raises(ValueError, match="s_tmax must be a number > 0 or inf"):
        Churn(s_tmax=0)
    with pytest.raises(ValueError, match="give a schedule type"):
        sample(toy_model, torch.zeros(SHAPE), sampler="euler", steps=2, churn=Churn(s_churn=1.0))


@pytest.mark.parametrize("label", ["Euler", "DPM++ 2M", "Euler a"])
def test_a1111_inpainting_blends_the_prediction_as_a1111(label):
    """A1111's inpainting with an ordinary model, transcribed: CFGDenoiser's denoised = init·keep + paint·denoised
    around k-diffusion's sampler, then samples·paint + init·keep (processing.py); ours within 1e-5."""
    sampling, wrap = oracle(SCHEDULES["sd"], "eps")
    schedule, steps, strength = SCHEDULES["sd"], 8, 0.75
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(21))
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(22)).tanh()
    paint = torch.zeros(SHAPE[0], 1, *SHAPE[2:])
    paint[..., 1:4, 2:5] = 1
    keep = 1 - paint
    spec = resolve_k_sampler(label)[0]
    sigmas = a1111_sigmas(spec.schedule, steps, wrap, sampling).float()  # the sampler's "Automatic"
    t_enc = int(min(strength, 0.999) * steps)
    sched = sigmas[steps - t_enc - 1:]

    def blended(x, sigma, **extra):
        return init * keep + paint * wrap(x, sigma, **extra)

    tape = NoiseTape(23)
    fn = {"Euler": sampling.sample_euler, "DPM++ 2M": sampling.sample_dpmpp_2m,
          "Euler a": sampling.sample_euler_ancestral}[label]
    kwargs = {"noise_sampler": tape.k_diffusion} if label == "Euler a" else {}
    theirs = fn(blended, init + noise * sched[0], sched, extra_args={"cond": None}, disable=True, **kwargs)
    theirs = theirs * paint + init * keep
    tape.rewind()
    ours = sample(toy_model, noise, sampler=label, steps=steps, schedule=schedule, schedule_type="Automatic",
                  init=init, strength=strength, mask=paint, noise_sampler=tape.kedavra)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= REL_TOL
    assert torch.equal(ours * keep, init * keep)  # the kept region is the init exactly


def test_comfyui_inpainting_blends_input_and_prediction():
    """ComfyUI's KSamplerX0Inpaint with Euler, transcribed: the input blended with init + σ·noise where kept, the
    prediction with init; nothing after the run."""
    from kedavra.diffusion.samplers.denoiser import Denoiser
    from kedavra.diffusion.samplers.k_diffusion import prepare_k_run

    schedule, steps = SCHEDULES["sd"], 6
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(31))
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(32)).tanh()
    paint = torch.zeros(SHAPE[0], 1, *SHAPE[2:])
    paint[..., :3, :] = 0.6  # ComfyUI's masks are soft
    run = prepare_k_run("euler", noise, steps, schedule, "normal", "comfyui", init, 0.8)
    denoiser, x, plan = Denoiser(toy_model), run.start, run.plan
    for i in range(len(plan)):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x_in = x * paint + (init + sigma * noise) * (1 - paint)
        x0 = denoiser.ve(x_in, plan.timesteps[i].item(), sigma) * paint + init * (1 - paint)
        x = x + (x - x0) / sigma * (sigma_next - sigma)
    ours = sample(toy_model, noise, sampler="euler", steps=steps, schedule=schedule, schedule_type="normal",
                  convention="comfyui", init=init, strength=0.8, mask=paint)
    assert ((ours - x).abs().max() / x.abs().max()).item() <= REL_TOL
