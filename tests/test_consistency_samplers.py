"""Consistency-model samplers (kedavra.diffusion.samplers.consistency): LCM and TCD against diffusers' LCMScheduler
and TCDScheduler step by step (fp32), their timestep selection, and the A1111/ComfyUI LCM loop on analytic cases.

Parity: both loops see the same model, the same initial noise and the same per-step noise (generators with the
same seed, drawn in the same order: one draw per stochastic step, after the model). Relative error at every step
= max|ours - theirs| / max|theirs|.
"""

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from kedavra.diffusion.forward_process import add_noise  # noqa: E402
from kedavra.diffusion.samplers import sample  # noqa: E402
from kedavra.diffusion.samplers.consistency import (  # noqa: E402
    lcm_scalings,
    lcm_timesteps,
    make_consistency_plan,
    make_lcm_sigma_plan,
    sample_lcm,
    sample_lcm_kdiffusion,
    sample_tcd,
    tcd_intermediate_timestep,
    tcd_timesteps,
)
from kedavra.diffusion.samplers.denoiser import Denoiser  # noqa: E402
from kedavra.diffusion.samplers.k_diffusion import prepare_k_run  # noqa: E402
from kedavra.diffusion.samplers.noise import generator_noise  # noqa: E402
from kedavra.diffusion.schedule import SCHEDULE_PRESETS  # noqa: E402
from kedavra.diffusion.timesteps import SamplingPlan, make_plan  # noqa: E402

REL_TOL = 1e-5  # the parity target, fp32
SHAPE = (2, 4, 8, 8)
SD = SCHEDULE_PRESETS["sd"]
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# How SD LCM model folders (e.g. SimianLuo/LCM_Dreamshaper_v7) configure LCMScheduler; spacing/offset are unused.
SD_FOLDER_CONFIG = dict(original_inference_steps=50, timestep_spacing="leading", steps_offset=1,
                        set_alpha_to_one=True, clip_sample=False)
MIX = torch.linspace(-1, 1, 16).reshape(4, 4) + 0.8 * torch.eye(4)  # fixed channel mixing of the toy model


def toy_model(x, t):
    """A fixed linear channel map of x_t, squashed, plus a function of t: any fixed function serves parity."""
    t = t.to(x.dtype).reshape(-1, 1, 1, 1)
    mixed = torch.einsum("oc,bchw->bohw", MIX, x)  # (B, C, H, W)
    return 0.5 * torch.tanh(mixed) + 0.1 * x + 0.2 * torch.sin(t / 150 + torch.arange(4).reshape(1, 4, 1, 1))


def relative_error(ours, theirs) -> float:
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, theirs, strict=True))


def diffusers_run(sched, x, stochastic_kwargs):
    """diffusers' loop over sched.timesteps (set already): the sample after each step."""
    trajectory = []
    for t in sched.timesteps:
        out = toy_model(x, t.expand(x.shape[0]).to(torch.float32))
        x = sched.step(out, t, x, **stochastic_kwargs).prev_sample
        trajectory.append(x)
    return trajectory


def lcm_parity(steps, prediction, config, strength=1.0, custom=None) -> float:
    """Our LCM trajectory against LCMScheduler's; `custom`: run these timesteps instead of n picked ones."""
    sched = diffusers.LCMScheduler(prediction_type=DIFFUSERS_PREDICTION[prediction], **config)
    if custom is None:
        sched.set_timesteps(steps, strength=strength)
        timesteps = lcm_timesteps(SD, steps, config.get("original_inference_steps", 50), strength)
    else:
        sched.set_timesteps(timesteps=custom)
        timesteps, steps = torch.tensor(custom, dtype=torch.float64), len(custom)
    assert torch.equal(timesteps.long(), sched.timesteps)
    plan = make_consistency_plan(SD, timesteps)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    x, x_theirs = noise, noise
    if strength < 1:  # image-to-image: init noised to the first timestep, as LatentConsistencyModelImg2ImgPipeline
        init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
        x = add_noise(init, noise, plan.alpha_bar[0].item())
        x_theirs = sched.add_noise(init, noise, sched.timesteps[:1])
    ours = []
    per_step = generator_noise(torch.Generator().manual_seed(3))
    result = sample_lcm(Denoiser(toy_model, prediction), x, plan, noise=per_step,
                        callback=lambda step: ours.append(step.x.clone()))
    theirs = diffusers_run(sched, x_theirs, {"generator": torch.Generator().manual_seed(3)})
    assert torch.equal(result, ours[-1]) and len(ours) == steps
    return relative_error(ours, theirs)


