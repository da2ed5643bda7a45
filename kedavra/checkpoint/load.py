"""load_model and save_model: open the source, decide the config, build the model on the meta device and assign
each component's converted tensors (the file's own bytes where they can be)."""

import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from kedavra.checkpoint.detect import _decide, _probe
from kedavra.checkpoint.errors import _fail
from kedavra.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from kedavra.checkpoint.sources import CONFIG_KEY, FORMAT_KEY, FORMAT_VERSION, _open, _Source, components
from kedavra.networks.model import PRESETS, UNET_PREDICTION_TYPES, StableDiffusion
from kedavra.networks.text_encoder import convert_text_encoder_state_dict
from kedavra.networks.unet_keys import convert_unet_state_dict
from kedavra.networks.vae_keys import convert_vae_state_dict
from kedavra.validation import check_choice, some

logger = logging.getLogger(__name__)

_CONVERTERS = {
    "text_encoder": convert_text_encoder_state_dict,
    "text_encoder_2": convert_text_encoder_state_dict,  # SDXL's second text encoder (OpenCLIP ViT-bigG)
    "unet": convert_unet_state_dict,
    "vae": convert_vae_state_dict,
}


def _materialize(tensor: Tensor, dtype: torch.dtype, device: torch.device, files: list[SafetensorsFile]) -> Tensor:
    """The tensor the model will hold: the file's own bytes where dtype and device agree (and the bytes are
    aligned), otherwise a converted copy, after which the file pages it came from are dropped."""
    convert = tensor.is_floating_point() and tensor.dtype != dtype
    if not convert and device.type == "cpu" and tensor.data_ptr() % tensor.element_size() == 0:
        return tensor
    out = tensor.to(device=device, dtype=dtype if convert else tensor.dtype, copy=True)
    for file in files:
        file.release(tensor)
    return out


def _load_component(model: StableDiffusion, name: str, source: _Source, dtype, device, family_note: str) -> None:
    layout, state = source.parts[name]
    module = getattr(model, name)
    if layout == "kedavra":
        expected = module.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        shapes = [
            f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
            for k in sorted(set(state) & set(expected))
            if state[k].shape != expected[k].shape
        ]
        if missing or unexpected or shapes:
            raise _fail(
                source.path,
                f"{name} weights do not match the stored config: {len(missing)} missing "
                f"[{some(missing)}], {len(unexpected)} unexpected [{some(unexpected)}], "
                f"{len(shapes)} of the wrong shape [{some(shapes)}]",
            )
        converted = dict(state)
    else:
        try:
            converted = _CONVERTERS[name](state, layout, getattr(model.config, name))
        except ValueError as error:
            raise _fail(source.path, f"{error} ({family_note})") from None
    for key in list(converted):
        converted[key] = _materialize(converted[key], dtype, device, source.files)
    module.load_state_dict(converted, strict=True, assign=True)


def _check_components(source: _Source, config, note: str) -> None:
    """The source holds weights for exactly the components the config builds (SDXL: a second text encoder)."""
    needed = components(config)
    missing = [name for name in needed if name not in source.parts]
    extra = [name for name in source.parts if name not in needed]
    if missing or extra:
        holds = ", ".join(sorted(source.parts))
        raise _fail(source.path, f"holds weights for {holds}, but family {config.family} has "
                                 f"{', '.join(needed)} ({note}); pass the family the file is")


def load_model(
    path: str | os.PathLike,
    *,
    family: str | None = None,
    prediction_type: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> StableDiffusion:
    """Load an SD 1.x / 2.x / XL checkpoint (original single file, diffusers folder, or kedavra's format).

    family: a preset name (see kedavra.networks.model.PRESETS) to use instead of detecting it.
    prediction_type: "eps" or "v", instead of what the files say or the probe finds.
    dtype, device: where the weights end up; floating-point tensors are converted one at a time.
    The model comes back in eval mode; `model.describe()` says what was read and detected.
    """
    path = Path(path).expanduser()
    if family is not None:
        check_choice("family", family, PRESETS)
    if prediction_type is not None:
        check_choice("prediction_type", prediction_type, UNET_PREDICTION_TYPES)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    device = torch.device(device)
    source = _open(path)
    decision = _decide(source, family, prediction_type)
    with torch.device("meta"):
        model = StableDiffusion(decision.config)
    note = f"loading as family {decision.config.family}, {decision.family_how}"
    _check_components(source, decision.config, note)
    for name in components(decision.config):
        _load_component(model, name, source, dtype, device, note)
    model.eval()
    if decision.probe_between:
        _probe(path, model, decision, source.hints.image_size is not None)
    contents = f"{source.kind}; {'/'.join(sorted(source.containers))}; {source.file_dtypes()}"
    target = f"loaded as {str(dtype).removeprefix('torch.')} on {device}"
    lines = [f"read {path} ({contents}), {target}", *decision.report(), *source.notes]
    model.source = "\n".join(lines)
    logger.info("%s", model.source)
    return model


def save_model(model: StableDiffusion, path: str | os.PathLike) -> None:
    """Save in kedavra's format: one .safetensors with every component's weights under "text_encoder.",
    "text_encoder_2." (SDXL), "unet." and "vae." and the ModelConfig JSON in the metadata. Written tensor by tensor,
    then renamed into place; `load_model` reads it back bitwise (pass the saved dtype to keep it)."""
    if not isinstance(model, StableDiffusion):
        raise TypeError(f"save_model needs a StableDiffusion, got {type(model).__name__}")
    state = model.state_dict()
    on_meta = [k for k, t in state.items() if t.is_meta]
    if on_meta:
        raise ValueError(f"cannot save: {len(on_meta)} tensors have no data (meta device): {some(on_meta)}")
    metadata = {FORMAT_KEY: FORMAT_VERSION, CONFIG_KEY: json.dumps(model.config.to_dict())}
    write_safetensors(path, state, metadata)
