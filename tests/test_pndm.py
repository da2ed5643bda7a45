"""PNDM (Liu et al. 2022): `sample_pndm` against diffusers' PNDMScheduler, `sample_plms` against A1111's PLMS loop,
and their plan builders.

The model is a fixed smooth function of (x_t, t), so both loops see identical outputs for identical inputs. Relative
error = max|ours - theirs| / max|theirs|. diffusers keeps ᾱ from a float32 cumprod and ours is float64, so in
float32 the two differ by the rounding of ᾱ (REL_TOL); with diffusers handed our float64 table, in float64, the
arithmetic itself agrees to EXACT_TOL.
"""

import pytest
import torch

from kedavra.diffusion.forward_process import add_noise, x0_from_eps
from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.samplers.pndm import (
    a1111_alpha_bar,
    a1111_img2img_plan,
    a1111_timesteps,
    a1111_timesteps_plan,
    pndm_plan,
    pndm_transfer,
    sample_plms,
    sample_pndm,
)
from kedavra.diffusion.schedule import SCHEDULE_PRESETS

SD = SCHEDULE_PRESETS["sd"]
SHAPE = (2, 4, 8, 8)
REL_TOL = 1e-5  # the parity target, fp32
EXACT_TOL = 1e-12  # float64, same ᾱ table
A1111_TOL = 1e-6  # the target for the final sample against the A1111 transcription


def toy_model(x, t):
    """A smooth, t-dependent stand-in for a U-Net (any fixed function of (x_t, t) serves parity)."""
    t = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * torch.tanh(x) + 0.3 * torch.sin(x * 2 + t / 150) + 0.05 * x


def start_noise(dtype=torch.float32):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=dtype)


def relative_error(ours, theirs) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


# --- diffusers' PNDMScheduler ---------------------------------------------------------------------------------------

