"""Pseudo numerical methods (PNDM: Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"),
as diffusers' PNDMScheduler and AUTOMATIC1111's "PLMS" run them, in the VP view x_t.

Every update is PNDM's transfer part φ (PNDM eq. 9), which from the same (x_t, ε) lands where DDIM's deterministic
step does (DDIM eq. 12, η = 0); the methods differ in the ε they feed it:
    pseudo linear multistep (PLMS)  ε' = Adams-Bashforth on the ε̂'s of the last steps (orders 1 to 4)
    pseudo Runge-Kutta (PRK)        ε' = (e_1 + 2 e_2 + 2 e_3 + e_4)/6 from 4 evaluations, two of them at half steps
    pseudo improved Euler           ε' = (e_1 + e_2)/2, e_2 at the end of a φ step taken with e_1

diffusers (0.42, PNDMScheduler; Stable Diffusion 1.x folders: skip_prk_steps, steps_offset 1, final ᾱ = ᾱ_0), with
n steps spaced τ_0 > ... > τ_{n-1} and δ = ⌊T/n⌋:
    skip_prk_steps  n+1 evaluations at τ_0, τ_1, τ_1, τ_2, ..., τ_{n-1} (one at τ_0 for n = 1): a φ step on ε(τ_0), then
                    that step again from the start with the mean of ε(τ_0) and ε(τ_1) (the repeated timestep), then
                    Adams-Bashforth of orders 2, 3, 4 on the first evaluations of the steps
    PRK (n >= 4)    3 Runge-Kutta steps τ_0 -> τ_1 -> τ_2 -> τ_3 (4 evaluations each, at t, t'+δ/2, t'+δ/2, t') and
                    then order-4 Adams-Bashforth from τ_3 on: n+9 evaluations
    Every update from t goes to t - δ (half steps to t - ⌊δ/2⌋), whatever the spacing: only with "leading" spacing
    is that the next timestep; with "trailing" and "linspace" the model is then evaluated at the next timestep on a
    state at t - δ, and φ treats the state as being at that timestep. Below t = 0 the final level is ᾱ = 1
    (set_alpha_to_one) or ᾱ_0.
    v-prediction: diffusers combines the model's raw v's, then turns the combination into ε at the update's start
    sample and level; `sample_pndm` does the same (for ε models the two readings coincide).

A1111 (v1.10, modules/sd_samplers_timesteps.py and sd_samplers_timesteps_impl.py, CompVis' PLMS): timesteps
ts = clip(range(0, T, ⌊T/n⌋) + 1, 0, T-1), ascending; the loop runs len(ts)-1 steps from ts[-1] down to ts[1] and
ends at ᾱ(ts[0]) = ᾱ_1; the first step is pseudo improved Euler (2 evaluations), then Adams-Bashforth of orders
2, 3, 4: len(ts) evaluations. ᾱ is A1111's float32 table (the LDM model's buffer). DDIM uses the same plan.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kedavra.diffusion.forward_process import eps_from_v, v_from_eps_x0, x0_from_eps
from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.schedule import NoiseSchedule
from kedavra.diffusion.sigmas import ZSNR_LAST_ALPHA_BAR, a1111_img2img_steps
from kedavra.diffusion.timesteps import SamplingPlan, check_steps, spaced_timesteps
from kedavra.validation import check_bool, check_int

# Adams-Bashforth weights on ε_t, ε_{t+δ}, ε_{t+2δ}, ... (newest first) and their divisor, by order: the linear
# multistep part of PNDM's PLMS (Liu et al. 2022, sec. 3.3), as diffusers and A1111 write them.
ADAMS_BASHFORTH = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}
PLMS_HISTORY = max(ADAMS_BASHFORTH) - 1  # earlier ε's the highest order needs
RUNGE_KUTTA_WEIGHTS = (1 / 6, 1 / 3, 1 / 3, 1 / 6)  # classical RK4 weights of e_1..e_4 (PNDM's PRK)
RUNGE_KUTTA_STEPS = 3  # diffusers' PRK warm-up: 3 steps, then PLMS has the 4 ε's order 4 needs
PRK_MIN_STEPS = RUNGE_KUTTA_STEPS + 1  # the warm-up spans the 4 noisiest timesteps


@dataclass(frozen=True, kw_only=True)
class PNDMPlan(SamplingPlan):
    """A diffusers PNDM run, one entry per model evaluation (m of them, m = len(plan)).

    timesteps       (m,) the timestep of each evaluation (diffusers' `scheduler.timesteps`, repeats included)
    alpha_bar       (m+1,) ᾱ of the state evaluation i sees (where the previous update landed), then the final level;
                    update i lands on alpha_bar[i+1]
    alpha_bar_from  (m,) the ᾱ_t update i steps from in φ (diffusers' alphas_cumprod[t])
    skip_prk_steps  which warm-up the run was built for
    """

    alpha_bar_from: torch.Tensor
    skip_prk_steps: bool

    def start_at(self, index: int) -> SamplingPlan:
        raise ValueError(
            "a PNDM run cannot start part-way: its warm-up (the repeated first step or the Runge-Kutta steps) "
            "belongs to its start; for image-to-image use DDIM, or A1111's PLMS with a1111_img2img_plan"
        )


def _sigmas(alpha_bar: torch.Tensor) -> torch.Tensor:
    """σ = √((1-ᾱ)/ᾱ) of each level."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def pndm_plan(schedule: NoiseSchedule, steps: int, steps_offset: int = 0, skip_prk_steps: bool = True,
              set_alpha_to_one: bool = False, spacing: str = "leading") -> PNDMPlan:
    """The evaluations of diffusers' PNDMScheduler for `steps` steps (see the module docstring).

    Stable Diffusion 1.x: pndm_plan(SCHEDULE_PRESETS["sd"], steps, steps_offset=1). ValueError for steps outside
    1..T (4..T without skip_prk_steps), an unknown spacing, or a level with ᾱ = 0 to step from.
    """
    check_int("steps_offset", steps_offset, low=0)
    skip_prk_steps = check_bool("skip_prk_steps", skip_prk_steps)
    set_alpha_to_one = check_bool("set_alpha_to_one", set_alpha_to_one)
    tau = [int(t) for t in spaced_timesteps(schedule, steps, spacing, steps_offset)]  # τ_0 > ... > τ_{n-1}
    if not skip_prk_steps and steps < PRK_MIN_STEPS:
        raise ValueError(f"skip_prk_steps=False needs steps >= {PRK_MIN_STEPS} (its {RUNGE_KUTTA_STEPS} Runge-Kutta "
                         f"steps span the {PRK_MIN_STEPS} noisiest timesteps), got steps={steps}")
    delta = schedule.num_train_timesteps // steps  # δ: diffusers steps from t to t - δ for every spacing
    # (model timestep, timestep the update steps from, timestep it lands on) of each evaluation
    if skip_prk_steps:
        evaluations = [(tau[0], tau[0], tau[0] - delta)]
        if steps > 1:  # the repeated timestep: the first step again, from the start, with the mean ε
            evaluations.append((tau[1], tau[1] + delta, tau[1]))
        plms_from = 1
    else:
        half = delta // 2
        evaluations = []
        for start, end in zip(tau[:RUNGE_KUTTA_STEPS], tau[1 : RUNGE_KUTTA_STEPS + 1], strict=True):
            evaluations += [(start, start, start - half), (end + half, start, end + half), (end + half, start, end),
                            (end, start, end)]
        plms_from = RUNGE_KUTTA_STEPS
    evaluations += [(t, t, t - delta) for t in tau[plms_from:]]
    final = torch.ones((), dtype=torch.float64) if set_alpha_to_one else schedule.alpha_bar[0]

    def level(t: int) -> torch.Tensor:
        return schedule.alpha_bar[t] if t >= 0 else final

    timesteps, starts, ends = zip(*evaluations, strict=True)
    alpha_bar_from = torch.stack([level(t) for t in starts])
    if (alpha_bar_from == 0).any():
        raise ValueError(f"PNDM divides by √ᾱ_t, and ᾱ = 0 at timestep {schedule.num_train_timesteps - 1} of this "
                         "zero-terminal-SNR schedule; use a spacing that does not start there")
    alpha_bar = torch.stack([level(tau[0])] + [level(t) for t in ends])
    return PNDMPlan(torch.tensor(timesteps, dtype=torch.float64), alpha_bar, _sigmas(alpha_bar),
                    alpha_bar_from=alpha_bar_from, skip_prk_steps=skip_prk_steps)


def pndm_transfer(x: torch.Tensor, eps: torch.Tensor, alpha_bar: float, alpha_bar_next: float) -> torch.Tensor:
    """PNDM's transfer part φ(x_t, ε, t, t-δ), from ᾱ_t = alpha_bar to ᾱ_{t-δ} = alpha_bar_next (PNDM eq. 9):

        x_{t-δ} = √(ᾱ_{t-δ}/ᾱ_t) x_t - (ᾱ_{t-δ} - ᾱ_t) ε / (√ᾱ_t (√((1-ᾱ_{t-δ}) ᾱ_t) + √((1-ᾱ_t) ᾱ_{t-δ})))

    which equals DDIM's deterministic step √ᾱ_{t-δ} x̂_0 + √(1-ᾱ_{t-δ}) ε (DDIM eq. 12, η = 0), without its
    cancellation near ᾱ = 1.
    """
    x_coef = (alpha_bar_next / alpha_bar) ** 0.5
    eps_coef = (alpha_bar_next - alpha_bar) / (
        alpha_bar**0.5 * (((1 - alpha_bar_next) * alpha_bar) ** 0.5 + ((1 - alpha_bar) * alpha_bar_next) ** 0.5)
    )
    return x_coef * x - eps_coef * eps


def adams_bashforth(history: list[torch.Tensor]) -> torch.Tensor:
    """ε' from 1 to 4 ε's, oldest first: Adams-Bashforth of order len(history) (see ADAMS_BASHFORTH)."""
    weights, divisor = ADAMS_BASHFORTH[len(history)]
    return sum(w * eps for w, eps in zip(weights, reversed(history), strict=False)) / divisor


def sample_pndm(denoiser: Denoiser, x: torch.Tensor, plan: PNDMPlan, noise=None, callback=None, *,
                skip_prk_steps: bool = True) -> torch.Tensor:
    """diffusers' PNDMScheduler loop on a `pndm_plan` built with the same skip_prk_steps (module docstring):
    PLMS with its improved-Euler start (skip_prk_steps), or PRK steps then PLMS (Liu et al. 2022, F-PNDM).

    One reported step per evaluation: step i's state is diffusers' `prev_sample` after its i-th `step` call.
    Deterministic; `noise` is unused.
    """
    if not isinstance(plan, PNDMPlan):
        raise ValueError(f"sample_pndm needs a plan from pndm_plan, got {type(plan).__name__}")
    if plan.skip_prk_steps != skip_prk_steps:
        raise ValueError(f"the plan was built with skip_prk_steps={plan.skip_prk_steps}, "
                         f"but the sampler was asked for skip_prk_steps={skip_prk_steps}")
    v_model = denoiser.prediction_type == "v"
    runge_kutta_evaluations = 0 if skip_prk_steps else RUNGE_KUTTA_STEPS * len(RUNGE_KUTTA_WEIGHTS)
    m = len(plan)
    history = []  # the model outputs at the start of each step, oldest first (diffusers' `ets`)
    x_start = x  # the sample the update steps from
    for i in range(m):
        t, alpha_bar = plan.timesteps[i].item(), plan.alpha_bar[i].item()
        alpha_bar_from, alpha_bar_to = plan.alpha_bar_from[i].item(), plan.alpha_bar[i + 1].item()
        x0, eps = denoiser.vp(x, t, alpha_bar)
        # what diffusers combines: the model's own output (v = √ᾱ ε - √(1-ᾱ) x_0, Salimans and Ho 2022, eq. 6)
        output = v_from_eps_x0(eps, x0, alpha_bar) if v_model else eps
        if i < runge_kutta_evaluations:
            stage = i % len(RUNGE_KUTTA_WEIGHTS)
            if stage == 0:
                x_start, runge_kutta_sum = x, 0
                history.append(output)
            runge_kutta_sum = runge_kutta_sum + RUNGE_KUTTA_WEIGHTS[stage] * output
            combined = runge_kutta_sum if stage == len(RUNGE_KUTTA_WEIGHTS) - 1 else output
        elif skip_prk_steps and i == 1:  # pseudo improved Euler: the first step again, from the start
            combined = (output + history[-1]) / 2
        else:
            x_start = x
            history = history[-PLMS_HISTORY:] + [output]
            combined = adams_bashforth(history)
        eps_from = eps_from_v(x_start, combined, alpha_bar_from) if v_model else combined
        x_next = pndm_transfer(x_start, eps_from, alpha_bar_from, alpha_bar_to)
        x = denoiser.after_step(callback, i, m, x_next, x0_from_eps(x_start, eps_from, alpha_bar_from))
    return x


def a1111_alpha_bar(schedule: NoiseSchedule) -> torch.Tensor:
    """ᾱ_t as A1111 keeps it (the LDM model's float32 `alphas_cumprod`; a zero-terminal-SNR schedule's last entry
    set to ZSNR_LAST_ALPHA_BAR), as float64 (T,)."""
    alpha_bar = schedule.alpha_bar.float().double()
    if schedule.zero_terminal_snr:
        alpha_bar[-1] = ZSNR_LAST_ALPHA_BAR
    return alpha_bar


def a1111_timesteps(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """A1111's DDIM / PLMS timesteps for `steps`: clip(range(0, T, ⌊T/steps⌋) + 1, 0, T-1), ascending, int64.

    ⌈T/⌊T/steps⌋⌉ of them (20 steps: 1, 51, ..., 951; 30 steps: 1, 34, ..., 991, 31 timesteps)."""
    T = schedule.num_train_timesteps
    check_steps(steps, T)
    return (torch.arange(0, T, T // steps) + 1).clamp(0, T - 1)


def _timestep_of_sigma(log_sigmas: torch.Tensor, sigma: float) -> float:
    """The fractional timestep of σ, log σ interpolated linearly between the table's entries (k-diffusion's
    DiscreteSchedule.sigma_to_t, as A1111 uses it); t itself at the table's own σ_t."""
    log_sigma = torch.tensor(sigma, dtype=torch.float64).log()
    high = int(torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1))
    low = high - 1
    w = ((log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])).clamp(0, 1)
    return low + w.item()


def a1111_timesteps_plan(schedule: NoiseSchedule, steps: int) -> SamplingPlan:
    """A1111's DDIM / PLMS plan: timesteps ts[-1], ..., ts[1] of `a1111_timesteps` (len(ts)-1 steps), ᾱ from
    `a1111_alpha_bar` at each, and the final level ᾱ(ts[0]) = ᾱ_1. Its sigma_to_t gives the final level's
    timestep (A1111's PLMS evaluates there on a one-step run)."""
    table = a1111_alpha_bar(schedule)
    timesteps = a1111_timesteps(schedule, steps).flip(0)  # descending, ts[-1] ... ts[0]
    alpha_bar = table[timesteps]
    return SamplingPlan(timesteps[:-1].double(), alpha_bar, _sigmas(alpha_bar),
                        sigma_to_t=functools.partial(_timestep_of_sigma, _sigmas(table).log()))


def a1111_img2img_plan(schedule: NoiseSchedule, steps: int, strength: float, fix_steps: bool = False
                       ) -> tuple[SamplingPlan, float]:
    """A1111's DDIM / PLMS image-to-image run (CompVisSampler.sample_img2img): (plan, ᾱ at which to noise the init
    latent, x = √ᾱ x_0 + √(1-ᾱ) ε).

    The schedule's step count and t_enc come from sigmas.a1111_img2img_steps (by default `steps` and
    t_enc = ⌊min(strength, 0.999)·steps⌋; fix_steps: A1111's img2img_fix_steps rule); the run takes ts[:t_enc],
    i.e. t_enc-1 steps from ts[t_enc-1] down to ᾱ(ts[0]) (none for t_enc <= 1), while the init is noised one
    timestep higher, at ᾱ(ts[t_enc]).
    """
    total, t_enc = a1111_img2img_steps(steps, strength, fix_steps)
    plan = a1111_timesteps_plan(schedule, total)
    count = len(plan) + 1  # len(ts)
    alpha_bar_noise = plan.alpha_bar[count - 1 - t_enc].item()  # plan.alpha_bar[k] is ᾱ(ts[count-1-k])
    return plan.start_at(min(count - t_enc, count - 1)), alpha_bar_noise


def sample_plms(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None) -> torch.Tensor:
    """A1111's (CompVis') PLMS on `plan` (`a1111_timesteps_plan`): step 0 is pseudo improved Euler, its second
    evaluation at the next level's timestep; then Adams-Bashforth of orders 2, 3, 4 on the ε̂'s at the start of
    each step (Liu et al. 2022: S-PNDM's improved-Euler start, then PLMS up to order 4). len(plan)+1 evaluations
    (none for an empty plan). Deterministic; `noise` is unused.
    """
    n = len(plan)
    history = []  # ε̂ at the start of the earlier steps, oldest first (A1111's old_eps)
    for i in range(n):
        t, alpha_bar, alpha_bar_next = plan.timesteps[i].item(), plan.alpha_bar[i].item(), plan.alpha_bar[i + 1].item()
        _, eps = denoiser.vp(x, t, alpha_bar)
        if not history:
            x_euler = pndm_transfer(x, eps, alpha_bar, alpha_bar_next)
            t_next = plan.timesteps[1].item() if n > 1 else plan.t_at(plan.sigmas[1].item())
            _, eps_next = denoiser.vp(x_euler, t_next, alpha_bar_next)
            eps_prime = (eps + eps_next) / 2
        else:
            eps_prime = adams_bashforth(history + [eps])
        history = (history + [eps])[-PLMS_HISTORY:]
        x_next = pndm_transfer(x, eps_prime, alpha_bar, alpha_bar_next)
        x = denoiser.after_step(callback, i, n, x_next, x0_from_eps(x, eps_prime, alpha_bar))
    return x
