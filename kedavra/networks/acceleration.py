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

Memory: with `evict` (the pipeline's setting, `optimize_for_inference`) a layer keeps its weight in the packed
copy alone once it has run: the parameter then holds a one-element placeholder of the weight's shape and dtype
(a weight that was a view into a checkpoint's memory map also gives its pages back: kedavra.mapped_memory),
and whatever reads the weight as a tensor gets the dense values back first, rebuilt exactly from the packed copy
(oneDNN reorders it back; no arithmetic): `layer.weight`, `state_dict()`, `load_state_dict()`, `.to()` /
`.float()`, copies and pickles, the eager path (autograd, another device or dtype). So the model holds one copy
of its weights, as an unpacked one does; at a new input shape the layer rebuilds the dense weight, repacks and
evicts it again, one layer at a time. `parameters()` / `named_parameters()` see the placeholders
(`release_packed_weights` puts the dense weights back), and so do a Parameter object kept from before a call (read
`layer.weight` again) and a parameter shared with a module outside the packed one: pack_weights leaves `evict` off
by default for that reason. Without `evict` the packed copies
sit beside the dense weights (measured sizes: docs/benchmark.md).

Repacking: a layer repacks when its weight tensor or its version counter changes (`load_state_dict`, optimizer
steps, LoRA merges, `.to()`), drops its packed copy on `.to()` / `.float()`, and runs the ordinary way whenever
autograd records, the input is not on the CPU or its dtype differs from the weight's. An in-place edit through
`param.data` bypasses the version counter: call `release_packed_weights` after one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kedavra.mapped_memory import drop_pages
from kedavra.networks.cpu_features import cpu_has_fast_bf16
from kedavra.networks.transformer import GEGLU

# Weight dtypes whose packed kernels pay off: fp32, and bf16 where the CPU has AVX512-BF16 or AMX (elsewhere
# oneDNN refuses to pack bf16 weights: kedavra.networks.cpu_features). fp16 is left to the eager path (on CPUs
# without AMX-FP16 oneDNN emulates it).
ALWAYS_PACKABLE = (torch.float32,)
NATIVE_BF16_PACKABLE = (torch.float32, torch.bfloat16)
NO_POST_OP = ("none", [], "")  # oneDNN fused-op arguments: no activation after the layer (attr, scalars, algo)


def packable_dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes this CPU packs: fp32, and bf16 where it computes bf16 natively."""
    return NATIVE_BF16_PACKABLE if cpu_has_fast_bf16() else ALWAYS_PACKABLE


def packing_available() -> bool:
    """True when this PyTorch build has oneDNN (MKLDNN) and its packed-weight ops."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name)
        for name in ("_convolution_pointwise", "_linear_pointwise", "_reorder_convolution_weight",
                     "_reorder_linear_weight")
    )


def conv_twin(cls: type, conv: nn.Conv2d) -> nn.Conv2d:
    """An instance of `cls` (an nn.Conv2d subclass) with conv's settings, holding conv's very parameter tensors."""
    with torch.device("meta"):
        twin = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                   dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                   padding_mode=conv.padding_mode)
    twin.weight, twin.bias = conv.weight, conv.bias
    twin.train(conv.training)
    return twin


def linear_twin(cls: type, linear: nn.Linear) -> nn.Linear:
    """An instance of `cls` (an nn.Linear subclass) with linear's sizes, holding linear's very parameter tensors."""
    with torch.device("meta"):
        twin = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
    twin.weight, twin.bias = linear.weight, linear.bias
    twin.train(linear.training)
    return twin


class _PackState:
    """Where one layer's weight lives: the packed copies, and whether the parameter still holds the dense values.

    copies: one packed tensor per row block of the weight (PackedLinear.row_blocks), made for input shape `shape`
    from the dense weight whose (data_ptr, version) is `source`; None before the first packed call and after a
    change. placeholder: while the dense weight is evicted, the stand-in the parameter holds (a broadcast zero of
    the weight's shape, dtype and device: 1 element of memory); the values then live only in `copies`, and
    `stride` is the dense weight's, to rebuild it as it was. None while the parameter holds the values."""

    __slots__ = ("copies", "shape", "source", "placeholder", "stride")

    def __init__(self):
        self.copies: tuple[Tensor, ...] | None = None
        self.shape: tuple | None = None
        self.source: tuple[int, int] | None = None
        self.placeholder: Tensor | None = None
        self.stride: tuple[int, ...] | None = None


def _source(weight: Tensor) -> tuple[int, int]:
    """The identity of a dense weight's values: its memory and version (inference tensors keep no version)."""
    return weight.data_ptr(), (-1 if weight.is_inference() else weight._version)