def diffusers_run(steps, offset, skip_prk, one, spacing="leading", prediction="eps", dtype=torch.float32):
    """diffusers' loop with SD's scaled_linear betas: (timesteps, the sample after every `step` call)."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=SD.beta_start, beta_end=SD.beta_end,
                                    skip_prk_steps=skip_prk, set_alpha_to_one=one, steps_offset=offset,
                                    timestep_spacing=spacing,
                                    prediction_type="epsilon" if prediction == "eps" else "v_prediction")
    sched.set_timesteps(steps)
    if dtype == torch.float64:  # hand diffusers our table, so only the arithmetic can differ
        sched.alphas_cumprod = SD.alpha_bar.clone()
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=dtype) if one else SD.alpha_bar[0]
    x, states = start_noise(dtype), []
    for t in sched.timesteps:
        x = sched.step(toy_model(x, t.expand(SHAPE[0]).to(dtype)), t, x).prev_sample
        states.append(x)
    return sched.timesteps.tolist(), states


def our_pndm_run(steps, offset, skip_prk, one, spacing="leading", prediction="eps", dtype=torch.float32):
    """(plan, denoiser, the state after every step, the returned sample)."""
    plan = pndm_plan(SD, steps, offset, skip_prk, one, spacing)
    denoiser, states = Denoiser(toy_model, prediction), []
    x = sample_pndm(denoiser, start_noise(dtype), plan, callback=lambda step: states.append(step.x.clone()),
                    skip_prk_steps=skip_prk)
    return plan, denoiser, states, x


def pndm_error(steps, offset, skip_prk, one, spacing="leading", prediction="eps", dtype=torch.float32) -> float:
    """Largest relative error over all steps, after checking timesteps, evaluation count and the returned sample."""
    timesteps, theirs = diffusers_run(steps, offset, skip_prk, one, spacing, prediction, dtype)
    plan, denoiser, ours, x = our_pndm_run(steps, offset, skip_prk, one, spacing, prediction, dtype)
    assert plan.timesteps.long().tolist() == timesteps
    assert denoiser.evaluations == len(ours) == len(theirs) == len(timesteps)
    torch.testing.assert_close(x, ours[-1], rtol=0, atol=0)
    return max(relative_error(a, b) for a, b in zip(ours, theirs, strict=True))


PNDM_CASES = [(skip_prk, steps, offset, one) for skip_prk in (True, False) for steps in (1, 2, 5, 20)
              for offset in (0, 1) for one in (False, True) if skip_prk or steps >= 4]


@pytest.mark.parametrize("skip_prk, steps, offset, one", PNDM_CASES)
def test_pndm_matches_diffusers(skip_prk, steps, offset, one):
    assert pndm_error(steps, offset, skip_prk, one) <= REL_TOL


@pytest.mark.parametrize("skip_prk, spacing, prediction, steps", [
    (True, "leading", "v", 20), (False, "leading", "v", 7),
    # trailing / linspace: diffusers steps from t to t - ⌊T/n⌋, which is not the next timestep
    (True, "trailing", "eps", 9), (False, "trailing", "eps", 9), (True, "linspace", "eps", 7),
    (False, "linspace", "v", 6),
])
def test_pndm_matches_diffusers_spacings_and_v(skip_prk, spacing, prediction, steps):
    assert pndm_error(steps, 1 if spacing == "leading" else 0, skip_prk, False, spacing, prediction) <= REL_TOL


@pytest.mark.parametrize("skip_prk, spacing, prediction", [
    (True, "leading", "eps"), (False, "leading", "eps"), (True, "trailing", "v"), (False, "linspace", "v"),
])
def test_pndm_arithmetic_is_diffusers_in_float64(skip_prk, spacing, prediction):
    assert pndm_error(20, 0, skip_prk, False, spacing, prediction, torch.float64) <= EXACT_TOL


@pytest.mark.parametrize("steps, expected", [(1, 1), (2, 3), (5, 6), (20, 21)])
def test_plms_evaluations_are_steps_plus_one(steps, expected):
    """skip_prk_steps: the repeated timestep costs one extra evaluation; one step has nothing to repeat."""
    assert len(pndm_plan(SD, steps, 1)) == expected


@pytest.mark.parametrize("steps", [4, 5, 20])
def test_prk_evaluations_are_steps_plus_nine(steps):
    """3 Runge-Kutta steps of 4 evaluations, then one per remaining step from the fourth timestep on."""
    assert len(pndm_plan(SD, steps, 1, skip_prk_steps=False)) == steps + 9


def test_pndm_plan_sd_values():
    """Recorded from diffusers 0.42's PNDMScheduler(skip_prk_steps=True, steps_offset=1).set_timesteps(5)."""
    plan = pndm_plan(SD, 5, steps_offset=1)
    assert plan.timesteps.tolist() == [801, 601, 601, 401, 201, 1]
    levels = [801, 601, 601, 401, 201, 1]  # the state each evaluation sees
    torch.testing.assert_close(plan.alpha_bar, torch.cat([SD.alpha_bar[levels], SD.alpha_bar[:1]]), rtol=0, atol=0)
    starts = [801, 801, 601, 401, 201, 1]  # the second update starts over from 801
    torch.testing.assert_close(plan.alpha_bar_from, SD.alpha_bar[starts], rtol=0, atol=0)
    assert pndm_plan(SD, 5, 1, set_alpha_to_one=True).alpha_bar[-1].item() == 1.0
    prk = pndm_plan(SD, 5, 1, skip_prk_steps=False)
    assert prk.timesteps.tolist() == [801, 701, 701, 601, 601, 501, 501, 401, 401, 301, 301, 201, 201, 1]


def test_pndm_needs_four_steps_for_runge_kutta():
    """diffusers fails inside set_timesteps (a numpy broadcast error) for fewer than 4 steps; we say why."""
    with pytest.raises(ValueError, match="steps=3"):
        pndm_plan(SD, 3, skip_prk_steps=False)


def test_pndm_plan_and_sampler_must_agree():
    denoiser, x = Denoiser(toy_model), start_noise()
    with pytest.raises(ValueError, match="skip_prk_steps=False"):
        sample_pndm(denoiser, x, pndm_plan(SD, 5, skip_prk_steps=False))
    with pytest.raises(ValueError, match="pndm_plan"):
        sample_pndm(denoiser, x, a1111_timesteps_plan(SD, 5))
    with pytest.raises(ValueError, match="part-way"):
        pndm_plan(SD, 5).start_at(2)


@pytest.mark.parametrize("steps", [0, 1001, 2.5])
def test_bad_steps(steps):
    for build in (pndm_plan, a1111_timesteps_plan, lambda schedule, n: a1111_img2img_plan(schedule, n, 0.5)):
        with pytest.raises(ValueError, match=rf"steps.*{steps}"):
            build(SD, steps)


