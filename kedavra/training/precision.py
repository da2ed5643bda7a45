"""The precision a training step computes in (`TrainConfig.precision`): the weights and the optimizer state stay
fp32 (the master copy); under "bf16" the forward pass runs in bfloat16 autocast, the losses in fp32. "auto" is
resolved once, by the trainer, to one of the two (`resolve_precision`)."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kedavra.pipeline.device import default_dtype


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" where `device` computes bf16 natively (a CUDA GPU with bf16, a CPU with AMX or AVX-512 BF16),
    else "fp32": the pipeline's own choice (kedavra.pipeline.device.default_dtype), with its fp16 for older GPUs read
    as fp32, which training does not autocast to. On a CPU without native bf16 (AVX2 only, say) bf16 is emulated and a
    training step runs many times slower than in fp32 (docs/training.md). Any other precision is returned as it is."""
    if precision != "auto":
        return precision
    return "bf16" if default_dtype(device) == torch.bfloat16 else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in: bf16 autocast on `device` for "bf16" (on the CPU with the math attention
    kernel), nothing for "fp32"."""
    if precision != "bf16":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    stack.enter_context(attention_kernels(precision, device))
    return stack


def attention_kernels(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The attention kernels a step may use: on the CPU under "bf16" the math one alone (CPU flash attention's bf16
    backward is slower than the math path, docs/training.md). The backward pass runs in it too: gradient
    checkpointing recomputes the forward there, and torch.utils.checkpoint refuses a recomputation that took another
    kernel (its saved tensors differ)."""
    if precision == "bf16" and device.type == "cpu":
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()
