"""Training throughput, kedavra's U-Net against diffusers' UNet2DConditionModel: the same configuration, the same
weights, the same loop and precision, in one process.

    .venv/bin/python scripts/benchmark_training.py                     # small and tiny, bf16 and fp32, 1 thread
    .venv/bin/python scripts/benchmark_training.py --presets small --precision bf16 --rounds 8 --json out.json
(docs/training_benchmark.md gives the command behind its table.)

The configuration is a kedavra.networks.model preset's U-Net ("small": the embedded default model's, "tiny"); diffusers'
model is built from it by tests/test_unet.py's `reference_unet` (the kedavra -> diffusers config mapping of the
parity tests, every parameter drawn under a seed), and kedavra's U-Net loads a copy of the same weights through
kedavra.networks.unet_keys, so both compute the same function: the script prints the largest output difference (fp32 and
under the benchmark's autocast) and the first step's two losses before it times anything.

One training step, identical for both sides:
  1. a batch drawn from a seeded generator: latents z ~ N(0, I) of the preset's latent shape, t ~ U{0..T-1},
     ε ~ N(0, I), x_t = √ᾱ_t z + √(1-ᾱ_t) ε (DDPM eq. 4; SD's schedule), and a fixed random context tensor
     (B, L, D) standing in for the text encoder's output (L = 77 tokens, D = the preset's text width)
  2. forward under the precision's settings: "bf16" = torch.autocast(cpu, bfloat16) with fp32 master weights,
     "fp32" = no autocast; attention through F.scaled_dot_product_attention on both sides (diffusers' default
     AttnProcessor2_0) with the backend that kedavra's trainer picks (--attention)
  3. the MSE to ε in fp32 (kedavra.training.losses.diffusion_loss, no weighting), backward
  4. fused AdamW (kedavra.training.optim.make_optimizer, the unet stage's lr and weight decay), zero_grad(None)
Both models run in train mode, contiguous (NCHW) layout, without gradient checkpointing, as kedavra's trainer runs
its U-Net. Not included: the text encoder, the VAE, EMA, gradient clipping (the same cost on both sides or none).

Timing: --warmup steps per side and precision, then --rounds rounds of --steps timed steps per side, interleaved
as A B B A A B ... (each pair swaps who goes first, which cancels a linear drift of the machine's speed). Each
round's images/s is batch x steps over its wall time; reported: the median over rounds per side, the ratio of
the medians (kedavra / diffusers, above 1 = kedavra faster), the range of the per-round paired ratios, and the
same from the process's CPU time (time.process_time: it leaves out time other processes held the core, though
not their slowing of it; with --threads 1 it is the compute thread's time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))  # the diffusers reference builder and the parity helpers

import diffusers  # noqa: E402
from test_unet import PARITY_ATOL, errors, kedavra_from, reference_unet  # noqa: E402

from kedavra.diffusion.forward_process import add_noise  # noqa: E402
from kedavra.networks.model import PRESETS, ModelConfig  # noqa: E402
from kedavra.networks.unet_keys import convert_unet_state_dict  # noqa: E402
from kedavra.training.config import STAGE_DEFAULTS, TrainConfig  # noqa: E402
from kedavra.training.losses import diffusion_loss  # noqa: E402
from kedavra.training.optim import make_optimizer  # noqa: E402

PRECISIONS = ("bf16", "fp32")
ATTENTION = {
    # kedavra.training.precision.autocast: the math path under bf16 on the CPU (its flash kernel's bf16
    # backward measured 2x slower there), PyTorch's own choice (flash on the CPU) in fp32.
    "training": {"bf16": [SDPBackend.MATH], "fp32": None},
    "math": {"bf16": [SDPBackend.MATH], "fp32": [SDPBackend.MATH]},
    "flash": {"bf16": [SDPBackend.FLASH_ATTENTION], "fp32": [SDPBackend.FLASH_ATTENTION]},
}
WEIGHT_SEED = 0  # reference_unet's seed: every parameter of both models
DRAW_SEED = 1  # the batches: round r draws from seed DRAW_SEED + r, the same numbers for both sides
CONTEXT_SEED = 2  # the fixed random context tensor
LR = STAGE_DEFAULTS["unet"].lr  # kedavra train's unet-stage default
WEIGHT_DECAY = TrainConfig.__dataclass_fields__["weight_decay"].default  # kedavra train's default


@dataclass
class Side:
    """One model under training: its forward as a plain callable, its optimizer, and its timed rounds."""

    name: str
    model: torch.nn.Module
    forward: Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t, context) -> prediction
    optimizer: torch.optim.Optimizer
    rounds: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Batch:
    x_t: Tensor  # (B, C, h, w)
    t: Tensor  # (B,) int64
    eps: Tensor  # (B, C, h, w)


def build_sides(config: ModelConfig) -> tuple[Side, Side]:
    """kedavra's U-Net and diffusers' for `config.unet`, holding equal (separate) copies of one set of weights."""
    theirs = reference_unet(config.unet, seed=WEIGHT_SEED).train()
    copies = {name: tensor.detach().clone() for name, tensor in theirs.state_dict().items()}
    ours = kedavra_from(copies, config.unet).train()
    for model in (ours, theirs):
        model.requires_grad_(True)
    sides = (
        Side("kedavra", ours, ours, make_optimizer(ours.parameters(), LR, WEIGHT_DECAY, torch.device("cpu"))),
        Side("diffusers", theirs, lambda x, t, c: theirs(x, t, encoder_hidden_states=c, return_dict=False)[0],
             make_optimizer(theirs.parameters(), LR, WEIGHT_DECAY, torch.device("cpu"))),
    )
    counts = {side.name: sum(p.numel() for p in side.model.parameters()) for side in sides}
    if counts["kedavra"] != counts["diffusers"]:
        raise SystemExit(f"the two models differ in size: {counts}")
    return sides


def precision_context(precision: str, attention: str) -> contextlib.ExitStack:
    """The forward pass's settings: autocast for bf16, and the attention backend(s) SDPA may use."""
    stack = contextlib.ExitStack()
    if precision == "bf16":
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    backends = ATTENTION[attention][precision]
    if backends is not None:
        stack.enter_context(sdpa_kernel(backends))
    return stack


def draw_batches(config: ModelConfig, batch_size: int, count: int, seed: int) -> list[Batch]:
    """`count` batches of (x_t, t, ε) from one seeded generator (DDPM eq. 4 on N(0, I) latents)."""
    generator = torch.Generator().manual_seed(seed)
    side = config.image_size // config.vae.downsample_factor
    shape = (batch_size, config.unet.in_channels, side, side)
    alpha_bar = config.schedule.alpha_bar.float()  # (T,) ᾱ_t
    batches = []
    for _ in range(count):
        latents = torch.randn(shape, generator=generator)
        t = torch.randint(0, config.schedule.num_train_timesteps, (batch_size,), generator=generator)
        eps = torch.randn(shape, generator=generator)
        batches.append(Batch(add_noise(latents, eps, alpha_bar[t]), t, eps))  # DDPM eq. 4
    return batches


def fixed_context(config: ModelConfig, batch_size: int) -> Tensor:
    """(B, L, D) N(0, I) values in place of the text encoder's output: L = the tokenizer's 77, D its width."""
    generator = torch.Generator().manual_seed(CONTEXT_SEED)
    return torch.randn(batch_size, config.tokenizer.max_length, config.text_encoder.width, generator=generator)


def train_step(side: Side, batch: Batch, context: Tensor, precision: str, attention: str) -> float:
    """Forward under the precision's settings, MSE to ε (DDPM eq. 14, L_simple), backward, AdamW, zero_grad."""
    with precision_context(precision, attention):
        prediction = side.forward(batch.x_t, batch.t, context)
    loss = diffusion_loss(prediction, batch.eps, None).mean()
    loss.backward()
    side.optimizer.step()
    side.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def check_parity(sides: tuple[Side, Side], batch: Batch, context: Tensor, precision: str, attention: str) -> dict:
    """Largest output difference of the two models on `batch`, in fp32 and under the benchmark's precision."""
    found = {}
    with torch.no_grad():
        for label in dict.fromkeys(("fp32", precision)):
            with precision_context(label, attention):
                ours, theirs = (side.forward(batch.x_t, batch.t, context).float() for side in sides)
            found[label] = errors(ours, theirs)
    abs_fp32 = found["fp32"][0]
    if abs_fp32 > PARITY_ATOL:
        raise SystemExit(f"the models do not compute the same function: fp32 max abs difference {abs_fp32:.3g} "
                         f"> {PARITY_ATOL} (tests/test_unet.py's bound)")
    return {label: {"max_abs": a, "max_rel": r} for label, (a, r) in found.items()}


