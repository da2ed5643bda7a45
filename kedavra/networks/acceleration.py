"""Faster inference on CPUs, same arithmetic: conv and linear weights kept in oneDNN's packed layout.

On a CPU, PyTorch's eager `nn.Conv2d` and `nn.Linear` hand oneDNN (the library behind its CPU convolutions
and bf16 matmuls) a plain weight tensor on every call. oneDNN's AMX and AVX-512 kernels read weights in a
blocked layout (for bf16, pairs of input channels interleaved for the VNNI/AMX dot products), so each call
first reorders the whole weight. In Stable Diffusion's U-Net the reorder can cost as much as the arithmetic:
a 1280-channel 3x3 convolution on a batch-2 8x8 map (3.8 GFLOP) takes 13 ms eager and 7 ms packed here
(docs/benchmark.md).

`optimize_for_inference` swaps every such layer for a subclass that reorders its weight once, on the first
call with a given input shape, keeps the packed copy, and from then on calls oneDNN's fused entry points
(`torch.ops.mkldnn._convolution_pointwise`, `_linear_pointwise`: bias applied inside the kernel), the same
ops torch.compile's inductor emits for frozen CPU graphs; nothing is compiled. The feed-forward GEGLU runs
its value and gate halves as two packed matmuls, so both results are contiguous and the gating product
streams through memory instead of striding across the (N, 2 inner) output of one matmul.

Numbers: the packed bf16 convolutions and linear layers give bitwise the eager results, and so do fp32
convolutions at the shapes tests/test_acceleration.py checks; at some SD 1.5 shapes the packed fp32 kernel
rounds differently (the fp32 U-Net's output moves by 4e-6 relative). The GEGLU halves are bitwise the chunked
product at most shapes; where oneDNN blocks the reduction of a half-width matrix differently (seen at 512 rows
x 1280 features) an element moves by one bf16 rounding step. fp32 linear layers stay on the eager path:
oneDNN's packed fp32 inner product is not faster than MKL's sgemm here and rounds differently.

Costs: one packed copy of each swapped weight that has run (measured sizes: docs/benchmark.md), and one reorder
when a layer first meets a new input shape. The parameters themselves
are untouched (state_dict, `.to()`, training): a layer repacks when its weight tensor or its version counter
changes (`load_state_dict`, optimizer steps, `.to()`), drops its packed copy on `.to()` / `.float()`, and
runs the ordinary way whenever autograd records, the input is not on the CPU or its dtype differs from the
weight's. An in-place edit through `param.data` bypasses the version counter: call
`release_packed_weights` after one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kedavra.networks.transformer import GEGLU

# Weight dtypes whose packed kernels pay off here: fp32 (AVX-512) and bf16 (AVX512-BF16 / AMX). fp16 is left
# to the eager path (on CPUs without AMX-FP16 oneDNN emulates it).
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
NO_POST_OP = ("none", [], "")  # oneDNN fused-op arguments: no activation after the layer (attr, scalars, algo)


def packing_available() -> bool:
    """True when this PyTorch build has oneDNN (MKLDNN) and its packed-weight ops."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name)
        for name in ("_convolution_pointwise", "_linear_pointwise", "_reorder_convolution_weight",
                     "_reorder_linear_weight")
    )


class _PackedWeight:
    """One packed copy of a weight, valid while the weight tensor, its version and the input shape it was
    packed for stay the same (a new shape or a modified weight repacks and frees the old copy).

    The key and the copy live in one tuple, so a reader never pairs a new key with an old copy. Copies and
    pickles of a module start empty: oneDNN's opaque tensors have no storage to copy."""

    def __init__(self):
        self.entry: tuple[tuple, Tensor] | None = None

    def get(self, weight: Tensor, shape: tuple, pack: Callable[[], Tensor]) -> Tensor:
        version = -1 if weight.is_inference() else weight._version  # inference tensors keep no version
        key = (weight.data_ptr(), version, weight.dtype, shape)
        entry = self.entry
        if entry is None or entry[0] != key:
            self.entry = None  # free the stale copy before allocating the new one
            entry = self.entry = (key, pack())
        return entry[1]

    def clear(self) -> None:
        self.entry = None

    def __deepcopy__(self, memo) -> _PackedWeight:
        return _PackedWeight()

    def __reduce__(self):
        return _PackedWeight, ()


def _use_packed(x: Tensor, weight: Tensor) -> bool:
    """Whether the packed oneDNN path applies: CPU, matching packable dtypes, and no autograd to feed."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype
        and weight.dtype in PACKABLE_DTYPES
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


class _PackedLayer(nn.Module):
    """Shared by the packed layers: the per-layer caches of packed copies, dropped whenever the parameters are
    converted or moved (`.to()`, `.float()`, `.cpu()`), since a copy never outlives the tensor it was made from."""

    def _caches(self, count: int = 1) -> tuple[_PackedWeight, ...]:
        caches = self.__dict__.get("_packed")
        if caches is None:
            caches = self.__dict__["_packed"] = tuple(_PackedWeight() for _ in range(count))
        return caches

    def release(self) -> None:
        for cache in self.__dict__.get("_packed", ()):
            cache.clear()

    def _apply(self, fn, recurse=True):
        self.release()
        return super()._apply(fn, recurse)


class PackedConv2d(_PackedLayer, nn.Conv2d):
    """An `nn.Conv2d` that keeps its weight in oneDNN's packed layout between calls (see the module doc)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> PackedConv2d:
        """A packed twin of `conv` holding the very same parameter tensors."""
        with torch.device("meta"):
            packed = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                         bias=conv.bias is not None, padding_mode=conv.padding_mode)
        packed.weight, packed.bias = conv.weight, conv.bias
        packed.train(conv.training)
        return packed

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or x.ndim != 4 or not _use_packed(
            x, self.weight
        ):
            return super().forward(x)
        args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        weight = self._caches()[0].get(self.weight, tuple(x.shape), lambda: (
            torch.ops.mkldnn._reorder_convolution_weight(self.weight.detach(), *args, list(x.shape))))
        return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *args, *NO_POST_OP)  # (B, C_out, H', W')


