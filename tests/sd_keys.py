"""The original single-file layout of a Stable Diffusion checkpoint, built from kedavra's parameter names.

The inverse of what kedavra.checkpoint reads, written independently from the CompVis / Stability sources
(ldm/modules/diffusionmodules/openaimodel.py UNetModel, ldm/modules/diffusionmodules/model.py Encoder/Decoder,
ldm/modules/encoders/modules.py FrozenCLIPEmbedder / FrozenOpenCLIPEmbedder, ldm/models/diffusion/ddpm.py
register_schedule and LitEma). tests/test_checkpoint.py checks it against diffusers' own original -> diffusers
converters; scripts/measure_load_memory.py uses it to write a full-size random checkpoint. No diffusers here.
"""

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from kedavra.networks.model import ModelConfig
from kedavra.networks.unet_config import UNetConfig
from kedavra.networks.vae import VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: transformers' CLIPTextModel inside FrozenCLIPEmbedder
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: open_clip's CLIP with the visual tower deleted
OPENCLIP_LOGIT_SCALE = 4.6052  # log(100), CLIP's trained contrastive temperature

# ResBlock leaves, ours -> openaimodel.py ResBlock (in_layers = [norm, SiLU, conv], out_layers = [norm, SiLU,
# dropout, conv], emb_layers = [SiLU, linear]).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "shortcut": "skip_connection",
}
# Fragments inside a SpatialTransformer, ours -> attention.py (to_out = [Linear, Dropout], FeedForward.net =
# [GEGLU, Dropout, Linear]).
_UNET_TRANSFORMER = (
    (".to_out.", ".to_out.0."),
    (".ff.geglu.proj.", ".ff.net.0.proj."),
    (".ff.proj_out.", ".ff.net.2."),
)


def unet_modules(config: UNetConfig) -> dict[str, str]:
    """Our U-Net module prefixes -> openaimodel.py's (CompVis for SD 1.x / 2.x, Stability's sgm for SDXL), numbered
    the way UNetModel.__init__ appends its blocks: input_blocks gets conv_in, then per level one TimestepEmbedSequential
    per ResBlock (its transformer as .1) and the downsampler; output_blocks gets per level, from the deepest, one per
    ResBlock (transformer .1) with the upsampler inside the level's last one (.1, or .2 behind a transformer).
    SDXL's label_emb = Sequential(Sequential(Linear, SiLU, Linear)); a model without a mid block has no middle_block."""
    levels = config.num_levels
    res_blocks = config.res_blocks_per_level
    res_blocks = res_blocks if isinstance(res_blocks, tuple) else (res_blocks,) * levels  # sgm's num_res_blocks list
    table = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "norm_out": "out.0",
        "conv_out": "out.2",
    }
    if config.addition_time_embed_dim is not None:  # sgm: adm_in_channels -> label_emb
        table["add_embedding.linear_1"] = "label_emb.0.0"
        table["add_embedding.linear_2"] = "label_emb.0.2"
    if config.mid_block:
        table.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                      "mid_block.resnets.1": "middle_block.2"})
    input_blocks = ["conv_in"]  # what self.input_blocks holds, in order
    for level in range(levels):
        input_blocks += [f"down_blocks.{level}.resnets.{nr}" for nr in range(res_blocks[level])]
        if level != levels - 1:
            input_blocks.append(f"down_blocks.{level}.resample.conv")
    for index, ours in enumerate(input_blocks[1:], start=1):
        if ours.endswith(".conv"):
            table[ours] = f"input_blocks.{index}.0.op"
        else:
            table[ours] = f"input_blocks.{index}.0"
            table[ours.replace(".resnets.", ".attentions.")] = f"input_blocks.{index}.1"
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        attends = config.attention_per_level[level]
        for i in range(res_blocks[level] + 1):
            table[f"up_blocks.{up}.resnets.{i}"] = f"output_blocks.{index}.0"
            table[f"up_blocks.{up}.attentions.{i}"] = f"output_blocks.{index}.1"
            if level and i == res_blocks[level]:
                table[f"up_blocks.{up}.resample.conv"] = f"output_blocks.{index}.{2 if attends else 1}.conv"
            index += 1
    return table