def test_bad_spacing_offset_and_flags():
    with pytest.raises(ValueError, match="'cosine'"):
        pndm_plan(SD, 10, spacing="cosine")
    with pytest.raises(ValueError, match="steps_offset.*-1"):
        pndm_plan(SD, 10, steps_offset=-1)
    with pytest.raises(ValueError, match="set_alpha_to_one.*1"):
        pndm_plan(SD, 10, set_alpha_to_one=1)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan")])
def test_bad_strength(strength):
    with pytest.raises(ValueError, match=rf"strength.*{strength}"):
        a1111_img2img_plan(SD, 20, strength)


def test_pndm_rejects_a_zero_alpha_bar_start():
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        pndm_plan(SCHEDULE_PRESETS["sd-zero-snr"], 10, spacing="trailing")


def test_transfer_is_ddim_step():
    """PNDM eq. 9 lands where DDIM's η = 0 step does: √ᾱ_prev x̂_0 + √(1-ᾱ_prev) ε (DDIM eq. 12)."""
    x, eps = start_noise(torch.float64), torch.randn(SHAPE, generator=torch.Generator().manual_seed(1),
                                                      dtype=torch.float64)
    for t, t_prev in [(999, 949), (500, 1), (51, 1), (1, 0), (300, 600)]:
        alpha_bar, alpha_bar_prev = SD.alpha_bar[t].item(), SD.alpha_bar[t_prev].item()
        ddim = alpha_bar_prev**0.5 * x0_from_eps(x, eps, alpha_bar) + (1 - alpha_bar_prev) ** 0.5 * eps
        torch.testing.assert_close(pndm_transfer(x, eps, alpha_bar, alpha_bar_prev), ddim, rtol=1e-12, atol=1e-12)


# --- A1111's PLMS -----------------------------------------------------------------------------------------------------

def a1111_plms_reference(model, x, timesteps, alpha_bar):
    """A1111 1.10's `plms` (modules/sd_samplers_timesteps_impl.py), retold: walk the ascending `timesteps` from the
    top down to timesteps[0]; the first move is improved Euler, later ones Adams-Bashforth on the stored ε's.
    Returns (sample, model calls)."""
    earlier, calls = [], 0
    for k in range(len(timesteps) - 1, 0, -1):
        here, there = alpha_bar[timesteps[k]].item(), alpha_bar[timesteps[k - 1]].item()

        def move(e, here=here, there=there, x=x):
            x0 = (x - (1 - here) ** 0.5 * e) / here**0.5
            return there**0.5 * x0 + (1 - there) ** 0.5 * e

        e = model(x, torch.full((x.shape[0],), float(timesteps[k])))
        calls += 1
        if len(earlier) == 0:
            e_end = model(move(e), torch.full((x.shape[0],), float(timesteps[k - 1])))
            calls += 1
            e_used = (e + e_end) / 2
        elif len(earlier) == 1:
            e_used = (3 * e - earlier[-1]) / 2
        elif len(earlier) == 2:
            e_used = (23 * e - 16 * earlier[-1] + 5 * earlier[-2]) / 12
        else:
            e_used = (55 * e - 59 * earlier[-1] + 37 * earlier[-2] - 9 * earlier[-3]) / 24
        x = move(e_used)
        earlier = (earlier + [e])[-3:]
    return x, calls


def float32_table():
    return SD.alpha_bar.float()  # A1111's alphas_cumprod buffer


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 20, 30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plms_matches_a1111(steps, dtype):
    timesteps = a1111_timesteps(SD, steps).tolist()
    noise = start_noise(dtype)
    theirs, calls = a1111_plms_reference(toy_model, noise, timesteps, float32_table().double())
    denoiser, states = Denoiser(toy_model), []
    ours = sample_plms(denoiser, noise, a1111_timesteps_plan(SD, steps),
                       callback=lambda step: states.append(step.x))
    assert relative_error(ours, theirs) <= (A1111_TOL if dtype == torch.float32 else EXACT_TOL)
    assert denoiser.evaluations == calls == (len(timesteps) if len(timesteps) > 1 else 0)
    assert len(states) == len(timesteps) - 1


