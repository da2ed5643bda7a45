"""A model's discrete σ table and the σ sequences ("schedule types") that A1111 and ComfyUI build from it.

A1111 and ComfyUI run k-diffusion's samplers on noise levels σ rather than on timesteps. The model's training
schedule gives one σ per timestep, σ_t = √((1-ᾱ_t)/ᾱ_t) (kedavra.diffusion.schedule), kept in float32 as both
programs keep it; a sampler visits σ's of a schedule type built from that table and evaluates the model at the
timestep of each σ:

    A1111    the fractional timestep found by interpolating log σ between the two table entries around it
             (k-diffusion's DiscreteSchedule.sigma_to_t), so the U-Net sees t = 523.4;
    ComfyUI  the nearest table entry (ModelSamplingDiscrete.timestep: argmin of |log σ - log σ_t|), an integer.

Zero-terminal-SNR schedules (Lin et al. 2023) have σ_{T-1} = ∞; A1111's and ComfyUI's "zero terminal SNR"
options set the last ᾱ to ZSNR_LAST_ALPHA_BAR instead, which is what the table holds here.

Schedule types, by A1111 label (modules/sd_schedulers.py, v1.10) and ComfyUI name (comfy/samplers.py); n steps
give n+1 σ's ending in 0 unless said otherwise:
    Uniform           n σ's at timesteps linspace(T-1, 0, n) (k-diffusion's get_sigmas)
    Karras            Karras et al. 2022, eq. 5, ρ = 7, between the table's σ_min and σ_max
    Exponential       log σ linear between σ_max and σ_min
    Polyexponential   log σ polynomial (ρ = 1: exponential)
    SGM Uniform       timesteps linspace(t(σ_max), t(σ_min), n+1) without the last (SDXL Turbo / SGM's discretisation)
    KL Optimal        tan of a linear ramp in arctan σ (Sabour et al. 2024, "Align Your Steps", sec. 3.3);
                      A1111: n+1 values ending at σ_min; ComfyUI: n values, then 0
    Align Your Steps  Sabour et al. 2024's published 10-step σ's for SD 1.5 / SDXL, log-linearly resampled to n
    Simple            every (T/n)-th table entry from the top
    Normal            like SGM Uniform with n timesteps including t(σ_min)
    DDIM              every ⌊T/n⌋-th entry from index 1 up (DDIM's leading spacing with offset 1)
    Beta              Lee et al. 2024, "Beta Sampling is All You Need": Beta(0.6, 0.6) quantiles; A1111 spaces
                      σ linearly by them, ComfyUI rounds them to table timesteps and drops repeats
    linear_quadratic  (ComfyUI) the Mochi schedule: linear then quadratic in σ/σ_max
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kedavra.diffusion.schedule import NoiseSchedule
from kedavra.validation import check_int, check_number

CONVENTIONS = ("a1111", "comfyui")
# ᾱ_{T-1} of a zero-terminal-SNR schedule in A1111 (modules/sd_models.py, rescale_zero_terminal_snr_abar) and
# ComfyUI (comfy/model_sampling.py): "a tiny value so σ_max stays finite", σ_max ≈ 4519.
ZSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08
A1111_MAX_STRENGTH = 0.999  # A1111 caps denoising strength here when choosing the first img2img step
# Align Your Steps (Sabour et al. 2024), the published 10-step σ schedules (NVIDIA's "how to" page), as A1111's
# modules/sd_schedulers.py and ComfyUI's AlignYourStepsScheduler node use them.
AYS_SIGMAS = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}
BETA_SCHEDULE_AB = (0.6, 0.6)  # Beta(α, β) of the Beta schedule: A1111's beta_dist_alpha/beta and ComfyUI's defaults
LINEAR_QUADRATIC_THRESHOLD = 0.025  # ComfyUI's threshold_noise of the Mochi linear-quadratic schedule


def a1111_img2img_steps(steps: int, strength: float, fix_steps: bool = False) -> tuple[int, int]:
    """(steps of the schedule built, t_enc) of an A1111 image-to-image run of `steps` steps at denoising
    `strength` (modules/sd_samplers_common.py, setup_img2img_steps). A k-diffusion sampler runs the last t_enc + 1
    steps of that schedule; A1111's DDIM / PLMS / UniPC evaluate its first t_enc timesteps (pndm, unipc).

    By default the schedule has `steps` steps and t_enc = ⌊min(strength, 0.999)·steps⌋, so fewer steps run than
    asked. fix_steps (A1111's "img2img_fix_steps" setting, and what its hires fix always does): the schedule has
    ⌊steps / min(strength, 0.999)⌋ steps and t_enc = steps - 1, so a k-diffusion sampler runs exactly `steps`."""
    strength = check_number("strength", strength, 0, 1)
    if not fix_steps:
        return steps, int(min(strength, A1111_MAX_STRENGTH) * steps)
    if strength <= 0:
        raise ValueError("strength 0 runs no step; give a denoising strength above 0")
    return int(steps / min(strength, A1111_MAX_STRENGTH)), steps - 1


@dataclass(frozen=True)
class SigmaTable:
    """One σ per training timestep, ascending, float32 (T,), and how a σ maps back to a timestep."""

    sigmas: torch.Tensor
    quantize: bool = False  # ComfyUI: evaluate at the nearest table timestep; A1111: interpolate

    @classmethod
    def from_schedule(cls, schedule: NoiseSchedule, convention: str = "a1111") -> SigmaTable:
        """The table A1111 (ᾱ rounded to float32 first, as the LDM model's buffer holds it) or ComfyUI (σ computed
        in float64, then rounded) builds for `schedule`."""
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown sampling convention {convention!r}; allowed: {', '.join(CONVENTIONS)}")
        alpha_bar = schedule.alpha_bar.clone()
        if schedule.zero_terminal_snr:
            alpha_bar[-1] = ZSNR_LAST_ALPHA_BAR
        if convention == "a1111":
            alpha_bar = alpha_bar.float()
            return cls(((1 - alpha_bar) / alpha_bar) ** 0.5, quantize=False)
        return cls((((1 - alpha_bar) / alpha_bar) ** 0.5).float(), quantize=True)

    @property
    def log_sigmas(self) -> torch.Tensor:
        return self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def __len__(self) -> int:
        return len(self.sigmas)

    def sigma_to_t(self, sigma: torch.Tensor | float, quantize: bool | None = None) -> torch.Tensor:
        """The timestep of σ: interpolated in log σ between table entries (k-diffusion's DiscreteSchedule), or the
        nearest entry when quantised (ComfyUI). float32, σ's shape."""
        quantize = self.quantize if quantize is None else quantize
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        log_sigmas = self.log_sigmas
        dists = sigma.log() - log_sigmas.reshape(-1, *([1] * sigma.ndim))  # (T, *σ)
        if quantize:
            return dists.abs().argmin(dim=0).float()
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)  # last entry with log σ_t <= log σ
        high = low + 1
        w = ((log_sigmas[low] - sigma.log()) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
        return (1 - w) * low + w * high

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """σ at a (fractional) timestep: log σ interpolated between the entries around it. float32."""
        t = torch.as_tensor(t, dtype=torch.float32).clamp(0, len(self) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.float(), sigmas.new_zeros(1, dtype=torch.float32)])


def uniform_sigmas(n: int, table: SigmaTable) -> torch.Tensor:
    """k-diffusion's get_sigmas(n): σ at timesteps linspace(T-1, 0, n), then 0."""
    return _append_zero(table.t_to_sigma(torch.linspace(len(table) - 1, 0, n)))


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """σ_i = (σ_max^{1/ρ} + i/(n-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, then 0 (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, n)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """log σ linear from log σ_max to log σ_min, then 0."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """log σ = log σ_min + r^ρ (log σ_max - log σ_min), r from 1 to 0, then 0 (ρ = 1 is exponential)."""
    ramp = torch.linspace(1, 0, n) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def timestep_linspace_sigmas(n: int, table: SigmaTable, include_end: bool, comfy_end_check: bool = False):
    """σ at timesteps evenly spaced from t(σ_max) to t(σ_min): n of them including the end ("Normal"), or n of
    n+1 without the end ("SGM Uniform"); then 0. ComfyUI's Normal takes one more step and no appended 0 when the
    table's smallest σ is 0 (never for a DDPM table)."""
    start, end = table.sigma_to_t(table.sigma_max), table.sigma_to_t(table.sigma_min)
    append_zero = True
    if include_end:
        if comfy_end_check and math.isclose(table.t_to_sigma(end).item(), 0, abs_tol=1e-5):
            n, append_zero = n + 1, False
        timesteps = torch.linspace(start.item(), end.item(), n)
    else:
        timesteps = torch.linspace(start.item(), end.item(), n + 1)[:-1]
    sigmas = torch.stack([table.t_to_sigma(t) for t in timesteps])
    return _append_zero(sigmas) if append_zero else sigmas


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float, convention: str = "a1111") -> torch.Tensor:
    """σ = tan(arctan σ_max + (i/N)(arctan σ_min - arctan σ_max)) (Sabour et al. 2024, sec. 3.3). A1111: i = 0..n
    over N = n, ending at σ_min (no 0: its last step stops at σ_min); ComfyUI: i = 0..n-1 over N = n-1, then 0."""
    if convention == "a1111":
        steps = torch.arange(n + 1)
        alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
        return torch.tan(steps / n * alpha_min + (1.0 - steps / n) * alpha_max).float()
    ramp = torch.arange(n, dtype=torch.float32) / (n - 1) if n > 1 else torch.zeros(1)
    return _append_zero((ramp * math.atan(sigma_min) + (1 - ramp) * math.atan(sigma_max)).tan())


