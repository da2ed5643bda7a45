"""Noise levels chosen for a model: few-step schedules optimised on its own sampling trajectories.

At 5-10 model evaluations where a sampler puts its steps matters as much as its order. Following GITS (Chen et al.
2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling", ICML, sec. 4), the schedule is picked by
dynamic programming against a teacher:

1. a fine grid of M + 1 levels σ_0 > ... > σ_M, uniform in log σ (log-SNR) between the table's σ_max and σ_min,
   then σ = 0;
2. the teacher: the probability-flow ODE (Karras et al. 2022, eq. 4, in the VE view x = x_0 + σ ε) solved along
   that grid with Heun's method from a batch of noise, keeping each state x_i and the model's x̂_0 there, D_i;
3. the cost of a coarse step from grid level i to j: how far one Euler (DDIM) step lands from the teacher's state,
       c(i, j) = mean_b ‖x_i + (σ_j - σ_i)(x_i - D_i)/σ_i - x_j‖
   which needs no model evaluation beyond the teacher's;
4. the n-step schedule: the path 0 = i_0 < i_1 < ... < i_n = M + 1 (the last step lands on σ = 0) minimising the sum
   of its steps' costs, found by dynamic programming in O(n M²).

The schedule's n levels σ_{i_0..i_{n-1}} then drive any sampler (`sample(..., sigmas=...)`); GITS reports that a
schedule from first-order costs serves higher-order solvers too. docs/samplers.md ("Few steps") measures it here:
on the two clusters' exact denoiser it cuts UniPC's error at 10 evaluations 3.2x against Karras σ's, while on the
embedded model it lowers prompt adherence (the L2-cheapest schedule ends its last step on a blurred x̂_0), where
the plain log-uniform levels (`log_uniform_sigmas`) help at 10 steps.
"""

from __future__ import annotations

import math

import torch

from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.schedule import NoiseSchedule
from kedavra.diffusion.timesteps import ZERO_SNR_ALPHA_BAR_FLOOR
from kedavra.validation import check_int

DEFAULT_GRID = 200  # fine-grid levels of the teacher (GITS uses a few hundred)


def table_sigma_range(schedule: NoiseSchedule) -> tuple[float, float]:
    """(σ_min, σ_max): σ(t=0) and σ(T-1) of the schedule, ᾱ floored as the σ-space samplers floor it."""
    alpha_bar = schedule.alpha_bar[[0, -1]].clamp(min=ZERO_SNR_ALPHA_BAR_FLOOR)
    sigma_min, sigma_max = ((1 - alpha_bar) / alpha_bar).sqrt().tolist()
    return sigma_min, sigma_max


def log_uniform_sigmas(sigma_min: float, sigma_max: float, n: int) -> torch.Tensor:
    """n levels from σ_max down to σ_min, uniform in log σ (equivalently in log-SNR λ = -log σ: the step spacing
    DPM-Solver recommends for few steps, Lu et al. 2022, sec. 3.3), float64."""
    check_int("n", n, 1)
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def teacher_trajectory(denoiser: Denoiser, noise: torch.Tensor, grid: torch.Tensor, t_of_sigma) -> tuple:
    """Heun along `grid` (levels, then 0) from x = √(σ_0²+1)·noise (the VE view of x_T = noise): (states (M+1, B,
    ...) at each level and at 0, x̂_0 (M, B, ...) at each level). t_of_sigma maps a σ to the model's timestep."""
    x = noise.double() * math.sqrt(grid[0].item() ** 2 + 1)
    states, denoised = [x], []
    for i in range(len(grid) - 1):
        sigma, sigma_next = grid[i].item(), grid[i + 1].item()
        d0 = denoiser.ve(x, t_of_sigma(sigma), sigma)
        slope = (x - d0) / sigma
        x_euler = x + (sigma_next - sigma) * slope
        if sigma_next > 0:  # Heun's correction (Karras et al. 2022, Alg. 1)
            slope_next = (x_euler - denoiser.ve(x_euler, t_of_sigma(sigma_next), sigma_next)) / sigma_next
            x = x + (sigma_next - sigma) * (slope + slope_next) / 2
        else:
            x = x_euler
        states.append(x)
        denoised.append(d0)
    return torch.stack(states), torch.stack(denoised)


def step_costs(states: torch.Tensor, denoised: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """c (M+1, M+1): c[i, j] for i < j the mean distance of one Euler step i -> j from the teacher's x_j (module
    docstring, step 3); inf elsewhere."""
    size = len(grid)
    costs = torch.full((size, size), math.inf, dtype=torch.float64)
    flat = states.flatten(2)  # (M+1, B, D)
    for i in range(size - 1):
        slope = (flat[i] - denoised[i].flatten(1)) / grid[i]  # (B, D)
        steps = grid[i + 1:] - grid[i]  # (M-i,)
        predicted = flat[i] + steps[:, None, None] * slope  # (M-i, B, D)
        costs[i, i + 1:] = (predicted - flat[i + 1:]).norm(dim=2).mean(dim=1)
    return costs


def cheapest_path(costs: torch.Tensor, steps: int) -> list[int]:
    """The `steps`-step path 0 -> len(costs)-1 with the least total cost (dynamic programming): its grid indices."""
    size = len(costs)
    check_int("steps", steps, 1, size - 1)
    best = torch.full((steps + 1, size), math.inf, dtype=torch.float64)
    previous = torch.zeros((steps + 1, size), dtype=torch.long)
    best[0, 0] = 0
    for k in range(1, steps + 1):
        totals = best[k - 1][:, None] + costs  # (from, to)
        best[k], previous[k] = totals.min(dim=0)
    path = [size - 1]
    for k in range(steps, 0, -1):
        path.append(int(previous[k, path[-1]]))
    return path[::-1]


def optimise_sigmas(model, noise: torch.Tensor, schedule: NoiseSchedule, steps: int, prediction_type: str = "eps",
                    grid_size: int = DEFAULT_GRID) -> torch.Tensor:
    """The `steps` noise levels (descending, float64, the first σ_max) of the GITS schedule of `model(x_t, t)` on a
    batch of `noise` (module docstring). Costs 2·grid_size - 1 evaluations of the model on the batch."""
    check_int("grid_size", grid_size, 2)
    check_int("steps", steps, 1, grid_size)
    sigma_min, sigma_max = table_sigma_range(schedule)
    grid = torch.cat([log_uniform_sigmas(sigma_min, sigma_max, grid_size), torch.zeros(1, dtype=torch.float64)])
    denoiser = model if isinstance(model, Denoiser) else Denoiser(model, prediction_type)

    def t_of_sigma(sigma: float) -> float:
        return schedule.sigma_to_t(torch.tensor([sigma], dtype=torch.float64),
                                   alpha_bar_floor=ZERO_SNR_ALPHA_BAR_FLOOR).item()

    with torch.no_grad():
        states, denoised = teacher_trajectory(denoiser, noise, grid, t_of_sigma)
    path = cheapest_path(step_costs(states, denoised, grid), steps)
    return grid[path[:-1]]
