"""Where --precision int8's error comes from: one SD 1.5 U-Net call, relative L2 error of its output against fp32.

    .venv/bin/python scripts/int8_error_sources.py                 # 512x512, about 2 minutes on two threads
    .venv/bin/python scripts/int8_error_sources.py --size 256
    .venv/bin/python scripts/int8_error_sources.py --dtype fp32    # the networks in fp32, as on a CPU without bf16
(docs/benchmark.md, section "int8", quotes its output.)

The U-Net has SD 1.5's sizes and benchmark_unet's seeded random weights and inputs (guided batch of 2, t = 500), in
--dtype (default: the CPU's, as `--precision int8` runs it: bf16 where native, else fp32; "bf16" below means it).
int8 layers use this CPU's activation bits (kedavra.networks.int8.activation_bits: 8 with VNNI, else 7).
Rows: the packed bf16 path; int8 as `Pipeline(dtype="int8")` runs it (kedavra.networks.int8); the weights' int8
rounding alone (each int8 layer's weight replaced by its dequantised per-channel int8 copy, bf16 activations, no bias
correction); the activations' rounding alone (each int8 layer's input replaced by its dequantised copy, per row or
per tensor as int8 quantises it, bf16 weights); int8 as it was before 8 December 2026 (per-tensor activations for
every layer, no bias correction), and int8 without the bias correction; and int8 with one kind of layer kept in bf16
(by module name), to find whether one kind carries the error.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from benchmark_unet import inputs, reference_unet  # noqa: E402

from kedavra.networks import int8  # noqa: E402
from kedavra.networks.acceleration import NO_POST_OP, optimize_for_inference  # noqa: E402
from kedavra.networks.model import PRESETS  # noqa: E402
from kedavra.networks.unet import UNet  # noqa: E402
from kedavra.networks.unet_keys import convert_unet_state_dict  # noqa: E402
from kedavra.pipeline.device import default_dtype  # noqa: E402

LAYER_KINDS = {  # kind -> module-name pattern (kedavra's U-Net names)
    "resnet conv1": r"resnets\.\d+\.conv1$", "resnet conv2": r"resnets\.\d+\.conv2$", "1x1 shortcut": r"shortcut$",
    "down/up-sampling conv": r"resample\.conv$", "proj_in": r"proj_in$", "proj_out": r"attentions\.\d+\.proj_out$",
    "self-attention q, k, v": r"attn1\.to_[qkv]$", "self-attention output": r"attn1\.to_out",
    "cross-attention q": r"attn2\.to_q$", "cross-attention output": r"attn2\.to_out",
    "GEGLU projection": r"geglu\.proj$", "feed-forward output": r"ff\.proj_out$",
}
INT8_TYPES = (int8.Int8Conv2d, int8.Int8Linear)


def plain(layer: nn.Module) -> None:
    """Turn an int8 twin back into the plain layer it was made from (the same parameters)."""
    layer.__class__ = nn.Conv2d if isinstance(layer, int8.Int8Conv2d) else nn.Linear


def dequantised_input(layer: nn.Module, args: tuple) -> tuple:
    """The input as the int8 layer quantises it: per row, centred (linear layers, 1x1 convolutions), or per tensor."""
    x = args[0]
    if isinstance(layer, nn.Linear) or layer.kernel_size == (1, 1):
        rows = x.permute(0, 2, 3, 1) if x.ndim == 4 else x  # (..., C_in)
        q, scales, means = int8.quantise_rows(rows.reshape(-1, rows.shape[-1]), centre=True, bits=layer.bits)
        x_hat = (means + (q.float() - int8.row_zero_point(layer.bits)) * scales[:, None]).view(rows.shape)
        return ((x_hat.permute(0, 3, 1, 2) if x.ndim == 4 else x_hat).to(x.dtype),)
    q, scale, zero_point, _ = int8.quantise_activation(x, bits=layer.bits)
    return (((q.float() - zero_point) * scale).to(x.dtype),)


class PerTensorLinear(int8.Int8Linear):
    """int8 before 8 December 2026: one asymmetric scale per tensor, the bias added inside the kernel."""

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)
        packed, scales, zeros, bias, _ = self._quantised(lambda q, s: torch.ops.onednn.qlinear_prepack(q, None))
        q, x_scale, x_zero, _ = int8.quantise_activation(rows, bits=self.bits)
        out = torch.ops.onednn.qlinear_pointwise(q, x_scale, x_zero, packed, scales, zeros, bias, 1.0, 0,
                                                 x.dtype, *NO_POST_OP)
        return out.reshape(*x.shape[:-1], self.out_features)


class UncorrectedConv(int8.Int8Conv2d):
    """int8's convolution without the bias correction (and, with `pointwise` False, 1x1 ones per tensor too)."""

    per_row = True

    @property
    def pointwise(self):
        return self.per_row and self.kernel_size == (1, 1)

    def _quantised(self, pack, correction=False):
        packed, scales, zeros, bias, delta = super()._quantised(pack, correction)
        return packed, scales, zeros, bias, None if delta is None else torch.zeros_like(delta)