LCM_CASES = [(steps, prediction, name) for steps in (1, 2, 4, 8) for prediction in ("eps", "v")
             for name in ("defaults", "sd_folder")] + [(4, "x0", "defaults")]


@pytest.mark.parametrize("steps,prediction,config", LCM_CASES, ids=lambda c: str(c))
def test_lcm_matches_diffusers(steps, prediction, config):
    assert lcm_parity(steps, prediction, {} if config == "defaults" else SD_FOLDER_CONFIG) <= REL_TOL


@pytest.mark.parametrize("steps,prediction", [(2, "eps"), (4, "eps"), (4, "v"), (8, "eps")])
def test_lcm_image_to_image_matches_diffusers(steps, prediction):
    assert lcm_parity(steps, prediction, SD_FOLDER_CONFIG, strength=0.5) <= REL_TOL


def test_lcm_boundary_scalings_match_diffusers_near_t_0():
    # on the 50-step grid c_skip <= 7e-6 and 1 - c_out <= 4e-6, below the tolerance; near t = 0 they are not
    # (t = 1: c_skip = 0.0025; t = 0: f(x, 0) = x): custom timesteps, which LCMScheduler accepts with a warning
    assert lcm_parity(None, "eps", SD_FOLDER_CONFIG, custom=[999, 499, 4, 1, 0]) <= REL_TOL


def tcd_parity(steps, prediction, gamma, strength=1.0, every_timestep=False) -> float:
    sched = diffusers.TCDScheduler(prediction_type=DIFFUSERS_PREDICTION[prediction])
    sched.set_timesteps(steps, strength=strength, **({"original_inference_steps": 50} if every_timestep else {}))
    timesteps = tcd_timesteps(SD, steps, strength=strength, every_timestep=every_timestep)
    assert torch.equal(timesteps.long(), sched.timesteps)
    plan = make_consistency_plan(SD, timesteps, final_sigma="sigma_min")  # TCDScheduler's last step lands on t = 0
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    ours = []
    sample_tcd(Denoiser(toy_model, prediction), noise, plan, noise=generator_noise(torch.Generator().manual_seed(3)),
               callback=lambda step: ours.append(step.x.clone()), gamma=gamma)
    theirs = diffusers_run(sched, noise, {"eta": gamma, "generator": torch.Generator().manual_seed(3)})
    return relative_error(ours, theirs)


TCD_CASES = [(steps, prediction, gamma) for steps in (1, 2, 4, 8) for prediction in ("eps", "v")
             for gamma in (0.0, 0.3)] + [(4, "x0", 0.7)]


@pytest.mark.parametrize("steps,prediction,gamma", TCD_CASES, ids=lambda c: str(c))
def test_tcd_matches_diffusers(steps, prediction, gamma):
    assert tcd_parity(steps, prediction, gamma) <= REL_TOL


def test_tcd_image_to_image_and_every_timestep_match_diffusers():
    assert tcd_parity(4, "eps", 0.3, strength=0.5) <= REL_TOL
    # all-timestep grid: 999, 874, ... put s = ⌊0.7 t⌋ off the 50-step grid
    assert tcd_parity(8, "eps", 0.3, every_timestep=True) <= REL_TOL


def test_lcm_timestep_selection_matches_diffusers():
    sched = diffusers.LCMScheduler(**SD_FOLDER_CONFIG)
    for original in (50, 100, 30):  # 100 allows up to 100 steps; 30 has k = 33 and a grid ending at 989
        for strength in (1.0, 0.75, 0.5, 0.3):
            for steps in range(1, int(original * strength) + 1):
                sched.set_timesteps(steps, original_inference_steps=original, strength=strength)
                ours = lcm_timesteps(SD, steps, original, strength)
                assert torch.equal(ours.long(), sched.timesteps), (original, strength, steps)
                assert ours.dtype == torch.float64


