"""Samplers: relations that must hold between them, reproducibility, image-to-image, bad input."""

import pytest
import torch

from kedavra.diffusion.samplers import SAMPLERS, Denoiser, resolve_sampler, sample
from kedavra.diffusion.schedule import get_schedule
from kedavra.diffusion.timesteps import make_plan

SHAPE = (2, 3, 4, 4)


def smooth_eps_model(x, t):
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    return 0.5 * torch.tanh(x) + 0.2 * torch.cos(t / 200)


def noise(seed=0, dtype=torch.float32):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n != "tcd"])  # TCD ends at σ(t=0), as diffusers
def test_a_constant_clean_prediction_is_returned_exactly(name):
    """If the model always predicts the same x_0, every sampler (stochastic ones too) ends on it: each step
    keeps x_0 and only shrinks the noise, and the last step to σ = 0 removes it."""
    target = torch.linspace(-1, 1, 96).reshape(SHAPE)
    out = sample(lambda x, t: target, noise(), sampler=name, steps=7, prediction_type="x0",
                 generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, target, atol=1e-5)


def test_ddim_eta0_is_euler():
    """DDIM with η = 0 is Euler's method on the probability-flow ODE in the VE view (Karras et al. 2022,
    sec. 3 and table 1); the two differ only by rounding."""
    a = sample(smooth_eps_model, noise(), sampler="ddim", steps=15)
    b = sample(smooth_eps_model, noise(), sampler="euler", steps=15)
    assert torch.allclose(a, b, atol=1e-5)


def test_ddim_eta1_is_ddpm_and_euler_ancestral():
    """DDIM with η = 1 has the variance of DDPM's posterior (DDIM eq. 16), and Euler ancestral is the same
    step in the VE view: with the same noise draws all three trajectories coincide."""
    runs = [sample(smooth_eps_model, noise(), sampler=name, steps=12, generator=torch.Generator().manual_seed(5),
                   **kw) for name, kw in [("ddpm", {}), ("ddim", {"eta": 1.0}), ("euler_a", {})]]
    assert torch.allclose(runs[0], runs[1], atol=1e-4) and torch.allclose(runs[0], runs[2], atol=1e-4)


@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if s.stochastic])
def test_same_seed_same_result_other_seed_other_result(name):
    def run(seed):
        return sample(smooth_eps_model, noise(), sampler=name, steps=8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_evaluation_count(name):
    denoiser = Denoiser(smooth_eps_model, "eps")
    sample(denoiser, noise(), sampler=name, steps=6, generator=torch.Generator().manual_seed(0))
    expected = {"heun": 11, "pndm": 7}.get(name, 6)  # Heun 2n-1; PNDM's repeated first step n+1
    assert denoiser.evaluations == SAMPLERS[name].evaluations(6) == expected


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "unipc", "heun"])
def test_image_to_image_runs_the_last_steps_from_the_noised_init(name):
    init = torch.linspace(-1, 1, 96).reshape(SHAPE)
    calls = []
    out = sample(smooth_eps_model, noise(), sampler=name, steps=20, init=init, strength=0.3,
                 callback=lambda step: calls.append(step.count))
    assert len(calls) == 6 and calls[0] == 6  # ⌊0.3·20⌋ = 6 steps
    # strength 0 would leave the image untouched; a small strength stays close to it
    assert (out - init).abs().mean() < (noise() - init).abs().mean()


def test_model_sees_training_timesteps():
    seen = []
    sample(lambda x, t: seen.append(t.clone()) or torch.zeros_like(x), noise(), sampler="euler", steps=4,
           spacing="leading", steps_offset=1)
    assert [t[0].item() for t in seen] == [751.0, 501.0, 251.0, 1.0] and seen[0].shape == (SHAPE[0],)


def test_zero_terminal_snr_with_v_prediction_is_finite():
    schedule = get_schedule("sd-zero-snr")
    with pytest.raises(ValueError, match="PNDM divides by √ᾱ_t, and ᾱ = 0"):  # diffusers' PNDM gives inf there
        sample(smooth_eps_model, noise(), sampler="pndm", steps=10, schedule=schedule, prediction_type="v",
               spacing="trailing")
    for name in [n for n in SAMPLERS if n != "pndm"]:
        out = sample(smooth_eps_model, noise(), sampler=name, steps=10, schedule=schedule, prediction_type="v",
                     spacing="trailing", generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out).all(), name


@pytest.mark.parametrize("alias,expected,karras", [
    ("Euler a", "euler_a", False), ("DPM++ 2M Karras", "dpmpp_2m", True), ("euler_ancestral", "euler_a", False),
    ("DPMSolverMultistepScheduler", "dpmpp_2m", False), ("uni_pc", "unipc", False), ("DPM++ 2M SDE", "dpmpp_2m_sde",
    False), ("k_euler", "euler", False), ("dpmpp_2m_karras", "dpmpp_2m", True)])
def test_names_users_know_resolve(alias, expected, karras):
    spec, k = resolve_sampler(alias)
    assert spec.name == expected and k == karras


