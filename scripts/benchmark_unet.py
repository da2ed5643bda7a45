"""SD 1.5's U-Net side by side in one process: diffusers, kedavra eager, packed and compiled, against the matmul peak.

    .venv/bin/python scripts/benchmark_unet.py --size 512                      # torch's default threads
    .venv/bin/python scripts/benchmark_unet.py --size 512 --threads 1
    .venv/bin/python scripts/benchmark_unet.py --size 256 --configs kedavra kedavra-compiled
    .venv/bin/python scripts/benchmark_unet.py --size 512 --configs diffusers-fp32 kedavra-eager kedavra  # fp32
    .venv/bin/python scripts/benchmark_unet.py --size 512 --configs diffusers-fp32 kedavra kedavra-int8  # no bf16
(docs/benchmark.md gives the commands behind its tables.)

One process holds every configuration, each with its own copy of the same random weights (diffusers'
UNet2DConditionModel with SD 1.5's sizes, re-drawn under WEIGHT_SEED by tests/reference_models.randomize; kedavra's
U-Nets get them through convert_unet_state_dict), and calls them in turn on the same classifier-free guidance batch
(2 latents of size/8, t = 500, a 77-token context; bf16, channels-last): round after round, so a drift of the
machine's speed reaches every configuration alike. With diffusers-fp32 among them everything runs in fp32 instead:
what kedavra runs by default on a CPU without native bf16 (no AMX or AVX-512 BF16), where bf16 is emulated.
Configurations (--configs):

    diffusers-bf16    diffusers at its best CPU settings: bf16, channels_last, SDPA (AttnProcessor2_0)
    diffusers-fp32    the same in fp32 (then every configuration runs in fp32, kedavra-int8's float layers too;
                      not with diffusers-bf16)
    kedavra-eager     kedavra's U-Net, bf16, channels_last, no packed weights (Pipeline(optimize=False))
    kedavra           as kedavra.Pipeline runs it on the CPU: packed oneDNN weights (optimize_for_inference), and
                      on a CPU with AVX-512 BF16 but no AMX kedavra's attention kernel (networks/cpu_attention.py)
    kedavra-sdpa      the same with that kernel switched off (KEDAVRA_CPU_ATTENTION=0): torch's SDPA throughout
    kedavra-int8      kedavra --precision int8: the packed U-Net with its large conv and linear layers as oneDNN
                      int8 products (networks/int8.py; weights per channel, activations from each call: per
                      row and centred for linear and 1x1 layers, per tensor with a bias correction for 3x3)
    kedavra-compiled  the eager U-Net through torch.compile (inductor, default mode, frozen weights:
                      benchmark_sdxl.compiled), with SDPA; its first call, the compilation, is reported apart

Reported per configuration: the first call (kernel choice, packing, compilation), the median and minimum of the
timed calls (wall seconds) and of the calling thread's CPU seconds, the U-Net's achieved TFLOP/s (FLOPs of one
forward counted by benchmark_pipeline.unet_flops, attention included) and its fraction of the bf16 matmul peak
(benchmark_pipeline.matmul_peak, measured in this process before and after the rounds; the higher is used), the
speed-up over diffusers-bf16 (median of the per-round ratios) and the output's distance from diffusers-bf16's
(max |out - ref| / max |ref|, last round).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the seeded re-draw of the reference weights lives in the test helpers

from benchmark_pipeline import cpu_model, load_average, matmul_peak, unet_flops  # noqa: E402
from benchmark_sdxl import agreement, compiled  # noqa: E402

from kedavra.networks import cpu_attention  # noqa: E402

CONFIGS = ("diffusers-bf16", "diffusers-fp32", "kedavra-eager", "kedavra", "kedavra-sdpa", "kedavra-int8",
           "kedavra-compiled")
SDPA_ONLY = ("kedavra-sdpa", "kedavra-compiled")  # run with kedavra's CPU attention kernel switched off
REFERENCES = {torch.bfloat16: "diffusers-bf16", torch.float32: "diffusers-fp32"}  # the diffusers run of each dtype
WEIGHT_SEED = 0
INPUT_SEED = 1
TIMESTEP = 500.0  # mid-schedule: the cost of a call does not depend on it
CONTEXT_TOKENS = 77


def reference_unet(dtype: torch.dtype) -> torch.nn.Module:
    """diffusers' U-Net with SD 1.5's sizes (its defaults, cross-attention width 768) in `dtype`, seeded weights."""
    from diffusers import UNet2DConditionModel
    from reference_models import randomize

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768).to(dtype)
    unet.to_empty(device="cpu")
    randomize(unet, torch.Generator().manual_seed(WEIGHT_SEED))
    return unet.eval()


def build(config: str, reference: torch.nn.Module, dtype: torch.dtype):
    """call(x, t, context) -> (B, 4, h, w) for one configuration, on its own copy of the reference weights."""
    if config.startswith("diffusers"):
        from diffusers.models.attention_processor import AttnProcessor2_0

        reference.to(memory_format=torch.channels_last).set_attn_processor(AttnProcessor2_0())
        return lambda x, t, context: reference(x, t, encoder_hidden_states=context).sample
    from kedavra.networks.acceleration import optimize_for_inference
    from kedavra.networks.model import PRESETS
    from kedavra.networks.unet import UNet
    from kedavra.networks.unet_keys import convert_unet_state_dict

    config_unet = PRESETS["sd15"].unet
    state = convert_unet_state_dict(reference.state_dict(), "diffusers", config_unet)
    with torch.device("meta"):
        unet = UNet(config_unet)
    unet.load_state_dict({name: tensor.clone() for name, tensor in state.items()}, strict=True, assign=True)
    unet.eval().to(memory_format=torch.channels_last)
    if config == "kedavra-int8":  # as Pipeline(dtype="int8") does: the int8 twins first, then packing
        from kedavra.networks.int8 import quantise_unet

        quantise_unet(unet)
    if config in ("kedavra", "kedavra-sdpa", "kedavra-int8"):
        optimize_for_inference(unet, "cpu", dtype)
    run = compiled(unet) if config == "kedavra-compiled" else unet
    if config not in SDPA_ONLY:
        return lambda x, t, context: run(x, t, context)

    def call_with_sdpa(x, t, context):
        with cpu_attention.switched_off():
            return run(x, t, context)

    return call_with_sdpa


def inputs(size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(INPUT_SEED)
    side = size // 8  # SD's VAE downsampling factor
    x = torch.randn(2, 4, side, side, generator=generator).to(dtype)
    context = torch.randn(2, CONTEXT_TOKENS, 768, generator=generator).to(dtype)
    return x.contiguous(memory_format=torch.channels_last), torch.full((2,), TIMESTEP), context


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (a multiple of 64)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per configuration, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    args = parser.parse_args()
    if args.size <= 0 or args.size % 64:
        parser.error(f"--size {args.size}: a positive multiple of 64 is needed (the U-Net halves the latents 3 times)")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads {args.threads}: at least 1")
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if "diffusers-fp32" in args.configs else torch.bfloat16
    if dtype == torch.float32 and "diffusers-bf16" in args.configs:
        parser.error("--configs: diffusers-fp32 runs every configuration in fp32; diffusers-bf16 goes in a separate "
                     "run")
    reference, dtype_name = REFERENCES[dtype], {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    flops = unet_flops(args.size)[0]
    print(f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads; SD 1.5 U-Net at "
          f"{args.size}x{args.size}, guided batch of 2, {dtype_name}: {flops / 1e9:.1f} GFLOP per call", flush=True)
    x, t, context = inputs(args.size, dtype)
    calls, first, outputs = {}, {}, {}
    with torch.no_grad():
        for config in args.configs:
            calls[config] = build(config, reference_unet(dtype), dtype)
            start = time.perf_counter()
            outputs[config] = calls[config](x, t, context).float()
            first[config] = time.perf_counter() - start
            print(f"  {config}: first call {first[config]:.1f} s", flush=True)
        peak = matmul_peak(dtype)
        wall = {config: [] for config in args.configs}
        cpu = {config: [] for config in args.configs}
        for round_ in range(args.rounds):
            for config in args.configs:
                start, start_cpu = time.perf_counter(), time.thread_time()
                output = calls[config](x, t, context)
                wall[config].append(time.perf_counter() - start)
                cpu[config].append(time.thread_time() - start_cpu)
                outputs[config] = output.float()
            print(f"  round {round_ + 1}: " + ", ".join(f"{c} {wall[c][-1]:.3f} s" for c in args.configs), flush=True)
        peak = max(peak, matmul_peak(dtype))
    print(f"\n{dtype_name} matmul peak in this process: {peak / 1e12:.3f} TFLOP/s; load average at the end "
          f"{load_average()}\n")
    print("| configuration | first call s | median s | min s | CPU s (median) | TFLOP/s (median) | % of peak "
          f"| vs {reference} | output vs {reference} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for config in args.configs:
        median = float(np.median(wall[config]))
        speedup = "n/a"
        if reference in wall:
            speedup = f"{float(np.median(np.array(wall[reference]) / np.array(wall[config]))):.2f}x"
        distance = f"{agreement(outputs[config], outputs[reference]):.4f}" if reference in outputs else "n/a"
        print(f"| {config} | {first[config]:.1f} | {median:.3f} | {min(wall[config]):.3f} "
              f"| {float(np.median(cpu[config])):.3f} | {flops / median / 1e12:.3f} "
              f"| {100 * flops / median / peak:.0f} | {speedup} | {distance} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
