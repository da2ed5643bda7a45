"""Detection: the family from the U-Net's shapes and the text encoders' layouts, the settings from the source's
hints, and the ε/v probe for families that share one architecture. SDXL is told by the U-Net's added embedding
(label_emb) and a second text encoder; the refiner by its bigG-only context and 384 base channels."""

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kedavra.checkpoint.errors import CheckpointError, _fail
from kedavra.checkpoint.sources import _Hints, _Source
from kedavra.diffusion.schedule import NoiseSchedule
from kedavra.networks.model import PRESETS, ModelConfig, StableDiffusion
from kedavra.validation import some


def _text_style(config: ModelConfig) -> str:
    return "clip" if config.text_encoder.activation == "quick_gelu" else "openclip"


def _architecture(config: ModelConfig) -> tuple:
    return config.tokenizer, config.text_encoder, config.tokenizer_2, config.text_encoder_2, config.unet, config.vae


def _unet_facts(source: _Source) -> tuple[int, int, int, bool, int | None]:
    """(cross-attention width, input channels, base channels, Linear transformer projections, input features of
    SDXL's added embedding or None) read off the U-Net's shapes."""
    layout, state = source.parts["unet"]
    conv_in = state.get("conv_in.weight" if layout == "diffusers" else "input_blocks.0.0.weight")
    added = state.get("add_embedding.linear_1.weight" if layout == "diffusers" else "label_emb.0.0.weight")
    to_k = next((t for k, t in sorted(state.items()) if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((t for k, t in sorted(state.items()) if k.endswith(".proj_in.weight")), None)
    if conv_in is None or to_k is None or proj_in is None or conv_in.ndim != 4 or to_k.ndim != 2:
        raise _fail(
            source.path,
            "unknown architecture: the U-Net has no first conv / cross-attention "
            f"(attn2.to_k) / transformer proj_in weights; found {some(sorted(state), 4)}",
        )
    added_dim = added.shape[1] if added is not None and added.ndim == 2 else None
    return to_k.shape[1], conv_in.shape[1], conv_in.shape[0], proj_in.ndim == 2, added_dim


def _candidates(source: _Source) -> tuple[list[str], str]:
    """Presets whose architecture matches the weights, and the facts they were matched on."""
    context, channels, base, linear, added = _unet_facts(source)
    style = source.hints.text_style
    second = "text_encoder_2" in source.parts
    facts = (
        f"U-Net cross-attention width {context}, {channels} input channels, {base} base channels, "
        f"{'Linear' if linear else '1x1-conv'} transformer projections, "
        + (f"an added embedding of {added} features, " if added is not None else "")
        + f"{ {'clip': 'OpenAI CLIP', 'openclip': 'OpenCLIP', None: 'unknown'}[style] } text encoder"
        + (" and a second (OpenCLIP) one" if second else "")
    )
    names = [
        name
        for name, preset in PRESETS.items()
        if preset.unet.context_dim == context
        and preset.unet.in_channels == channels
        and preset.unet.base_channels == base
        and preset.unet.use_linear_projection == linear
        and preset.unet.addition_embed_input_dim == added
        and (preset.text_encoder_2 is not None) == second
        and (style is None or _text_style(preset) == style)
    ]
    if not names:
        known = "; ".join(
            f"{n}: width {p.unet.context_dim}, {p.unet.in_channels} channels, {p.unet.base_channels} base channels, "
            + (f"added embedding {p.unet.addition_embed_input_dim}, " if p.unet.addition_embed_input_dim else "")
            + _text_style(p) + (" + a second text encoder" if p.text_encoder_2 is not None else "")
            for n, p in PRESETS.items()
        )
        raise _fail(
            source.path,
            f"unknown architecture ({facts}); kedavra knows {known}. Pass family=... if the file is one of these",
        )
    if len({_architecture(PRESETS[n]) for n in names}) > 1:
        raise _fail(source.path, f"cannot tell {', '.join(names)} apart from the weights ({facts}); pass family=...")
    return names, facts


def _schedule_from_betas(betas: Tensor, family: ModelConfig) -> tuple[NoiseSchedule, str]:
    """The schedule whose β match the file's `betas` buffer (to fp16 precision), else the family's."""
    betas = betas.double()
    start, end, steps = float(betas[0]), float(betas[-1]), betas.numel()
    options = [family.schedule, dataclasses.replace(family.schedule, zero_terminal_snr=True)]
    if steps >= 2 and 0 < start <= end < 1:
        options += [NoiseSchedule("scaled_linear", steps, start, end), NoiseSchedule("linear", steps, start, end)]
    for option in options:
        if option.num_train_timesteps == steps and torch.allclose(option.betas, betas, rtol=2e-3, atol=1e-6):
            same = option == family.schedule
            return option, "the family's; the file's betas agree" if same else "read from the file's betas"
    return family.schedule, "the family's; the file's betas buffer matches no known schedule and was ignored"


@dataclass
class _Decision:
    config: ModelConfig
    family_how: str  # why this family
    prediction_why: str  # why this prediction type
    details: list[str]  # settings taken from the checkpoint's own files
    probe_between: list[str]  # families that differ only in prediction type, to be told apart by a probe

    def report(self) -> list[str]:
        return [
            f"family: {self.config.family} ({self.family_how})",
            f"prediction type: {self.config.prediction_type} ({self.prediction_why})",
            *self.details,
        ]


def _decide(source: _Source, family: str | None, prediction_type: str | None) -> _Decision:
    hints = source.hints
    if family is not None:
        names, how = [family], "given by the family argument"
    elif hints.config is not None:
        names, how = [], "stored in the kedavra checkpoint"
    elif hints.described is not None:
        names, how = [], f"described by the folder's {hints.described_from}"
    else:
        names, facts = _candidates(source)
        how = f"detected: {facts}"
    probe_between: list[str] = []
    if prediction_type is not None:
        chosen, why = prediction_type, "given by the prediction_type argument"
    elif hints.prediction_type is not None:
        chosen, why = hints.prediction_type
    elif len({PRESETS[n].prediction_type for n in names}) > 1:
        chosen, why, probe_between = PRESETS[names[0]].prediction_type, "to be probed", names
    elif names:
        chosen, why = PRESETS[names[0]].prediction_type, "the family's default"
    elif hints.config is not None:
        chosen, why = hints.config.prediction_type, "stored in the kedavra checkpoint"
    else:
        chosen, why = "eps", "no scheduler/scheduler_config.json: diffusers' default, epsilon"
    if names:
        config = PRESETS[next((n for n in names if PRESETS[n].prediction_type == chosen), names[0])]
    else:
        config = hints.config or hints.described
    details: list[str] = []
    config = dataclasses.replace(config, prediction_type=chosen)
    if hints.config is None:
        config = _apply_hints(source.path, config, hints, details)
    return _Decision(config, how, why, details, probe_between)


def _apply_hints(path: Path, config: ModelConfig, hints: _Hints, details: list[str]) -> ModelConfig:
    """The family's config with what the checkpoint says about itself: schedule, sampling, size, latent scale."""
    changes: dict[str, object] = {}
    schedule = None
    if hints.schedule is not None:
        schedule, why = hints.schedule
    elif hints.betas is not None:
        schedule, why = _schedule_from_betas(hints.betas, config)
    if hints.zero_terminal_snr is not None and (schedule or config.schedule).zero_terminal_snr is False:
        schedule = dataclasses.replace(schedule or config.schedule, zero_terminal_snr=True)
        why = f"rescaled to zero terminal SNR: {hints.zero_terminal_snr}"
    if schedule is not None:
        changes["schedule"] = schedule
        zero_snr = ", zero terminal SNR" if schedule.zero_terminal_snr else ""
        details.append(
            f"schedule: {schedule.kind} {schedule.beta_start:g}..{schedule.beta_end:g} over "
            f"{schedule.num_train_timesteps} steps{zero_snr} ({why})"
        )
    if hints.spacing is not None:
        changes["spacing"], changes["steps_offset"], where = hints.spacing
        details.append(f"sampling: {changes['spacing']} spacing, steps_offset {changes['steps_offset']} ({where})")
    if hints.scheduler is not None:  # the folder's scheduler: its sampler, and diffusers' timestep rules
        defaults, where = hints.scheduler
        changes["sampler"], changes["set_alpha_to_one"] = defaults.sampler, defaults.set_alpha_to_one
        changes["timestep_rules"] = "diffusers"
        runs = f"sampler {defaults.sampler}" if defaults.sampler else "kedavra's default sampler"
        ignored = f"; not carried out: {'; '.join(defaults.notes)}" if defaults.notes else ""
        details.append(f"scheduler: {defaults.scheduler_class} -> {runs}, diffusers' timestep rules ({where}){ignored}")
    if hints.image_size is not None:
        changes["image_size"], where = hints.image_size
        details.append(f"image size: {changes['image_size']} px ({where})")
    if hints.scaling_factor is not None and hints.scaling_factor[0] != config.vae.scaling_factor:
        changes["vae"] = dataclasses.replace(config.vae, scaling_factor=hints.scaling_factor[0])
        details.append(f"VAE latent scale: {hints.scaling_factor[0]} ({hints.scaling_factor[1]})")
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as error:
        raise _fail(path, f"the checkpoint's own settings are not usable: {error}") from None


# ---- ε or v ---------------------------------------------------------------------------------------------------

PROBE_SIZE = 8  # latent side of the probe input; AUTOMATIC1111's SD 2.x check also runs an 8 x 8 latent
PROBE_THRESHOLD = 0.5  # midway between the slopes of an ε-predictor (≈ 1) and a v-predictor (≈ 0)


def probe_prediction_type(
    model: Callable[[Tensor, Tensor], Tensor],
    channels: int,
    schedule: NoiseSchedule,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[str, float]:
    """Tell an ε-predicting U-Net from a v-predicting one by running it once; returns (type, slope).

    At the noisiest step t = T-1 (SD: ᾱ ≈ 0.0047) the input x_t = √ᾱ x0 + √(1-ᾱ) ε is almost pure noise, so we
    feed pure noise x and regress the output on it: slope = <out, x> / <x, x>. For data with per-dimension
    variance s² (SD latents: s ≈ 1 after the VAE scale), the optimal x̂0 = √ᾱ s² x / (ᾱ s² + 1 - ᾱ) = √ᾱ k x,
    so an ε-predictor ε̂ = (x - √ᾱ x̂0)/√(1-ᾱ) (DDPM eq. 4 solved for ε) has slope (1 - ᾱ k)/√(1-ᾱ) ≈ 1, and a
    v-predictor v̂ = √ᾱ ε̂ - √(1-ᾱ) x̂0 (Salimans & Ho 2022, eq. 7) has slope √ᾱ (1 - k)/√(1-ᾱ): exactly 0 at
    s = 1, under 0.07 in size for any s² <= 2. AUTOMATIC1111's check feeds a constant 0.5 and thresholds the
    mean of output - input at -1, a rule found by trying checkpoints; this one follows from the targets.

    `model(x_t, t)` is any callable: x_t (1, channels, PROBE_SIZE, PROBE_SIZE), t (1,) float timesteps.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, PROBE_SIZE, PROBE_SIZE, generator=generator, dtype=torch.float64)
    t = torch.full((1,), float(schedule.num_train_timesteps - 1), device=device)
    with torch.no_grad():
        out = model(x.to(device=device, dtype=dtype), t).double().cpu()
    slope = float((out * x).sum() / (x * x).sum())
    if not math.isfinite(slope):
        raise ValueError(f"the U-Net's output on the probe input is not finite (slope {slope})")
    return ("eps" if slope > PROBE_THRESHOLD else "v"), slope


def _probe(path: Path, model: StableDiffusion, decision: _Decision, image_size_given: bool) -> None:
    """Run `probe_prediction_type` on the loaded U-Net and settle the family among `decision.probe_between`."""
    with torch.no_grad():
        ids = model.tokenizer("").to(next(model.text_encoder.parameters()).device)
        context = model.text_encoder(ids)  # (1, L, D): the empty prompt, as unconditional sampling sees it
    param = next(model.unet.parameters())
    config = model.config
    try:
        chosen, slope = probe_prediction_type(
            lambda x, t: model.unet(x, t, context),
            config.unet.in_channels,
            config.schedule,
            device=param.device,
            dtype=param.dtype,
        )
    except ValueError as error:
        raise CheckpointError(f"{path}: cannot tell ε from v ({error}); pass prediction_type=") from None
    family = PRESETS[next(n for n in decision.probe_between if PRESETS[n].prediction_type == chosen)]
    changes = {"family": family.family, "prediction_type": chosen}
    if not image_size_given:
        changes["image_size"] = family.image_size
    model.config = decision.config = dataclasses.replace(config, **changes)
    decision.prediction_why = (
        f"probed: the U-Net's output regressed on a pure-noise input at t={config.schedule.num_train_timesteps - 1}"
        f" has slope {slope:.3f}; ε-models give ≈1, v-models ≈0; pass prediction_type= to override"
    )
