"""A LoRA file of any format, read into one `LayerUpdate` per named layer.

Formats, told apart by their key names (never the file name), in a .safetensors or a torch .pt / .ckpt / .bin (read
by kedavra.checkpoint's restricted unpickler, so a pickle cannot run code):
  kohya / A1111        `lora_unet_<layer>.lora_down.weight`, `.lora_up.weight`, `.alpha`, LoCon convolutions and
                       `.lora_mid.weight`; `lora_te_` (SD 1.x / 2.x), `lora_te1_` / `lora_te2_` (SDXL's two encoders)
  LyCORIS              the same layer names with LoHa `hada_*`, LoKr `lokr_*`, full `diff` / `diff_b`, DoRA `dora_scale`
  diffusers / PEFT     dotted names: `unet.<layer>.lora_A.weight` / `.lora_B.weight` (DoRA: `.lora_magnitude_vector`),
                       `text_encoder.` / `text_encoder_2.` for the encoders; diffusers' older `.lora.down.weight` /
                       `.lora.up.weight`; a bare U-Net state dict from peft's get_peft_model_state_dict. No `.alpha`:
                       α / r comes from the peft LoraConfig that diffusers' save_lora_weights / save_lora_adapter
                       write as JSON in the `lora_adapter_metadata` header entry ("unet.lora_alpha",
                       "text_encoder.alpha_pattern", ...; unprefixed for one model), as diffusers' load_lora_weights
                       reads it; a file without it has scale 1 (α = r), as in diffusers
The layer part of each name is resolved against a model by `kedavra.adapters.lora_targets`.

Hashes, as A1111 writes them in "Lora hashes": the file's `sshs_model_hash` metadata when kohya's trainer wrote it,
else the SHA-256 of a .safetensors file's tensor data (the bytes after its JSON header: the "addnet" hash kohya and
A1111 share, unchanged by editing the metadata) or of a torch file's bytes; the short hash is its first 12 digits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from kedavra.adapters.lora_math import KINDS, SHARED_NAMES, TENSOR_NAMES, LayerUpdate
from kedavra.checkpoint.safetensors_io import SAFETENSORS_MAX_HEADER
from kedavra.checkpoint.weights import read_weights
from kedavra.validation import some

FILE_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
SHORT_HASH_LENGTH = 12  # A1111 NetworkOnDisk.shorthash
# Other names for the kohya / LyCORIS tensor names (diffusers / PEFT), renamed on reading.
_ALIASES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale",
    "lora_magnitude_vector.weight": "dora_scale",
}
# LyCORIS / PEFT types kedavra does not apply, by a tensor name that only they have.
_UNSUPPORTED = {
    "oft_blocks": "OFT", "oft_diag": "OFT", "oft_R.weight": "OFT", "boft_R.weight": "BOFT", "on_input": "(IA)³",
    "a1.weight": "GLoRA", "w_norm": "a LyCORIS norm layer", "b_norm": "a LyCORIS norm layer",
    "lora_up.bias": "a LoRA with biases", "lora_B.bias": "a LoRA with biases", "hypernetwork": "a hypernetwork",
}
# PEFT's DoRA magnitude: one value per output channel, (out,) for a Linear and (1, out, 1, 1) for a Conv2d (peft
# tuners/lora/dora.py, _DoraConvNdLayer.get_weight_norm transposes its (out, 1, 1, 1) norm); read as (out,), which
# lora_math.merged_weight applies per output row whatever the layer's shape.
_PEFT_MAGNITUDES = ("lora_magnitude_vector", "lora_magnitude_vector.weight")
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY (loaders/lora_base.py)
_COMPONENT_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.")
_SUFFIXES = sorted({*(n for names in TENSOR_NAMES.values() for n in names), *SHARED_NAMES, *_ALIASES,
                    *_UNSUPPORTED}, key=len, reverse=True)


class LoraFileError(ValueError):
    """A file that is not a LoRA kedavra can apply, with the reason and the keys concerned."""


@dataclass(frozen=True, eq=False)
class LoraFile:
    """One adapter file: `updates` maps each layer name as the file writes it (without the tensor suffix) to its
    update; `name` is the file's stem (A1111's name for it in `<lora:NAME:...>` and the infotext)."""

    path: Path
    name: str
    updates: dict[str, LayerUpdate]
    metadata: dict[str, str] = field(default_factory=dict)
    hash: str = ""

    @property
    def short_hash(self) -> str:
        return self.hash[:SHORT_HASH_LENGTH]

    @property
    def kinds(self) -> dict[str, int]:
        """How many layers of each type the file holds, e.g. {"lora": 192}."""
        counts: dict[str, int] = {}
        for update in self.updates.values():
            counts[update.kind] = counts.get(update.kind, 0) + 1
        return counts


def _split(key: str) -> tuple[str, str, str] | None:
    """(layer name, tensor name, the suffix as written) of a key, or None when it ends in no tensor name any format
    uses."""
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            return key[: -len(suffix) - 1], _ALIASES.get(suffix, suffix), suffix
    return None


def _peft_configs(metadata: dict[str, str], path: Path) -> dict[str, dict]:
    """Component ("unet", "text_encoder", "text_encoder_2"; "" for a one-model file) -> the fields of the peft
    LoraConfig diffusers saved for it in the file's `lora_adapter_metadata` ({} without one)."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        fields = json.loads(raw)
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        raise LoraFileError(f"{path}: its {PEFT_METADATA_KEY!r} metadata is not the JSON object diffusers writes")
    configs: dict[str, dict] = {}
    for key, value in fields.items():
        component, _, name = key.rpartition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _peft_alpha(layer: str, rank: int, configs: dict[str, dict]) -> float | None:
    """The α of a diffusers / PEFT LoRA layer from its component's saved LoraConfig, as peft computes the scale:
    alpha_pattern's first key matching the end of the layer name (peft utils.other.get_pattern_key), else
    lora_alpha; with use_rslora the scale is α / √r (Kalajdzievski 2023), written as α √r so that α / r gives it."""
    component, module = next(((p[:-1], layer[len(p):]) for p in _COMPONENT_PREFIXES if layer.startswith(p)),
                             ("", layer))
    config = configs.get(component)
    if not config or "lora_alpha" not in config:
        return None
    patterns = config.get("alpha_pattern") or {}
    key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
    alpha = float(patterns[key] if key is not None else config["lora_alpha"])
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _kind(layer: str, names: set[str], path: Path) -> str:
    """The adapter type of one layer's tensors, or a LoraFileError naming what is wrong with them."""
    unsupported = sorted({_UNSUPPORTED[n] for n in names if n in _UNSUPPORTED})
    if unsupported:
        raise LoraFileError(f"{path}: layer {layer!r} is {unsupported[0]}, which kedavra does not apply (it applies "
                            "LoRA / LoCon, LoHa, LoKr, full and DoRA)")
    kinds = [kind for kind in KINDS if names & set(TENSOR_NAMES[kind])]
    if len(kinds) != 1:
        what = "no update tensors" if not kinds else f"tensors of several types ({', '.join(kinds)})"
        raise LoraFileError(f"{path}: layer {layer!r} has {what}: {sorted(names)}")
    kind = kinds[0]
    needed = {"lora": {"lora_down.weight", "lora_up.weight"},
              "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, "full": set()}.get(kind, set())
    if kind == "lokr":
        needed = {n for n, whole in (("lokr_w1_a", "lokr_w1"), ("lokr_w1_b", "lokr_w1"), ("lokr_w2_a", "lokr_w2"),
                                     ("lokr_w2_b", "lokr_w2")) if whole not in names}
    missing = sorted(needed - names)
    if missing:
        raise LoraFileError(f"{path}: layer {layer!r} ({kind}) lacks {', '.join(missing)}")
    return kind


def read_lora(path: str | os.PathLike, name: str | None = None) -> LoraFile:
    """Read a LoRA / LyCORIS / diffusers-PEFT adapter file (module docstring). A file with keys no adapter format
    has (a whole checkpoint, an embedding) is a LoraFileError naming some of them."""
    path = Path(path)
    if path.is_dir():
        raise LoraFileError(f"{path} is a folder; a LoRA is one file ({', '.join(FILE_SUFFIXES)})")
    weights = read_weights(path)
    groups: dict[str, dict[str, Tensor]] = {}
    stray = []
    for key, tensor in weights.tensors.items():
        split = _split(key)
        if split is None:
            stray.append(key)
            continue
        layer, tensor_name, written = split
        groups.setdefault(layer, {})[tensor_name] = tensor.reshape(-1) if written in _PEFT_MAGNITUDES else tensor
    if stray:
        what = "has no LoRA tensors" if not groups else f"has {len(stray)} keys that belong to no LoRA format"
        raise LoraFileError(f"{path} {what}: {some(sorted(stray))}")
    configs = _peft_configs(weights.metadata, path)
    updates = {}
    for layer, tensors in groups.items():
        kind = _kind(layer, set(tensors), path)
        alpha = tensors.pop("alpha", None)
        update = LayerUpdate(kind, tensors, None if alpha is None else float(alpha.float().reshape(-1)[0]))
        if alpha is None and kind == "lora" and configs:
            update = LayerUpdate(kind, tensors, _peft_alpha(layer, update.rank, configs))
        updates[layer] = update
    return LoraFile(path, name or path.stem, updates, dict(weights.metadata),
                    weights.metadata.get("sshs_model_hash") or file_hash(path))


def file_hash(path: Path) -> str:
    """A1111's hash of an adapter file (module docstring): SHA-256 of a .safetensors file's tensor data, or of the
    whole file otherwise."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8 and f.read(1) == b"{":  # safetensors: u64 header length, then the JSON header
            f.seek(8 + struct.unpack("<Q", head)[0])
        else:
            f.seek(0)
        return hashlib.file_digest(f, "sha256").hexdigest()  # from the current position to the end


def file_metadata(path: Path) -> dict[str, str]:
    """The metadata of a .safetensors file's header (kohya's ss_* training settings), read without the tensors; {}
    for other containers or a header that cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return {}
            size = struct.unpack("<Q", head)[0]
            if size > SAFETENSORS_MAX_HEADER:
                return {}
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def find_loras(directory: str | os.PathLike) -> dict[str, Path]:
    """Name (file stem) -> file of every adapter file under `directory` and its subfolders, as A1111's Lora folder
    lists them; two files of one name are an error naming both."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"LoRA directory {str(directory)!r} does not exist or is not a folder")
    found: dict[str, Path] = {}
    for file in sorted(directory.rglob("*")):
        if file.suffix.lower() not in FILE_SUFFIXES or not file.is_file():
            continue
        if file.stem in found:
            raise ValueError(f"two LoRA files are named {file.stem!r}: {found[file.stem]} and {file}; rename one")
        found[file.stem] = file
    return found


def locate_lora(lora: str | os.PathLike, directory: str | os.PathLike | None) -> Path:
    """The file a LoRA argument means: a path to a file, else a name (file stem) in `directory`; a
    FileNotFoundError saying what was looked for and what is there."""
    path = Path(lora).expanduser()
    if path.is_file():
        return path
    if directory is None:
        raise FileNotFoundError(f"LoRA {str(lora)!r}: no such file, and no LoRA folder is set to find it by name "
                                "(lora_dir, --lora-dir)")
    available = find_loras(directory)
    if str(lora) not in available:
        raise FileNotFoundError(f"LoRA {str(lora)!r}: no such file, and no LoRA of that name in {directory} (there: "
                                f"{', '.join(available) or 'none'})")
    return available[str(lora)]
