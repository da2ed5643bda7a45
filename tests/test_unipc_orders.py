"""UniPC of orders 1-3 with B(h) "bh1" and "bh2" (kedavra.diffusion.samplers.unipc): every step against diffusers'
UniPCMultistepScheduler, and A1111's "UniPC" (its grid, `a1111_unipc_plan`) against a transcription of A1111's loop
written here in continuous time from the UniPC paper (Zhao et al. 2023, Alg. 1 and 2, Thm. 3.1).

Relative error at a step = max|ours - theirs| / max|theirs|.
"""

import math

import numpy as np
import pytest
import torch

from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.samplers.unipc import a1111_unipc_plan, a1111_unipc_steps, sample_unipc
from kedavra.diffusion.schedule import NoiseSchedule
from kedavra.diffusion.timesteps import make_plan

REL_TOL = 1e-5  # the parity target against diffusers in fp32
REL_TOL_FLOAT64 = 1e-12  # against diffusers in float64, on the same σ's: the same arithmetic up to rounding
A1111_REL_TOL = 1e-9  # float64 against the transcription below: the same arithmetic up to rounding
SD = NoiseSchedule()  # Stable Diffusion's scaled-linear schedule, 0.00085 to 0.012 over 1000 steps
T = SD.num_train_timesteps
SHAPE = (2, 4, 4, 4)
DATA_MEAN = torch.linspace(-0.8, 0.8, math.prod(SHAPE[1:])).reshape(SHAPE[1:])  # μ of the Gaussian data
DATA_VAR = 0.25  # v of the Gaussian data, x_0 ~ N(μ, v I)
LOG_ALPHA_BAR = np.log(SD.alpha_bar.to(torch.float32).double().numpy())  # the float32 table models hold
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def alpha_bar_at(t: float) -> float:
    """ᾱ at a (fractional) timestep: the table interpolated linearly in log ᾱ."""
    return math.exp(np.interp(t, np.arange(T), LOG_ALPHA_BAR))


def gaussian_eps(x, t):
    """The exact ε-prediction E[ε | x_t] for data x_0 ~ N(μ, v I): √(1-ᾱ)(x_t - √ᾱ μ)/(ᾱ v + 1 - ᾱ)."""
    alpha_bar = alpha_bar_at(t[0].item())
    mean = DATA_MEAN.to(x.dtype)
    return (1 - alpha_bar) ** 0.5 * (x - alpha_bar**0.5 * mean) / (alpha_bar * DATA_VAR + 1 - alpha_bar)


LINEAR_WEIGHT = torch.randn(SHAPE[1], SHAPE[1], generator=torch.Generator().manual_seed(5)) / SHAPE[1] ** 0.5
LINEAR_BIAS = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(6))


def linear_model(x, t):
    """A network-free model with random weights: a fixed channel mixing plus a bias that grows with t."""
    t = t.to(x.dtype).reshape(-1, 1, 1, 1)
    return torch.einsum("oc,bchw->bohw", LINEAR_WEIGHT.to(x.dtype), x) + (t / T) * LINEAR_BIAS.to(x.dtype)


MODELS = {"gaussian": gaussian_eps, "linear": linear_model}


