"""int8 inference on the CPU: the U-Net's convolutions and linear layers as oneDNN u8 x s8 products (opt-in).

`--precision int8` (`Pipeline(..., dtype="int8")`) keeps the networks in bf16 and swaps the U-Net's large conv and
linear layers for int8 twins (`quantise_unet`). Each twin computes

    y = s_x s_w[o] Σ_i (q_x[i] - z_x) q_w[o, i] + b[o]

with the affine quantisation of Jacob et al. 2018 (eq. 1-4, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference"):
- weights per output channel, symmetric int8: s_w[o] = max_i |W[o, i]| / 127, q_w = round(W / s_w) (Krishnamoorthi
  2018, sec. 2.3: per-channel scales keep the error of layers whose channels differ in range);
- activations per tensor, asymmetric uint8, from each call's own range ("dynamic" quantisation, no calibration
  data): s_x = (max(x_max, 0) - min(x_min, 0)) / 255, z_x = round(-min(x_min, 0) / s_x), found and applied by
  kedavra/networks/int8.cpp in two passes over the activations (about 0.5 ms for SD 1.5's largest, 2.6 M values);
- the sum in int32 inside oneDNN's kernels (`torch.ops.onednn.qconv2d_pointwise` / `qlinear_pointwise`, the ones
  torch.compile's x86 int8 path emits: AVX512-VNNI, AMX-INT8 where the CPU has it), the bias added and the result
  written in bf16 by the same kernel.

The layers that stay bf16 (`KEEP_BF16`): the U-Net's first and last convolutions (4 latent channels: little work, and
the output is the prediction itself), the timestep embedding and its per-block projections (two rows of work per
call), and cross-attention's key and value projections, whose input is the text encoder's hidden states: CLIP's have
a few feature dimensions hundreds of times larger than the rest, and one scale per tensor would round the rest to a
handful of levels (the outlier features of Dettmers et al. 2022, "LLM.int8()"). Attention itself, the norms and the
activations run in bf16 as in the bf16 path; the VAE and the text encoders are not touched.

The dense bf16 weight stays the layer's parameter (state_dict, LoRA merges and every path that autograd records or
that is not bf16 on the CPU use it as before); the quantised, packed copy is built on the first call and rebuilt
when the weight changes. So int8 holds the U-Net's weights one and a half times. Speed and image error are measured
in docs/benchmark.md ("int8"); the quality of images is not the bf16 path's, which is why it is opt-in.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from kedavra.networks.acceleration import NO_POST_OP, conv_twin, linear_twin
from kedavra.networks.cpp_extension import CppExtension

INT8_MAX, UINT8_MAX = 127, 255
# U-Net module names (kedavra's, the diffusers names) whose layers stay bf16: module docstring
KEEP_BF16 = re.compile(r"(^|\.)(conv_in|conv_out|time_emb_proj)$|(^|\.)(time_embedding|add_embedding)\.|"
                       r"(^|\.)attn2\.to_[kv]$")
SOURCE = Path(__file__).with_name("int8.cpp")
_X86 = platform.machine().lower() in ("x86_64", "amd64")
KERNEL = CppExtension("kedavra_int8", SOURCE, ["-O3", "-fopenmp", *(["-mavx2", "-mfma"] if _X86 else [])],
                      "torch's ops to quantise int8 activations")


def available() -> bool:
    """Whether this torch build has oneDNN's int8 kernels (the CPU builds of torch 2.x on x86 do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def quantise_activation(x: Tensor) -> tuple[Tensor, float, int]:
    """x (bf16 or fp32, any shape) -> (q uint8 of x's shape and memory layout, s_x, z_x) with x ≈ s_x (q - z_x): per
    tensor, asymmetric, 0 exactly representable (module docstring); int8.cpp, or the same arithmetic in torch's ops
    where it cannot be built."""
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):  # int8.cpp reads dense memory
        x = x.contiguous()
    kernel = KERNEL.get()
    if kernel is not None:
        q = torch.empty_like(x, dtype=torch.uint8)
        scale, zero_point = kernel.quantise_u8(x, q)
        return q, scale, zero_point
    low, high = (value.item() for value in torch.aminmax(x.float()))
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / UINT8_MAX, 1e-12)
    zero_point = min(max(round(-low / scale), 0), UINT8_MAX)
    inverse = torch.tensor(1 / scale, dtype=torch.float32)  # int8.cpp's arithmetic: x times 1/s_x in float32
    levels = torch.round(x.float() * inverse).add_(zero_point).clamp_(0, UINT8_MAX)  # round half to even
    return levels.to(torch.uint8), scale, zero_point


