"""Text to image and image to image: the only package that knows every part (see `pipeline.Pipeline`), and the
`GenerationRequest` every way in builds and checks once (`request`)."""

from kedavra.pipeline.hires import HiresFix
from kedavra.pipeline.pipeline import GenerationResult, Pipeline
from kedavra.pipeline.request import GenerationRequest

__all__ = ["GenerationRequest", "GenerationResult", "HiresFix", "Pipeline"]
