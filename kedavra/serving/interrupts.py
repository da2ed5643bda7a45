"""Stopping a running generation: from the step callback after a step, or inside a step between network blocks.

The worker (kedavra.serving.worker) sets a job's `cancelled` event on POST /interrupt or when its client leaves;
its step callback raises `Interrupted` after the current step, and while the job runs `interruptible` makes the
U-Net's and the VAE's residual and attention blocks raise it too, so a large step stops within one block's time.
"""

from __future__ import annotations

import contextlib


class Interrupted(Exception):
    """Raised from the step callback (or a network block) to stop a running job."""


@contextlib.contextmanager
def interruptible(job, *pipelines):
    """While it lasts, `job` (a worker Job: its `cancelled` event) stops inside a sampler step, between the
    U-Net's (and the VAE's) residual and attention blocks of `pipelines`, not only after the step: a forward
    pre-hook on each block raises Interrupted once job.cancelled is set, so a large step frees the worker within
    one block's time."""

    def check(module, args) -> None:
        if job.cancelled.is_set():
            raise Interrupted

    handles = []
    for pipe in pipelines:
        if pipe is None:
            continue
        for network in (pipe.model.unet, pipe.model.vae):
            for name, module in network.named_modules():
                if name.rsplit(".", 2)[-2:-1] in (["resnets"], ["attentions"]):  # ...resnets.0, ...attentions.1
                    handles.append(module.register_forward_pre_hook(check))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
