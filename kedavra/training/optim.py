"""AdamW and its learning-rate schedule: linear warm-up, then constant or cosine decay.

The schedule is a pure function of the optimizer step (`learning_rate`), so a resumed run needs no scheduler
state beyond the step it resumes at: the checkpoint's step is the scheduler's state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

ADAM_BETAS = (0.9, 0.999)  # Kingma and Ba 2015, sec. 2 defaults (LDM and diffusers' train_text_to_image keep them)
ADAM_EPS = 1e-8  # Kingma and Ba 2015, sec. 2


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW (Loshchilov and Hutter 2019) over `params`, with PyTorch's fused kernel on the CPU and CUDA (faster
    than the default for-each loop: docs/training.md has the timings)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(list(params), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay,
                             fused=fused)


def learning_rate(step: int, *, lr: float, warmup_steps: int, total_steps: int, schedule: str,
                  min_lr_ratio: float) -> float:
    """The learning rate of optimizer step `step` (0-based).

    Warm-up: lr·(step+1)/warmup_steps for the first warmup_steps steps (Goyal et al. 2017, sec. 2.2, linear
    warm-up). Then "constant": lr; "cosine": lr·(r + (1-r)·½(1 + cos(π p))) with p going from 0 after the
    warm-up to 1 at the last step and r = min_lr_ratio (Loshchilov and Hutter 2017, SGDR eq. 5, one cycle).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; allowed: constant, cosine")
    decay_steps = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value
