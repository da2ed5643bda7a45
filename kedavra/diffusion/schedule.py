"""Noise schedules of the forward process: β_t and everything derived from it.

Notation, used in every module of kedavra (DDPM = Ho et al. 2020):

    t           integer training timestep 0..T-1; t = 0 is the least noisy step (x_0 is the data itself,
                one step before t = 0), t = T-1 the noisiest.
    beta        β_t, the variance added by step t:  q(x_t | x_{t-1}) = N(√(1-β_t) x_{t-1}, β_t I)  (DDPM eq. 2)
    alpha_bar   ᾱ_t = ∏_{s<=t} (1 - β_s), so that q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I)      (DDPM eq. 4)
    sigma       σ_t = √((1-ᾱ_t)/ᾱ_t), the noise level of the variance-exploding view x_t/√ᾱ_t = x_0 + σ_t ε
                (Karras et al. 2022, "EDM", sec. 2 and table 1)
    snr         SNR(t) = ᾱ_t / (1-ᾱ_t) = 1/σ_t²;  log_snr = log SNR(t) = -2 log σ_t  (λ_t in DPM-Solver)

Notation trap, said out loud: DDIM (Song et al. 2021) writes α_t for what DDPM calls ᾱ_t; kedavra always
writes `alpha_bar` for ᾱ_t and never uses a bare `alpha` for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from kedavra.validation import check_choice, check_int

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")

COSINE_OFFSET = 0.008  # s in ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), Nichol and Dhariwal 2021, eq. 17
COSINE_MAX_BETA = 0.999  # β clip of the cosine schedule, Nichol and Dhariwal 2021, sec. 3.2


@dataclass(frozen=True)
class NoiseSchedule:
    """A β schedule over `num_train_timesteps` steps, with its derived quantities as float64 tensors.

    kind: "linear" (DDPM: β linear from beta_start to beta_end), "scaled_linear" (Stable Diffusion:
    √β linear, 0.00085 to 0.012) or "cosine" (Nichol and Dhariwal 2021; beta_start/beta_end unused).
    zero_terminal_snr: rescale so that ᾱ_{T-1} = 0 exactly (Lin et al. 2023, Algorithm 1).
    """

    kind: str = "scaled_linear"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False

    def __post_init__(self):
        check_choice("noise schedule", self.kind, SCHEDULE_KINDS)
        check_int("num_train_timesteps", self.num_train_timesteps, low=2)
        if self.kind != "cosine" and not (0 < self.beta_start <= self.beta_end < 1):
            raise ValueError(
                f"betas must satisfy 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, "
                f"beta_end={self.beta_end}"
            )

    @property
    def T(self) -> int:
        return self.num_train_timesteps

    @cached_property
    def betas(self) -> torch.Tensor:
        """β_t for t = 0..T-1, float64, shape (T,)."""
        T = self.num_train_timesteps
        if self.kind == "linear":  # DDPM sec. 4: β_1 = 1e-4 to β_T = 0.02, linear
            betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float64)
        elif self.kind == "scaled_linear":  # latent diffusion's schedule: linear in √β
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float64) ** 2
        else:  # Nichol and Dhariwal 2021, eq. 17: β_t = min(1 - ᾱ(t+1)/ᾱ(t), 0.999)
            steps = torch.arange(T + 1, dtype=torch.float64) / T
            f = torch.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=COSINE_MAX_BETA)
        if self.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return betas

    @cached_property
    def alpha_bar(self) -> torch.Tensor:
        """ᾱ_t = ∏_{s<=t}(1 - β_s) (DDPM eq. 4), float64, shape (T,)."""
        return torch.cumprod(1 - self.betas, dim=0)

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """σ_t = √((1-ᾱ_t)/ᾱ_t), float64, shape (T,); +inf at a zero-terminal-SNR last step."""
        return ((1 - self.alpha_bar) / self.alpha_bar).sqrt()

    @cached_property
    def snr(self) -> torch.Tensor:
        """SNR(t) = ᾱ_t/(1-ᾱ_t) (Kingma et al. 2021, eq. 1 in our notation), float64, shape (T,)."""
        return self.alpha_bar / (1 - self.alpha_bar)

    @cached_property
    def log_snr(self) -> torch.Tensor:
        """log SNR(t), the λ_t of DPM-Solver (Lu et al. 2022); -inf at a zero-terminal-SNR last step."""
        return torch.log(self.alpha_bar) - torch.log1p(-self.alpha_bar)

    def alpha_bar_at(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at (possibly fractional) timesteps t, interpolated linearly in log σ as Stable Diffusion's
        k-diffusion and diffusers samplers do between integer steps. Returns float64 of t's shape."""
        return 1 / (1 + self.sigma_at(t) ** 2)

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """σ at (possibly fractional) timesteps t: log-linear interpolation between integer steps."""
        t = torch.as_tensor(t, dtype=torch.float64)
        check_timesteps(t, self.num_train_timesteps)
        log_sigmas = self.sigmas.log()
        low = t.floor().long().clamp(max=self.num_train_timesteps - 1)
        high = (low + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - low
        between = (1 - w) * log_sigmas[low] + w * log_sigmas[high]
        # at integer t use the table as is: 0·∞ would turn a zero-terminal-SNR σ_{T-1} = ∞ into NaN
        return torch.exp(torch.where(w == 0, log_sigmas[low], between))

    def sigma_to_t(self, sigma: torch.Tensor, alpha_bar_floor: float = 0.0) -> torch.Tensor:
        """The fractional timestep whose σ is `sigma` (inverse of `sigma_at`, interpolating in log σ).

        alpha_bar_floor: ᾱ is floored at this value first, so a zero-terminal-SNR schedule (σ_{T-1} = ∞)
        still has a finite last level to interpolate towards.
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        alpha_bar = self.alpha_bar.clamp(min=alpha_bar_floor)
        log_sigmas = ((1 - alpha_bar) / alpha_bar).sqrt().log()
        log_sigma = sigma.clamp(min=1e-10).log()
        # index of the last training step whose log σ is <= log_sigma, kept one below the end
        low = (log_sigma[..., None] >= log_sigmas).sum(-1).sub(1).clamp(0, self.num_train_timesteps - 2)
        high = low + 1
        w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
        return (1 - w) * low + w * high


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale β so the last step has SNR 0 while the first keeps its ᾱ (Lin et al. 2023, Algorithm 1).

    √ᾱ is shifted so its last value is 0 and scaled so its first value is unchanged; β is then recovered
    from the ratio of consecutive ᾱ.
    """
    sqrt_alpha_bar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])  # 1 - β_t = ᾱ_t / ᾱ_{t-1}
    return 1 - alphas


def check_timesteps(t: torch.Tensor, num_train_timesteps: int) -> None:
    """Raise ValueError unless every t is finite and lies in [0, T-1]."""
    if not torch.isfinite(t).all():
        raise ValueError(f"timesteps must be finite, got {t.flatten()[:8].tolist()}")
    if t.numel() and (t.min() < 0 or t.max() > num_train_timesteps - 1):
        raise ValueError(
            f"timesteps must lie in [0, {num_train_timesteps - 1}], got min {t.min().item()} max {t.max().item()}"
        )


SCHEDULE_PRESETS: dict[str, NoiseSchedule] = {
    "ddpm": NoiseSchedule("linear", 1000, 1e-4, 0.02),  # Ho et al. 2020, sec. 4
    "sd": NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012),  # Stable Diffusion 1.x / 2.x
    "cosine": NoiseSchedule("cosine", 1000),  # Nichol and Dhariwal 2021
    "sd-zero-snr": NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012, zero_terminal_snr=True),  # Lin et al.
}


def get_schedule(name: str) -> NoiseSchedule:
    """A named schedule preset (see SCHEDULE_PRESETS)."""
    return SCHEDULE_PRESETS[check_choice("noise schedule", name, SCHEDULE_PRESETS)]