@pytest.mark.parametrize("kwargs,message", [
    ({"sampler": "plms"}, "unknown sampler 'plms'; allowed: ddpm"),
    ({"steps": 0}, "steps must be an integer from 1 to 1000"),
    ({"steps": 1001}, "steps must be an integer from 1 to 1000"),
    ({"spacing": "even"}, "unknown timestep spacing 'even'"),
    ({"prediction_type": "noise"}, "unknown prediction type 'noise'"),
    ({"strength": 0.5}, "needs an init sample"),
    ({"init": torch.zeros(SHAPE), "strength": 1.5}, r"strength must be a number in \[0, 1\], got 1.5"),
    ({"init": torch.zeros(1, 3), "strength": 0.5}, "init has shape"),
    ({"init": torch.full(SHAPE, float("nan")), "strength": 0.5}, "init must be finite"),
    ({"sampler": "euler", "eta": 0.5}, "eta=0.5 applies only to the ddim and tcd samplers"),
])
def test_bad_input_is_refused_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(smooth_eps_model, noise(), **kwargs)


def test_non_finite_noise_is_refused():
    bad = noise()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="noise must be finite, but 1 of 96 values"):
        sample(smooth_eps_model, bad)


def test_a_model_that_returns_nan_is_named():
    with pytest.raises(ValueError, match=r"the model's output at t=999 must be finite"):
        sample(lambda x, t: torch.full_like(x, float("nan")), noise(), steps=5, spacing="trailing")


@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if s.stochastic])
def test_a_batch_with_one_generator_per_row_equals_single_runs(name):
    """With a generator per image, image i of a batch is the image a single run with seed i gives."""
    seeds = [11, 12, 13]
    batch_noise = torch.cat([torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(s)) for s in seeds])
    batch = sample(smooth_eps_model, batch_noise, sampler=name, steps=6,
                   generator=[torch.Generator().manual_seed(s + 100) for s in seeds])
    for i, s in enumerate(seeds):
        single = sample(smooth_eps_model, batch_noise[i : i + 1], sampler=name, steps=6,
                        generator=torch.Generator().manual_seed(s + 100))
        assert torch.allclose(batch[i : i + 1], single, atol=1e-6)


@pytest.mark.parametrize("name", ["euler", "euler_a", "ddim", "dpmpp_2m", "unipc", "heun", "ddpm"])
def test_mask_keeps_init_outside_and_generates_inside(name):
    """With a model that always predicts x_0 = target, the masked region ends on target and the rest on init."""
    init, target = torch.full(SHAPE, -0.5), torch.linspace(-1, 1, 96).reshape(SHAPE)
    mask = torch.zeros(SHAPE[0], 1, *SHAPE[2:])
    mask[..., :2, :] = 1  # generate the top half
    out = sample(lambda x, t: target, noise(), sampler=name, steps=8, prediction_type="x0", init=init,
                 strength=1.0, mask=mask, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out[..., :2, :], target[..., :2, :], atol=1e-5)
    assert torch.allclose(out[..., 2:, :], init[..., 2:, :], atol=1e-5)


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_full_strength_inpainting_starts_from_noise(name):
    """A mask at strength 1 starts from pure noise (diffusers' inpainting pipelines), not from init noised to the
    first level; image to image at strength 1 without a mask still starts from the noised init."""
    init, mask = torch.full(SHAPE, 0.7), torch.ones(SHAPE[0], 1, *SHAPE[2:])
    starts = {}
    for key, options in (("masked", {"mask": mask}), ("plain", {}), ("none", None)):
        seen = []
        kwargs = {"init": init, "strength": 1.0, **options} if options is not None else {}
        sample(smooth_eps_model, noise(), sampler=name, steps=6, callback=lambda step, s=seen: s.append(step.x_t),
               **kwargs)
        starts[key] = seen[0]
    assert torch.allclose(starts["masked"], starts["none"], atol=1e-6)  # the same x_T as text to image
    assert not torch.allclose(starts["plain"], starts["none"], atol=1e-3)


def test_bad_masks():
    init = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="mask needs an init"):
        sample(smooth_eps_model, noise(), mask=torch.ones(SHAPE))
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 1\]"):
        sample(smooth_eps_model, noise(), init=init, mask=torch.full(SHAPE, 2.0))
    with pytest.raises(ValueError, match="does not broadcast"):
        sample(smooth_eps_model, noise(), init=init, mask=torch.ones(3, 1, 5, 5))


def test_a_callback_that_returns_a_non_tensor_leaves_the_sample_alone():
    """A progress bar's update() returns True when it redraws: only a returned tensor may replace x."""
    plain = sample(smooth_eps_model, noise(), sampler="euler", steps=4)
    for returns in (True, None):
        out = sample(smooth_eps_model, noise(), sampler="euler", steps=4, callback=lambda step, r=returns: r)
        assert torch.equal(out, plain)
    zeros = sample(smooth_eps_model, noise(), sampler="euler", steps=4, callback=lambda step: torch.zeros_like(step.x))
    assert torch.equal(zeros, torch.zeros(SHAPE))


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n not in ("lcm", "tcd", "pndm")])  # those: own timesteps
def test_step_records_give_each_steps_level_in_the_vp_view(name):
    """With ε̂ = 0 the model's x̂_0 is x_t/√ᾱ_t (DDPM eq. 15), whichever view the sampler keeps its state in; the
    record's t are the plan's timesteps, and its first x_t is the starting noise (x_T, VP)."""
    steps, start = [], noise()
    sample(lambda x, t: torch.zeros_like(x), start, sampler=name, steps=5, generator=torch.Generator().manual_seed(0),
           callback=steps.append)
    plan = make_plan(get_schedule("sd"), 5)
    assert [s.index for s in steps] == list(range(5)) and {s.count for s in steps} == {5}
    assert [s.t for s in steps] == plan.timesteps.tolist()
    torch.testing.assert_close(steps[0].x_t, start)
    for step in steps:
        torch.testing.assert_close(step.x0, step.x_t / step.alpha_bar**0.5)