def quantise_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """W (C_out, ...) -> (q_w int8, s_w (C_out,) float32) with W[o] ≈ s_w[o] q_w[o]: per output channel, symmetric."""
    w = w.float()
    scales = w.abs().amax(dim=tuple(range(1, w.ndim))).clamp(min=1e-12) / INT8_MAX  # (C_out,)
    q = torch.round(w / scales.view(-1, *[1] * (w.ndim - 1))).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


class _Int8Layer:
    """What the int8 conv and linear twins share: when a call runs in int8, and the quantised weight's cache."""

    def _takes_int8(self, x: Tensor) -> bool:
        """bf16 on the CPU with a bf16 weight, and nothing for autograd to record; otherwise the bf16 layer runs."""
        weight = self.weight
        return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.bfloat16
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))

    def _quantised(self, pack) -> tuple:
        """(packed int8 weight, s_w, zero points, fp32 bias), built by pack(q_w, s_w) once per weight tensor and
        weight version (a LoRA merge or load_state_dict changes the version); packed without an input shape, so one
        copy serves every shape (measured as fast as a copy packed for the shape)."""
        weight = self.weight
        key = (weight.data_ptr(), weight._version)
        cached = self.__dict__.get("_int8")
        if cached is None or cached[0] != key:
            q, scales = quantise_weight(weight.detach())
            zeros = torch.zeros(len(scales), dtype=torch.long)
            bias = None if self.bias is None else self.bias.detach().float()
            cached = (key, (pack(q, scales), scales, zeros, bias))
            self.__dict__["_int8"] = cached  # outside _buffers: not part of state_dict
        return cached[1]


class Int8Conv2d(_Int8Layer, nn.Conv2d):
    """An `nn.Conv2d` whose bf16 CPU calls run as int8 products (module docstring)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> Int8Conv2d:
        """An int8 twin of `conv` holding the very same parameter tensors."""
        return conv_twin(cls, conv)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or x.ndim != 4 or not self._takes_int8(x):
            return super().forward(x)
        x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's int8 convolution reads NHWC
        args = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
        packed, scales, zeros, bias = self._quantised(
            lambda q, s: torch.ops.onednn.qconv_prepack(q, s, 1.0, 0, *args, None))
        q, x_scale, x_zero = quantise_activation(x)
        return torch.ops.onednn.qconv2d_pointwise(q, x_scale, x_zero, packed, scales, zeros, bias, *args, 1.0, 0,
                                                  torch.bfloat16, *NO_POST_OP)  # (B, C_out, H', W'), channels last


class Int8Linear(_Int8Layer, nn.Linear):
    """An `nn.Linear` whose bf16 CPU calls run as int8 products (module docstring)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """An int8 twin of `linear` holding the very same parameter tensors."""
        return linear_twin(cls, linear)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 2 or not self._takes_int8(x):
            return super().forward(x)
        rows = x.reshape(-1, self.in_features).contiguous()  # (N, D_in), N = all leading dims
        packed, scales, zeros, bias = self._quantised(lambda q, s: torch.ops.onednn.qlinear_prepack(q, None))
        q, x_scale, x_zero = quantise_activation(rows)
        out = torch.ops.onednn.qlinear_pointwise(q, x_scale, x_zero, packed, scales, zeros, bias, 1.0, 0,
                                                 torch.bfloat16, *NO_POST_OP)  # (N, D_out)
        return out.reshape(*x.shape[:-1], self.out_features)


def quantise_unet(unet: nn.Module) -> int:
    """Swap the U-Net's nn.Conv2d and nn.Linear layers, except those KEEP_BF16 names, for their int8 twins, in place
    (before `pack_weights`, which then packs the rest); returns how many were swapped. ValueError when this torch
    has no oneDNN int8 kernels."""
    if not available():
        raise ValueError("precision int8 needs oneDNN's int8 kernels (torch.ops.onednn.qlinear_pointwise), which this "
                         "torch build lacks: use bf16 or fp32")
    twins = {nn.Conv2d: Int8Conv2d.from_conv, nn.Linear: Int8Linear.from_linear}
    swapped = 0
    for name, layer in list(unet.named_modules()):
        twin = twins.get(type(layer))
        if twin is None or KEEP_BF16.search(name):
            continue
        parent, _, attribute = name.rpartition(".")
        setattr(unet.get_submodule(parent), attribute, twin(layer))
        swapped += 1
    return swapped


def main() -> int:
    """Build the activation quantiser now (scripts/setup.sh calls this) and report."""
    if not available():
        print("int8: this torch build has no oneDNN int8 kernels; --precision int8 is unavailable")
        return 0
    if KERNEL.get() is None:
        print(f"int8: the quantiser could not be built ({KERNEL.failed}); --precision int8 quantises with torch's ops")
        return 0
    print("int8: activation quantiser built; --precision int8 runs the U-Net's large layers in int8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
