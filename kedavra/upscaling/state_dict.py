"""Reading Real-ESRGAN / BasicSR state dicts (`.pth`, `.safetensors`) into kedavra's upscaler networks.

Real-ESRGAN's released files (RealESRGAN_x4plus.pth, RealESRGAN_x2plus.pth, RealESRGAN_x4plus_anime_6B.pth,
realesr-animevideov3.pth, realesr-general-x4v3.pth) are torch.save'd dicts whose weights sit under "params_ema"
(the EMA generator, preferred, as Real-ESRGAN's inference script does) or "params", in BasicSR's parameter names:

- RRDBNet (`basicsr/archs/rrdbnet_arch.py`): conv_first, body.N.rdb{1,2,3}.conv{1..5}, conv_body, conv_up1, conv_up2,
  conv_hr, conv_last. The scale follows from conv_first's input channels: 3 -> x4, 12 -> x2, 48 -> x1 (the
  pixel-unshuffled input, Real-ESRGAN Sec. 3.3).
- SRVGGNetCompact (`realesrgan/archs/srvgg_arch.py`): body.0 ... body.{2·num_conv+2}; the scale follows from the
  last convolution's out_channels = channels·scale².

Pickled files go through torch's restricted unpickler (kedavra.checkpoint.torch_pickle): nothing in them is run.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from kedavra.checkpoint.safetensors_io import SafetensorsFile
from kedavra.checkpoint.torch_pickle import _restricted_unpickling
from kedavra.upscaling.rrdbnet import UNSHUFFLE_FACTOR, RRDBNet, RRDBNetConfig
from kedavra.upscaling.srvgg import SRVGGNetCompact, SRVGGNetCompactConfig
from kedavra.validation import some

WRAPPER_KEYS = ("params_ema", "params", "state_dict")  # BasicSR's EMA / plain generator, Lightning's wrapper


class UpscalerFileError(ValueError):
    """A weights file that is not a Real-ESRGAN upscaler kedavra knows; the message names the file."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a .pth / .safetensors file, unwrapped from "params_ema" / "params"; the container is told
    from the leading bytes, never the name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) > 8 and head[8:9] == b"{":  # safetensors: u64 header length, then the JSON header
        return dict(SafetensorsFile(path).tensors())
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch zip, or a legacy torch pickle
        zipped = head.startswith(b"PK")
        with _restricted_unpickling(path, zipped):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        for key in WRAPPER_KEYS:
            if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
        if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
            raise UpscalerFileError(f"{path}: a torch file that is not a state dict of tensors (nor one wrapped in "
                                    f"{' / '.join(WRAPPER_KEYS)})")
        return dict(loaded)
    raise UpscalerFileError(f"{path}: neither a .safetensors nor a torch .pth file (first bytes {head!r}); upscalers "
                            "are read from .pth / .safetensors state dicts or ncnn .param + .bin pairs")


def _rrdbnet(path: Path, state: dict[str, Tensor]) -> RRDBNet:
    first = state["conv_first.weight"]  # (F, C·r², 3, 3)
    factors = {3 * r * r: scale for scale, r in UNSHUFFLE_FACTOR.items()}
    if first.shape[1] not in factors:
        raise UpscalerFileError(f"{path}: RRDBNet with {first.shape[1]} input channels; kedavra reads 3, 12 or 48 "
                                "(RGB at x4, x2, x1)")
    blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.", k)))
    config = RRDBNetConfig(scale=factors[first.shape[1]], num_blocks=blocks, num_features=first.shape[0],
                           num_growth=state["body.0.rdb1.conv1.weight"].shape[0],
                           out_channels=state["conv_last.weight"].shape[0])
    return RRDBNet(config)


def _srvgg(path: Path, state: dict[str, Tensor]) -> SRVGGNetCompact:
    last = max(int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.", k)))  # body.{2·num_conv+2}
    first = state["body.0.weight"]  # (F, C, 3, 3)
    channels = first.shape[1]
    scale = math.isqrt(state[f"body.{last}.weight"].shape[0] // channels)
    if last % 2 or scale**2 * channels != state[f"body.{last}.weight"].shape[0]:
        raise UpscalerFileError(f"{path}: an SRVGGNetCompact-like file whose last layer body.{last} is not a "
                                f"convolution to {channels}·scale² channels")
    config = SRVGGNetCompactConfig(scale=scale, num_conv=(last - 2) // 2, num_features=first.shape[0],
                                   in_channels=channels, out_channels=channels)
    return SRVGGNetCompact(config)


def network_from_state_dict(state: dict[str, Tensor], path: str | Path = "<state dict>") -> nn.Module:
    """Build the RRDBNet or SRVGGNetCompact a BasicSR-named state dict describes, with its weights loaded."""
    path = Path(path)
    keys = set(state)
    if "conv_first.weight" in keys and "body.0.rdb1.conv1.weight" in keys:
        network = _rrdbnet(path, state)
    elif "body.0.weight" in keys and "body.1.weight" in keys and state["body.1.weight"].ndim == 1:
        network = _srvgg(path, state)
    elif any(k.startswith(("model.", "RRDB_trunk.", "trunk_conv.")) for k in keys):
        raise UpscalerFileError(f"{path}: an old-style ESRGAN file (keys like {some(sorted(keys), 3)}); kedavra reads "
                                "Real-ESRGAN / BasicSR names (conv_first, body.N.rdb1.conv1, ...; or body.N for "
                                "SRVGGNetCompact)")
    else:
        raise UpscalerFileError(f"{path}: not a Real-ESRGAN RRDBNet or SRVGGNetCompact state dict (keys like "
                                f"{some(sorted(keys), 4)}); kedavra reads BasicSR names: conv_first.weight, "
                                "body.0.rdb1.conv1.weight, ... (RRDBNet) or body.0.weight, body.1.weight, ... "
                                "(SRVGGNetCompact with PReLU)")
    expected = network.state_dict()
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or unexpected:
        raise UpscalerFileError(f"{path}: keys do not match {type(network).__name__}: missing {some(missing)}, "
                                f"unexpected {some(unexpected)}")
    wrong = [k for k in expected if expected[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise UpscalerFileError(f"{path}: {k} has shape {tuple(state[k].shape)}, {type(network).__name__} needs "
                                f"{tuple(expected[k].shape)}")
    network.load_state_dict({k: v.float() for k, v in state.items()})
    return network.eval()


def load_state_dict_file(path: str | Path) -> nn.Module:
    """Read a Real-ESRGAN .pth / .safetensors file into its network."""
    return network_from_state_dict(read_state_dict(path), path)
