"""Which layer of a model each layer name in a LoRA file means.

Adapter files name layers in the naming of the tool that trained them; every name below is derived from the model's
own configuration (kedavra.networks.unet_keys.layer_names, the text encoder's checkpoint names), never guessed:
  kohya / A1111 / LyCORIS   `lora_unet_` + the U-Net layer's diffusers name (SD 1.x / 2.x trainers) or its original
                            LDM / SGM name (SDXL trainers), dots written as underscores:
                            lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q,
                            lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q;
                            `lora_te_` (one text encoder), `lora_te1_` / `lora_te2_` (SDXL's ViT-L and bigG) + the
                            transformers CLIPTextModel name: lora_te1_text_model_encoder_layers_0_self_attn_q_proj
  diffusers / PEFT          dotted: `unet.` + diffusers name, `text_encoder.` / `text_encoder_2.` + transformers name;
                            a bare diffusers U-Net name (peft's get_peft_model_state_dict of a U-Net)
  transformers 5            the same text-encoder names without `text_model.`: transformers 5's CLIPTextModel has no
                            text_model submodule, so diffusers' save_lora_weights writes
                            `text_encoder.encoder.layers.0.self_attn.q_proj` and its convert_state_dict_to_kohya
                            `lora_te1_encoder_layers_0_self_attn_q_proj` (CLIPTextModelWithProjection keeps it)
  original layout, dotted   `diffusion_model.` / `model.diffusion_model.` + the LDM / SGM name (some SDXL trainers)
  kedavra                   `lora_unet_` / `lora_te_` + kedavra's own layer names, and dotted `unet.` / `text_encoder.`
                            ones (what `kedavra train --lora` writes for the embedded models' extra layers)
Kohya's underscore names are matched whole against this table, so the ambiguity of "_" inside layer names
(to_q, proj_in) never arises.
"""

from __future__ import annotations

from torch import nn

from kedavra.networks.model import StableDiffusion
from kedavra.networks.text_encoder import TextEncoder, _source
from kedavra.networks.unet_keys import layer_names

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
ADAPTED_LAYERS = (nn.Linear, nn.Conv2d)


def _encoder_names(encoder: nn.Module) -> dict[str, str]:
    """Our Linear layer names of a text encoder -> transformers' CLIPTextModel names (identity for other encoders)."""
    names = {name: name for name, module in encoder.named_modules() if isinstance(module, ADAPTED_LAYERS)}
    if isinstance(encoder, TextEncoder):
        for ours in names:
            theirs = _source(f"{ours}.weight", "diffusers")[0].removesuffix(".weight")
            names[ours] = theirs if theirs == "text_projection" else f"text_model.{theirs}"
    return names


def kohya_prefixes(model: StableDiffusion) -> dict[str, str]:
    """Component -> its kohya prefix: lora_unet_, and lora_te_ or SDXL's lora_te1_ / lora_te2_ (the encoder with
    bigG's projection is te2, also where it is a refiner's only encoder)."""
    prefixes = {"unet": "lora_unet_"}
    if model.text_encoder_2 is not None:
        prefixes |= {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    elif model.config.micro_conditioning == 5:  # the SDXL refiner: bigG alone
        prefixes["text_encoder"] = "lora_te2_"
    else:
        prefixes["text_encoder"] = "lora_te_"
    return prefixes


def target_table(model: StableDiffusion) -> dict[str, str]:
    """Every name a LoRA file may give a layer of `model` (module docstring) -> that layer's path in the model
    ("unet.down_blocks.0...attn1.to_q", "text_encoder.layers.0.attn.q_proj")."""
    table: dict[str, str] = {}
    prefixes = kohya_prefixes(model)

    # a one-encoder model's encoder also answers to lora_te1_: diffusers' kohya converter writes it for SD 1.x, and
    # A1111 (networks.py, "some SD1 Loras") and ComfyUI (lora_te1_ -> clip_l) read it there
    aliases = {"text_encoder": ("lora_te1_",)} if prefixes.get("text_encoder") == "lora_te_" else {}

    def add(component: str, ours: str, *theirs: str) -> None:
        path = f"{component}.{ours}"
        for name in {ours, *theirs}:
            for prefix in (prefixes[component], *aliases.get(component, ())):
                table[prefix + name.replace(".", "_")] = path
            table[f"{component}.{name}"] = path

    diffusers, ldm = (layer_names(model.config.unet, layout) for layout in ("diffusers", "ldm"))
    for ours in diffusers:
        add("unet", ours, diffusers[ours], ldm[ours])
        path = f"unet.{ours}"
        table.setdefault(diffusers[ours], path)  # bare U-Net state dicts (peft)
        table[f"diffusion_model.{ldm[ours]}"] = table[f"model.diffusion_model.{ldm[ours]}"] = path
    for component in COMPONENTS[1:]:
        encoder = getattr(model, component)
        if encoder is not None:
            for ours, theirs in _encoder_names(encoder).items():
                add(component, ours, theirs, theirs.removeprefix("text_model."))
    return table


def adapted_layers(model: StableDiffusion) -> dict[str, nn.Module]:
    """Path -> module of every layer a LoRA may change (the Linear and Conv2d layers of the U-Net and encoders)."""
    return {f"{component}.{name}": module
            for component in COMPONENTS if getattr(model, component, None) is not None
            for name, module in getattr(model, component).named_modules() if isinstance(module, ADAPTED_LAYERS)}


def kohya_names(model: StableDiffusion) -> dict[str, str]:
    """Path of every adapted layer -> the name kohya's sd-scripts gives it (what kedavra writes, so that A1111,
    ComfyUI and diffusers' load_lora_weights read the file): the U-Net's diffusers names for SD 1.x / 2.x, its
    original (SGM) names for SDXL, the encoders' transformers names; kedavra's own names where no other exists."""
    prefixes = kohya_prefixes(model)
    sdxl = model.config.micro_conditioning > 0
    unet = layer_names(model.config.unet, "ldm" if sdxl else "diffusers")
    names = {f"unet.{ours}": prefixes["unet"] + theirs.replace(".", "_") for ours, theirs in unet.items()}
    for component in COMPONENTS[1:]:
        encoder = getattr(model, component)
        if encoder is not None:
            names |= {f"{component}.{ours}": prefixes[component] + theirs.replace(".", "_")
                      for ours, theirs in _encoder_names(encoder).items()}
    return names