def weight_difference(sides: tuple[Side, Side], config: ModelConfig) -> float:
    """Largest difference between the two models' weights, matched by name through kedavra.networks.unet_keys."""
    ours = sides[0].model.state_dict()
    theirs = convert_unet_state_dict(sides[1].model.state_dict(), "diffusers", config.unet)
    return max((ours[name] - theirs[name].reshape(ours[name].shape)).abs().max().item() for name in ours)


def timed_round(side: Side, batches: list[Batch], context: Tensor, precision: str, attention: str) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    losses = [train_step(side, batch, context, precision, attention) for batch in batches]
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "losses": losses}


def run_case(preset: str, precision: str, args: argparse.Namespace) -> dict:
    """Parity check, warm-up and the interleaved timed rounds of one preset at one precision."""
    config = PRESETS[preset]
    sides = build_sides(config)
    context = fixed_context(config, args.batch_size)
    warmup = draw_batches(config, args.batch_size, max(args.warmup, 1), DRAW_SEED - 1)
    parity = check_parity(sides, warmup[0], context, precision, args.attention)
    first_losses = {}
    for side in sides:
        for i, batch in enumerate(warmup[: args.warmup]):
            loss = train_step(side, batch, context, precision, args.attention)
            if i == 0:
                first_losses[side.name] = loss
    drift = weight_difference(sides, config)
    print(f"{preset} {precision}: {sum(p.numel() for p in sides[0].model.parameters()) / 1e6:.2f} M parameters; "
          f"output max abs diff fp32 {parity['fp32']['max_abs']:.2e} (rel {parity['fp32']['max_rel']:.2e})"
          + (f", {precision} {parity[precision]['max_abs']:.2e} (rel {parity[precision]['max_rel']:.2e})"
             if precision != "fp32" else "")
          + "; first-step loss " + ", ".join(f"{name} {loss:.6f}" for name, loss in first_losses.items())
          + f"; weights after {args.warmup} warm-up step(s) differ by {drift:.2e} at most", flush=True)
    for r in range(args.rounds):
        batches = draw_batches(config, args.batch_size, args.steps, DRAW_SEED + r)
        order = sides if r % 2 == 0 else sides[::-1]  # A B, B A, A B, ...
        for side in order:
            side.rounds.append(timed_round(side, batches, context, precision, args.attention))
        rates = {side.name: args.batch_size * args.steps / side.rounds[-1]["wall_s"] for side in sides}
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v:.1f} img/s" for n, v in rates.items())
              + f"; load average {load_average()}", flush=True)
    return {"preset": preset, "precision": precision, "attention": describe_attention(args.attention, precision),
            "parameters": sum(p.numel() for p in sides[0].model.parameters()), "parity": parity,
            "first_step_loss": first_losses, "weights_max_abs_diff_after_warmup": drift,
            "rounds": {side.name: side.rounds for side in sides},
            **summarize({side.name: side.rounds for side in sides}, args.batch_size * args.steps)}


