"""The forward (noising) process and the three ways a network can predict the clean signal.

One step   q(x_t | x_{t-1}) = N(√(1-β_t) x_{t-1}, β_t I)                    (DDPM eq. 2)
Closed form q(x_t | x_0)   = N(√ᾱ_t x_0, (1-ᾱ_t) I),  x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε   (DDPM eq. 4)

A denoiser network sees x_t and t and predicts one of
    eps  the noise ε that was added                                             (DDPM eq. 11)
    x0   the clean sample x_0
    v    v = √ᾱ_t ε - √(1-ᾱ_t) x_0                       (Salimans and Ho 2022, "progressive distillation", eq. 6)
and any one of them with x_t gives the other two (the functions below). `alpha_bar` may be a float or a
tensor broadcastable to x (e.g. (B, 1, 1, 1)).
"""

from __future__ import annotations

import torch

from kedavra.diffusion.schedule import NoiseSchedule

PREDICTION_TYPES = ("eps", "v", "x0")
# The names diffusers' configs use for the same prediction types.
DIFFUSERS_PREDICTION_NAMES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def check_prediction_type(prediction_type: str) -> str:
    """Normalise a prediction type name (ours or diffusers') or raise ValueError naming what is allowed."""
    name = DIFFUSERS_PREDICTION_NAMES.get(prediction_type, prediction_type)
    if name not in PREDICTION_TYPES:
        allowed = ", ".join(PREDICTION_TYPES + tuple(DIFFUSERS_PREDICTION_NAMES))
        raise ValueError(f"unknown prediction type {prediction_type!r}; allowed: {allowed}")
    return name


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ValueError if x holds NaN or ±inf, naming the tensor and how many values are bad."""
    bad = ~torch.isfinite(x)
    if bad.any():
        raise ValueError(f"{name} must be finite, but {int(bad.sum())} of {x.numel()} values are NaN or inf")


def _expand(value: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient (float, (B,) or broadcastable) shaped to multiply x of shape (B, ...)."""
    value = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if value.ndim == 1 and x.ndim > 1:
        value = value.reshape(-1, *([1] * (x.ndim - 1)))  # (B,) -> (B, 1, ..., 1)
    return value


def q_step(x_prev: torch.Tensor, beta: torch.Tensor | float, generator: torch.Generator | None = None):
    """One forward step: sample x_t ~ q(x_t | x_{t-1}) = N(√(1-β_t) x_{t-1}, β_t I) (DDPM eq. 2)."""
    beta = _expand(beta, x_prev)
    noise = randn_like(x_prev, generator)
    return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """The closed form x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (DDPM eq. 4, reparameterised)."""
    alpha_bar = _expand(alpha_bar, x0)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps


def q_sample(
    schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample x_t ~ q(x_t | x_0) at integer timesteps t of shape (B,); returns (x_t, ε)."""
    t = torch.as_tensor(t)
    if t.dtype.is_floating_point or t.min() < 0 or t.max() >= schedule.num_train_timesteps:
        raise ValueError(f"t must be integer timesteps in [0, {schedule.num_train_timesteps - 1}], got {t}")
    eps = randn_like(x0, generator)
    alpha_bar = schedule.alpha_bar.to(x0.device)[t.to(x0.device)]
    return add_noise(x0, eps, alpha_bar), eps


def x0_from_eps(x_t, eps, alpha_bar):
    """x_0 = (x_t - √(1-ᾱ) ε) / √ᾱ  (DDPM eq. 4 solved for x_0; DDIM eq. 9's "predicted x_0")."""
    alpha_bar = _expand(alpha_bar, x_t)
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def eps_from_x0(x_t, x0, alpha_bar):
    """ε = (x_t - √ᾱ x_0) / √(1-ᾱ)  (DDPM eq. 4 solved for ε)."""
    alpha_bar = _expand(alpha_bar, x_t)
    return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def x0_from_v(x_t, v, alpha_bar):
    """x_0 = √ᾱ x_t - √(1-ᾱ) v  (Salimans and Ho 2022, sec. 4)."""
    alpha_bar = _expand(alpha_bar, x_t)
    return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * v


def eps_from_v(x_t, v, alpha_bar):
    """ε = √(1-ᾱ) x_t + √ᾱ v  (Salimans and Ho 2022, sec. 4)."""
    alpha_bar = _expand(alpha_bar, x_t)
    return (1 - alpha_bar).sqrt() * x_t + alpha_bar.sqrt() * v


def v_from_eps_x0(eps, x0, alpha_bar):
    """v = √ᾱ ε - √(1-ᾱ) x_0  (Salimans and Ho 2022, eq. 6): the training target of a v model."""
    alpha_bar = _expand(alpha_bar, eps)
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0


def to_x0_eps(output: torch.Tensor, x_t: torch.Tensor, alpha_bar, prediction_type: str):
    """(x̂_0, ε̂) from a network's output of the given prediction type at x_t with ᾱ_t."""
    if prediction_type == "eps":
        return x0_from_eps(x_t, output, alpha_bar), output
    if prediction_type == "v":
        return x0_from_v(x_t, output, alpha_bar), eps_from_v(x_t, output, alpha_bar)
    if prediction_type == "x0":
        return output, eps_from_x0(x_t, output, alpha_bar)
    raise ValueError(f"unknown prediction type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")


def training_target(eps: torch.Tensor, x0: torch.Tensor, alpha_bar, prediction_type: str) -> torch.Tensor:
    """What a network of the given prediction type should output for (x_0, ε) at ᾱ_t."""
    if prediction_type == "eps":
        return eps
    if prediction_type == "v":
        return v_from_eps_x0(eps, x0, alpha_bar)
    if prediction_type == "x0":
        return x0
    raise ValueError(f"unknown prediction type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")


def randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (so a seed gives the same
    numbers on CPU and GPU when the generator is a CPU one), then moved to x's device.

    `generator` may be a list with one generator per batch row: row i is then drawn from generator i
    alone, so a batch gives the same rows as separate runs seeded alike.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}; give one per row")
        return torch.cat([randn_like(x[i : i + 1], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
