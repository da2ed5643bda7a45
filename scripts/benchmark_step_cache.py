"""DeepCache's trade-off (kedavra.networks.step_cache): U-Net time saved against the drift from the uncached image
and the embedded model's prompt adherence, side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark_step_cache.py --threads 1
    .venv/bin/python scripts/benchmark_step_cache.py                  # torch's default thread count

1. Speed on SD 1.5's U-Net shape (random weights; a convolution's cost does not depend on its weights), one guided
   call at 512x512 (batch 2) in bf16 as the pipeline runs it: a full call, a cached call, and the U-Net time per
   step at intervals N (one full call and N-1 cached ones per N steps).
2. On the embedded model (kedavra-shapes), 20 steps of DPM++ 2M, guidance 5, held-out prompts: adherence (the
   evaluator's overall score, kedavra.evaluation.adherence), the seconds the whole evaluation took, and the drift
   from the uncached images (mean absolute difference in 8-bit levels, and PSNR), at each N.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from timing import best_time

import kedavra
from kedavra.evaluation.adherence import measure_adherence
from kedavra.networks.model import ModelConfig, StableDiffusion
from kedavra.networks.step_cache import StepCache
from kedavra.pipeline.pipeline import Pipeline


def unet_speed(intervals: list[int], size: int, repeats: int) -> None:
    torch.manual_seed(0)
    pipe = Pipeline(StableDiffusion(ModelConfig.from_preset("sd15")), dtype="bf16")
    unet, generator = pipe.model.unet, torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, size // 8, size // 8), generator=generator).to(pipe.dtype)
    t, context = torch.tensor([500.0, 500.0]), torch.randn((2, 77, 768), generator=generator).to(pipe.dtype)
    cache = StepCache(interval=10**9)  # keep the feature of the first call and reuse it every call after

    def cached():
        with torch.no_grad():
            unet(x, t, context, cache=cache)

    def full():
        with torch.no_grad():
            unet(x, t, context)

    full_s, cached_s = best_time(full, repeats), best_time(cached, repeats)
    print(f"\nSD 1.5 U-Net, {size}x{size}, guided (batch 2), bf16, {torch.get_num_threads()} threads")
    print(f"full call {full_s:.3f} s, cached call {cached_s:.3f} s ({full_s / cached_s:.2f}x)\n")
    print("| interval N | U-Net time per step | speed-up |")
    print("|---|---|---|")
    for n in intervals:
        per_step = (full_s + (n - 1) * cached_s) / n
        print(f"| {n} | {per_step:.3f} s | {full_s / per_step:.2f}x |")


def embedded_quality(intervals: list[int], per_kind: int) -> None:
    pipe = kedavra.load()
    print(f"\nembedded model, held-out prompts, {4 * per_kind} images, 20 steps DPM++ 2M, guidance 5, "
          f"{torch.get_num_threads()} threads")
    print("| interval N | adherence | seconds | mean abs. difference from N = 1 (levels) | PSNR vs N = 1 |")
    print("|---|---|---|---|---|")
    reference = None
    for n in [1, *intervals]:
        start = time.perf_counter()
        result = measure_adherence(pipe, per_kind=per_kind, prompts="held-out", step_cache=n)
        seconds = time.perf_counter() - start
        pixels = np.stack([np.asarray(image, dtype=np.float64) for image in result.images])
        if reference is None:
            reference, drift, psnr = pixels, 0.0, math.inf
        else:
            drift = float(np.abs(pixels - reference).mean())
            mse = float(((pixels - reference) ** 2).mean())
            psnr = 10 * math.log10(255**2 / mse) if mse else math.inf
        print(f"| {n if n > 1 else 'off'} | {result.report.overall:.3f} | {seconds:.1f} | {drift:.2f} | "
              f"{psnr:.1f} dB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5])
    parser.add_argument("--per-kind", type=int, default=50, help="adherence prompts of each kind")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}")
    if not args.skip_speed:
        unet_speed(args.intervals, args.size, args.repeats)
    if not args.skip_quality:
        embedded_quality(args.intervals, args.per_kind)


if __name__ == "__main__":
    main()