def unet_key(key: str, modules: Mapping[str, str]) -> str:
    """Our U-Net parameter name -> its name under model.diffusion_model.; `modules` from unet_modules."""
    parts = key.split(".")
    cut = max(c for c in range(1, len(parts)) if ".".join(parts[:c]) in modules)
    prefix, leaf = ".".join(parts[:cut]), ".".join(parts[cut:])
    if ".resnets." in f".{prefix}.":
        head, _, tail = leaf.partition(".")
        leaf = f"{_UNET_RESNET.get(head, head)}.{tail}"
    elif ".attentions." in f".{prefix}.":
        leaf = "." + leaf
        for ours, theirs in _UNET_TRANSFORMER:
            leaf = leaf.replace(ours, theirs)
        leaf = leaf[1:]
    return f"{modules[prefix]}.{leaf}"


def vae_key(key: str, config: VAEConfig) -> tuple[str, bool]:
    """Our VAE parameter name -> (its name under first_stage_model., whether it is a 1x1 conv there)."""
    last = config.num_levels - 1
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.resample\.", r"encoder.down.\1.downsample.", name)
    name = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{last - int(m[1])}.block.", name)
    name = re.sub(r"^decoder\.up_blocks\.(\d+)\.resample\.", lambda m: f"decoder.up.{last - int(m[1])}.upsample.", name)
    name = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", name)
    name = name.replace(".conv_shortcut.", ".nin_shortcut.")
    attention = {"norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    match = re.match(r"^(encoder|decoder)\.mid_block\.attention\.(\w+)\.(weight|bias)$", name)
    if match:  # model.py AttnBlock: 1x1 Conv2d q, k, v, proj_out
        name = f"{match[1]}.mid.attn_1.{attention[match[2]]}.{match[3]}"
        return name, match[2] != "norm" and match[3] == "weight"
    return name, False


def clip_key(key: str) -> str:
    """Our text encoder parameter name -> transformers' CLIPTextModel name (SD 1.x, under CLIP_PREFIX)."""
    fixed = {
        "token_embedding.weight": "embeddings.token_embedding.weight",
        "position_embedding": "embeddings.position_embedding.weight",
    }
    if key in fixed:
        return "text_model." + fixed[key]
    key = key.replace("final_norm.", "final_layer_norm.")
    key = re.sub(r"^layers\.", "encoder.layers.", key)
    for ours, theirs in (("attn_norm", "layer_norm1"), ("mlp_norm", "layer_norm2"), (".attn.", ".self_attn."),
                         ("mlp.fc_in", "mlp.fc1"), ("mlp.fc_out", "mlp.fc2")):  # fmt: skip
        key = key.replace(ours, theirs)
    return "text_model." + key


def openclip_state(state: Mapping[str, Tensor], num_layers: int, width: int) -> dict[str, Tensor]:
    """Our text encoder state -> open_clip's names (SD 2.x, under OPENCLIP_PREFIX), q/k/v packed into in_proj.

    Adds what a real SD 2.x file also holds: the 24th resblock SD does not use (here one more than num_layers),
    the text_projection and the logit_scale (zeros / the trained value; the loader drops them).
    """
    like = state["final_norm.weight"]
    out = {
        "token_embedding.weight": state["token_embedding.weight"],
        "positional_embedding": state["position_embedding"],
        "ln_final.weight": state["final_norm.weight"],
        "ln_final.bias": state["final_norm.bias"],
        "text_projection": torch.zeros(width, width, dtype=like.dtype, device=like.device),
        "logit_scale": torch.full((), OPENCLIP_LOGIT_SCALE, dtype=like.dtype, device=like.device),
    }
    leaves = {"attn_norm": "ln_1", "attn.out_proj": "attn.out_proj", "mlp_norm": "ln_2", "mlp.fc_in": "mlp.c_fc",
              "mlp.fc_out": "mlp.c_proj"}  # fmt: skip
    for i in range(num_layers + 1):
        block = f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            if i == num_layers:  # the unused last block: shaped like block 0
                for name, tensor in openclip_state_block(state, 0, leaf, leaves).items():
                    out[block + name] = torch.zeros_like(tensor)
            else:
                out.update({block + k: v for k, v in openclip_state_block(state, i, leaf, leaves).items()})
    return out


def openclip_state_block(state, i: int, leaf: str, leaves: dict[str, str]) -> dict[str, Tensor]:
    layer = f"layers.{i}."
    qkv = [state[f"{layer}attn.{p}_proj.{leaf}"] for p in ("q", "k", "v")]
    block = {f"attn.in_proj_{leaf}": torch.cat(qkv, dim=0)}  # (3D, ...): q | k | v
    block.update({f"{theirs}.{leaf}": state[f"{layer}{ours}.{leaf}"] for ours, theirs in leaves.items()})
    return block


def schedule_buffers(config: ModelConfig) -> dict[str, Tensor]:
    """ddpm.py register_schedule's buffers for the config's schedule (float32, as the files store them)."""
    betas = config.schedule.betas
    alpha_bar = config.schedule.alpha_bar
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    posterior_variance = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alpha_bar,
        "alphas_cumprod_prev": alpha_bar_prev,
        "sqrt_alphas_cumprod": alpha_bar.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - alpha_bar).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alpha_bar).log(),
        "sqrt_recip_alphas_cumprod": (1 / alpha_bar).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alpha_bar - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
        "posterior_mean_coef2": (1 - alpha_bar_prev) * (1 - betas).sqrt() / (1 - alpha_bar),
    }
    return {k: v.float() for k, v in buffers.items()}


