"""A whole Stable Diffusion model: the four components, the noise schedule they were trained with, and
what the U-Net predicts.

`ModelConfig` is the one object that travels inside every kedavra checkpoint (as JSON, see
`to_dict` / `from_dict`); `StableDiffusion` holds the components built from it. Families:

    sd15            SD 1.x (CompVis v1-inference.yaml): CLIP ViT-L/14 text encoder, ε-prediction, 512 px
    sd15-inpaint    SD 1.5 inpainting (runwayml): the same with a 9-channel U-Net input
    sd21            SD 2.x 768-v (Stability v2-inference-v.yaml): OpenCLIP ViT-H/14, v-prediction, 768 px
    sd21-base       SD 2.x base (v2-inference.yaml): the same architecture, ε-prediction, 512 px
    sd21-inpaint    SD 2 inpainting (512-inpainting-ema): ε-prediction, 9-channel input, 512 px
    tiny            small components that fit together (text width = U-Net context width), SD 1.x style,
                    for tests and CPU training
    tiny-inpaint    tiny with the 9-channel inpainting U-Net input
    small           tiny's text encoder and VAE with a wider, three-level U-Net (48 channels, attention at the
                    8x8 and 4x4 latents, so every pixel sees the whole image): the embedded default's shape
    tiny-sd2        tiny with SD 2.x traits (exact-GELU text encoder stored in OpenCLIP layout, Linear
                    transformer projections, 16-wide heads, zero-padded prompts, v-prediction)

The text side is CLIP's (BPE tokenizer + CLIP text transformer) in every family; `with_minilm_text_encoder`
swaps in the frozen pretrained MiniLM sentence encoder and its WordPiece tokenizer (kedavra.networks.minilm,
kedavra.networks.wordpiece) and widens the U-Net's cross-attention context to its 384 dimensions. Those sections of the
config carry `kind` ("minilm", "wordpiece"); CLIP's carry none, so every older checkpoint reads as before.
"""

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from torch import nn

from kedavra.diffusion import forward_process
from kedavra.diffusion.schedule import NoiseSchedule, get_schedule
from kedavra.diffusion.timesteps import SPACINGS, TIMESTEP_RULES
from kedavra.networks.minilm import MiniLMConfig, MiniLMEncoder
from kedavra.networks.text_encoder import TextEncoder, TextEncoderConfig
from kedavra.networks.tokenizer import Tokenizer, TokenizerConfig
from kedavra.networks.unet import UNet
from kedavra.networks.unet_config import INPAINT_IN_CHANNELS, UNetConfig
from kedavra.networks.vae import AutoencoderKL, VAEConfig, get_vae_config
from kedavra.networks.wordpiece import WordPieceConfig, WordPieceTokenizer
from kedavra.validation import check_int

