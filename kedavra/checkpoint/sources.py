"""Checkpoint sources: an original single file, a kedavra file or a diffusers folder, opened into one state dict
per component (with its key layout) and the hints the checkpoint gives about itself (schedule, ε or v, size).
SD 1.x / 2.x and SDXL alike: SDXL's second text encoder is the component "text_encoder_2"."""

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from kedavra.checkpoint import diffusers_config
from kedavra.checkpoint.errors import _fail
from kedavra.checkpoint.foreign import FOREIGN_FOLDERS, NOT_A_FULL_MODEL, what_else
from kedavra.checkpoint.safetensors_io import SafetensorsFile
from kedavra.checkpoint.scheduler_config import SchedulerDefaults, scheduler_defaults
from kedavra.checkpoint.weights import _read_json, _read_weights, _Weights
from kedavra.diffusion.schedule import NoiseSchedule
from kedavra.networks.model import ModelConfig
from kedavra.validation import some

CONFIG_KEY = "kedavra_config"  # safetensors metadata key holding ModelConfig.to_dict() as JSON
FORMAT_KEY = "kedavra_format"  # metadata key holding FORMAT_VERSION
FORMAT_VERSION = "1"
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")  # every component a checkpoint may hold


def components(config: ModelConfig) -> tuple[str, ...]:
    """The components `config`'s model has weights for: SDXL's second text encoder only where it has one."""
    return tuple(name for name in COMPONENTS if name != "text_encoder_2" or config.text_encoder_2 is not None)


@dataclass
class _Hints:
    """What a checkpoint says about itself beyond its weights; each value with where it came from."""

    config: ModelConfig | None = None  # kedavra's own format
    described: ModelConfig | None = None  # a diffusers folder's, from its component config.json files
    described_from: str = ""  # which config.json files described it
    prediction_type: tuple[str, str] | None = None
    schedule: tuple[NoiseSchedule, str] | None = None
    betas: Tensor | None = None  # an original file's DDPM betas buffer, matched against known schedules
    spacing: tuple[str, int, str] | None = None  # (spacing, steps_offset, source)
    image_size: tuple[int, str] | None = None
    scaling_factor: tuple[float, str] | None = None
    text_style: str | None = None  # "clip" (OpenAI CLIP, quick GELU) or "openclip" (exact GELU)
    zero_terminal_snr: str | None = None  # where a file says its schedule was rescaled to zero terminal SNR
    scheduler: tuple[SchedulerDefaults, str] | None = None  # a folder's scheduler class read as sampling defaults


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


