"""Training kedavra's models from scratch: the VAE, then the U-Net with its text encoder (latent diffusion's two
stages), on a CPU or GPUs, resumable bitwise, under torchrun for several processes (DDP, or FSDP2 with `fsdp`); or
fine-tuning any loaded model (`TrainConfig.init`: an embedded name, a kedavra file, an SD 1.x / 2.x checkpoint or
diffusers folder), whole (SDXL base models with `fsdp`) or through a LoRA (`TrainConfig.lora_rank`; SDXL base models
too), written as a kohya-format file.

    from kedavra.training import TrainConfig, train
    train(TrainConfig(data="shapes", preset="tiny", stage="vae", steps=3000, out_dir="runs/vae"))
    train(TrainConfig(data="shapes", stage="unet", vae="runs/vae/model.safetensors", out_dir="runs/unet"))

or `kedavra train --help` (docs/training.md). Modules, one concept each:
  config         TrainConfig: every choice of a run, validated; stage defaults; what may change on resume
  batches        the data set checked at the door, the epoch order, the global batch; token-id cache
  models         the model a run starts from: a preset's from the run's seed, or a loaded one to fine-tune
  stages         the stages as objects: what each trains and freezes, what a batch becomes, its objective
  losses         the objectives, per-sample: the VAE's (L1/MSE + β·KL) and the diffusion one (ε / v, min-SNR-γ)
  conditioning   the U-Net with its text encoder as one trained module; a frozen encoder's outputs cached
  precision      bf16 autocast around the forward pass, fp32 weights
  optim          AdamW and the warm-up / cosine learning-rate schedule
  ema            the exponential moving average of the weights, with LDM's warm-up
  lora           a LoRA run: its layers injected (kedavra.adapters.lora_training), its files' kohya metadata, the
                 fingerprint that ties a checkpoint to its base model
  checkpointing  atomic checkpoints, the `latest` link, resume checks
  distributed    torchrun / torch.distributed setup and the collectives the loop uses
  sharding       FSDP2 (`TrainConfig.fsdp`): the trained network sharded over the processes, its sharded (DCP)
                 checkpoints, the full weights gathered on rank 0
  report         metrics.jsonl, the loss plot, sample grids
  loop           the Trainer, which drives any stage, and `train`
The `kedavra train` command is kedavra.commands.train.
"""

from kedavra.training.config import STAGE_DEFAULTS, STAGES, TrainConfig
from kedavra.training.loop import NonFiniteLossError, Trainer, TrainResult, train

__all__ = ["STAGES", "STAGE_DEFAULTS", "NonFiniteLossError", "TrainConfig", "TrainResult", "Trainer", "train"]
