"""A diffusers folder's model, as its own configuration files describe it.

    unet/config.json            -> UNetConfig.from_diffusers         (kedavra.networks.unet)
    text_encoder/config.json    -> TextEncoderConfig.from_diffusers  (kedavra.networks.text_encoder)
    text_encoder_2/config.json  -> the same, SDXL's second encoder (the refiner's only one: kedavra's text_encoder)
    vae/config.json             -> VAEConfig.from_diffusers          (kedavra.networks.vae)
    tokenizer/, tokenizer_2/    -> the special and pad tokens (SD 1.x pads with the end token, SD 2.x and SDXL's
                                   second with "!"), the length, and a vocabulary of the model's own (vocab.json,
                                   merges.txt) where it is not CLIP's
    scheduler/                  -> the schedule, ε or v, the spacing (read by sources._diffusers_hints)

Nothing is guessed from the weights: a folder is loaded with the sizes its files give, within SD's block vocabulary,
and a field outside it is refused by name. Where the described architecture is one of kedavra's presets, the model
takes that preset's name (and its tokenizer); otherwise it is named after the folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kedavra.checkpoint.errors import _fail
from kedavra.checkpoint.weights import _read_json
from kedavra.diffusion.schedule import get_schedule
from kedavra.networks.model import PRESETS, ModelConfig
from kedavra.networks.text_encoder import TextEncoderConfig, with_sdxl_readout
from kedavra.networks.tokenizer import NUM_MERGES, TokenizerConfig, load_vocabulary
from kedavra.networks.unet_config import UNetConfig
from kedavra.networks.vae import VAEConfig

TOKENIZER_FILES = ("special_tokens_map.json", "tokenizer_config.json")  # inside tokenizer/ or tokenizer_2/
ZERO_PAD_TOKEN = "!"  # SD 2.x's tokenizer pads with "!", the byte-level BPE's id 0
# transformers' CLIPTokenizer: its special tokens and their defaults, in this order
SPECIAL_DEFAULTS = (("bos", "<|startoftext|>"), ("eos", "<|endoftext|>"), ("unk", "<|endoftext|>"),
                    ("pad", "<|endoftext|>"))
DEFAULT_SCHEDULE = "sd"  # scaled_linear 0.00085..0.012: what an SD folder without scheduler/ was trained with
_READERS = {"unet": UNetConfig.from_diffusers, "text_encoder": TextEncoderConfig.from_diffusers,
            "text_encoder_2": TextEncoderConfig.from_diffusers, "vae": VAEConfig.from_diffusers}


def component_folders(path: Path, index: dict) -> dict[str, str]:
    """kedavra component -> the folder that holds it: text_encoder/, unet/, vae/; SDXL's text_encoder_2/ as
    "text_encoder_2"; the SDXL refiner's text_encoder_2/ alone (model_index.json text_encoder null, or no
    text_encoder/ folder) as kedavra's one "text_encoder"."""
    second = (path / "text_encoder_2").is_dir()
    entry = index.get("text_encoder", ["transformers", "CLIPTextModel"])  # diffusers writes [null, null] for none
    no_first = not (path / "text_encoder").is_dir() or entry is None or entry == [None, None]
    if second and no_first:
        text = {"text_encoder": "text_encoder_2"}
    elif second:
        text = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
    else:
        text = {"text_encoder": "text_encoder"}
    return {**text, "unet": "unet", "vae": "vae"}


def tokenizer_folder(text_folder: str) -> str:
    """The tokenizer folder beside a text encoder's: text_encoder/ -> tokenizer/, text_encoder_2/ -> tokenizer_2/."""
    return text_folder.replace("text_encoder", "tokenizer")


def has_configs(path: Path, folders: dict[str, str]) -> bool:
    """Whether the folder carries every component config this module reads."""
    return all((path / folder / "config.json").is_file() for folder in folders.values())


def described_from(folders: dict[str, str]) -> str:
    """ "unet/, text_encoder/ and vae/ config.json": the files a description is read from."""
    names = [f"{folders[c]}/" for c in ("unet", "text_encoder", "text_encoder_2", "vae") if c in folders]
    return f"{', '.join(names[:-1])} and {names[-1]} config.json"


