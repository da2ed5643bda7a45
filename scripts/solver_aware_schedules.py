"""Solver-aware few-step schedules, measured: the n noise levels (σ_max and σ_min of the model's table fixed, the
n - 2 between them free) that minimise a solver's own final error against a fine reference ODE solution on fitting
noise, found by Nelder-Mead over the log-σ gaps; compared with Karras and log-uniform levels at 5 and 10 model
evaluations. The direct global-error counterpart of GITS's first-order costs (kedavra.diffusion.step_schedule;
in the spirit of Watson et al. 2021, "Learning fast samplers for diffusion models by differentiating through sample
quality", and of optimised-timestep DPM-Solver schedules, Xue et al. 2024).

1. The two clusters' exact denoiser (schedules "ddpm", `kedavra convergence`'s, and "sd"): mean distance of 10000
   samples from the reference (Heun, 1000 Karras steps), the schedule fitted on other noise (seed 123, 1024 samples).
2. The embedded model (kedavra-shapes, guidance 5), for each of --samplers: the schedule fitted on seen prompts
   (--fit-per-kind per kind) and their own noise against Heun with 100 Karras steps (latent distance), then prompt
   adherence on held-out prompts (the project's evaluator, --per-kind per kind). Every schedule runs as explicit
   levels (`sample(..., sigmas=...)`): the n levels are the n model evaluations, and the last step goes on to σ = 0.

    .venv/bin/python scripts/solver_aware_schedules.py [--skip-model | --skip-mixture]   (scipy: setup.sh --test)

The mixture tables take about a minute on one thread. The model part's cost is mostly its fits: one stops after
--fit-evaluations · n runs of n steps on the fitting batch; with --fit-per-kind 8 --fit-evaluations 20 and the
default samplers and --per-kind, 63 minutes on one thread. docs/samplers.md ("Few steps") quotes that run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
from scipy.optimize import minimize

import kedavra
from kedavra.data.shapes import ShapesConfig, evaluation_prompts
from kedavra.diffusion.samplers import Denoiser, sample
from kedavra.diffusion.schedule import get_schedule
from kedavra.diffusion.step_schedule import log_uniform_sigmas, table_sigma_range
from kedavra.diffusion.timesteps import karras_sigmas, make_plan
from kedavra.evaluation.adherence import DEFAULT_GUIDANCE, measure_adherence
from kedavra.pipeline import GenerationRequest
from kedavra.toy.mixture import TWO_MODES, ExactModel

BUDGETS = (5, 10)
MODEL_SAMPLERS = ("euler", "dpmpp_2m", "unipc")  # deterministic samplers spending one model evaluation per level
MODEL_REFERENCE_STEPS = 100  # Heun on Karras levels: the model's reference ODE solution
# Side of the model fits' first Nelder-Mead simplex in the gap logits. scipy's default from a zero start is 0.00025,
# which takes hundreds of evaluations to grow; the few-hundred-evaluation model fits cannot spare them (on the
# mixture, "sd", dpmpp_2m, 10 NFE: fitting error 0.0063 after 200 evaluations from this simplex, 0.0177 after 1004
# from scipy's). The mixture fits keep scipy's simplex and 3000 evaluations, as docs/samplers.md quotes them.
MODEL_SIMPLEX_SIDE = 0.25


def levels(gaps: np.ndarray, sigma_min: float, sigma_max: float) -> tuple[float, ...]:
    """n levels from σ_max to σ_min whose n - 1 log-σ gaps are softmax(gaps) of the whole log range."""
    weights = np.exp(gaps - gaps.max())
    weights /= weights.sum()
    inner = math.log(sigma_max) - np.cumsum(weights[:-1]) * (math.log(sigma_max) - math.log(sigma_min))
    return (sigma_max, *np.exp(inner).tolist(), sigma_min)


def fit(error, n: int, sigma_min: float, sigma_max: float, evaluations: int,
        simplex_side: float | None = None) -> tuple[tuple[float, ...], int]:
    """(levels minimising error(levels), evaluations used): Nelder-Mead from log-uniform levels, its first simplex
    scipy's default (simplex_side None) or the start and the start moved by simplex_side along each gap logit."""
    options = {"maxfev": evaluations, "xatol": 1e-4, "fatol": 1e-7}
    if simplex_side is not None:
        options["initial_simplex"] = np.vstack([np.zeros(n - 1), simplex_side * np.eye(n - 1)])  # (n, n - 1)
    result = minimize(lambda gaps: error(levels(gaps, sigma_min, sigma_max)), np.zeros(n - 1), method="Nelder-Mead",
                      options=options)
    return levels(result.x, sigma_min, sigma_max), result.nfev


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
            fitted, _ = fit(lambda s: (run(fit_noise, sampler, n, s) - fit_reference).norm(dim=1).mean().item(),  # noqa: B023
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


def latent_distance(pipe, fit_per_kind: int):
    """distance(sampler, n, levels): mean latent distance of an n-step run from Heun's 100-step reference, on
    fit_per_kind seen prompts per kind and their own noise (seed 10 000), guidance 5."""
    schedule = pipe.config.schedule
    sigma_min, sigma_max = table_sigma_range(schedule)
    captions = [spec.caption for spec in evaluation_prompts(ShapesConfig(), per_kind=fit_per_kind, seed=10_000,
                                                              held_out=False)]
    guided = pipe.guided_unet(pipe.check(GenerationRequest.build(captions, guidance_scale=DEFAULT_GUIDANCE)))
    latent = pipe.config.image_size // pipe.config.vae.downsample_factor
    noise = torch.randn(len(captions), pipe.config.vae.latent_channels, latent, latent,
                        generator=torch.Generator().manual_seed(10_000))  # (B, C, H, W)

    def run(sampler, steps, sigmas):
        with torch.no_grad():
            return sample(guided, noise, sampler=sampler, steps=steps, schedule=schedule,
                          prediction_type=pipe.config.prediction_type, sigmas=tuple(sigmas))

    reference = run("heun", MODEL_REFERENCE_STEPS, karras_sigmas(sigma_min, sigma_max, MODEL_REFERENCE_STEPS).tolist())

    def distance(sampler: str, n: int, sigmas) -> float:
        return (run(sampler, n, sigmas) - reference).flatten(1).norm(dim=1).mean().item()  # (B, C·H·W) -> B norms

    return distance


def model_rows(samplers: list[str], per_kind: int, fit_per_kind: int, evaluations_per_step: int):
    """Yields the embedded model's table, a line at a time: for each sampler and schedule the latent distance (5 / 10
    steps) and adherence at 5 and 10 steps, then the fitted σ's; progress goes to stderr as it is measured."""
    pipe = kedavra.load("kedavra-shapes")
    schedule = pipe.config.schedule
    sigma_min, sigma_max = table_sigma_range(schedule)
    distance = latent_distance(pipe, fit_per_kind)
    plan_levels = {n: tuple(make_plan(schedule, n, pipe.config.spacing, pipe.config.steps_offset, karras=True)
                            .sigmas[:-1].tolist()) for n in BUDGETS}  # `--karras`: the levels before σ = 0
    schedules = {"Karras, kedavra's plan (`--karras`)": plan_levels.get,
                 "Karras (ρ = 7), σ_max to σ_min": lambda n: tuple(karras_sigmas(sigma_min, sigma_max, n).tolist()),
                 "log-uniform": lambda n: tuple(log_uniform_sigmas(sigma_min, sigma_max, n).tolist())}
    rows, notes = [], [f"kedavra's plan (`--karras`), {n} steps: " + ", ".join(f"{s:.3g}" for s in plan_levels[n])
                       for n in BUDGETS]
    for sampler in samplers:
        fitted = {}
        for n in BUDGETS:
            start = time.perf_counter()
            fitted[n], used = fit(lambda s: distance(sampler, n, s), n, sigma_min, sigma_max,  # noqa: B023
                                  evaluations_per_step * n, MODEL_SIMPLEX_SIDE)
            notes.append(f"fitted σ's, `{sampler}`, {n} steps ({used} evaluations of {evaluations_per_step * n}, "
                         f"{time.perf_counter() - start:.0f} s): " + ", ".join(f"{s:.3g}" for s in fitted[n]))
            print(notes[-1], file=sys.stderr, flush=True)
        for name, make in {**schedules, "solver-aware (fitted)": fitted.get}.items():
            distances = [distance(sampler, n, make(n)) for n in BUDGETS]
            scores = [measure_adherence(pipe, per_kind=per_kind, steps=n, sampler=sampler, sigmas=make(n))
                      .report.overall for n in BUDGETS]
            rows.append(f"| `{sampler}` | {name} | {distances[0]:.2f} / {distances[1]:.2f} | {scores[0]:.3f} | "
                        f"{scores[1]:.3f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    yield "| sampler | schedule | latent distance, 5 / 10 steps | adherence, 5 steps | adherence, 10 steps |"
    yield "|---|---|---|---|---|"
    yield from rows
    yield ""
    yield from notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-kind", type=int, default=200, help="adherence images per prompt kind")
    parser.add_argument("--samplers", nargs="+", choices=MODEL_SAMPLERS, default=["euler", "dpmpp_2m"],
                        help="samplers whose schedules the model part fits and measures")
    parser.add_argument("--fit-per-kind", type=int, default=16, help="seen fitting prompts per kind (model part)")
    parser.add_argument("--fit-evaluations", type=int, default=150,
                        help="a model fit stops after this many evaluations of its objective per step")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--skip-model", action="store_true", help="only the exact-denoiser tables")
    group.add_argument("--skip-mixture", action="store_true", help="only the embedded model's table")
    args = parser.parse_args()
    for flag in ("per_kind", "fit_per_kind", "fit_evaluations"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    torch.set_num_threads(1)
    start = time.perf_counter()
    if not args.skip_mixture:
        for name in ("ddpm", "sd"):
            print(f"## Two clusters, exact denoiser, schedule {name!r}: mean distance from the reference ODE "
                  "solution\n")
            print(mixture_table(name), "\n", flush=True)
    if not args.skip_model:
        print(f"## kedavra-shapes: latent distance from Heun {MODEL_REFERENCE_STEPS} steps ({args.fit_per_kind} "
              f"fitting prompts per kind), and adherence (overall, held-out prompts, {args.per_kind} per kind); fits "
              f"stop after {args.fit_evaluations} · n evaluations\n", flush=True)
        for line in model_rows(args.samplers, args.per_kind, args.fit_per_kind, args.fit_evaluations):
            print(line)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
