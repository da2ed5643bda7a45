"""Attention on CPUs with AVX-512 BF16 but no AMX: a flash-attention kernel of kedavra's own, about 2x torch's SDPA.

On such a CPU (measured on an AMD Zen 4; Intel's Cooper Lake is the other kind) PyTorch's CPU flash-attention
kernel is bound by its softmax and its small-K matrix products: at SD 1.5's 4,096-token self-attention (head
width 40) it runs at a third of the bf16 matmul rate and takes a third of a 512x512 U-Net call, while the
convolutions and linear layers run at that rate (docs/benchmark.md, "On a CPU without AMX").
kedavra/networks/cpu_attention.cpp computes the same
    softmax(Q K^T / sqrt(Dh)) V                                     (Vaswani et al. 2017, eq. 1)
in FlashAttention's blocks (Dao et al. 2022, Algorithm 1; the online softmax of Milakov & Gimelshein 2018) with
both products on vdpbf16ps and a polynomial 2^x; the source file documents the layouts.

When it runs (`applies`): kedavra.networks.attention.attend hands it a call with no mask and no slicing when the
tensors are bf16 on the CPU, nothing records gradients, q, k and v share batch, heads and an even head width, there
are at least MIN_KEYS keys (with the 77 keys of a text context it is no faster than SDPA), the CPU reports AVX-512
BF16 and not AMX (with AMX, SDPA's products run on the matrix units), and KEDAVRA_CPU_ATTENTION is not "0".
Everything else, training and fp32 among it, goes to SDPA as before, so the parity tests (fp32) and the
packed-versus-eager identity (both paths call `attend`) are untouched.

Numbers: like SDPA's bf16 kernel it sums in float32 and rounds the probabilities to bf16 before the second
product; its error against the float32 result is SDPA-bf16's own (tests/test_cpu_attention.py bounds it by
twice SDPA-bf16's error plus one bf16 step of the output). A U-Net's output moves by about as much as packing
moves it (measured in docs/benchmark.md).

Building: the C++ file is compiled on first use (kedavra.networks.cpp_extension: about 30 s with the machine's C++
compiler and ninja; `scripts/setup.sh` builds it ahead) and cached by torch in ~/.cache/torch_extensions.
`python -m kedavra.networks.cpu_attention` builds it and reports. If the build fails (no compiler), a warning
says why once and SDPA runs instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from kedavra.networks.cpp_extension import CppExtension, profiled
from kedavra.networks.cpu_features import cpu_has

MIN_KEYS = 256  # below this the kernel is no faster than SDPA (docs/benchmark.md)
BLOCK_KEYS = 256  # the kernel's BK: keys are padded to a multiple of it
SWITCH = "KEDAVRA_CPU_ATTENTION"  # "0" turns the kernel off
SOURCE = Path(__file__).with_name("cpu_attention.cpp")
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-fopenmp"]
KERNEL = CppExtension("kedavra_cpu_attention", SOURCE, CFLAGS, "torch's SDPA")


def cpu_qualifies() -> bool:
    """True on a CPU with AVX-512 BF16 and without AMX (the CPUs where the kernel beats SDPA)."""
    return cpu_has("avx512_bf16") and not cpu_has("amx_bf16")


def enabled() -> bool:
    """The CPU qualifies, KEDAVRA_CPU_ATTENTION is not "0", and the kernel has not failed to build."""
    return os.environ.get(SWITCH, "1") != "0" and KERNEL.failed is None and cpu_qualifies()


@contextmanager
def switched_off() -> Iterator[None]:
    """Within the block, KEDAVRA_CPU_ATTENTION=0 (torch's SDPA everywhere); the variable's previous value after it."""
    previous = os.environ.get(SWITCH)
    os.environ[SWITCH] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[SWITCH]
        else:
            os.environ[SWITCH] = previous


def applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether `attend` may hand this unmasked call, q (B, Nh, S, Dh), k and v (B, Nh, L, Dh), to the kernel."""
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
        and q.dim() == 4
        and k.shape == v.shape
        and k.shape[:2] == q.shape[:2]
        and k.shape[-1] == q.shape[-1]
        and q.shape[-1] % 2 == 0
        and k.shape[2] >= MIN_KEYS
        and q.shape[2] > 0
        and enabled()
    )


