"""What this CPU computes natively, as torch's own probes report it (or, where a build lacks them, the kernel's
/proc/cpuinfo flags): the facts behind kedavra's default precision, its packed bf16 layers and its attention kernel.

bf16 is native on CPUs with Intel AMX (amx_bf16) or AVX-512 BF16 (avx512_bf16: Intel Cooper Lake and later, AMD
Zen 4 and later where the hypervisor passes AVX-512 through). Elsewhere (an AVX2-only CPU, or a VM that hides
AVX-512) PyTorch emulates bf16 arithmetic, many times slower than fp32, and oneDNN cannot pack bf16 weights at all
("bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq").

int8 products are exact at full 8-bit range on CPUs with AVX-512 VNNI (vpdpbusd sums u8 x s8 products into int32) or
AMX-INT8. Without them oneDNN's AVX2 kernel multiplies with vpmaddubsw, which adds two u8 x s8 products into a
saturating int16 first, so kedavra's int8 layers use 7-bit activations there (kedavra.networks.int8).
"""

from __future__ import annotations

from functools import cache

import torch

PROBES = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported",  # flag: torch.cpu's
          "avx512_vnni": "_is_vnni_supported", "amx_int8": "_is_amx_tile_supported"}


@cache
def cpu_flags() -> frozenset[str]:
    """The flags /proc/cpuinfo lists for the first CPU (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@cache
def cpu_has(feature: str) -> bool:
    """Whether the CPU has `feature` (a key of PROBES): torch's probe where the build has it, else the
    /proc/cpuinfo flag."""
    if feature not in PROBES:
        raise ValueError(f"unknown CPU feature {feature!r}; allowed: {', '.join(PROBES)}")
    probe = getattr(torch.cpu, PROBES[feature], None)
    return bool(probe()) if probe is not None else feature in cpu_flags()


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices natively (Intel AMX or AVX-512 BF16), where a bf16 matmul runs
    several times faster than an fp32 one; elsewhere bf16 on the CPU is emulated and slower."""
    return cpu_has("amx_bf16") or cpu_has("avx512_bf16")


def cpu_has_exact_int8_pairs() -> bool:
    """True when oneDNN's u8 x s8 products sum into int32 without an int16 step (AVX-512 VNNI or AMX-INT8), so that
    activations may use all 8 bits; AVX-VNNI (the 256-bit form of some laptops' CPUs) is not counted, which costs
    such a CPU one bit of activation resolution and keeps it exact whichever kernel oneDNN picks."""
    return cpu_has("avx512_vnni") or cpu_has("amx_int8")
