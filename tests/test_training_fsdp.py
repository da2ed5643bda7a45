"""FSDP2 (TrainConfig.fsdp, kedavra.training.sharding): two CPU processes (gloo on 127.0.0.1) train both stages to
the same weights sharded as replicated under DDP, and a sharded run stopped and resumed from its sharded
checkpoints ends bitwise where an uninterrupted one does.

FSDP2 against DDP, both on 2 processes with the same global batch of 8 in 2 micro-steps, 2 steps at lr 1e-3: the
forward passes see the same full weights (all-gathered shards), and the mean of two ranks' gradients is exact in
either collective (one rounding of a + b, halved), so the runs differ only where float additions are ordered
differently: FSDP2 reduce-scatters each micro-step's gradients and adds the sharded results (DDP adds the micro-steps
locally and all-reduces once), and the gradient norm that sets the clipping factor is summed over shards instead of
whole tensors. Those last-bit differences are amplified by AdamW's division by √v̂ as tests/test_training_ddp.py
explains (an early step is ≈ lr·sign(g)). Measured here, as below, in the trained (EMA) weights: max |Δ| 1.1e-6
(9.4e-7) in the VAE, 9.0e-7 (7.4e-7) in the U-Net, 0 in the text encoder; after 3 steps 2.7e-6, 6.7e-6 and 1.1e-7,
and with one micro-step and no clipping (3 steps) the VAE bitwise equal and the U-Net within 3e-8 (a rest not traced
further). The test allows 1e-5 (1% of one step's size, lr), as the DDP test does, and 1e-5 relative for the logged
losses.

The resumed run reads its model, AdamW and EMA state back from the DCP shards and its generators and data position
from training_state.pt, on the same two processes, so it is held to bitwise equality (torch.equal).
"""

from __future__ import annotations

import dataclasses
import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_training import Squares, small_config
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from kedavra import cli
from kedavra.checkpoint import load_model, save_model
from kedavra.commands.demo import torch_threads
from kedavra.networks.model import PRESETS, StableDiffusion
from kedavra.networks.unet import UNet
from kedavra.training import TrainConfig, checkpointing, sharding, train
from kedavra.training.distributed import init_distributed

WORLD_SIZE = 2
STEPS = 2
LR = 1e-3
TOLERANCE = 1e-2 * LR  # max |Δweight| allowed between FSDP2 and DDP (module docstring)
EXPORT = checkpointing.EXPORT_FILE  # a finished run's EMA model


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(out_dir, **changes) -> TrainConfig:
    """Both stages (a VAE, then a U-Net and text encoder on it), STEPS steps each of 2 micro-steps, clipping on."""
    values = dict(stage="all", vae_steps=STEPS, steps=STEPS, lr=LR, caption_dropout=0.5, accumulation=2)
    return small_config(out_dir, **{**values, **changes})


def _resumed_config(root) -> TrainConfig:
    """The sharded run's unet stage again: the same settings as stage "all" gives it, on the VAE that run trained."""
    return small_config(root / "resumed", stage="unet", vae=str(root / "fsdp" / "vae" / EXPORT),
                        steps=STEPS, lr=LR, caption_dropout=0.5, accumulation=2, fsdp=True)


def _sdxl_config(root) -> TrainConfig:
    """A whole fine-tune of an SDXL base model (tiny-sdxl's shape), which needs FSDP2: its U-Net sharded, both text
    encoders frozen (as SD fine-tunes keep them), so whole on each rank inside the sharded objective."""
    return small_config(root / "sdxl", stage="unet", init=str(root / "sdxl-base.safetensors"), steps=1, fsdp=True,
                        train_text_encoder=False)


def _check_shards_and_gather(unet_config) -> None:
    """On every rank: a sharded U-Net holds about 1/2 of the trained state per rank, and gathering gives back the
    original weights bitwise on rank 0."""
    context = init_distributed("cpu")
    torch.manual_seed(0)
    unet = UNet(unet_config)
    original = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    whole = sharding.trained_state_bytes(unet.parameters(), [])
    sharding.shard_objective(unet, [unet], context)
    local = sharding.trained_state_bytes(unet.parameters(), [])
    assert abs(local - whole / WORLD_SIZE) < 0.01 * whole, (local, whole)
    assert context.sum(torch.tensor([float(local)]))[0] == whole
    gathered = sharding.gather_full(unet.state_dict(), context)
    if context.is_main:
        assert gathered.keys() == original.keys()
        assert all(torch.equal(gathered[name], original[name]) for name in original)
    else:
        assert gathered is None


