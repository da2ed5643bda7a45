"""Reading ncnn models (`.param` graph text + `.bin` weights) into kedavra's upscaler networks.

ncnn (Tencent) stores a network as two files (ncnn's wiki "param and model file structure", and `src/net.cpp`,
`src/paramdict.cpp`, `src/modelbin.cpp` for the details relied on here):

- `.param`: the magic number 7767517, then "layer_count blob_count", then one line per layer in execution order:
  `type name bottom_count top_count bottom_blobs... top_blobs... key=value...`. A key k <= -23300 holds an array
  for key -k-23300, written "count,v1,v2,...". Values with a "." or an "e" are floats, the others integers.
- `.bin`: the layers' weights, concatenated in the order of the layers in `.param`, with no names or sizes (the
  sizes come from the param values). Convolution weights are read with a 4-byte tag first: 0x01306B47 means the
  weights follow as IEEE fp16 (the byte count padded to a multiple of 4), four zero bytes mean raw fp32; other tags
  (int8, quantisation tables) are refused here. Convolution biases and PReLU slopes are raw fp32 with no tag.

This reader knows exactly the layers Real-ESRGAN's ncnn exports use (Input, Split, Convolution, Concat, Eltwise,
BinaryOp, Interp, PReLU, PixelShuffle) and refuses any other layer type by name. It recognises the network from
the graph (Eltwise residuals and dense Concats: RRDBNet; PReLU and PixelShuffle: SRVGGNetCompact), reads its size
from the layers (block count from the number of convolutions, features and growth from their shapes), builds the
PyTorch module, and assigns the convolutions in graph order to the module's convolutions in forward order, checking
each one's shape and activation against what the module expects.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kedavra.upscaling.rrdbnet import LEAKY_SLOPE, RESIDUAL_SCALE, RRDBNet, RRDBNetConfig
from kedavra.upscaling.srvgg import SRVGGNetCompact, SRVGGNetCompactConfig

PARAM_MAGIC = 7767517  # first line of every ncnn .param text file
ARRAY_KEY_BASE = -23300  # param key -23300 - k holds the array for key k (ncnn paramdict.cpp)
FP16_TAG = 0x01306B47  # .bin weight tag: fp16 values follow (ncnn modelbin.cpp)
SUPPORTED_LAYERS = ("Input", "Split", "Convolution", "Concat", "Eltwise", "BinaryOp", "Interp", "PReLU",
                    "PixelShuffle")
# Convolution param keys (ncnn convolution.cpp): 0 num_output, 1 kernel, 2 dilation, 3 stride, 4 pad, 5 bias_term,
# 6 weight_data_size, 8 int8_scale_term, 9 activation_type, 10 activation_params (array); 11-15 the
# per-axis forms of 1-4, 18 pad_value, 19 dynamic_weight.
ACTIVATION_NONE, ACTIVATION_LEAKY_RELU = 0, 2  # Convolution 9=activation_type values used by these models
INTERP_NEAREST, INTERP_BICUBIC = 1, 3  # Interp 0=resize_type values


class NcnnFormatError(ValueError):
    """An ncnn model this reader cannot use; the message names the file and the reason."""


@dataclass
class NcnnLayer:
    """One line of a .param file."""

    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, int | float | list] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # filled from the .bin

    def get(self, key: int, default):
        return self.params.get(key, default)


@dataclass(frozen=True)
class NcnnModel:
    """A loaded ncnn upscaler: the network, and the bicubic resize factor the graph applies after it (1.0 when
    none; realesr-animevideov3's x2 and x3 files are its x4 network followed by a bicubic x0.5 / x0.75)."""

    network: nn.Module
    output_resize: float


def _value(text: str, path: Path) -> int | float:
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise NcnnFormatError(f"{path}: unreadable param value {text!r}") from None


def read_param(path: str | Path) -> list[NcnnLayer]:
    """The layers of an ncnn .param file, in execution order; other layer types than SUPPORTED_LAYERS refused."""
    path = Path(path)
    lines = [line.split() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if not lines or lines[0] != [str(PARAM_MAGIC)]:
        raise NcnnFormatError(f"{path}: not an ncnn .param file (the first line must be the magic {PARAM_MAGIC})")
    try:
        layer_count = int(lines[1][0])
    except (IndexError, ValueError):
        raise NcnnFormatError(f"{path}: the second line must be 'layer_count blob_count'") from None
    layers = []
    for number, fields in enumerate(lines[2:], start=3):
        if len(fields) < 4:
            raise NcnnFormatError(f"{path}: line {number} is not a layer line")
        kind, name = fields[0], fields[1]
        if kind not in SUPPORTED_LAYERS:
            raise NcnnFormatError(f"{path}: layer {name!r} has type {kind!r}, which kedavra's ncnn reader does "
                                  f"not support (it reads {', '.join(SUPPORTED_LAYERS)}: the Real-ESRGAN models)")
        n_bottom, n_top = int(fields[2]), int(fields[3])
        blobs = fields[4:4 + n_bottom + n_top]
        params: dict[int, int | float | list] = {}
        for item in fields[4 + n_bottom + n_top:]:
            key_text, _, value = item.partition("=")
            key = int(key_text)
            if key <= ARRAY_KEY_BASE:
                count, *values = value.split(",")
                params[ARRAY_KEY_BASE - key] = [_value(v, path) for v in values[:int(count)]]
            else:
                params[key] = _value(value, path)
        layers.append(NcnnLayer(kind, name, blobs[:n_bottom], blobs[n_bottom:], params))
    if len(layers) != layer_count:
        raise NcnnFormatError(f"{path}: header says {layer_count} layers, the file has {len(layers)}")
    return layers


class _BinReader:
    def __init__(self, path: Path):
        self.path, self.data, self.offset = path, path.read_bytes(), 0

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise NcnnFormatError(f"{self.path}: ends at byte {len(self.data)}, the .param file needs more weights "
                                  "(is it the .bin of another model?)")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def raw_fp32(self, count: int) -> np.ndarray:
        return np.frombuffer(self.take(4 * count), dtype="<f4").copy()

    def tagged(self, count: int, layer: str) -> np.ndarray:
        """ncnn ModelBin::load(w, type=0): a 4-byte tag then the values."""
        (tag,) = struct.unpack("<I", self.take(4))
        if tag == FP16_TAG:
            size = 2 * count
            values = np.frombuffer(self.take(size + (-size) % 4), dtype="<f2")[:count]  # padded to 4 bytes
            return values.astype(np.float32)
        if tag == 0:
            return self.raw_fp32(count)
        raise NcnnFormatError(f"{self.path}: layer {layer!r} stores its weights with tag 0x{tag:08x}; kedavra reads "
                              f"fp16 (0x{FP16_TAG:08x}) and fp32 (0) weights, not int8 or quantised ones")


_CONV_KEYS = {0, 1, 2, 3, 4, 5, 6, 9, 10}


def read_bin(layers: list[NcnnLayer], path: str | Path) -> None:
    """Fill each Convolution's "weight" / "bias" and each PReLU's "slope" from the .bin, in layer order."""
    path = Path(path)
    reader = _BinReader(path)
    for layer in layers:
        if layer.type == "Convolution":
            unknown = sorted(set(layer.params) - _CONV_KEYS)
            if unknown or layer.get(2, 1) != 1 or layer.get(3, 1) != 1 or layer.get(8, 0):
                raise NcnnFormatError(f"{path}: convolution {layer.name!r} uses params {layer.params} beyond the "
                                      "stride-1, undilated, float convolutions this reader supports")
            out_channels, kernel, size = layer.get(0, 0), layer.get(1, 0), layer.get(6, 0)
            if size % (out_channels * kernel * kernel):
                raise NcnnFormatError(f"{path}: convolution {layer.name!r}: weight size {size} is not a multiple "
                                      f"of {out_channels}x{kernel}x{kernel}")
            in_channels = size // (out_channels * kernel * kernel)
            weight = reader.tagged(size, layer.name).reshape(out_channels, in_channels, kernel, kernel)  # (O, I, k, k)
            layer.weights["weight"] = weight
            if layer.get(5, 0):
                layer.weights["bias"] = reader.raw_fp32(out_channels)
        elif layer.type == "PReLU":
            layer.weights["slope"] = reader.raw_fp32(layer.get(0, 1))
    if reader.offset != len(reader.data):
        raise NcnnFormatError(f"{path}: {len(reader.data) - reader.offset} bytes left over after the weights the "
                              ".param file describes (is it the .bin of another model?)")


def _assign(path: Path, convs: list[NcnnLayer], targets: list[tuple[nn.Conv2d, int]]) -> None:
    """Copy ncnn convolutions onto module convolutions, in order, checking shape and activation."""
    if len(convs) != len(targets):
        raise NcnnFormatError(f"{path}: {len(convs)} convolutions in the graph, the network needs {len(targets)}")
    for layer, (conv, activation) in zip(convs, targets, strict=True):
        weight = torch.from_numpy(layer.weights["weight"])
        if tuple(weight.shape) != tuple(conv.weight.shape) or "bias" not in layer.weights:
            raise NcnnFormatError(f"{path}: convolution {layer.name!r} has weights {tuple(weight.shape)}, the "
                                  f"network expects {tuple(conv.weight.shape)} with a bias")
        got = layer.get(9, ACTIVATION_NONE)
        if got != activation or (got == ACTIVATION_LEAKY_RELU and layer.get(10, [0.0]) != [LEAKY_SLOPE]):
            raise NcnnFormatError(f"{path}: convolution {layer.name!r} has activation {got} "
                                  f"{layer.get(10, '')}, the network expects {activation} here")
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(torch.from_numpy(layer.weights["bias"]))


def _rrdbnet(path: Path, layers: list[NcnnLayer]) -> RRDBNet:
    convs = [layer for layer in layers if layer.type == "Convolution"]
    blocks, remainder = divmod(len(convs) - 6, 15)  # conv_first, 15 per RRDB, conv_body, up1, up2, hr, last
    first = convs[0].weights["weight"]
    if remainder or blocks < 1 or first.shape[1] != 3:
        raise NcnnFormatError(f"{path}: an RRDBNet-like graph with {len(convs)} convolutions and "
                              f"{first.shape[1]} input channels is not a x4 RRDBNet (6 + 15 per block, 3 channels)")
    for layer in layers:
        if layer.type == "Eltwise" and (layer.get(0, 1) != 1 or layer.get(1, [1.0, 1.0]) != [RESIDUAL_SCALE, 1.0]):
            raise NcnnFormatError(f"{path}: residual {layer.name!r} is not x·{RESIDUAL_SCALE} + skip")
        if layer.type == "Interp" and (layer.get(0, 0), layer.get(1, 1.0), layer.get(2, 1.0)) != (INTERP_NEAREST, 2.0,
                                                                                                  2.0):
            raise NcnnFormatError(f"{path}: {layer.name!r} is not the nearest x2 upsampling of RRDBNet's tail")
    config = RRDBNetConfig(scale=4, num_blocks=blocks, num_features=first.shape[0],
                           num_growth=convs[1].weights["weight"].shape[0], out_channels=convs[-1].get(0, 0))
    network = RRDBNet(config)
    leaky, none = ACTIVATION_LEAKY_RELU, ACTIVATION_NONE
    targets = [(network.conv_first, none)]
    for block in network.body:
        for rdb in (block.rdb1, block.rdb2, block.rdb3):
            targets += [(rdb.conv1, leaky), (rdb.conv2, leaky), (rdb.conv3, leaky), (rdb.conv4, leaky),
                        (rdb.conv5, none)]
    targets += [(network.conv_body, none), (network.conv_up1, leaky), (network.conv_up2, leaky),
                (network.conv_hr, leaky), (network.conv_last, none)]
    _assign(path, convs, targets)
    return network


def _srvgg(path: Path, layers: list[NcnnLayer]) -> tuple[SRVGGNetCompact, float]:
    convs = [layer for layer in layers if layer.type == "Convolution"]
    prelus = [layer for layer in layers if layer.type == "PReLU"]
    (shuffle,) = [layer for layer in layers if layer.type == "PixelShuffle"]
    scale = shuffle.get(0, 1)
    first = convs[0].weights["weight"]
    config = SRVGGNetCompactConfig(scale=scale, num_conv=len(convs) - 2, num_features=first.shape[0],
                                   in_channels=first.shape[1], out_channels=first.shape[1])
    network = SRVGGNetCompact(config)
    modules = list(network.body)
    _assign(path, convs, [(m, ACTIVATION_NONE) for m in modules if isinstance(m, nn.Conv2d)])
    activations = [m for m in modules if isinstance(m, nn.PReLU)]
    if len(prelus) != len(activations):
        raise NcnnFormatError(f"{path}: {len(prelus)} PReLU layers, SRVGGNetCompact needs {len(activations)}")
    for layer, module in zip(prelus, activations, strict=True):
        if layer.weights["slope"].shape != tuple(module.weight.shape):
            raise NcnnFormatError(f"{path}: PReLU {layer.name!r} has {layer.weights['slope'].shape[0]} slopes, "
                                  f"expected {module.weight.shape[0]}")
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(layer.weights["slope"]))
    # After the network: the nearest upsampled input (scale) and, in the x2 / x3 exports, a bicubic resize.
    resize = 1.0
    for layer in layers:
        if layer.type != "Interp":
            continue
        kind, h_scale, w_scale = layer.get(0, 0), layer.get(1, 1.0), layer.get(2, 1.0)
        if h_scale != w_scale:
            raise NcnnFormatError(f"{path}: {layer.name!r} resizes height and width differently")
        if kind == INTERP_NEAREST and h_scale == scale:
            continue
        if kind == INTERP_BICUBIC and layer.tops == ["output"]:
            resize = float(h_scale)
            continue
        raise NcnnFormatError(f"{path}: resize {layer.name!r} (type {kind}, x{h_scale}) is neither the nearest "
                              "upsampled skip nor a final bicubic resize")
    return network, resize


def load_ncnn(param_path: str | Path, bin_path: str | Path | None = None) -> NcnnModel:
    """Read an ncnn Real-ESRGAN model (bin_path defaults to the .param's name with .bin) into a PyTorch network."""
    param_path = Path(param_path)
    bin_path = Path(bin_path) if bin_path is not None else param_path.with_suffix(".bin")
    for path in (param_path, bin_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (an ncnn model is a .param and a .bin side by side)")
    layers = read_param(param_path)
    read_bin(layers, bin_path)
    types = {layer.type for layer in layers}
    if {"Eltwise", "Concat"} <= types:
        return NcnnModel(_rrdbnet(param_path, layers).eval(), 1.0)
    if {"PReLU", "PixelShuffle"} <= types:
        network, resize = _srvgg(param_path, layers)
        return NcnnModel(network.eval(), resize)
    raise NcnnFormatError(f"{param_path}: a graph of {sorted(types)} is neither RRDBNet (Eltwise + Concat) nor "
                          "SRVGGNetCompact (PReLU + PixelShuffle)")