def test_tcd_timestep_selection_matches_diffusers():
    sched = diffusers.TCDScheduler()
    for strength in (1.0, 0.6):
        for steps in range(1, 51):
            sched.set_timesteps(steps, original_inference_steps=50, strength=strength)
            assert torch.equal(tcd_timesteps(SD, steps, 50, strength, every_timestep=True).long(), sched.timesteps)
        for steps in range(1, int(50 * strength) + 1):
            sched.set_timesteps(steps, strength=strength)
            assert torch.equal(tcd_timesteps(SD, steps, strength=strength).long(), sched.timesteps)


def test_lcm_timesteps_by_hand():
    # the 50-step grid 19, 39, ..., 999 (k = 20), picked at indices ⌊i·50/n⌋ from the top
    assert lcm_timesteps(SD, 1).tolist() == [999]
    assert lcm_timesteps(SD, 4).tolist() == [999, 759, 499, 259]
    assert lcm_timesteps(SD, 2, strength=0.5).tolist() == [499, 259]  # grid 19..499, indices 0 and 12


def test_tcd_intermediate_timestep_follows_float32_reference():
    assert tcd_intermediate_timestep(979, 0.3) == math.floor(0.7 * 979)  # 685
    assert tcd_intermediate_timestep(0, 0.3) == 0
    # 0.7·90 = 62.99999999999999 in float64; in float32, as diffusers computes it, exactly 63
    assert tcd_intermediate_timestep(90, 0.3) == 63


def test_lcm_scalings_meet_the_boundary_condition():
    assert lcm_scalings(0) == (1.0, 0.0)  # f(x, 0) = x (Song et al. 2023, eq. 5)
    c_skip, c_out = lcm_scalings(999)  # τ = 9990
    assert c_skip == pytest.approx(0.25 / (9990**2 + 0.25), rel=1e-12)
    assert c_out == pytest.approx(9990 / math.sqrt(9990**2 + 0.25), rel=1e-12)


# --- The A1111 / ComfyUI LCM loop ----------------------------------------------------------------------------------


class GaussianConsistencyModel:
    """The exact consistency function of data N(μ, s²) per element, as an x0-predicting model.

    Along a probability-flow ODE trajectory x(σ) - μ scales as √(s² + σ²) (Karras et al. 2022, eq. 1 with a Gaussian
    score), so f(x, σ) = μ + (x - μ) s/√(s² + σ²) in the VE view. The model reads σ from its integer timestep."""

    def __init__(self, mu, s):
        self.mu, self.s = mu, s

    def __call__(self, x_t, t):
        sigma = SD.sigmas[t.long()].to(x_t.dtype).reshape(-1, 1, 1, 1)
        x = x_t * (1 + sigma**2).sqrt()  # back to the VE state
        return self.mu + (x - self.mu) * self.s / (self.s**2 + sigma**2).sqrt()


def test_lcm_loop_composes_consistency_maps_without_noise():
    mu, s = 0.7, 0.4
    plan = make_lcm_sigma_plan(SD, 4, spacing="simple")  # grid σ's: each is its timestep's own σ
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 15
    out = sample_lcm_kdiffusion(Denoiser(GaussianConsistencyModel(mu, s), "x0"), x, plan,
                                noise=lambda x, sigma, sigma_next: torch.zeros_like(x), boundary=False)
    # with z = 0 each step applies f: x_n - μ = (x - μ) ∏ s/√(s² + σ_i²)
    factor = math.prod(s / math.sqrt(s**2 + sigma**2) for sigma in plan.sigmas[:-1].tolist())
    torch.testing.assert_close(out, mu + (x - mu) * factor, rtol=1e-12, atol=1e-12)


def test_lcm_loop_with_exact_consistency_model_samples_the_data_distribution():
    mu, s = 0.7, 0.4
    plan = make_lcm_sigma_plan(SD, 4, spacing="simple")
    generator = torch.Generator().manual_seed(5)
    sigma_max = plan.sigmas[0].item()
    x = mu + (s**2 + sigma_max**2) ** 0.5 * torch.randn((8, 4, 32, 32), generator=generator, dtype=torch.float64)
    out = sample_lcm_kdiffusion(Denoiser(GaussianConsistencyModel(mu, s), "x0"), x, plan, generator=generator,
                                boundary=False)
    # re-noising f(x) ~ N(μ, s²) by σ_{i+1} z gives N(μ, s² + σ_{i+1}²) again: every step's marginal is exact
    assert abs(out.mean().item() - mu) < 4 * s / out.numel() ** 0.5
    assert abs(out.std().item() - s) < 4 * s / (2 * out.numel()) ** 0.5


