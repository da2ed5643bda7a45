"""Files that are not a whole SD 1.x / 2.x / XL model, told by their keys: other architectures (SD3, Flux, Stable
Cascade, DiT-style transformers), add-ons (LoRAs, ControlNets, textual-inversion embeddings) and single components
saved on their own. None of these prefixes occurs in a whole SD model, so any one key settles it."""

from collections.abc import Iterable

NOT_A_FULL_MODEL = "kedavra does not run it as a full model"
APPLY_LORA = "apply it to a model with --lora FILE or pipe.load_lora(FILE); docs/adapters.md"
USE_EMBEDDING = "put it in --embeddings-dir and write its name in a prompt; docs/adapters.md"
# Key prefix -> what a file holding it is. The first match wins: the specific come before the general.
FOREIGN_KEYS = (
    # Stability's SD3 single file (sgm's MMDiT under model.diffusion_model.) and its bare transformer
    ("model.diffusion_model.joint_blocks.", "a Stable Diffusion 3 (MMDiT) checkpoint"),
    ("joint_blocks.", "a Stable Diffusion 3 (MMDiT) transformer"),
    # Black Forest Labs' Flux: its own file (double_blocks / single_blocks), or ComfyUI's under model.diffusion_model.
    ("model.diffusion_model.double_blocks.", "a Flux checkpoint"),
    ("double_blocks.", "a Flux transformer"),
    # Stable Cascade (Würstchen v3): stage C maps CLIP into its prior, stage B maps EfficientNet features
    ("clip_txt_mapper.", "a Stable Cascade stage C (prior)"),
    ("effnet_mapper.", "a Stable Cascade stage B (decoder)"),
    # DiT-style transformers (DiT, PixArt-α/Σ, Hunyuan-DiT, SD3's patch embedder) and diffusers' transformer files
    ("model.diffusion_model.x_embedder.", "a DiT-style transformer checkpoint (SD3, PixArt, ...)"),
    ("x_embedder.", "a DiT-style transformer (DiT, PixArt, Hunyuan-DiT, ...)"),
    ("pos_embed.", "a diffusers transformer (DiT-style: PixArt, SD3, Flux, ...)"),
    ("transformer_blocks.", "a diffusers transformer (DiT-style: PixArt, SD3, Flux, ...)"),
    # kohya's LoRA names: lora_te1_ / lora_te2_ are SDXL's two text encoders, lora_te_ SD 1.x / 2.x's one
    ("lora_te1_", f"an SDXL LoRA, not a whole model ({APPLY_LORA})"),
    ("lora_te2_", f"an SDXL LoRA, not a whole model ({APPLY_LORA})"),
    ("lora_unet_", f"a LoRA, not a whole model ({APPLY_LORA})"),
    ("lora_te_", f"a LoRA, not a whole model ({APPLY_LORA})"),
    ("control_model.", "a ControlNet, not a whole model"),
    ("clip_l", f"an SDXL textual-inversion embedding (clip_l / clip_g vectors), not a whole model ({USE_EMBEDDING})"),
    ("clip_g", f"an SDXL textual-inversion embedding (clip_l / clip_g vectors), not a whole model ({USE_EMBEDDING})"),
    ("string_to_param", f"a textual-inversion embedding, not a whole model ({USE_EMBEDDING})"),
    ("emb_params", f"a textual-inversion embedding, not a whole model ({USE_EMBEDDING})"),
    ("encoder.conv_in.", "a standalone VAE, not a whole model"),
    ("conv_in.", "a single diffusers component (U-Net or VAE), not a whole model"),
    ("text_model.", "a standalone text encoder, not a whole model"),
)
# Fragments inside a key that only LoRA-style adapters have (diffusers / PEFT and kohya names).
LORA_PARTS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.")
# Subfolders of diffusers pipelines that have no U-Net (SD3, Flux, PixArt: transformer/; Stable Cascade: prior/ and
# decoder/) -> what the folder is.
FOREIGN_FOLDERS = (
    ("transformer", "a diffusers folder of a transformer (DiT-style) pipeline such as SD3, Flux or PixArt"),
    ("prior", "a diffusers folder of a Stable Cascade / Würstchen prior"),
    ("decoder", "a diffusers folder of a Stable Cascade / Würstchen decoder"),
)


def what_else(keys: Iterable[str]) -> tuple[str, list[str]] | None:
    """(what the file is, the keys that say so) when `keys` are not those of a whole SD model, else None."""
    keys = sorted(keys)
    for prefix, what in FOREIGN_KEYS:
        matching = [k for k in keys if k.startswith(prefix)]
        if matching:
            return what, matching
    matching = [k for k in keys if any(part in k for part in LORA_PARTS)]
    return (f"a LoRA, not a whole model ({APPLY_LORA})", matching) if matching else None
