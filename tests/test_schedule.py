"""Noise schedules: exact values from their definitions, parity with diffusers, relations that must hold."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kedavra.diffusion.schedule import SCHEDULE_PRESETS, NoiseSchedule, get_schedule, rescale_zero_terminal_snr
from kedavra.diffusion.timesteps import (
    ZERO_SNR_ALPHA_BAR_FLOOR,
    karras_sigmas,
    make_plan,
    spaced_timesteps,
    start_index_for_strength,
)


def test_scaled_linear_end_points_are_stable_diffusions():
    s = get_schedule("sd")
    # SD's config: beta_start 0.00085, beta_end 0.012, linear in sqrt(beta)
    assert s.betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    assert s.betas[500].sqrt().item() == pytest.approx(0.00085**0.5 + 500 / 999 * (0.012**0.5 - 0.00085**0.5))
    # ᾱ at SD's last step is 0.0047, √ᾱ = 0.068: the non-zero terminal SNR of Lin et al. 2023, sec. 3.1
    assert s.alpha_bar[-1].item() == pytest.approx(0.00466, abs=1e-5)


def test_linear_is_ddpm():
    s = get_schedule("ddpm")
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alpha_bar[-1].item() == pytest.approx(math.prod(1 - b for b in s.betas.tolist()), rel=1e-12)


def test_cosine_matches_its_closed_form_and_clips():
    s = get_schedule("cosine")
    f = [math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(1001)]
    # ᾱ_t = f(t+1)/f(0) wherever β is not clipped (Nichol and Dhariwal 2021, eq. 17)
    assert s.alpha_bar[499].item() == pytest.approx(f[500] / f[0], rel=1e-9)
    assert s.betas.max().item() == pytest.approx(0.999)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_matches_diffusers_alphas_cumprod(kind):
    diffusers = pytest.importorskip("diffusers")
    names = {"linear": ("linear", 1e-4, 0.02), "scaled_linear": ("scaled_linear", 0.00085, 0.012),
             "cosine": ("squaredcos_cap_v2", 1e-4, 0.02)}
    name, start, end = names[kind]
    ref = diffusers.DDPMScheduler(beta_schedule=name, beta_start=start, beta_end=end).alphas_cumprod.double()
    ours = NoiseSchedule(kind, 1000, start, end).alpha_bar
    # diffusers computes in float32; agreement to fp32 accumulation error
    assert ((ours - ref).abs() / ref).max().item() < 2e-5


def test_zero_terminal_snr_rescale():
    s = get_schedule("sd-zero-snr")
    plain = get_schedule("sd")
    assert s.alpha_bar[-1].item() == 0.0 and s.snr[-1].item() == 0.0  # Lin et al. 2023: SNR(T) = 0
    assert s.alpha_bar[0].item() == pytest.approx(plain.alpha_bar[0].item(), rel=1e-12)  # first step kept
    assert math.isinf(s.log_snr[-1].item()) and math.isinf(s.sigmas[-1].item())
    diffusers = pytest.importorskip("diffusers")
    # diffusers' function keeps its input's dtype: fed float64 it computes what ours does, in the same precision (in
    # fp32 its last betas, 1 - ᾱ_t / ᾱ_(t-1), lose 1e-5 relative to cancellation, differently on each CPU)
    ref = diffusers.schedulers.scheduling_ddim.rescale_zero_terminal_snr(plain.betas)
    assert ref.dtype == torch.float64
    assert torch.allclose(rescale_zero_terminal_snr(plain.betas), ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", list(SCHEDULE_PRESETS))
def test_relations_hold(name):
    s = get_schedule(name)
    assert (s.alpha_bar[1:] < s.alpha_bar[:-1]).all()  # ᾱ strictly decreasing: noise only grows
    assert ((s.betas > 0) & (s.betas <= 1)).all()
    finite = torch.isfinite(s.log_snr)
    assert torch.allclose(s.log_snr[finite], -2 * s.sigmas[finite].log())  # log SNR = -2 log σ
    assert torch.allclose(s.snr[finite], 1 / s.sigmas[finite] ** 2)


@settings(max_examples=50, deadline=None)
@given(st.floats(0, 998.999))
def test_sigma_to_t_inverts_sigma_at(t):
    s = get_schedule("sd")
    assert s.sigma_to_t(s.sigma_at(torch.tensor(t, dtype=torch.float64))).item() == pytest.approx(t, abs=1e-6)


def test_sigma_at_is_exact_at_integer_steps():
    s = get_schedule("ddpm")
    t = torch.arange(0, 1000, 37)
    assert torch.allclose(s.sigma_at(t), s.sigmas[t], rtol=1e-12)


def test_spacings_match_their_definitions():
    s = get_schedule("sd")
    assert spaced_timesteps(s, 10, "leading", 1).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert spaced_timesteps(s, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert spaced_timesteps(s, 4, "linspace").tolist() == [999, 666, 333, 0]


def test_karras_sigmas_end_points_and_rho():
    sig = karras_sigmas(0.03, 14.6, 10)
    assert sig[0].item() == pytest.approx(14.6) and sig[-1].item() == pytest.approx(0.03)
    # equal steps in σ^(1/ρ) (Karras et al. 2022, eq. 5)
    step = (0.03 ** (1 / 7) - 14.6 ** (1 / 7)) / 9
    assert torch.allclose(torch.diff(sig ** (1 / 7)), torch.full((9,), step, dtype=torch.float64))


def test_plan_final_levels_and_zero_snr_floor():
    plan = make_plan(get_schedule("sd"), 20)
    assert plan.sigmas[-1].item() == 0 and plan.alpha_bar[-1].item() == 1
    plan = make_plan(get_schedule("sd"), 20, final_sigma="sigma_min")
    assert plan.alpha_bar[-1].item() == get_schedule("sd").alpha_bar[0].item()
    plan = make_plan(get_schedule("sd-zero-snr"), 10, "trailing")
    assert plan.alpha_bar[0].item() == 0
    assert plan.sigmas[0].item() == pytest.approx(((1 - ZERO_SNR_ALPHA_BAR_FLOOR) / ZERO_SNR_ALPHA_BAR_FLOOR) ** 0.5)


def test_strength_picks_the_last_steps():
    assert start_index_for_strength(20, 1.0) == 0
    assert start_index_for_strength(20, 0.5) == 10
    assert start_index_for_strength(20, 0.75) == 5


@pytest.mark.parametrize("bad", [
    lambda: NoiseSchedule("quadratic"),
    lambda: NoiseSchedule("linear", 0),
    lambda: NoiseSchedule("linear", 1000, 0.02, 0.01),
    lambda: get_schedule("nope"),
    lambda: spaced_timesteps(get_schedule("sd"), 0),
    lambda: spaced_timesteps(get_schedule("sd"), 1001),
    lambda: spaced_timesteps(get_schedule("sd"), 10, "sideways"),
    lambda: make_plan(get_schedule("sd"), 10, final_sigma="one"),
    lambda: start_index_for_strength(10, 1.5),
    lambda: start_index_for_strength(10, -0.1),
    lambda: start_index_for_strength(10, 0.05),
    lambda: get_schedule("sd").sigma_at(torch.tensor([float("nan")])),
    lambda: get_schedule("sd").sigma_at(torch.tensor([1000.0])),
])
def test_bad_input_is_refused_with_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"allowed|must|got|strength|leaves"):
        bad()


def test_zero_terminal_snr_alpha_bar_at_the_last_step_is_zero_not_nan():
    s = get_schedule("sd-zero-snr")
    assert s.alpha_bar_at(torch.tensor([999.0, 0.0])).tolist() == [0.0, pytest.approx(s.alpha_bar[0].item())]
