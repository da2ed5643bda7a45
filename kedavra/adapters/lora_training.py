"""LoRA layers to train: (down, up) pairs injected around a model's Linear and Conv2d layers, and their export as the
kohya / A1111 file every tool reads.

Hu et al. 2021 ("LoRA: Low-Rank Adaptation of Large Language Models"), eq. 3 and sec. 4.1: a frozen layer W0 gains
a trainable low-rank update, h = W0 x + (α / r) · B A x, with A (r, in) = `lora_down` and B (out, r) = `lora_up`;
r is the rank and α the scale's numerator (kohya's network_alpha; α = r gives scale 1). A Conv2d layer gets a
convolution with its own kernel, stride and padding as A (r, in, kh, kw) and a 1x1 convolution as B (out, r, 1, 1),
LyCORIS' LoCon: ΔW[o, i, k, l] = Σ_n B[o, n] A[n, i, k, l], which kedavra.adapters.lora_math merges. Shapes, names
and scale are kohya's, so a file written here is what sd-scripts' networks/lora.py writes.

Initialisation as kohya and PEFT do it: A kaiming-uniform (a = √5, torch's nn.Linear default), B zeros, so ΔW = 0 and
the injected model computes exactly what the base model computes until the first optimizer step. `dropout` drops
elements of A x (kohya's network_dropout) while training.

Which layers (`target_paths`), following kohya's networks/lora.py create_modules:
  default        every Linear and 1x1 Conv2d inside the U-Net's spatial transformers (kohya: Transformer2DModel):
                 proj_in, proj_out (1x1 convs in SD 1.x, Linear in SD 2.x and SDXL), attn1 / attn2 to_q, to_k, to_v,
                 to_out, and the feed-forward's GEGLU projection and output (diffusers' ff.net.0.proj, ff.net.2)
  conv (LoCon)   also the layers of the ResNet blocks and the down / up samplers (kohya with conv_dim: ResnetBlock2D,
                 Downsample2D, Upsample2D): the 3x3 conv1, conv2 and resampling convs, with the blocks' time-embedding
                 projection and 1x1 shortcut
  text_encoder   also every Linear of the CLIP text encoders' transformer layers (kohya: CLIPAttention, CLIPMLP):
                 q_proj, k_proj, v_proj, out_proj, fc1, fc2; both of SDXL's encoders
The injected layer replaces the original in its parent and holds it as `base`, so while injected the model's state
dict names a base weight `<layer>.base.weight` and the pair `<layer>.lora_down.weight`, `<layer>.lora_up.weight`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from kedavra.adapters.lora_file import LoraFile
from kedavra.adapters.lora_math import LayerUpdate
from kedavra.adapters.lora_targets import adapted_layers, kohya_names
from kedavra.networks.model import StableDiffusion
from kedavra.networks.text_encoder import TextEncoder
from kedavra.networks.transformer import SpatialTransformer
from kedavra.networks.unet import Downsample, ResBlock, Upsample
from kedavra.validation import check_bool, check_int, check_number, some

KAIMING_A = math.sqrt(5)  # torch's nn.Linear init (reset_parameters), kept by kohya's and PEFT's lora_down
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_CONV_BLOCKS = (ResBlock, Downsample, Upsample)  # kohya's UNET_TARGET_REPLACE_MODULE_CONV2D_3X3
_TENSORS = ("lora_down.weight", "lora_up.weight")  # one layer's tensors in the file, besides its `alpha`


class LoraLayer(nn.Module):
    """forward(x) = base(x) + (α / r) · up(dropout(down(x))) around a frozen nn.Linear or nn.Conv2d `base`."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float, dropout: float,
                 generator: torch.Generator):
        super().__init__()
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ValueError(f"LoRA needs an ungrouped convolution, got groups={base.groups}")
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        with torch.device("meta"):  # shapes only: the weights are drawn below from `generator`, not the global RNG
            if isinstance(base, nn.Conv2d):
                self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                           base.dilation, bias=False)
                self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
            else:
                self.lora_down = nn.Linear(base.in_features, rank, bias=False)
                self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        down, up = torch.empty(self.lora_down.weight.shape), torch.zeros(self.lora_up.weight.shape)
        nn.init.kaiming_uniform_(down, a=KAIMING_A, generator=generator)  # fan-in bound √(6 / ((1 + a²) in·kh·kw))
        device = base.weight.device
        self.lora_down.weight = nn.Parameter(down.to(device))  # float32 whatever the base's dtype
        self.lora_up.weight = nn.Parameter(up.to(device))

    def forward(self, x: Tensor) -> Tensor:
        # Hu et al. 2021, eq. 3 with the α/r scale of sec. 4.1: h = W0 x + (α / r) B A x
        return self.base(x) + self.scale * self.lora_up(self.dropout(self.lora_down(x)))


