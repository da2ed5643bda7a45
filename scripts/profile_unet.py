"""Where a U-Net call's time goes, by kind of operation: one guided SD 1.5 call, eager and with packed weights.

    .venv/bin/python scripts/profile_unet.py --size 512                 # torch's default thread count
    OMP_NUM_THREADS=1 .venv/bin/python scripts/profile_unet.py --threads 1 --size 512

SD 1.5's U-Net shape with random weights (a kernel's cost does not depend on the weights), batch 2 (guidance), in the
CPU's default precision (bf16 where native, else fp32; --dtype to choose), channels-last as the pipeline runs it;
torch.profiler over one call after a warm-up call, self CPU time of each aten / mkldnn op summed into kinds.
Attention is split by sequence length and head width (the SDPA kernel's input shapes). "eager" is
`Pipeline(optimize=False)`, "packed" kedavra's default (kedavra.networks.acceleration); on a CPU where kedavra's
attention kernel runs (kedavra.networks.cpu_attention), "packed, SDPA" is the packed U-Net with the kernel switched
off, the "before" of that kernel; where torch has oneDNN's int8 kernels, "int8" is `--precision int8`
(kedavra.networks.int8: its oneDNN products, and int8.cpp's quantisers and epilogue, named for the profiler).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile

from kedavra.networks import cpu_attention, int8
from kedavra.networks.model import ModelConfig, StableDiffusion
from kedavra.pipeline.device import default_dtype
from kedavra.pipeline.pipeline import Pipeline

KINDS = (  # (kind, substrings of the op name), first match wins
    ("int8 products (oneDNN)", ("qlinear_pointwise", "qconv2d_pointwise")),
    ("int8 quantisers, W μ, row-scale epilogue (int8.cpp)", ("kedavra::int8",)),
    ("attention", ("scaled_dot_product", "_flash_attention", "kedavra::cpu_attention")),
    ("convolution", ("convolution", "conv2d")),
    ("linear / matmul", ("linear", "addmm", "aten::mm", "aten::bmm", "matmul", "baddbmm")),
    ("GroupNorm / LayerNorm", ("group_norm", "layer_norm", "native_batch_norm")),
    ("activations (SiLU, GELU)", ("silu", "gelu")),
    ("elementwise (add, mul, ...)", ("aten::add", "aten::mul", "aten::div", "aten::sub")),
    ("layout (copy, cat, permute)", ("copy_", "aten::cat", "contiguous", "clone", "to_dense", "reorder",
                                     "_to_copy", "upsample")),
)


def kind_of(name: str) -> str:
    for kind, needles in KINDS:
        if any(needle in name for needle in needles):
            return kind
    return "other"


def profile_call(optimize: bool, size: int, sdpa: bool = False, precision: str = "bf16") -> dict[str, float]:
    """Self CPU seconds by kind (attention keyed by its sequence length and head width) of one guided call; sdpa:
    with kedavra's CPU attention kernel switched off; precision: "bf16", "fp32" or "int8"."""
    with cpu_attention.switched_off() if sdpa else nullcontext():
        return _profile_call(optimize, size, precision)


def _profile_call(optimize: bool, size: int, precision: str) -> dict[str, float]:
    torch.manual_seed(0)
    pipe = Pipeline(StableDiffusion(ModelConfig.from_preset("sd15")), dtype=precision, optimize=optimize)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, size // 8, size // 8), generator=generator).to(pipe.dtype)
    t, context = torch.tensor([500.0, 500.0]), torch.randn((2, 77, 768), generator=generator).to(pipe.dtype)
    with torch.no_grad():
        pipe.model.unet(x, t, context)  # warm-up: oneDNN primitives, packing
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            pipe.model.unet(x, t, context)
    seconds: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        kind = kind_of(event.key)
        if event.key.startswith("kedavra::cpu_attention "):  # kedavra's kernel (cpu_attention.py) names its shape
            kind = "attention " + event.key.removeprefix("kedavra::cpu_attention ") + " (kedavra's kernel)"
        elif kind == "attention" and event.input_shapes and len(event.input_shapes[0]) == 4:
            batch, heads, tokens, width = event.input_shapes[0]
            other = event.input_shapes[1][2] if len(event.input_shapes) > 1 and event.input_shapes[1] else tokens
            kind = f"attention {tokens}x{other} tokens, head width {width}"
        seconds[kind] += event.self_cpu_time_total / 1e6
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="the float configurations' precision "
                        "(default: the CPU's, which int8 keeps its other layers in whatever this says)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or {torch.bfloat16: "bf16", torch.float32: "fp32"}[default_dtype(torch.device("cpu"))]
    configurations = [("eager", False, False, dtype), ("packed", True, False, dtype)]
    if cpu_attention.enabled() and dtype == "bf16":
        configurations.append(("packed, SDPA", True, True, dtype))
    if int8.available():
        configurations.append(("int8", True, False, "int8"))
    results = {name: profile_call(optimize, args.size, sdpa, precision)
               for name, optimize, sdpa, precision in configurations}
    names = list(results)
    kinds = sorted(set().union(*results.values()), key=lambda k: -results["packed"].get(k, 0.0))
    totals = {name: sum(values.values()) for name, values in results.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SD 1.5 U-Net, {args.size}x{args.size}, "
          f"guided (batch 2), {dtype} (int8: its large layers int8, {int8.activation_bits()}-bit activations): self "
          "CPU time of one call\n")
    print("| kind | " + " | ".join(f"{name} | share" for name in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for kind in kinds:
        row = [f"{results[n].get(kind, 0.0):.3f} s | {100 * results[n].get(kind, 0.0) / totals[n]:.0f} %"
               for n in names]
        print(f"| {kind} | {' | '.join(row)} |")
    print("| total | " + " | ".join(f"{totals[n]:.3f} s | " for n in names) + "|")


if __name__ == "__main__":
    main()
