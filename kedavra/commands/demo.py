"""`kedavra demo` (two clusters: train a toy denoiser, draw the forward and reverse process) and
`kedavra convergence` (how fast each sampler converges, with the exact denoiser)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kedavra.diffusion.samplers import resolve_sampler
from kedavra.diffusion.schedule import get_schedule
from kedavra.diffusion.timesteps import check_steps
from kedavra.toy.convergence import ConvergenceConfig, ConvergenceResult, markdown_report, run_convergence
from kedavra.toy.figures import (
    landing_modes,
    plot_convergence,
    plot_forward,
    plot_landing,
    plot_reverse,
    sample_with_paths,
)
from kedavra.toy.mixture import MODE_NAMES, TWO_MODES, ExactModel, expected_fraction_between, fraction_between
from kedavra.toy.mlp import ToyTrainConfig, TrainResult, train_toy_mlp
from kedavra.validation import check_int

DEFAULT_DEMO_DIR = "out/two_modes"
DEFAULT_CONVERGENCE_DIR = "out/convergence"
DEMO_SAMPLES = 4000  # final samples per denoiser: enough for a histogram that resolves the 0.6% between the modes
DEMO_SAMPLER = "ddpm"  # the reverse process as DDPM defines it (Ho et al. 2020, Algorithm 2) ...
DEMO_STEPS = 1000  # ... on every training timestep
DEMO_SPACING = "trailing"  # with fewer steps, still start from t = T-1
NUM_PATHS = 48  # reverse paths drawn in figure (b)
# The toy's tensors are tiny ((B, 2) with B <= 20000): intra-op threads buy little, and on this 2-core machine, with
# other jobs running, a training step took 33 ms on 2 threads against 7 ms on 1. The commands run on one.
TOY_THREADS = 1


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="two clusters (cats, dogs): train a toy denoiser, draw diffusion dissolving and rebuilding them",
        description="Train a small denoiser MLP on two 2D clusters, sample with it and with the exact denoiser, "
        "and write three PNG figures: the forward process, reverse paths, and where the samples land.",
    )
    demo.add_argument("-o", "--out-dir", default=DEFAULT_DEMO_DIR, help=f"output folder (default {DEFAULT_DEMO_DIR})")
    demo.add_argument("--seed", type=int, default=ToyTrainConfig.seed, help="seed of every random draw")
    demo.add_argument(
        "--train-steps",
        type=int,
        default=ToyTrainConfig.steps,
        help=f"AdamW steps of the MLP (default {ToyTrainConfig.steps})",
    )
    demo.add_argument(
        "--samples", type=int, default=DEMO_SAMPLES, help=f"samples per denoiser (default {DEMO_SAMPLES})"
    )
    demo.add_argument("--sampler", default=DEMO_SAMPLER, help=f"sampler name (default {DEMO_SAMPLER})")
    demo.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"sampling steps (default {DEMO_STEPS})")
    demo.set_defaults(func=run_demo_command)

    convergence = subparsers.add_parser(
        "convergence",
        help="sampler error against model evaluations, with the exact two-cluster denoiser",
        description="Run every sampler at several budgets of model evaluations with the exact denoiser of two "
        "clusters; write a Markdown report (sliced Wasserstein distance, fraction between the modes, "
        "observed order of convergence) and a log-log plot.",
    )
    convergence.add_argument(
        "-o", "--out-dir", default=DEFAULT_CONVERGENCE_DIR, help=f"output folder (default {DEFAULT_CONVERGENCE_DIR})"
    )
    convergence.add_argument(
        "--samples",
        type=int,
        default=ConvergenceConfig.num_samples,
        help=f"samples per set (default {ConvergenceConfig.num_samples})",
    )
    convergence.add_argument("--seed", type=int, default=ConvergenceConfig.seed, help="seed of every random draw")
    convergence.add_argument(
        "--samplers", default=",".join(ConvergenceConfig.samplers), help="comma-separated sampler names (default: all)"
    )
    convergence.add_argument(
        "--nfe",
        default=",".join(map(str, ConvergenceConfig.budgets)),
        help=f"comma-separated budgets of model evaluations (default {','.join(map(str, ConvergenceConfig.budgets))})",
    )
    convergence.add_argument(
        "--reference-steps",
        type=int,
        default=ConvergenceConfig.reference_steps,
        help=f"Heun steps of the reference ODE solution (default {ConvergenceConfig.reference_steps})",
    )
    convergence.set_defaults(func=run_convergence_command)


def prepare_out_dir(path: str | Path) -> Path:
    """Create the output folder if needed; ValueError if it cannot be created or written to."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output path {str(path)!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".kedavra-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"cannot write to output directory {str(path)!r}: {error.strerror or error}") from error
    return path


