"""The networks of Stable Diffusion, in the order a prompt meets them: tokenizers (CLIP's BPE, BERT's WordPiece),
text encoders (CLIP, MiniLM), the one attention module and the transformer blocks built on it, the U-Net and the VAE,
with the maps from the original checkpoints' key names to ours (`unet_keys`, `vae_keys`) and `model`, which
assembles them into one `StableDiffusion` from one `ModelConfig`.

Networks never import the diffusion maths' samplers: a sampler sees a network only as a callable.
"""
