"""Pictures of the forward process: an image noised at several t under each schedule, and the schedules' curves.

Three figures (see docs/forward_process.md):
    grid          rows = schedules, columns = timesteps; tile (r, k) is x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (DDPM eq. 4)
                  with ᾱ_t from schedule r at timestep k and the SAME ε in every tile, so the rows differ only by
                  their schedule. Under each tile: t, ᾱ_t and SNR(t) = ᾱ_t/(1-ᾱ_t) in decibels (10·log10).
    schedules     β_t (log scale), ᾱ_t and log-SNR (natural log, λ_t of DPM-Solver; dB on the right axis) against t.
    signal_noise  √ᾱ_t (the weight of x_0) and √(1-ᾱ_t) (the weight of ε) against t.

Pixels map [0, 255] -> [-1, 1] before noising and back, clamped, for display. Plots use matplotlib's
object-oriented Figure (Agg canvas), never pyplot, so they change no global state; matplotlib is imported
only when a plot or a label font is needed, so that `kedavra --help` and the other commands start fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from kedavra.diffusion.forward_process import add_noise
from kedavra.diffusion.schedule import COSINE_MAX_BETA, COSINE_OFFSET, SCHEDULE_PRESETS, NoiseSchedule, get_schedule
from kedavra.validation import check_int, check_seed, is_int
from kedavra.viz.sample_image import draw_sample_image

FRAME_TIMESTEPS = (0, 50, 100, 200, 400, 600, 800, 999)  # the columns of the grid by default
DEFAULT_SIZE = 128  # side of one tile in pixels
MIN_SIZE, MAX_SIZE = 8, 1024  # allowed tile sides: below 8 px nothing is visible, above 1024 the grid gets huge
DEFAULT_SEED = 0
DB_PER_NEPER = 10 / math.log(10)  # 10·log10(x) = DB_PER_NEPER · ln(x)

# Grid layout in pixels.
ROW_LABEL_WIDTH = 150  # left column with the schedule's name
HEADER_HEIGHT = 44  # two title lines
LABEL_HEIGHT = 50  # three label lines under each tile
MIN_COLUMN_WIDTH = 100  # a column is at least this wide so its labels fit, even for tiny tiles
GAP = 6  # space between tiles
FONT_SIZE = 12
TITLE_FONT_SIZE = 13
LINE_HEIGHT = 15
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)

# Plots.
PLOT_DPI = 100
SCHEDULES_FIGSIZE = (15.0, 4.5)  # inches: 1500 × 450 px at PLOT_DPI
SIGNAL_NOISE_FIGSIZE = (8.0, 4.5)  # 800 × 450 px

FIGURE_FILES = {"grid": "forward_grid.png", "schedules": "schedules.png", "signal_noise": "signal_noise.png"}


# ---------------------------------------------------------------- input checks
def check_size(size) -> int:
    """The tile side in pixels as an int, or ValueError naming the value and the allowed range."""
    return check_int("size", size, MIN_SIZE, MAX_SIZE)


def parse_schedules(names: str | Sequence[str]) -> tuple[str, ...]:
    """Schedule preset names from "ddpm,sd" or a sequence; ValueError for an unknown or empty list."""
    items = names.split(",") if isinstance(names, str) else list(names)
    items = [item.strip() for item in items]
    if not items or any(not item for item in items):
        raise ValueError(f"schedules must be a comma-separated list of {', '.join(SCHEDULE_PRESETS)}, got {names!r}")
    for item in items:
        get_schedule(item)  # raises ValueError naming the unknown name and the allowed ones
    return tuple(items)


def parse_timesteps(timesteps: str | Sequence[int], num_train_timesteps: int) -> tuple[int, ...]:
    """Integer timesteps from "0,100,999" or a sequence; ValueError unless each is an integer in [0, T-1]."""
    items = timesteps.split(",") if isinstance(timesteps, str) else list(timesteps)
    allowed = f"integers in [0, {num_train_timesteps - 1}]"
    if not items:
        raise ValueError(f"timesteps must be a non-empty comma-separated list of {allowed}, got {timesteps!r}")
    parsed = []
    for item in items:
        if isinstance(item, str):
            try:
                item = int(item.strip())
            except ValueError:
                raise ValueError(f"timestep {item!r} is not an integer; timesteps must be {allowed}") from None
        if not is_int(item):
            raise ValueError(f"timestep {item!r} is not an integer; timesteps must be {allowed}")
        if not 0 <= item <= num_train_timesteps - 1:
            raise ValueError(f"timestep {item} is out of range; timesteps must be {allowed}")
        parsed.append(int(item))
    return tuple(parsed)


# ---------------------------------------------------------------- images
def load_image(path: str | Path, size: int) -> Image.Image:
    """An image file as RGB, centre-cropped to a square and resized to size × size (Lanczos).

    Transparent pixels are composited on white. ValueError if the file is missing or Pillow cannot read it.
    """
    size = check_size(size)
    path = Path(path)
    if not path.is_file():
        reason = "is a directory" if path.is_dir() else "does not exist"
        raise ValueError(f"image {str(path)!r} {reason}; --image needs an image file Pillow can read (PNG, JPEG, ...)")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened.convert("RGBA") if "A" in opened.getbands() or opened.mode == "P" else opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {str(path)!r} ({error}); allowed: image files Pillow reads") from error
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, BACKGROUND + (255,))
        image = Image.alpha_composite(background, image).convert("RGB")
    return square_resize(image, size)


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to the largest square, then resize to size × size with Lanczos."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor (3, H, W) in [-1, 1]: pixel / 127.5 - 1."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))  # (H, W, 3)
    return (pixels / 127.5 - 1).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def tensor_to_pixels(x: torch.Tensor) -> np.ndarray:
    """Tensor (..., 3, H, W) in [-1, 1] -> uint8 array (..., H, W, 3), clamped and rounded."""
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.movedim(-3, -1).numpy()  # (..., 3, H, W) -> (..., H, W, 3)


def fixed_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """The one ε shared by every tile: standard normal float32 from a CPU generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(check_seed("seed", seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def noise_tiles(x0: torch.Tensor, schedules: Sequence[NoiseSchedule], timesteps: Sequence[int], eps: torch.Tensor):
    """x_t for every (schedule, timestep): float32 tensor (R, K, 3, H, W) from x0 and ε of shape (3, H, W)."""
    t = torch.tensor(timesteps, dtype=torch.long)
    rows = []
    for schedule in schedules:
        alpha_bar = schedule.alpha_bar[t]  # (K,)
        x0_batch = x0.expand(len(timesteps), *x0.shape)  # (3, H, W) -> (K, 3, H, W)
        eps_batch = eps.expand(len(timesteps), *eps.shape)  # (3, H, W) -> (K, 3, H, W)
        rows.append(add_noise(x0_batch, eps_batch, alpha_bar))  # DDPM eq. 4
    return torch.stack(rows)  # (R, K, 3, H, W)


# ---------------------------------------------------------------- the grid figure
@dataclass(frozen=True)
class GridLayout:
    """Where each tile of the noise grid lies, in pixels."""

    rows: int
    cols: int
    tile: int

    @property
    def column(self) -> int:
        return max(self.tile, MIN_COLUMN_WIDTH)

    @property
    def row_height(self) -> int:
        return self.tile + LABEL_HEIGHT + GAP

    @property
    def width(self) -> int:
        return ROW_LABEL_WIDTH + GAP + self.cols * (self.column + GAP)

    @property
    def height(self) -> int:
        return HEADER_HEIGHT + self.rows * self.row_height

    def tile_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of tile (row, col), right/bottom exclusive as in PIL's crop."""
        left = ROW_LABEL_WIDTH + GAP + col * (self.column + GAP) + (self.column - self.tile) // 2
        top = HEADER_HEIGHT + row * self.row_height
        return left, top, left + self.tile, top + self.tile


def format_alpha_bar(alpha_bar: float) -> str:
    if alpha_bar == 0:
        return "0"
    if alpha_bar > 0.9995:  # 4 decimals would round the cosine schedule's ᾱ_0 = 0.99996 up to 1.0000
        return f"{alpha_bar:.5f}"
    return f"{alpha_bar:.4f}" if alpha_bar >= 1e-3 else f"{alpha_bar:.1e}"


def snr_db(alpha_bar: float) -> float:
    """SNR(t) = ᾱ/(1-ᾱ) in decibels, 10·log10 SNR; -inf where ᾱ = 0."""
    return -math.inf if alpha_bar == 0 else 10 * math.log10(alpha_bar / (1 - alpha_bar))


def format_snr_db(alpha_bar: float) -> str:
    db = snr_db(alpha_bar)
    return "SNR −∞ dB" if db == -math.inf else f"SNR {db:+.1f} dB".replace("-", "−")


def describe_schedule(schedule: NoiseSchedule) -> list[str]:
    """Short lines saying how a schedule is built, for the grid's row labels."""
    if schedule.kind == "linear":
        lines = ["β linear", f"β {schedule.beta_start:g} → {schedule.beta_end:g}"]
    elif schedule.kind == "scaled_linear":
        lines = ["√β linear", f"β {schedule.beta_start:g} → {schedule.beta_end:g}"]
    else:
        lines = ["ᾱ from cos²", f"offset s = {COSINE_OFFSET:g}", f"β clip {COSINE_MAX_BETA:g}"]
    if schedule.zero_terminal_snr:
        lines.append("zero terminal SNR")
    return lines


@cache
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    """DejaVu Sans as bundled with matplotlib (it has ᾱ, √, ∞), or Pillow's default font."""
    import matplotlib

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:
        return ImageFont.load_default(size)


def draw_noise_grid(
    image: Image.Image, schedule_names: Sequence[str], timesteps: Sequence[int], seed: int = DEFAULT_SEED
) -> tuple[Image.Image, GridLayout]:
    """The forward-process grid for a square RGB image: one row per schedule, one column per timestep."""
    schedules = [get_schedule(name) for name in schedule_names]
    x0 = image_to_tensor(image)  # (3, H, W)
    layout = GridLayout(rows=len(schedules), cols=len(timesteps), tile=x0.shape[-1])
    tiles = tensor_to_pixels(noise_tiles(x0, schedules, timesteps, fixed_noise(x0.shape, seed)))  # (R, K, H, W, 3)

    grid = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    title = _font(TITLE_FONT_SIZE, bold=True)
    draw.text((GAP, 6), "Forward diffusion q(x_t | x_0)", font=title, fill=TEXT)
    draw.text((GAP, 6 + LINE_HEIGHT + 3), f"x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, the same ε (seed {seed}) in every tile",
              font=_font(FONT_SIZE), fill=TEXT)
    for r, (name, schedule) in enumerate(zip(schedule_names, schedules, strict=True)):
        top = HEADER_HEIGHT + r * layout.row_height
        draw.text((GAP, top + 4), name, font=_font(FONT_SIZE + 1, bold=True), fill=TEXT)
        for i, line in enumerate(describe_schedule(schedule)):
            draw.text((GAP, top + 4 + (i + 1) * LINE_HEIGHT + 2), line, font=_font(FONT_SIZE - 1), fill=TEXT)
        for k, t in enumerate(timesteps):
            left, tile_top, right, bottom = layout.tile_box(r, k)
            grid.paste(Image.fromarray(tiles[r, k]), (left, tile_top))
            alpha_bar = schedule.alpha_bar[t].item()
            centre = (left + right) // 2
            for i, line in enumerate((f"t = {t}", f"ᾱ = {format_alpha_bar(alpha_bar)}", format_snr_db(alpha_bar))):
                draw.text((centre, bottom + 2 + i * LINE_HEIGHT), line, font=_font(FONT_SIZE), fill=TEXT, anchor="ma")
    return grid, layout


def alpha_bar_table(schedule_names: Sequence[str], timesteps: Sequence[int]) -> str:
    """A Markdown table of ᾱ_t and SNR in dB for each schedule (rows) at each timestep (columns)."""
    lines = ["| schedule | " + " | ".join(f"t = {t}" for t in timesteps) + " |", "|---" * (len(timesteps) + 1) + "|"]
    for name in schedule_names:
        alpha_bar = get_schedule(name).alpha_bar
        cells = [f"{format_alpha_bar(alpha_bar[t].item())} ({format_snr_db(alpha_bar[t].item())[4:]})"
                 for t in timesteps]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- schedule plots
@dataclass(frozen=True)
class ScheduleCurves:
    """One schedule's curves as float64 numpy arrays of shape (T,), exactly NoiseSchedule's tensors."""

    name: str
    t: np.ndarray
    betas: np.ndarray
    alpha_bar: np.ndarray
    log_snr: np.ndarray  # natural log; -inf where ᾱ = 0 (zero terminal SNR)

    @property
    def finite(self) -> np.ndarray:
        """Mask of the timesteps with finite log-SNR (all but the last of a zero-terminal-SNR schedule)."""
        return np.isfinite(self.log_snr)


def schedule_curves(schedule_names: Sequence[str]) -> dict[str, ScheduleCurves]:
    """β_t, ᾱ_t and log SNR(t) of each named schedule, taken from NoiseSchedule."""
    curves = {}
    for name in schedule_names:
        schedule = get_schedule(name)
        curves[name] = ScheduleCurves(name, np.arange(schedule.T), schedule.betas.numpy(),
                                      schedule.alpha_bar.numpy(), schedule.log_snr.numpy())
    return curves


def _colour(name: str) -> str:
    """The same colour for a schedule in every plot: tab10 by its position among the presets."""
    index = list(SCHEDULE_PRESETS).index(name)
    return f"C{index}"


def _new_figure(figsize: tuple[float, float]):
    """An empty matplotlib Figure of figsize inches at PLOT_DPI, laid out by the constrained layout engine."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=PLOT_DPI, layout="constrained")


def schedules_figure(curves: dict[str, ScheduleCurves]):
    """Three panels: β_t (log y), ᾱ_t, log-SNR (natural log, dB on the right axis) against t; a matplotlib Figure."""
    figure = _new_figure(SCHEDULES_FIGSIZE)
    ax_beta, ax_alpha, ax_snr = figure.subplots(1, 3)
    for c in curves.values():
        colour = _colour(c.name)
        ax_beta.plot(c.t, c.betas, color=colour, label=c.name)
        ax_alpha.plot(c.t, c.alpha_bar, color=colour, label=c.name)
        ax_snr.plot(c.t[c.finite], c.log_snr[c.finite], color=colour, label=c.name)
    ax_beta.set(yscale="log", title="β_t (variance added by step t)", ylabel="β_t (log scale)")
    ax_alpha.set(title="ᾱ_t = ∏ (1 − β_s)", ylabel="ᾱ_t")
    ax_snr.set(title="log SNR(t) = ln(ᾱ_t / (1 − ᾱ_t))", ylabel="log-SNR λ_t (natural log)")
    ax_snr.axhline(0, color="0.6", linewidth=0.8)
    ax_snr.secondary_yaxis("right", functions=(lambda x: x * DB_PER_NEPER, lambda x: x / DB_PER_NEPER)).set_ylabel(
        "SNR (dB)")
    _mark_zero_snr(ax_snr, curves)
    for ax in (ax_beta, ax_alpha, ax_snr):
        ax.set_xlabel("timestep t")
        ax.grid(True, alpha=0.3)
        ax.legend()
    return figure


def _mark_zero_snr(ax, curves: dict[str, ScheduleCurves]) -> None:
    """Annotate each schedule whose log-SNR reaches -inf: the finite part ends one step before."""
    for c in curves.values():
        if c.finite.all():
            continue
        last = int(np.flatnonzero(c.finite)[-1])
        end = int(c.t[-1])
        ax.axvline(end, color=_colour(c.name), linestyle=":", linewidth=1)
        note = f"{c.name}: ᾱ_{end} = 0,\nlog-SNR → −∞ at t = {end}\n(last finite {c.log_snr[last]:.1f} at t = {last})"
        ax.annotate(note, xy=(last, c.log_snr[last]), xytext=(0.35, 0.12), textcoords="axes fraction",
                    color=_colour(c.name), fontsize=9, arrowprops={"arrowstyle": "->", "color": _colour(c.name)})


def signal_noise_figure(curves: dict[str, ScheduleCurves]):
    """√ᾱ_t (weight of x_0, solid) and √(1−ᾱ_t) (weight of ε, dashed) against t; a matplotlib Figure."""
    figure = _new_figure(SIGNAL_NOISE_FIGSIZE)
    ax = figure.subplots()
    for c in curves.values():
        colour = _colour(c.name)
        ax.plot(c.t, np.sqrt(c.alpha_bar), color=colour, label=f"{c.name}: √ᾱ_t (signal)")
        ax.plot(c.t, np.sqrt(1 - c.alpha_bar), color=colour, linestyle="--", label=f"{c.name}: √(1−ᾱ_t) (noise)")
    ax.set(xlabel="timestep t", ylabel="coefficient in x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε",
           title="Signal and noise weights of the forward process")
    ax.grid(True, alpha=0.3)
    figure.legend(loc="outside lower center", fontsize=8, ncols=len(curves))
    return figure


# ---------------------------------------------------------------- everything at once
def make_forward_figures(
    out_dir: str | Path,
    image: Image.Image | None = None,
    size: int = DEFAULT_SIZE,
    timesteps: Sequence[int] = FRAME_TIMESTEPS,
    schedule_names: Sequence[str] = tuple(SCHEDULE_PRESETS),
    seed: int = DEFAULT_SEED,
) -> dict[str, Path]:
    """Write the grid, schedule and signal/noise PNGs into out_dir; returns {"grid": path, ...}.

    image: any RGB image (centre-cropped and resized to size × size), or None for the built-in picture.
    """
    size, seed = check_size(size), check_seed("seed", seed)
    schedule_names = parse_schedules(schedule_names)
    timesteps = parse_timesteps(timesteps, min(get_schedule(name).T for name in schedule_names))
    image = draw_sample_image(size) if image is None else square_resize(image.convert("RGB"), size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {key: out_dir / file for key, file in FIGURE_FILES.items()}

    grid, _ = draw_noise_grid(image, schedule_names, timesteps, seed)
    grid.save(paths["grid"])
    curves = schedule_curves(schedule_names)
    schedules_figure(curves).savefig(paths["schedules"])
    signal_noise_figure(curves).savefig(paths["signal_noise"])
    return paths
