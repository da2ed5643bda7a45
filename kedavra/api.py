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
from kedavra.formats.png_info import GenerationParameters, model_hash
from kedavra.pipeline.device import default_device, default_dtype, network_dtype, parse_precision
from kedavra.pipeline.pipeline import Pipeline

EMBEDDED_DIR = Path(__file__).parent / "assets" / "models"  # models shipped inside the package: NAME.safetensors
DEFAULT_MODEL = "kedavra-shapes"  # the embedded default: docs/embedded_model.md says how it was trained
# The weight files of a diffusers folder's U-Net, in the order kedavra.checkpoint reads them.
UNET_WEIGHT_NAMES = tuple(f"diffusion_pytorch_model{variant}{suffix}"
                          for variant in ("", ".fp16") for suffix in (".safetensors", ".bin"))


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
         prediction_type: str | None = None, optimize: bool = True,
         lora_dir: str | os.PathLike | None = None, embeddings_dir: str | os.PathLike | None = None) -> Pipeline:
    """A Pipeline for an embedded model name (default: kedavra-shapes), a single-file checkpoint (.safetensors,
    .ckpt) or a diffusers folder. family / prediction_type override what is detected from the weights (see
    kedavra.checkpoint); optimize: keep CPU weights in oneDNN's packed layout (Pipeline's flag; docs/benchmark.md);
    lora_dir: where prompts' <lora:NAME:WEIGHT> tags find NAME; embeddings_dir: textual-inversion embeddings a
    prompt uses by name (docs/adapters.md)."""
    for what, folder in (("LoRA", lora_dir), ("embeddings", embeddings_dir)):
        if folder is not None and not Path(folder).expanduser().is_dir():
            raise FileNotFoundError(f"{what} folder {str(folder)!r} does not exist or is not a folder")
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_precision(dtype) or default_dtype(device)
    # read straight into the pipeline's precision and device, one tensor at a time: an SDXL file is never whole in
    # fp32 (docs/checkpoints.md, peak memory); the same weights as converting after, since fp16 -> fp32 is exact
    model = load_model(resolve_model(name_or_path), family=family, prediction_type=prediction_type,
                       dtype=network_dtype(dtype), device=device)
    return Pipeline(model, device=device, dtype=dtype, optimize=optimize,
                    lora_dir=None if lora_dir is None else Path(lora_dir).expanduser(),
                    embeddings_dir=None if embeddings_dir is None else Path(embeddings_dir).expanduser())


def choose_model(flag: str | None, png: GenerationParameters | None) -> str:
    """The model a command runs: its --model, else the PNG's model when it is an embedded one, else the embedded
    default (kedavra-shapes)."""
    if flag is not None:
        return flag
    embedded = embedded_models()
    if png is not None and png.model in embedded:
        return png.model
    if DEFAULT_MODEL in embedded:
        return DEFAULT_MODEL
    if embedded:
        return next(iter(embedded))
    raise ValueError(f"no model given and no embedded model found in {EMBEDDED_DIR} (the installation lacks its "
                     "assets): pass --model PATH (an SD 1.x / 2.x / XL .safetensors or .ckpt file, or a diffusers "
                     "folder)")


def model_identity(path: Path) -> tuple[str, str | None]:
    """(A1111's "Model": the file stem or folder name, "Model hash": AutoV2 of the file, or for a diffusers folder
    of its U-Net weights file; None when the U-Net is sharded over several files)."""
    if path.is_file():
        return path.stem, model_hash(path)
    for name in UNET_WEIGHT_NAMES:
        if (path / "unet" / name).is_file():
            return path.name, model_hash(path / "unet" / name)
        if (path / "unet" / f"{name}.index.json").is_file():
            return path.name, None
    return path.name, None
