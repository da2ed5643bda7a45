"""Training on several processes: torch.distributed set up from torchrun's environment, and the few
collective operations the loop needs.

    torchrun --nproc_per_node=2 -m kedavra train ...

torchrun starts one process per rank with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set;
`init_distributed` joins them into one process group (gloo on the CPU, NCCL on CUDA GPUs). A process group
that the caller has already initialised (a test's spawned workers) is used as it is. Every rank computes the
same global batch's random draws and takes its own slice, so the run's result does not depend on the number
of processes beyond floating-point rounding (kedavra.training.loop).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: its rank among world_size processes and the device it trains on."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # True when init_distributed created the process group (and close must end it)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, samples and writes checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the processes (the tensor itself when there is one)."""
        if not self.active:
            return values
        values = values.to(self.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values.cpu()


def init_distributed(device: str | torch.device | None = None) -> Distributed:
    """This process's place in the run: one process, a torchrun launch, or an existing process group.

    device: "cpu", "cuda", ... (default: CUDA when present). Under torchrun on CUDA each rank takes the GPU
    numbered by its LOCAL_RANK.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return Distributed(0, 1, device)
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with torchrun")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
        return Distributed(dist.get_rank(), dist.get_world_size(), device, owns_group=True)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return Distributed(dist.get_rank(), dist.get_world_size(), device)


def close_distributed(context: Distributed) -> None:
    """Leave the process group `init_distributed` created (not one the caller made)."""
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()
