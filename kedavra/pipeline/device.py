"""Which device and precision to run on: bf16 where the hardware has fast bf16 matrix units, else fp32."""

from __future__ import annotations

import ctypes
import gc
import sys

import torch

from kedavra.networks.cpu_features import cpu_has_fast_bf16

# "int8" is carried as torch.qint8: CPU networks whose U-Net runs its large layers as int8 products
# (kedavra.networks.int8); network_dtype gives the dtype the weights are held in
INT8 = torch.qint8
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": INT8}


def network_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a precision's weights and activations are held in: for int8 (INT8) the CPU's default, bf16 where it
    is native and fp32 elsewhere (emulated bf16 would cost far more than int8 saves); else the dtype itself."""
    return default_dtype(torch.device("cpu")) if dtype == INT8 else dtype


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA GPUs that support it and on CPUs with native bf16, else fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32


def parse_precision(name: str | torch.dtype | None) -> torch.dtype | None:
    """"fp32" / "bf16" / "fp16" / "int8" / "auto" (None) or a torch dtype -> dtype (None means choose by device;
    "int8" is INT8)."""
    if name is None or name == "auto" or isinstance(name, torch.dtype):
        if isinstance(name, torch.dtype) and name not in PRECISIONS.values():
            raise ValueError(f"unsupported dtype {name}; allowed: {', '.join(map(str, PRECISIONS.values()))}")
        return None if name in (None, "auto") else name
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; allowed: auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def check_device(name: str | None) -> torch.device | None:
    """--device as a torch.device, refusing one this machine lacks."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; e.g. cpu, cuda, cuda:1, mps") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: no such CUDA GPU here ({torch.cuda.device_count()} found)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS (Apple GPU) is not available here")
    return device


def release_memory(device: torch.device | None = None) -> None:
    """Give the memory a finished job freed back to the system: Python's cycles collected, CUDA's cached blocks
    released, and on glibc (Linux) the allocator's free pages returned with malloc_trim(0). Without the trim, glibc
    keeps a large job's freed activations in its arenas: the embedded model at 768x768 stays at 730 MB after the job
    against 389 MB before it, and comes back to 396 MB with it (docs/serving.md)."""
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()
    trim_heap()


def trim_heap() -> bool:
    """glibc's malloc_trim(0): the heap's free pages (freed activations it keeps for reuse) go back to the system;
    False, and nothing done, elsewhere (musl and other C libraries have no malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True
