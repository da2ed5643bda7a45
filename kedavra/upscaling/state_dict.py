"""Reading Real-ESRGAN / BasicSR state dicts (`.pth`, `.safetensors`) into kedavra's upscaler networks.

Real-ESRGAN's released files (RealESRGAN_x4plus.pth, RealESRGAN_x2plus.pth, RealESRGAN_x4plus_anime_6B.pth,
realesr-animevideov3.pth, realesr-general-x4v3.pth) are torch.save'd dicts whose weights sit under "params_ema"
(the EMA generator, preferred, as Real-ESRGAN's inference script does) or "params", in BasicSR's parameter names:

- RRDBNet (`basicsr/archs/rrdbnet_arch.py`): conv_first, body.N.rdb{1,2,3}.conv{1..5}, conv_body, conv_up1, conv_up2,
  conv_hr, conv_last. The scale follows from conv_first's input channels: 3 -> x4, 12 -> x2, 48 -> x1 (the
  pixel-unshuffled input, Real-ESRGAN Sec. 3.3).
- SRVGGNetCompact (`realesrgan/archs/srvgg_arch.py`): body.0 ... body.{2·num_conv+2}; the scale follows from the
  last convolution's out_channels = channels·scale².

Older ESRGAN files (Wang et al. 2018's RRDB_ESRGAN_x4.pth, and the community models A1111 users keep in
models/ESRGAN: 4x-UltraSharp, 4x_foolhardy_Remacri, ...) hold the same RRDBNet under one of two older layouts, renamed
here to BasicSR's names before the network is built:

- ESRGAN's first code, one nn.Sequential "model": model.0 (conv_first), model.1.sub.N.RDBk.convj.0 (the RRDBs),
  model.1.sub.{num_blocks} (conv_body), then [Upsample, conv, LeakyReLU] per x2 upsampling, so the upsampling convs
  sit at model.3, model.6, ..., model.3n, followed by model.{3n+2} (conv_hr) and model.{3n+4} (conv_last).
- ESRGAN's later `RRDBNet_arch.py` (also BSRGAN's): conv_first, RRDB_trunk.N.RDBk.convj, trunk_conv, upconv1,
  upconv2, HRconv, conv_last.

kedavra's RRDBNet always upsamples twice, so an old file must have two upsampling convs: x4 on RGB input, x2 / x1 on
12 / 48 pixel-unshuffled input channels (as BasicSR). Native x1, x2 or x8 layouts (0, 1 or 3 upsamplings) and ESRGAN+
(1x1 convolutions inside the dense blocks) are refused with a message that names the file and what it holds.

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


OLD_SEQUENTIAL_RDB = re.compile(r"model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)")
OLD_TRUNK_RDB = re.compile(r"RRDB_trunk\.(\d+)\.RDB([123])\.conv([1-5])\.(weight|bias)")
BASICSR_RDB = r"body.\1.rdb\2.conv\3.\4"
OLD_TRUNK_NAMES = {"trunk_conv": "conv_body", "upconv1": "conv_up1", "upconv2": "conv_up2", "HRconv": "conv_hr"}
UPSAMPLINGS = 2  # kedavra's RRDBNet: conv_up1 and conv_up2, two nearest x2 upsamplings (ESRGAN Fig. 4)
SCALE_NOTE = ("kedavra's RRDBNet upsamples exactly twice: x4 on RGB input, or x2 / x1 on 12 / 48 pixel-unshuffled "
              "input channels (Real-ESRGAN's x2plus)")


def _renamed(state: dict[str, Tensor], rdb: re.Pattern, layers: dict[str, str]) -> dict[str, Tensor]:
    """`state` with its dense-block convs matched by `rdb` and its layers in `layers` under BasicSR's names; any other
    key is kept as it is, for the key check to report."""
    renamed = {}
    for key, value in state.items():
        if rdb.fullmatch(key):
            renamed[rdb.sub(BASICSR_RDB, key)] = value
        else:
            layer, _, parameter = key.rpartition(".")
            renamed[f"{layers.get(layer, layer)}.{parameter}"] = value
    return renamed


def _from_old_sequential(path: Path, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """ESRGAN's nn.Sequential layout (model.0, model.1.sub.N.RDBk.convj.0, model.3, ...) in BasicSR's names."""
    blocks = 1 + max(int(m.group(1)) for k in state if (m := OLD_SEQUENTIAL_RDB.fullmatch(k)))
    top = sorted({int(m.group(1)) for k in state if (m := re.fullmatch(r"model\.(\d+)\.(?:weight|bias)", k))})
    upsamplings = len(top) - 3  # every top-level conv but conv_first, conv_hr and conv_last
    # [Upsample, conv, LeakyReLU] per upsampling after model.0 and model.1, then conv_hr, LeakyReLU, conv_last
    layout = [0, *range(3, 3 * upsamplings + 1, 3), 3 * upsamplings + 2, 3 * upsamplings + 4]
    if upsamplings < 0 or top != layout:
        raise UpscalerFileError(f"{path}: an old-style ESRGAN file whose top-level convolutions are "
                                f"{some(f'model.{i}' for i in top)}; ESRGAN's layout is model.0, one conv per x2 "
                                "upsampling at model.3, model.6, ..., then two more at model.{3n+2} and model.{3n+4}")
    if upsamplings != UPSAMPLINGS:
        convs = ", ".join(f"model.{3 * i}" for i in range(1, upsamplings + 1)) or "none"
        raise UpscalerFileError(f"{path}: an old-style ESRGAN file with {upsamplings} x2 upsampling convolutions "
                                f"({convs}: x{2**upsamplings} on {state['model.0.weight'].shape[1]} input channels); "
                                f"{SCALE_NOTE}")
    last = 3 * upsamplings
    layers = {"model.0": "conv_first", f"model.1.sub.{blocks}": "conv_body", "model.3": "conv_up1",
              "model.6": "conv_up2", f"model.{last + 2}": "conv_hr", f"model.{last + 4}": "conv_last"}
    return _renamed(state, OLD_SEQUENTIAL_RDB, layers)


def _from_old_trunk(path: Path, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """ESRGAN's RRDBNet_arch.py layout (conv_first, RRDB_trunk.N.RDBk.convj, trunk_conv, upconv1, ...) in BasicSR's
    names."""
    upconvs = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"upconv(\d+)\.weight", k)))
    if upconvs != list(range(1, UPSAMPLINGS + 1)):
        convs = ", ".join(f"upconv{i}" for i in upconvs) or "none"
        raise UpscalerFileError(f"{path}: an old-style ESRGAN file with {len(upconvs)} x2 upsampling convolutions "
                                f"({convs}: x{2**len(upconvs)} on {state['conv_first.weight'].shape[1]} input "
                                f"channels); {SCALE_NOTE}")
    return _renamed(state, OLD_TRUNK_RDB, OLD_TRUNK_NAMES)


def basicsr_names(state: dict[str, Tensor], path: str | Path = "<state dict>") -> dict[str, Tensor]:
    """An old-style ESRGAN state dict (either layout in the module docstring) under BasicSR's RRDBNet names; any other
    state dict unchanged."""
    path = Path(path)
    keys = set(state)
    if any(".conv1x1." in k for k in keys):
        raise UpscalerFileError(f"{path}: an ESRGAN+ file (1x1 convolutions in its dense blocks, keys like "
                                f"{some(sorted(k for k in keys if '.conv1x1.' in k), 2)}; Rakotonirina and "
                                "Rasoanaivo 2020); kedavra's RRDBNet is ESRGAN's and Real-ESRGAN's")
    if "model.0.weight" in keys and "model.1.sub.0.RDB1.conv1.0.weight" in keys:
        return _from_old_sequential(path, state)
    if "conv_first.weight" in keys and "RRDB_trunk.0.RDB1.conv1.weight" in keys:
        return _from_old_trunk(path, state)
    if any(k.startswith(("model.", "RRDB_trunk.", "trunk_conv.")) for k in keys):
        raise UpscalerFileError(f"{path}: an old-style ESRGAN file in neither of its layouts (keys like "
                                f"{some(sorted(keys), 3)}); kedavra reads model.0 + model.1.sub.N.RDBk.convj.0, "
                                "or conv_first + RRDB_trunk.N.RDBk.convj, or BasicSR's names (conv_first, "
                                "body.N.rdb1.conv1, ...)")
    return state


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
    """Build the RRDBNet or SRVGGNetCompact a BasicSR-named (or old ESRGAN-named) state dict describes, with its
    weights loaded."""
    path = Path(path)
    state = basicsr_names(state, path)
    keys = set(state)
    if "conv_first.weight" in keys and "body.0.rdb1.conv1.weight" in keys:
        network = _rrdbnet(path, state)
    elif "body.0.weight" in keys and "body.1.weight" in keys and state["body.1.weight"].ndim == 1:
        network = _srvgg(path, state)
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
