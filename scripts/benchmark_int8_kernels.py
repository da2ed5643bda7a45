"""Would an int8 path pay off on this CPU? oneDNN's int8 kernels against kedavra's packed bf16 ones, layer by layer.

(The question that led to `--precision int8`: the kernels as first measured, per-tensor activations with torch's
eager quantisation. What the int8 layers now run, per-row scales and kedavra's own quantiser, is timed whole in
scripts/benchmark_unet.py's kedavra-int8.)

    .venv/bin/python scripts/benchmark_int8_kernels.py                 # SD 1.5 U-Net at 512, torch's threads
    .venv/bin/python scripts/benchmark_int8_kernels.py --threads 1
(docs/benchmark.md, section "int8", quotes its output.)

The SD 1.5 U-Net (kedavra's, random bf16 weights, channels_last) runs once on the guidance batch at --size while
forward hooks record every convolution's and linear layer's input shape; layers with the same weight shape and
input shape are timed once and counted as often as they occur. For each such layer, one process, alternating:

    bf16          kedavra's packed layer as the pipeline runs it (kedavra.networks.acceleration: oneDNN, AMX-BF16)
    int8 kernel   oneDNN's u8 x s8 kernel (torch.ops.onednn.qlinear_pointwise / qconv2d_pointwise, AMX-INT8 where
                  the CPU has it) on prepacked int8 weights, per output channel (symmetric), an input already
                  quantised (per tensor, asymmetric uint8) and a bf16 output, bias inside the kernel
    quantise      what an eager int8 layer adds before that kernel: the input's min and max, and its rounding to
                  uint8 (torch.aminmax, torch.quantize_per_tensor on the fp32 input)

Reported per layer kind: milliseconds per U-Net call (sums over the layers, each at its median of --repeats
calls), the int8 kernel's and the whole eager int8 layer's speed-up over bf16, and the relative error of the int8
output (max |int8 - fp32| / max |fp32| on the layer's random input, fp32 = the same layer in fp32). The error of a
whole U-Net, or of an image, is not measured here: that needs calibrated scales on a trained model.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from timing import run_times  # noqa: E402

from kedavra.networks.acceleration import pack_weights  # noqa: E402
from kedavra.networks.model import PRESETS  # noqa: E402
from kedavra.networks.unet import UNet  # noqa: E402

UINT8_MAX, INT8_MAX = 255, 127
TEXT_TOKENS, TEXT_WIDTH = 77, 768  # SD 1.5's CLIP context


def layer_shapes(size: int) -> Counter:
    """Counter of (kind, weight shape, stride, padding, input shape) over one U-Net call on the guidance batch."""
    config = PRESETS["sd15"].unet
    with torch.device("meta"):
        unet = UNet(config)
    unet.to_empty(device="cpu").to(torch.bfloat16)
    for p in unet.parameters():
        p.data.normal_(0, 0.02)
    unet.eval().to(memory_format=torch.channels_last)
    shapes: Counter = Counter()

    def record(module, inputs):
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            shapes["conv", tuple(module.weight.shape), module.stride, module.padding, tuple(x.shape)] += 1
        else:
            shapes["linear", tuple(module.weight.shape), None, None, tuple(x.reshape(-1, x.shape[-1]).shape)] += 1

    for module in unet.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_pre_hook(record)
    side = size // 8
    x = torch.randn(2, config.in_channels, side, side).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        unet(x, torch.full((2,), 500.0), torch.randn(2, TEXT_TOKENS, TEXT_WIDTH).bfloat16())
    return shapes


def quantise_input(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Per-tensor asymmetric uint8: (q, scale, zero point) with x ≈ scale · (q - zero point), 0 representable."""
    low, high = torch.aminmax(x)
    low, high = min(low.item(), 0.0), max(high.item(), 0.0)
    scale = max((high - low) / UINT8_MAX, 1e-12)
    zero_point = int(round(-low / scale))
    q = torch.quantize_per_tensor(x.float(), scale, zero_point, torch.quint8).int_repr()
    return q, scale, zero_point


