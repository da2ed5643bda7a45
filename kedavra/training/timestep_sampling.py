"""Which timesteps the unet stage trains on: t ~ p(t) over [low, high) of the model's T training timesteps.

    uniform       t ~ U{low .. high - 1}: DDPM (Ho et al. 2020, Algorithm 1), every SD training run
    logit-normal  t = low + ⌊u (high - low)⌋, u = sigmoid(n), n ~ N(m, s²) (Esser et al. 2024, "Scaling
                  Rectified Flow Transformers", sec. 3.1, eq. 19: π_ln(t; m, s)); m > 0 draws the high-noise
                  steps more often, s sets how widely
    mode          t = low + ⌊f(u) (high - low)⌋, u ~ U(0, 1), f(u) = 1 - u - c (cos²(πu/2) - 1 + u) (ibid., eq. 20,
                  "mode sampling with heavy tails"); c > 0 favours the middle, c < 0 the ends

diffusers' training scripts call the same densities `weighting_scheme` logit_normal / mode with `logit_mean`,
`logit_std` and `mode_scale` (their defaults 0, 1 and 1.29), and turn u into an index by ⌊u T⌋ as here. The
weighting of the loss (min-SNR-γ, kedavra.training.losses) applies on top: sampling t from p(t) instead of
uniformly weighs the expected loss by T·p(t).

`low` and `high` come from TrainConfig.min_timestep / max_timestep (kohya sd-scripts' --min_timestep /
--max_timestep), checked here against the model's T.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kedavra.training.config import TrainConfig


def timestep_range(config: TrainConfig, num_train_timesteps: int) -> tuple[int, int]:
    """(low, high): the unet stage draws t from [low, high); all of [0, T) unless the config narrows it
    (min_timestep / max_timestep, checked here against the model's T)."""
    high = num_train_timesteps if config.max_timestep is None else config.max_timestep
    if high > num_train_timesteps or config.min_timestep >= num_train_timesteps:
        raise ValueError(f"min_timestep={config.min_timestep} / max_timestep={config.max_timestep} (--min-timestep / "
                         f"--max-timestep) must lie in [0, {num_train_timesteps}]: the model's schedule has "
                         f"{num_train_timesteps} training timesteps")
    return config.min_timestep, high


def sample_timesteps(config: TrainConfig, low: int, high: int, batch: int, generator: torch.Generator) -> Tensor:
    """(batch,) int64 timesteps in [low, high) drawn from the config's `timestep_sampling` density."""
    if config.timestep_sampling == "uniform":
        return torch.randint(low, high, (batch,), generator=generator)
    if config.timestep_sampling == "logit-normal":
        n = torch.randn(batch, generator=generator, dtype=torch.float64)
        u = torch.sigmoid(config.logit_mean + config.logit_std * n)  # Esser et al. 2024, eq. 19
    else:  # "mode"
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
        u = 1 - u - config.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)  # ibid., eq. 20
    index = (u * (high - low)).floor().long()  # u in [0, 1]; u = 1 (sigmoid's rounding) would give high
    return low + index.clamp(0, high - low - 1)