def _use_packed(x: Tensor, weight: Tensor) -> bool:
    """Whether the packed oneDNN path applies: CPU, matching packable dtypes, and no autograd to feed."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype
        and weight.dtype in packable_dtypes()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


class _PackedLayer(nn.Module):
    """Shared by the packed layers: the packed copies of `weight` and, with `evict`, the dense weight kept only in
    them (module docstring). Everything that reads the weight as a tensor finds the dense values: `layer.weight`,
    `state_dict()`, `load_state_dict()`, `.to()` / `.float()`, copies and pickles put them back first; only
    `parameters()` / `named_parameters()` yield the placeholder while the weight is evicted."""

    row_blocks = 1  # row blocks of the weight packed separately (2 for a GEGLU's projection: value and gate)
    evict = False  # drop the dense weight once packed (pack_weights(evict=True)); an instance attribute there

    def _state(self) -> _PackState:
        state = self.__dict__.get("_pack")
        if state is None:
            state = self.__dict__["_pack"] = _PackState()
        return state

    @property
    def evicted(self) -> bool:
        """True while the dense weight lives only in the packed copies."""
        state = self.__dict__.get("_pack")
        return state is not None and state.placeholder is not None and (
            self._parameters["weight"].data_ptr() == state.placeholder.data_ptr())

    def _packed_copies(self, shape: tuple, pack: Callable[[Tensor], Tensor]) -> tuple[Tensor, ...]:
        """The packed copies of the weight's row blocks for input shape `shape`, made with `pack(dense block)` when
        there are none for this shape and these values; evicts the dense weight after, if `evict`."""
        weight, state = self._parameters["weight"], self._state()
        if state.placeholder is not None and not self.evicted:
            state.__init__()  # the weight was replaced (`.data =`, a new Parameter): its new values are the truth
        if state.copies is not None and state.placeholder is None and state.source != _source(weight):
            state.copies = None  # edited in place since packing
        if state.copies is not None and state.shape != shape:
            self.restore_dense()
            state.copies = None  # free the old copies before making the new ones
        if state.copies is None:
            dense = weight.detach()
            state.copies = tuple(pack(block) for block in dense.chunk(self.row_blocks))  # (rows / row_blocks, ...)
            state.shape, state.source = shape, _source(weight)
        if self.evict and state.placeholder is None:
            self._evict(weight, state)
        return state.copies

    @staticmethod
    def _evict(weight: Tensor, state: _PackState) -> None:
        state.stride = weight.stride()
        state.placeholder = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
        dense, weight.data = weight.data, state.placeholder  # the dense values' last reference from this layer goes
        drop_pages(dense)  # a view into a checkpoint's memory map: its pages leave the resident set too

    def restore_dense(self) -> None:
        """Put the dense weight back into the parameter (from the packed copies, exactly: a reorder) if evicted."""
        if not self.evicted:
            return
        weight, state = self._parameters["weight"], self._state()
        blocks = [copy.to_dense() for copy in state.copies]  # oneDNN's blocked layout back to plain (O, I, ...)
        dense = torch.empty_strided(weight.shape, state.stride, dtype=weight.dtype, device=weight.device)
        weight.data = dense.copy_(blocks[0] if len(blocks) == 1 else torch.cat(blocks))
        state.placeholder = None
        state.source = _source(weight)  # the copies still hold these values

    def release(self) -> None:
        """Drop the packed copies, the dense weight put back first."""
        self.restore_dense()
        self.__dict__.pop("_pack", None)

    def __getattr__(self, name: str):
        if name == "weight" and self.__dict__.get("_pack") is not None:
            self.restore_dense()
        return super().__getattr__(name)

    def _apply(self, fn, recurse=True):
        self.release()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.restore_dense()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        self.restore_dense()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        """Copies and pickles get the dense weight and no packed copies (oneDNN's opaque tensors have no storage)."""
        self.restore_dense()
        state = self.__dict__.copy()
        state.pop("_pack", None)
        return state


class PackedConv2d(_PackedLayer, nn.Conv2d):
    """An `nn.Conv2d` that keeps its weight in oneDNN's packed layout between calls (see the module doc)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> PackedConv2d:
        """A packed twin of `conv` holding the very same parameter tensors."""
        return conv_twin(cls, conv)

    def forward(self, x: Tensor) -> Tensor:
        weight = self._parameters["weight"]
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or x.ndim != 4 or not _use_packed(x, weight):
            return super().forward(x)
        args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        (packed,) = self._packed_copies(tuple(x.shape), lambda dense: (
            torch.ops.mkldnn._reorder_convolution_weight(dense, *args, list(x.shape))))
        return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, *args, *NO_POST_OP)  # (B, C_out, H', W')


class PackedLinear(_PackedLayer, nn.Linear):
    """An `nn.Linear` that keeps its bf16 weight in oneDNN's packed layout between calls (see the module doc); with
    `row_blocks` 2 (a GEGLU's projection) the two halves of its output rows are packed, and run, separately."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, row_blocks: int = 1) -> PackedLinear:
        """A packed twin of `linear` holding the very same parameter tensors."""
        packed = linear_twin(cls, linear)
        packed.row_blocks = row_blocks
        return packed

    def takes_packed(self, x: Tensor) -> bool:
        """Whether a call on x runs packed: bf16 only (oneDNN's packed fp32 inner product is not faster than MKL's
        sgemm here, and rounds differently)."""
        weight = self._parameters["weight"]
        return weight.dtype == torch.bfloat16 and x.ndim >= 2 and _use_packed(x, weight)

    def blocks(self, x: Tensor) -> tuple[Tensor, ...]:
        """x (..., D_in) times each row block of the weight, plus its bias: row_blocks tensors (..., D_out /
        row_blocks), each contiguous. Only where `takes_packed(x)`."""
        rows = x.reshape(-1, self.in_features).contiguous()  # (N, D_in), N = all leading dims; no copy if contiguous
        copies = self._packed_copies((rows.shape[0],), lambda dense: (
            torch.ops.mkldnn._reorder_linear_weight(dense, rows.shape[0])))
        biases = (None,) * len(copies) if self.bias is None else self.bias.chunk(len(copies))
        return tuple(torch.ops.mkldnn._linear_pointwise(rows, packed, bias, *NO_POST_OP).reshape(*x.shape[:-1], -1)
                     for packed, bias in zip(copies, biases, strict=True))  # each (..., D_out / row_blocks)

    def forward(self, x: Tensor) -> Tensor:
        if not self.takes_packed(x):
            return super().forward(x)
        outputs = self.blocks(x)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


class PackedGEGLU(GEGLU):
    """A `GEGLU` whose value and gate matmuls run on the packed halves of its projection (a PackedLinear with two
    row blocks; bf16 only; see the module doc for when the result is bitwise the chunked one)."""

    @classmethod
    def from_geglu(cls, geglu: GEGLU) -> PackedGEGLU:
        """A packed twin of `geglu` holding the very same parameters (its projection made a two-block PackedLinear)."""
        with torch.device("meta"):
            packed = cls(geglu.proj.in_features, geglu.proj.out_features // 2)
        proj = geglu.proj
        packed.proj = proj if isinstance(proj, PackedLinear) else PackedLinear.from_linear(proj, row_blocks=2)
        packed.train(geglu.training)
        return packed

    def forward(self, x: Tensor) -> Tensor:
        if not self.proj.takes_packed(x):
            return super().forward(x)
        value, gate = self.proj.blocks(x)  # (..., inner) each: proj rows [0, inner) and [inner, 2 inner)
        return value.mul_(F.gelu(gate))  # Shazeer 2020, eq. 6: x W * GELU(x V)


PACKED_TYPES = (PackedConv2d, PackedLinear, PackedGEGLU)


def pack_weights(module: nn.Module, evict: bool = False) -> int:
    """Swap every nn.Conv2d, nn.Linear and GEGLU inside `module` (in place) for its packed twin; returns how many
    were swapped (0 on a second call: packed layers are left as they are). evict: each packed layer then keeps its
    weight in the packed copy alone once it has run (module docstring), instead of beside the dense one."""
    swapped = _swap_packed(module)
    if evict:
        for layer in module.modules():
            if isinstance(layer, _PackedLayer):
                layer.evict = True
    return swapped


def _swap_packed(module: nn.Module) -> int:
    swapped = 0
    for name, child in module.named_children():
        if type(child) is nn.Conv2d:
            setattr(module, name, PackedConv2d.from_conv(child))
        elif type(child) is nn.Linear:
            setattr(module, name, PackedLinear.from_linear(child))
        elif type(child) is GEGLU and type(child.proj) is nn.Linear:  # its projection: a PackedLinear of two blocks
            setattr(module, name, PackedGEGLU.from_geglu(child))
        elif not isinstance(child, PACKED_TYPES):
            swapped += _swap_packed(child)
            continue
        else:
            continue
        swapped += 1
    return swapped


def release_packed_weights(module: nn.Module) -> int:
    """Free the packed copies held inside `module`, the dense weights put back first (the copies are rebuilt on the
    next call); returns how many packed layers there are. Needed after editing weights in place through `.data`,
    which the version check misses, or to read the weights through `parameters()` after an evicting run."""
    layers = [m for m in module.modules() if isinstance(m, _PackedLayer)]
    for layer in layers:
        layer.release()
    return len(layers)


def optimize_for_inference(model: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """Make `model` (already on `device` in `dtype`) faster at inference, in place; returns it.

    On a CPU with oneDNN and an fp32 model, or a bf16 one where the CPU computes bf16 natively: conv (and bf16
    linear) weights are kept packed between calls, in place of the dense ones (`pack_weights(evict=True)`; see the
    module docstring for what that changes in the numbers). Elsewhere (CUDA, fp16, bf16 on a CPU that emulates it, a
    build without oneDNN) the model is returned as it is. Stable Diffusion's pipeline applies it to the U-Net and
    the VAE, the parts that run many times or at high resolution.
    """
    if torch.device(device).type == "cpu" and dtype in packable_dtypes() and packing_available():
        pack_weights(model, evict=True)
    return model
