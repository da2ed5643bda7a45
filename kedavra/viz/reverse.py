"""The reverse process of a real generation: x_t and the predicted x̂_0 at each step, decoded to pixels.

Two rows per figure: the latent the U-Net sees at the step, x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (DDPM eq. 4), and the
sampler's estimate of the clean latent from it, x̂_0 (for ε-prediction x̂_0 = (x_t - √(1-ᾱ_t) ε̂)/√ᾱ_t, DDPM
eq. 15), both through the VAE decoder. Early on x_t is almost all noise and x̂_0 a blurred average of the
images the prompt allows; the layout settles in the first steps and detail comes last. A run ends at σ = 0, and
a step into σ = 0 lands on that step's x̂_0 (Euler: x + (x - x̂_0)/σ · (0 - σ) = x̂_0, Karras et al. 2022
eq. 3), so the last x̂_0 is the final image.

    PATH.png   a strip of `columns` steps spread over the run (first and last always in it)
    PATH.gif   one frame per step: x_t and x̂_0 side by side
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from kedavra.pipeline.pipeline import Pipeline
from kedavra.pipeline.request import GenerationRequest
from kedavra.viz.panels import (
    SheetLayout,
    check_png_path,
    display_scale,
    draw_sheet,
    enlarge,
    save_gif,
    spread_indices,
    to_image,
)
from kedavra.viz.trace import GenerationTrace, decode, trace_generation

DEFAULT_COLUMNS = 8  # steps shown in the PNG strip
ROWS = ("x_t (U-Net input)", "x̂_0 (predicted)")


@dataclass(frozen=True)
class ReverseFrames:
    """A traced run with each step's x_t and x̂_0 decoded: (n, 3, H, W) float32 in [-1, 1]."""

    trace: GenerationTrace
    x_t: torch.Tensor
    x0: torch.Tensor


def decode_reverse(pipe: Pipeline, trace: GenerationTrace) -> ReverseFrames:
    """Decode every step's x_t and x̂_0 with the pipeline's VAE, one latent at a time (bounded memory)."""
    x_t = torch.stack([decode(pipe, step.x_t) for step in trace.steps])  # (n, 3, H, W)
    x0 = torch.stack([decode(pipe, step.x0) for step in trace.steps])  # (n, 3, H, W)
    return ReverseFrames(trace, x_t, x0)


def step_label(trace: GenerationTrace, index: int) -> list[str]:
    step = trace.steps[index]
    return [f"step {index + 1}/{len(trace.steps)}", f"t = {step.t:.0f}", f"ᾱ = {step.alpha_bar:.3g}"]


def title_lines(trace: GenerationTrace, what: str) -> list[str]:
    """Two title lines: what the figure shows, then the run's prompt and settings."""
    negative = f", negative {trace.negative_prompt!r}" if trace.negative_prompt else ""
    return [what, f"{trace.prompt!r}{negative}: {trace.sampler}, {len(trace.steps)} steps, "
                  f"guidance {trace.guidance_scale:g}, seed {trace.seed}"]


def draw_reverse_strip(frames: ReverseFrames, columns: int = DEFAULT_COLUMNS) -> tuple[Image.Image, SheetLayout,
                                                                                          list[int]]:
    """(strip, layout, shown step indices): row 0 the decoded x_t, row 1 the decoded x̂_0, one column per step."""
    shown = spread_indices(len(frames.trace.steps), columns)
    scale = display_scale(frames.x_t.shape[-1])
    tiles = [[enlarge(to_image(images[i]), scale) for i in shown] for images in (frames.x_t, frames.x0)]
    labels = [[step_label(frames.trace, i) for i in shown], [[] for _ in shown]]
    title = title_lines(frames.trace, "The reverse process: the noisy latent x_t and the clean x̂_0 predicted from it")
    sheet, layout = draw_sheet(tiles, title, [[ROWS[0]], [ROWS[1]]], labels)
    return sheet, layout, shown


def draw_reverse_frames(frames: ReverseFrames) -> list[Image.Image]:
    """One GIF frame per step: x_t beside x̂_0, labelled with the step."""
    scale = display_scale(frames.x_t.shape[-1])
    title = title_lines(frames.trace, "Reverse process, step by step")
    out = []
    for i in range(len(frames.trace.steps)):
        tiles = [[enlarge(to_image(frames.x_t[i]), scale), enlarge(to_image(frames.x0[i]), scale)]]
        sheet, _ = draw_sheet(tiles, title, [step_label(frames.trace, i)], [[[ROWS[0]], [ROWS[1]]]])
        out.append(sheet)
    return out


def make_reverse_figure(pipe: Pipeline, request: GenerationRequest, path: str | Path, *,
                        columns: int = DEFAULT_COLUMNS, on_step: Callable[[int, int], None] | None = None
                        ) -> dict[str, Path]:
    """Generate the one image of `request` (see trace.figure_request), write the strip to `path` (.png) and the
    animation beside it (.gif); returns {"strip": png path, "animation": gif path}."""
    path = check_png_path(path)
    spread_indices(request.steps, columns)  # refuses a bad column count before the run
    frames = decode_reverse(pipe, trace_generation(pipe, request, on_step))
    strip, _, _ = draw_reverse_strip(frames, columns)
    strip.save(path)
    gif = save_gif(draw_reverse_frames(frames), path.with_suffix(".gif"))
    return {"strip": path, "animation": gif}
