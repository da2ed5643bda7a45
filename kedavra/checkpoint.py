"""Checkpoints: load the Stable Diffusion weights people have into kedavra's models; save kedavra's own.

    from kedavra.checkpoint import load_model, save_model
    model = load_model("v1-5-pruned-emaonly.safetensors")   # a kedavra.model.StableDiffusion
    print(model.describe())                                  # what was read and what was detected
    save_model(model, "mine.safetensors")                    # kedavra's format: weights + ModelConfig JSON

Formats, told apart by content, never by file name:
  original single file  the CompVis / Stability state dict (`model.diffusion_model.*`, `first_stage_model.*`,
                        `cond_stage_model.*`) in a .safetensors, or in a torch .ckpt/.pt (zip or legacy pickle)
  diffusers folder      model_index.json, unet/, vae/, text_encoder/ (.safetensors or .bin, sharded or not),
                        scheduler/scheduler_config.json; tokenizer/ is only checked (kedavra vendors CLIP's BPE)
  kedavra               one .safetensors, kedavra's parameter names, the ModelConfig JSON in the header metadata

Family detection (docs/checkpoints.md has the table): the text encoder's layout (OpenAI CLIP
`cond_stage_model.transformer.*` for SD 1.x, OpenCLIP `cond_stage_model.model.*` for SD 2.x), the U-Net's
cross-attention width (attn2.to_k weight: (C, 768) or (C, 1024)), its first conv's input channels (9: inpainting)
and whether its transformer projections are Linear (SD 2.x) pick the preset. ε or v cannot be read off the
weights; in order of trust: the `prediction_type` argument, the diffusers scheduler config, the file's metadata
(`modelspec.prediction_type`, kohya's `ss_v_parameterization`), and, only where the candidate families disagree
(SD 2.x 768-v and 512-base share one architecture), a probe of the U-Net (`probe_prediction_type`).

Memory: the model is built on the meta device and receives the file's tensors with load_state_dict(assign=True).
A .safetensors file is memory-mapped copy-on-write: where the file's dtype is the model's, parameters alias the
file's pages (no copy at all); where it is not, tensors are converted one at a time and the consumed pages are
dropped with madvise(MADV_DONTNEED), so fp16 file -> fp32 model peaks near the fp32 size. torch files are read
with torch.load(mmap=True); their mapped pages cannot be dropped early (up to 1.5x for a dtype conversion).

Security: a .ckpt is a pickle, which can name any Python callable for the loader to run. kedavra reads it only
with torch's restricted unpickler (weights_only=True), which refuses every global outside tensors and plain
containers; a few Lightning / numpy training-bookkeeping classes that real SD 1.x .ckpt files carry are mapped to
an inert stand-in that keeps nothing. A file naming anything else is refused with UnsafeCheckpointError, before
anything from it runs.
"""

import dataclasses
import json
import logging
import math
import mmap
import os
import pickle
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from kedavra.model import PREDICTION_TYPES, PRESETS, ModelConfig, StableDiffusion
from kedavra.schedule import NoiseSchedule
from kedavra.text_encoder import convert_text_encoder_state_dict
from kedavra.tokenizer import VOCAB_SIZE
from kedavra.unet import convert_unet_state_dict
from kedavra.vae import convert_vae_state_dict

logger = logging.getLogger(__name__)

