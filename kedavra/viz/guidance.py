"""Classifier-free guidance taken apart: the conditional and unconditional predictions, their difference, the mix.

At each chosen step of a real generation the U-Net has run twice on the same x_t: with the prompt (cond) and
with the negative prompt, empty by default (uncond). The sampler used
    guided = uncond + w (cond - uncond)          Ho and Salimans 2022, eq. 6, w = guidance_scale
One row per step, four tiles:
    x̂_0 from cond, x̂_0 from uncond   each prediction turned into the clean latent it implies at this x_t
                                      (DDPM eq. 15) and decoded by the VAE;
    |cond - uncond|                   the per-pixel length of the difference over the latent channels, as a
                                      heat map on one scale for every row: where the prompt changes the
                                      prediction, and how that fades over the run;
    x̂_0 guided                        the x̂_0 the sampler stepped towards.
x̂_0 is linear in the prediction at fixed x_t, so x̂_0(guided) = x̂_0(uncond) + w (x̂_0(cond) - x̂_0(uncond)):
guidance pushes the image w times as far as the prompt alone would, away from the unconditional one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from kedavra.pipeline.pipeline import Pipeline
from kedavra.pipeline.request import GenerationRequest
from kedavra.viz.panels import (
    DEFAULT_ROWS,
    SheetLayout,
    check_png_path,
    check_step_indices,
    display_scale,
    draw_sheet,
    enlarge,
    heat_image,
    spread_indices,
    to_image,
)
from kedavra.viz.reverse import step_label, title_lines
from kedavra.viz.trace import GenerationTrace, decode, trace_generation

COLUMNS = ("x̂_0 from cond", "x̂_0 from uncond", "|cond − uncond|", "x̂_0 guided")


@dataclass(frozen=True)
class GuidanceStep:
    """The parts of guidance at one step: latents (C, h, w), images (3, H, W) in [-1, 1], float32 on the CPU."""

    index: int
    cond: torch.Tensor  # network outputs (ε or v)
    uncond: torch.Tensor
    guided: torch.Tensor
    x0_cond: torch.Tensor  # the decoded x̂_0 of each
    x0_uncond: torch.Tensor
    x0_guided: torch.Tensor

    @property
    def difference_norm(self) -> torch.Tensor:
        """|cond - uncond| per latent pixel: the L2 norm over channels, (h, w)."""
        return (self.cond - self.uncond).norm(dim=0)


def take_apart(pipe: Pipeline, trace: GenerationTrace, indices: Sequence[int]) -> list[GuidanceStep]:
    """The guidance parts at the steps `indices` (0-based) of a traced run with guidance on."""
    if trace.guidance_scale == 1.0:
        raise ValueError("guidance_scale 1 runs no unconditional prediction; take guidance apart with a scale != 1")
    parts = []
    for index in check_step_indices(indices, len(trace.steps)):
        step = trace.steps[index]
        guided = trace.guided(step)
        x0_cond, x0_uncond, x0_guided = (trace.to_x0(step, out) for out in (step.cond, step.uncond, guided))
        parts.append(GuidanceStep(index, step.cond, step.uncond, guided, decode(pipe, x0_cond),
                                  decode(pipe, x0_uncond), decode(pipe, x0_guided)))
    return parts


def draw_guidance(trace: GenerationTrace, parts: Sequence[GuidanceStep]) -> tuple[Image.Image, SheetLayout]:
    """The sheet: one row per step, the COLUMNS in order; the heat maps share the largest norm shown."""
    side = parts[0].x0_cond.shape[-1]
    height = parts[0].x0_cond.shape[-2]
    scale = display_scale(side)
    high = max(float(part.difference_norm.max()) for part in parts)
    tiles, labels = [], []
    for part in parts:
        norm = F.interpolate(part.difference_norm[None, None], size=(height, side), mode="nearest")[0, 0]  # (H, W)
        heat = heat_image(norm.numpy(), high)
        tiles.append([enlarge(to_image(part.x0_cond), scale), enlarge(to_image(part.x0_uncond), scale),
                      enlarge(heat, scale), enlarge(to_image(part.x0_guided), scale)])
        stats = [f"mean {float(part.difference_norm.mean()):.3g}, max {float(part.difference_norm.max()):.3g}"]
        labels.append([[COLUMNS[0]], [COLUMNS[1]], [COLUMNS[2], *stats], [COLUMNS[3]]])
    title = title_lines(trace, "Classifier-free guidance taken apart: guided = uncond + w·(cond − uncond), "
                               f"w = {trace.guidance_scale:g}; heat maps share the scale 0 to {high:.3g}")
    return draw_sheet(tiles, title, [step_label(trace, part.index) for part in parts], labels)


def make_guidance_figure(pipe: Pipeline, request: GenerationRequest, path: str | Path, *,
                         at: Sequence[int] | None = None, on_step: Callable[[int, int], None] | None = None
                         ) -> dict[str, Path]:
    """Generate the one image of `request` (see trace.figure_request) and write the guidance sheet to `path` (.png)
    for the steps `at` (0-based; default DEFAULT_ROWS spread over the run); returns {"sheet": path}."""
    path = check_png_path(path)
    if request.guidance_scale == 1.0:
        raise ValueError("guidance_scale 1 runs no unconditional prediction; take guidance apart with a scale != 1")
    indices = spread_indices(request.steps, DEFAULT_ROWS) if at is None else check_step_indices(at, request.steps)
    trace = trace_generation(pipe, request, on_step)
    sheet, _ = draw_guidance(trace, take_apart(pipe, trace, indices))
    sheet.save(path)
    return {"sheet": path}