@contextlib.contextmanager
def torch_threads(num_threads: int):
    """Run the block with `num_threads` intra-op threads, then restore the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class DemoResult:
    """The training run, the fraction of samples between the modes and on each mode per denoiser, the files."""

    training: TrainResult
    between: dict[str, float]
    shares: dict[str, tuple[float, float]]
    files: tuple[Path, ...]
    seconds: float


def run_demo(
    out_dir: str | Path = DEFAULT_DEMO_DIR,
    seed: int = ToyTrainConfig.seed,
    train_steps: int = ToyTrainConfig.steps,
    num_samples: int = DEMO_SAMPLES,
    sampler: str = DEMO_SAMPLER,
    steps: int = DEMO_STEPS,
    progress: bool = False,
) -> DemoResult:
    """Train the toy MLP, sample with it and with the exact denoiser from the same noise, write the figures."""
    start = time.perf_counter()
    check_int("--seed", seed, low=0)
    check_int("--train-steps", train_steps, low=1)
    check_int("--samples", num_samples, low=1)
    config = ToyTrainConfig(steps=train_steps, seed=seed)
    schedule = get_schedule(config.schedule)
    resolve_sampler(sampler)
    check_steps(steps, schedule.num_train_timesteps)
    out = prepare_out_dir(out_dir)
    training = train_toy_mlp(TWO_MODES, config, progress=progress)
    noise = torch.randn(num_samples, TWO_MODES.dim, generator=torch.Generator().manual_seed(seed))
    models = {"exact denoiser": ExactModel(TWO_MODES, schedule, "eps"), "trained MLP": training.model}
    finals, paths = {}, {}
    for label, model in models.items():
        with torch.no_grad():
            finals[label], trajectory = sample_with_paths(
                model,
                noise,
                min(NUM_PATHS, num_samples),
                sampler=sampler,
                steps=steps,
                schedule=schedule,
                spacing=DEMO_SPACING,
                generator=torch.Generator().manual_seed(seed + 1),
            )
        paths[label] = (trajectory, f"{sampler}, {steps} steps")
    files = (out / "forward.png", out / "reverse_paths.png", out / "landing.png")
    plot_forward(TWO_MODES, schedule, files[0], generator=torch.Generator().manual_seed(seed + 2))
    plot_reverse(paths, TWO_MODES, files[1])
    plot_landing(finals, TWO_MODES, files[2])
    between = {label: fraction_between(x, TWO_MODES) for label, x in finals.items()}
    shares = {
        label: tuple((landing_modes(x, TWO_MODES) == k).double().mean().item() for k in range(2))
        for label, x in finals.items()
    }
    return DemoResult(training, between, shares, files, time.perf_counter() - start)


def run_demo_command(args) -> int:
    with torch_threads(TOY_THREADS):
        result = run_demo(
            args.out_dir, args.seed, args.train_steps, args.samples, args.sampler, args.steps, progress=True
        )
    t = result.training
    print(
        f"trained the toy MLP: {len(t.losses)} steps in {t.seconds:.1f} s; held-out loss {t.eval_loss_start:.4f} "
        f"-> {t.eval_loss_end:.4f} (exact denoiser: {t.eval_loss_exact:.4f}, the best possible in expectation)"
    )
    print(f"sampled {args.samples} points per denoiser with {args.sampler}, {args.steps} steps, from the same noise:")
    print(f"  {'':16s}{'between the modes':>20s}{MODE_NAMES[0]:>10s}{MODE_NAMES[1]:>10s}")
    for label, fraction in result.between.items():
        left, right = result.shares[label]
        print(f"  {label:16s}{100 * fraction:19.2f}%{100 * left:9.1f}%{100 * right:9.1f}%")
    print(f"  {'data':16s}{100 * expected_fraction_between(TWO_MODES):19.2f}%{50:9.1f}%{50:9.1f}%")
    print("wrote:")
    for path in result.files:
        print(f"  {path}")
    print(f"done in {result.seconds:.1f} s")
    return 0


def _split(text: str, name: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        raise ValueError(f"{name} needs at least one comma-separated value, got {text!r}")
    return items


def run_convergence_command(args) -> int:
    check_int("--samples", args.samples, low=2)
    check_int("--seed", args.seed, low=0)
    try:
        budgets = tuple(int(b) for b in _split(args.nfe, "--nfe"))
    except ValueError as error:
        raise ValueError(f"--nfe must be comma-separated integers, got {args.nfe!r}") from error
    config = ConvergenceConfig(
        samplers=_split(args.samplers, "--samplers"),
        budgets=budgets,
        num_samples=args.samples,
        reference_steps=args.reference_steps,
        seed=args.seed,
    )
    out = prepare_out_dir(args.out_dir)
    with torch_threads(TOY_THREADS):
        result = run_convergence(config, progress=True)
        files = write_convergence(result, out)
    print(markdown_report(result))
    print("wrote:")
    for path in files:
        print(f"  {path}")
    return 0


def write_convergence(result: ConvergenceResult, out: Path) -> tuple[Path, Path]:
    """The Markdown report and the log-log plot, into `out`."""
    report, plot = out / "convergence.md", out / "convergence.png"
    report.write_text(markdown_report(result) + f"\n![convergence]({plot.name})\n")
    plot_convergence(result, plot)
    return report, plot
