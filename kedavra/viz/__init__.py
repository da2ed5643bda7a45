"""Visualisation: figures that show what the diffusion core does (a layer on top; the core never imports it)."""

from kedavra.viz.forward import (
    FRAME_TIMESTEPS,
    GridLayout,
    ScheduleCurves,
    alpha_bar_table,
    draw_noise_grid,
    load_image,
    make_forward_figures,
    noise_tiles,
    schedule_curves,
    schedules_figure,
    signal_noise_figure,
)
from kedavra.viz.sample_image import draw_sample_image

__all__ = [
    "FRAME_TIMESTEPS",
    "GridLayout",
    "ScheduleCurves",
    "alpha_bar_table",
    "draw_noise_grid",
    "draw_sample_image",
    "load_image",
    "make_forward_figures",
    "noise_tiles",
    "schedule_curves",
    "schedules_figure",
    "signal_noise_figure",
]
