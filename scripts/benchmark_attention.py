"""kedavra's CPU attention kernel against torch's SDPA, side by side, on the attention shapes of SD 1.5, SDXL and
the VAE.

    .venv/bin/python scripts/benchmark_attention.py                 # torch's default threads, then one thread

Each shape (batch 2 for guidance, bf16, random inputs) is timed with F.scaled_dot_product_attention and with
kedavra.networks.cpu_attention.attention in the same process, alternating, best of --repeats after a warm-up;
reported: milliseconds, the speed-up, each one's achieved TFLOP/s (4 * B * Nh * S * L * Dh FLOPs: the two
products) and both outputs' max abs error against SDPA in float32 on the same inputs. On a CPU where the kernel
does not apply (docs/benchmark.md) the script says so and stops.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from kedavra.networks import cpu_attention

SHAPES = (  # (what, B, Nh, S, L, Dh)
    ("SD 1.5 self-attention at 512 px, level 1", 2, 8, 4096, 4096, 40),
    ("SD 1.5 self-attention at 512 px, level 2", 2, 8, 1024, 1024, 80),
    ("SD 1.5 self-attention at 512 px, level 3", 2, 8, 256, 256, 160),
    ("SD 1.5 cross-attention at 512 px (SDPA kept)", 2, 8, 4096, 77, 40),
    ("SDXL self-attention at 1024 px, level 2", 2, 10, 4096, 4096, 64),
    ("SDXL self-attention at 1024 px, level 3", 2, 20, 1024, 1024, 64),
    ("VAE mid-block at 512 px", 1, 1, 4096, 4096, 512),
)


def best_of(fn, inputs: tuple[torch.Tensor, ...], repeats: int) -> tuple[float, torch.Tensor]:
    out = fn(*inputs)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*inputs)
        best = min(best, time.perf_counter() - start)
    return best, out


def kernel(q, k, v):
    out = cpu_attention.attention(q, k, v)
    if out is None:
        raise SystemExit(f"the kernel did not build: {cpu_attention._failed}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads(), 1])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not cpu_attention.cpu_qualifies():
        print("this CPU lacks AVX-512 BF16 or has AMX: kedavra runs torch's SDPA here, nothing to compare")
        return 0
    print("| shape | B, Nh, S, L, Dh | threads | SDPA ms | kernel ms | speed-up | SDPA TFLOP/s | kernel TFLOP/s "
          "| max abs error vs fp32: SDPA | kernel |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for what, batch, heads, queries, keys, width in SHAPES:
            q, k, v = (torch.randn(batch, heads, n, width, generator=generator).bfloat16()
                       for n in (queries, keys, keys))
            flops = 4 * batch * heads * queries * keys * width
            with torch.no_grad():
                sdpa_s, sdpa_out = best_of(F.scaled_dot_product_attention, (q, k, v), args.repeats)
                ours_s, ours_out = best_of(kernel, (q, k, v), args.repeats)
                exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            errors = [(out.float() - exact).abs().max().item() for out in (sdpa_out, ours_out)]
            print(f"| {what} | {batch}, {heads}, {queries}, {keys}, {width} | {threads} | {1e3 * sdpa_s:.1f} "
                  f"| {1e3 * ours_s:.1f} | {sdpa_s / ours_s:.2f}x | {flops / sdpa_s / 1e12:.3f} "
                  f"| {flops / ours_s / 1e12:.3f} | {errors[0]:.1e} | {errors[1]:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
