"""What a run shows while it trains: metrics.jsonl, the loss-curve plot, and sample grids.

metrics.jsonl has one JSON object per logged step: step, epoch, loss (mean over the steps since the last
line), the loss's parts (vae: recon, kl), lr, grad_norm, images_per_s, skipped (steps with a non-finite loss or
gradient so far), ema_decay, seconds (training time so far). On resume the lines past the checkpoint's step
are dropped, so the file reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from PIL import Image

from kedavra.formats.grid import image_grid
from kedavra.formats.images import to_pil
from kedavra.networks.model import StableDiffusion
from kedavra.pipeline.pipeline import Pipeline
from kedavra.training.checkpointing import atomic_write

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"
SAMPLES_DIR = "samples"
SAMPLE_SEEDS = 2  # images per prompt in a sample grid (seeds 0 and 1): one row each
SAMPLE_STEPS = 20  # sampling steps of the grids
SAMPLE_SAMPLER = "dpmpp_2m"  # DPM++ 2M (Lu et al. 2022): good images in 20 steps, deterministic per seed
MIN_TILE = 96  # pixels: grid tiles are enlarged to at least this side
SAMPLE_GUIDANCE = 5.0  # classifier-free guidance scale of the grids (Ho and Salimans 2022, eq. 6)
SMOOTHING_POINTS = 50  # the smoothed loss curve averages over about 1/50 of the logged points
PLOT_SIZE = (7.0, 4.0)  # inches
PLOT_DPI = 110
PLOT_MARGINS = {"left": 0.1, "right": 0.97, "bottom": 0.12, "top": 0.92}  # fixed: tight_layout doubled the time


class MetricsLog:
    """Appends metric rows to OUT/metrics.jsonl (rank 0 only)."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / METRICS_FILE
        if resume_step is None:
            self.path.write_text("")
        else:
            self._truncate(resume_step)

    def _truncate(self, step: int) -> None:
        rows = read_metrics(self.path) if self.path.exists() else []
        kept = "".join(json.dumps(row) + "\n" for row in rows if row["step"] <= step)
        atomic_write(self.path, lambda partial: partial.write_text(kept))

    def write(self, row: dict) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps(row) + "\n")


class Interval:
    """The metrics of the steps between two log lines, averaged into one metrics.jsonl row."""

    def __init__(self, parts: Sequence[str] = (), describe_parts: Callable[[dict[str, float]], dict] = dict):
        """parts: the loss's parts (metrics of every step) whose means over the finite steps a row carries, as
        describe_parts(means) makes them (the stage's Stage.log_parts)."""
        self.part_names, self.describe_parts = tuple(parts), describe_parts
        self._reset()

    def _reset(self) -> None:
        self.losses: list[float] = []
        self.last: dict[str, float] = {}
        self.parts = dict.fromkeys(self.part_names, 0.0)  # summed over the interval's finite steps
        self.seconds = 0.0
        self.images = 0

    def add(self, loss: float, metrics: dict[str, float], seconds: float, images: int) -> None:
        """One step: its global loss (NaN if skipped), its metrics (lr, grad_norm, ema_decay, the parts)."""
        self.losses.append(loss)
        self.last = metrics
        if math.isfinite(loss):
            for name in self.parts:
                self.parts[name] += metrics[name]
        self.seconds += seconds
        self.images += images

    def flush(self, step: int, epoch: int, skipped: int, seconds: float) -> dict | None:
        """The row for the steps added since the last flush (None if there were none); with parts, a row of finite
        steps also carries describe_parts(their means) (vae stage: recon, kl and kl_term = β·KL/D)."""
        if not self.losses:
            return None
        finite = [x for x in self.losses if math.isfinite(x)]
        grad_norm = self.last["grad_norm"]
        row = {
            "step": step, "epoch": epoch, "loss": sum(finite) / len(finite) if finite else None,
            "lr": self.last["lr"], "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
            "images_per_s": self.images / self.seconds if self.seconds > 0 else None,
            "skipped": skipped, "ema_decay": self.last.get("ema_decay"), "seconds": round(seconds, 3),
        }
        if finite and self.parts:
            row.update(self.describe_parts({name: total / len(finite) for name, total in self.parts.items()}))
        self._reset()
        return row


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a last line cut short by a crash is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss(metrics_path: Path, out_path: Path, title: str) -> Path | None:
    """The loss curve (raw and smoothed, log scale) from metrics.jsonl as a PNG; None if nothing is logged."""
    rows = [row for row in read_metrics(metrics_path) if row.get("loss") is not None]
    if not rows:
        return None
    steps = [row["step"] for row in rows]
    figure = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    axes = figure.add_subplot()
    parts = [name for name in ("recon", "kl_term") if rows[0].get(name) is not None]
    for name, style in (("loss", "-"), *((p, ":") for p in parts)):
        values = [row[name] for row in rows]
        axes.plot(steps, values, style, alpha=0.3 if name == "loss" else 0.8, label=name if name != "loss" else None)
        if name == "loss":
            axes.plot(steps, _smoothed(values), "-", color="C0", label="loss (smoothed)")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.subplots_adjust(**PLOT_MARGINS)
    return atomic_write(out_path, lambda partial: figure.savefig(partial, format="png"))


def _smoothed(values: Sequence[float]) -> list[float]:
    """An exponential moving average over about len/SMOOTHING_POINTS points, debiased as TensorBoard's smoothing
    is (divided by 1 - factor^k, so the start is not pulled towards zero)."""
    factor = 1 - 1 / max(1, len(values) // SMOOTHING_POINTS)
    out, running = [], 0.0
    for k, value in enumerate(values, start=1):
        running = factor * running + (1 - factor) * value
        out.append(running / (1 - factor**k))
    return out


@torch.no_grad()
def sample_grid(model: StableDiffusion, prompts: Sequence[str], path: Path, device: torch.device) -> Path:
    """Text-to-image samples of `model` (the EMA weights) for each prompt and seeds 0..SAMPLE_SEEDS-1: one
    column per prompt, one row per seed, through the Pipeline in fp32."""
    pipeline = Pipeline(model, device=device, dtype="fp32")
    images = []
    for seed in range(SAMPLE_SEEDS):
        images += pipeline(list(prompts), steps=SAMPLE_STEPS, sampler=SAMPLE_SAMPLER, guidance_scale=SAMPLE_GUIDANCE,
                           seed=seed * len(prompts)).images
    return _save_grid(images, len(prompts), path)


@torch.no_grad()
def reconstruction_grid(model: StableDiffusion, images: torch.Tensor, path: Path, device: torch.device) -> Path:
    """Originals (top row) and the VAE's reconstructions from the posterior mean (bottom row)."""
    vae = model.vae.to(device).eval()
    reconstructions = vae.decode(vae.encode(images.to(device)).mode()).clamp(-1, 1)
    return _save_grid(to_pil(torch.cat([images, reconstructions.cpu()])), len(images), path)


def _save_grid(images: list[Image.Image], columns: int, path: Path) -> Path:
    """The images in a grid, each enlarged (nearest neighbour) to at least MIN_TILE pixels so 32 px samples can be
    seen, written atomically as a PNG."""
    zoom = max(1, MIN_TILE // images[0].width)
    tiles = [image.resize((image.width * zoom, image.height * zoom), Image.Resampling.NEAREST) for image in images]
    grid = image_grid(tiles, columns=columns, padding=2)
    return atomic_write(path, lambda partial: grid.save(partial, format="PNG"))
