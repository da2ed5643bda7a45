"""int8 inference on the CPU: the U-Net's convolutions and linear layers as oneDNN u8 x s8 products (opt-in).

`--precision int8` (`Pipeline(..., dtype="int8")`) keeps the networks in their float precision (bf16 on a CPU with
native bf16, fp32 elsewhere: pipeline.device.network_dtype) and swaps the U-Net's large conv and linear layers for
int8 twins (`quantise_unet`). Each twin computes

    y = s_x s_w[o] Σ_i (q_x[i] - z_x) q_w[o, i] + b[o]

with the affine quantisation of Jacob et al. 2018 (eq. 1-4, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference"), the sum in int32 inside oneDNN's kernels
(`torch.ops.onednn.qconv2d_pointwise` / `qlinear_pointwise`, the ones torch.compile's x86 int8 path emits:
AVX512-VNNI, AMX-INT8 where the CPU has it):
- weights per output channel, symmetric int8: s_w[o] = max_i |W[o, i]| / 127, q_w = round(W / s_w) (Krishnamoorthi
  2018, sec. 2.3: per-channel scales keep the error of layers whose channels differ in range);
- activations from each call's own values ("dynamic" quantisation, no calibration data), quantised by
  kedavra/networks/int8.cpp (a pure-torch fallback with the same arithmetic where it cannot be built):
  - with 8 bits where the CPU has AVX-512 VNNI or AMX-INT8, 7 bits elsewhere (`activation_bits`): oneDNN's AVX2
    kernel adds two u8 x s8 products into a saturating int16 (vpmaddubsw) before widening, and 2 · 255 · 127
    overflows it (uniformly random levels: errors of 17-27 % of the output's range with fp32 outputs), while
    2 · 127 · 127 does not (exact); PyTorch's x86 quantisation does the same (reduce_range). Below,
    L = 2^bits - 1 (255 or 127) and h = 2^(bits-1) - 1 (127 or 63);
  - linear layers and 1x1 convolutions (a linear map of each pixel's channels): the rows (tokens or pixels) are
    first centred on an estimate μ of each input channel's mean, W x = W μ + W (x - μ), with W μ computed in float32
    from the float weight and added to the bias; then one scale per row, symmetric, s_x[r] = max_i |x[r, i] - μ_i| /
    h ("per-token" quantisation, Yao et al. 2022, "ZeroQuant", sec. 4.1). Centring takes the channels' offsets
    (the residual stream's, SiLU's positive mean) out of the range each row's 2h + 1 levels must span, and with them
    the shift that the weights' rounding error ΔW would give every output, ΔW μ (the bias correction below, exact
    here). A row's scale cannot be applied inside the kernel, so the kernel returns Σ q_x q_w s_w[o] and an epilogue
    multiplies each row by s_x[r] and adds the bias. The levels are stored as uint8 with zero point h + 1, because
    oneDNN's signed-int8 source falls back to a reference loop;
  - 3x3 convolutions (a pixel's neighbours share a sum, so one scale must serve them): one scale per tensor,
    asymmetric uint8, s_x = (max(x_max, 0) - min(x_min, 0)) / L, z_x = round(-min(x_min, 0) / s_x), and a bias
    correction: the weights' rounding error ΔW = s_w q_w - W shifts every output by Σ_i ΔW[o, i] E[x_i], which is
    not zero-mean where the inputs are not (after SiLU); the same pass that finds the range takes each channel's mean
    over this call, and the bias is corrected by -ΔW_sum μ (Nagel et al. 2019, "Data-Free Quantization Through
    Weight Equalization and Bias Correction", sec. 4.2, with the expectation from the call itself instead of batch
    norm statistics; ΔW_sum sums ΔW over the kernel's taps, so the border pixels' missing taps are ignored).

The layers that stay in float (`KEEP_FLOAT`): the U-Net's first and last convolutions (4 latent channels: little
work, and the output is the prediction itself), the timestep embedding and its per-block projections (two rows of work
per call), and cross-attention's key and value projections, whose input is the text encoder's hidden states: CLIP's have
a few feature dimensions hundreds of times larger than the rest, and one scale per token would still round the rest
to a handful of levels (the outlier features of Dettmers et al. 2022, "LLM.int8()"). Attention itself, the norms and
the activations run in the network's float precision, as without int8; the VAE and the text encoders are not touched.

The products' outputs are that precision too: bf16 (rounded once from the int32 sum) or fp32. On a CPU without native
bf16 the network is fp32, which oneDNN's AVX2 int8 kernels write directly (with a bf16 output they take an exact but
slow reference loop there).

The dense float weight stays the layer's parameter (state_dict, LoRA merges, and every path that autograd records or
that is neither bf16 nor fp32 on the CPU, use it as before); the quantised, packed copy (and a 3x3 convolution's
ΔW_sum) is built on the first call and rebuilt when the weight changes. So int8 holds the U-Net's weights about one
and a half times (bf16) or one and a quarter times (fp32). Speed and image error are measured in docs/benchmark.md
("int8"); the images are not the float path's, which is why it is opt-in.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from kedavra.networks.acceleration import NO_POST_OP, conv_twin, linear_twin
from kedavra.networks.cpp_extension import CppExtension, profiled
from kedavra.networks.cpu_features import cpu_has_exact_int8_pairs
from kedavra.validation import is_int

INT8_MAX = 127  # weights: symmetric levels -127..127
FLOAT_DTYPES = (torch.bfloat16, torch.float32)  # the network precisions whose calls run in int8
MEAN_ROWS = 256  # rows sampled, at least, for the column means that centre them (int8.cpp's MEAN_ROWS)
_EMPTY = torch.empty(0)
# U-Net module names (kedavra's, the diffusers names) whose layers stay in float: module docstring
KEEP_FLOAT = re.compile(r"(^|\.)(conv_in|conv_out|time_emb_proj)$|(^|\.)(time_embedding|add_embedding)\.|"
                       r"(^|\.)attn2\.to_[kv]$")
SOURCE = Path(__file__).with_name("int8.cpp")
_X86 = platform.machine().lower() in ("x86_64", "amd64")
KERNEL = CppExtension("kedavra_int8", SOURCE, ["-O3", "-fopenmp", *(["-mavx2", "-mfma"] if _X86 else [])],
                      "torch's ops to quantise int8 activations")


def activation_bits() -> int:
    """Activation levels' bits on this CPU: 8 with AVX-512 VNNI or AMX-INT8, 7 elsewhere (module docstring)."""
    return 8 if cpu_has_exact_int8_pairs() else 7


