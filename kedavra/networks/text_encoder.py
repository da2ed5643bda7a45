"""CLIP's text transformer: token ids -> the per-token context the U-Net cross-attends to.

Radford et al. 2021 ("Learning Transferable Visual Models From Natural Language Supervision"), Sec. 2.4:
a GPT-2-style transformer (Radford et al. 2019) over the BPE tokens, with masked (causal) self-attention.
Each block is pre-LayerNorm: x + Attn(LN(x)), then x + MLP(LN(x)) (Vaswani et al. 2017 with the norm
moved in front of each sublayer). Stable Diffusion (Rombach et al. 2022, Sec. 3.3) feeds the per-token
hidden states after the final LayerNorm to the U-Net:
  SD 1.x: OpenAI CLIP ViT-L/14's text tower, 12 layers, the last layer's output, quick-GELU MLP.
  SD 2.x: OpenCLIP ViT-H/14's text tower, 24 layers of which SD uses 23 (the penultimate layer's
          output, then the final LayerNorm; Stability's FrozenOpenCLIPEmbedder(layer="penultimate")),
          exact GELU MLP.
"CLIP skip" (AUTOMATIC1111's name) takes an earlier layer's output the same way: clip_skip=1 is the
last layer of this model, clip_skip=2 the one before, and the final LayerNorm is applied either way.

`convert_text_encoder_state_dict` maps three checkpoint layouts onto this module's parameter names:
  "diffusers"  transformers' CLIPTextModel names (`text_model.encoder.layers.0.self_attn.q_proj.weight`;
               files saved by transformers >= 5 drop the `text_model.` prefix, both are accepted).
  "ldm_sd1"    the SD 1.x single file with `cond_stage_model.transformer.` stripped: the same names.
  "ldm_sd2"    the SD 2.x single file with `cond_stage_model.model.` stripped: OpenCLIP names
               (`transformer.resblocks.0.attn.in_proj_weight`, q, k and v packed in one matrix).
"""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kedavra.networks.attention import multi_head_attention, self_attention_projections
from kedavra.networks.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE
from kedavra.validation import check_choice, check_int, check_keys, some

ACTIVATIONS = ("quick_gelu", "gelu")
QUICK_GELU_SCALE = 1.702  # OpenAI CLIP model.py QuickGELU: x * sigmoid(1.702 x)
LAYER_NORM_EPS = 1e-5  # OpenAI CLIP and OpenCLIP use torch's LayerNorm default; CLIPTextConfig.layer_norm_eps
LAYOUTS = ("diffusers", "ldm_sd1", "ldm_sd2")


@dataclass(frozen=True)
class TextEncoderConfig:
    """Shape of a CLIP text transformer. The defaults are SD 1.x (OpenAI CLIP ViT-L/14's text tower)."""

    vocab_size: int = VOCAB_SIZE
    max_positions: int = CONTEXT_LENGTH
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"  # one of ACTIVATIONS
    layer_norm_eps: float = LAYER_NORM_EPS
    # Which layer's output `forward` returns by default: 1 = the last of `num_layers`, 2 = the one before.
    clip_skip: int = 1
    # Width of the pooled-output projection (OpenCLIP's text_projection); None: the model has none.
    projection_dim: int | None = None

    def __post_init__(self):
        positive = {
            "vocab_size": self.vocab_size,
            "max_positions": self.max_positions,
            "width": self.width,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "mlp_width": self.mlp_width,
        }
        if self.projection_dim is not None:
            positive["projection_dim"] = self.projection_dim
        for name, value in positive.items():
            check_int(f"TextEncoderConfig.{name}", value, low=1)
        if self.width % self.num_heads:
            raise ValueError(f"TextEncoderConfig.width={self.width} is not divisible by num_heads={self.num_heads}")
        check_choice("TextEncoderConfig.activation", self.activation, ACTIVATIONS)
        if not isinstance(self.layer_norm_eps, float) or not self.layer_norm_eps > 0:
            raise ValueError(f"TextEncoderConfig.layer_norm_eps must be a positive float, got {self.layer_norm_eps!r}")
        check_int("TextEncoderConfig.clip_skip", self.clip_skip, 1, self.num_layers, note=" (num_layers)")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @classmethod
    def from_preset(cls, name: str) -> "TextEncoderConfig":
        return PRESETS[check_choice("text encoder preset", name, sorted(PRESETS))]


