"""Checkpoint key conversion for the VAE: the original (LDM) and diffusers layouts to kedavra's names."""

import re
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from kedavra.networks.vae import AutoencoderKL, VAEConfig
from kedavra.validation import check_choice, some

# ---------------------------------------------------------------------------------------------------
# Checkpoint key conversion

VAE_LAYOUTS = ("diffusers", "ldm")
# Training-only state in CompVis autoencoder checkpoints (ldm/models/autoencoder.py): the
# LPIPS + discriminator loss module and the EMA copy. Not part of the model; dropped on load.
LDM_TRAINING_ONLY_PREFIXES = ("loss.", "model_ema.")

# Attention sub-module names -> kedavra's. diffusers: group_norm, to_q/k/v, to_out.0; diffusers before
# 0.14 (still in many saved folders): query/key/value/proj_attn; ldm (1x1 convs): norm, q/k/v, proj_out.
_ATTENTION_NAMES = {
    **{"group_norm": "norm", "to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"},
    **{"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out"},
    **{"norm": "norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out"},
}
_Rename = tuple[str, str | Callable[[re.Match], str]]


def _attention_rename(source_block: str) -> _Rename:
    names = "|".join(re.escape(name) for name in _ATTENTION_NAMES)
    return (
        rf"\.mid{source_block}\.({names})\.",
        lambda m: f".mid_block.attention.{_ATTENTION_NAMES[m[1]]}.",
    )


def _renames(layout: str, config: VAEConfig) -> list[_Rename]:
    """Regex substitutions, applied in order, that turn a `layout` key into kedavra's name."""
    check_choice("VAE checkpoint layout", layout, VAE_LAYOUTS)
    if layout == "diffusers":
        return [
            (r"\.(downsamplers|upsamplers)\.0\.", ".resample."),
            (r"\.conv_norm_out\.", ".norm_out."),
            _attention_rename(r"_block\.attentions\.0"),
        ]
    last = config.num_levels - 1  # the ldm layout
    return [
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.resample."),
        # ldm numbers decoder levels by resolution (up.0 is full size and runs last); kedavra and
        # diffusers number them in execution order, so ldm up.i is up_blocks.(levels - 1 - i).
        (r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{last - int(m[1])}.resnets."),
        (r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{last - int(m[1])}.resample."),
        (r"\.mid\.block_([12])\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}."),
        _attention_rename(r"\.attn_1"),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
    ]


def convert_vae_state_dict(state: Mapping[str, Tensor], layout: str, config: VAEConfig) -> dict[str, Tensor]:
    """Rename a VAE state dict (component prefix already stripped) from `layout` to kedavra's names.

    layout: "diffusers" (AutoencoderKL, including the pre-0.14 attention names query/key/value/
    proj_attn) or "ldm" (CompVis `first_stage_model.*` with the prefix removed). Tensors are passed
    through, or viewed: ldm's 1x1-conv attention weights (C, C, 1, 1) become Linear weights (C, C).
    Raises ValueError listing missing, unexpected, duplicated or mis-shaped keys.
    """
    renames = [(re.compile(pattern), replacement) for pattern, replacement in _renames(layout, config)]
    with torch.device("meta"):
        expected = {name: t.shape for name, t in AutoencoderKL(config).state_dict().items()}
    converted: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    unexpected, duplicated, misshaped = [], [], []
    for key, tensor in state.items():
        if layout == "ldm" and key.startswith(LDM_TRAINING_ONLY_PREFIXES):
            continue
        target = key
        for pattern, replacement in renames:
            target = pattern.sub(replacement, target)
        if target not in expected:
            unexpected.append(key)
            continue
        if target in converted:
            duplicated.append(f"{sources[target]} and {key} -> {target}")
            continue
        want = expected[target]
        if len(want) == 2 and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
            tensor = tensor.reshape(want)  # 1x1 conv (C_out, C_in, 1, 1) as Linear (C_out, C_in): a view
        if tensor.shape != want:
            misshaped.append(f"{key}: {tuple(tensor.shape)} (expected {tuple(want)} for {target})")
            continue
        converted[target] = tensor
        sources[target] = key
    missing = sorted(set(expected) - set(converted))
    if missing or unexpected or duplicated or misshaped:
        problems = [
            f"{label}: {len(items)} ({some(items)})"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("duplicated", duplicated),
                ("wrong shape", misshaped),
            )
            if items
        ]
        raise ValueError(f"VAE state dict ({layout} layout) does not match the config: " + "; ".join(problems))
    return converted
