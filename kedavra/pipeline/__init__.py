"""Text to image and image to image: the only package that knows every part (see `pipeline.Pipeline`)."""

from kedavra.pipeline.pipeline import GenerationResult, Pipeline

__all__ = ["GenerationResult", "Pipeline"]
