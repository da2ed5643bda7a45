"""Checkpoint key conversion for the U-Net: the original (LDM) and diffusers layouts to kedavra's names.

The index mapping is derived from the UNetConfig (levels, res blocks per level, which levels have attention, whether
there is a mid block, SDXL's added embedding), so it serves every config: SD 1.x / 2.x, SDXL base and refiner (whose
original files number input_blocks 0..8 and 0..12), block-removed models without a mid block, the tiny presets.
"""

from collections.abc import Mapping

import torch
from torch import Tensor

from kedavra.networks.unet import UNet
from kedavra.networks.unet_config import UNetConfig
from kedavra.validation import check_choice, check_keys, some

LAYOUTS = ("diffusers", "ldm")

# ---- checkpoint key conversion ------------------------------------------------------------------

# Leaf names inside a ResBlock, per layout, where they differ from ours.
_RESNET_LEAVES = {
    "diffusers": {"shortcut": "conv_shortcut"},
    "ldm": {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "shortcut": "skip_connection",
    },
}
# Dotted fragments inside a SpatialTransformer that differ from ours (the same in both layouts).
_TRANSFORMER_FRAGMENTS = (
    (".to_out.", ".to_out.0."),
    (".ff.geglu.proj.", ".ff.net.0.proj."),
    (".ff.proj_out.", ".ff.net.2."),
)


def _module_table(config: UNetConfig) -> dict[str, tuple[str, str, str]]:
    """Our module prefix -> (kind, diffusers prefix, ldm prefix); kind is plain, resnet or transformer.

    LDM numbering: input_blocks.N counts conv_in, every (ResBlock[, transformer]) and every
    downsampler in order; output_blocks.N counts every (ResBlock[, transformer][, upsampler]).
    SDXL's added embedding is label_emb.0 = Sequential(Linear, SiLU, Linear) in sgm's openaimodel.py.
    """
    levels = config.num_levels
    table = {
        "time_embedding.linear_1": ("plain", "time_embedding.linear_1", "time_embed.0"),
        "time_embedding.linear_2": ("plain", "time_embedding.linear_2", "time_embed.2"),
        "conv_in": ("plain", "conv_in", "input_blocks.0.0"),
        "norm_out": ("plain", "conv_norm_out", "out.0"),
        "conv_out": ("plain", "conv_out", "out.2"),
    }
    if config.has_added_embedding:
        table["add_embedding.linear_1"] = ("plain", "add_embedding.linear_1", "label_emb.0.0")
        table["add_embedding.linear_2"] = ("plain", "add_embedding.linear_2", "label_emb.0.2")
    if config.mid_block:
        table["mid_block.resnets.0"] = ("resnet", "mid_block.resnets.0", "middle_block.0")
        table["mid_block.attentions.0"] = ("transformer", "mid_block.attentions.0", "middle_block.1")
        table["mid_block.resnets.1"] = ("resnet", "mid_block.resnets.1", "middle_block.2")
    block = 1
    for i, attend in enumerate(config.attention_per_level):
        n_res = config.level_res_blocks[i]
        for j in range(n_res):
            ours = f"down_blocks.{i}.resnets.{j}"
            table[ours] = ("resnet", ours, f"input_blocks.{block}.0")
            if attend:
                ours = f"down_blocks.{i}.attentions.{j}"
                table[ours] = ("transformer", ours, f"input_blocks.{block}.1")
            block += 1
        if i < levels - 1:
            table[f"down_blocks.{i}.resample.conv"] = (
                "plain",
                f"down_blocks.{i}.downsamplers.0.conv",
                f"input_blocks.{block}.0.op",
            )
            block += 1
    block = 0
    for u in range(levels):
        attend = config.attention_per_level[levels - 1 - u]
        n_res = config.level_res_blocks[levels - 1 - u]
        for j in range(n_res + 1):
            ours = f"up_blocks.{u}.resnets.{j}"
            table[ours] = ("resnet", ours, f"output_blocks.{block}.0")
            position = 1
            if attend:
                ours = f"up_blocks.{u}.attentions.{j}"
                table[ours] = ("transformer", ours, f"output_blocks.{block}.1")
                position = 2
            if j == n_res and u < levels - 1:
                table[f"up_blocks.{u}.resample.conv"] = (
                    "plain",
                    f"up_blocks.{u}.upsamplers.0.conv",
                    f"output_blocks.{block}.{position}.conv",
                )
            block += 1
    return table


def _source_key(key: str, layout: str, table: Mapping[str, tuple[str, str, str]]) -> str:
    """The name that our parameter `key` has in `layout`."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            kind, diffusers_prefix, ldm_prefix = table[prefix]
            leaf = ".".join(parts[cut:])
            if kind == "resnet":
                head, _, tail = leaf.partition(".")
                leaf = f"{_RESNET_LEAVES[layout].get(head, head)}.{tail}"
            elif kind == "transformer":
                leaf = "." + leaf
                for ours, theirs in _TRANSFORMER_FRAGMENTS:
                    leaf = leaf.replace(ours, theirs)
                leaf = leaf[1:]
            return f"{diffusers_prefix if layout == 'diffusers' else ldm_prefix}.{leaf}"
    raise KeyError(f"no checkpoint name known for U-Net parameter {key!r}")


def convert_unet_state_dict(state: Mapping[str, Tensor], layout: str, config: UNetConfig) -> dict[str, Tensor]:
    """Rename a U-Net state dict in `layout` ("diffusers" or "ldm", component prefix already stripped)
    to this module's names, for `UNet(config).load_state_dict(..., strict=True)`.

    Tensors are passed through (or reshaped as views: transformer proj_in/proj_out weights move
    between the (C, C, 1, 1) conv form and the (C, C) Linear form the config asks for).
    """
    check_choice("U-Net checkpoint layout", layout, LAYOUTS)
    with torch.device("meta"):
        expected = UNet(config).state_dict()
    table = _module_table(config)
    sources = {key: _source_key(key, layout, table) for key in expected}
    missing = sorted(src for src in sources.values() if src not in state)
    unexpected = sorted(set(state) - set(sources.values()))
    check_keys(f"U-Net state dict does not match layout {layout!r} for this config", missing, unexpected,
               prefix="model.diffusion_model.", hint="strip the 'model.diffusion_model.' prefix before converting")
    converted, mismatched = {}, []
    for key, src in sources.items():
        tensor, shape = state[src], expected[key].shape
        is_projection = key.endswith((".proj_in.weight", ".proj_out.weight")) and ".ff." not in key
        if is_projection and tensor.shape != shape and tensor.numel() == shape.numel():
            tensor = tensor.reshape(shape)  # (C, C) <-> (C, C, 1, 1)
        if tensor.shape != shape:
            mismatched.append(f"{src}: {tuple(tensor.shape)}, expected {tuple(shape)}")
        converted[key] = tensor
    if mismatched:
        raise ValueError(f"U-Net state dict has {len(mismatched)} tensors of the wrong shape: {some(mismatched)}")
    return converted


def layer_names(config: UNetConfig, layout: str) -> dict[str, str]:
    """Our name of every Linear and Conv2d layer -> its name in `layout` ("diffusers" or "ldm"); what adapters
    (LoRA files) name the layers they change."""
    check_choice("U-Net checkpoint layout", layout, LAYOUTS)
    with torch.device("meta"):
        unet = UNet(config)
    table = _module_table(config)
    return {name: _source_key(f"{name}.weight", layout, table).removesuffix(".weight")
            for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)}