def align_your_steps_sigmas(n: int, sdxl: bool) -> torch.Tensor:
    """The published 10-step Align Your Steps σ's (Sabour et al. 2024) for SD 1.5 or SDXL, resampled to n steps
    by linear interpolation of log σ over an even grid (their "how to"), then 0."""
    sigmas = torch.tensor(AYS_SIGMAS["sdxl" if sdxl else "sd15"], dtype=torch.float64)
    if n != len(sigmas):
        xs = torch.linspace(0, 1, len(sigmas), dtype=torch.float64)
        new_xs = torch.linspace(0, 1, n, dtype=torch.float64)
        log_sigmas = sigmas.flip(0).log()  # ascending, as np.interp needs
        index = torch.searchsorted(xs, new_xs, right=True).clamp(1, len(xs) - 1)
        w = (new_xs - xs[index - 1]) / (xs[index] - xs[index - 1])
        sigmas = ((1 - w) * log_sigmas[index - 1] + w * log_sigmas[index]).exp().flip(0)
    return _append_zero(sigmas)


def simple_sigmas(n: int, table: SigmaTable) -> torch.Tensor:
    """Every (T/n)-th table σ from the top: σ[-(1 + ⌊i·T/n⌋)], i = 0..n-1, then 0."""
    stride = len(table) / n
    return _append_zero(torch.stack([table.sigmas[-(1 + int(i * stride))] for i in range(n)]))


