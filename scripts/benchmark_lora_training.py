"""LoRA training against full fine-tuning: images/s and peak memory of kedavra's training step on one U-Net, the
two side by side in one run, and their ratios.

    .venv/bin/python scripts/benchmark_lora_training.py                      # SD 1.5's U-Net, 64 px, torch's threads
    .venv/bin/python scripts/benchmark_lora_training.py --threads 1 --json lora.json
    .venv/bin/python scripts/benchmark_lora_training.py --preset tiny --steps 2 --rounds 1   # a quick check

The U-Net is kedavra.networks.model's preset (default "sd15": SD 1.5's 860 M-parameter U-Net) with RANDOM weights
drawn under a fixed seed (no checkpoint is read: the speed and memory of a step do not depend on the values), the
same weights for both variants:
  full  every U-Net weight trains (`kedavra train --init MODEL --stage unet --freeze-text-encoder`)
  lora  the base weights frozen, a LoRA of --rank (and --alpha) injected by kedavra.adapters.lora_training, the
        attention blocks' layers by default, --conv adding the ResNet convolutions (`kedavra train --lora RANK`)
One step is the trainer's (kedavra.training.loop.Trainer._train_step) on a batch that is already latents: the
diffusion objective (kedavra.training.losses.DiffusionObjective, min-SNR-γ 5, ε-prediction) under the trainer's
autocast (kedavra.training.precision), backward, the gradient norm clipped at 1, fused AdamW
(kedavra.training.optim) and the EMA update (kedavra.training.ema) over the trained parameters, zero_grad. Left
out, the same for both variants: the VAE (the trainer's latent cache encodes each image once per run) and the text
encoder (frozen in both; the trainer caches its output per caption), so the U-Net gets a fixed random context
(B, 77, D) and random latents, t and ε from a seeded generator.

Memory: each variant runs in a fresh process (this script started again with --worker), so one variant's
allocations cannot hide the other's. The peak is Linux's VmHWM (peak resident set) over the training steps only:
reset (/proc/self/clear_refs) after the model is built, read after the last step; it includes the weights, so
"added" (peak minus the resident set before the first step) is what training costs on top of holding the model:
gradients, optimizer and EMA state, activations. On CUDA (--device cuda) torch.cuda.max_memory_allocated instead.
Full fine-tuning of SD 1.5's U-Net needs about 17 GB here (fp32 weights, gradients, two AdamW moments, EMA).

Timing: --rounds rounds, each running the two variants one after the other in separate processes, the order
swapped every round (full lora, lora full, ...); each process runs --warmup untimed steps, then --steps timed ones.
Reported: the median images/s over rounds per variant, lora / full ratios of images/s and of peak memory.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kedavra.adapters.lora_training import inject_lora  # noqa: E402
from kedavra.networks.model import PRESETS, StableDiffusion  # noqa: E402
from kedavra.networks.unet import UNet  # noqa: E402
from kedavra.training.config import STAGE_DEFAULTS, TrainConfig  # noqa: E402
from kedavra.training.ema import EMA  # noqa: E402
from kedavra.training.losses import DiffusionObjective  # noqa: E402
from kedavra.training.optim import make_optimizer, set_learning_rate  # noqa: E402
from kedavra.training.precision import autocast  # noqa: E402

VARIANTS = ("full", "lora")
WEIGHT_SEED = 0  # the U-Net's random weights, the same in both variants
DRAW_SEED = 1  # latents, t, ε of the steps: the same numbers for both variants
CONTEXT_SEED = 2  # the fixed random text context
DEFAULTS = TrainConfig(init="x", stage="unet")  # kedavra train's defaults for a fine-tune
LR = {"full": STAGE_DEFAULTS["unet"].lr, "lora": STAGE_DEFAULTS["lora"].lr}  # each variant's default
MIN_SNR_GAMMA, GRAD_CLIP, EMA_DECAY = DEFAULTS.min_snr_gamma, DEFAULTS.grad_clip, DEFAULTS.ema_decay


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sd15", choices=[p for p in PRESETS if not PRESETS[p].inpainting],
                        help="the U-Net's preset (default sd15; tiny for a quick check)")
    parser.add_argument("--image-size", type=int, default=64, help="training image side in pixels (default 64: "
                        "8x8 latents for SD 1.5, small enough for this CPU)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--conv", action="store_true", help="LoRA on the ResNet convolutions too (LoCon)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=DEFAULTS.precision)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first, per process (default 1)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each running both variants (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant in this process
    return parser.parse_args(argv)


def resident_kb(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in KiB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def memory_now(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else resident_kb("VmRSS") * 1024


def memory_peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resident_kb("VmHWM") * 1024


def build(variant: str, args: argparse.Namespace, device: torch.device):
    """(U-Net, trained parameters by name, parameter count) of one variant, the U-Net's weights drawn under
    WEIGHT_SEED; the text encoder and VAE are never built (meta tensors), being out of the measured step."""
    config = PRESETS[args.preset]
    with torch.device("meta"):
        model = StableDiffusion(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHT_SEED)
        model.unet = UNet(config.unet)
    model.unet.to(device).train()
    model.unet.enable_gradient_checkpointing(args.gradient_checkpointing)
    if variant == "lora":
        model.unet.requires_grad_(False)
        network = inject_lora(model, args.rank, args.alpha, conv=args.conv)
        params = network.named_parameters()
        for parameter in params.values():
            parameter.requires_grad_(True)
    else:
        params = {f"unet.{name}": p for name, p in model.unet.named_parameters()}
    return model.unet, params, sum(p.numel() for p in model.unet.parameters())


def worker(args: argparse.Namespace) -> dict:
    """One variant: build, warm up, time --steps steps; the numbers as a dict (printed as JSON by main)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variant = args.worker
    config = PRESETS[args.preset]
    unet, params, total = build(variant, args, device)
    reset_peak(device)
    before = memory_now(device)  # the model alone: what training adds is measured from here
    objective = DiffusionObjective(unet, config.schedule.alpha_bar, config.prediction_type, MIN_SNR_GAMMA)
    optimizer = make_optimizer(params.values(), LR[variant], DEFAULTS.weight_decay, device)
    set_learning_rate(optimizer, LR[variant])
    ema = EMA(params, EMA_DECAY)
    generator = torch.Generator().manual_seed(DRAW_SEED)
    side = args.image_size // config.vae.downsample_factor
    shape = (args.batch_size, config.unet.in_channels, side, side)
    context = torch.randn(args.batch_size, config.tokenizer.max_length, config.unet.context_dim,
                          generator=torch.Generator().manual_seed(CONTEXT_SEED)).to(device)

    def step() -> float:
        z, eps = torch.randn(shape, generator=generator).to(device), torch.randn(shape, generator=generator).to(device)
        t = torch.randint(0, config.schedule.num_train_timesteps, (args.batch_size,), generator=generator).to(device)
        with autocast(args.precision, device):
            loss = objective(x0=z, noise=eps, t=t, context=context)["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), GRAD_CLIP)
        optimizer.step()
        ema.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    losses = [step() for _ in range(args.steps)]
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"variant": variant, "images_per_s": args.batch_size * args.steps / wall, "wall_s": wall, "cpu_s": cpu,
            "peak_bytes": memory_peak(device), "before_bytes": before, "trained_parameters":
            sum(p.numel() for p in params.values()), "unet_parameters": total, "losses": losses,
            "threads": torch.get_num_threads()}


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The settings as flags for a worker process (every option but --json and --worker)."""
    argv = []
    for name, value in vars(args).items():
        if name in ("json", "worker") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def run_variant(variant: str, argv: list[str]) -> dict:
    """The variant in a fresh process (this script with --worker); its JSON line."""
    done = subprocess.run([sys.executable, __file__, *argv, "--worker", variant], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {variant} worker failed (status {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return
    if args.device == "cpu" and not Path("/proc/self/clear_refs").exists():
        raise SystemExit("peak memory on the CPU is read from Linux's /proc/self/status; this is not Linux")
    passed = worker_argv(args)
    print(f"{args.preset} U-Net (random weights), {args.image_size} px, batch {args.batch_size}, {args.precision}, "
          f"LoRA rank {args.rank} alpha {args.alpha if args.alpha is not None else args.rank}"
          f"{' + conv' if args.conv else ''}, {args.threads or f'torch default {torch.get_num_threads()}'} threads, "
          f"{args.rounds} rounds x {args.steps} steps")
    rounds: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for index in range(args.rounds):
        for variant in VARIANTS if index % 2 == 0 else VARIANTS[::-1]:
            result = run_variant(variant, passed)
            rounds[variant].append(result)
            added = (result["peak_bytes"] - result["before_bytes"]) / 2**30
            print(f"  round {index + 1} {variant:4s}: {result['images_per_s']:.3f} images/s, peak "
                  f"{result['peak_bytes'] / 2**30:.2f} GiB (added {added:.2f} GiB)")
    summary = {}
    for variant, results in rounds.items():
        summary[variant] = {
            "images_per_s": statistics.median(r["images_per_s"] for r in results),
            "peak_gib": max(r["peak_bytes"] for r in results) / 2**30,
            "added_gib": max(r["peak_bytes"] - r["before_bytes"] for r in results) / 2**30,
            "trained_parameters": results[0]["trained_parameters"],
        }
    full, lora = summary["full"], summary["lora"]
    ratios = {"images_per_s": lora["images_per_s"] / full["images_per_s"], "peak": lora["peak_gib"] / full["peak_gib"],
              "added": lora["added_gib"] / full["added_gib"]}
    print(f"{'':6s}{'images/s':>10s}{'peak GiB':>10s}{'added GiB':>11s}{'trained params':>16s}")
    for variant in VARIANTS:
        s = summary[variant]
        print(f"{variant:6s}{s['images_per_s']:10.3f}{s['peak_gib']:10.2f}{s['added_gib']:11.2f}"
              f"{s['trained_parameters'] / 1e6:14.2f} M")
    print(f"lora / full: images/s x{ratios['images_per_s']:.2f}, peak memory x{ratios['peak']:.2f}, "
          f"added memory x{ratios['added']:.2f}")
    if args.json is not None:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "worker")}
        report = {"settings": settings, "rounds": rounds, "summary": summary, "ratios": ratios}
        args.json.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
