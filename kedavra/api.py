"""`kedavra.load`: a ready pipeline from a model name or a path, the one call most users need.

    import kedavra
    pipe = kedavra.load("v1-5-pruned-emaonly.safetensors")        # or a diffusers folder, or an embedded name
    result = pipe("a red circle above a blue square", seed=1, steps=20)
    result.images[0].save("out.png")
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kedavra.checkpoint import load_model
from kedavra.pipeline.pipeline import Pipeline

EMBEDDED_DIR = Path(__file__).parent / "assets" / "models"  # models shipped inside the package: NAME.safetensors
DEFAULT_MODEL = "kedavra-shapes"  # the embedded default: docs/embedded_model.md says how it was trained


def embedded_models() -> dict[str, Path]:
    """Name -> file of every model shipped inside the package."""
    return {p.stem: p for p in sorted(EMBEDDED_DIR.glob("*.safetensors"))}


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """The file or folder a model name or path stands for, or a clear error listing what exists."""
    if not isinstance(name_or_path, str | os.PathLike) or not str(name_or_path):
        raise ValueError(f"a model is an embedded name ({', '.join(embedded_models())}) or a path, got "
                         f"{name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    embedded = embedded_models()
    if str(name_or_path) in embedded:
        return embedded[str(name_or_path)]
    known = ", ".join(embedded) or "none shipped yet"
    raise FileNotFoundError(f"no model file or folder at {str(name_or_path)!r}, and it is not an embedded model "
                            f"name (embedded: {known})")


def load(name_or_path: str | os.PathLike = DEFAULT_MODEL, *, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, family: str | None = None,
         prediction_type: str | None = None, optimize: bool = True) -> Pipeline:
    """A Pipeline for an embedded model name (default: kedavra-shapes), a single-file checkpoint (.safetensors,
    .ckpt) or a diffusers folder. family / prediction_type override what is detected from the weights (see
    kedavra.checkpoint); optimize: keep CPU weights in oneDNN's packed layout (Pipeline's flag; docs/benchmark.md)."""
    model = load_model(resolve_model(name_or_path), family=family, prediction_type=prediction_type)
    return Pipeline(model, device=device, dtype=dtype, optimize=optimize)
