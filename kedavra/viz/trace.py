"""What a real text-to-image generation did, step by step: the figures' raw material.

`trace_generation` runs the ordinary `Pipeline.__call__` and watches it through two public doors, changing
nothing it computes:
    a forward hook on the U-Net     the latent x_t it saw (the first evaluation of each step; Heun makes a
                                    second) and its output for both halves of the guidance batch, which the
                                    pipeline stacks unconditional first (kedavra/pipeline/pipeline.py, _guided_unet);
    the step callback               the sampler's x̂_0 of the step (kedavra/diffusion/samplers/denoiser.py, after_step).
x_t is the variance-preserving latent the network sees, x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (DDPM eq. 4), whatever
view the sampler keeps its state in; ᾱ_t of step i comes from the same `make_plan` the sampler runs.
Classifier-free guidance (Ho and Salimans 2022, eq. 6): guided = uncond + w (cond - uncond), w = guidance_scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from kedavra.diffusion.forward_process import to_x0_eps
from kedavra.diffusion.samplers import resolve_sampler
from kedavra.diffusion.timesteps import make_plan
from kedavra.pipeline.pipeline import Pipeline

DEFAULT_STEPS = 20
DEFAULT_SAMPLER = "euler"  # the plainest update, one U-Net evaluation per step (Karras et al. 2022, Alg. 2)
DEFAULT_GUIDANCE_SCALE = 7.5  # diffusers' StableDiffusionPipeline default
DEFAULT_SEED = 0  # figures are reproducible by default


@dataclass(frozen=True)
class TracedStep:
    """One sampler step: latents are float32 (C, h, w) on the CPU."""

    index: int  # 0-based step number
    t: float  # training timestep the U-Net was evaluated at
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
        """The guided prediction the sampler used at `step`: uncond + w (cond - uncond)."""
        if step.uncond is None:
            return step.cond
        return step.uncond + self.guidance_scale * (step.cond - step.uncond)  # Ho and Salimans 2022, eq. 6

    def to_x0(self, step: TracedStep, output: torch.Tensor) -> torch.Tensor:
        """x̂_0 implied by a network output (ε or v) at `step`'s x_t and ᾱ_t (DDPM eq. 15; Salimans & Ho 2022)."""
        return to_x0_eps(output, step.x_t, step.alpha_bar, self.prediction_type)[0]


def check_generation(pipe: Pipeline, steps: int, sampler: str, guidance_scale: float, seed: int,
                     width: int | None, height: int | None) -> tuple[int, int]:
    """(width, height), None meaning the model's image size, after `Pipeline.check_request` has accepted the
    settings of a one-image run (ValueError naming a bad one)."""
    width = pipe.config.image_size if width is None else width
    height = pipe.config.image_size if height is None else height
    pipe.check_request(width, height, steps, guidance_scale, 1, seed, sampler)
    return width, height


def step_levels(pipe: Pipeline, steps: int, sampler: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (n,), ᾱ (n,)) of the levels an n-step text-to-image run of `sampler` evaluates the U-Net at.

    The VE samplers (Euler, Heun) feed the U-Net x/√(σ²+1) with σ from the plan, so their ᾱ is 1/(1+σ²)
    (equal to the plan's ᾱ except where a zero-terminal-SNR start floors it)."""
    spec, karras = resolve_sampler(sampler)
    config = pipe.config
    plan = make_plan(config.schedule, steps, config.spacing, config.steps_offset, karras)
    alpha_bar = 1 / (1 + plan.sigmas[:-1] ** 2) if spec.view == "ve" else plan.alpha_bar[:-1]
    return plan.timesteps, alpha_bar


def trace_generation(
    pipe: Pipeline,
    prompt: str,
    negative_prompt: str = "",
    *,
    steps: int = DEFAULT_STEPS,
    sampler: str = DEFAULT_SAMPLER,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    seed: int = DEFAULT_SEED,
    width: int | None = None,
    height: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> GenerationTrace:
    """Generate one image for `prompt` with `pipe` (its device and precision) and record every step.

    The image is the one `pipe(prompt, ..., seed=seed)` gives: the noise comes from a CPU generator seeded
    with `seed`. on_step(i, n) is called after step i of n (progress bars, the attention recorder)."""
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise ValueError(f"prompt and negative_prompt must be str, got {prompt!r} and {negative_prompt!r}")
    width, height = check_generation(pipe, steps, sampler, guidance_scale, seed, width, height)
    timesteps, alpha_bar = step_levels(pipe, steps, sampler)
    channels = pipe.config.vae.latent_channels
    evaluations: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (x_in, t, output) since last step
    traced: list[TracedStep] = []

    def watch_unet(module, args, output) -> None:
        x_in, t = args[0], args[1]
        evaluations.append((x_in[:1, :channels].detach().float().cpu(), t[:1].detach().float().cpu(),
                            output.detach().float().cpu()))

    def after_step(i: int, n: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        x_t, t, output = evaluations[0]  # the evaluation at this step's own level
        evaluations.clear()
        uncond, cond = output.chunk(2) if guidance_scale != 1.0 else (None, output)  # pipeline: unconditional first
        traced.append(TracedStep(i, float(t[0]), float(alpha_bar[i]), x_t[0], x0[0].detach().float().cpu(),
                                 cond[0], None if uncond is None else uncond[0]))
        if on_step is not None:
            on_step(i, n)

    handle = pipe.model.unet.register_forward_hook(watch_unet)
    try:
        result = pipe(prompt, negative_prompt, steps=steps, sampler=sampler, guidance_scale=guidance_scale,
                      seed=seed, width=width, height=height, num_images=1, callback=after_step)
    finally:
        handle.remove()
    if len(traced) != steps or any(abs(s.t - float(t)) > 1e-3 for s, t in zip(traced, timesteps, strict=True)):
        raise RuntimeError(f"traced {len(traced)} steps at t = {[s.t for s in traced]}, but the {sampler} plan "
                           f"has {steps} at {timesteps.tolist()}: the trace no longer matches the pipeline")
    return GenerationTrace(prompt, negative_prompt, result.seeds[0], sampler, float(guidance_scale),
                           pipe.config.prediction_type, tuple(traced), result.latents[0].detach().float().cpu(),
                           result.images[0])


def decode(pipe: Pipeline, latents: torch.Tensor) -> torch.Tensor:
    """Latents (C, h, w) -> an image (3, H, W) in [-1, 1], float32 on the CPU, through the pipeline's VAE."""
    return pipe.decode(latents[None].to(pipe.device))[0].float().cpu()
