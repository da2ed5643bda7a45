"""Adapters: the small files people download to change what a model draws, applied to kedavra's networks.

    pipe.load_lora("detail.safetensors", weight=0.8)         # merged into the weights; pipe.unload_lora() restores
    pipe("a cat <lora:detail:0.6>", ...)                      # A1111's prompt syntax, NAME from pipe.lora_dir
    pipe.load_textual_inversion("bad-hands.pt")               # then write its name in a prompt

Modules, in the order a LoRA file flows through them:
  lora_file           a LoRA file of any format (kohya / A1111, LyCORIS LoHa / LoKr / full, DoRA, diffusers / PEFT):
                      its tensors grouped per target layer, with the network type and scale of each; A1111's hashes
  lora_targets        which of the model's layers each group names (kohya's underscore names and dotted diffusers /
                      PEFT / original-layout names, for SD 1.x, 2.x and SDXL's U-Net and text encoders)
  lora_math           each network type's weight update ΔW (Hu et al. 2021; LyCORIS; DoRA's weight decomposition)
  merge               merging a stack of LoRAs into the weights, and the exact (bitwise) restore
  prompt_tags         A1111's `<lora:NAME:WEIGHT>` tags, parsed out of a prompt
  textual_inversion   textual-inversion embeddings (A1111 .pt / .safetensors, diffusers learned_embeds, SDXL
                      clip_l / clip_g) and their use in prompts
  lora_training       trainable (down, up) layers injected around a model's layers for `kedavra train --lora`, and
                      their export as a kohya file (kedavra.training.lora drives them)
"""
