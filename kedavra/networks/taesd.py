"""The tiny autoencoder TAESD: the diffusion model's latents <-> images, fast enough for a preview at every step.

TAESD, Boer Bohan 2023, github.com/madebyollin/taesd: a ~1.2M-parameter encoder and decoder of plain 3x3 convs,
ReLUs and residual blocks, distilled to share the latent space of Stable Diffusion's KL autoencoder (no GroupNorm,
no attention, no posterior). Layer order, as in diffusers' `AutoencoderTiny` (`EncoderTiny` / `DecoderTiny`):
  encoder: per stage [3x3 conv (stride 2 and no bias after the first stage), TinyBlock x num_blocks] -> 3x3 conv to z
  decoder: soft clamp -> 3x3 conv, ReLU -> per stage [TinyBlock x num_blocks, then nearest x2 + 3x3 conv without
           bias, except the last stage, whose conv has a bias and gives RGB]
  TinyBlock: ReLU(conv(ReLU(conv(ReLU(conv(x))))) + x)

Which latents: TAESD takes the latents the U-Net sees, i.e. SD's VAE latents *after* the multiplication by its
scaling factor (0.18215 for SD 1.x / 2.x, 0.13025 for SDXL): "TAESD directly converts SD(XL) latents into RGB
images" (madebyollin/taesd issue #3), which is why diffusers' config carries scaling_factor 1.0. TAESD3 and TAEF1
likewise take the MMDiT's latents, (z - shift) * scale (ComfyUI's vae_scale / vae_shift; diffusers PR #8618 gave
AutoencoderTiny its shift_factor 0.0 so that the SD3 pipeline hands them over unchanged).

Ranges, as diffusers' AutoencoderTiny (taesd.py itself works in [0, 1] and diffusers rescales at both ends):
`encode` takes images in [-1, 1] and feeds (x + 1) / 2 to the layers; `decode` first soft-clamps its input to
(-3, 3) with tanh(z / 3) * 3 (taesd.py's Clamp), then maps the layers' ~[0, 1] output to 2y - 1: approximately
[-1, 1], not clamped (kedavra.formats.images.to_pil clamps).

Weights: a diffusers folder (config.json + diffusion_pytorch_model.safetensors / .bin), or the single files that
A1111 and ComfyUI use (taesd_decoder.pth, taesdxl_encoder.safetensors, ...): state dicts of taesd.py's plain
nn.Sequential Encoder / Decoder. Their indices are diffusers' `encoder.layers.N` unchanged, and diffusers'
`decoder.layers.N` plus one: taesd.py's Decoder starts with Clamp() at index 0, a layer without weights that
DecoderTiny applies in forward instead (diffusers scripts/convert_tiny_autoencoder_to_diffusers.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from kedavra.checkpoint.errors import CheckpointError
from kedavra.checkpoint.weights import _read_json, read_weights
from kedavra.formats.images import to_pil
from kedavra.validation import check_choice, check_int, check_keys, check_number, check_optional_int, is_int, some

DECODER_INPUT_LIMIT = 3.0  # taesd.py Clamp: tanh(z / 3) * 3, a soft clamp of the latents to (-3, 3)
PARTS = ("encoder", "decoder")
DIFFUSERS_CLASS = "AutoencoderTiny"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_REQUIRED = {"act_fn": "relu", "upsample_fn": "nearest"}  # other values change the maths
ORIGINAL_KEY = re.compile(r"(\d+)\.(.+)")  # taesd.py's nn.Sequential names: "1.weight", "3.conv.0.weight"
ORIGINAL_INDEX_OFFSET = {"encoder": 0, "decoder": 1}  # taesd.py's Decoder has Clamp() at index 0


@dataclass(frozen=True)
class TinyAutoencoderConfig:
    """Shape of TAESD, in diffusers AutoencoderTiny's field names (its act_fn, upsample_fn and force_upcast are not
    fields: only "relu" and "nearest" exist in released weights, and upcasting is a runtime choice).

    latent_magnitude / latent_shift: scale_latents' map of latents to [0, 1] for 8-bit PNG storage (taesd.py).
    scaling_factor / shift_factor: what diffusers' pipelines apply to the U-Net's latents before `decode`
    (latents / scaling_factor + shift_factor); 1.0 and 0.0 in every released TAESD, which takes them as they are."""

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "latent_channels", "upsampling_scaling_factor"):
            check_int(f"TinyAutoencoderConfig.{name}", getattr(self, name), low=1)
        for part in PARTS:
            widths, blocks = getattr(self, f"{part}_block_out_channels"), getattr(self, f"num_{part}_blocks")
            _check_ints(f"{part}_block_out_channels", widths, low=1)
            _check_ints(f"num_{part}_blocks", blocks, low=0)
            if len(widths) != len(blocks):
                raise ValueError(f"TinyAutoencoderConfig.{part}_block_out_channels {widths} and num_{part}_blocks "
                                 f"{blocks} must have one entry per stage each, got {len(widths)} and {len(blocks)}")
        check_number("TinyAutoencoderConfig.latent_magnitude", self.latent_magnitude, low=0, low_inclusive=False)
        check_number("TinyAutoencoderConfig.latent_shift", self.latent_shift)
        check_number("TinyAutoencoderConfig.scaling_factor", self.scaling_factor, low=0, low_inclusive=False)
        check_number("TinyAutoencoderConfig.shift_factor", self.shift_factor)

    @classmethod
    def from_diffusers(cls, config: dict) -> TinyAutoencoderConfig:
        """The config a diffusers AutoencoderTiny config.json describes; absent keys take AutoencoderTiny's
        defaults, which are this class's. An activation or upsampling other than TAESD's is refused by name."""
        if not isinstance(config, dict):
            raise ValueError(f"an AutoencoderTiny config must be a JSON object, got {type(config).__name__}")
        name = config.get("_class_name", DIFFUSERS_CLASS)
        if name != DIFFUSERS_CLASS:
            raise ValueError(f"_class_name {name!r} is not a tiny autoencoder; allowed: {DIFFUSERS_CLASS!r}")
        for key, allowed in DIFFUSERS_REQUIRED.items():
            if config.get(key, allowed) != allowed:
                raise ValueError(f"{key}={config[key]!r} is not supported; allowed: {allowed!r}")
        values = {f.name: config[f.name] for f in fields(cls) if f.name in config}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: 8 for TAESD's four stages."""
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @property
    def upsample_factor(self) -> int:
        """Decoded image side / latent side: 8 for TAESD's four stages."""
        return self.upsampling_scaling_factor ** (len(self.decoder_block_out_channels) - 1)