def test_lcm_loop_point_mass_and_boundary_condition():
    c = 0.25  # data = the constant c: the ideal x̂_0 is c wherever the sampler asks
    plan = make_lcm_sigma_plan(SD, 3)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * 15
    calls = []

    def noise(x, sigma, sigma_next):
        calls.append((sigma, sigma_next))
        return torch.randn(x.shape, generator=torch.Generator().manual_seed(len(calls)))

    model = Denoiser(lambda x_t, t: torch.full_like(x_t, c), "x0")
    assert torch.equal(sample_lcm_kdiffusion(model, x, plan, noise=noise, boundary=False), torch.full_like(x, c))
    assert calls == [(plan.sigmas[0].item(), plan.sigmas[1].item()), (plan.sigmas[1].item(), plan.sigmas[2].item())]
    one_step = sample_lcm_kdiffusion(model, x, make_lcm_sigma_plan(SD, 1), noise=noise)
    c_skip, c_out = lcm_scalings(999)  # c_skip multiplies the VE state x, as A1111 and ComfyUI do
    torch.testing.assert_close(one_step, c_skip * x + c_out * c)


def test_lcm_sigma_plan_by_hand():
    table = SD.sigmas  # the distillation grid is t = 19, 39, ..., 999: index j is t = 20j + 19
    normal = make_lcm_sigma_plan(SD, 4)  # t = linspace(999, 19, 4): fractional indices 49, 32⅔, 16⅓, 0
    assert normal.timesteps.tolist() == [999, 679, 339, 19]
    expected = math.exp(math.log(table[659]) / 3 + 2 * math.log(table[679]) / 3)
    assert normal.sigmas[1].item() == pytest.approx(expected, rel=1e-12)
    assert normal.sigmas[-1].item() == 0 and normal.alpha_bar[-1].item() == 1
    sgm = make_lcm_sigma_plan(SD, 4, spacing="sgm_uniform")  # t = 999, 754, 509, 264: indices 49, 36.75, 24.5, 12.25
    assert sgm.timesteps.tolist() == [999, 759, 499, 259]  # the tie at 24.5 goes to the lower index
    for steps in (1, 2, 3, 4, 7, 8, 25, 50):  # ComfyUI's "simple" on the grid = the timesteps of diffusers' LCM
        simple = make_lcm_sigma_plan(SD, steps, spacing="simple")
        assert torch.equal(simple.timesteps, lcm_timesteps(SD, steps))
        torch.testing.assert_close(simple.sigmas[:-1], table[simple.timesteps.long()], rtol=1e-12, atol=0)
    full = make_lcm_sigma_plan(SD, 3, original_steps=1000)  # the model's own table: t = linspace(999, 0, 3)
    assert full.timesteps.tolist() == [999, 499, 0]  # 499.5 rounds down


def test_lcm_as_a1111_and_comfyui_run_it_through_sample():
    """sample(sampler="LCM", schedule_type=...) is A1111's LCM (distillation grid, boundary scalings, start σ_0 ε,
    img2img from the last ⌊s·n⌋ + 1 steps) or ComfyUI's lcm (the model's own table, no boundary)."""
    mu, s = 0.7, 0.4
    model = Denoiser(GaussianConsistencyModel(mu, s), "x0")
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def zeros(x, sigma, sigma_next):
        return torch.zeros_like(x)

    for schedule_type, spacing in (("Automatic", "normal"), ("Uniform", "normal"), ("SGM Uniform", "sgm_uniform"),
                                   ("simple", "simple")):
        plan = make_lcm_sigma_plan(SD, 4, spacing)
        expected = sample_lcm_kdiffusion(model, noise * plan.sigmas[0].item(), plan, noise=zeros)
        out = sample(model, noise, sampler="LCM", steps=4, schedule=SD, schedule_type=schedule_type,
                     noise_sampler=zeros)
        assert torch.equal(out, expected), schedule_type
    init = torch.full(SHAPE, 0.3, dtype=torch.float64)
    plan = make_lcm_sigma_plan(SD, 4).start_at(4 - int(0.5 * 4) - 1)  # strength 0.5: the last 3 of 4 steps
    expected = sample_lcm_kdiffusion(model, init + noise * plan.sigmas[0].item(), plan, noise=zeros)
    out = sample(model, noise, sampler="LCM", steps=4, schedule=SD, schedule_type="Automatic", init=init,
                 strength=0.5, noise_sampler=zeros)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="Automatic, Uniform, Normal, SGM Uniform, Simple, not 'Karras'"):
        sample(model, noise, sampler="LCM", steps=4, schedule=SD, schedule_type="Karras")
    comfy = sample(model, noise, sampler="lcm", steps=4, schedule=SD, schedule_type="karras", convention="comfyui",
                   noise_sampler=zeros)
    run = prepare_k_run("lcm", noise, 4, SD, "karras", "comfyui")
    assert torch.equal(comfy, sample_lcm_kdiffusion(model, run.start, run.plan, noise=zeros, boundary=False))