def quantise_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (q, scales) with w ≈ scales[o] · q[o]."""
    scales = w.float().abs().amax(dim=tuple(range(1, w.ndim))).clamp(min=1e-12) / INT8_MAX
    q = torch.round(w.float() / scales.view(-1, *[1] * (w.ndim - 1))).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


def median_ms(fn, repeats: int) -> float:
    """Milliseconds of the median call after a warm-up (oneDNN picks and caches its kernel on the first)."""
    times = sorted(run_times(fn, repeats))
    return 1e3 * times[len(times) // 2]


def measure(kind, weight_shape, stride, padding, x_shape, repeats: int) -> dict:
    """bf16, int8-kernel and quantise milliseconds and the int8 relative error for one layer."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=generator).bfloat16()
    if kind == "conv":
        out_channels, in_channels, kh, kw = weight_shape
        layer = nn.Conv2d(in_channels, out_channels, (kh, kw), stride, padding)
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        layer = nn.Linear(weight_shape[1], weight_shape[0])
    layer = layer.bfloat16().eval()
    if kind == "conv":
        layer = layer.to(memory_format=torch.channels_last)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02, generator=generator)
        reference = (F.conv2d(x.float(), layer.weight.float(), layer.bias.float(), stride, padding) if kind == "conv"
                     else F.linear(x.float(), layer.weight.float(), layer.bias.float()))
        qw, w_scales = quantise_weight(layer.weight)
        w_zero = torch.zeros(weight_shape[0], dtype=torch.long)
        bias = layer.bias.float()
        qx, x_scale, x_zero = quantise_input(x)
        if kind == "conv":
            qx = qx.contiguous(memory_format=torch.channels_last)
            packed = torch.ops.onednn.qconv_prepack(qw, w_scales, x_scale, x_zero, list(stride), list(padding),
                                                    [1, 1], 1, list(x_shape))

            def int8_kernel():
                return torch.ops.onednn.qconv2d_pointwise(qx, x_scale, x_zero, packed, w_scales, w_zero, bias,
                                                          list(stride), list(padding), [1, 1], 1, 1.0, 0,
                                                          torch.bfloat16, "none", [], "")
        else:
            packed = torch.ops.onednn.qlinear_prepack(qw, list(x_shape))

            def int8_kernel():
                return torch.ops.onednn.qlinear_pointwise(qx, x_scale, x_zero, packed, w_scales, w_zero, bias, 1.0,
                                                          0, torch.bfloat16, "none", [], "")
        error = ((int8_kernel().float() - reference).abs().max() / reference.abs().max()).item()
        model = nn.Sequential(layer)
        pack_weights(model)
        bf16 = median_ms(lambda: model(x), repeats)
        int8 = median_ms(int8_kernel, repeats)
        quantise = median_ms(lambda: quantise_input(x), repeats)
    return {"bf16": bf16, "int8": int8, "quantise": quantise, "error": error}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per layer (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    args = parser.parse_args()
    if args.size % 64 or args.size <= 0:
        parser.error(f"--size must be a positive multiple of 64 (the U-Net's 8x downsampling of 8x latents), "
                     f"got {args.size}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        print("this torch build has no oneDNN int8 ops (torch.ops.onednn.qlinear_pointwise)")
        return 1
    shapes = layer_shapes(args.size)
    print(f"SD 1.5 U-Net at {args.size}x{args.size}, batch 2: {sum(shapes.values())} conv/linear calls, "
          f"{len(shapes)} distinct; torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
    totals: dict[str, dict[str, float]] = {}
    errors: dict[str, float] = {}
    for (kind, weight_shape, stride, padding, x_shape), count in sorted(shapes.items(), key=str):
        row = measure(kind, weight_shape, stride, padding, x_shape, args.repeats)
        total = totals.setdefault(kind, {"bf16": 0.0, "int8": 0.0, "quantise": 0.0, "calls": 0})
        for key in ("bf16", "int8", "quantise"):
            total[key] += count * row[key]
        total["calls"] += count
        errors[kind] = max(errors.get(kind, 0.0), row["error"])
        print(f"  {kind:6} w {weight_shape} x {x_shape} x{count}: bf16 {row['bf16']:.2f} ms, int8 kernel "
              f"{row['int8']:.2f} ms, quantise {row['quantise']:.2f} ms, rel err {row['error']:.4f}", flush=True)
    print("\n| layers | calls | bf16 ms/U-Net call | int8 kernel ms | quantise ms | kernel speed-up | eager int8 "
          "layer speed-up | max rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, total in [*totals.items(), ("all", {key: sum(t[key] for t in totals.values())
                                                  for key in ("bf16", "int8", "quantise", "calls")})]:
        error = max(errors.values()) if kind == "all" else errors[kind]
        print(f"| {kind} | {total['calls']} | {total['bf16']:.0f} | {total['int8']:.0f} | {total['quantise']:.0f} "
              f"| {total['bf16'] / total['int8']:.2f}x | {total['bf16'] / (total['int8'] + total['quantise']):.2f}x "
              f"| {error:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
