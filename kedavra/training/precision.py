"""The precision a training step computes in (`TrainConfig.precision`): the weights and the optimizer state stay
fp32 (the master copy); under "bf16" the forward pass runs in bfloat16 autocast, the losses in fp32."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in: bf16 autocast on `device` for "bf16" (on the CPU with the math attention
    kernel), nothing for "fp32"."""
    if precision != "bf16":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    if device.type == "cpu":  # CPU flash attention's bf16 backward is slower than the math path (docs/training.md)
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack
