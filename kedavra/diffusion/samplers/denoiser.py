"""The bridge between a network `model(x_t, t)` and the samplers: every sampler asks for x̂_0.

A model is any callable taking x_t (B, ...) in the variance-preserving parameterisation of training,
x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, and t, a float tensor (B,) of training-schedule timesteps (fractional
between integer steps for Karras σ), and returning an ε-, v- or x_0-prediction. A U-Net, a small MLP and
an analytic Gaussian-mixture denoiser all go through the same `Denoiser`.

Samplers work in one of two views of the same state:
    VP  x_t, as in training (DDPM, DDIM, DPM-Solver++, UniPC follow their papers in this view);
    VE  x = x_t / √ᾱ_t = x_0 + σ ε, the "variance exploding" view of Karras et al. 2022 (sec. 2), in which
        Euler, Euler ancestral and Heun are written; there the model's input is x/√(σ²+1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kedavra.diffusion.forward_process import check_finite, check_prediction_type, to_x0_eps

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Denoiser:
    """Wraps `model(x_t, t)` of the given prediction type ("eps", "v" or "x0")."""

    def __init__(self, model: Model, prediction_type: str = "eps"):
        self.model = model
        self.prediction_type = check_prediction_type(prediction_type)
        self.evaluations = 0  # how many times the model ran: the cost measure of a sampler

    def _run(self, x_t: torch.Tensor, t: float) -> torch.Tensor:
        t_batch = torch.full((x_t.shape[0],), float(t), dtype=torch.float32, device=x_t.device)
        self.evaluations += 1
        output = self.model(x_t, t_batch)
        if output.shape != x_t.shape:
            raise ValueError(f"the model returned shape {tuple(output.shape)} for input {tuple(x_t.shape)}; "
                             "it must return a prediction of the input's shape")
        check_finite(output, f"the model's output at t={t:.4g}")
        return output

    def vp(self, x_t: torch.Tensor, t: float, alpha_bar: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂) at x_t, timestep t with ᾱ_t = alpha_bar, in the VP view."""
        return to_x0_eps(self._run(x_t, t), x_t, alpha_bar, self.prediction_type)

    def ve(self, x: torch.Tensor, t: float, sigma: float) -> torch.Tensor:
        """x̂_0 at the VE state x = x_0 + σ ε, timestep t (Karras et al. 2022, eq. 7's D(x; σ))."""
        scale = (sigma**2 + 1) ** 0.5  # x_t = x / √(σ²+1), since √ᾱ = 1/√(σ²+1)
        output = self._run(x / scale, t)
        if self.prediction_type == "eps":
            return x - sigma * output  # x_0 = x - σ ε
        if self.prediction_type == "v":
            return x / scale**2 - (sigma / scale) * output  # x_0 = √ᾱ x_t - √(1-ᾱ) v, with x_t = x/√(σ²+1)
        return output


def after_step(callback: Callable | None, i: int, n: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Report step i of n to `callback(i, n, x, x0_hat)`; a tensor it returns replaces x (inpainting puts
    the known region back this way); anything else (None, or a progress bar's True) leaves x as it is."""
    if callback is None:
        return x
    replacement = callback(i, n, x, x0)
    return replacement if isinstance(replacement, torch.Tensor) else x
