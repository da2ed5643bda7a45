"""The bridge between a network `model(x_t, t)` and the samplers: every sampler asks for x̂_0.

A model is any callable taking x_t (B, ...) in the variance-preserving parameterisation of training,
x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, and t, a float tensor (B,) of training-schedule timesteps (fractional
between integer steps for Karras σ), and returning an ε-, v- or x_0-prediction. A U-Net, a small MLP and
an analytic Gaussian-mixture denoiser all go through the same `Denoiser`. A model that folds classifier-free
guidance in may also give `model.with_uncond(x_t, t) -> (guided, unconditional)`, both predictions of one
evaluation (the pipeline's GuidedUNet does): the CFG++ samplers (cfg_pp.py) need the unconditional one.

Samplers work in one of two views of the same state:
    VP  x_t, as in training (DDPM, DDIM, DPM-Solver++, UniPC follow their papers in this view);
    VE  x = x_t / √ᾱ_t = x_0 + σ ε, the "variance exploding" view of Karras et al. 2022 (sec. 2), in which
        Euler, Euler ancestral and Heun are written; there the model's input is x/√(σ²+1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from kedavra.diffusion.forward_process import check_finite, check_prediction_type, to_x0_eps

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepRecord:
    """What a sampler reports after step `index` of `count`: the level it evaluated the model at and what it
    predicted there. Tensors are the sampler's own (B, ...) tensors, not copies: read them, don't modify them.

    t, alpha_bar, x_t   the timestep, ᾱ_t and the model's input x_t at the step's own level, in the VP view of
                        training, x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (DDPM eq. 4), whatever view the sampler keeps its
                        state in (Heun's second evaluation, at the next level, is not this one)
    x0                  the sampler's x̂_0 at that level
    x                   the state after the step, in the sampler's view (VP or VE): what the next step starts from
    cond, uncond        the model's conditional and unconditional outputs at x_t when it applies classifier-free
                        guidance and its caller fills them in (the pipeline does; None otherwise)
    """

    index: int
    count: int
    t: float
    alpha_bar: float
    x_t: torch.Tensor
    x0: torch.Tensor
    x: torch.Tensor
    cond: torch.Tensor | None = None
    uncond: torch.Tensor | None = None


StepCallback = Callable[[StepRecord], object]


class Denoiser:
    """Wraps `model(x_t, t)` of the given prediction type ("eps", "v" or "x0")."""

    def __init__(self, model: Model, prediction_type: str = "eps"):
        self.model = model
        self.prediction_type = check_prediction_type(prediction_type)
        self.evaluations = 0  # how many times the model ran: the cost measure of a sampler
        self._step_level: tuple[float, float, torch.Tensor] | None = None  # (t, ᾱ, x_t) of the step's first evaluation

    def _run(self, x_t: torch.Tensor, t: float, alpha_bar: float, with_uncond: bool = False):
        """The model's output at x_t, or with `with_uncond` its (guided, unconditional) outputs."""
        if self._step_level is None:
            self._step_level = (float(t), float(alpha_bar), x_t)
        t_batch = torch.full((x_t.shape[0],), float(t), dtype=torch.float32, device=x_t.device)
        self.evaluations += 1
        outputs = self.model.with_uncond(x_t, t_batch) if with_uncond else (self.model(x_t, t_batch),)
        for output in outputs:
            if output.shape != x_t.shape:
                raise ValueError(f"the model returned shape {tuple(output.shape)} for input {tuple(x_t.shape)}; "
                                 "it must return a prediction of the input's shape")
            check_finite(output, f"the model's output at t={t:.4g}")
        return tuple(outputs) if with_uncond else outputs[0]

    def vp(self, x_t: torch.Tensor, t: float, alpha_bar: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂) at x_t, timestep t with ᾱ_t = alpha_bar, in the VP view."""
        return to_x0_eps(self._run(x_t, t, alpha_bar), x_t, alpha_bar, self.prediction_type)

    def ve(self, x: torch.Tensor, t: float, sigma: float) -> torch.Tensor:
        """x̂_0 at the VE state x = x_0 + σ ε, timestep t (Karras et al. 2022, eq. 7's D(x; σ))."""
        scale = (sigma**2 + 1) ** 0.5  # x_t = x / √(σ²+1), since √ᾱ = 1/√(σ²+1)
        return self._ve_x0(self._run(x / scale, t, 1 / scale**2), x, sigma)

    def ve_with_uncond(self, x: torch.Tensor, t: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0 guided, x̂_0 unconditional) at the VE state x, from one evaluation of a model that gives
        `with_uncond` (module docstring); ValueError for a model that does not."""
        self.require_uncond()
        scale = (sigma**2 + 1) ** 0.5
        guided, uncond = self._run(x / scale, t, 1 / scale**2, with_uncond=True)
        return self._ve_x0(guided, x, sigma), self._ve_x0(uncond, x, sigma)

    def _ve_x0(self, output: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """x̂_0 from the model's output at the VE state x = x_0 + σ ε (its input x/√(σ²+1))."""
        scale = (sigma**2 + 1) ** 0.5
        if self.prediction_type == "eps":
            return x - sigma * output  # x_0 = x - σ ε
        if self.prediction_type == "v":
            return x / scale**2 - (sigma / scale) * output  # x_0 = √ᾱ x_t - √(1-ᾱ) v, with x_t = x/√(σ²+1)
        return output

    def require_uncond(self, sampler: str = "a CFG++ sampler") -> None:
        """ValueError naming `sampler` unless the model gives classifier-free guidance's unconditional prediction."""
        if not callable(getattr(self.model, "with_uncond", None)):
            model = getattr(self.model, "__qualname__", type(self.model).__name__)  # a function's name, else its class
            raise ValueError(f"{sampler} needs classifier-free guidance's unconditional prediction (CFG++, Chung et "
                             f"al. 2024: it renoises along it), which this model ({model}) does not give: drive it "
                             "with a guided model that has with_uncond(x_t, t), as the pipeline's GuidedUNet, or "
                             "pick a sampler without CFG++")

    def after_step(self, callback: StepCallback | None, i: int, n: int, x: torch.Tensor,
                   x0: torch.Tensor) -> torch.Tensor:
        """Report step i of n, whose new state is x and whose x̂_0 is x0, to `callback(StepRecord)`; a tensor it
        returns replaces x (inpainting puts the known region back this way); anything else (None, or a progress
        bar's True) leaves x as it is. Samplers call this once at the end of every step."""
        t, alpha_bar, x_t = self._step_level
        self._step_level = None
        if callback is None:
            return x
        replacement = callback(StepRecord(i, n, t, alpha_bar, x_t, x0, x))
        return replacement if isinstance(replacement, torch.Tensor) else x


def with_state(step: StepRecord, x: torch.Tensor) -> StepRecord:
    """`step` with its state after the step replaced by x (a step callback that changed it passes this on)."""
    return replace(step, x=x)