_SD15 = TextEncoderConfig()  # CompVis v1-inference.yaml: FrozenCLIPEmbedder, openai/clip-vit-large-patch14
PRESETS: dict[str, TextEncoderConfig] = {
    "sd15": _SD15,
    # Stability v2-inference.yaml: FrozenOpenCLIPEmbedder("ViT-H-14", layer="penultimate"); 24 layers in
    # the file, the 24th unused (the diffusers text_encoder stores only these 23).
    "sd21": dataclasses.replace(_SD15, width=1024, num_layers=23, num_heads=16, mlp_width=4096, activation="gelu"),
    # CPU-trainable; width 64 matches the U-Net "tiny" preset's context_dim.
    "tiny": dataclasses.replace(_SD15, width=64, num_layers=2, num_heads=4, mlp_width=256),
}


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where token i sees tokens 0..i (Radford et al. 2021, Sec. 2.4)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = self_attention_projections(config.width)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, D) -> (B, L, D)."""
        projections = (self.q_proj, self.k_proj, self.v_proj, self.out_proj)
        # softmax(Q K^T / sqrt(Dh)) V, Vaswani et al. 2017 eq. 1, future positions masked out
        return multi_head_attention(x, x, projections, self.num_heads, causal=True)  # (B, L, D)


class MLP(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.quick_gelu = config.activation == "quick_gelu"
        self.fc_in = nn.Linear(config.width, config.mlp_width)
        self.fc_out = nn.Linear(config.mlp_width, config.width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc_in(x)
        # Hendrycks & Gimpel 2016, Sec. 2: GELU(x) = x Phi(x), and its sigmoid approximation x sigma(1.702 x)
        h = h * torch.sigmoid(QUICK_GELU_SCALE * h) if self.quick_gelu else F.gelu(h)
        return self.fc_out(h)


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TextEncoder(nn.Module):
    """CLIP text transformer: (B, L) token ids -> (B, L, D) hidden states after the final LayerNorm."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        if not isinstance(config, TextEncoderConfig):
            raise TypeError(f"TextEncoder needs a TextEncoderConfig, got {type(config).__name__}")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Parameter(torch.empty(config.max_positions, config.width))  # learned
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False)
        if self.position_embedding.device.type != "meta":  # a loader fills meta weights; init would be wasted
            self._init_weights()

    def _init_weights(self) -> None:
        """Standard deviations of OpenCLIP's TextTransformer.init_parameters, biases zero; for training
        from scratch (skipped on the meta device)."""
        width, depth = self.config.width, self.config.num_layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)
        for layer in self.layers:
            for proj in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj):
                nn.init.normal_(proj.weight, std=width**-0.5)
                nn.init.zeros_(proj.bias)
            for residual_out in (layer.attn.out_proj, layer.mlp.fc_out):
                nn.init.normal_(residual_out.weight, std=width**-0.5 * (2 * depth) ** -0.5)
                nn.init.zeros_(residual_out.bias)
            nn.init.normal_(layer.mlp.fc_in.weight, std=(2 * width) ** -0.5)
            nn.init.zeros_(layer.mlp.fc_in.bias)
        if self.config.projection_dim is not None:
            nn.init.normal_(self.text_projection.weight, std=width**-0.5)

    def forward(self, input_ids: Tensor, clip_skip: int | None = None) -> Tensor:
        """(B, L) int ids, L <= max_positions -> (B, L, D) hidden states of the layer `clip_skip`
        counts back from the last (default: the config's), passed through the final LayerNorm."""
        clip_skip = self.config.clip_skip if clip_skip is None else clip_skip
        check_int("clip_skip", clip_skip, 1, len(self.layers))
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be a (B, L) integer tensor, got shape {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        L = input_ids.shape[1]
        if L > self.config.max_positions:
            raise ValueError(f"input_ids has {L} tokens; this text encoder takes at most {self.config.max_positions}")
        x = self.token_embedding(input_ids) + self.position_embedding[:L]  # (B, L, D)
        for layer in self.layers[: len(self.layers) - clip_skip + 1]:
            x = layer(x)
        return self.final_norm(x)

    @staticmethod
    def pool(hidden_states: Tensor, input_ids: Tensor) -> Tensor:
        """(B, L, D) hidden states -> (B, D) at each sequence's end token, found as the first
        position of the largest id (CLIP's end token 49407 is the largest id; SD 1.x pads with it,
        SD 2.x with 0)."""
        end_positions = input_ids.argmax(dim=-1)  # (B,)
        return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), end_positions]

    def project(self, pooled: Tensor) -> Tensor:
        """(B, D) pooled output -> (B, projection_dim) CLIP text embedding (OpenCLIP text_projection)."""
        if self.config.projection_dim is None:
            raise ValueError("this text encoder has no text projection (TextEncoderConfig.projection_dim is None)")
        return self.text_projection(pooled)


# ---- Checkpoint conversion -------------------------------------------------------------------------

# Per-layer names: ours -> transformers' CLIPEncoderLayer -> OpenCLIP's ResidualAttentionBlock.
_LAYER_NAMES = {
    "attn_norm": ("layer_norm1", "ln_1"),
    "attn.out_proj": ("self_attn.out_proj", "attn.out_proj"),
    "mlp_norm": ("layer_norm2", "ln_2"),
    "mlp.fc_in": ("mlp.fc1", "mlp.c_fc"),
    "mlp.fc_out": ("mlp.fc2", "mlp.c_proj"),
}
_QKV = ("q_proj", "k_proj", "v_proj")  # OpenCLIP packs these, in this order, in attn.in_proj_*
# Tensors some files carry that are functions of the config or belong to CLIP's training head.
_IGNORED = {
    "diffusers": ("embeddings.position_ids",),  # older transformers saved this arange buffer
    "ldm_sd1": ("embeddings.position_ids",),
    "ldm_sd2": ("logit_scale", "attn_mask"),  # CLIP's contrastive temperature; a causal-mask buffer
}


