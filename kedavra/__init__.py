"""kedavra: Stable Diffusion written from scratch in Python and PyTorch.

The data's walk from prompt to pixels, one module per step:
tokenizer -> text_encoder -> (schedule, noise) -> sampler driving the unet -> vae -> image.
"""

__version__ = "0.1.0"