def ddim_sigmas(n: int, table: SigmaTable) -> torch.Tensor:
    """Table σ's at indices 1, 1+s, 1+2s, ... (s = max(⌊T/n⌋, 1)), descending, then 0 (DDIM's leading spacing with
    steps_offset 1; when n does not divide T this gives more than n steps, as A1111 and ComfyUI do)."""
    stride = max(len(table) // n, 1)
    return _append_zero(table.sigmas[1::stride].flip(0))


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the Beta(a, b) distribution function, by its continued fraction (modified Lentz's method;
    Abramowitz and Stegun 26.5.8), using the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where it converges slowly."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1 - x, b, a)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b)) / a
    tiny, c, d = 1e-300, 1.0, 0.0
    f = None
    for i in range(400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2 == 0:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            numerator = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + numerator * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        f = c * d if f is None else f * c * d
        if abs(1.0 - c * d) < 1e-16:
            break
    return front * (f - 1.0)


def beta_quantile(q: float, a: float, b: float) -> float:
    """The q-quantile of Beta(a, b) (scipy.stats.beta.ppf), by bisection on I_x(a, b) to double precision."""
    if q <= 0:
        return 0.0
    if q >= 1:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(200):
        mid = (low + high) / 2
        if mid in (low, high):
            break
        if regularized_incomplete_beta(mid, a, b) < q:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def beta_sigmas(n: int, table: SigmaTable, sigma_min: float, sigma_max: float, convention: str = "a1111"):
    """Beta-distribution spacing (Lee et al. 2024): quantiles of Beta(0.6, 0.6) at 1 - linspace(0, 1, n). A1111
    maps them linearly onto [σ_min, σ_max]; ComfyUI (n points without the end) rounds them to table timesteps and
    skips repeats. Then 0."""
    a, b = BETA_SCHEDULE_AB
    if convention == "a1111":
        quantiles = [beta_quantile(1 - q, a, b) for q in torch.linspace(0, 1, n, dtype=torch.float64).tolist()]
        return _append_zero(torch.tensor([sigma_min + x * (sigma_max - sigma_min) for x in quantiles]))
    last_index = len(table) - 1
    ts = [1 - i / n for i in range(n)]
    indices, sigmas = None, []
    for q in ts:
        index = round(beta_quantile(q, a, b) * last_index)  # numpy.rint: half to even, as Python's round
        if index != indices:
            sigmas.append(table.sigmas[index])
        indices = index
    return _append_zero(torch.stack(sigmas))


def linear_quadratic_sigmas(n: int, sigma_max: float, threshold: float = LINEAR_QUADRATIC_THRESHOLD):
    """ComfyUI's linear-quadratic schedule (from Genmo's Mochi): 1 - σ/σ_max linear up to `threshold` over the first
    half of the steps, then quadratic up to 1; n+1 values ending in 0."""
    if n == 1:
        return torch.tensor([1.0, 0.0]) * sigma_max
    linear_steps = n // 2
    schedule = [i * threshold / linear_steps for i in range(linear_steps)]
    step_diff = linear_steps - threshold * n
    quadratic_steps = n - linear_steps
    quadratic_coef = step_diff / (linear_steps * quadratic_steps**2)
    linear_coef = threshold / linear_steps - 2 * step_diff / quadratic_steps**2
    const = quadratic_coef * linear_steps**2
    schedule += [quadratic_coef * i**2 + linear_coef * i + const for i in range(linear_steps, n)]
    schedule += [1.0]
    return torch.tensor([1.0 - x for x in schedule], dtype=torch.float32) * torch.tensor(sigma_max)


@dataclass(frozen=True)
class ScheduleType:
    """One schedule type: its A1111 label and ComfyUI name ("" where the program has none), and how it is built."""

    name: str
    a1111: str
    comfyui: str
    build: Callable  # (n, table, convention, sdxl) -> (n+1,) float32


SCHEDULE_TYPES: dict[str, ScheduleType] = {
    s.name: s
    for s in [
        ScheduleType("uniform", "Uniform", "", lambda n, tb, c, x: uniform_sigmas(n, tb)),
        ScheduleType("karras", "Karras", "karras", lambda n, tb, c, x: karras_sigmas(n, tb.sigma_min, tb.sigma_max)),
        ScheduleType("exponential", "Exponential", "exponential",
                     lambda n, tb, c, x: exponential_sigmas(n, tb.sigma_min, tb.sigma_max)),
        ScheduleType("polyexponential", "Polyexponential", "",
                     lambda n, tb, c, x: polyexponential_sigmas(n, tb.sigma_min, tb.sigma_max)),
        ScheduleType("sgm_uniform", "SGM Uniform", "sgm_uniform",
                     lambda n, tb, c, x: timestep_linspace_sigmas(n, tb, include_end=False)),
        ScheduleType("kl_optimal", "KL Optimal", "kl_optimal",
                     lambda n, tb, c, x: kl_optimal_sigmas(n, tb.sigma_min, tb.sigma_max, c)),
        ScheduleType("align_your_steps", "Align Your Steps", "", lambda n, tb, c, x: align_your_steps_sigmas(n, x)),
        ScheduleType("simple", "Simple", "simple", lambda n, tb, c, x: simple_sigmas(n, tb)),
        ScheduleType("normal", "Normal", "normal",
                     lambda n, tb, c, x: timestep_linspace_sigmas(n, tb, True, comfy_end_check=c == "comfyui")),
        ScheduleType("ddim", "DDIM", "ddim_uniform", lambda n, tb, c, x: ddim_sigmas(n, tb)),
        ScheduleType("beta", "Beta", "beta", lambda n, tb, c, x: beta_sigmas(n, tb, tb.sigma_min, tb.sigma_max, c)),
        ScheduleType("linear_quadratic", "", "linear_quadratic",
                     lambda n, tb, c, x: linear_quadratic_sigmas(n, tb.sigma_max)),
    ]
}
AUTOMATIC = "automatic"  # A1111's "Automatic": the sampler's own schedule type (uniform where it names none)


def _normalise(name: str) -> str:
    return " ".join(name.strip().lower().replace("_", " ").replace("-", " ").split())


_SCHEDULE_ALIASES = {
    _normalise(alias): s.name for s in SCHEDULE_TYPES.values() for alias in (s.name, s.a1111, s.comfyui) if alias
} | {"automatic": AUTOMATIC, "sgmuniform": "sgm_uniform", "ays": "align_your_steps"}


def schedule_type_names() -> list[str]:
    """Every accepted schedule type name: A1111's labels, ComfyUI's names, kedavra's."""
    names = ["Automatic"] + [s.a1111 for s in SCHEDULE_TYPES.values() if s.a1111]
    return names + sorted({s.comfyui for s in SCHEDULE_TYPES.values() if s.comfyui} | set(SCHEDULE_TYPES))


def resolve_schedule_type(name: str) -> str:
    """kedavra's name ("karras", "sgm_uniform", ..., or AUTOMATIC) for an A1111 label or ComfyUI name,
    case-insensitive; ValueError listing the names otherwise."""
    key = _normalise(name) if isinstance(name, str) else None
    if key not in _SCHEDULE_ALIASES:
        raise ValueError(f"unknown schedule type {name!r}; allowed: {', '.join(schedule_type_names())}")
    return _SCHEDULE_ALIASES[key]


def schedule_type_label(name: str) -> str:
    """The label A1111 writes in its infotext ("Schedule type: Karras") for a schedule type."""
    return "Automatic" if name == AUTOMATIC else (SCHEDULE_TYPES[name].a1111 or name)


def build_sigmas(schedule_type: str, steps: int, table: SigmaTable, convention: str = "a1111",
                 sdxl: bool = False) -> torch.Tensor:
    """The σ sequence (float32, usually steps+1 long, descending, ending in 0) of a resolved schedule type."""
    check_int("steps", steps, 1, 10_000)
    if schedule_type not in SCHEDULE_TYPES:
        raise ValueError(f"unknown schedule type {schedule_type!r}; allowed: {', '.join(SCHEDULE_TYPES)}")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown sampling convention {convention!r}; allowed: {', '.join(CONVENTIONS)}")
    return SCHEDULE_TYPES[schedule_type].build(steps, table, convention, sdxl)
