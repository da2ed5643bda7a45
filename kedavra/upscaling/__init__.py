"""Image upscalers written here: Real-ESRGAN's RRDBNet and SRVGGNetCompact, their ncnn and .pth/.safetensors
weights, tiled processing, and the `load_upscaler(name_or_path).upscale(image, scale)` API (docs/upscaling.md)."""

from kedavra.upscaling.ncnn_format import NcnnFormatError, load_ncnn
from kedavra.upscaling.rrdbnet import RRDBNet, RRDBNetConfig
from kedavra.upscaling.srvgg import SRVGGNetCompact, SRVGGNetCompactConfig
from kedavra.upscaling.state_dict import UpscalerFileError, load_state_dict_file, network_from_state_dict
from kedavra.upscaling.upscaler import KNOWN_UPSCALERS, Upscaler, load_upscaler, upscaler_names

__all__ = ["KNOWN_UPSCALERS", "NcnnFormatError", "RRDBNet", "RRDBNetConfig", "SRVGGNetCompact",
           "SRVGGNetCompactConfig", "Upscaler", "UpscalerFileError", "load_ncnn", "load_state_dict_file",
           "load_upscaler", "network_from_state_dict", "upscaler_names"]