def summarize(rounds: dict[str, list[dict]], images: int) -> dict:
    """Per clock (wall, CPU): median images/s per side and their ratio, the range of the per-round paired ratios,
    and the fastest round per side (interference from other processes only ever slows a round down)."""
    out = {}
    for clock in ("wall", "cpu"):
        rates = {name: [images / r[f"{clock}_s"] for r in found] for name, found in rounds.items()}
        paired = [a / b for a, b in zip(rates["kedavra"], rates["diffusers"], strict=True)]
        medians = {name: statistics.median(values) for name, values in rates.items()}
        fastest = {name: max(values) for name, values in rates.items()}
        out[clock] = {"images_per_s": medians, "ratio": medians["kedavra"] / medians["diffusers"],
                      "paired_ratio_range": (min(paired), max(paired)), "fastest_round": fastest,
                      "fastest_ratio": fastest["kedavra"] / fastest["diffusers"], "per_round": rates}
    return out


def describe_attention(attention: str, precision: str) -> str:
    backends = ATTENTION[attention][precision]
    return "SDPA, PyTorch's choice" if backends is None else "SDPA " + "/".join(b.name.lower() for b in backends)


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "| U-Net | precision | attention | kedavra img/s | diffusers img/s | kedavra / diffusers | per-round ratios "
        "| fastest rounds, ratio | CPU-time img/s, kedavra | diffusers | ratio | output max abs diff (fp32; bf16) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        wall, cpu = r["wall"], r["cpu"]
        low, high = wall["paired_ratio_range"]
        diffs = "; ".join(f"{d['max_abs']:.1e}" for d in r["parity"].values())
        lines.append(
            f"| {r['preset']} | {r['precision']} | {r['attention']} | {wall['images_per_s']['kedavra']:.1f} "
            f"| {wall['images_per_s']['diffusers']:.1f} | {wall['ratio']:.2f}x | {low:.2f}-{high:.2f} "
            f"| {wall['fastest_round']['kedavra']:.1f} / {wall['fastest_round']['diffusers']:.1f} = "
            f"{wall['fastest_ratio']:.2f}x | {cpu['images_per_s']['kedavra']:.1f} "
            f"| {cpu['images_per_s']['diffusers']:.1f} | {cpu['ratio']:.2f}x | {diffs} |")
    lines += ["", f"Batch {args.batch_size}, {args.threads} thread(s), {args.warmup} warm-up steps per side, median of "
              f"{args.rounds} interleaved rounds of {args.steps} steps per side."]
    return "\n".join(lines)


def cpu_model() -> str:
    fields = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    amx = "AMX" if "amx_bf16" in fields.get("flags", "") else "no AMX"
    name = fields.get("model name", "unknown CPU")
    return f"{name} (family {fields.get('cpu family')}, model {fields.get('model')}, {amx})"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["small", "tiny"], choices=sorted(PRESETS),
                        help="kedavra.networks.model presets whose U-Net is benchmarked (32 px presets: 16x16 latents)")
    parser.add_argument("--batch-size", type=positive, default=STAGE_DEFAULTS["unet"].batch_size)
    parser.add_argument("--steps", type=positive, default=3, help="timed steps per side in each round")
    parser.add_argument("--rounds", type=positive, default=6, help="interleaved timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side before the rounds")
    parser.add_argument("--threads", type=positive, default=1, help="torch.set_num_threads")
    parser.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--attention", default="training", choices=sorted(ATTENTION),
                        help="SDPA backend for both sides; training: as kedavra train (math in bf16, default in fp32)")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    torch.set_num_threads(args.threads)

    print(f"CPU: {cpu_model()}; torch {torch.__version__}, diffusers {diffusers.__version__}, {args.threads} "
          f"thread(s); load average {load_average()}", flush=True)
    started = time.perf_counter()
    results = [run_case(preset, precision, args) for preset in args.presets for precision in args.precision]
    print(f"\n{time.perf_counter() - started:.0f} s in all; load average at the end {load_average()}\n")
    print(markdown(results, args))
    if args.json:
        settings = vars(args) | {"json": str(args.json)}
        args.json.write_text(json.dumps({"cpu": cpu_model(), "torch": torch.__version__,
                                         "diffusers": diffusers.__version__, "args": settings, "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
