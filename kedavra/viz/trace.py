"""What a real text-to-image generation did, step by step: the figures' raw material.

`trace_generation` runs the ordinary pipeline (`Pipeline.generate`) and keeps the `StepRecord` its sampler reports
after every step (kedavra/diffusion/samplers/denoiser.py): the step's timestep t, ᾱ_t, the variance-preserving latent
the U-Net saw, x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (DDPM eq. 4), whatever view the sampler keeps its state in, the sampler's
x̂_0, and the U-Net's conditional and unconditional outputs there, which the pipeline fills in. Nothing it computes
is changed or computed again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from kedavra.diffusion.forward_process import to_x0_eps
from kedavra.diffusion.guidance import classifier_free_guidance
from kedavra.diffusion.samplers import StepRecord
from kedavra.pipeline.pipeline import Pipeline
from kedavra.pipeline.request import DEFAULT_GUIDANCE_SCALE, DEFAULT_SAMPLER, DEFAULT_STEPS, GenerationRequest

DEFAULT_SEED = 0  # figures are reproducible by default


@dataclass(frozen=True)
class TracedStep:
    """One sampler step: latents are float32 (C, h, w) on the CPU."""

    index: int  # 0-based step number
    t: float  # training timestep the U-Net was evaluated at (fractional between integer steps for Karras σ)
    alpha_bar: float  # ᾱ of x_t
    x_t: torch.Tensor  # the U-Net's input latent (VP view)
    x0: torch.Tensor  # the sampler's predicted x̂_0
    cond: torch.Tensor  # the U-Net's output for the prompt (ε or v, per the model's prediction type)
    uncond: torch.Tensor | None  # its output for the negative prompt; None when guidance is off (w = 1)


@dataclass(frozen=True)
class GenerationTrace:
    """A whole run: its settings, every step, the final latents (C, h, w) and the image."""

    prompt: str
    negative_prompt: str
    seed: int
    sampler: str
    guidance_scale: float
    prediction_type: str
    steps: tuple[TracedStep, ...]
    latents: torch.Tensor
    image: Image.Image

    def guided(self, step: TracedStep) -> torch.Tensor:
        """The guided prediction the sampler used at `step` (kedavra.diffusion.guidance)."""
        if step.uncond is None:
            return step.cond
        return classifier_free_guidance(step.cond, step.uncond, self.guidance_scale)

    def to_x0(self, step: TracedStep, output: torch.Tensor) -> torch.Tensor:
        """x̂_0 implied by a network output (ε or v) at `step`'s x_t and ᾱ_t (DDPM eq. 15; Salimans & Ho 2022)."""
        return to_x0_eps(output, step.x_t, step.alpha_bar, self.prediction_type)[0]


def figure_request(prompt: str, negative_prompt: str = "", *, steps: int = DEFAULT_STEPS,
                   sampler: str = DEFAULT_SAMPLER, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                   seed: int = DEFAULT_SEED, width: int | None = None, height: int | None = None) -> GenerationRequest:
    """The one-image request a figure traces, with the figures' defaults (a fixed seed, so figures reproduce)."""
    return GenerationRequest.build(prompt, negative_prompt, steps=steps, sampler=sampler,
                                   guidance_scale=guidance_scale, seed=seed, width=width, height=height)


def trace_generation(pipe: Pipeline, request: GenerationRequest,
                     on_step: Callable[[int, int], None] | None = None) -> GenerationTrace:
    """Generate the one image of `request` with `pipe` (its device and precision) and record every step.

    The image is the one `pipe.generate(request)` gives. on_step(i, n) is called after step i of n (progress bars,
    the attention recorder)."""
    if request.num_images != 1:
        raise ValueError(f"a figure traces one image; the request asks for {request.num_images}")
    traced: list[TracedStep] = []

    def keep(step: StepRecord) -> None:
        traced.append(TracedStep(step.index, step.t, step.alpha_bar, _first(step.x_t), _first(step.x0),
                                 _first(step.cond), None if step.uncond is None else _first(step.uncond)))
        if on_step is not None:
            on_step(step.index, step.count)

    result = pipe.generate(request, callback=keep)
    return GenerationTrace(request.prompts[0], request.negative_prompts[0], result.seeds[0], request.sampler,
                           request.guidance_scale, pipe.config.prediction_type, tuple(traced),
                           _first(result.latents), result.images[0])


def _first(batch: torch.Tensor) -> torch.Tensor:
    """The first sample of a batch (1, C, h, w) as a float32 (C, h, w) on the CPU."""
    return batch[0].detach().float().cpu()


def decode(pipe: Pipeline, latents: torch.Tensor) -> torch.Tensor:
    """Latents (C, h, w) -> an image (3, H, W) in [-1, 1], float32 on the CPU, through the pipeline's VAE."""
    return pipe.decode(latents[None].to(pipe.device))[0].float().cpu()
