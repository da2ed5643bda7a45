"""Few-step schedules measured: Karras σ's, log-uniform σ's and the GITS-optimised schedule
(kedavra.diffusion.step_schedule), at 5 and 10 model evaluations.

1. The two clusters' exact denoiser (`kedavra convergence`'s set-up: schedule "ddpm", float64, 10000 samples; and
   the same with SD's schedule, the σ range of the embedded model and of Stable Diffusion): the
   mean distance of each sampler's samples from the reference ODE solution (Heun, 1000 Karras steps) from the same
   noise. The optimised schedule is fitted on other noise (seed 123, 2048 samples) than it is measured on.
2. The embedded model (kedavra-shapes): prompt adherence on held-out prompts (the project's evaluator), the
   schedule optimised on the seen-prompt distribution (its own prompts and noise, not the evaluated ones).

    .venv/bin/python scripts/few_step_schedules.py [--per-kind N] [--skip-model]

Prints Markdown tables; docs/samplers.md ("Few steps") quotes a run.
"""

from __future__ import annotations

import argparse
import time

import torch

import kedavra
from kedavra.data.shapes import ShapesConfig, evaluation_prompts
from kedavra.diffusion.samplers import Denoiser, sample
from kedavra.diffusion.schedule import get_schedule
from kedavra.diffusion.step_schedule import log_uniform_sigmas, optimise_sigmas, table_sigma_range
from kedavra.diffusion.timesteps import karras_sigmas
from kedavra.evaluation.adherence import DEFAULT_GUIDANCE, measure_adherence
from kedavra.pipeline import GenerationRequest
from kedavra.toy.mixture import TWO_MODES, ExactModel

BUDGETS = (5, 10)
# `kedavra convergence`'s schedule (σ_max ≈ 157), and SD's (σ_max ≈ 14.6, the embedded model's)
MIXTURE_SCHEDULES = ("ddpm", "sd")
SAMPLERS = ("euler", "dpmpp_2m", "unipc")
MIXTURE_SAMPLES = 10000
FIT_SAMPLES = 2048
REFERENCE_STEPS = 1000
FIT_PER_KIND = 16  # prompts per kind the embedded model's schedule is fitted on


def mixture_table(schedule_name: str) -> str:
    schedule = get_schedule(schedule_name)
    model = ExactModel(TWO_MODES, schedule, "eps")
    noise = torch.randn(MIXTURE_SAMPLES, TWO_MODES.dim, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    fit_noise = torch.randn(FIT_SAMPLES, TWO_MODES.dim, generator=torch.Generator().manual_seed(123),
                            dtype=torch.float64)
    sigma_min, sigma_max = table_sigma_range(schedule)

    def run(sampler, steps, sigmas):
        return sample(Denoiser(model, "eps"), noise, sampler=sampler, steps=steps, schedule=schedule, sigmas=sigmas)

    reference = run("heun", REFERENCE_STEPS, karras_sigmas(sigma_min, sigma_max, REFERENCE_STEPS))
    lines = ["| sampler | schedule | " + " | ".join(f"NFE {n}" for n in BUDGETS) + " |",
             "|---|---|" + "---|" * len(BUDGETS)]
    schedules = {
        "Karras (ρ = 7)": lambda n: karras_sigmas(sigma_min, sigma_max, n),
        "log-uniform": lambda n: log_uniform_sigmas(sigma_min, sigma_max, n),
        "optimised (GITS)": lambda n: optimise_sigmas(model, fit_noise, schedule, n),
    }
    fitted = {name: {n: make(n) for n in BUDGETS} for name, make in schedules.items()}
    for sampler in SAMPLERS:
        for name in schedules:
            errors = [(run(sampler, n, fitted[name][n]) - reference).norm(dim=1).mean().item() for n in BUDGETS]
            lines.append(f"| `{sampler}` | {name} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")
    lines.append("")
    for n in BUDGETS:
        lines.append(f"optimised σ's, NFE {n}: " + ", ".join(f"{s:.3g}" for s in fitted["optimised (GITS)"][n]))
    return "\n".join(lines)


def model_table(per_kind: int) -> str:
    pipe = kedavra.load("kedavra-shapes")
    schedule = pipe.config.schedule
    sigma_min, sigma_max = table_sigma_range(schedule)
    # the teacher runs on the seen-prompt distribution with the evaluation's guidance, from its own noise
    captions = [spec.caption for spec in evaluation_prompts(ShapesConfig(), per_kind=FIT_PER_KIND, seed=10_000,
                                                            held_out=False)]
    request = pipe.check(GenerationRequest.build(captions, guidance_scale=DEFAULT_GUIDANCE))
    guided = pipe.guided_unet(request)
    latent = pipe.config.image_size // pipe.config.vae.downsample_factor
    fit_noise = torch.randn(len(captions), pipe.config.vae.latent_channels, latent, latent,
                            generator=torch.Generator().manual_seed(10_000))
    rows = ["| sampler | schedule | " + " | ".join(f"{n} steps" for n in BUDGETS) + " |",
            "|---|---|" + "---|" * len(BUDGETS)]
    optimised = {n: tuple(optimise_sigmas(guided, fit_noise, schedule, n, pipe.config.prediction_type).tolist())
                 for n in BUDGETS}

    runs = [("dpmpp_2m", "the model's spacing (kedavra generate's default)", lambda n: {}),
            ("dpmpp_2m", "Karras", lambda n: {"karras": True}),
            ("unipc", "Karras", lambda n: {"karras": True}),
            ("unipc", "log-uniform", lambda n: {"sigmas": tuple(log_uniform_sigmas(sigma_min, sigma_max, n).tolist())}),
            ("unipc", "optimised (GITS)", lambda n: {"sigmas": optimised[n]}),
            ("dpmpp_2m", "optimised (GITS)", lambda n: {"sigmas": optimised[n]}),
            ("euler", "Karras", lambda n: {"karras": True}),
            ("euler", "optimised (GITS)", lambda n: {"sigmas": optimised[n]}),
            ("Euler", "A1111's Karras", lambda n: {"schedule_type": "Karras"}),
            ("Euler", "A1111's KL Optimal", lambda n: {"schedule_type": "KL Optimal"}),
            ("DPM++ 2M", "A1111's Karras", lambda n: {"schedule_type": "Karras"})]
    for sampler, name, settings in runs:
        cells = []
        for n in BUDGETS:
            result = measure_adherence(pipe, per_kind=per_kind, steps=n, sampler=sampler, **settings(n))
            cells.append(f"{result.report.overall:.3f}")
        rows.append(f"| `{sampler}` | {name} | " + " | ".join(cells) + " |")
    for n in BUDGETS:
        rows.append("")
        rows.append(f"optimised σ's, {n} steps: " + ", ".join(f"{s:.3g}" for s in optimised[n]))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-kind", type=int, default=200, help="adherence images per prompt kind")
    parser.add_argument("--skip-model", action="store_true", help="only the exact-denoiser table")
    args = parser.parse_args()
    start = time.perf_counter()
    for name in MIXTURE_SCHEDULES:
        print(f"## Two clusters, exact denoiser, schedule {name!r}: mean distance from the reference ODE solution\n")
        print(mixture_table(name))
        print()
    if not args.skip_model:
        print(f"\n## kedavra-shapes: prompt adherence (overall), held-out prompts, {args.per_kind} per kind\n")
        print(model_table(args.per_kind))
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