CONFIG_KEY = "kedavra_config"  # safetensors metadata key holding ModelConfig.to_dict() as JSON
FORMAT_KEY = "kedavra_format"  # metadata key holding FORMAT_VERSION
FORMAT_VERSION = "1"
COMPONENTS = ("text_encoder", "unet", "vae")
_CONVERTERS = {
    "text_encoder": convert_text_encoder_state_dict,
    "unet": convert_unet_state_dict,
    "vae": convert_vae_state_dict,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong with it."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint that names code to run; refused without running it."""


def _fail(path: Path, message: str, error: type[CheckpointError] = CheckpointError) -> CheckpointError:
    return error(f"{path}: {message}")


def _some(names, count: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


# ---- safetensors ---------------------------------------------------------------------------------------

# safetensors format (huggingface/safetensors README): u64 little-endian header length N, N bytes of JSON
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the tensor bytes,
# offsets relative to the end of the header, covering the data without holes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers (its MAX_HEADER_SIZE)
_PAGE = mmap.PAGESIZE
_CAN_RELEASE = hasattr(mmap, "MADV_DONTNEED")  # POSIX; elsewhere consumed pages stay until the map is dropped


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """A .safetensors file mapped copy-on-write: `tensor(name)` aliases the file's pages without reading them.

    Writing to a returned tensor copies the touched page privately; the file never changes. `release(t)` drops
    the mapped pages lying wholly inside a tensor that has been copied elsewhere (they are re-read on demand).
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"only {size} bytes: too short for a .safetensors file (8-byte header length)")
            header_size = int.from_bytes(prefix, "little")
            if header_size > SAFETENSORS_MAX_HEADER:
                raise _fail(path, f"corrupt .safetensors: header length {header_size} bytes is implausible")
            if 8 + header_size > size:
                raise _fail(
                    path,
                    f"truncated .safetensors: the header alone should be {header_size} bytes but the file has "
                    f"{size} bytes in all (the download was probably cut off)",
                )
            header_bytes = f.read(header_size)
            try:
                header = json.loads(header_bytes)
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise _fail(path, f"corrupt .safetensors: the header is not valid JSON ({error})") from None
            if not isinstance(header, dict):
                raise _fail(path, "corrupt .safetensors: the header is not a JSON object")
            self.metadata = self._parse_metadata(header.pop("__metadata__", None) or {})
            self.entries = {name: self._parse_entry(name, info) for name, info in header.items()}
            self._data_start = 8 + header_size
            self._check_coverage(size - self._data_start)
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self._base = torch.frombuffer(self._map, dtype=torch.uint8, count=1).data_ptr() if self._map else 0

    def _parse_metadata(self, metadata) -> dict[str, str]:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _fail(self.path, "corrupt .safetensors: __metadata__ must map strings to strings")
        return metadata

    def _parse_entry(self, name: str, info) -> _Entry:
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _fail(self.path, f"corrupt .safetensors header entry for {name!r}: {info!r}") from None
        if not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)):
            raise _fail(self.path, f"corrupt .safetensors header entry for {name!r}: {info!r}")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise _fail(
                self.path,
                f"corrupt .safetensors: tensor {name!r} of shape {list(shape)} {info['dtype']} needs "
                f"{math.prod(shape) * dtype.itemsize} bytes but its offsets span {end - begin}",
            )
        return _Entry(dtype, shape, begin, end)

    def _check_coverage(self, data_size: int) -> None:
        position = 0
        for name, entry in sorted(self.entries.items(), key=lambda item: (item[1].begin, item[1].end)):
            if entry.begin != position:
                raise _fail(
                    self.path,
                    f"corrupt .safetensors: tensor {name!r} starts at byte {entry.begin}, "
                    f"expected {position} (tensors must follow each other without gaps)",
                )
            position = entry.end
        if position > data_size:
            raise _fail(
                self.path,
                f"truncated .safetensors: the header describes {position} bytes of tensor data but the file holds "
                f"only {data_size} (the download was probably cut off; fetch the file again)",
            )
        if position < data_size:
            raise _fail(self.path, f"corrupt .safetensors: {data_size - position} bytes after the last tensor")

    def tensor(self, name: str) -> Tensor:
        entry = self.entries[name]
        if entry.end == entry.begin:
            return torch.empty(entry.shape, dtype=entry.dtype)
        count = (entry.end - entry.begin) // entry.dtype.itemsize
        flat = torch.frombuffer(self._map, dtype=entry.dtype, count=count, offset=self._data_start + entry.begin)
        return flat.view(entry.shape)

    def tensors(self) -> dict[str, Tensor]:
        return {name: self.tensor(name) for name in self.entries}

    def release(self, tensor: Tensor) -> None:
        """Drop the mapped pages wholly inside `tensor`'s bytes (a contiguous view into this file)."""
        if not _CAN_RELEASE or self._map is None or not tensor.is_contiguous():
            return
        start = tensor.data_ptr() - self._base
        stop = start + tensor.numel() * tensor.element_size()
        if start < 0 or stop > len(self._map):
            return  # not a view of this file
        first, last = -(-start // _PAGE) * _PAGE, stop // _PAGE * _PAGE
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
    fill: Callable[[str, Tensor], Tensor] | None = None,
) -> None:
    """Write `tensors` as a .safetensors file, one tensor at a time (never a second copy of them all).

    `fill(name, t)`, if given, produces each tensor's data when it is written; `tensors` then only needs the
    right dtypes and shapes (meta tensors will do). The file is written beside `path` and renamed over it,
    so a model whose weights alias the old file (see SafetensorsFile) keeps reading the old bytes.
    """
    path = Path(path)
    names = sorted(tensors, key=lambda name: -tensors[name].element_size())  # keeps every tensor dtype-aligned
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPE_CODES:
            raise ValueError(f"cannot store {name!r}: dtype {t.dtype} has no safetensors code")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the tensor data starts 8-byte aligned, as the safetensors library writes it
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for name in names:
                t = fill(name, tensors[name]) if fill is not None else tensors[name]
                if t.dtype != tensors[name].dtype or t.shape != tensors[name].shape:
                    raise ValueError(
                        f"{name!r}: fill gave {t.dtype} {tuple(t.shape)}, the header says "
                        f"{tensors[name].dtype} {tuple(tensors[name].shape)}"
                    )
                data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # (nbytes,), no copy on CPU
                f.write(memoryview(data.numpy()))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# ---- torch pickles (.ckpt, .pt, .bin) ---------------------------------------------------------------------


class _Discarded:
    """Inert stand-in for training-bookkeeping objects in pickled checkpoints: takes anything, keeps nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# Globals that real SD 1.x-era .ckpt files name outside their weights (Lightning's checkpoint callback state,
# numpy scalars in it); they are replaced by _Discarded, never imported. Everything else is refused.
DISCARDED_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
)


def _read_torch_file(path: Path, zipped: bool) -> dict[str, Tensor]:
    """The state dict of a torch.save file, read by torch's restricted unpickler (nothing from it is run)."""
    stand_ins = [(_Discarded, name) for name in DISCARDED_GLOBALS]
    try:
        with torch.serialization.safe_globals(stand_ins):
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as error:
        names = _unsafe_globals(path, zipped, error)
        raise _fail(
            path,
            f"refused: this pickled checkpoint contains code references ({_some(names) or error}) that could run "
            "arbitrary code when loaded; kedavra never executes code from a checkpoint. Get a .safetensors "
            "version of the model, or convert this file only if you trust its source",
            UnsafeCheckpointError,
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise _fail(path, f"corrupt or truncated torch checkpoint: {error}") from None
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):  # Lightning: {"state_dict": ...}
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise _fail(path, f"a torch file holding a {type(loaded).__name__}, not a state dict of tensors")
    not_tensors = sorted(k for k, v in loaded.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise _fail(path, f"{len(not_tensors)} entries of the state dict are not tensors: {_some(not_tensors)}")
    return dict(loaded)


def _unsafe_globals(path: Path, zipped: bool, error: Exception) -> list[str]:
    """The globals a pickle names beyond torch's allowlist, found by scanning opcodes (nothing is run)."""
    if zipped:
        try:
            return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in DISCARDED_GLOBALS]
        except Exception:  # the scan only improves the message; the refusal stands regardless
            pass
    return re.findall(r"GLOBAL ([\w.]+)", str(error))


# ---- reading any weights file ------------------------------------------------------------------------------


@dataclass
class _Weights:
    tensors: dict[str, Tensor]
    container: str  # "safetensors", "torch zip", "torch pickle"
    files: list[SafetensorsFile] = field(default_factory=list)  # the mapped files the tensors alias
    metadata: dict[str, str] = field(default_factory=dict)


_FOREIGN_FILES = (  # leading bytes -> what the file is
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"<!DOCTYPE html", "an HTML page (a download link that returned a web page?)"),
    (b"<html", "an HTML page (a download link that returned a web page?)"),
)
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _read_weights(path: Path) -> _Weights:
    """Open one weights file, whatever its container, after checking what the bytes actually are."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    size = path.stat().st_size
    if size == 0:
        raise _fail(path, "empty file, not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_LFS_POINTER):
        raise _fail(
            path,
            "a Git LFS pointer file, not the weights: the repository was cloned without LFS. Run `git lfs pull` "
            "in it (or download the file itself) to fetch the real file",
        )
    if head.startswith(b"PK\x03\x04"):
        return _Weights(_read_torch_file(path, zipped=True), "torch zip")
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode: a legacy (pre-zip) torch.save file
        return _Weights(_read_torch_file(path, zipped=False), "torch pickle")
    if len(head) > 8 and head[8:9] == b"{":
        file = SafetensorsFile(path)
        return _Weights(file.tensors(), "safetensors", [file], file.metadata)
    for magic, what in _FOREIGN_FILES:
        if head.lstrip().startswith(magic):
            raise _fail(path, f"{what}, not a checkpoint")
    kind = "a text file" if _is_text(head) else f"unrecognised content (first bytes {head[:16]!r})"
    raise _fail(
        path, f"not a checkpoint: {kind}; kedavra reads .safetensors, torch .ckpt/.pt/.bin and diffusers folders"
    )


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(path, f"unreadable JSON ({error})") from None
    if not isinstance(data, dict):
        raise _fail(path, "expected a JSON object")
    return data


# ---- checkpoint sources -------------------------------------------------------------------------------------


@dataclass
class _Hints:
    """What a checkpoint says about itself beyond its weights; each value with where it came from."""

    config: ModelConfig | None = None  # kedavra's own format
    prediction_type: tuple[str, str] | None = None
    schedule: tuple[NoiseSchedule, str] | None = None
    betas: Tensor | None = None  # an original file's DDPM betas buffer, matched against known schedules
    spacing: tuple[str, int, str] | None = None  # (spacing, steps_offset, source)
    image_size: tuple[int, str] | None = None
    scaling_factor: tuple[float, str] | None = None
    text_style: str | None = None  # "clip" (OpenAI CLIP, quick GELU) or "openclip" (exact GELU)


@dataclass
class _Source:
    path: Path
    kind: str  # "original single file", "diffusers folder", "kedavra"
    parts: dict[str, tuple[str, dict[str, Tensor]]]  # component -> (layout, state with the prefix stripped)
    files: list[SafetensorsFile] = field(default_factory=list)
    containers: set[str] = field(default_factory=set)
    hints: _Hints = field(default_factory=_Hints)
    notes: list[str] = field(default_factory=list)

    def file_dtypes(self) -> str:
        counts = Counter(
            str(t.dtype).removeprefix("torch.") for _, state in self.parts.values() for t in state.values()
        )
        return ", ".join(f"{n} {dtype}" for dtype, n in counts.most_common())


# Original single-file prefixes -> (component, layout for the component's converter).
ORIGINAL_PREFIXES = {
    "model.diffusion_model.": ("unet", "ldm"),
    "first_stage_model.": ("vae", "ldm"),
    "cond_stage_model.transformer.": ("text_encoder", "ldm_sd1"),
    "cond_stage_model.model.": ("text_encoder", "ldm_sd2"),
}
# LDM's DDPM buffers (ldm/models/diffusion/ddpm.py register_schedule): functions of the noise schedule.
ORIGINAL_SCHEDULE_BUFFERS = frozenset(
    (
        "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod "
        "log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod posterior_variance "
        "posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2 logvar lvlb_weights"
    ).split()
)
EMA_PREFIX = "model_ema."  # LitEma: model_ema.decay, model_ema.num_updates and, in full files, EMA U-Net copies
# Key prefixes of files that are not a whole SD 1.x / 2.x model -> what they are.
FOREIGN_KEYS = (
    ("conditioner.embedders.", "an SDXL (SGM-format) checkpoint; kedavra supports SD 1.x and 2.x"),
    ("lora_unet_", "a LoRA, not a whole model"),
    ("lora_te_", "a LoRA, not a whole model"),
    ("control_model.", "a ControlNet, not a whole model"),
    ("string_to_param", "a textual-inversion embedding, not a whole model"),
    ("emb_params", "a textual-inversion embedding, not a whole model"),
    ("encoder.conv_in.", "a standalone VAE, not a whole model"),
    ("conv_in.", "a single diffusers component (U-Net or VAE), not a whole model"),
    ("text_model.", "a standalone text encoder, not a whole model"),
)
_EXPECTED_ORIGINAL = (
    "model.diffusion_model.* (U-Net), first_stage_model.* (VAE) and cond_stage_model.transformer.* (SD 1.x) "
    "or cond_stage_model.model.* (SD 2.x), e.g. model.diffusion_model.input_blocks.0.0.weight"
)


def _open(path: Path) -> _Source:
    if path.is_dir():
        return _open_diffusers(path)
    weights = _read_weights(path)
    if CONFIG_KEY in weights.metadata:
        return _open_kedavra(path, weights)
    return _open_original(path, weights)


def _open_kedavra(path: Path, weights: _Weights) -> _Source:
    try:
        config = ModelConfig.from_dict(json.loads(weights.metadata[CONFIG_KEY]))
    except (ValueError, TypeError) as error:
        raise _fail(path, f"kedavra checkpoint with an invalid config in its metadata: {error}") from None
    parts: dict[str, tuple[str, dict[str, Tensor]]] = {name: ("kedavra", {}) for name in COMPONENTS}
    stray = []
    for key, tensor in weights.tensors.items():
        component, _, rest = key.partition(".")
        if component in parts:
            parts[component][1][rest] = tensor
        else:
            stray.append(key)
    if stray:
        raise _fail(path, f"{len(stray)} unexpected keys in a kedavra checkpoint: {_some(stray)}")
    source = _Source(path, "kedavra", parts, weights.files, {weights.container})
    source.hints.config = config
    return source


def _open_original(path: Path, weights: _Weights) -> _Source:
    parts: dict[str, tuple[str, dict[str, Tensor]]] = {}
    ignored, unknown = [], []
    for key, tensor in weights.tensors.items():
        prefix = next((p for p in ORIGINAL_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            component, layout = ORIGINAL_PREFIXES[prefix]
            previous = parts.setdefault(component, (layout, {}))
            if previous[0] != layout:
                raise _fail(
                    path,
                    "holds both an SD 1.x (cond_stage_model.transformer.*) and an SD 2.x "
                    "(cond_stage_model.model.*) text encoder",
                )
            previous[1][key[len(prefix) :]] = tensor
        elif key in ORIGINAL_SCHEDULE_BUFFERS or key.startswith(EMA_PREFIX):
            ignored.append(key)
        else:
            unknown.append(key)
    if "unet" not in parts or unknown:
        keys = unknown or sorted(weights.tensors)
        foreign = next((what for prefix, what in FOREIGN_KEYS if any(k.startswith(prefix) for k in keys)), None)
        if foreign:
            raise _fail(
                path, f"this looks like {foreign} (keys such as {_some(keys, 3)}); expected {_EXPECTED_ORIGINAL}"
            )
    if "unet" not in parts:
        found = f"{len(weights.tensors)} keys such as {_some(sorted(weights.tensors), 3)}"
        raise _fail(path, f"unknown architecture: no U-Net weights ({found}); expected {_EXPECTED_ORIGINAL}")
    if unknown:
        raise _fail(
            path,
            f"{len(unknown)} unexpected keys outside the parts of an SD 1.x / 2.x checkpoint: "
            f"{_some(sorted(unknown))}; expected only {_EXPECTED_ORIGINAL}",
        )
    missing = [
        name
        for name, what in (("vae", "first_stage_model.* (VAE)"), ("text_encoder", "cond_stage_model.* (text encoder)"))
        if name not in parts
    ]
    if missing:
        raise _fail(
            path, f"incomplete checkpoint: no {' and no '.join(missing)} weights; expected {_EXPECTED_ORIGINAL}"
        )
    source = _Source(path, "original single file", parts, weights.files, {weights.container})
    source.hints.text_style = "clip" if parts["text_encoder"][0] == "ldm_sd1" else "openclip"
    ema = sum(k.startswith(EMA_PREFIX + "diffusion_model") for k in ignored)
    if ema:
        source.notes.append(
            f"the file also holds {ema} EMA U-Net tensors (model_ema.*); the non-EMA weights were "
            "loaded, as diffusers and the original v1-inference.yaml (use_ema: False) do"
        )
    if ignored:
        source.notes.append(f"ignored {len(ignored)} keys: DDPM schedule buffers and EMA bookkeeping")
    _metadata_hints(source, weights.metadata)
    if "betas" in weights.tensors:
        source.hints.betas = weights.tensors["betas"]
    return source


def _metadata_hints(source: _Source, metadata: Mapping[str, str]) -> None:
    """Prediction type and resolution from Stability's ModelSpec (`modelspec.*`) or kohya's (`ss_*`) metadata."""
    spec = metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("epsilon", "eps", "v", "v_prediction", "v-prediction"):
        value = "eps" if spec.startswith("eps") else "v"
        source.hints.prediction_type = (value, f"metadata modelspec.prediction_type={spec!r}")
    elif metadata.get("ss_v_parameterization", "").lower() in ("true", "false"):
        flag = metadata["ss_v_parameterization"]
        source.hints.prediction_type = (
            "v" if flag.lower() == "true" else "eps",
            f"metadata ss_v_parameterization={flag}",
        )
    width, _, height = metadata.get("modelspec.resolution", "").partition("x")
    if width.isdigit() and width == height:
        source.hints.image_size = (int(width), "metadata modelspec.resolution")


# diffusers folder: component -> weight file names tried in order (diffusers' and transformers' names).
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model", "model", "pytorch_model")
_DIFFUSERS_VARIANTS = ("", ".fp16")
_DIFFUSERS_PREDICTION = {"epsilon": "eps", "v_prediction": "v"}
_DIFFUSERS_BETA_SCHEDULE = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}


def _open_diffusers(path: Path) -> _Source:
    index = path / "model_index.json"
    if not (path / "unet").is_dir():
        raise _fail(
            path,
            "a folder, but not a diffusers model folder: no unet/ subfolder (expected model_index.json, "
            "unet/, vae/, text_encoder/, scheduler/)",
        )
    if index.exists():
        pipeline = str(_read_json(index).get("_class_name", ""))
        if "XL" in pipeline or (path / "text_encoder_2").exists():
            raise _fail(
                path, f"an SDXL diffusers folder ({pipeline or 'text_encoder_2/'}); kedavra supports SD 1.x and 2.x"
            )
    source = _Source(path, "diffusers folder", {})
    for component in COMPONENTS:
        folder = path / component
        if not folder.is_dir():
            raise _fail(path, f"diffusers folder without {component}/")
        weights = _read_component_weights(folder)
        source.parts[component] = ("diffusers", weights.tensors)
        source.files += weights.files
        source.containers.add(weights.container)
    _diffusers_hints(path, source)
    return source


def _read_component_weights(folder: Path) -> _Weights:
    for variant in _DIFFUSERS_VARIANTS:
        for stem in _DIFFUSERS_WEIGHTS:
            for suffix in (".safetensors", ".bin"):
                name = f"{stem}{variant}{suffix}"
                if (folder / name).exists():
                    return _read_weights(folder / name)
                if (folder / f"{name}.index.json").exists():
                    return _read_sharded(folder, folder / f"{name}.index.json")
    raise _fail(folder, f"no weights file ({', '.join(s + '.safetensors' for s in _DIFFUSERS_WEIGHTS)} or .bin)")


def _read_sharded(folder: Path, index: Path) -> _Weights:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise _fail(index, "sharded-weights index without a weight_map")
    merged = _Weights({}, "safetensors")
    for shard in sorted(set(weight_map.values())):
        weights = _read_weights(folder / shard)
        merged.container, merged.files = weights.container, merged.files + weights.files
        names = [k for k, v in weight_map.items() if v == shard]
        absent = [k for k in names if k not in weights.tensors]
        if absent:
            raise _fail(folder / shard, f"lacks {len(absent)} tensors its index lists: {_some(absent)}")
        merged.tensors.update({k: weights.tensors[k] for k in names})
    return merged


def _diffusers_hints(path: Path, source: _Source) -> None:
    hints = source.hints
    scheduler = path / "scheduler" / "scheduler_config.json"
    if scheduler.exists():
        config = _read_json(scheduler)
        where = f"{scheduler.relative_to(path)}"
        raw = config.get("prediction_type", "epsilon")
        if raw not in _DIFFUSERS_PREDICTION:
            raise _fail(
                scheduler,
                f"prediction_type {raw!r} is not supported; kedavra's models predict "
                f"{' or '.join(_DIFFUSERS_PREDICTION)}",
            )
        hints.prediction_type = (_DIFFUSERS_PREDICTION[raw], f"{where} prediction_type={raw!r}")
        kind = config.get("beta_schedule", "linear")
        if kind not in _DIFFUSERS_BETA_SCHEDULE or config.get("trained_betas") is not None:
            raise _fail(
                scheduler,
                f"beta_schedule {kind!r} / trained_betas is not supported; allowed: "
                f"{', '.join(_DIFFUSERS_BETA_SCHEDULE)}",
            )
        try:  # diffusers' defaults where a key is absent (DDPMScheduler: linear, 1e-4 .. 0.02, 1000 steps)
            schedule = NoiseSchedule(
                kind=_DIFFUSERS_BETA_SCHEDULE[kind],
                num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                beta_start=float(config.get("beta_start", 0.0001)),
                beta_end=float(config.get("beta_end", 0.02)),
                zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
            )
            steps_offset = int(config.get("steps_offset", 0))
        except (TypeError, ValueError) as error:
            raise _fail(scheduler, f"unusable schedule settings: {error}") from None
        hints.schedule = (schedule, where)
        if "timestep_spacing" in config or "steps_offset" in config:
            hints.spacing = (config.get("timestep_spacing", "leading"), steps_offset, where)
    unet_config = path / "unet" / "config.json"
    vae_config = path / "vae" / "config.json"
    if unet_config.exists() and vae_config.exists():
        sample_size = _read_json(unet_config).get("sample_size")
        vae = _read_json(vae_config)
        factor = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
        if isinstance(sample_size, int):
            hints.image_size = (sample_size * factor, "unet/config.json sample_size")
        if isinstance(vae.get("scaling_factor"), float):
            hints.scaling_factor = (vae["scaling_factor"], "vae/config.json scaling_factor")
    text_config = path / "text_encoder" / "config.json"
    if text_config.exists():
        act = _read_json(text_config).get("hidden_act")
        hints.text_style = {"quick_gelu": "clip", "gelu": "openclip"}.get(act)
    vocab = path / "tokenizer" / "vocab.json"
    if vocab.exists():
        size = len(_read_json(vocab))
        if size != VOCAB_SIZE:
            raise _fail(
                vocab,
                f"the tokenizer has {size} tokens; kedavra uses its vendored CLIP BPE vocabulary of "
                f"{VOCAB_SIZE}, so this model's text encoder would see the wrong ids",
            )


# ---- detection ----------------------------------------------------------------------------------------------


def _text_style(config: ModelConfig) -> str:
    return "clip" if config.text_encoder.activation == "quick_gelu" else "openclip"


def _architecture(config: ModelConfig) -> tuple:
    return config.tokenizer, config.text_encoder, config.unet, config.vae


def _unet_facts(source: _Source) -> tuple[int, int, bool]:
    """(cross-attention width, input channels, Linear transformer projections) read off the U-Net's shapes."""
    layout, state = source.parts["unet"]
    conv_in = state.get("conv_in.weight" if layout == "diffusers" else "input_blocks.0.0.weight")
    to_k = next((t for k, t in sorted(state.items()) if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((t for k, t in sorted(state.items()) if k.endswith(".proj_in.weight")), None)
    if conv_in is None or to_k is None or proj_in is None or conv_in.ndim != 4 or to_k.ndim != 2:
        raise _fail(
            source.path,
            "unknown architecture: the U-Net has no first conv / cross-attention "
            f"(attn2.to_k) / transformer proj_in weights; found {_some(sorted(state), 4)}",
        )
    return to_k.shape[1], conv_in.shape[1], proj_in.ndim == 2


def _candidates(source: _Source) -> tuple[list[str], str]:
    """Presets whose architecture matches the weights, and the facts they were matched on."""
    context, channels, linear = _unet_facts(source)
    style = source.hints.text_style
    facts = (
        f"U-Net cross-attention width {context}, {channels} input channels, "
        f"{'Linear' if linear else '1x1-conv'} transformer projections, "
        f"{ {'clip': 'OpenAI CLIP', 'openclip': 'OpenCLIP', None: 'unknown'}[style] } text encoder"
    )
    names = [
        name
        for name, preset in PRESETS.items()
        if preset.unet.context_dim == context
        and preset.unet.in_channels == channels
        and preset.unet.use_linear_projection == linear
        and (style is None or _text_style(preset) == style)
    ]
    if not names:
        known = "; ".join(
            f"{n}: width {p.unet.context_dim}, {p.unet.in_channels} channels, {_text_style(p)}"
            for n, p in PRESETS.items()
        )
        raise _fail(
            source.path,
            f"unknown architecture ({facts}); kedavra knows {known}. Pass family=... if the file is one of these",
        )
    if len({_architecture(PRESETS[n]) for n in names}) > 1:
        raise _fail(source.path, f"cannot tell {', '.join(names)} apart from the weights ({facts}); pass family=...")
    return names, facts


def _schedule_from_betas(betas: Tensor, family: ModelConfig) -> tuple[NoiseSchedule, str]:
    """The schedule whose β match the file's `betas` buffer (to fp16 precision), else the family's."""
    betas = betas.double()
    start, end, steps = float(betas[0]), float(betas[-1]), betas.numel()
    options = [family.schedule, dataclasses.replace(family.schedule, zero_terminal_snr=True)]
    if steps >= 2 and 0 < start <= end < 1:
        options += [NoiseSchedule("scaled_linear", steps, start, end), NoiseSchedule("linear", steps, start, end)]
    for option in options:
        if option.num_train_timesteps == steps and torch.allclose(option.betas, betas, rtol=2e-3, atol=1e-6):
            same = option == family.schedule
            return option, "the family's; the file's betas agree" if same else "read from the file's betas"
    return family.schedule, "the family's; the file's betas buffer matches no known schedule and was ignored"


@dataclass
class _Decision:
    config: ModelConfig
    family_how: str  # why this family
    prediction_why: str  # why this prediction type
    details: list[str]  # settings taken from the checkpoint's own files
    probe_between: list[str]  # families that differ only in prediction type, to be told apart by a probe

    def report(self) -> list[str]:
        return [
            f"family: {self.config.family} ({self.family_how})",
            f"prediction type: {self.config.prediction_type} ({self.prediction_why})",
            *self.details,
        ]


def _decide(source: _Source, family: str | None, prediction_type: str | None) -> _Decision:
    hints = source.hints
    if family is not None:
        names, how = [family], "given by the family argument"
    elif hints.config is not None:
        names, how = [], "stored in the kedavra checkpoint"
    else:
        names, facts = _candidates(source)
        how = f"detected: {facts}"
    probe_between: list[str] = []
    if prediction_type is not None:
        chosen, why = prediction_type, "given by the prediction_type argument"
    elif hints.prediction_type is not None:
        chosen, why = hints.prediction_type
    elif len({PRESETS[n].prediction_type for n in names}) > 1:
        chosen, why, probe_between = PRESETS[names[0]].prediction_type, "to be probed", names
    elif names:
        chosen, why = PRESETS[names[0]].prediction_type, "the family's default"
    else:
        chosen, why = hints.config.prediction_type, "stored in the kedavra checkpoint"
    if names:
        config = PRESETS[next((n for n in names if PRESETS[n].prediction_type == chosen), names[0])]
    else:
        config = hints.config
    details: list[str] = []
    config = dataclasses.replace(config, prediction_type=chosen)
    if hints.config is None:
        config = _apply_hints(source.path, config, hints, details)
    return _Decision(config, how, why, details, probe_between)


def _apply_hints(path: Path, config: ModelConfig, hints: _Hints, details: list[str]) -> ModelConfig:
    """The family's config with what the checkpoint says about itself: schedule, sampling, size, latent scale."""
    changes: dict[str, object] = {}
    schedule = None
    if hints.schedule is not None:
        schedule, why = hints.schedule
    elif hints.betas is not None:
        schedule, why = _schedule_from_betas(hints.betas, config)
    if schedule is not None:
        changes["schedule"] = schedule
        zero_snr = ", zero terminal SNR" if schedule.zero_terminal_snr else ""
        details.append(
            f"schedule: {schedule.kind} {schedule.beta_start:g}..{schedule.beta_end:g} over "
            f"{schedule.num_train_timesteps} steps{zero_snr} ({why})"
        )
    if hints.spacing is not None:
        changes["spacing"], changes["steps_offset"], where = hints.spacing
        details.append(f"sampling: {changes['spacing']} spacing, steps_offset {changes['steps_offset']} ({where})")
    if hints.image_size is not None:
        changes["image_size"], where = hints.image_size
        details.append(f"image size: {changes['image_size']} px ({where})")
    if hints.scaling_factor is not None and hints.scaling_factor[0] != config.vae.scaling_factor:
        changes["vae"] = dataclasses.replace(config.vae, scaling_factor=hints.scaling_factor[0])
        details.append(f"VAE latent scale: {hints.scaling_factor[0]} ({hints.scaling_factor[1]})")
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as error:
        raise _fail(path, f"the checkpoint's own settings are not usable: {error}") from None


# ---- ε or v ---------------------------------------------------------------------------------------------------

PROBE_SIZE = 8  # latent side of the probe input; AUTOMATIC1111's SD 2.x check also runs an 8 x 8 latent
PROBE_THRESHOLD = 0.5  # midway between the slopes of an ε-predictor (≈ 1) and a v-predictor (≈ 0)


def probe_prediction_type(
    model: Callable[[Tensor, Tensor], Tensor],
    channels: int,
    schedule: NoiseSchedule,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[str, float]:
    """Tell an ε-predicting U-Net from a v-predicting one by running it once; returns (type, slope).

    At the noisiest step t = T-1 (SD: ᾱ ≈ 0.0047) the input x_t = √ᾱ x0 + √(1-ᾱ) ε is almost pure noise, so we
    feed pure noise x and regress the output on it: slope = <out, x> / <x, x>. For data with per-dimension
    variance s² (SD latents: s ≈ 1 after the VAE scale), the optimal x̂0 = √ᾱ s² x / (ᾱ s² + 1 - ᾱ) = √ᾱ k x,
    so an ε-predictor ε̂ = (x - √ᾱ x̂0)/√(1-ᾱ) (DDPM eq. 4 solved for ε) has slope (1 - ᾱ k)/√(1-ᾱ) ≈ 1, and a
    v-predictor v̂ = √ᾱ ε̂ - √(1-ᾱ) x̂0 (Salimans & Ho 2022, eq. 7) has slope √ᾱ (1 - k)/√(1-ᾱ): exactly 0 at
    s = 1, under 0.07 in size for any s² <= 2. AUTOMATIC1111's check feeds a constant 0.5 and thresholds the
    mean of output - input at -1, a rule found by trying checkpoints; this one follows from the targets.

    `model(x_t, t)` is any callable: x_t (1, channels, PROBE_SIZE, PROBE_SIZE), t (1,) float timesteps.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, PROBE_SIZE, PROBE_SIZE, generator=generator, dtype=torch.float64)
    t = torch.full((1,), float(schedule.num_train_timesteps - 1), device=device)
    with torch.no_grad():
        out = model(x.to(device=device, dtype=dtype), t).double().cpu()
    slope = float((out * x).sum() / (x * x).sum())
    if not math.isfinite(slope):
        raise ValueError(f"the U-Net's output on the probe input is not finite (slope {slope})")
    return ("eps" if slope > PROBE_THRESHOLD else "v"), slope


def _probe(path: Path, model: StableDiffusion, decision: _Decision, image_size_given: bool) -> None:
    """Run `probe_prediction_type` on the loaded U-Net and settle the family among `decision.probe_between`."""
    with torch.no_grad():
        ids = model.tokenizer("").to(next(model.text_encoder.parameters()).device)
        context = model.text_encoder(ids)  # (1, L, D): the empty prompt, as unconditional sampling sees it
    param = next(model.unet.parameters())
    config = model.config
    try:
        chosen, slope = probe_prediction_type(
            lambda x, t: model.unet(x, t, context),
            config.unet.in_channels,
            config.schedule,
            device=param.device,
            dtype=param.dtype,
        )
    except ValueError as error:
        raise CheckpointError(f"{path}: cannot tell ε from v ({error}); pass prediction_type=") from None
    family = PRESETS[next(n for n in decision.probe_between if PRESETS[n].prediction_type == chosen)]
    changes = {"family": family.family, "prediction_type": chosen}
    if not image_size_given:
        changes["image_size"] = family.image_size
    model.config = decision.config = dataclasses.replace(config, **changes)
    decision.prediction_why = (
        f"probed: the U-Net's output regressed on a pure-noise input at t={config.schedule.num_train_timesteps - 1}"
        f" has slope {slope:.3f}; ε-models give ≈1, v-models ≈0; pass prediction_type= to override"
    )


# ---- load and save ---------------------------------------------------------------------------------------------


def _materialize(tensor: Tensor, dtype: torch.dtype, device: torch.device, files: list[SafetensorsFile]) -> Tensor:
    """The tensor the model will hold: the file's own bytes where dtype and device agree (and the bytes are
    aligned), otherwise a converted copy, after which the file pages it came from are dropped."""
    convert = tensor.is_floating_point() and tensor.dtype != dtype
    if not convert and device.type == "cpu" and tensor.data_ptr() % tensor.element_size() == 0:
        return tensor
    out = tensor.to(device=device, dtype=dtype if convert else tensor.dtype, copy=True)
    for file in files:
        file.release(tensor)
    return out


def _load_component(model: StableDiffusion, name: str, source: _Source, dtype, device, family_note: str) -> None:
    layout, state = source.parts[name]
    module = getattr(model, name)
    if layout == "kedavra":
        expected = module.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        shapes = [
            f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
            for k in sorted(set(state) & set(expected))
            if state[k].shape != expected[k].shape
        ]
        if missing or unexpected or shapes:
            raise _fail(
                source.path,
                f"{name} weights do not match the stored config: {len(missing)} missing "
                f"[{_some(missing)}], {len(unexpected)} unexpected [{_some(unexpected)}], "
                f"{len(shapes)} of the wrong shape [{_some(shapes)}]",
            )
        converted = dict(state)
    else:
        try:
            converted = _CONVERTERS[name](state, layout, getattr(model.config, name))
        except ValueError as error:
            raise _fail(source.path, f"{error} ({family_note})") from None
    for key in list(converted):
        converted[key] = _materialize(converted[key], dtype, device, source.files)
    module.load_state_dict(converted, strict=True, assign=True)


def load_model(
    path: str | os.PathLike,
    *,
    family: str | None = None,
    prediction_type: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> StableDiffusion:
    """Load an SD 1.x / 2.x checkpoint (original single file, diffusers folder, or kedavra's format).

    family: a preset name (see kedavra.model.PRESETS) to use instead of detecting it.
    prediction_type: "eps" or "v", instead of what the files say or the probe finds.
    dtype, device: where the weights end up; floating-point tensors are converted one at a time.
    The model comes back in eval mode; `model.describe()` says what was read and detected.
    """
    path = Path(path).expanduser()
    if family is not None and family not in PRESETS:
        raise ValueError(f"unknown family {family!r}; allowed: {', '.join(PRESETS)}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    device = torch.device(device)
    source = _open(path)
    decision = _decide(source, family, prediction_type)
    with torch.device("meta"):
        model = StableDiffusion(decision.config)
    note = f"loading as family {decision.config.family}, {decision.family_how}"
    for name in COMPONENTS:
        _load_component(model, name, source, dtype, device, note)
    model.eval()
    if decision.probe_between:
        _probe(path, model, decision, source.hints.image_size is not None)
    contents = f"{source.kind}; {'/'.join(sorted(source.containers))}; {source.file_dtypes()}"
    target = f"loaded as {str(dtype).removeprefix('torch.')} on {device}"
    lines = [f"read {path} ({contents}), {target}", *decision.report(), *source.notes]
    model.source = "\n".join(lines)
    logger.info("%s", model.source)
    return model


def save_model(model: StableDiffusion, path: str | os.PathLike) -> None:
    """Save in kedavra's format: one .safetensors with every component's weights under "text_encoder.",
    "unet." and "vae." and the ModelConfig JSON in the metadata. Written tensor by tensor, then renamed into
    place; `load_model` reads it back bitwise (pass the saved dtype to keep it)."""
    if not isinstance(model, StableDiffusion):
        raise TypeError(f"save_model needs a StableDiffusion, got {type(model).__name__}")
    state = model.state_dict()
    on_meta = [k for k, t in state.items() if t.is_meta]
    if on_meta:
        raise ValueError(f"cannot save: {len(on_meta)} tensors have no data (meta device): {_some(on_meta)}")
    metadata = {FORMAT_KEY: FORMAT_VERSION, CONFIG_KEY: json.dumps(model.config.to_dict())}
    write_safetensors(path, state, metadata)