def described_config(path: Path, folders: dict[str, str]) -> ModelConfig:
    """The ModelConfig that `path`'s component config.json files describe (`folders` from component_folders), with
    SD's schedule and ε-prediction until the scheduler's settings are applied (sources._diffusers_hints reads them).
    A U-Net with SDXL's added text_time embedding reads every text encoder as SDXL does (`with_sdxl_readout`)."""
    parts, raw = {}, {}
    for name, folder in folders.items():
        file = path / folder / "config.json"
        raw[name] = _read_json(file)
        try:
            parts[name] = _READERS[name](raw[name])
        except ValueError as error:
            raise _fail(file, f"{error}; kedavra runs SD's architecture family only") from None
    if parts["unet"].addition_embed_input_dim is not None:  # SDXL: penultimate layer, no final LayerNorm
        for name in ("text_encoder", "text_encoder_2"):
            if name in parts:
                parts[name] = with_sdxl_readout(parts[name])
    described = (parts["text_encoder"], parts.get("text_encoder_2"), parts["vae"])
    preset = next((p for p in PRESETS.values() if same_architecture(p.unet, parts["unet"])
                   and (p.text_encoder, p.text_encoder_2, p.vae) == described), None)
    if preset is not None:  # the preset's own spelling of the same network, so the config equals the preset's
        parts["unet"] = preset.unet
    tokenizers = {}
    for name, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if name in parts:
            described_tokenizer = _tokenizer(path / tokenizer_folder(folders[name]), parts[name])
            own = described_tokenizer.tokens is not None
            tokenizers[name] = getattr(preset, tokenizer) if preset is not None and not own else described_tokenizer
    sample_size = raw["unet"].get("sample_size")
    factor = parts["vae"].downsample_factor
    image_size = sample_size * factor if isinstance(sample_size, int) and sample_size > 0 else None
    try:
        config = ModelConfig(
            family=preset.family if preset is not None else path.name or "diffusers",
            tokenizer=tokenizers["text_encoder"], text_encoder=parts["text_encoder"], unet=parts["unet"],
            vae=parts["vae"], schedule=get_schedule(DEFAULT_SCHEDULE), prediction_type="eps",
            image_size=image_size or (preset.image_size if preset is not None else 512),
            tokenizer_2=tokenizers.get("text_encoder_2"), text_encoder_2=parts.get("text_encoder_2"),
        )
    except ValueError as error:
        raise _fail(path, f"its component configs do not fit together: {error}") from None
    return config


def same_architecture(a: UNetConfig, b: UNetConfig) -> bool:
    """Whether two U-Net configs build the same network: equal, or equal but for how the heads are given (a head
    count or a head width) with the same (heads, head width) at every level that attends."""
    if a == b:
        return True
    try:
        if dataclasses.replace(a, num_heads=b.num_heads, head_dim=b.head_dim) != b:
            return False
    except ValueError:  # b's heads do not divide a's widths: another network
        return False
    return all(a.level_heads(level) == b.level_heads(level) for level in a.attention_levels)