def _source(key: str, layout: str) -> tuple[str, int | str | None]:
    """Where our parameter `key` lives in `layout`: (name, how), how = None (as is), 0/1/2 (that third
    of a packed q/k/v tensor), or "t" (transposed)."""
    if key == "position_embedding":
        return ("positional_embedding" if layout == "ldm_sd2" else "embeddings.position_embedding.weight"), None
    if key == "token_embedding.weight":
        return ("token_embedding.weight" if layout == "ldm_sd2" else "embeddings.token_embedding.weight"), None
    if key.startswith("final_norm."):
        return key.replace("final_norm", "ln_final" if layout == "ldm_sd2" else "final_layer_norm"), None
    if key == "text_projection.weight":
        return ("text_projection", "t") if layout == "ldm_sd2" else (key, None)
    _, index, rest = key.split(".", 2)  # layers.{i}.{module}.{weight|bias}
    module, leaf = rest.rsplit(".", 1)
    if layout != "ldm_sd2":
        if module.startswith("attn.") and module[5:] in _QKV:
            return f"encoder.layers.{index}.self_attn.{module[5:]}.{leaf}", None
        return f"encoder.layers.{index}.{_LAYER_NAMES[module][0]}.{leaf}", None
    if module.startswith("attn.") and module[5:] in _QKV:
        return f"transformer.resblocks.{index}.attn.in_proj_{leaf}", _QKV.index(module[5:])
    return f"transformer.resblocks.{index}.{_LAYER_NAMES[module][1]}.{leaf}", None


def _expected_state(config: TextEncoderConfig) -> dict[str, Tensor]:
    """Our parameter names and shapes for `config`, without allocating memory."""
    with torch.device("meta"):
        return TextEncoder(config).state_dict()


def _is_dropped(key: str, layout: str, config: TextEncoderConfig) -> bool:
    """Tensors of an ldm_sd2 file that SD 2.x does not use: resblocks past `num_layers` (the file holds
    all 24 of OpenCLIP; SD uses 23) and text_projection when the config has none."""
    if layout != "ldm_sd2":
        return False
    if key == "text_projection":
        return config.projection_dim is None
    parts = key.split(".")
    return key.startswith("transformer.resblocks.") and parts[2].isdigit() and int(parts[2]) >= config.num_layers


def convert_text_encoder_state_dict(
    state: Mapping[str, Tensor], layout: str, config: TextEncoderConfig
) -> dict[str, Tensor]:
    """Rename a text encoder state dict in `layout` (one of LAYOUTS, component prefix already stripped)
    to this module's names, for `TextEncoder(config).load_state_dict(..., strict=True)`.

    Tensors pass through or become views (thirds of OpenCLIP's packed in_proj, the transposed
    text_projection); nothing is copied.
    """
    check_choice("text encoder checkpoint layout", layout, LAYOUTS)
    if layout != "ldm_sd2":  # transformers < 5 saved CLIPTextModel under "text_model."; 5 does not
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    expected = _expected_state(config)
    sources = {key: _source(key, layout) for key in expected}
    used = {name for name, _ in sources.values()}
    missing = sorted(name for name in used if name not in state)
    unexpected = sorted(
        k for k in state if k not in used and k not in _IGNORED[layout] and not _is_dropped(k, layout, config)
    )
    check_keys(f"text encoder state dict does not match layout {layout!r} for this config", missing, unexpected,
               prefix="cond_stage_model.",
               hint="strip the 'cond_stage_model.transformer.' / 'cond_stage_model.model.' prefix first")
    converted, mismatched = {}, []
    for key, (name, how) in sources.items():
        tensor = state[name]
        if how == "t":
            tensor = tensor.t()  # OpenCLIP text_projection is (D, P), used as x @ W; ours is Linear's (P, D)
        elif how is not None:
            tensor = tensor.chunk(3, dim=0)[how]  # in_proj (3D, ...) -> q | k | v (D, ...)
        if tensor.shape != expected[key].shape:
            mismatched.append(f"{name}: {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
        converted[key] = tensor
    if mismatched:
        raise ValueError(
            f"text encoder state dict has {len(mismatched)} tensors of the wrong shape: {some(mismatched)}"
        )
    return converted


def to_diffusers_state_dict(state: Mapping[str, Tensor], config: TextEncoderConfig) -> dict[str, Tensor]:
    """The inverse for saving: our names -> transformers' CLIPTextModel names, as diffusers folders store
    them (with the `text_model.` prefix that every transformers version loads)."""
    expected = _expected_state(config)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"text encoder state dict lacks {len(missing)} keys of this config: [{some(missing)}]")
    renamed = {}
    for key in expected:
        name, _ = _source(key, "diffusers")
        renamed[name if name == "text_projection.weight" else f"text_model.{name}"] = state[key]
    return renamed