def extension() -> ModuleType | None:
    """The compiled kernel (built on first call, then cached by torch), or None with a warning if it cannot be."""
    return KERNEL.get()


def pack_keys(k: Tensor, padded: int) -> Tensor:
    """k (B, Nh, L, Dh) -> (B, Nh, Lp/16, Dh/2, 16, 2), Lp = padded: per block of 16 keys, each pair of dimensions of
    all 16 keys (cpu_attention.cpp's layout), zeros past the L keys; one copy, straight from k's strides."""
    batch, heads, keys, width = k.shape
    packed = k.new_empty(batch, heads, padded // 16, width // 2, 16, 2)
    by_key = packed.permute(0, 1, 2, 4, 3, 5)  # (B, Nh, Lp/16, 16, Dh/2, 2): packed, indexed like k
    full, rest = divmod(keys, 16)
    if full:
        by_key[:, :, :full].copy_(k[:, :, : 16 * full].unflatten(2, (full, 16)).unflatten(-1, (width // 2, 2)))
    packed[:, :, full:].zero_()
    if rest:
        by_key[:, :, full, :rest].copy_(k[:, :, 16 * full :].unflatten(-1, (width // 2, 2)))
    return packed


def pack_values(v: Tensor, padded: int) -> Tensor:
    """v (B, Nh, L, Dh) -> (B, Nh, Lp/2, Dv, 2), Lp = padded, Dv = Dh rounded up to 16: per pair of keys, each
    dimension's two values side by side (cpu_attention.cpp's layout), zeros past the L keys and the Dh dimensions."""
    batch, heads, keys, width = v.shape
    packed = v.new_empty(batch, heads, padded // 2, -(-width // 16) * 16, 2)
    by_key = packed.permute(0, 1, 2, 4, 3)  # (B, Nh, Lp/2, 2, Dv): packed, indexed like v's key pairs
    pairs, odd = divmod(keys, 2)
    by_key[:, :, :pairs, :, :width].copy_(v[:, :, : 2 * pairs].unflatten(2, (pairs, 2)))
    packed[:, :, :pairs, width:].zero_()
    packed[:, :, pairs:].zero_()
    if odd:
        by_key[:, :, pairs, 0, :width].copy_(v[:, :, keys - 1])
    return packed


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
    """softmax(Q K^T / sqrt(Dh)) V: q (B, Nh, S, Dh), k and v (B, Nh, L, Dh) bf16 -> (B, Nh, S, Dh), a view of a
    (B, S, Nh, Dh) tensor (merging the heads is then free); None if the kernel is unavailable."""
    kernel = extension()
    if kernel is None:
        return None
    batch, heads, queries, width = q.shape
    keys = k.shape[2]
    padded = -(-keys // BLOCK_KEYS) * BLOCK_KEYS
    k_packed = pack_keys(k, padded).view(batch * heads, padded // 16, width // 2, 16, 2)
    v_packed = pack_values(v, padded).flatten(0, 1)  # (B*Nh, Lp/2, Dv, 2)
    out = torch.empty(batch, queries, heads, width, dtype=torch.bfloat16)
    query = q if q.stride(-1) == 1 else q.contiguous()
    name = "kedavra::cpu_attention"
    if torch.autograd._profiler_enabled():  # the span names the shape (scripts/profile_unet.py)
        name += f" {queries}x{keys} tokens, head width {width}"
    with profiled(name):
        kernel.attention(query, k_packed, v_packed, out, keys, width**-0.5)
    return out.transpose(1, 2)  # (B, S, Nh, Dh) -> (B, Nh, S, Dh)


def main() -> int:
    """Build the kernel now (scripts/setup.sh calls this) and say whether kedavra will use it on this machine."""
    if not cpu_qualifies():
        print("cpu_attention: this CPU has AMX or lacks AVX-512 BF16; kedavra uses torch's SDPA (nothing to build)")
        return 0
    if extension() is None:
        print(f"cpu_attention: the kernel could not be built ({KERNEL.failed}); kedavra uses torch's SDPA")
        return 0
    print("cpu_attention: kernel built; used for bf16 attention with at least "
          f"{MIN_KEYS} keys ({SWITCH}=0 turns it off)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
