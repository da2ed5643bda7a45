"""Solver-aware few-step schedules, measured: the n noise levels (σ_max and σ_min of the model's table fixed, the
n - 2 between them free) that minimise a solver's own final error against a fine reference ODE solution on fitting
noise, found by Nelder-Mead over the log-σ gaps; compared with Karras and log-uniform levels at 5 and 10 model
evaluations. The direct global-error counterpart of GITS's first-order costs (kedavra.diffusion.step_schedule;
in the spirit of Watson et al. 2021, "Learning fast samplers for diffusion models by differentiating through sample
quality", and of optimised-timestep DPM-Solver schedules, Xue et al. 2024).

1. The two clusters' exact denoiser (schedules "ddpm", `kedavra convergence`'s, and "sd"): mean distance of 10000
   samples from the reference (Heun, 1000 Karras steps), the schedule fitted on other noise (seed 123, 1024 samples).
2. The embedded model (kedavra-shapes, guidance 5): the schedule fitted on 64 seen prompts and their own noise
   against Heun with 100 Karras steps (latent distance), then prompt adherence on held-out prompts (the project's
   evaluator, 200 per kind).

    .venv/bin/python scripts/solver_aware_schedules.py [--skip-model]      (needs scipy: setup.sh --test has it)

About 25 minutes with one thread (the model part); docs/samplers.md ("Few steps") quotes a run.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from scipy.optimize import minimize

import kedavra
from kedavra.data.shapes import ShapesConfig, evaluation_prompts
from kedavra.diffusion.samplers import Denoiser, sample
from kedavra.diffusion.schedule import get_schedule
from kedavra.diffusion.step_schedule import log_uniform_sigmas, table_sigma_range
from kedavra.diffusion.timesteps import karras_sigmas
from kedavra.evaluation.adherence import DEFAULT_GUIDANCE, measure_adherence
from kedavra.pipeline import GenerationRequest
from kedavra.toy.mixture import TWO_MODES, ExactModel

BUDGETS = (5, 10)


def levels(gaps: np.ndarray, sigma_min: float, sigma_max: float) -> tuple[float, ...]:
    """n levels from σ_max to σ_min whose n - 1 log-σ gaps are softmax(gaps) of the whole log range."""
    weights = np.exp(gaps - gaps.max())
    weights /= weights.sum()
    inner = math.log(sigma_max) - np.cumsum(weights[:-1]) * (math.log(sigma_max) - math.log(sigma_min))
    return (sigma_max, *np.exp(inner).tolist(), sigma_min)


def fit(error, n: int, sigma_min: float, sigma_max: float, evaluations: int) -> tuple[float, ...]:
    """The levels minimising error(levels), Nelder-Mead from log-uniform levels."""
    result = minimize(lambda gaps: error(levels(gaps, sigma_min, sigma_max)), np.zeros(n - 1), method="Nelder-Mead",
                      options={"maxfev": evaluations, "xatol": 1e-4, "fatol": 1e-7})
    return levels(result.x, sigma_min, sigma_max)


def mixture_table(schedule_name: str) -> str:
    schedule = get_schedule(schedule_name)
    denoiser = Denoiser(ExactModel(TWO_MODES, schedule, "eps"), "eps")
    noise = torch.randn(10000, TWO_MODES.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fit_noise = torch.randn(1024, TWO_MODES.dim, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    sigma_min, sigma_max = table_sigma_range(schedule)

    def run(x, sampler, steps, sigmas):
        return sample(denoiser, x, sampler=sampler, steps=steps, schedule=schedule, sigmas=tuple(sigmas))

    reference = run(noise, "heun", 1000, karras_sigmas(sigma_min, sigma_max, 1000).tolist())
    fit_reference = run(fit_noise, "heun", 1000, karras_sigmas(sigma_min, sigma_max, 1000).tolist())
    rows = ["| sampler | schedule | " + " | ".join(f"NFE {n}" for n in BUDGETS) + " |", "|---|---|" + "---|" * 2]
    fitted_levels = {}
    for sampler in ("dpmpp_2m", "unipc"):
        cells = {"Karras (ρ = 7)": [], "log-uniform": [], "solver-aware (fitted)": []}
        for n in BUDGETS:
            fitted = fit(lambda s: (run(fit_noise, sampler, n, s) - fit_reference).norm(dim=1).mean().item(),  # noqa: B023
                         n, sigma_min, sigma_max, 3000)
            fitted_levels[sampler, n] = fitted
            for name, sigmas in (("Karras (ρ = 7)", karras_sigmas(sigma_min, sigma_max, n).tolist()),
                                 ("log-uniform", log_uniform_sigmas(sigma_min, sigma_max, n).tolist()),
                                 ("solver-aware (fitted)", fitted)):
                cells[name].append((run(noise, sampler, n, sigmas) - reference).norm(dim=1).mean().item())
        rows += [f"| `{sampler}` | {name} | " + " | ".join(f"{e:.4f}" for e in errors) + " |"
                 for name, errors in cells.items()]
    rows.append("")
    rows += [f"fitted σ's, `{sampler}`, NFE {n}: " + ", ".join(f"{s:.3g}" for s in fitted)
             for (sampler, n), fitted in fitted_levels.items()]
    return "\n".join(rows)


def model_table(per_kind: int) -> str:
    pipe = kedavra.load("kedavra-shapes")
    schedule = pipe.config.schedule
    sigma_min, sigma_max = table_sigma_range(schedule)
    captions = [spec.caption for spec in evaluation_prompts(ShapesConfig(), per_kind=16, seed=10_000, held_out=False)]
    guided = pipe.guided_unet(pipe.check(GenerationRequest.build(captions, guidance_scale=DEFAULT_GUIDANCE)))
    latent = pipe.config.image_size // pipe.config.vae.downsample_factor
    noise = torch.randn(len(captions), pipe.config.vae.latent_channels, latent, latent,
                        generator=torch.Generator().manual_seed(10_000))

    def run(sampler, steps, sigmas):
        with torch.no_grad():
            return sample(guided, noise, sampler=sampler, steps=steps, schedule=schedule,
                          prediction_type=pipe.config.prediction_type, sigmas=tuple(sigmas))

    reference = run("heun", 100, karras_sigmas(sigma_min, sigma_max, 100).tolist())

    def distance(sampler, n, sigmas):
        return (run(sampler, n, sigmas) - reference).flatten(1).norm(dim=1).mean().item()

    rows = ["| `unipc` schedule | latent distance, 5 / 10 steps | adherence, 5 steps | adherence, 10 steps |",
            "|---|---|---|---|"]
    fitted = {n: fit(lambda s: distance("unipc", n, s), n, sigma_min, sigma_max, 150 * n)  # noqa: B023
              for n in BUDGETS}
    schedules = {"Karras (ρ = 7)": lambda n: karras_sigmas(sigma_min, sigma_max, n).tolist(),
                 "log-uniform": lambda n: log_uniform_sigmas(sigma_min, sigma_max, n).tolist(),
                 "solver-aware (fitted)": lambda n: fitted[n]}
    for name, make in schedules.items():
        distances = [distance("unipc", n, make(n)) for n in BUDGETS]
        scores = [measure_adherence(pipe, per_kind=per_kind, steps=n, sampler="unipc", sigmas=tuple(make(n)))
                  .report.overall for n in BUDGETS]
        rows.append(f"| {name} | {distances[0]:.2f} / {distances[1]:.2f} | {scores[0]:.3f} | {scores[1]:.3f} |")
    rows.append("")
    rows += [f"fitted σ's, {n} steps: " + ", ".join(f"{s:.3g}" for s in fitted[n]) for n in BUDGETS]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-kind", type=int, default=200, help="adherence images per prompt kind")
    parser.add_argument("--skip-model", action="store_true", help="only the exact-denoiser tables")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    for name in ("ddpm", "sd"):
        print(f"## Two clusters, exact denoiser, schedule {name!r}: mean distance from the reference ODE solution\n")
        print(mixture_table(name), "\n", flush=True)
    if not args.skip_model:
        print(f"## kedavra-shapes, UniPC: latent distance from Heun 100 steps (fitting prompts), and adherence "
              f"(overall, held-out prompts, {args.per_kind} per kind)\n")
        print(model_table(args.per_kind))
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
