"""kedavra: Stable Diffusion written from scratch in Python and PyTorch.

The data's walk from prompt to pixels, one module per step:
tokenizer -> text_encoder -> (schedule, noise) -> sampler driving the unet -> vae -> image.

    import kedavra
    pipe = kedavra.load()                      # the embedded kedavra-shapes; or a checkpoint file / folder
    pipe("a red circle above a blue square", seed=1).images[0].save("out.png")
"""

__version__ = "0.1.0"


def load(*args, **options):
    """A ready Pipeline for a model name or path (default: the embedded kedavra-shapes); see kedavra.api.load."""
    from kedavra.api import load as _load

    return _load(*args, **options)