# Original single-file prefixes -> (component, layout for the component's converter): CompVis / Stability's SD 1.x
# and 2.x, and Stability's SGM (sd_xl_base.yaml: conditioner.embedders.0 OpenAI CLIP ViT-L, .1 OpenCLIP ViT-bigG;
# sd_xl_refiner.yaml: bigG alone as embedders.0).
ORIGINAL_PREFIXES = {
    "model.diffusion_model.": ("unet", "ldm"),
    "first_stage_model.": ("vae", "ldm"),
    "cond_stage_model.transformer.": ("text_encoder", "ldm_sd1"),
    "cond_stage_model.model.": ("text_encoder", "ldm_sd2"),
    "conditioner.embedders.0.transformer.": ("text_encoder", "ldm_sd1"),
    "conditioner.embedders.1.model.": ("text_encoder_2", "ldm_sd2"),
    "conditioner.embedders.0.model.": ("text_encoder", "ldm_sd2"),
}
# LDM's DDPM buffers (ldm/models/diffusion/ddpm.py register_schedule): functions of the noise schedule; SGM's
# DiscreteDenoiser keeps the same schedule as `denoiser.sigmas`.
ORIGINAL_SCHEDULE_BUFFERS = frozenset(
    (
        "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod "
        "log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod posterior_variance "
        "posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2 logvar lvlb_weights denoiser.sigmas"
    ).split()
)
# Empty marker tensors some SDXL fine-tunes carry (ComfyUI reads them): a v-prediction U-Net, a schedule rescaled to
# zero terminal SNR (Lin et al. 2024).
V_PREDICTION_KEY = "v_pred"
ZERO_SNR_KEY = "ztsnr"
EMA_PREFIX = "model_ema."  # LitEma: model_ema.decay, model_ema.num_updates and, in full files, EMA U-Net copies
_EXPECTED_ORIGINAL = (
    "model.diffusion_model.* (U-Net), first_stage_model.* (VAE) and cond_stage_model.transformer.* (SD 1.x), "
    "cond_stage_model.model.* (SD 2.x), conditioner.embedders.0.transformer.* with conditioner.embedders.1.model.* "
    "(SDXL) or conditioner.embedders.0.model.* (SDXL refiner), e.g. model.diffusion_model.input_blocks.0.0.weight"
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
    parts: dict[str, tuple[str, dict[str, Tensor]]] = {name: ("kedavra", {}) for name in components(config)}
    stray = []
    for key, tensor in weights.tensors.items():
        component, _, rest = key.partition(".")
        if component in parts:
            parts[component][1][rest] = tensor
        else:
            stray.append(key)
    if stray:
        raise _fail(path, f"{len(stray)} unexpected keys in a kedavra checkpoint: {some(stray)}")
    source = _Source(path, "kedavra", parts, weights.files, {weights.container})
    source.hints.config = config
    return source


def _open_original(path: Path, weights: _Weights) -> _Source:
    foreign = what_else(weights.tensors)
    if foreign is not None:
        what, keys = foreign
        raise _fail(
            path, f"this looks like {what} (keys such as {some(keys, 3)}); {NOT_A_FULL_MODEL}. kedavra runs SD 1.x, "
            f"2.x and SDXL U-Net models, stored as {_EXPECTED_ORIGINAL}"
        )
    parts: dict[str, tuple[str, dict[str, Tensor]]] = {}
    origins: dict[str, str] = {}  # component -> the prefix its weights came from
    ignored, unknown = [], []
    for key, tensor in weights.tensors.items():
        prefix = next((p for p in ORIGINAL_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            component, layout = ORIGINAL_PREFIXES[prefix]
            if origins.setdefault(component, prefix) != prefix:
                raise _fail(path, f"holds {component} weights under both {origins[component]}* and {prefix}*: "
                                  "two text encoders where the model has one")
            parts.setdefault(component, (layout, {}))[1][key[len(prefix) :]] = tensor
        elif key in ORIGINAL_SCHEDULE_BUFFERS or key.startswith(EMA_PREFIX) or key in (V_PREDICTION_KEY, ZERO_SNR_KEY):
            ignored.append(key)
        else:
            unknown.append(key)
    if "unet" not in parts:
        found = f"{len(weights.tensors)} keys such as {some(sorted(weights.tensors), 3)}"
        raise _fail(path, f"unknown architecture: no U-Net weights ({found}); expected {_EXPECTED_ORIGINAL}")
    if unknown:
        raise _fail(
            path,
            f"{len(unknown)} unexpected keys outside the parts of an SD 1.x / 2.x / XL checkpoint: "
            f"{some(sorted(unknown))}; expected only {_EXPECTED_ORIGINAL}",
        )
    sgm = any(prefix.startswith("conditioner.") for prefix in origins.values())
    wanted = (("vae", "first_stage_model.* (VAE)"),
              ("text_encoder", f"{'conditioner.embedders.0' if sgm else 'cond_stage_model'}.* (text encoder)"))
    missing = [what for name, what in wanted if name not in parts]
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
    if V_PREDICTION_KEY in weights.tensors and source.hints.prediction_type is None:
        source.hints.prediction_type = ("v", f"the file's {V_PREDICTION_KEY!r} marker key")
    if ZERO_SNR_KEY in weights.tensors:
        source.hints.zero_terminal_snr = f"the file's {ZERO_SNR_KEY!r} marker key"
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
    index = _read_json(path / "model_index.json") if (path / "model_index.json").exists() else {}
    pipeline = str(index.get("_class_name", "")) or "no model_index.json"
    if not (path / "unet").is_dir():
        other = next((what for folder, what in FOREIGN_FOLDERS if (path / folder).is_dir()), None)
        if other is not None:
            raise _fail(path, f"{other} ({pipeline}); {NOT_A_FULL_MODEL}: it runs SD 1.x, 2.x and SDXL U-Net models")
        raise _fail(
            path,
            "a folder, but not a diffusers model folder: no unet/ subfolder (expected model_index.json, "
            "unet/, vae/, text_encoder/ (SDXL: and text_encoder_2/), scheduler/)",
        )
    folders = diffusers_config.component_folders(path, index)
    source = _Source(path, "diffusers folder", {})
    for component, name in folders.items():
        folder = path / name
        if not folder.is_dir():
            raise _fail(path, f"diffusers folder without {name}/")
        weights = _read_component_weights(folder)
        source.parts[component] = ("diffusers", weights.tensors)
        source.files += weights.files
        source.containers.add(weights.container)
    if folders["text_encoder"] != "text_encoder":
        source.notes.append(f"{folders['text_encoder']}/ is the only text encoder ({pipeline}: model_index.json "
                            "has no text_encoder); it is loaded as text_encoder")
    for key in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):  # SDXL pipelines' own settings
        if key in index:
            source.notes.append(f"model_index.json {key}={json.dumps(index[key])} (a setting for the pipeline)")
    _diffusers_hints(path, source, folders)
    if diffusers_config.has_configs(path, folders):
        source.hints.described = diffusers_config.described_config(path, folders)
        source.hints.described_from = diffusers_config.described_from(folders)
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
            raise _fail(folder / shard, f"lacks {len(absent)} tensors its index lists: {some(absent)}")
        merged.tensors.update({k: weights.tensors[k] for k in names})
    return merged


def _diffusers_hints(path: Path, source: _Source, folders: Mapping[str, str]) -> None:
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
        hints.scheduler = (scheduler_defaults(config), where)
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
    text_config = path / folders["text_encoder"] / "config.json"
    if text_config.exists():
        act = _read_json(text_config).get("hidden_act")
        hints.text_style = {"quick_gelu": "clip", "gelu": "openclip"}.get(act)
