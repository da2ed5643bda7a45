"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models"),
orders 1 to 3, B(h) variants "bh1" and "bh2", data prediction, in the VP view; and the grid A1111's "UniPC" runs on.

Each step: correct the current sample with the model output just computed (UniC, the paper's Alg. 1), then predict
the next one (UniP, Alg. 2). Symbols as in dpm_solver.py: a = √ᾱ, s = √(1-ᾱ), λ = log(a/s); a step from level i to
i+1 has h = λ_{i+1} - λ_i > 0, and data prediction writes it with ĥ = -h (sec. 3.3). With x̂_0^{(k)} the data
prediction at level k and r_k = (λ_{i-k} - λ_i)/h (< 0, an earlier level) the UniP-p update is

    x_{i+1} = (s_{i+1}/s_i) x_i - a_{i+1} (e^ĥ - 1) x̂_0^{(i)} - a_{i+1} B(h) Σ_{k=1}^{p-1} ρ_k D_k,
    D_k = (x̂_0^{(i-k)} - x̂_0^{(i)}) / r_k,

whose first two terms are DPM-Solver++(1) (Lu et al. 2022, eq. 9). UniC-p recomputes x_{i+1} from the same x_i with
one more difference, D_p = x̂_0^{(i+1)} - x̂_0^{(i)} (r_p = 1), x̂_0^{(i+1)} being the model's output at the predicted
x_{i+1}; it reuses that evaluation, so a step costs one. The weights solve R ρ = b (Thm. 3.1 and its B(h) form,
sec. 3.3): row j of R holds r_k^{j-1}, and

    b_j = ĥ φ_{j+1}(ĥ) j! / B(h),   φ_1(z) = (e^z - 1)/z,  φ_{j+1}(z) = (φ_j(z) - 1/j!)/z,
    B(h) = ĥ ("bh1") or e^ĥ - 1 ("bh2").

UniP-p has p-1 unknowns (k = 1..p-1), UniC-p has p. Where the system is 1×1 (UniP-2, UniC-1) the reference code
(UniPC's own, so A1111's, and diffusers') takes ρ = ½, the h → 0 limit of b_1 for both B(h), and so do we.

Orders (diffusers' UniPCMultistepScheduler and A1111 agree): step i of n runs UniP of order
p_i = min(order, i + 1, n - i) with `lower_order_final` (min(order, i + 1) without), the i + 1 being the warm-up
while fewer outputs are known. diffusers lowers the order at the end whatever n is (its DPMSolverMultistepScheduler
does so only below 15 steps; UniPC has no such threshold), and A1111's min(order, steps + 1 - step) is the same rule.
Step i's corrector has the order of step i-1's predictor; the last step has no corrector (nothing evaluates the
model after it), which is also A1111's rule. diffusers' `disable_corrector` (step indices whose UniC is skipped) is
not offered: its default, no index, is what this computes. Into σ = 0 (λ = ∞) a step is always first order and
returns x̂_0; there diffusers' higher-order steps (lower_order_final=False) divide by r = 0 (inf at order 2, a
singular solve at order 3), and its "bh1" multiplies B(h) = -∞ by 0 even at first order, so that its bh1 runs into
σ = 0 end on NaN.
"""

from __future__ import annotations

import math

import torch

from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.samplers.dpm_solver import vp_scales
from kedavra.diffusion.schedule import NoiseSchedule
from kedavra.diffusion.timesteps import ZERO_SNR_ALPHA_BAR_FLOOR, SamplingPlan
from kedavra.validation import check_bool, check_choice, check_int, check_number

UNIPC_MAX_ORDER = 3
UNIPC_VARIANTS = ("bh1", "bh2")  # B(h) = ĥ or e^ĥ - 1 (UniPC, sec. 3.3)
# ρ of a 1×1 system (UniP-2's D_1, UniC-1's new difference): ½, the h → 0 limit of b_1, as the reference code takes it
SIMPLIFIED_RHO = 0.5


def _b_vector(hh: float, size: int, variant: str) -> list[float]:
    """b_j = ĥ φ_{j+1}(ĥ) j! / B(h), j = 1..size (UniPC, Zhao et al. 2023, Thm. 3.1 with sec. 3.3's B(h))."""
    B = hh if variant == "bh1" else math.expm1(hh)
    hh_phi = math.expm1(hh) / hh - 1  # ĥ φ_2(ĥ) = φ_1(ĥ) - 1
    factorial, b = 1, []
    for j in range(1, size + 1):
        b.append(hh_phi * factorial / B)
        factorial *= j + 1
        hh_phi = hh_phi / hh - 1 / factorial  # ĥ φ_{j+2}(ĥ) = φ_{j+1}(ĥ) - 1/(j+1)!
    return b


def _rho(rs: list[float], hh: float, variant: str) -> list[float]:
    """The weights ρ of the differences at ratios rs: R ρ = b with R_{jk} = r_k^j, j = 0..len(rs)-1 (Thm. 3.1)."""
    if len(rs) == 1:
        return [SIMPLIFIED_RHO]
    R = torch.tensor([[r**j for r in rs] for j in range(len(rs))], dtype=torch.float64)
    b = torch.tensor(_b_vector(hh, len(rs), variant), dtype=torch.float64)
    return torch.linalg.solve(R, b).tolist()


def _update(x: torch.Tensor, x0s: list[torch.Tensor], levels: list[tuple[float, float, float]], i: int, order: int,
            variant: str, x0_next: torch.Tensor | None = None) -> torch.Tensor:
    """x at level i+1 from x at level i: UniP of `order` (x0_next None), or UniC of `order` using x0_next, the x̂_0
    at the predicted level i+1. x0s[-1-k] is x̂_0 at level i-k; levels[k] is (a, s, λ) of level k."""
    _, s, lam = levels[i]
    a_next, s_next, lam_next = levels[i + 1]
    hh = -(lam_next - lam)  # ĥ = -h in data prediction (UniPC sec. 3.3)
    phi1 = math.expm1(hh)
    x_next = (s_next / s) * x - a_next * phi1 * x0s[-1]  # DPM-Solver++(1), Lu et al. 2022, eq. 9
    if math.isinf(lam_next):  # into σ = 0 the step is first order: x̂_0 itself
        return x_next
    h = -hh
    rs = [(levels[i - k][2] - lam) / h for k in range(1, order)]
    D = [(x0s[-1 - k] - x0s[-1]) / r for k, r in enumerate(rs, start=1)]
    if x0_next is not None:  # UniC's own difference, at r = 1
        rs.append(1.0)
        D.append(x0_next - x0s[-1])
    if not D:
        return x_next
    B = hh if variant == "bh1" else phi1
    return x_next - (a_next * B) * sum(rho * d for rho, d in zip(_rho(rs, hh, variant), D, strict=True))


def sample_unipc(denoiser: Denoiser, x: torch.Tensor, plan: SamplingPlan, noise=None, callback=None, *,
                 order: int = 2, variant: str = "bh2", lower_order_final: bool = True):
    """UniPC of `order` (1-3) with B(h) `variant` ("bh1" or "bh2") on the plan's levels (module docstring):
    n model evaluations. The defaults are diffusers' UniPCMultistepScheduler as SD pipelines configure it; order=3,
    variant="bh1" on `a1111_unipc_plan` is A1111's "UniPC". lower_order_final: lower the order over the last steps
    (p_i <= n - i). `noise` is unused (the sampler is deterministic)."""
    order = check_int("UniPC order", order, 1, UNIPC_MAX_ORDER)
    variant = check_choice("UniPC variant", variant, UNIPC_VARIANTS)
    lower_order_final = check_bool("lower_order_final", lower_order_final)
    n = len(plan)
    levels = [vp_scales(sigma) for sigma in plan.sigmas.tolist()]  # (a, s, λ) of every level
    x0s: list[torch.Tensor] = []  # x̂_0 at the last `order` levels visited, oldest first
    x_before, order_before = None, 0  # the state the previous predictor started from, and its order
    for i in range(n):
        x0 = denoiser.vp(x, plan.timesteps[i].item(), 1 / (1 + plan.sigmas[i].item() ** 2))[0]
        if x_before is not None:  # UniC: correct x_i with x̂_0 at the predicted x_i
            x = _update(x_before, x0s, levels, i - 1, order_before, variant, x0_next=x0)
        x0s = (x0s + [x0])[-order:]
        step_order = min(order, i + 1, n - i if lower_order_final else order)  # warm-up; lower order at the end
        x_next = _update(x, x0s, levels, i, step_order, variant)  # UniP
        x_next = denoiser.after_step(callback, i, n, x_next, x0)
        x_before, order_before, x = x, step_order, x_next
    return x


def a1111_unipc_steps(steps: int, t_enc: int | None = None, num_train_timesteps: int = 1000
                      ) -> tuple[int, float | None]:
    """(UniPC steps, t_start) A1111 1.10 passes to its UniPC for a request of `steps` steps (text-to-image), or for
    its image-to-image part of t_enc steps (t_enc as A1111's setup_img2img_steps gives it: ⌊min(strength, 0.999)·
    steps⌋ by default). A1111 builds integer timesteps τ_j = min(j·⌊T/steps⌋ + 1, T-1), j = 0, 1, ... < T/⌊T/steps⌋
    (so 31 of them for 30 steps), and UniPC runs as many steps as it is handed of them (all, or the first t_enc) on
    its own grid, from t_start = τ_{t_enc-1}/1000 + 1/1000 for image-to-image (model time τ_{t_enc-1} when T = 1000)
    and t = 1 (None) otherwise. A1111 noises the init image to ᾱ at τ_{t_enc}, not at t_start's level. T =
    num_train_timesteps stands for A1111's 1000 throughout."""
    T = check_int("num_train_timesteps", num_train_timesteps, 2)
    steps = check_int("steps", steps, 1, T)
    stride = T // steps
    count = len(range(0, T, stride))
    if t_enc is None:
        return count, None
    t_enc = check_int("t_enc", t_enc, 1, count - 1)
    last = min((t_enc - 1) * stride + 1, T - 1)
    return t_enc, last / T + 1 / T


def a1111_unipc_plan(schedule: NoiseSchedule, steps: int, t_start: float | None = None) -> SamplingPlan:
    """The levels A1111's UniPC (its uni_pc.py on NoiseScheduleVP('discrete', alphas_cumprod), skip_type
    "time_uniform") visits in `steps` steps from continuous time t_start (None: 1) down to 1/T, as a SamplingPlan.

    A1111 maps the discrete schedule to t ∈ [1/T, 1], step k at t_k = (k+1)/T, interpolates log √ᾱ linearly in t
    between those knots, steps on t_i = linspace(t_start, 1/T, steps+1) and evaluates the model at the fractional
    timestep τ = (t - 1/T)·1000 (= T for SD). So, with τ = k + w (0 <= w < 1), ᾱ(τ) = ᾱ_k^{1-w} ᾱ_{k+1}^w: the
    geometric interpolation of the table, which A1111 keeps in float32 (the model's buffer); here those float32
    values are read and everything is computed in float64 (A1111 computes in float32, 1e-7 relative apart).
    timesteps (steps,) are τ_0 .. τ_{steps-1}; the final level is τ = 0, ᾱ_0: A1111 ends there, not at σ = 0.
    sample_unipc(..., order=3, variant="bh1") on this plan is A1111's "UniPC" with its defaults (lower_order_final
    on, its corrector rules and its `steps` model evaluations are sample_unipc's). Differences left: A1111 refuses
    steps < order (an assertion), where sample_unipc runs the lower orders; for a v-prediction model A1111 turns v
    into ε with the table's ᾱ at ⌊τ⌋, sample_unipc with this plan's ᾱ(τ). See a1111_unipc_steps for steps and t_start.
    """
    T = schedule.num_train_timesteps
    steps = check_int("steps", steps, 1)
    t_end = 1 / T
    t_start = 1.0 if t_start is None else check_number("t_start", t_start, t_end, 1.0, low_inclusive=False)
    tau = torch.linspace((t_start - t_end) * T, 0, steps + 1, dtype=torch.float64)  # (t_i - 1/T)·T, affine in t
    alpha_bar_table = schedule.alpha_bar.to(torch.float32).to(torch.float64)  # A1111 holds ᾱ in float32
    k = tau.floor().long().clamp(0, T - 2)
    w = tau - k
    alpha_bar = alpha_bar_table[k] ** (1 - w) * alpha_bar_table[k + 1] ** w  # log ᾱ linear between the knots
    floored = alpha_bar.clamp(min=ZERO_SNR_ALPHA_BAR_FLOOR)
    return SamplingPlan(tau[:-1], alpha_bar, ((1 - floored) / floored).sqrt())