def target_paths(model: StableDiffusion, *, text_encoder: bool = False, conv: bool = False) -> list[str]:
    """The paths ("unet.down_blocks.1.attentions.0.proj_in", ...) of the layers a LoRA of these settings adapts,
    in the model's module order (module docstring)."""
    chosen: set[str] = set()
    for name, block in model.unet.named_modules():
        if isinstance(block, SpatialTransformer):
            chosen |= {f"unet.{name}.{child}" for child, layer in block.named_modules() if isinstance(layer, nn.Linear)
                       or (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1))}
        elif conv and isinstance(block, _CONV_BLOCKS):
            chosen |= {f"unet.{name}.{child}" for child, layer in block.named_modules()
                       if isinstance(layer, (nn.Linear, nn.Conv2d))}
    if text_encoder:
        for component in TEXT_ENCODERS:
            encoder = getattr(model, component)
            if encoder is None:
                continue
            if not isinstance(encoder, TextEncoder):
                raise ValueError(f"LoRA on the text encoder needs a CLIP text encoder; this model's {component} is "
                                 f"{type(encoder).__name__}, which stays frozen (train the U-Net's LoRA alone)")
            chosen |= {f"{component}.{name}" for name, layer in encoder.named_modules()
                       if isinstance(layer, nn.Linear) and name.startswith("layers.")}
    return [path for path in adapted_layers(model) if path in chosen]


