"""Pictures of the two clusters (PNG): forward diffusion dissolving them, reverse paths landing on a mode, where
the samples end, and the sampler convergence study.

Figures are drawn on `matplotlib.figure.Figure` objects and saved with the Agg renderer, without pyplot: no GUI
backend, no global figure state (matplotlib's advice for scripts and servers).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from matplotlib.figure import Figure
from PIL import Image

from kedavra.diffusion.forward_process import add_noise, randn_like
from kedavra.diffusion.samplers import SAMPLERS, StepRecord, resolve_sampler, sample
from kedavra.diffusion.schedule import NoiseSchedule
from kedavra.diffusion.timesteps import make_plan
from kedavra.toy.convergence import ConvergenceResult, identical_runs
from kedavra.toy.mixture import MODE_NAMES, GaussianMixture, expected_fraction_between, fraction_between, mode_axis

MODE_COLOURS = ("tab:blue", "tab:orange")
BETWEEN_COLOUR = "tab:red"
FORWARD_TIMESTEPS = (0, 100, 200, 300, 500, 999)  # for the "ddpm" schedule: ᾱ from 1 to 4e-5
DPI = 100
PALETTE_COLOURS = 256  # PNG palette size (the most an 8-bit palette holds)
PLANE_POINTS = 60  # points per path drawn in the plane (every k-th step), so 1000-step DDPM paths stay legible
FAN_POINTS = 250  # points per path against the step: enough to show the noise, few enough for a small PNG
LIMITS = ((-4.0, 4.0), (-3.5, 3.5))  # plot window in x_t, wide enough for the data (±2 ± 3·0.4) and N(0, I)


def save_png(fig: Figure, path: str | Path) -> None:
    """Render with Agg and store as a 256-colour palette PNG (plots use few colours; the files here shrank 2.6-3x)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(PALETTE_COLOURS).save(path, format="PNG", optimize=True)


def landing_modes(x: torch.Tensor, mixture: GaussianMixture) -> torch.Tensor:
    """For each sample (B, D): 0 or 1, the side of the gap it lies on, or -1 when it lies between the modes."""
    u, low, high = mode_axis(mixture)
    position = x.to(torch.float64) @ u
    side = (position >= high).long()
    return torch.where((position > low) & (position < high), -1, side)