def original_state_dict(state: Mapping[str, Tensor], config: ModelConfig, extras: bool = True) -> dict[str, Tensor]:
    """A kedavra StableDiffusion state dict -> the original single-file state dict.

    The text encoder goes to the OpenAI CLIP layout (SD 1.x) when its MLP uses quick GELU, else to open_clip's
    (SD 2.x). extras=True adds the non-weight keys real files carry: the DDPM schedule buffers, LitEma's
    decay / num_updates and, for SD 1.x, CLIP's position_ids.
    """
    out: dict[str, Tensor] = {}
    text = {}
    modules = unet_modules(config.unet)
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        if component == "unet":
            out[UNET_PREFIX + unet_key(rest, modules)] = tensor
        elif component == "vae":
            name, is_conv = vae_key(rest, config.vae)
            out[VAE_PREFIX + name] = tensor[:, :, None, None] if is_conv else tensor  # (C, C) -> (C, C, 1, 1)
        else:
            text[rest] = tensor
    if config.text_encoder.activation == "quick_gelu":
        out.update({CLIP_PREFIX + clip_key(k): v for k, v in text.items()})
        if extras:  # transformers < 4.31 saved this arange buffer; SD 1.x files have it
            positions = torch.arange(config.text_encoder.max_positions)[None]
            out[CLIP_PREFIX + "text_model.embeddings.position_ids"] = positions.to(text["final_norm.weight"].device)
    else:
        layers, width = config.text_encoder.num_layers, config.text_encoder.width
        out.update({OPENCLIP_PREFIX + k: v for k, v in openclip_state(text, layers, width).items()})
    if extras:
        like = state["unet.conv_in.weight"]
        out.update({k: v.to(like.device) for k, v in schedule_buffers(config).items()})
        out["model_ema.decay"] = torch.tensor(0.9999, device=like.device)
        out["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32, device=like.device)
    return out