# --- Bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call,match", [
    (lambda: lcm_timesteps(SD, 0), "steps must be an integer"),
    (lambda: lcm_timesteps(SD, 51), r"steps must be an integer from 1 to 50, got 51"),
    (lambda: lcm_timesteps(SD, 6, strength=0.1), r"from 1 to 5, got 6: .*\(50 original steps at strength 0.1\)"),
    (lambda: lcm_timesteps(SD, 4, strength=0.0), r"strength must be a number in \(0, 1\]"),
    (lambda: lcm_timesteps(SD, 4, strength=1.5), r"strength must be a number in \(0, 1\], got 1.5"),
    (lambda: lcm_timesteps(SD, 1, strength=0.01), "keeps no timestep"),
    (lambda: lcm_timesteps(SD, 4, original_steps=2000), r"original_steps .* from 1 to 1000, got 2000"),
    (lambda: tcd_timesteps(SD, 60, every_timestep=True), r"from 1 to 50, got 60"),
    (lambda: make_consistency_plan(SD, torch.tensor([999.0, 500.5])), "integers in strictly descending"),
    (lambda: make_consistency_plan(SD, torch.tensor([19.0, 999.0])), "integers in strictly descending"),
    (lambda: make_consistency_plan(SD, torch.tensor([1000.0])), r"timesteps must lie in \[0, 999\]"),
    (lambda: make_lcm_sigma_plan(SD, 4, spacing="karras"), "unknown LCM sigma spacing 'karras'; allowed: normal"),
])
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan")])
def test_tcd_refuses_gamma_outside_0_1(gamma):
    plan = make_consistency_plan(SD, lcm_timesteps(SD, 2))
    with pytest.raises(ValueError, match=r"gamma must be a number in \[0, 1\]"):
        sample_tcd(Denoiser(toy_model), torch.zeros(SHAPE), plan, gamma=gamma)


def test_tcd_needs_the_schedule_table_only_when_stochastic():
    plain = make_plan(SD, 4, spacing="trailing")
    assert not hasattr(plain, "train_alpha_bar") and isinstance(plain, SamplingPlan)
    with pytest.raises(ValueError, match="gamma=0.3 needs .* make_consistency_plan"):
        sample_tcd(Denoiser(toy_model), torch.zeros(SHAPE), plain, gamma=0.3)
    sample_tcd(Denoiser(toy_model), torch.zeros(SHAPE), plain, gamma=0.0)  # deterministic: DDIM, no table needed
    assert isinstance(make_consistency_plan(SD, lcm_timesteps(SD, 4)).start_at(2).train_alpha_bar, torch.Tensor)


@pytest.mark.parametrize(("name", "scheduler"), [("lcm", "LCMScheduler"), ("tcd", "TCDScheduler")])
def test_sample_runs_lcm_and_tcd_as_diffusers(name, scheduler):
    """`sample(sampler="lcm" / "tcd")` (what the pipeline, CLI and server call) gives diffusers' result, TCD with its
    default γ = 0.3 (eta 0 in a request means that default)."""
    from kedavra.diffusion.samplers import sample

    schedule = SCHEDULE_PRESETS["sd"]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    ours = sample(toy_model, noise, sampler=name, steps=4, schedule=schedule,
                  generator=torch.Generator().manual_seed(3))
    sched = getattr(diffusers, scheduler)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    options = {"generator": torch.Generator().manual_seed(3)} | ({"eta": 0.3} if name == "tcd" else {})
    sched.set_timesteps(4)
    theirs = diffusers_run(sched, noise, options)
    assert ((ours - theirs[-1]).abs().max() / theirs[-1].abs().max()).item() < 1e-5