def _check_ints(name: str, values, low: int) -> None:
    if not isinstance(values, tuple) or not values or not all(is_int(v) and v >= low for v in values):
        raise ValueError(f"TinyAutoencoderConfig.{name} must be a non-empty tuple of ints >= {low}, got {values!r}")


TINY_AUTOENCODER_PRESETS: dict[str, TinyAutoencoderConfig] = {
    "taesd": TinyAutoencoderConfig(),  # SD 1.x / 2.x (madebyollin/taesd)
    "taesdxl": TinyAutoencoderConfig(),  # SDXL: the same shapes, other weights (madebyollin/taesdxl)
    "taesd3": TinyAutoencoderConfig(latent_channels=16),  # SD3 / 3.5 (madebyollin/taesd3)
    "taef1": TinyAutoencoderConfig(latent_channels=16),  # FLUX.1 (madebyollin/taef1)
}


def get_tiny_autoencoder_config(name: str) -> TinyAutoencoderConfig:
    """A named preset (see TINY_AUTOENCODER_PRESETS)."""
    return TINY_AUTOENCODER_PRESETS[check_choice("tiny autoencoder preset", name, TINY_AUTOENCODER_PRESETS)]


def _conv(in_channels: int, out_channels: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, **kwargs)


class TinyBlock(nn.Module):
    """TAESD's residual block (taesd.py Block, diffusers AutoencoderTinyBlock): ReLU(convs(x) + x)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(),
                                  _conv(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(x) + x)  # taesd.py's skip is the identity where in and out widths agree, as here


class TinyEncoder(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> latents (B, C_z, H/8, W/8)."""

    def __init__(self, config: TinyAutoencoderConfig):
        super().__init__()
        widths, layers = config.encoder_block_out_channels, []
        for stage, (width, blocks) in enumerate(zip(widths, config.num_encoder_blocks, strict=True)):
            first = stage == 0
            layers.append(_conv(config.in_channels if first else widths[stage - 1], width,
                                stride=1 if first else 2, bias=first))
            layers += [TinyBlock(width) for _ in range(blocks)]
        layers.append(_conv(widths[-1], config.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images.add(1).div(2))  # [-1, 1] -> taesd.py's [0, 1]


class TinyDecoder(nn.Module):
    """Latents (B, C_z, h, w) -> images (B, 3, 8h, 8w), approximately in [-1, 1] (not clamped)."""

    def __init__(self, config: TinyAutoencoderConfig):
        super().__init__()
        widths = config.decoder_block_out_channels
        layers = [_conv(config.latent_channels, widths[0]), nn.ReLU()]
        for stage, (width, blocks) in enumerate(zip(widths, config.num_decoder_blocks, strict=True)):
            layers += [TinyBlock(width) for _ in range(blocks)]
            if stage < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=config.upsampling_scaling_factor, mode="nearest"),
                           _conv(width, widths[stage + 1], bias=False)]
            else:
                layers.append(_conv(width, config.out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: Tensor) -> Tensor:
        clamped = torch.tanh(latents / DECODER_INPUT_LIMIT) * DECODER_INPUT_LIMIT  # taesd.py Clamp
        return self.layers(clamped).mul(2).sub(1)  # taesd.py's [0, 1] -> [-1, 1]


class TinyAutoencoder(nn.Module):
    """TAESD's encoder and decoder, or one of them (a single taesd_decoder.pth gives a decoder-only model).

    Same conventions as diffusers' AutoencoderTiny: `decode(z)` is `.decode(z).sample`, `encode(x)` is
    `.encode(x).latents`; both take and give the U-Net's latents (see the module docstring)."""

    def __init__(self, config: TinyAutoencoderConfig, *, encoder: bool = True, decoder: bool = True):
        super().__init__()
        if not (encoder or decoder):
            raise ValueError("a TinyAutoencoder needs an encoder, a decoder or both; got encoder=False, decoder=False")
        self.config = config
        self.encoder = TinyEncoder(config) if encoder else None
        self.decoder = TinyDecoder(config) if decoder else None

    def _part(self, part: str) -> nn.Module:
        module = getattr(self, part)
        if module is None:
            other = "decoder" if part == "encoder" else "encoder"
            raise ValueError(f"this TinyAutoencoder has no {part}: it was built {other}-only (a single taesd_{other} "
                             f"file?); load a taesd_{part} file or a diffusers AutoencoderTiny folder to {part[:-1]}")
        return module

    def _check_input(self, what: str, x: Tensor, channels: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be (B, {channels}, H, W), got shape {tuple(x.shape)}")

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> the U-Net's latents (B, C_z, H/8, W/8)."""
        self._check_input("images", images, self.config.in_channels)
        return self._part("encoder")(images)

    def decode(self, latents: Tensor) -> Tensor:
        """The U-Net's latents (B, C_z, h, w) -> images (B, 3, 8h, 8w), approximately in [-1, 1] (not clamped)."""
        self._check_input("latents", latents, self.config.latent_channels)
        return self._part("decoder")(latents)

    def preview(self, latents: Tensor) -> list[Image.Image]:
        """The U-Net's latents (B, C_z, h, w) -> B RGB images of 8w x 8h pixels, decoded without gradients on the
        decoder's device and dtype. Applies latents / scaling_factor + shift_factor first (in the latents' dtype),
        as diffusers' pipelines do before vae.decode (the identity for every released TAESD)."""
        weight = next(self._part("decoder").parameters())
        with torch.no_grad():
            latents = latents / self.config.scaling_factor + self.config.shift_factor
            return to_pil(self.decode(latents.to(device=weight.device, dtype=weight.dtype)))

    def scale_latents(self, latents: Tensor) -> Tensor:
        """Latents -> [0, 1], for storing them as an 8-bit PNG (taesd.py): z / (2·magnitude) + shift, clamped."""
        return latents.div(2 * self.config.latent_magnitude).add(self.config.latent_shift).clamp(0, 1)

    def unscale_latents(self, scaled: Tensor) -> Tensor:
        """The inverse of scale_latents (for latents within ±magnitude): (s - shift) · 2·magnitude."""
        return scaled.sub(self.config.latent_shift).mul(2 * self.config.latent_magnitude)


# ---------------------------------------------------------------------------------------------------
# Loading


def _parts_of(state: dict[str, Tensor], path: Path) -> dict[str, dict[str, Tensor]]:
    """{"encoder": ..., "decoder": ...} (those present) under TinyEncoder / TinyDecoder names ("layers.N. ..."),
    from diffusers names ("decoder.layers.N. ...") or taesd.py's Sequential names ("N. ...")."""
    keys = sorted(state)
    if any(key.startswith(f"{part}.layers.") for key in keys for part in PARTS):
        stray = [key for key in keys if not key.startswith(("encoder.", "decoder."))]
        if stray:
            raise CheckpointError(f"{path}: AutoencoderTiny keys mixed with others: {some(stray)}")
        parts = {part: {k.removeprefix(f"{part}."): v for k, v in state.items() if k.startswith(f"{part}.")}
                 for part in PARTS}
        return {part: tensors for part, tensors in parts.items() if tensors}
    if keys and all(ORIGINAL_KEY.fullmatch(key) for key in keys):
        part = "encoder" if "0.weight" in state else "decoder"  # taesd.py's Decoder has no weights at index 0
        offset = ORIGINAL_INDEX_OFFSET[part]
        converted = {}
        for key, tensor in state.items():
            index, rest = ORIGINAL_KEY.fullmatch(key).groups()
            converted[f"layers.{int(index) - offset}.{rest}"] = tensor
        return {part: converted}
    raise CheckpointError(
        f"{path}: not a TAESD file (keys like {some(keys, 4)}); expected taesd.py's Encoder keys (0.weight, "
        "1.conv.0.weight, ...), its Decoder keys (1.weight, 3.conv.0.weight, ...) or diffusers AutoencoderTiny "
        "keys (encoder.layers.0.weight, decoder.layers.0.weight, ...)")


def _config_from_weights(parts: dict[str, dict[str, Tensor]], path: Path) -> TinyAutoencoderConfig:
    """TAESD's layout with the widths and latent channels the weights show (first convs, the encoder's last)."""
    preset, changes, widths = TINY_AUTOENCODER_PRESETS["taesd"], {}, {}
    for part, tensors in parts.items():
        first = tensors.get("layers.0.weight")  # encoder (D, 3, 3, 3); decoder (D, C_z, 3, 3)
        if first is None or first.ndim != 4:
            raise CheckpointError(f"{path}: no 4-d layers.0.weight among the {part}'s keys ({some(sorted(tensors))})")
        widths[part] = first.shape[0]
        if part == "decoder":
            changes["latent_channels"] = first.shape[1]
    for part in PARTS:  # a part the file lacks is taken as wide as the one it has
        width = widths.get(part, next(iter(widths.values())))
        changes[f"{part}_block_out_channels"] = (width,) * len(getattr(preset, f"num_{part}_blocks"))
    if "encoder" in parts:
        encoder = parts["encoder"]
        last = max((int(m.group(1)) for key in encoder if (m := re.match(r"layers\.(\d+)\.", key))), default=0)
        out = encoder.get(f"layers.{last}.weight")  # (C_z, D, 3, 3)
        if out is not None and changes.setdefault("latent_channels", out.shape[0]) != out.shape[0]:
            raise CheckpointError(f"{path}: the encoder gives {out.shape[0]} latent channels, the decoder takes "
                                  f"{changes['latent_channels']}")
    return replace(preset, **changes)


def _load_parts(model: TinyAutoencoder, parts: dict[str, dict[str, Tensor]], path: Path) -> TinyAutoencoder:
    for part, tensors in parts.items():
        module = getattr(model, part)
        expected = module.state_dict()
        check_keys(f"{path}: the {part} weights do not match TAESD's Tiny{part.title()}",
                   sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected)))
        for key, tensor in tensors.items():
            if tensor.shape != expected[key].shape:
                raise CheckpointError(f"{path}: {part} {key} has shape {tuple(tensor.shape)}, Tiny{part.title()} "
                                      f"needs {tuple(expected[key].shape)} for {model.config}")
        module.load_state_dict({key: tensor.float() for key, tensor in tensors.items()})
    return model.eval()