def _tokenizer(folder: Path, text: TextEncoderConfig) -> TokenizerConfig:
    """CLIP's tokenizer as a tokenizer folder's files describe it: transformers' CLIPTokenizer (which diffusers
    runs for every SD) with the special tokens, pad token, length and vocabulary they name (`own_vocabulary`).
    Without them, as SD 1.x (OpenAI CLIP text encoders) or SD 2.x (OpenCLIP) ran it; SDXL's tokenizer_2 pads with
    "!" like SD 2.x's."""
    settings = _special_tokens(folder)
    vocabulary = own_vocabulary(folder)
    if not settings and vocabulary is None:
        return TokenizerConfig.from_preset("sd15" if text.activation == "quick_gelu" else "sd21")
    bos, eos, unk, pad = (settings.get(f"{name}_token", default) for name, default in SPECIAL_DEFAULTS)
    if vocabulary is None and (bos, eos, unk) != tuple(default for _, default in SPECIAL_DEFAULTS[:3]):
        raise _fail(folder, f"start, end and unknown tokens {bos!r}, {eos!r}, {unk!r} are not CLIP's; kedavra reads "
                            "them with its vendored CLIP vocabulary only as CLIP names them")
    if pad not in (eos, ZERO_PAD_TOKEN):
        raise _fail(folder, f"pad token {pad!r} is not supported; allowed: the end token {eos!r} (SD 1.x) or "
                            f"{ZERO_PAD_TOKEN!r} (SD 2.x, SDXL's second tokenizer)")
    fields = dict(pad_with="zero" if pad == ZERO_PAD_TOKEN and pad != eos else "eos", special_text=(bos, eos))
    length = settings.get("model_max_length")
    if isinstance(length, int) and not isinstance(length, bool) and 2 <= length <= text.max_positions:
        fields["max_length"] = length  # else transformers' "no limit" sentinel or a bad value: CLIP's 77
    if vocabulary is not None:
        fields |= dict(tokens=vocabulary[0], merges=vocabulary[1], unknown=unk)
    try:
        return dataclasses.replace(TokenizerConfig.from_preset("sd15"), **fields)
    except ValueError as error:
        raise _fail(folder, str(error)) from None


def _special_tokens(folder: Path) -> dict:
    """The settings of special_tokens_map.json and tokenizer_config.json (the latter wins), special tokens as text."""
    settings: dict = {}
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            settings |= _read_json(folder / name)
    for key, value in settings.items():
        if key.endswith("_token") and isinstance(value, dict):
            settings[key] = value.get("content")
    for key, _ in SPECIAL_DEFAULTS:
        value = settings.get(f"{key}_token")
        if value is not None and (not isinstance(value, str) or not value):
            raise _fail(folder, f"{key}_token must be a non-empty string, got {value!r}")
    added = settings.get("added_tokens_decoder") or {}
    extra = sorted(v.get("content") for v in added.values() if isinstance(v, dict)
                   and v.get("content") not in {settings.get(f"{key}_token", d) for key, d in SPECIAL_DEFAULTS})
    if extra:
        raise _fail(folder, f"added tokens {extra} are not supported; load a textual-inversion embedding for a new "
                            "word instead (kedavra generate --embedding)")
    return settings


def own_vocabulary(folder: Path) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(tokens by id, merges in rank order) of a tokenizer folder's vocab.json and merges.txt (or its tokenizer.json's
    BPE model), None when there are none or they are CLIP's, which kedavra ships."""
    vocab_file, merges_file, joint = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
    clip = load_vocabulary()
    if vocab_file.is_file() != merges_file.is_file():
        if vocab_file.is_file() and _read_json(vocab_file) == clip.ids:
            return None  # CLIP's tokens, merges left out: CLIP's
        missing = merges_file if vocab_file.is_file() else vocab_file
        raise _fail(missing, "missing: a BPE vocabulary of the model's own needs both vocab.json and merges.txt")
    if vocab_file.is_file():
        vocab = _read_json(vocab_file)
        try:
            lines = merges_file.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as error:
            raise _fail(merges_file, f"unreadable ({error})") from None
        merges = [line for i, line in enumerate(lines) if line and not (i == 0 and line.startswith("#version"))]
        where = vocab_file
    elif joint.is_file():
        model = _read_json(joint).get("model")
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise _fail(joint, f"the tokenizer's model is {model.get('type') if isinstance(model, dict) else model!r}"
                               "; kedavra reads CLIP's byte-level BPE only")
        vocab, merges, where = model.get("vocab"), model.get("merges"), joint
        merges = [" ".join(m) if isinstance(m, list) else m for m in merges or ()]
    else:
        return None
    if not isinstance(vocab, dict) or sorted(vocab.values()) != list(range(len(vocab))):
        raise _fail(where, "the vocabulary must map tokens to the ids 0..N-1, each once")
    tokens = tuple(sorted(vocab, key=vocab.__getitem__))
    if tokens == clip.tokens and merges[:NUM_MERGES] == [" ".join(p) for p in clip.merge_ranks]:
        return None  # CLIP's own vocabulary (CLIPTokenizer reads at most NUM_MERGES merges)
    return tokens, tuple(merges)