def test_a1111_plan_values():
    plan = a1111_timesteps_plan(SD, 20)
    assert plan.timesteps.tolist() == list(range(951, 50, -50))  # 951, 901, ..., 51
    table = float32_table().double()
    torch.testing.assert_close(plan.alpha_bar, table[list(range(951, 0, -50))], rtol=0, atol=0)
    assert plan.alpha_bar[-1].item() == table[1].item()  # ends at ᾱ_1, not ᾱ_0
    assert plan.t_at(plan.sigmas[-1].item()) == 1.0  # the final level's timestep, for a one-step PLMS
    timesteps = a1111_timesteps(SD, 30)  # ⌊1000/30⌋ = 33: 1, 34, ..., 991
    assert (len(timesteps), timesteps[0].item(), timesteps[-1].item()) == (31, 1, 991)
    assert len(a1111_timesteps_plan(SD, 30)) == 30
    # 1000 steps: ⌊1000/1000⌋ = 1 and the +1 is clipped, so 999 appears twice (a step that stays put)
    assert a1111_timesteps(SD, 1000)[-2:].tolist() == [999, 999]


def test_a1111_alpha_bar_zero_snr():
    table = a1111_alpha_bar(SCHEDULE_PRESETS["sd-zero-snr"])
    assert 0 < table[-1].item() < 1e-7  # A1111's finite stand-in for ᾱ = 0


@pytest.mark.parametrize("strength, first, count, noise_t", [
    (0.5, 451, 9, 501),  # t_enc = 10: ts[:10], 9 steps from ts[9], the init noised at ts[10]
    (1.0, 901, 18, 951),  # strength is capped at 0.999: t_enc = 19
    (0.1, 51, 1, 101),
    (0.05, None, 0, 51),  # t_enc = 1: no step runs
    (0.0, None, 0, 1),
])
def test_a1111_img2img_plan(strength, first, count, noise_t):
    plan, alpha_bar_noise = a1111_img2img_plan(SD, 20, strength)
    assert len(plan) == count
    if count:
        assert plan.timesteps[0].item() == first
    assert plan.alpha_bar[-1].item() == float32_table()[1].item()
    assert alpha_bar_noise == float32_table()[noise_t].item()


def test_a1111_img2img_matches_reference():
    """CompVisSampler.sample_img2img: noise at ts[t_enc], then `plms` on ts[:t_enc]."""
    steps, strength = 20, 0.6
    init, noise = start_noise(torch.float64), torch.randn(SHAPE, generator=torch.Generator().manual_seed(2),
                                                           dtype=torch.float64)
    timesteps = a1111_timesteps(SD, steps).tolist()
    t_enc = int(strength * steps)
    table = float32_table().double()
    start = init * table[timesteps[t_enc]].sqrt() + noise * (1 - table[timesteps[t_enc]]).sqrt()
    theirs, calls = a1111_plms_reference(toy_model, start, timesteps[:t_enc], table)
    plan, alpha_bar_noise = a1111_img2img_plan(SD, steps, strength)
    denoiser = Denoiser(toy_model)
    ours = sample_plms(denoiser, add_noise(init, noise, alpha_bar_noise), plan)
    assert relative_error(ours, theirs) <= EXACT_TOL
    assert denoiser.evaluations == calls == t_enc


# --- the registered `pndm` sampler ---------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 12])
def test_registered_pndm_is_diffusers_pndm_with_sd_settings(steps):
    """sample(sampler="pndm") with SD 1.x's folder settings (leading, steps_offset 1, set_alpha_to_one False, that is
    final_sigma "sigma_min") is diffusers' PNDMScheduler(skip_prk_steps=True) on the same model and noise."""
    from kedavra.diffusion.samplers import SAMPLERS, sample

    _, theirs = diffusers_run(steps, 1, True, False)
    denoiser = Denoiser(toy_model)
    ours = sample(denoiser, start_noise(), sampler="pndm", steps=steps, schedule=SD, steps_offset=1,
                  final_sigma="sigma_min")
    assert relative_error(ours, theirs[-1]) < REL_TOL
    assert denoiser.evaluations == SAMPLERS["pndm"].evaluations(steps) == steps + (steps > 1)


def test_registered_pndm_refuses_karras_and_a_part_way_start():
    from kedavra.diffusion.samplers import sample

    with pytest.raises(ValueError, match="Karras σ's do not apply"):
        sample(toy_model, start_noise(), sampler="pndm_karras", steps=4, schedule=SD)
    with pytest.raises(ValueError, match="pndm cannot start part-way"):
        sample(toy_model, start_noise(), sampler="pndm", steps=4, schedule=SD, init=start_noise(), strength=0.5)