def _worker(rank: int, port: int, root) -> None:
    """One rank in a process group made here (train uses it as it is): DDP, FSDP2, FSDP2 stopped and resumed, and the
    SDXL fine-tune."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        _check_shards_and_gather(PRESETS["tiny"].unet)
        train(_config(root / "ddp"), dataset=Squares(), device="cpu")
        train(_config(root / "fsdp", fsdp=True), dataset=Squares(), device="cpu")
        train(_resumed_config(root), dataset=Squares(), device="cpu", stop_after=1)
        train(_resumed_config(root), dataset=Squares(), device="cpu")
        train(_sdxl_config(root), dataset=Squares(), device="cpu")
    finally:
        dist.destroy_process_group()


def _full_shards(checkpoint, into) -> dict:
    """A sharded checkpoint's DCP state assembled in one process ({"model": ..., "ema": ..., "optimizer": ...})."""
    dcp_to_torch_save(checkpoint / checkpointing.SHARDS_DIR, into)
    return torch.load(into, weights_only=False)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_fsdp_matches_ddp_and_resumes_from_its_shards(tmp_path):
    """Also: a whole SDXL fine-tune under FSDP2, its text encoders frozen, exports an SDXL model that `kedavra
    generate --model` reads."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_model(StableDiffusion(PRESETS["tiny-sdxl"]), tmp_path / "sdxl-base.safetensors")
    mp.spawn(_worker, args=(_free_port(), tmp_path), nprocs=WORLD_SIZE, join=True)
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    for stage in ("vae", "unet"):
        # the exported EMA model: a full kedavra file, as `kedavra generate --model` reads it
        assert load_model(fsdp / stage / EXPORT).config == load_model(ddp / stage / EXPORT).config
        exported = _max_difference(load_file(ddp / stage / EXPORT), load_file(fsdp / stage / EXPORT))
        assert exported < TOLERANCE, (stage, exported)
        latest = checkpointing.find_checkpoint(fsdp / stage)
        assert sorted(p.name for p in latest.iterdir()) == ["shards", "train_config.json", "training_state.pt"]
        shards = _full_shards(latest, tmp_path / f"{stage}.pt")
        trained = _max_difference(load_file(ddp / stage / "latest" / checkpointing.MODEL_FILE), shards["model"])
        ema = _max_difference(load_file(ddp / stage / "latest" / checkpointing.EMA_FILE),
                              {**shards["model"], **shards["ema"]})
        assert trained < TOLERANCE and ema < TOLERANCE, (stage, trained, ema)
        losses = [[json.loads(line)["loss"] for line in (side / stage / "metrics.jsonl").read_text().splitlines()]
                  for side in (ddp, fsdp)]
        assert len(losses[0]) == STEPS
        torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=0)
    # stopped at step 1 and resumed: bitwise the uninterrupted run, weights, AdamW and EMA
    resumed = tmp_path / "resumed"
    steps = sorted(p.name for p in (resumed / checkpointing.CHECKPOINTS_DIR).iterdir())
    assert steps == [checkpointing.step_dir_name(1), checkpointing.step_dir_name(2)]
    a, b = load_file(fsdp / "unet" / EXPORT), load_file(resumed / EXPORT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole = _full_shards(checkpointing.find_checkpoint(fsdp / "unet"), tmp_path / "whole.pt")
    again = _full_shards(checkpointing.find_checkpoint(resumed), tmp_path / "again.pt")
    for part in ("model", "ema"):
        assert whole[part].keys() == again[part].keys()
        assert all(torch.equal(whole[part][k], again[part][k]) for k in whole[part]), part
    for name, state in whole["optimizer"]["state"].items():
        assert all(torch.equal(value, again["optimizer"]["state"][name][key]) for key, value in state.items()), name
    # the SDXL fine-tune: the U-Net moved, the frozen text encoders did not; exported as an SDXL model
    base, tuned = load_model(tmp_path / "sdxl-base.safetensors"), load_model(tmp_path / "sdxl" / EXPORT)
    assert tuned.config == base.config
    for part, trained in (("unet", True), ("text_encoder", False), ("text_encoder_2", False)):
        before, after = getattr(base, part).state_dict(), getattr(tuned, part).state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before) == trained, part
    # a damaged shard file: resuming falls back to the newest intact checkpoint, as for full checkpoints
    shard = next((resumed / "latest" / checkpointing.SHARDS_DIR).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    notes = []
    fallback = checkpointing.load_intact_checkpoint(checkpointing.find_checkpoint(resumed), notify=notes.append)
    assert fallback.sharded and fallback.path.name == checkpointing.step_dir_name(1)
    assert "truncated" in notes[0] and "resuming from the newest intact checkpoint" in notes[0]
    # resuming a sharded run without --fsdp: refused, naming the field
    with torch_threads(1), pytest.raises(ValueError, match="fsdp: checkpoint True, now False"):
        train(dataclasses.replace(_resumed_config(tmp_path), fsdp=False, steps=3), dataset=Squares(), device="cpu")


def test_fsdp_refusals(tmp_path, capsys):
    """FSDP2 on one process (`kedavra train --fsdp` without torchrun), or with a LoRA: each refused, naming why; a
    non-boolean setting too."""
    assert cli.main(["train", "--fsdp", "--device", "cpu", "--no-progress", "-o", str(tmp_path / "cli")]) == 2
    assert "launch with torchrun --nproc-per-node N" in capsys.readouterr().err
    with torch_threads(1):
        with pytest.raises(ValueError, match="launch with torchrun --nproc-per-node N"):
            train(small_config(tmp_path / "one", fsdp=True), dataset=Squares(), device="cpu")
    with pytest.raises(ValueError, match="leave --fsdp out"):
        TrainConfig(init="kedavra-shapes", lora_rank=4, fsdp=True)
    with pytest.raises(ValueError, match="fsdp must be True or False"):
        small_config(tmp_path, fsdp="yes")
