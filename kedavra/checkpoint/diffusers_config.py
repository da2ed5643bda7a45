"""A diffusers folder's model, as its own configuration files describe it.

    unet/config.json          -> UNetConfig.from_diffusers         (kedavra.networks.unet)
    text_encoder/config.json  -> TextEncoderConfig.from_diffusers  (kedavra.networks.text_encoder)
    vae/config.json           -> VAEConfig.from_diffusers          (kedavra.networks.vae)
    tokenizer/                -> the pad token (SD 1.x pads with the end token, SD 2.x with "!", id 0)
    scheduler/                -> the schedule, ε or v, the spacing (read by sources._diffusers_hints)

Nothing is guessed from the weights: a folder is loaded with the sizes its files give, within SD's block vocabulary,
and a field outside it is refused by name. Where the described architecture is one of kedavra's presets, the model
takes that preset's name (and its tokenizer); otherwise it is named after the folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kedavra.checkpoint.errors import _fail
from kedavra.checkpoint.weights import _read_json
from kedavra.diffusion.schedule import get_schedule
from kedavra.networks.model import PRESETS, ModelConfig
from kedavra.networks.text_encoder import TextEncoderConfig
from kedavra.networks.tokenizer import TokenizerConfig
from kedavra.networks.unet import UNetConfig
from kedavra.networks.vae import VAEConfig

CONFIG_FILES = {"unet": "unet/config.json", "text_encoder": "text_encoder/config.json", "vae": "vae/config.json"}
TOKENIZER_FILES = ("tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json")
ZERO_PAD_TOKEN = "!"  # SD 2.x's tokenizer pads with "!", the byte-level BPE's id 0
DEFAULT_SCHEDULE = "sd"  # scaled_linear 0.00085..0.012: what an SD folder without scheduler/ was trained with


def has_configs(path: Path) -> bool:
    """Whether the folder carries every component config this module reads."""
    return all((path / name).is_file() for name in CONFIG_FILES.values())


def described_config(path: Path) -> ModelConfig:
    """The ModelConfig that `path`'s unet/, text_encoder/ and vae/ config.json describe, with SD's schedule and
    ε-prediction until the scheduler's settings are applied (sources._diffusers_hints reads them)."""
    readers = {"unet": UNetConfig.from_diffusers, "text_encoder": TextEncoderConfig.from_diffusers,
               "vae": VAEConfig.from_diffusers}
    parts = {}
    for name, file in CONFIG_FILES.items():
        try:
            parts[name] = readers[name](_read_json(path / file))
        except ValueError as error:
            raise _fail(path / file, f"{error}; kedavra runs SD's architecture family only") from None
    preset = next((p for p in PRESETS.values() if same_architecture(p.unet, parts["unet"])
                   and (p.text_encoder, p.vae) == (parts["text_encoder"], parts["vae"])), None)
    if preset is not None:  # the preset's own spelling of the same network, so the config equals the preset's
        parts["unet"] = preset.unet
    tokenizer = preset.tokenizer if preset is not None else _tokenizer(path, parts["text_encoder"])
    unet_json = _read_json(path / CONFIG_FILES["unet"])
    sample_size = unet_json.get("sample_size")
    factor = parts["vae"].downsample_factor
    image_size = sample_size * factor if isinstance(sample_size, int) and sample_size > 0 else None
    try:
        config = ModelConfig(
            family=preset.family if preset is not None else path.name or "diffusers",
            tokenizer=tokenizer, text_encoder=parts["text_encoder"], unet=parts["unet"], vae=parts["vae"],
            schedule=get_schedule(DEFAULT_SCHEDULE), prediction_type="eps",
            image_size=image_size or (preset.image_size if preset is not None else 512),
        )
    except ValueError as error:
        raise _fail(path, f"its component configs do not fit together: {error}") from None
    return dataclasses.replace(config, image_size=image_size) if image_size is not None else config


def same_architecture(a: UNetConfig, b: UNetConfig) -> bool:
    """Whether two U-Net configs build the same network: equal, or equal but for how the heads are given (a head
    count or a head width) with the same (heads, head width) at every level that attends."""
    if a == b:
        return True
    if dataclasses.replace(a, num_heads=b.num_heads, head_dim=b.head_dim) != b:
        return False
    return all(a.level_heads(level) == b.level_heads(level) for level in a.attention_levels)


def _tokenizer(path: Path, text: TextEncoderConfig) -> TokenizerConfig:
    """CLIP's tokenizer as the folder's tokenizer files describe it: transformers' CLIPTokenizer (which diffusers
    runs for every SD) with the pad token they name. Without them, as SD 1.x (OpenAI CLIP text encoders) or SD 2.x
    (OpenCLIP) ran it."""
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            pad = _read_json(path / name).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if isinstance(pad, str):
                pad_with = "zero" if pad == ZERO_PAD_TOKEN else "eos"
                return dataclasses.replace(TokenizerConfig.from_preset("sd15"), pad_with=pad_with)
    return TokenizerConfig.from_preset("sd15" if text.activation == "quick_gelu" else "sd21")
