"""FSDP2 (`TrainConfig.fsdp`): the trained weights, their gradients, AdamW's moments and the EMA shadows sharded
over the processes instead of replicated on each, for models whose training state does not fit one device.

This is ZeRO stage 3 (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", sec. 5.1-5.3: optimizer states, gradients and parameters partitioned) as PyTorch's FSDP implements it (Zhao
et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel"), in its second form,
`torch.distributed.fsdp.fully_shard`, which splits every parameter along dim 0 into one DTensor shard per rank. Each
sharded unit is all-gathered just before its forward (and again for its backward), freed after, and its gradient
reduce-scattered, so a rank holds 1/N of the trained state plus the full weights of about one unit at a time. With N
processes, per trained parameter:

    DDP    4 (fp32 weight) + 4 (gradient) + 8 (AdamW's two moments) + 4 (EMA)  = 20 bytes on every rank
    FSDP2  20 / N bytes on every rank, + the largest unit's full weights and gradient while it runs

The units (`sharded_units`): each ResBlock, transformer and resampler of the U-Net's down, mid and up levels (the
levels are containers whose forward is never called, so they cannot carry FSDP's hooks), each level and mid block of
the VAE's encoder and decoder, each layer of a trained CLIP text encoder; the objective is the root, which holds the
rest (the U-Net's time embedding, conv_in, norm_out, conv_out). Frozen parameters in the objective (a frozen text
encoder) are left whole on every rank (`ignored_params`): a frozen encoder runs once per uncached caption, a number
that differs between ranks, so it must not need a collective.

Numerics are those of DDP: weights and AdamW stay fp32, bf16 autocast runs around the forward as under DDP (no
FSDP MixedPrecisionPolicy, which would round the weights to bf16 before every op), and a gradient is the mean over
ranks as DDP's. Gradient accumulation reduce-scatters every micro-step, so gradients stay sharded between
micro-steps (DDP sums them locally and all-reduces once); that changes the order of the float additions only.

Checkpoints: `save_sharded` / `load_sharded` write and read the model, AdamW and EMA state as
torch.distributed.checkpoint (DCP) files, each rank its own slice, keyed by parameter name, so a checkpoint resumes
on another number of processes (DCP reshards on load). `gather_full` assembles the full weights on rank 0 for
samples and the exported model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from kedavra.networks.model import StableDiffusion
from kedavra.networks.text_encoder import TextEncoder
from kedavra.networks.unet import UNet
from kedavra.networks.vae import AutoencoderKL
from kedavra.training.distributed import Distributed
from kedavra.training.ema import EMA


def sharded_units(module: nn.Module) -> list[nn.Module]:
    """The submodules of a trained component that become FSDP units of their own (module docstring); a component
    of another kind has none (it lives in the root unit)."""
    if isinstance(module, UNet):
        levels = [*module.down_blocks, *([module.mid_block] if module.mid_block is not None else []),
                  *module.up_blocks]
        units = []
        for level in levels:
            units += [*level.resnets, *level.attentions]
            if level.resample is not None:
                units.append(level.resample)
        return units
    if isinstance(module, AutoencoderKL):
        return [*module.encoder.down_blocks, module.encoder.mid_block, module.decoder.mid_block,
                *module.decoder.up_blocks]
    if isinstance(module, TextEncoder):
        return list(module.layers)
    return []


def shard_objective(objective: nn.Module, trained: list[nn.Module], context: Distributed) -> None:
    """Apply FSDP2 in place: each unit of the `trained` components, bottom-up, then `objective` as the root, the
    shards on `context.device` (the modules may still be on the CPU: only the shards move). Every parameter of
    `objective` that does not require grad stays whole on every rank, where it was. After this the trained parameters
    are new nn.Parameter DTensors: read them from the modules again."""
    if context.device.type == "cuda":  # FSDP2 places the shards on the current CUDA device
        torch.cuda.set_device(context.device)
    mesh = init_device_mesh(context.device.type, (context.world_size,))
    for component in trained:
        for unit in sharded_units(component):
            fully_shard(unit, mesh=mesh)
    frozen = {p for p in objective.parameters() if not p.requires_grad}
    fully_shard(objective, mesh=mesh, ignored_params=frozen or None)


def local_value(tensor: Tensor) -> Tensor:
    """A replicated DTensor's value as a plain tensor (clip_grad_norm_ over sharded gradients returns the norm as
    one); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def trained_state_bytes(params: Iterable[Tensor], ema_shadows: Iterable[Tensor]) -> int:
    """This rank's bytes of the trained state, from the sizes of its local shards (a plain tensor counts whole): the
    weights, their gradients and AdamW's two moments (torch.optim.AdamW allocates exp_avg and exp_avg_sq shaped and
    typed as each weight, and a gradient is too), and the EMA shadows. FSDP2 pads a parameter's dim 0 to a multiple
    of the processes; the padding is left out."""
    weights = sum(_local(p).numel() * p.element_size() for p in params)
    return 4 * weights + sum(_local(t).numel() * t.element_size() for t in ema_shadows)


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def gather_full(state: dict[str, Tensor], context: Distributed) -> dict[str, Tensor] | None:
    """`state` with every sharded tensor assembled, one at a time (at most one full tensor per rank beyond its
    shards), as CPU copies on rank 0; None on the other ranks. A collective: every rank calls it with the same keys
    in the same order."""
    full = {} if context.is_main else None
    for name, tensor in state.items():
        value = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if full is not None:
            full[name] = value.detach().cpu().clone()
    return full


def save_sharded(path: Path, model: StableDiffusion, optimizer: torch.optim.Optimizer, ema: EMA) -> bool:
    """Write the model's state (the trained parameters' shards and the frozen rest), AdamW's (where it has taken a
    step) and the EMA shadows' as a DCP checkpoint in folder `path`, each rank its own file. A collective. Returns
    whether AdamW's state was written: before its first step it has none, and asking DCP's get_optimizer_state_dict
    for it would create it by a zero-learning-rate step, which would shift its bias correction."""
    state = {"model": get_model_state_dict(model), "ema": ema.state_dict()}
    stepped = bool(optimizer.state)
    if stepped:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=path)
    return stepped


def load_sharded(path: Path, model: StableDiffusion, optimizer: torch.optim.Optimizer, ema: EMA,
                 with_optimizer: bool) -> None:
    """Read a `save_sharded` checkpoint into the sharded model, AdamW and the EMA shadows, in place, resharded to
    this run's processes by DCP; AdamW only `with_optimizer` (it had stepped). A collective."""
    state = {"model": get_model_state_dict(model), "ema": ema.state_dict()}
    if with_optimizer:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    if with_optimizer:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        set_model_state_dict(model, state["model"])