def _packed_linear(rows: Tensor, weight: Tensor, bias: Tensor | None, cache: _PackedWeight, key: Tensor) -> Tensor:
    """rows (N, D_in) @ weight (D_out, D_in)^T + bias with the weight packed for N rows; `key` is the parameter
    whose identity and version decide when to repack (the weight itself, or the whole matrix it is a slice of)."""
    packed = cache.get(key, (rows.shape[0],), lambda: torch.ops.mkldnn._reorder_linear_weight(
        weight.detach(), rows.shape[0]))
    return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, *NO_POST_OP)  # (N, D_out)


class PackedLinear(_PackedLayer, nn.Linear):
    """An `nn.Linear` that keeps its bf16 weight in oneDNN's packed layout between calls (see the module doc)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        """A packed twin of `linear` holding the very same parameter tensors."""
        with torch.device("meta"):
            packed = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        packed.weight, packed.bias = linear.weight, linear.bias
        packed.train(linear.training)
        return packed

    def forward(self, x: Tensor) -> Tensor:
        # oneDNN's packed fp32 inner product is not faster than MKL's sgemm: only bf16 takes the packed path.
        if self.weight.dtype != torch.bfloat16 or x.ndim < 2 or not _use_packed(x, self.weight):
            return super().forward(x)
        rows = x.reshape(-1, self.in_features).contiguous()  # (N, D_in), N = all leading dims; no copy if contiguous
        out = _packed_linear(rows, self.weight, self.bias, self._caches()[0], self.weight)  # (N, D_out)
        return out.reshape(*x.shape[:-1], self.out_features)


class PackedGEGLU(_PackedLayer, GEGLU):
    """A `GEGLU` whose value and gate matmuls run on packed halves of its projection (bf16 only; see the module
    doc for when the result is bitwise the chunked one)."""

    @classmethod
    def from_geglu(cls, geglu: GEGLU) -> PackedGEGLU:
        """A packed twin of `geglu` holding the very same projection (and so the same parameters)."""
        with torch.device("meta"):
            packed = cls(geglu.proj.in_features, geglu.proj.out_features // 2)
        packed.proj = geglu.proj
        packed.train(geglu.training)
        return packed

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.proj.weight, self.proj.bias
        if weight.dtype != torch.bfloat16 or x.ndim < 2 or not _use_packed(x, weight):
            return super().forward(x)
        inner = weight.shape[0] // 2  # proj rows [0, inner) give the value, [inner, 2 inner) the gate
        rows = x.reshape(-1, self.proj.in_features).contiguous()  # (N, D), N = all leading dims
        value_cache, gate_cache = self._caches(2)
        # Both halves are keyed on the whole weight: a change to it repacks both.
        value = _packed_linear(rows, weight[:inner], bias[:inner], value_cache, weight)  # (N, inner)
        gate = _packed_linear(rows, weight[inner:], bias[inner:], gate_cache, weight)  # (N, inner)
        out = value.mul_(F.gelu(gate))  # Shazeer 2020, eq. 6: x W * GELU(x V)
        return out.reshape(*x.shape[:-1], inner)


PACKED_TYPES = (PackedConv2d, PackedLinear, PackedGEGLU)


def pack_weights(module: nn.Module) -> int:
    """Swap every nn.Conv2d, nn.Linear and GEGLU inside `module` (in place) for its packed twin; returns how many
    were swapped (0 on a second call: packed layers are left as they are)."""
    swapped = 0
    for name, child in module.named_children():
        if type(child) is nn.Conv2d:
            setattr(module, name, PackedConv2d.from_conv(child))
        elif type(child) is nn.Linear:
            setattr(module, name, PackedLinear.from_linear(child))
        elif type(child) is GEGLU:  # its projection stays a plain Linear: PackedGEGLU packs the halves itself
            setattr(module, name, PackedGEGLU.from_geglu(child))
        elif not isinstance(child, PACKED_TYPES):
            swapped += pack_weights(child)
            continue
        else:
            continue
        swapped += 1
    return swapped


def release_packed_weights(module: nn.Module) -> int:
    """Free the packed copies held inside `module` (they are rebuilt on the next call); returns how many layers
    held a cache. Needed only after editing weights in place through `.data`, which the version check misses."""
    layers = [m for m in module.modules() if isinstance(m, _PackedLayer)]
    for layer in layers:
        layer.release()
    return len(layers)


def optimize_for_inference(model: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """Make `model` (already on `device` in `dtype`) faster at inference, in place; returns it.

    On a CPU with oneDNN and an fp32 or bf16 model: conv (and bf16 linear) weights are kept packed between
    calls (see the module docstring for what that changes in the numbers). Elsewhere (CUDA, fp16, a build
    without oneDNN) the model is returned as it is. Stable Diffusion's pipeline applies it to the U-Net and
    the VAE, the parts that run many times or at high resolution.
    """
    if torch.device(device).type == "cpu" and dtype in PACKABLE_DTYPES and packing_available():
        pack_weights(model)
    return model