def sample_with_paths(
    model,
    noise: torch.Tensor,
    num_paths: int,
    *,
    sampler: str,
    steps: int,
    schedule: NoiseSchedule,
    spacing: str = "trailing",
    karras: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample from `noise` (B, D) and record the first `num_paths` samples after every step in the VP view x_t:
    returns (samples (B, D), paths (steps + 1, num_paths, D)), paths[0] being the noise."""
    spec, karras_from_name = resolve_sampler(sampler)
    plan = make_plan(schedule, steps, spacing, 0, karras or karras_from_name)
    paths = [noise[:num_paths].clone()]

    def record(step: StepRecord) -> None:
        sigma = plan.sigmas[step.index + 1].item()  # the level this step ended on
        scale = 1 / math.sqrt(1 + sigma**2) if spec.view == "ve" else 1.0  # x_t = x_VE / √(1+σ²)
        paths.append(step.x[:num_paths].detach() * scale)

    samples = sample(
        model,
        noise,
        sampler=spec.name,
        steps=steps,
        schedule=schedule,
        spacing=spacing,
        karras=karras or karras_from_name,
        generator=generator,
        callback=record,
    )
    return samples, torch.stack(paths)


def plot_forward(
    mixture: GaussianMixture,
    schedule: NoiseSchedule,
    path: str | Path,
    timesteps=FORWARD_TIMESTEPS,
    num_samples: int = 1500,
    generator: torch.Generator | None = None,
):
    """Figure (a): the same data noised to several t (DDPM eq. 4), over the density of the marginal p_t."""
    x0, component = mixture.sample_with_components(num_samples, generator)
    eps = randn_like(x0, generator)
    (x_lo, x_hi), (y_lo, y_hi) = LIMITS
    gx, gy = torch.meshgrid(torch.linspace(x_lo, x_hi, 160), torch.linspace(y_lo, y_hi, 140), indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], dim=1)  # (140·160, 2)
    fig = Figure(figsize=(2.6 * len(timesteps), 2.9), layout="constrained")
    axes = fig.subplots(1, len(timesteps), sharex=True, sharey=True, squeeze=False)[0]
    for ax, t in zip(axes, timesteps, strict=True):
        alpha_bar = schedule.alpha_bar[t].item()
        x_t = add_noise(x0, eps, alpha_bar)
        density = mixture.marginal(alpha_bar).log_prob(grid).exp().reshape(gx.shape)
        ax.contourf(gx.numpy(), gy.numpy(), density.numpy(), levels=10, cmap="Greys", alpha=0.6)
        for k, (name, colour) in enumerate(zip(MODE_NAMES, MODE_COLOURS, strict=True)):
            mask = component == k
            ax.scatter(x_t[mask, 0], x_t[mask, 1], s=2, color=colour, alpha=0.5, label=name, rasterized=True)
        ax.set_title(rf"$t = {t}$,  $\bar\alpha = {alpha_bar:.2g}$", fontsize=10)
        ax.set_xlim(x_lo, x_hi)
        ax.set_ylim(y_lo, y_hi)
        ax.set_aspect("equal")
    axes[0].legend(loc="upper left", markerscale=4, fontsize=8)
    fig.suptitle("Forward diffusion: two clusters (cats, dogs) dissolve into one cloud of Gaussian noise")
    save_png(fig, path)


def plot_reverse(runs: dict[str, tuple[torch.Tensor, str]], mixture: GaussianMixture, path: str | Path):
    """Figure (b): one row per run, label -> (paths (n+1, P, D), subtitle); left the paths in the plane,
    right the coordinate along the modes' axis against the step, each path coloured by where it lands."""
    u = mode_axis(mixture)[0].to(torch.float32)
    fig = Figure(figsize=(11, 4.2 * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), 2, squeeze=False, width_ratios=(1, 1.5))
    for (label, (paths, subtitle)), (ax_plane, ax_fan) in zip(runs.items(), axes, strict=True):
        landing = landing_modes(paths[-1], mixture)
        every = max(1, len(paths) // PLANE_POINTS)
        steps, coarse = _every(paths, every)
        fan_steps, fan = _every(paths, max(1, len(paths) // FAN_POINTS))
        for p in landing.argsort(descending=True).tolist():  # paths that end between the modes drawn last, bold
            between = landing[p] < 0
            style = {
                "color": BETWEEN_COLOUR if between else MODE_COLOURS[landing[p]],
                "lw": 1.5 if between else 0.6,
                "alpha": 1.0 if between else 0.7,
                "zorder": 2.5 if between else 2,
            }
            ax_plane.plot(coarse[:, p, 0], coarse[:, p, 1], **style)
            ax_fan.plot(fan_steps, fan[:, p].float() @ u, **style)
        ax_plane.scatter(paths[0, :, 0], paths[0, :, 1], s=8, color="black", label="start (noise)", zorder=3)
        ax_plane.scatter(paths[-1, :, 0], paths[-1, :, 1], s=12, marker="x", color="black", label="end", zorder=3)
        ax_plane.set_xlim(*LIMITS[0])
        ax_plane.set_ylim(*LIMITS[1])
        ax_plane.set_aspect("equal")
        ax_plane.set_title(
            f"{label}: paths in the plane" + (f" (every {every} steps)" if every > 1 else ""), fontsize=10
        )
        ax_plane.legend(loc="upper left", fontsize=8)
        for k, (name, colour) in enumerate(zip(MODE_NAMES, MODE_COLOURS, strict=True)):
            ax_fan.axhline(mixture.tensors()[0][k].float() @ u, color=colour, ls="--", lw=1, label=name)
        ax_fan.plot([], [], color=BETWEEN_COLOUR, lw=1.5, label="ends between")
        ax_fan.set_xlabel("reverse step (0 = pure noise)")
        ax_fan.set_ylabel("position along the axis of the modes")
        ax_fan.set_title(f"{label}: {subtitle}", fontsize=10)
        ax_fan.legend(loc="upper left", fontsize=8)
    fig.suptitle("The reverse process lands on one mode or the other, never between")
    save_png(fig, path)


def _every(paths: torch.Tensor, every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(step indices, paths) at every `every`-th step, the last step always kept."""
    steps = torch.cat([torch.arange(0, len(paths) - 1, every), torch.tensor([len(paths) - 1])])
    return steps, paths[steps]


def plot_landing(samples: dict[str, torch.Tensor], mixture: GaussianMixture, path: str | Path, bins: int = 120):
    """Figure (c): histograms of the samples' position along the modes' axis (x_1 for the two clusters), with
    the data's density and the "between the modes" band, the fraction inside it printed on each panel."""
    u, low, high = mode_axis(mixture)
    means, stds, weights = mixture.tensors()
    centres = means @ u
    grid = torch.linspace(*LIMITS[0], 400, dtype=torch.float64)
    density = sum(
        w * torch.exp(-0.5 * ((grid - c) / s) ** 2) / (s * math.sqrt(2 * math.pi))
        for w, c, s in zip(weights, centres, stds, strict=True)
    )
    expected = expected_fraction_between(mixture)
    fig = Figure(figsize=(5.2 * len(samples), 3.6), layout="constrained")
    axes = fig.subplots(1, len(samples), squeeze=False, sharey=True)[0]
    for ax, (label, x) in zip(axes, samples.items(), strict=True):
        position = x.to(torch.float64) @ u
        ax.hist(
            position.numpy(),
            bins=bins,
            range=LIMITS[0],
            density=True,
            color="tab:gray",
            alpha=0.7,
            label=f"samples ({len(x)})",
        )
        ax.plot(grid.numpy(), density.numpy(), color="black", lw=1, label="data density")
        ax.axvspan(low, high, color=BETWEEN_COLOUR, alpha=0.12, label=f"between ({low:g} < x < {high:g})")
        landing = landing_modes(x, mixture)
        shares = [(landing == k).double().mean().item() for k in range(2)]
        text = (
            f"between the modes: {100 * fraction_between(x, mixture):.2f}%\n(data: {100 * expected:.2f}%)\n"
            f"{MODE_NAMES[0]} {100 * shares[0]:.1f}%, {MODE_NAMES[1]} {100 * shares[1]:.1f}%"
        )
        ax.text(
            0.5,
            0.97,
            text,
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize=9,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
        )
        ax.set_yscale("log")
        ax.set_ylim(1e-3, 3)
        ax.set_xlabel("position along the axis of the modes ($x_1$)")
        ax.set_title(label, fontsize=10)
        ax.legend(loc="lower center", fontsize=7)
    axes[0].set_ylabel("density (log scale)")
    fig.suptitle("Where the samples land")
    save_png(fig, path)


def plot_convergence(result: ConvergenceResult, path: str | Path):
    """The convergence study (a `kedavra.toy.convergence.ConvergenceResult`): sliced W1, distance from the
    reference ODE solution and fraction between the modes, against the number of model evaluations."""
    fig = Figure(figsize=(15, 4.4), layout="constrained")
    ax_w, ax_ode, ax_between = fig.subplots(1, 3)
    markers = "osD^v<>ph"
    twins = identical_runs(result)
    for i, sampler in enumerate(result.config.samplers):
        runs = [p for p in result.points if p.sampler == sampler]
        twin = twins.get(sampler)
        label = sampler + (f" (= {twin})" if twin else "")
        style = {
            "ls": "--" if SAMPLERS[sampler].stochastic else "-",
            "marker": markers[i % len(markers)],
            "ms": 4,
            "mfc": "none",
            "color": f"C{i}",
        }  # matplotlib's default 10-colour cycle
        nfe = [p.nfe for p in runs]
        ax_w.plot(nfe, [p.sliced_w1 for p in runs], label=label, **style)
        ax_between.plot(nfe, [100 * p.between for p in runs], label=label, **style)
        if not SAMPLERS[sampler].stochastic:
            order = result.orders.get(sampler)
            ax_ode.plot(
                nfe, [p.ode_error for p in runs], label=label + (f", order {order[0]:.2f}" if order else ""), **style
            )
    floor = result.noise_floor
    ax_w.axhspan(floor - result.noise_floor_std, floor + result.noise_floor_std, color="black", alpha=0.1)
    ax_w.axhline(floor, color="black", lw=1, ls=":", label="noise floor")
    ax_ode.axhline(result.reference_error, color="black", lw=1, ls=":", label="reference's own error")
    budgets = torch.tensor(result.config.budgets, dtype=torch.float64)
    for order, ls in ((1, (0, (1, 3))), (2, (0, (5, 5)))):
        guide = 0.1 * (budgets / budgets[0]) ** -order
        ax_ode.plot(budgets, guide, color="gray", lw=0.8, ls=ls, label=f"slope -{order}")
    ax_between.axhline(100 * result.expected_between, color="black", lw=1, ls=":", label="data")
    for ax, title, ylabel in (
        (ax_w, "sliced W1 to exact samples", "sliced W1"),
        (ax_ode, "distance from the reference ODE solution", "mean distance"),
        (ax_between, "samples between the modes", "% between the modes"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("model evaluations (NFE)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    ax_w.set_yscale("log")
    ax_ode.set_yscale("log")
    linear_below = 100 / result.config.num_samples  # one sample in percent: symlog is linear below it, so 0% shows
    ax_between.set_yscale("symlog", linthresh=linear_below)
    ax_between.set_ylim(bottom=0)
    ax_ode.set_ylim(bottom=max(result.reference_error / 10, 1e-9))
    fig.suptitle(
        f"Samplers with the exact denoiser of two clusters (schedule {result.config.schedule}, Karras σ, "
        f"N = {result.config.num_samples})"
    )
    save_png(fig, path)