def diffusers_trajectory(model, noise, steps, order, variant, lower_order_final, final_sigma, prediction):
    """diffusers' UniPCMultistepScheduler (data prediction, trailing spacing) on SD's schedule: the sample after
    each step. In float64 its arithmetic is float64 too, on the σ's of its own timesteps recomputed from the float64
    ᾱ table (it keeps ᾱ from a float32 cumprod and σ in float32, 1e-7 relative from the exact values)."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=SD.beta_start, beta_end=SD.beta_end,
        prediction_type=DIFFUSERS_PREDICTION[prediction], timestep_spacing="trailing", solver_order=order,
        solver_type=variant, predict_x0=True, lower_order_final=lower_order_final, final_sigmas_type=final_sigma)
    sched.set_timesteps(steps)
    if noise.dtype == torch.float64:
        alpha_bar = SD.alpha_bar[sched.timesteps]
        last = torch.zeros(1, dtype=torch.float64) if final_sigma == "zero" else SD.sigmas[:1]
        sched.sigmas = torch.cat([((1 - alpha_bar) / alpha_bar).sqrt(), last])
    x, trajectory = noise.clone(), []
    for t in sched.timesteps:
        out = model(x, t.expand(x.shape[0]).to(torch.float32))
        x = sched.step(out, t, x).prev_sample
        trajectory.append(x)
    return trajectory


def kedavra_trajectory(model, noise, plan, prediction="eps", **options):
    """sample_unipc on `plan`: the state after each step, and the denoiser (for its evaluation count)."""
    denoiser, trajectory = Denoiser(model, prediction), []
    sample_unipc(denoiser, noise, plan, callback=lambda step: trajectory.append(step.x.clone()), **options)
    return trajectory, denoiser


def relative_errors(ours, theirs) -> list[float]:
    return [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, theirs, strict=True)]


def noise(dtype=torch.float32):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=dtype)


PARITY_CASES = [
    # order, variant, lower_order_final, final_sigma, model, prediction, steps, dtype
    # diffusers' "bh1" into σ = 0 ends on NaN (B(h) = -∞ times 0): bh1 cases end on σ_min (see the next test)
    (3, "bh1", True, "sigma_min", "gaussian", "eps", 10, torch.float32),
    (3, "bh1", True, "sigma_min", "linear", "eps", 20, torch.float32),  # >= 15 steps: the order still drops
    (3, "bh1", True, "sigma_min", "linear", "x0", 25, torch.float64),
    (3, "bh1", True, "sigma_min", "gaussian", "eps", 3, torch.float32),
    (3, "bh2", True, "zero", "gaussian", "eps", 10, torch.float32),
    (3, "bh2", True, "zero", "linear", "v", 20, torch.float32),
    (3, "bh2", True, "zero", "linear", "eps", 2, torch.float32),  # warm-up meets the lowered final order
    (3, "bh2", False, "sigma_min", "gaussian", "eps", 10, torch.float32),
    (3, "bh2", True, "zero", "gaussian", "eps", 30, torch.float64),
    (2, "bh1", True, "sigma_min", "linear", "eps", 12, torch.float32),
    (2, "bh2", False, "sigma_min", "linear", "eps", 12, torch.float32),
    (1, "bh1", True, "sigma_min", "gaussian", "eps", 8, torch.float32),
    (1, "bh2", True, "zero", "linear", "eps", 8, torch.float32),
]


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c))
def test_every_step_matches_diffusers(case):
    order, variant, lower_order_final, final_sigma, model_name, prediction, steps, dtype = case
    model, x = MODELS[model_name], noise(dtype)
    theirs = diffusers_trajectory(model, x, steps, order, variant, lower_order_final, final_sigma, prediction)
    plan = make_plan(SD, steps, "trailing", final_sigma=final_sigma)
    ours, denoiser = kedavra_trajectory(model, x, plan, prediction, order=order, variant=variant,
                                        lower_order_final=lower_order_final)
    assert denoiser.evaluations == steps
    assert max(relative_errors(ours, theirs)) <= (REL_TOL_FLOAT64 if dtype == torch.float64 else REL_TOL)


def test_bh1_into_sigma_zero_ends_on_x0_where_diffusers_has_nan():
    """Into σ = 0 the last step returns x̂_0; the steps before it match diffusers, whose bh1 last step is NaN."""
    x, records = noise(), []
    plan = make_plan(SD, 10, "trailing", final_sigma="zero")
    sample_unipc(Denoiser(linear_model), x, plan, callback=records.append, order=3, variant="bh1")
    theirs = diffusers_trajectory(linear_model, x, 10, 3, "bh1", True, "zero", "eps")
    assert max(relative_errors([r.x for r in records[:-1]], theirs[:-1])) <= REL_TOL
    assert torch.equal(records[-1].x, records[-1].x0)


@pytest.mark.parametrize("order,variant", [(2, "bh2"), (3, "bh2"), (3, "bh1")])
def test_without_lower_order_final_the_step_into_sigma_zero_is_still_first_order(order, variant):
    """diffusers divides by r = 0 there (inf, or a singular solve); ours returns x̂_0."""
    records = []
    sample_unipc(Denoiser(linear_model), noise(), make_plan(SD, 6, "trailing"), callback=records.append, order=order,
                 variant=variant, lower_order_final=False)
    assert torch.equal(records[-1].x, records[-1].x0)


def test_higher_orders_are_more_accurate_on_gaussian_data():
    """For x_0 ~ N(μ, v I) the probability-flow ODE keeps (x_t - √ᾱ μ)/√(ᾱ v + 1 - ᾱ) constant, so the exact end
    point is known; at 8 steps the error falls with the order, for both B(h)."""
    x = noise(torch.float64)
    plan = make_plan(SD, 8, "trailing", final_sigma="sigma_min")
    start, end = plan.alpha_bar[0].item(), plan.alpha_bar[-1].item()
    exact = end**0.5 * DATA_MEAN + ((end * DATA_VAR + 1 - end) / (start * DATA_VAR + 1 - start)) ** 0.5 * (
        x - start**0.5 * DATA_MEAN)
    for variant in ("bh1", "bh2"):
        errors = [(sample_unipc(Denoiser(gaussian_eps), x, plan, order=order, variant=variant) - exact).abs().max()
                  for order in (1, 2, 3)]
        assert errors[0] > errors[1] > errors[2], (variant, errors)


def test_a1111_plan_known_values():
    """steps=10 from t = 1: τ_i = (t_i - 1/T)·1000 = 999 (1 - i/10); ᾱ at an integer τ is the float32 table's, at a
    half step the geometric mean of its neighbours; the run ends on τ = 0, ᾱ_0 (not σ = 0)."""
    table = SD.alpha_bar.to(torch.float32).double()
    plan = a1111_unipc_plan(SD, 10)
    expected = 999 * (1 - torch.arange(10, dtype=torch.float64) / 10)
    assert plan.timesteps.dtype == plan.alpha_bar.dtype == torch.float64
    assert plan.timesteps.shape == (10,) and plan.alpha_bar.shape == plan.sigmas.shape == (11,)
    torch.testing.assert_close(plan.timesteps, expected, rtol=0, atol=1e-10)
    assert plan.alpha_bar[0].item() == pytest.approx(table[999].item(), rel=1e-13)
    assert plan.alpha_bar[-1].item() == pytest.approx(table[0].item(), rel=1e-13)
    torch.testing.assert_close(plan.sigmas, ((1 - plan.alpha_bar) / plan.alpha_bar).sqrt())
    half = a1111_unipc_plan(SD, 2)  # τ = 999, 499.5, then 0
    assert half.timesteps[1].item() == pytest.approx(499.5, abs=1e-10)
    assert half.alpha_bar[1].item() == pytest.approx((table[499] * table[500]).sqrt().item(), rel=1e-12)
    img2img = a1111_unipc_plan(SD, 6, t_start=0.252)  # starts at τ = 251
    assert img2img.timesteps[0].item() == pytest.approx(251, abs=1e-9)
    assert img2img.alpha_bar[0].item() == pytest.approx(table[251].item(), rel=1e-12)


@pytest.mark.parametrize("args,expected", [
    ((20,), (20, None)),
    ((30,), (31, None)),  # ⌊1000/30⌋ = 33: τ = 1, 34, ..., 991 are 31 timesteps
    ((7,), (8, None)),
    ((20, 6), (6, 0.252)),  # τ_5 = 5·50 + 1 = 251 -> t_start = 251/1000 + 1/1000
    ((10, 9), (9, 0.802)),
])
def test_a1111_step_count_and_img2img_start(args, expected):
    steps, t_start = a1111_unipc_steps(*args)
    assert steps == expected[0]
    assert t_start == (None if expected[1] is None else pytest.approx(expected[1], abs=1e-12))


def a1111_unipc_reference(eps_model, x, steps, t_start=1.0, order=3):
    """A1111's UniPC (bh1, data prediction, multistep, time_uniform, lower_order_final), written out in continuous
    time t ∈ [1/N, 1]: log α(t) piecewise linear through (k+1)/N -> ½ log ᾱ_k, the model called at (t - 1/N)·N.
    Returns (the predictor's state after each step, model calls): the state kedavra's step callback and diffusers
    report; A1111's own callback sees it corrected, one evaluation later for kedavra."""
    knots = (np.arange(T) + 1) / T

    def log_alpha(t):
        return float(np.interp(t, knots, 0.5 * LOG_ALPHA_BAR))

    def alpha(t):
        return math.exp(log_alpha(t))

    def sigma(t):
        return math.sqrt(1 - math.exp(2 * log_alpha(t)))

    def lam(t):  # half log-SNR
        return log_alpha(t) - math.log(sigma(t))

    calls = []

    def data_prediction(x, t):
        calls.append(t)
        eps = eps_model(x, torch.full((x.shape[0],), (t - 1 / T) * T, dtype=torch.float32))
        return (x - sigma(t) * eps) / alpha(t)

    def phi(k, z):  # φ_1(z) = (e^z - 1)/z, φ_{k+1}(z) = (φ_k(z) - 1/k!)/z
        return math.expm1(z) / z if k == 1 else (phi(k - 1, z) - 1 / math.factorial(k - 1)) / z

    def update(x, history, t, p, x0_new=None):
        """UniP-p (x0_new None) or UniC-p from the last level in history [(t_k, x̂_0 at t_k)] to t."""
        t_0, m_0 = history[-1]
        h = lam(t) - lam(t_0)
        hh = -h
        ratios = [(lam(t_k) - lam(t_0)) / h for t_k, _ in history[-p:-1][::-1]]
        diffs = [(m_k - m_0) / r for (_, m_k), r in zip(history[-p:-1][::-1], ratios, strict=True)]
        if x0_new is not None:
            ratios, diffs = ratios + [1.0], diffs + [x0_new - m_0]
        x_t = sigma(t) / sigma(t_0) * x + alpha(t) * -math.expm1(hh) * m_0
        if not diffs:
            return x_t
        if len(diffs) == 1:
            rhos = [0.5]
        else:
            b = [hh * phi(j + 1, hh) * math.factorial(j) / hh for j in range(1, len(diffs) + 1)]  # B(h) = ĥ
            rhos = np.linalg.solve(np.vander(ratios, increasing=True).T, b)
        return x_t - alpha(t) * hh * sum(float(rho) * d for rho, d in zip(rhos, diffs, strict=True))

    ts = np.linspace(t_start, 1 / T, steps + 1)
    history = [(ts[0], data_prediction(x, ts[0]))]
    trajectory = []
    for j in range(1, steps + 1):
        p = j if j < order else min(order, steps + 1 - j)  # warm-up, then lower order at the end
        x_pred = update(x, history, ts[j], p)
        if j < steps:  # the corrector reuses the evaluation at the predicted point; none after the last step
            m = data_prediction(x_pred, ts[j])
            x = update(x, history, ts[j], p, x0_new=m)
            history = (history + [(ts[j], m)])[-order:]
        else:
            x = x_pred
        trajectory.append(x_pred)
    return trajectory, len(calls)


@pytest.mark.parametrize("steps,t_start", [(10, None), (20, None), (6, 0.252), (3, None)])
def test_a1111_unipc_matches_the_transcription(steps, t_start):
    x = noise(torch.float64)
    theirs, calls = a1111_unipc_reference(gaussian_eps, x, steps, 1.0 if t_start is None else t_start)
    ours, denoiser = kedavra_trajectory(gaussian_eps, x, a1111_unipc_plan(SD, steps, t_start), order=3,
                                        variant="bh1")
    assert denoiser.evaluations == calls == steps
    assert max(relative_errors(ours, theirs)) <= A1111_REL_TOL


@pytest.mark.parametrize("options,message", [
    ({"order": 4}, "UniPC order must be an integer from 1 to 3, got 4"),
    ({"order": 0}, "UniPC order must be an integer from 1 to 3, got 0"),
    ({"variant": "vary_coeff"}, "unknown UniPC variant 'vary_coeff'; allowed: bh1, bh2"),
    ({"lower_order_final": "yes"}, "lower_order_final must be True or False, got 'yes'"),
])
def test_bad_options_are_refused_naming_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        sample_unipc(Denoiser(linear_model), noise(), make_plan(SD, 4), **options)


@pytest.mark.parametrize("call,message", [
    (lambda: a1111_unipc_plan(SD, 0), "steps must be an integer >= 1, got 0"),
    (lambda: a1111_unipc_plan(SD, 5, t_start=0.001), r"t_start must be a number in \(0.001, 1.0\], got 0.001"),
    (lambda: a1111_unipc_plan(SD, 5, t_start=1.5), r"t_start must be a number in \(0.001, 1.0\], got 1.5"),
    (lambda: a1111_unipc_steps(20, 20), "t_enc must be an integer from 1 to 19, got 20"),
])
def test_bad_a1111_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