def _read_folder(path: Path) -> tuple[TinyAutoencoderConfig, Path]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: a folder without config.json; a diffusers AutoencoderTiny folder (such as "
                                f"madebyollin/taesd) holds config.json and {' or '.join(DIFFUSERS_WEIGHTS)}")
    raw = _read_json(config_path)
    try:
        config = TinyAutoencoderConfig.from_diffusers(raw)
    except ValueError as error:
        raise CheckpointError(f"{config_path}: {error}") from None
    for name in DIFFUSERS_WEIGHTS:
        if (path / name).is_file():
            return config, path / name
    raise FileNotFoundError(f"{path}: config.json but no weights; expected {' or '.join(DIFFUSERS_WEIGHTS)}")


def load_tiny_autoencoder(path: str | Path, latent_channels: int | None = None) -> TinyAutoencoder:
    """TAESD / TAESDXL / TAESD3 / TAEF1 from a diffusers AutoencoderTiny folder or one of taesd.py's single files
    (taesd_decoder.pth, taesdxl_encoder.safetensors, ...), in eval mode, float32, on the CPU.

    A folder's config.json gives the shapes; a single file's weights give the widths and latent channels (4 for
    TAESD / TAESDXL, 16 for TAESD3 / TAEF1). latent_channels, when given, must agree with them. A decoder file
    gives a decoder-only model (its encode refuses), an encoder file an encoder-only one."""
    latent_channels = check_optional_int("latent_channels", latent_channels, low=1, none_means="what the file says")
    path = Path(path)
    if path.is_dir():
        config, weights_path = _read_folder(path)
    else:
        config, weights_path = None, path
    parts = _parts_of(read_weights(weights_path).tensors, weights_path)
    config = config or _config_from_weights(parts, weights_path)
    if latent_channels is not None and latent_channels != config.latent_channels:
        raise CheckpointError(f"{path}: holds a tiny autoencoder with {config.latent_channels} latent channels, "
                              f"latent_channels={latent_channels} was asked for")
    model = TinyAutoencoder(config, encoder="encoder" in parts, decoder="decoder" in parts)
    return _load_parts(model, parts, weights_path)
