"""How fast each sampler converges, measured with the exact denoiser of the two clusters.

With the exact denoiser (no network error), every difference between a sampler's output and the data is the
sampler's own. For each sampler and budget of model evaluations (NFE) this module measures

    sliced W1    the sliced Wasserstein-1 distance between N generated and N exact samples (Rabin et al. 2011,
                 "Wasserstein barycenter and its application to texture mixing"; Bonneel et al. 2015): W1 of the
                 1D projections on random directions, averaged; beside its noise floor, the same distance between
                 independent exact sets of N
    between      the fraction of samples between the modes (`kedavra.toy.mixture.fraction_between`)
    ODE error    (deterministic samplers) the mean Euclidean distance from a reference solution of the same
                 probability-flow ODE from the same initial noise: Heun with `reference_steps` steps. Its slope
                 on log-log axes is the observed order of convergence.

All runs use Karras et al. 2022's σ spacing (eq. 5, ρ = 7) between σ(T-1) and σ(t=0) (the end points of the
"linspace" spacing, the same for every step count), the spacing "DPM++ 2M Karras" uses for few steps, and
end on the clean sample. Heun costs 2n-1 evaluations for n steps, so it gets n = ⌊(budget+1)/2⌋.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from kedavra.diffusion.samplers import SAMPLERS, Denoiser, resolve_sampler, sample
from kedavra.diffusion.schedule import get_schedule
from kedavra.toy.mixture import TWO_MODES, ExactModel, GaussianMixture, expected_fraction_between, fraction_between
from kedavra.validation import check_int, is_int

SPACING = "linspace"  # with karras=True: σ from σ(T-1) to σ(0) for every step count
DDPM_BASELINE_STEPS = 1000  # "1000-step DDPM": ancestral sampling on every training step (Ho et al. 2020)
FLOOR_REPEATS = 10  # independent exact sets the noise floor of the sliced distance is averaged over
ORDER_FIT_FLOOR_FACTOR = 10  # the order fit keeps ODE errors above this multiple of the reference's own error
ORDER_FIT_MAX_ERROR = 0.1  # ... and below this (a quarter of a mode's std: past the few-step, mode-jumping regime)


# samplers that run on their own timestep grids (the distillation grid, diffusers' PNDM timesteps) rather than the
# study's Karras σ's: left out by default
OWN_GRID_SAMPLERS = ("lcm", "tcd", "pndm")


@dataclass(frozen=True)
class ConvergenceConfig:
    """samplers: kedavra sampler names; budgets: NFE targets (ascending); num_samples: N per set;
    num_projections: directions of the sliced distance; schedule: preset name; reference_steps: Heun steps of
    the reference ODE solution (2·steps - 1 evaluations); seed: every random draw derives from it."""

    samplers: tuple[str, ...] = tuple(name for name in SAMPLERS if name not in OWN_GRID_SAMPLERS)
    budgets: tuple[int, ...] = (5, 10, 20, 50, 100, 200, 1000)
    num_samples: int = 10000
    num_projections: int = 128
    schedule: str = "ddpm"
    reference_steps: int = 1000
    seed: int = 0

    def __post_init__(self):
        names = tuple(resolve_sampler(name)[0].name for name in self.samplers)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"samplers must be a non-empty list without repeats, got {self.samplers!r}")
        object.__setattr__(self, "samplers", names)
        T = get_schedule(self.schedule).num_train_timesteps
        budgets = tuple(self.budgets)
        in_range = all(is_int(b) and 2 <= b <= T for b in budgets)
        if not budgets or not in_range or list(budgets) != sorted(set(budgets)):
            raise ValueError(f"budgets must be distinct ascending integers from 2 to {T}, got {self.budgets!r}")
        object.__setattr__(self, "budgets", budgets)
        check_int("num_samples", self.num_samples, low=2)
        check_int("num_projections", self.num_projections, low=1)
        check_int("seed", self.seed, low=0)
        check_int("reference_steps", self.reference_steps, 2, T)


@dataclass(frozen=True)
class ConvergencePoint:
    """One run: sampler, NFE budget, steps taken, evaluations counted, sliced W1, fraction between the modes,
    mean distance from the reference ODE solution (None for stochastic samplers), wall seconds."""

    sampler: str
    budget: int
    steps: int
    nfe: int
    sliced_w1: float
    between: float
    ode_error: float | None
    seconds: float


@dataclass(frozen=True)
class ConvergenceResult:
    """Every run, the yardsticks (noise floor of the sliced distance, mean and std, fraction between the modes of exact
    samples and of the mixture itself, the reference's estimated own error), the 1000-step DDPM baseline on
    the training timesteps and the fitted orders: sampler -> (slope, NFEs used) or None."""

    config: ConvergenceConfig
    points: tuple[ConvergencePoint, ...]
    noise_floor: float
    noise_floor_std: float
    exact_between: float
    expected_between: float
    reference_error: float
    ddpm_baseline: ConvergencePoint
    orders: dict[str, tuple[float, tuple[int, ...]] | None]
    seconds: float


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Mean over unit `directions` (P, D) of W1 between the projections of a and b (both (N, D), same N). Between
    two 1D samples of equal size, W1 is the mean gap between their sorted values (the optimal coupling in 1D is
    monotone)."""
    if a.shape != b.shape:
        raise ValueError(
            f"sliced_wasserstein needs sample sets of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    pa = (a.to(torch.float64) @ directions.T).sort(dim=0).values  # (N, P)
    pb = (b.to(torch.float64) @ directions.T).sort(dim=0).values
    return (pa - pb).abs().mean().item()


def random_directions(num: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """num directions uniform on the unit sphere (normalised Gaussians), float64 (num, dim)."""
    d = torch.randn(num, dim, generator=generator, dtype=torch.float64)
    return d / d.norm(dim=1, keepdim=True)


def steps_for_budget(sampler: str, budget: int) -> int:
    """The most steps whose evaluations fit `budget`: n for one-evaluation samplers, ⌊(budget+1)/2⌋ for Heun."""
    spec = SAMPLERS[sampler]
    steps = budget if spec.evaluations_per_step == 1 else max(1, (budget + 1) // 2)
    while steps > 1 and spec.evaluations(steps) > budget:  # PNDM's extra evaluation
        steps -= 1
    return steps


def fit_order(nfes, errors, floor: float, max_error: float = ORDER_FIT_MAX_ERROR):
    """Least-squares slope of -log(error) against log(NFE) over the points with floor < error < max_error:
    (order, NFEs used), or None with fewer than two such points."""
    kept = [(n, e) for n, e in zip(nfes, errors, strict=True) if floor < e < max_error]
    if len(kept) < 2:
        return None
    xs = [math.log(n) for n, _ in kept]
    ys = [math.log(e) for _, e in kept]
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True)) / sum((x - x_mean) ** 2 for x in xs)
    return -slope, tuple(n for n, _ in kept)


def run_convergence(
    config: ConvergenceConfig = ConvergenceConfig(), mixture: GaussianMixture = TWO_MODES, progress: bool = False
) -> ConvergenceResult:
    """Run every sampler at every budget with the exact denoiser from the same noise (float64)."""
    start = time.perf_counter()
    schedule = get_schedule(config.schedule)
    model = ExactModel(mixture, schedule, "eps")
    n, seed = config.num_samples, config.seed
    noise = torch.randn(n, mixture.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = mixture.sample(n, torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    directions = random_directions(config.num_projections, mixture.dim, torch.Generator().manual_seed(seed + 2))
    floor_generator = torch.Generator().manual_seed(seed + 3)
    floors = torch.tensor(
        [
            sliced_wasserstein(mixture.sample(n, floor_generator, torch.float64), exact, directions)
            for _ in range(FLOOR_REPEATS)
        ]
    )

    def run(sampler: str, steps: int, budget: int, **options) -> tuple[torch.Tensor, ConvergencePoint]:
        tic = time.perf_counter()
        denoiser = Denoiser(model, "eps")
        x = sample(
            denoiser,
            noise,
            sampler=sampler,
            steps=steps,
            schedule=schedule,
            generator=torch.Generator().manual_seed(seed + 4),
            **({"spacing": SPACING, "karras": True} | options),
        )
        point = ConvergencePoint(
            sampler,
            budget,
            steps,
            denoiser.evaluations,
            sliced_wasserstein(x, exact, directions),
            fraction_between(x, mixture),
            None,
            time.perf_counter() - tic,
        )
        return x, point

    jobs = [(s, b) for s in config.samplers for b in config.budgets]
    bar = tqdm(total=len(jobs) + 3, desc="convergence", disable=not progress, unit="run")
    reference, _ = run("heun", config.reference_steps, 2 * config.reference_steps - 1)
    coarse, _ = run("heun", config.reference_steps // 2, config.reference_steps - 1)
    # Heun's error falls as 1/n², so |x_n - x_{n/2}| ≈ 3 |x_n - x_exact| (Richardson's estimate)
    reference_error = (coarse - reference).norm(dim=1).mean().item() / 3
    bar.update(2)
    _, baseline = run("ddpm", DDPM_BASELINE_STEPS, DDPM_BASELINE_STEPS, karras=False)
    bar.update(1)
    points = []
    for sampler, budget in jobs:
        x, point = run(sampler, steps_for_budget(sampler, budget), budget)
        if not SAMPLERS[sampler].stochastic:
            point = replace(point, ode_error=(x - reference).norm(dim=1).mean().item())
        points.append(point)
        bar.update(1)
    bar.close()
    orders = {}
    for sampler in config.samplers:
        runs = [p for p in points if p.sampler == sampler and p.ode_error is not None]
        if runs:
            orders[sampler] = fit_order(
                [p.nfe for p in runs], [p.ode_error for p in runs], ORDER_FIT_FLOOR_FACTOR * reference_error
            )
    return ConvergenceResult(
        config,
        tuple(points),
        floors.mean().item(),
        floors.std().item(),
        fraction_between(exact, mixture),
        expected_fraction_between(mixture),
        reference_error,
        baseline,
        orders,
        time.perf_counter() - start,
    )


def identical_runs(result: ConvergenceResult) -> dict[str, str]:
    """sampler -> an earlier sampler whose runs gave the same numbers at every budget. DDIM (η = 0) is Euler in
    the VE view, and DDPM is Euler ancestral drawing the same noise (tests/test_samplers.py checks both), so
    those pairs coincide up to rounding."""
    runs = {s: [(p.sliced_w1, p.between) for p in result.points if p.sampler == s] for s in result.config.samplers}
    twins = {}
    for i, sampler in enumerate(result.config.samplers):
        for other in result.config.samplers[:i]:
            if all(
                math.isclose(a, b, rel_tol=1e-6) and c == d
                for (a, c), (b, d) in zip(runs[sampler], runs[other], strict=True)
            ):
                twins[sampler] = other
                break
    return twins


def markdown_report(result: ConvergenceResult) -> str:
    """The study as Markdown: set-up, the sampler × NFE table, the order table and the DPM++ 2M comparison."""
    cfg = result.config
    lines = [
        "# Sampler convergence on two clusters, exact denoiser",
        "",
        f"Schedule `{cfg.schedule}`, Karras σ spacing (ρ = 7) from σ(T-1) to σ(0), N = {cfg.num_samples} samples "
        f"per set, {cfg.num_projections} projections, seed {cfg.seed}; {result.seconds:.0f} s in all.",
        "",
        f"- Noise floor of the sliced W1 (between independent exact sets of N, mean ± std over {FLOOR_REPEATS}): "
        f"**{result.noise_floor:.4f} ± {result.noise_floor_std:.4f}**. A sampler within it is indistinguishable "
        "from exact sampling at this N.",
        f"- Fraction between the modes: exact samples {_percent(result.exact_between)}, the mixture itself "
        f"{_percent(result.expected_between)}.",
        f"- Reference ODE solution: Heun, {cfg.reference_steps} steps ({2 * cfg.reference_steps - 1} evaluations); "
        f"its own error ≈ {result.reference_error:.2e} (Richardson estimate from half the steps).",
        "",
        "## Sliced W1 / fraction between the modes",
        "",
        "| sampler | " + " | ".join(f"NFE {b}" for b in cfg.budgets) + " |",
        "|---|" + "---|" * len(cfg.budgets),
    ]
    for sampler in cfg.samplers:
        cells = []
        for budget in cfg.budgets:
            p = _point(result, sampler, budget)
            nfe = f" (NFE {p.nfe})" if p.nfe != budget else ""
            cells.append(f"{p.sliced_w1:.4f} / {_percent(p.between)}{nfe}")
        lines.append(f"| `{sampler}` | " + " | ".join(cells) + " |")
    base = result.ddpm_baseline
    twins = identical_runs(result)
    if twins:
        pairs = ", ".join(f"`{a}` = `{b}`" for a, b in twins.items())
        lines += ["", f"Identical rows ({pairs}): the same method in two views, from the same noise."]
    lines += [
        "",
        f"Baseline, `ddpm` on all {base.steps} training timesteps (no Karras σ): sliced W1 "
        f"{base.sliced_w1:.4f}, between {_percent(base.between)}.",
        "",
    ]
    deterministic = [s for s in cfg.samplers if not SAMPLERS[s].stochastic]
    if deterministic:
        lines += [
            "## Distance from the reference ODE solution (mean over samples) and observed order",
            "",
            "| sampler | " + " | ".join(f"NFE {b}" for b in cfg.budgets) + " | order | fitted on NFE |",
            "|---|" + "---|" * (len(cfg.budgets) + 2),
        ]
        for sampler in deterministic:
            errors = [f"{_point(result, sampler, b).ode_error:.2e}" for b in cfg.budgets]
            order = result.orders.get(sampler)
            fit = (f"{order[0]:.2f} | {', '.join(map(str, order[1]))}") if order else "- | too few points"
            lines.append(f"| `{sampler}` | " + " | ".join(errors) + f" | {fit} |")
        lines += [
            "",
            f"Orders: slope of log(error) against log(NFE) over errors between "
            f"{ORDER_FIT_FLOOR_FACTOR}× the reference's error and {ORDER_FIT_MAX_ERROR}.",
            "",
        ]
    lines += comparison_lines(result)
    return "\n".join(lines) + "\n"


def comparison_lines(result: ConvergenceResult) -> list[str]:
    """DPM-Solver++ 2M at 10 and 20 evaluations against 1000-step DDPM, in words and numbers."""
    base = result.ddpm_baseline
    runs = [
        _point(result, "dpmpp_2m", b)
        for b in (10, 20)
        if "dpmpp_2m" in result.config.samplers and b in result.config.budgets
    ]
    if not runs:
        return []
    lines = ["## DPM-Solver++ 2M against 1000-step DDPM", ""]
    for p in runs:
        lines.append(
            f"- `dpmpp_2m`, {p.nfe} evaluations: sliced W1 {p.sliced_w1:.4f} "
            f"({p.sliced_w1 / result.noise_floor:.1f}× the noise floor), between {_percent(p.between)}."
        )
    lines.append(
        f"- `ddpm`, {base.nfe} evaluations: sliced W1 {base.sliced_w1:.4f} "
        f"({base.sliced_w1 / result.noise_floor:.1f}× the noise floor), between {_percent(base.between)}."
    )
    return lines + [""]


def _point(result: ConvergenceResult, sampler: str, budget: int) -> ConvergencePoint:
    return next(p for p in result.points if p.sampler == sampler and p.budget == budget)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"
