"""A small denoiser MLP for 2D data, and its training loop: the toy version of a U-Net and its training.

The network sees x_t and a sinusoidal embedding of t and predicts the noise ε; it is trained with DDPM's
simple loss ‖ε - ε_θ(√ᾱ_t x_0 + √(1-ᾱ_t) ε, t)‖² at uniformly drawn t (Ho et al. 2020, Algorithm 1 and eq. 14)
on fresh samples of the data each step. The best any ε-model can reach is the exact denoiser's loss
(`kedavra.toy.mixture.ExactModel` gives E[ε | x_t], the minimiser of the mean squared error), so training
reports both.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from kedavra.diffusion.forward_process import add_noise, randn_like
from kedavra.diffusion.schedule import get_schedule
from kedavra.toy.mixture import ExactModel, GaussianMixture
from kedavra.validation import check_int, check_number

SINUSOID_MAX_PERIOD = 10000.0  # the Transformer's sinusoid base (Vaswani et al. 2017, sec. 3.5), as DDPM uses
EVAL_BATCH = 8192  # samples in the fixed held-out batch the loss is measured on before and after training


@dataclass(frozen=True)
class ToyMLPConfig:
    """data_dim: D of x_t; width: hidden units; depth: hidden layers; time_dim: size of t's sinusoidal embedding."""

    data_dim: int = 2
    width: int = 128
    depth: int = 3
    time_dim: int = 32

    def __post_init__(self):
        for name in ("data_dim", "width", "depth"):
            check_int(name, getattr(self, name), low=1)
        check_int("time_dim", self.time_dim, low=2, multiple_of=2, note=" (sin and cos halves)")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = SINUSOID_MAX_PERIOD) -> torch.Tensor:
    """[sin(t f_i), cos(t f_i)] with f_i = max_period^(-i/(dim/2)), i < dim/2 (Vaswani et al. 2017, sec. 3.5;
    the timestep embedding of DDPM, Ho et al. 2020, appendix B). t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.to(torch.float32)[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, dim)


class ToyMLP(nn.Module):
    """ε_θ(x_t, t): [x_t, embedding(t)] -> (Linear, SiLU) × depth -> Linear -> ε̂ (B, D)."""

    def __init__(self, config: ToyMLPConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width_in = config.data_dim + config.time_dim
        for _ in range(config.depth):
            layers += [nn.Linear(width_in, config.width), nn.SiLU()]
            width_in = config.width
        layers.append(nn.Linear(width_in, config.data_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.config.time_dim).to(x_t.dtype)  # (B, time_dim)
        return self.net(torch.cat([x_t, emb], dim=-1))  # (B, D + time_dim) -> (B, D)


def build_toy_mlp(config: ToyMLPConfig, generator: torch.Generator, device: torch.device | str = "cpu") -> ToyMLP:
    """A ToyMLP initialised from `generator` only: weights and biases ~ U(-1/√fan_in, 1/√fan_in), PyTorch's
    nn.Linear default, drawn without touching the global random state."""
    with torch.device("meta"):
        model = ToyMLP(config)
    model = model.to_empty(device=device)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            bound = 1 / math.sqrt(module.in_features)
            for param in (module.weight, module.bias):
                values = torch.empty(param.shape).uniform_(-bound, bound, generator=generator)
                param.data.copy_(values)
    return model


@dataclass(frozen=True)
class ToyTrainConfig:
    """steps of AdamW on batches of fresh data; learning rate decays as a cosine to 0 (Loshchilov and Hutter 2017,
    "SGDR", eq. 5 without restarts). schedule: a schedule preset name. seed: the one generator's seed."""

    steps: int = 3000
    batch_size: int = 512
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    schedule: str = "ddpm"
    seed: int = 0

    def __post_init__(self):
        check_int("steps", self.steps, low=1)
        check_int("batch_size", self.batch_size, low=1)
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            raise ValueError(f"learning_rate must be a number in (0, 1), got {self.learning_rate!r}")
        check_number("weight_decay", self.weight_decay, low=0)
        check_int("seed", self.seed, low=0)
        get_schedule(self.schedule)


@dataclass
class TrainResult:
    """The trained model, the loss of every step, the wall time, and the loss on a fixed held-out batch before
    training, after it, and for the exact denoiser (the lowest any ε-model can reach, in expectation)."""

    model: ToyMLP
    losses: list[float] = field(repr=False)
    seconds: float
    eval_loss_start: float
    eval_loss_end: float
    eval_loss_exact: float


def draw_batch(mixture: GaussianMixture, schedule, batch_size: int, generator: torch.Generator):
    """(x_t, t, ε) for a batch of fresh data at uniform integer timesteps (Ho et al. 2020, Algorithm 1)."""
    x0 = mixture.sample(batch_size, generator)
    t = torch.randint(0, schedule.num_train_timesteps, (batch_size,), generator=generator)
    eps = randn_like(x0, generator)
    x_t = add_noise(x0, eps, schedule.alpha_bar[t].to(torch.float32))  # DDPM eq. 4
    return x_t, t.to(torch.float32), eps


def train_toy_mlp(
    mixture: GaussianMixture,
    config: ToyTrainConfig = ToyTrainConfig(),
    model_config: ToyMLPConfig = ToyMLPConfig(),
    progress: bool = False,
) -> TrainResult:
    """Train a ToyMLP on samples of `mixture` to predict ε (DDPM's simple loss, Ho et al. 2020, eq. 14), on the
    CPU, every random draw (init, data, t, noise) from one generator seeded with config.seed."""
    schedule = get_schedule(config.schedule)
    generator = torch.Generator().manual_seed(config.seed)
    model = build_toy_mlp(model_config, generator)
    held_out = draw_batch(mixture, schedule, EVAL_BATCH, torch.Generator().manual_seed(config.seed + 1))
    exact = ExactModel(mixture, schedule, "eps")
    eval_loss_exact = _mse(exact(held_out[0], held_out[1]), held_out[2])
    eval_loss_start = evaluate(model, held_out)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    losses = []
    start = time.perf_counter()
    for step in tqdm(range(config.steps), desc="training", disable=not progress, unit="step"):
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        x_t, t, eps = draw_batch(mixture, schedule, config.batch_size, generator)
        loss = torch.nn.functional.mse_loss(model(x_t, t), eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    model.eval()
    return TrainResult(model, losses, seconds, eval_loss_start, evaluate(model, held_out), eval_loss_exact)


@torch.no_grad()
def evaluate(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
    """The mean squared ε error of `model` on a batch (x_t, t, ε)."""
    x_t, t, eps = batch
    return _mse(model(x_t, t), eps)


def _mse(prediction: torch.Tensor, target: torch.Tensor) -> float:
    return (prediction.to(torch.float64) - target.to(torch.float64)).pow(2).mean().item()