class PerTensorConv(UncorrectedConv):
    per_row = False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (a multiple of 64)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="the networks' precision (default: the CPU's)")
    args = parser.parse_args()
    if args.size <= 0 or args.size % 64:
        parser.error(f"--size {args.size}: a positive multiple of 64 is needed")
    network = {"bf16": torch.bfloat16, "fp32": torch.float32, None: default_dtype(torch.device("cpu"))}[args.dtype]
    state = convert_unet_state_dict(reference_unet(network).state_dict(), "diffusers", PRESETS["sd15"].unet)
    x, t, context = inputs(args.size, network)

    def unet(dtype: torch.dtype, keep: str | None = None, quantise: bool = False) -> nn.Module:
        with torch.device("meta"):
            model = UNet(PRESETS["sd15"].unet)
        model.load_state_dict({k: v.clone().to(dtype) for k, v in state.items()}, strict=True, assign=True)
        model.eval().to(memory_format=torch.channels_last)
        if quantise:
            int8.quantise_unet(model)
            for name, layer in model.named_modules():
                if keep is not None and isinstance(layer, INT8_TYPES) and re.search(keep, name):
                    plain(layer)
        return model

    with torch.no_grad():
        reference = unet(torch.float32)(x.float(), t, context.float())

        def error(model: nn.Module, pack: bool = True) -> float:
            if pack:  # as the pipeline: the float layers packed
                optimize_for_inference(model, "cpu", network)
            return ((model(x, t, context).float() - reference).norm() / reference.norm()).item()

        name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[network]
        print(f"SD 1.5 U-Net at {args.size}, random weights, networks in {name}, int8 activations of "
              f"{int8.activation_bits()} bits: relative L2 error of one call against fp32\n")
        print("| configuration | error |\n|---|---|")
        print(f"| {name} (packed) | {error(unet(network)):.4f} |")
        print(f"| int8 | {error(unet(network, quantise=True)):.4f} |", flush=True)
        weights_only = unet(network, quantise=True)
        for layer in weights_only.modules():
            if isinstance(layer, INT8_TYPES):
                q, scales = int8.quantise_weight(layer.weight)
                layer.weight = nn.Parameter((q.float() * scales.view(-1, *[1] * (q.ndim - 1))).to(network))
                plain(layer)
        print(f"| int8 weights alone | {error(weights_only):.4f} |", flush=True)
        activations_only = unet(network, quantise=True)
        for layer in activations_only.modules():
            if isinstance(layer, INT8_TYPES):
                plain(layer)
                layer.register_forward_pre_hook(dequantised_input)
        # eager bf16 layers: packing would swap the modules (and the GEGLU's projection would bypass its hook)
        print(f"| int8 activations alone | {error(activations_only, pack=False):.4f} |", flush=True)
        for label, swaps in (("int8 before 8 Dec 2026 (per tensor, no bias correction)",
                              {int8.Int8Linear: PerTensorLinear, int8.Int8Conv2d: PerTensorConv}),
                             ("int8 without the bias correction", {int8.Int8Conv2d: UncorrectedConv})):
            variant = unet(network, quantise=True)
            for layer in variant.modules():
                layer.__class__ = swaps.get(type(layer), type(layer))
            print(f"| {label} | {error(variant):.4f} |", flush=True)
        for kind, pattern in LAYER_KINDS.items():
            print(f"| int8, {kind} kept {name} | {error(unet(network, pattern, quantise=True)):.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