SDXL_LATENT_SCALE = 0.13025  # SGM sd_xl_base.yaml scale_factor; diffusers' SDXL vae/config.json scaling_factor
# What a ModelConfig's U-Net may be trained to output: the noise ε (DDPM) or v (Salimans & Ho 2022, eq. 7), as SD 1.x
# and 2.x ship. The samplers also drive x0-predicting denoisers (forward_process.PREDICTION_TYPES); no SD U-Net is one.
UNET_PREDICTION_TYPES = tuple(kind for kind in forward_process.PREDICTION_TYPES if kind != "x0")
COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "schedule")
_COMPONENT_TYPES = {
    "tokenizer": (TokenizerConfig, WordPieceConfig),
    "text_encoder": (TextEncoderConfig, MiniLMConfig),
    "unet": UNetConfig,
    "vae": VAEConfig,
    "schedule": NoiseSchedule,
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model and sample from it the way it was trained.

    spacing / steps_offset: the default timestep plan for samplers (diffusers' `timestep_spacing` and
    `steps_offset`; SD ships "leading" with offset 1). image_size: the default output side in pixels.
    sampler / timestep_rules / set_alpha_to_one: the sampling a diffusers folder ships in its scheduler config
    (kedavra.checkpoint.scheduler_config): the sampler a request without one runs (kedavra's name; None: the
    request's default), "diffusers" to build every sampler's timesteps by diffusers' rules for that config
    (kedavra.diffusion.timesteps.TIMESTEP_RULES), and where DDIM / PNDM end (ᾱ = 1, or ᾱ_0 when False).
    """

    family: str
    tokenizer: TokenizerConfig | WordPieceConfig
    text_encoder: TextEncoderConfig | MiniLMConfig
    unet: UNetConfig
    vae: VAEConfig
    schedule: NoiseSchedule
    prediction_type: str = "eps"
    image_size: int = 512
    spacing: str = "leading"
    steps_offset: int = 1
    sampler: str | None = None
    timestep_rules: str = "kedavra"
    set_alpha_to_one: bool = True
    # SDXL (Podell et al. 2023, sec. 2.1): a second tokenizer and text encoder (OpenCLIP ViT-bigG) whose token
    # states are concatenated to the first's; the last encoder's pooled, projected embedding conditions the U-Net's
    # added embedding. None for SD 1.x / 2.x and for the SDXL refiner, which has bigG alone as `text_encoder`.
    tokenizer_2: TokenizerConfig | None = None
    text_encoder_2: TextEncoderConfig | None = None

    def __post_init__(self):
        if not isinstance(self.family, str) or not self.family:
            raise ValueError(f"ModelConfig.family must be a non-empty str, got {self.family!r}")
        for name, kinds in _COMPONENT_TYPES.items():
            kinds = kinds if isinstance(kinds, tuple) else (kinds,)
            if not isinstance(getattr(self, name), kinds):
                allowed = " or ".join(kind.__name__ for kind in kinds)
                raise ValueError(f"ModelConfig.{name} must be a {allowed}, got {type(getattr(self, name)).__name__}")
        if self.prediction_type not in UNET_PREDICTION_TYPES:
            raise ValueError(
                f"ModelConfig.prediction_type must be one of {UNET_PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if self.spacing not in SPACINGS:
            raise ValueError(f"ModelConfig.spacing must be one of {SPACINGS}, got {self.spacing!r}")
        check_int("ModelConfig.steps_offset", self.steps_offset, low=0)
        if self.sampler is not None and (not isinstance(self.sampler, str) or not self.sampler):
            raise ValueError(f"ModelConfig.sampler must be a sampler name or None, got {self.sampler!r}")
        if self.timestep_rules not in TIMESTEP_RULES:
            raise ValueError(f"ModelConfig.timestep_rules must be one of {TIMESTEP_RULES}, got {self.timestep_rules!r}")
        if not isinstance(self.set_alpha_to_one, bool):
            raise ValueError(f"ModelConfig.set_alpha_to_one must be a bool, got {self.set_alpha_to_one!r}")
        text, unet, vae = self.text_encoder, self.unet, self.vae
        if (self.tokenizer_2 is None) != (self.text_encoder_2 is None):
            raise ValueError("ModelConfig.tokenizer_2 and text_encoder_2 come together: give both or neither")
        for name, kind in (("tokenizer_2", TokenizerConfig), ("text_encoder_2", TextEncoderConfig)):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), kind):
                raise ValueError(f"ModelConfig.{name} must be a {kind.__name__} or None, "
                                 f"got {type(getattr(self, name)).__name__}")
        if sum(encoder.width for encoder in self.text_encoders) != unet.context_dim:
            widths = " + ".join(str(encoder.width) for encoder in self.text_encoders)
            raise ValueError(
                f"text encoder width {widths} must equal the U-Net's context_dim {unet.context_dim} "
                "(the U-Net cross-attends to the text encoders' outputs, concatenated)"
            )
        if unet.addition_embed_input_dim is not None:
            pooled = self.text_encoders[-1].projection_dim
            extra = unet.addition_embed_input_dim - (pooled or 0)
            if pooled is None or extra <= 0 or extra % unet.addition_time_embed_dim:
                raise ValueError(
                    f"the U-Net's added embedding takes {unet.addition_embed_input_dim} features: the last text "
                    f"encoder's pooled projection ({pooled}) plus whole micro-conditioning values of "
                    f"{unet.addition_time_embed_dim} each (SDXL: 6, the refiner 5)"
                )
        if isinstance(text, MiniLMConfig) != isinstance(self.tokenizer, WordPieceConfig):
            raise ValueError(
                f"text encoder {type(text).__name__} does not fit tokenizer {type(self.tokenizer).__name__}: CLIP's "
                "text encoder reads CLIP's BPE ids (TokenizerConfig), MiniLM reads WordPiece ids (WordPieceConfig)"
            )
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            if encoder.vocab_size != tokenizer.vocab_size or encoder.max_positions < tokenizer.max_length:
                raise ValueError(
                    f"text encoder (vocab_size={encoder.vocab_size}, max_positions={encoder.max_positions}) does not "
                    f"fit the tokenizer (vocabulary {tokenizer.vocab_size}, max_length {tokenizer.max_length})"
                )
        allowed_inputs = (vae.latent_channels, 2 * vae.latent_channels + 1)  # plain, or inpainting
        if unet.in_channels not in allowed_inputs or unet.out_channels != vae.latent_channels:
            raise ValueError(
                f"U-Net in/out channels {unet.in_channels}/{unet.out_channels} do not fit the VAE's "
                f"{vae.latent_channels} latent channels (in must be one of {allowed_inputs}, out {vae.latent_channels})"
            )
        multiple = vae.downsample_factor * unet.downsample_factor
        if not isinstance(self.image_size, int) or self.image_size < multiple or self.image_size % multiple:
            raise ValueError(
                f"ModelConfig.image_size must be a positive multiple of {multiple}, got {self.image_size!r}"
            )

    @property
    def text_encoders(self) -> tuple[TextEncoderConfig | MiniLMConfig, ...]:
        """The text encoders whose token states the U-Net reads, concatenated in this order."""
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    @property
    def tokenizers(self) -> tuple[TokenizerConfig | WordPieceConfig, ...]:
        """The tokenizers of `text_encoders`, in the same order."""
        return (self.tokenizer,) if self.tokenizer_2 is None else (self.tokenizer, self.tokenizer_2)

    @property
    def micro_conditioning(self) -> int:
        """How many numbers SDXL's added embedding takes besides the pooled text (Podell et al. 2023, sec. 2.2):
        6 for the base (original size, crop top-left, target size), 5 for the refiner (original size, crop
        top-left, aesthetic score), 0 without an added embedding."""
        unet = self.unet
        if unet.addition_embed_input_dim is None:
            return 0
        return (unet.addition_embed_input_dim - self.text_encoders[-1].projection_dim) // unet.addition_time_embed_dim

    @property
    def inpainting(self) -> bool:
        """True when the U-Net also takes the masked image's latents and the mask (9 input channels for SD)."""
        return self.unet.in_channels == 2 * self.vae.latent_channels + 1

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model family {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[name]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists); `from_dict` inverts it exactly."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Rebuild a config from `to_dict` output (or its JSON round trip). Unknown keys are an error;
        component fields left out take their dataclass defaults."""
        if not isinstance(data, dict):
            raise ValueError(f"ModelConfig.from_dict needs a dict, got {type(data).__name__}")
        values = _checked_fields(cls, data, "ModelConfig")
        for name in _COMPONENT_TYPES:
            if name not in values:
                raise ValueError(f"ModelConfig dict lacks the {name!r} section")
            section = values[name]
            if not isinstance(section, dict):
                raise ValueError(f"ModelConfig.{name} must be a dict, got {type(section).__name__}")
            kind = _section_type(name, section)
            values[name] = kind(**_checked_fields(kind, section, f"ModelConfig.{name}"))
        for name, kind in (("tokenizer_2", TokenizerConfig), ("text_encoder_2", TextEncoderConfig)):
            section = values.get(name)
            if section is not None:
                if not isinstance(section, dict):
                    raise ValueError(f"ModelConfig.{name} must be a dict or null, got {type(section).__name__}")
                values[name] = kind(**_checked_fields(kind, section, f"ModelConfig.{name}"))
        return cls(**values)

    def _unet_widths(self) -> str:
        """"320x[1, 2, 4, 4]" (base width x multipliers), or the level widths where they are no multiples."""
        unet = self.unet
        if unet.channel_multipliers is None:
            return str(list(unet.level_channels))
        return f"{unet.base_channels}x{list(unet.channel_multipliers)}"

    def describe(self) -> str:
        """One line: family, prediction type, sizes."""
        return (
            f"{self.family}: {self.prediction_type}-prediction, {self.image_size} px, "
            f"{'MiniLM' if isinstance(self.text_encoder, MiniLMConfig) else 'CLIP'} text encoder "
            f"{' + '.join(f'{text.num_layers}x{text.width}' for text in self.text_encoders)}"
            f"{'' if all(getattr(text, 'causal', True) for text in self.text_encoders) else ' bidirectional'}, "
            f"U-Net {self._unet_widths()} in={self.unet.in_channels}{'+xy' if self.unet.coord_channels else ''} "
            f"context={self.unet.context_dim}, VAE f={self.vae.downsample_factor} scale={self.vae.scaling_factor}, "
            f"{self.schedule.kind} schedule, {self.spacing} spacing offset {self.steps_offset}"
        )


def _section_type(name: str, section: dict[str, Any]) -> type:
    """The config class of a tokenizer or text_encoder section: by its `kind` ("wordpiece", "minilm"); CLIP's
    sections carry none. Other sections have one class."""
    kinds = _COMPONENT_TYPES[name]
    if not isinstance(kinds, tuple):
        return kinds
    clip, other = kinds
    if "kind" not in section:
        return clip
    allowed = other.__dataclass_fields__["kind"].default
    if section["kind"] != allowed:
        raise ValueError(f"unknown ModelConfig.{name} kind {section['kind']!r}; allowed: {allowed!r} (or no kind: "
                         "CLIP's)")
    return other


def with_minilm_text_encoder(config: ModelConfig) -> ModelConfig:
    """`config` with the frozen pretrained MiniLM sentence encoder and its WordPiece tokenizer as the text side:
    the U-Net cross-attends to MiniLM's 384-wide token states instead (the rest unchanged)."""
    text = MiniLMConfig()
    return dataclasses.replace(config, family=f"{config.family}-minilm", tokenizer=WordPieceConfig(),
                               text_encoder=text, unet=dataclasses.replace(config.unet, context_dim=text.width))


def make_tokenizer(config: TokenizerConfig | WordPieceConfig) -> Tokenizer | WordPieceTokenizer:
    return WordPieceTokenizer(config) if isinstance(config, WordPieceConfig) else Tokenizer(config)


def make_text_encoder(config: TextEncoderConfig | MiniLMConfig) -> TextEncoder | MiniLMEncoder:
    return MiniLMEncoder(config) if isinstance(config, MiniLMConfig) else TextEncoder(config)


def _checked_fields(kind: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """`data` with unknown keys rejected and lists turned back into tuples where the field is a tuple."""
    fields = {f.name for f in dataclasses.fields(kind) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(kind)
    values = dict(data)
    for name, value in data.items():
        if typing.get_origin(hints[name]) is tuple and isinstance(value, list):
            values[name] = tuple(value)
    return values


def _family(
    name: str, tokenizer: str, text: TextEncoderConfig, unet: str | UNetConfig, vae: str, prediction: str, size: int
) -> ModelConfig:
    return ModelConfig(
        family=name,
        tokenizer=TokenizerConfig.from_preset(tokenizer),
        text_encoder=text,
        unet=UNetConfig.from_preset(unet) if isinstance(unet, str) else unet,
        vae=get_vae_config(vae),
        schedule=get_schedule("sd"),  # every SD 1.x / 2.x model: scaled_linear 0.00085..0.012 over 1000 steps
        prediction_type=prediction,
        image_size=size,
    )


def _sdxl(name: str, unet: str, size: int) -> ModelConfig:
    """SDXL (Podell et al. 2023): CLIP ViT-L and OpenCLIP ViT-bigG read at their penultimate layers, the SDXL VAE's
    latent scale; the refiner has bigG alone. The tiny variant has SDXL's shape at test sizes."""
    tiny = name.startswith("tiny")
    first, second = ("tiny-sdxl-l", "tiny-sdxl-g") if tiny else ("sdxl-l", "sdxl-g")
    vae = get_vae_config("tiny" if tiny else "sd")
    if name.endswith("refiner"):  # bigG alone, as the first (and only) encoder, with OpenCLIP's tokenizer
        text = {"tokenizer": TokenizerConfig.from_preset("sd21"), "text_encoder": TextEncoderConfig.from_preset(second)}
    else:
        text = {"tokenizer": TokenizerConfig.from_preset("sd15"), "text_encoder": TextEncoderConfig.from_preset(first),
                "tokenizer_2": TokenizerConfig.from_preset("sd21"),
                "text_encoder_2": TextEncoderConfig.from_preset(second)}
    return ModelConfig(family=name, **text, unet=UNetConfig.from_preset(unet),
                       vae=dataclasses.replace(vae, scaling_factor=SDXL_LATENT_SCALE), schedule=get_schedule("sd"),
                       prediction_type="eps", image_size=size)


_TEXT_SD15 = TextEncoderConfig.from_preset("sd15")
_TEXT_SD21 = TextEncoderConfig.from_preset("sd21")
_TEXT_TINY = TextEncoderConfig.from_preset("tiny")
TINY_IMAGE_SIZE = 32  # tiny VAE f = 2, so 16 x 16 latents: small enough to train on a CPU
PRESETS: dict[str, ModelConfig] = {
    "sd15": _family("sd15", "sd15", _TEXT_SD15, "sd15", "sd", "eps", 512),
    "sd15-inpaint": _family("sd15-inpaint", "sd15", _TEXT_SD15, "sd15-inpaint", "sd", "eps", 512),
    "sd21": _family("sd21", "sd21", _TEXT_SD21, "sd21", "sd", "v", 768),
    "sd21-base": _family("sd21-base", "sd21", _TEXT_SD21, "sd21", "sd", "eps", 512),
    "sd21-inpaint": _family("sd21-inpaint", "sd21", _TEXT_SD21, "sd21-inpaint", "sd", "eps", 512),
    "tiny": _family("tiny", "sd15", _TEXT_TINY, "tiny", "tiny", "eps", TINY_IMAGE_SIZE),
    "small": _family(
        "small",
        "sd15",
        _TEXT_TINY,
        dataclasses.replace(
            UNetConfig.from_preset("tiny"),
            base_channels=48,
            channel_multipliers=(1, 2, 2),
            attention_per_level=(False, True, True),
        ),
        "tiny",
        "eps",
        TINY_IMAGE_SIZE,
    ),
    "tiny-inpaint": _family(
        "tiny-inpaint",
        "sd15",
        _TEXT_TINY,
        dataclasses.replace(UNetConfig.from_preset("tiny"), in_channels=INPAINT_IN_CHANNELS),
        "tiny",
        "eps",
        TINY_IMAGE_SIZE,
    ),
    "tiny-sd2": _family(
        "tiny-sd2",
        "sd21",
        dataclasses.replace(_TEXT_TINY, activation="gelu"),
        dataclasses.replace(UNetConfig.from_preset("tiny"), num_heads=None, head_dim=16, use_linear_projection=True),
        "tiny",
        "v",
        TINY_IMAGE_SIZE,
    ),
    "sdxl": _sdxl("sdxl", "sdxl", 1024),
    "sdxl-inpaint": _sdxl("sdxl-inpaint", "sdxl-inpaint", 1024),
    "sdxl-refiner": _sdxl("sdxl-refiner", "sdxl-refiner", 1024),
    "tiny-sdxl": _sdxl("tiny-sdxl", "tiny-sdxl", TINY_IMAGE_SIZE),
    "tiny-sdxl-refiner": _sdxl("tiny-sdxl-refiner", "tiny-sdxl-refiner", TINY_IMAGE_SIZE),
}


class StableDiffusion(nn.Module):
    """The components of one model: `.tokenizer`, `.text_encoder`, `.unet`, `.vae`, and `.config`.

    Constructing it initialises the weights at random (for training from scratch); under
    `with torch.device("meta"):` it allocates nothing, which is how the checkpoint loader builds it.
    Its `state_dict()` keys are prefixed "text_encoder.", "unet." and "vae.".
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"StableDiffusion needs a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.tokenizer = make_tokenizer(config.tokenizer)
        self.text_encoder = make_text_encoder(config.text_encoder)
        # SDXL's second tokenizer and encoder (None otherwise): state_dict keys "text_encoder_2."
        self.tokenizer_2 = None if config.tokenizer_2 is None else Tokenizer(config.tokenizer_2)
        self.text_encoder_2 = None if config.text_encoder_2 is None else TextEncoder(config.text_encoder_2)
        self.unet = UNet(config.unet)
        self.vae = AutoencoderKL(config.vae)
        self.source: str | None = None  # set by the checkpoint loader: what was read and what was detected

    def describe(self) -> str:
        """The config in one line, and where the weights came from when they were loaded."""
        lines = [self.config.describe()]
        if self.source:
            lines.append(self.source)
        return "\n".join(lines)