def top_level(bits: int) -> int:
    """The per-tensor quantiser's largest level L = 2^bits - 1: 255 or 127."""
    return (1 << bits) - 1


def row_zero_point(bits: int) -> int:
    """The per-row quantiser's zero point h + 1 = 2^(bits-1) (128 or 64); its levels are -h..h around it."""
    return 1 << (bits - 1)


def available() -> bool:
    """Whether this torch build has oneDNN's int8 kernels (the CPU builds of torch 2.x on x86 do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def quantise_activation(x: Tensor, channels: int = 0, bits: int = 8) -> tuple[Tensor, float, int, Tensor | None]:
    """x (bf16 or fp32, any shape) -> (q uint8 of x's shape and memory layout, s_x, z_x, μ) with x ≈ s_x (q - z_x):
    per tensor, asymmetric, levels 0..2^bits - 1, 0 exactly representable (module docstring). With `channels` = C > 0,
    x's memory is read as rows of C (channels-last) and μ holds each channel's mean (float32, (C,)); otherwise μ is
    None. int8.cpp, or the same arithmetic in torch's ops where it cannot be built."""
    if channels and not (x.is_contiguous() if x.ndim != 4 else x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError("quantise_activation: channel means need x channels-last (4-d) or contiguous")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):  # int8.cpp reads dense memory
        x = x.contiguous()
    kernel = KERNEL.get()
    if kernel is not None:
        q = torch.empty_like(x, dtype=torch.uint8)
        means = torch.empty(channels, dtype=torch.float32)
        with profiled("kedavra::int8 quantise per tensor"):
            scale, zero_point = kernel.quantise_u8(x, q, means, bits)
        return q, scale, zero_point, means if channels else None
    means = None
    if channels:
        rows = (x.permute(0, 2, 3, 1) if x.ndim == 4 else x).reshape(-1, channels)  # (N, C), a view
        means = rows.float().mean(dim=0)
    low, high = (value.item() for value in torch.aminmax(x.float()))
    low, high, top = min(low, 0.0), max(high, 0.0), top_level(bits)
    scale = max((high - low) / top, 1e-12)
    zero_point = min(max(round(-low / scale), 0), top)
    inverse = torch.tensor(1 / scale, dtype=torch.float32)  # int8.cpp's arithmetic: x times 1/s_x in float32
    levels = torch.round(x.float() * inverse).add_(zero_point).clamp_(0, top)  # round half to even
    return levels.to(torch.uint8), scale, zero_point, means


def quantise_rows(x: Tensor, centre: bool = False, bits: int = 8) -> tuple[Tensor, Tensor, Tensor | None]:
    """x (N, C) bf16 or fp32 -> (q uint8 (N, C), s (N,) float32, μ) with x[r] ≈ μ + s[r] (q[r] - row_zero_point(bits)):
    per row, symmetric, levels -h..h (h = 2^(bits-1) - 1: 127 or 63) stored with zero point h + 1 (module
    docstring). With `centre`, μ (C,) float32 is each column's mean over the rows 0, k, 2k, ... (k = max(1, N //
    MEAN_ROWS): an estimate from 256-511 rows, cheap on large inputs; the rows are centred on it and W μ is added back
    exactly, so it need not be the exact mean), taken from the rows before they are quantised; otherwise μ is None
    (and 0 above). int8.cpp, or the same arithmetic in torch's ops."""
    x = x.contiguous()
    kernel = KERNEL.get()
    if kernel is not None:
        q = torch.empty_like(x, dtype=torch.uint8)
        scales = torch.empty(x.shape[0], dtype=torch.float32)
        means = torch.empty(x.shape[1] if centre else 0, dtype=torch.float32)
        with profiled("kedavra::int8 quantise per row"):
            kernel.quantise_rows_u8(x, q, scales, means, bits)
        return q, scales, means if centre else None
    x = x.float()
    means = x[:: max(1, x.shape[0] // MEAN_ROWS)].double().mean(dim=0).float() if centre else None
    if centre:
        x = x - means
    zero_point = row_zero_point(bits)
    half = zero_point - 1
    scales = (x.abs().amax(dim=1) / half).clamp(min=1e-12)  # float32 division, as int8.cpp
    inverse = 1 / scales  # int8.cpp multiplies by 1/s in float32
    levels = torch.round(x * inverse[:, None]).clamp_(-half, half).add_(zero_point)
    return levels.to(torch.uint8), scales, means


def matvec(weight: Tensor, vector: Tensor) -> Tensor:
    """W v in float32 for W (O, C) bf16 or fp32 and v (C,) float32 (int8.cpp; torch's ops where it is not built):
    summed in float32 and not rounded to bf16, because every row of a per-row product gets the same W μ."""
    weight = weight.contiguous()
    kernel = KERNEL.get()
    if kernel is not None:
        with profiled("kedavra::int8 W mu"):
            return kernel.matvec_f32(weight, vector)
    return weight.float() @ vector


def scale_rows(acc: Tensor, scales: Tensor, bias: Tensor | None, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The per-row product's epilogue: acc · s[:, None] + b in `dtype` (bf16, rounded once to nearest even, or fp32),
    acc (N, O) fp32 or bf16, s (N,), b (O,) or None; int8.cpp writes in place when acc is `dtype` (torch's ops where
    it is not built)."""
    kernel = KERNEL.get()
    if kernel is not None:
        out = acc if acc.dtype == dtype else torch.empty_like(acc, dtype=dtype)
        with profiled("kedavra::int8 row-scale epilogue"):
            kernel.scale_rows(acc, scales, bias if bias is not None else _EMPTY, out)
        return out
    out = acc.float() * scales[:, None]
    return (out if bias is None else out + bias).to(dtype)


def quantise_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """W (C_out, ...) -> (q_w int8, s_w (C_out,) float32) with W[o] ≈ s_w[o] q_w[o]: per output channel, symmetric."""
    w = w.float()
    scales = w.abs().amax(dim=tuple(range(1, w.ndim))).clamp(min=1e-12) / INT8_MAX  # (C_out,)
    q = torch.round(w / scales.view(-1, *[1] * (w.ndim - 1))).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


class _Int8Layer:
    """What the int8 conv and linear twins share: the activation levels' bits (`activation_bits` when made), when a call
    runs in int8, the quantised weight's cache, and the per-row product of linear layers and 1x1 convolutions."""

    bits: int = 8

    def _takes_int8(self, x: Tensor) -> bool:
        """bf16 or fp32 on the CPU with a weight of x's dtype, and nothing for autograd to record; otherwise the float
        layer runs."""
        weight = self.weight
        return (x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in FLOAT_DTYPES
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))

    def _quantised(self, pack, correction: bool = False) -> tuple:
        """(packed int8 weight, s_w, zero points, fp32 bias, ΔW_sum or None), built by pack(q_w, s_w) once per weight
        tensor and weight version (a LoRA merge or load_state_dict changes the version); packed without an input
        shape, so one copy serves every shape (measured as fast as a copy packed for the shape). With `correction`,
        ΔW_sum (C_out, C_in) float32 = Σ over the kernel's taps of s_w q_w - W, for the bias correction."""
        weight = self.weight
        key = (weight.data_ptr(), weight._version)
        cached = self.__dict__.get("_int8")
        if cached is None or cached[0] != key:
            q, scales = quantise_weight(weight.detach())
            zeros = torch.zeros(len(scales), dtype=torch.long)
            bias = None if self.bias is None else self.bias.detach().float()
            delta = None
            if correction:  # (C_out, C_in, kH, kW) -> (C_out, C_in)
                error = q.float() * scales.view(-1, *[1] * (q.ndim - 1)) - weight.detach().float()
                delta = error.sum(dim=tuple(range(2, q.ndim)))
            cached = (key, (pack(q, scales), scales, zeros, bias, delta))
            self.__dict__["_int8"] = cached  # outside _buffers: not part of state_dict
        return cached[1]

    def _per_row(self, rows: Tensor) -> Tensor:
        """rows (N, C_in) bf16 or fp32 -> (N, C_out) of the same dtype through the per-row product of the centred rows
        (module docstring): W x = W μ + W (x - μ), the first term in float32 (a matrix-vector product), the second in
        int8. The kernel's output (the accumulator) is rows' dtype: for bf16, fp32 was measured up to 1.8x slower and
        no more exact."""
        packed, scales, zeros, bias, _ = self._quantised(
            lambda q, s: torch.ops.onednn.qlinear_prepack(q.reshape(q.shape[0], -1), None))
        q, row_scales, means = quantise_rows(rows, centre=True, bits=self.bits)
        shift = matvec(self.weight.reshape(self.weight.shape[0], -1), means)  # W μ, (C_out,); 1x1 taps are one
        acc = torch.ops.onednn.qlinear_pointwise(q, 1.0, row_zero_point(self.bits), packed, scales, zeros, None, 1.0,
                                                 0, rows.dtype, *NO_POST_OP)  # (N, C_out): Σ q_x q_w s_w[o]
        return scale_rows(acc, row_scales, shift if bias is None else shift + bias, rows.dtype)


class Int8Conv2d(_Int8Layer, nn.Conv2d):
    """An `nn.Conv2d` whose bf16 and fp32 CPU calls run as int8 products (module docstring)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bits: int | None = None) -> Int8Conv2d:
        """An int8 twin of `conv` holding the very same parameter tensors; `bits` of activation levels (8 or 7;
        None: activation_bits())."""
        twin = conv_twin(cls, conv)
        twin.bits = check_bits(bits)
        return twin

    @property
    def pointwise(self) -> bool:
        """A 1x1 convolution without stride, padding, dilation or groups: a linear map of each pixel's channels."""
        return (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
                and self.dilation == (1, 1) and self.groups == 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or x.ndim != 4 or not self._takes_int8(x):
            return super().forward(x)
        x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's int8 convolution reads NHWC
        if self.pointwise:
            b, c, h, w = x.shape
            out = self._per_row(x.permute(0, 2, 3, 1).reshape(-1, c))  # (B·H·W, C_in), a view of the NHWC memory
            return out.view(b, h, w, -1).permute(0, 3, 1, 2)  # (B, C_out, H, W), channels last
        args = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
        packed, scales, zeros, bias, delta = self._quantised(
            lambda q, s: torch.ops.onednn.qconv_prepack(q, s, 1.0, 0, *args, None), correction=True)
        q, x_scale, x_zero, means = quantise_activation(x, channels=self.in_channels, bits=self.bits)
        corrected = -(delta @ means) if bias is None else bias - delta @ means  # Nagel et al. 2019, sec. 4.2
        return torch.ops.onednn.qconv2d_pointwise(q, x_scale, x_zero, packed, scales, zeros, corrected, *args, 1.0,
                                                  0, x.dtype, *NO_POST_OP)  # (B, C_out, H', W'), NHWC


class Int8Linear(_Int8Layer, nn.Linear):
    """An `nn.Linear` whose bf16 and fp32 CPU calls run as int8 products (module docstring)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int | None = None) -> Int8Linear:
        """An int8 twin of `linear` holding the very same parameter tensors; `bits` as Int8Conv2d.from_conv's."""
        twin = linear_twin(cls, linear)
        twin.bits = check_bits(bits)
        return twin

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 2 or not self._takes_int8(x):
            return super().forward(x)
        out = self._per_row(x.reshape(-1, self.in_features))  # (N, D_in) -> (N, D_out), N = all leading dims
        return out.reshape(*x.shape[:-1], self.out_features)


def check_bits(bits: int | None) -> int:
    """Activation bits for a layer: 8 or 7 (None: this CPU's activation_bits())."""
    if bits is None:
        return activation_bits()
    if not is_int(bits) or bits not in (7, 8):
        raise ValueError(f"int8 activation bits must be 8 or 7 (7 where the CPU lacks VNNI), got {bits!r}")
    return bits


def quantise_unet(unet: nn.Module, bits: int | None = None) -> int:
    """Swap the U-Net's nn.Conv2d and nn.Linear layers, except those KEEP_FLOAT names, for their int8 twins with
    `bits` of activation levels (None: activation_bits()), in place (before `pack_weights`, which then packs the
    rest); returns how many were swapped. ValueError when this torch has no oneDNN int8 kernels."""
    if not available():
        raise ValueError("precision int8 needs oneDNN's int8 kernels (torch.ops.onednn.qlinear_pointwise), which this "
                         "torch build lacks: use bf16 or fp32")
    bits = check_bits(bits)
    twins = {nn.Conv2d: Int8Conv2d.from_conv, nn.Linear: Int8Linear.from_linear}
    swapped = 0
    for name, layer in list(unet.named_modules()):
        twin = twins.get(type(layer))
        if twin is None or KEEP_FLOAT.search(name):
            continue
        parent, _, attribute = name.rpartition(".")
        setattr(unet.get_submodule(parent), attribute, twin(layer, bits))
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
    print(f"int8: activation quantiser built; --precision int8 runs the U-Net's large layers in int8 "
          f"({activation_bits()}-bit activations on this CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
