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
  SDXL (Podell et al. 2023, Sec. 2.1): two text encoders, OpenAI CLIP ViT-L/14 (SD 1.x's) and OpenCLIP
          ViT-bigG/14 (32 layers, width 1280), whose penultimate outputs are concatenated along the channels,
          taken BEFORE the final LayerNorm (SGM's FrozenCLIPEmbedder(layer="hidden", layer_idx=11) and
          FrozenOpenCLIPEmbedder2(layer="penultimate", legacy=False); diffusers' StableDiffusionXLPipeline reads
          CLIPTextModel's `hidden_states[-2]`); plus bigG's pooled text embedding: the LAST layer's output after
          the final LayerNorm at the end token, times text_projection (`text_embeds`). `TextEncoder.encode`
          returns both in one pass; `with_sdxl_readout` sets a config's readout to SDXL's.
"CLIP skip" (AUTOMATIC1111's name) takes an earlier layer's output the same way: clip_skip=1 is the
last layer of this model, clip_skip=2 the one before; the final LayerNorm is applied to it unless the config's
`apply_final_norm` (or the call's) says not to, as SDXL's readout does.

`convert_text_encoder_state_dict` maps three checkpoint layouts onto this module's parameter names:
  "diffusers"  transformers' CLIPTextModel names (`text_model.encoder.layers.0.self_attn.q_proj.weight`;
               files saved by transformers >= 5 drop the `text_model.` prefix, both are accepted).
  "ldm_sd1"    the SD 1.x single file with `cond_stage_model.transformer.` stripped: the same names.
  "ldm_sd2"    the SD 2.x single file with `cond_stage_model.model.` stripped: OpenCLIP names
               (`transformer.resblocks.0.attn.in_proj_weight`, q, k and v packed in one matrix).
SDXL's single file holds the same two kinds: `conditioner.embedders.0.transformer.` (ViT-L/14, transformers'
names: read it as "ldm_sd1") and `conditioner.embedders.1.model.` (bigG/14, OpenCLIP names with text_projection
as a (D, P) matrix used as x @ W: read it as "ldm_sd2"); the refiner's only encoder, bigG, sits under
`conditioner.embedders.0.model.`. A diffusers SDXL folder's text_encoder/ (CLIPTextModel) and text_encoder_2/
(CLIPTextModelWithProjection, text_projection.weight a (P, D) nn.Linear weight) are both "diffusers".
"""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kedavra.networks.attention import multi_head_attention, self_attention_projections
from kedavra.networks.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE
from kedavra.validation import check_bool, check_choice, check_int, check_keys, check_number, is_int, some

ACTIVATIONS = ("quick_gelu", "gelu")
QUICK_GELU_SCALE = 1.702  # OpenAI CLIP model.py QuickGELU: x * sigmoid(1.702 x)
LAYER_NORM_EPS = 1e-5  # OpenAI CLIP and OpenCLIP use torch's LayerNorm default; CLIPTextConfig.layer_norm_eps
LAYOUTS = ("diffusers", "ldm_sd1", "ldm_sd2")
# Podell et al. 2023 (SDXL), Sec. 2.1: "we concatenate the penultimate text encoder outputs", taken before the final
# LayerNorm (SGM's embedders; diffusers' StableDiffusionXLPipeline: hidden_states[-2]).
SDXL_CLIP_SKIP = 2
SDXL_APPLY_FINAL_NORM = False

# transformers' CLIPTextConfig: the architectures a diffusers text_encoder/config.json may name, with whether the
# model carries text_projection; and the defaults CLIPTextConfig gives an absent key (transformers 4.x and 5.x).
ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}
_CLIP_TEXT_CONFIG_DEFAULTS = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "projection_dim": 512,
    "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "eos_token_id": 49407,
}
# transformers' CLIPTextTransformer pools at the argmax id when eos_token_id == 2 (configs saved before its PR
# #24773, SD 1.x / 2.x / XL among them), else at the first eos_token_id: the same place when that is CLIP's end
# token, the vocabulary's largest id. `TextEncoder.pool` takes the argmax.
LEGACY_EOS_TOKEN_ID = 2


@dataclass(frozen=True)
class TextEncoderConfig:
    """Shape of a CLIP text transformer and which layer's output it hands on. The defaults are SD 1.x (OpenAI CLIP
    ViT-L/14's text tower, the last layer after the final LayerNorm)."""

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
    # Whether `forward` passes that output through the final LayerNorm (SD 1.x / 2.x: yes; SDXL: no).
    apply_final_norm: bool = True
    # Width of the pooled-output projection (OpenCLIP's text_projection); None: the model has none.
    projection_dim: int | None = None
    # CLIP's masked self-attention (token i sees tokens 0..i); False: every token sees the whole prompt, as in
    # BERT (Devlin et al. 2019), for encoders trained from scratch (`kedavra train --bidirectional-text`).
    causal: bool = True

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
        check_bool("TextEncoderConfig.apply_final_norm", self.apply_final_norm)
        check_bool("TextEncoderConfig.causal", self.causal)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @classmethod
    def from_preset(cls, name: str) -> "TextEncoderConfig":
        return PRESETS[check_choice("text encoder preset", name, sorted(PRESETS))]

    @classmethod
    def from_diffusers(cls, config: dict) -> "TextEncoderConfig":
        """The config a transformers CLIPTextConfig dict describes (a diffusers folder's text_encoder/config.json or
        text_encoder_2/config.json); an absent key takes CLIPTextConfig's default. projection_dim counts only for
        CLIPTextModelWithProjection (`architectures`): every CLIPTextConfig carries one. The readout is SD 1.x's
        (last layer, final LayerNorm): config.json does not say which layer a pipeline reads, so an SDXL folder's
        encoders take `with_sdxl_readout`. What this module cannot run is refused with the field's name."""
        if not isinstance(config, dict):
            raise ValueError(f"a CLIPTextConfig must be a JSON object, got {type(config).__name__}")
        model_type = config.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise ValueError(f"CLIPTextConfig model_type {model_type!r} is not supported; allowed: 'clip_text_model'")
        architectures = config.get("architectures") or ["CLIPTextModel"]
        if not isinstance(architectures, list) or len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
            raise ValueError(f"CLIPTextConfig architectures={architectures!r} is not supported; allowed: one of "
                             f"{', '.join(ARCHITECTURES)}")
        value = {**_CLIP_TEXT_CONFIG_DEFAULTS, **config}.get
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings", "projection_dim")
        for key in sizes if ARCHITECTURES[architectures[0]] else sizes[:-1]:
            check_int(f"CLIPTextConfig {key}", value(key), low=1)
        if value("hidden_size") % value("num_attention_heads"):
            raise ValueError(f"CLIPTextConfig hidden_size={value('hidden_size')} is not divisible by "
                             f"num_attention_heads={value('num_attention_heads')}")
        activation = check_choice("CLIPTextConfig hidden_act", value("hidden_act"), ACTIVATIONS)
        eps = check_number("CLIPTextConfig layer_norm_eps", value("layer_norm_eps"), low=0, low_inclusive=False)
        end_token = value("vocab_size") - 1
        if not is_int(value("eos_token_id")) or value("eos_token_id") not in (LEGACY_EOS_TOKEN_ID, end_token):
            raise ValueError(f"CLIPTextConfig eos_token_id={value('eos_token_id')!r} is not supported; allowed: "
                             f"{LEGACY_EOS_TOKEN_ID} (pool at the largest id) or vocab_size - 1 = {end_token} "
                             "(CLIP's end token, the largest id)")
        return cls(
            vocab_size=value("vocab_size"), max_positions=value("max_position_embeddings"),
            width=value("hidden_size"), num_layers=value("num_hidden_layers"),
            num_heads=value("num_attention_heads"), mlp_width=value("intermediate_size"), activation=activation,
            layer_norm_eps=eps, projection_dim=value("projection_dim") if ARCHITECTURES[architectures[0]] else None,
        )


def with_sdxl_readout(config: TextEncoderConfig) -> TextEncoderConfig:
    """`config` read as SDXL reads both its text encoders (Podell et al. 2023, Sec. 2.1): the penultimate layer's
    output without the final LayerNorm. The pooled embedding (`TextEncoder.encode`) still comes from the last layer
    after the final LayerNorm."""
    return dataclasses.replace(config, clip_skip=SDXL_CLIP_SKIP, apply_final_norm=SDXL_APPLY_FINAL_NORM)


_SD15 = TextEncoderConfig()  # CompVis v1-inference.yaml: FrozenCLIPEmbedder, openai/clip-vit-large-patch14
# OpenCLIP ViT-bigG/14 (laion2B-39B-b160k)'s text tower: SGM sd_xl_base.yaml's FrozenOpenCLIPEmbedder2, diffusers'
# SDXL text_encoder_2 (CLIPTextModelWithProjection); all 32 layers are kept, the pooled output needs the last.
_BIG_G = dataclasses.replace(_SD15, width=1280, num_layers=32, num_heads=20, mlp_width=5120, activation="gelu",
                             projection_dim=1280)
_TINY = dataclasses.replace(_SD15, width=64, num_layers=2, num_heads=4, mlp_width=256)
PRESETS: dict[str, TextEncoderConfig] = {
    "sd15": _SD15,
    # Stability v2-inference.yaml: FrozenOpenCLIPEmbedder("ViT-H-14", layer="penultimate"); 24 layers in
    # the file, the 24th unused (the diffusers text_encoder stores only these 23).
    "sd21": dataclasses.replace(_SD15, width=1024, num_layers=23, num_heads=16, mlp_width=4096, activation="gelu"),
    # SDXL's two encoders (sd_xl_base.yaml's conditioner.embedders.0 and .1), read at the penultimate layer
    # without the final LayerNorm; their widths add up to the U-Net's context_dim 2048.
    "sdxl-l": with_sdxl_readout(_SD15),
    "sdxl-g": with_sdxl_readout(_BIG_G),
    # CPU-trainable; width 64 matches the U-Net "tiny" preset's context_dim.
    "tiny": _TINY,
    # An SDXL-shaped pair for tests: widths 32 + 32 = the tiny U-Net's context_dim, a 32-wide pooled embedding.
    "tiny-sdxl-l": with_sdxl_readout(dataclasses.replace(_TINY, width=32, mlp_width=128)),
    "tiny-sdxl-g": with_sdxl_readout(dataclasses.replace(_TINY, width=32, mlp_width=128, activation="gelu",
                                                         projection_dim=32)),
}


class SelfAttention(nn.Module):
    """Multi-head self-attention where token i sees tokens 0..i (Radford et al. 2021, Sec. 2.4), or every token
    where the config is not causal."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.causal = config.causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = self_attention_projections(config.width)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, D) -> (B, L, D)."""
        projections = (self.q_proj, self.k_proj, self.v_proj, self.out_proj)
        # softmax(Q K^T / sqrt(Dh)) V, Vaswani et al. 2017 eq. 1, future positions masked out when causal
        return multi_head_attention(x, x, projections, self.num_heads, causal=self.causal)  # (B, L, D)


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
        self.attn = SelfAttention(config)
        self.mlp_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TextEncoder(nn.Module):
    """CLIP text transformer: (B, L) token ids -> (B, L, D) hidden states of the config's layer (by default the
    last, after the final LayerNorm); `encode` adds the pooled text embedding."""

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

    def forward(self, input_ids: Tensor, clip_skip: int | None = None, apply_final_norm: bool | None = None, *,
                token_embeddings: Tensor | None = None) -> Tensor:
        """(B, L) int ids, L <= max_positions -> (B, L, D) hidden states of the layer `clip_skip` counts back from
        the last, passed through the final LayerNorm when `apply_final_norm` (None: the config's value for either).

        token_embeddings: (B, L, D) input vectors to use instead of looking `input_ids` up in `token_embedding`
        (position embeddings are still added): textual inversion's learned vectors stand at some positions (Gal et
        al. 2022; kedavra.adapters.textual_inversion). `input_ids` still locate the end token for `pool`, so ids
        placed at those positions must stay below the end token's (A1111 puts 0 there). None: the lookup."""
        hidden, _ = self._run(input_ids, clip_skip, apply_final_norm, pooled=False, token_embeddings=token_embeddings)
        return hidden

    def encode(
        self, input_ids: Tensor, clip_skip: int | None = None, apply_final_norm: bool | None = None, *,
        token_embeddings: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """SDXL's conditioning from one pass (Podell et al. 2023, Sec. 2.1): (B, L, D) hidden states as `forward`
        gives them, and the pooled text embedding: the LAST layer's output after the final LayerNorm at the end token
        (`pool`), projected to (B, projection_dim) (`project`; transformers' `text_embeds`) when the config has a
        projection, else the (B, D) pooled output itself (transformers' `pooler_output`). token_embeddings: as in
        `forward`."""
        return self._run(input_ids, clip_skip, apply_final_norm, pooled=True, token_embeddings=token_embeddings)

    def _run(
        self, input_ids: Tensor, clip_skip: int | None, apply_final_norm: bool | None, pooled: bool,
        token_embeddings: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The readout (and the pooled embedding when `pooled`, which runs every layer) for forward and encode."""
        clip_skip = check_int("clip_skip", self.config.clip_skip if clip_skip is None else clip_skip,
                              1, len(self.layers))
        apply_final_norm = check_bool("apply_final_norm",
                                      self.config.apply_final_norm if apply_final_norm is None else apply_final_norm)
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be a (B, L) integer tensor, got shape {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        L = input_ids.shape[1]
        if L > self.config.max_positions:
            raise ValueError(f"input_ids has {L} tokens; this text encoder takes at most {self.config.max_positions}")
        if token_embeddings is None:
            token_embeddings = self.token_embedding(input_ids)  # (B, L, D)
        elif token_embeddings.shape != (*input_ids.shape, self.config.width):
            raise ValueError(f"token_embeddings must be (B, L, D) = {(*input_ids.shape, self.config.width)} for these "
                             f"input_ids, got {tuple(token_embeddings.shape)}")
        readout_depth = len(self.layers) - clip_skip + 1  # layers run before the readout
        x = token_embeddings + self.position_embedding[:L]  # (B, L, D)
        for depth, layer in enumerate(self.layers[: len(self.layers) if pooled else readout_depth], start=1):
            x = layer(x)
            if depth == readout_depth:
                hidden = self.final_norm(x) if apply_final_norm else x  # (B, L, D)
        if not pooled:
            return hidden, None
        # LayerNorm acts per token, so normalising the end token alone equals pooling the normalised sequence
        embedding = self.final_norm(self.pool(x, input_ids))  # (B, D)
        return hidden, self.project(embedding) if self.config.projection_dim is not None else embedding

    @staticmethod
    def pool(hidden_states: Tensor, input_ids: Tensor) -> Tensor:
        """(B, L, D) hidden states -> (B, D) at each sequence's end token, found as the first
        position of the largest id (CLIP's end token 49407 is the largest id; SD 1.x and SDXL's first
        tokenizer pad with it, SD 2.x and SDXL's second with 0)."""
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


# A single file's text encoder prefixes: SD 1.x / 2.x, and SDXL (base: embedders 0 and 1; refiner: bigG at 0).
_FILE_PREFIXES = {
    "cond_stage_model.": "'cond_stage_model.transformer.' / 'cond_stage_model.model.'",
    "conditioner.": "'conditioner.embedders.N.transformer.' / 'conditioner.embedders.N.model.'",
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
    prefix = "conditioner." if any(k.startswith("conditioner.") for k in unexpected) else "cond_stage_model."
    check_keys(f"text encoder state dict does not match layout {layout!r} for this config", missing, unexpected,
               prefix=prefix, hint=f"strip the {_FILE_PREFIXES[prefix]} prefix first")
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