class LoraNetwork:
    """The LoRA layers injected into one model (`inject_lora`): path -> LoraLayer, each with its kohya name."""

    def __init__(self, model: StableDiffusion, layers: dict[str, LoraLayer], names: dict[str, str], rank: int,
                 alpha: float):
        self.model, self.layers, self.names = model, layers, names
        self.rank, self.alpha = rank, alpha

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters, named as in the model's state dict ("unet.<layer>.lora_down.weight", ...)."""
        return {f"{path}.{tensor}": getattr(layer, tensor.split(".")[0]).weight
                for path, layer in self.layers.items() for tensor in _TENSORS}

    def kohya_state_dict(self, values: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The kohya / A1111 tensors: `<kohya name>.lora_down.weight`, `.lora_up.weight` and `.alpha` (a float32
        scalar) of every layer, as float32 CPU copies of `values` (named as `named_parameters`; default: the
        current parameters, e.g. values=EMA shadows for the averaged weights)."""
        values = values if values is not None else self.named_parameters()
        state = {}
        for path, layer in self.layers.items():
            name = self.names[path]
            for tensor in _TENSORS:
                state[f"{name}.{tensor}"] = values[f"{path}.{tensor}"].detach().float().cpu().contiguous().clone()
            state[f"{name}.alpha"] = torch.tensor(float(layer.alpha))
        return state

    def from_kohya(self, state: dict[str, Tensor], where: str) -> dict[str, Tensor]:
        """`kohya_state_dict`'s inverse: the tensors of a file written for this network, named as
        `named_parameters`; a ValueError naming `where` if the file holds other layers, shapes or α."""
        expected = {f"{self.names[path]}.{tensor}" for path in self.layers for tensor in (*_TENSORS, "alpha")}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{where} is not a LoRA of this run's layers: missing {some(missing)}; "
                             f"unexpected {some(unexpected)}")
        values = {}
        for path, layer in self.layers.items():
            name = self.names[path]
            if float(state[f"{name}.alpha"]) != float(layer.alpha):
                raise ValueError(f"{where}: {name} has alpha {float(state[f'{name}.alpha'])}, this run {layer.alpha}")
            for tensor in _TENSORS:
                parameter = getattr(layer, tensor.split(".")[0]).weight
                stored = state[f"{name}.{tensor}"]
                if stored.shape != parameter.shape:
                    raise ValueError(f"{where}: {name}.{tensor} has shape {tuple(stored.shape)}, this run's is "
                                     f"{tuple(parameter.shape)}")
                values[f"{path}.{tensor}"] = stored
        return values

    @torch.no_grad()
    def load_kohya(self, state: dict[str, Tensor], where: str) -> None:
        """Set the parameters to a file's tensors (`from_kohya`), exactly."""
        parameters = self.named_parameters()
        for name, value in self.from_kohya(state, where).items():
            parameters[name].copy_(value)

    def lora_file(self, values: dict[str, Tensor] | None = None, name: str = "training") -> LoraFile:
        """The layers as a LoraFile (what kedavra.adapters.lora_file.read_lora gives for the exported file), to merge
        into a copy of the base model with kedavra.adapters.merge."""
        state = self.kohya_state_dict(values)
        updates = {self.names[path]: LayerUpdate("lora", {t: state[f"{self.names[path]}.{t}"] for t in _TENSORS},
                                                 self.alpha) for path in self.layers}
        return LoraFile(Path(name), name, updates)

    def base_state_dict(self) -> dict[str, Tensor]:
        """The model's state dict as the base model names it: `<layer>.base.weight` as `<layer>.weight`, the LoRA
        pairs left out (tensors shared, not copied)."""
        state = {}
        for key, tensor in self.model.state_dict().items():
            parts = key.rsplit(".", 2)  # [layer path, "base" / "lora_down" / "lora_up", "weight" / "bias"]
            if len(parts) == 3 and parts[0] in self.layers:
                if parts[1] == "base":
                    state[f"{parts[0]}.{parts[2]}"] = tensor
            else:
                state[key] = tensor
        return state

    def remove(self) -> None:
        """Put the base layers back in place of the LoRA layers (the LoRA weights are dropped)."""
        for path, layer in self.layers.items():
            _set_module(self.model, path, layer.base)
        self.layers = {}


def inject_lora(model: StableDiffusion, rank: int, alpha: float | None = None, *, text_encoder: bool = False,
                conv: bool = False, dropout: float = 0.0, generator: torch.Generator | None = None) -> LoraNetwork:
    """Wrap the layers `target_paths` chooses in LoraLayers of rank `rank` and scale alpha / rank (alpha None: the
    rank, scale 1), their A drawn from `generator` (default: seed 0) in path order. The base weights are untouched;
    freezing them is the caller's (requires_grad)."""
    rank = check_int("LoRA rank", rank, 1)
    alpha = float(rank) if alpha is None else check_number("LoRA alpha", alpha, 0.0, low_inclusive=False)
    dropout = check_number("LoRA dropout", dropout, 0.0, 1.0)
    if dropout == 1:
        raise ValueError("LoRA dropout must be a number in [0.0, 1.0), got 1.0")
    check_bool("text_encoder", text_encoder)
    check_bool("conv", conv)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    names = kohya_names(model)  # before injection: it reads the model's own layer names
    paths = target_paths(model, text_encoder=text_encoder, conv=conv)
    layers = {}
    for path in paths:
        base = model.get_submodule(path)
        layers[path] = LoraLayer(base, rank, alpha, dropout, generator)
        _set_module(model, path, layers[path])
    return LoraNetwork(model, layers, {path: names[path] for path in paths}, rank, alpha)


def save_lora(path: str | os.PathLike, state: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """Write a kohya state dict (`LoraNetwork.kohya_state_dict`) and its string metadata as a .safetensors file."""
    bad = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        raise ValueError(f"safetensors metadata must map strings to strings; not so for {some(bad)}")
    save_file(state, str(path), metadata=metadata)
    return Path(path)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)
