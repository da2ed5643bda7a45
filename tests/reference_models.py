"""Reference models for the parity tests: diffusers' UNet2DConditionModel and AutoencoderKL and transformers'
CLIPTextModel, built offline for a kedavra ModelConfig with every parameter re-drawn under a fixed seed, and writers
that save them as a diffusers folder (their own save_pretrained) or an original single file (tests/sd_keys.py).
Used by the checkpoint, model-config, U-Net, text-encoder and pipeline-parity tests, test_training.py and the
benchmark scripts; tests/conftest.py offers the fixtures tiny_refs and tiny_file to every test module."""

import gzip
import json
import math
import pathlib

import pytest
import sd_keys
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from kedavra.networks.model import PRESETS, ModelConfig, StableDiffusion
from kedavra.networks.text_encoder import TextEncoderConfig, convert_text_encoder_state_dict
from kedavra.networks.tokenizer import NUM_MERGES, VOCAB_PATH, byte_alphabet, load_vocabulary
from kedavra.networks.unet_config import UNetConfig
from kedavra.networks.unet_keys import convert_unet_state_dict
from kedavra.networks.vae_keys import convert_vae_state_dict

PARITY_ATOL = 1e-5  # fp32, the bound for every component output


def clip_text_config(config: TextEncoderConfig) -> CLIPTextConfig:
    """transformers' CLIPTextConfig for kedavra's text encoder config."""
    return CLIPTextConfig(
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_positions,
        hidden_size=config.width,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_width,
        hidden_act=config.activation,
        layer_norm_eps=config.layer_norm_eps,
        projection_dim=config.projection_dim or config.width,
        eos_token_id=2,  # as in SD's text_encoder/config.json: pooled at the argmax of the ids
    )


def diffusers_unet(config: UNetConfig, sample_size: int | None = None) -> UNet2DConditionModel:
    """diffusers' UNet2DConditionModel for kedavra's U-Net config, on the current default device, initialised
    by diffusers (callers re-draw the parameters). sample_size: the latent side, stored in its config only."""
    return UNet2DConditionModel(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_per_level),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_per_level)),
        block_out_channels=config.level_channels,
        layers_per_block=config.res_blocks_per_level,
        cross_attention_dim=config.context_dim,
        attention_head_dim=[config.heads(c)[0] for c in config.level_channels],  # a head count (diffusers' #2011)
        use_linear_projection=config.use_linear_projection,
        upcast_attention=config.upcast_attention,
        norm_num_groups=config.norm_groups,
        transformer_layers_per_block=config.transformer_depth,
        flip_sin_to_cos=True,
        freq_shift=0,
        **({} if sample_size is None else {"sample_size": sample_size}),
    )


def reference_models(config: ModelConfig, seed: int = 0, device: str | None = None):
    """(CLIPTextModel, UNet2DConditionModel, AutoencoderKL) shaped like `config`, parameters drawn under `seed`.

    device="meta" builds them without memory (for key and shape checks)."""
    v = config.vae
    with torch.device(device or "cpu"):
        text = CLIPTextModel(clip_text_config(config.text_encoder))
        unet = diffusers_unet(config.unet, sample_size=config.image_size // v.downsample_factor)
        vae = DiffusersVAE(
            down_block_types=("DownEncoderBlock2D",) * v.num_levels,
            up_block_types=("UpDecoderBlock2D",) * v.num_levels,
            block_out_channels=v.block_channels,
            layers_per_block=v.num_res_blocks,
            latent_channels=v.latent_channels,
            norm_num_groups=v.norm_groups,
            scaling_factor=v.scaling_factor,
            sample_size=config.image_size,
        )
    if device != "meta":
        generator = torch.Generator().manual_seed(seed)
        for model in (text, unet, vae):
            randomize(model, generator)
    return text.eval(), unet.eval(), vae.eval()


def randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm gains near 1, matrices scaled by 1/sqrt(fan-in) so activations stay O(1), the rest small."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif "embedding" in name:
                p.copy_(noise)
            elif p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * noise)


def kedavra_state(refs, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The references' weights under kedavra's names (prefixed as StableDiffusion.state_dict has them)."""
    converters = (convert_text_encoder_state_dict, convert_unet_state_dict, convert_vae_state_dict)
    state = {}
    for name, ref, convert in zip(("text_encoder", "unet", "vae"), refs, converters, strict=True):
        state.update(
            {f"{name}.{k}": v for k, v in convert(ref.state_dict(), "diffusers", getattr(config, name)).items()}
        )
    return state


def write_original(path, refs, config: ModelConfig, metadata=None, dtype=torch.float32):
    original = sd_keys.original_state_dict(kedavra_state(refs, config), config)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in original.items()}
    save_file(tensors, str(path), metadata=metadata)  # the safetensors library's own writer
    return path


def write_diffusers(folder: pathlib.Path, refs, config: ModelConfig, prediction_type: str = "epsilon"):
    text, unet, vae = refs
    for name, model in (("text_encoder", text), ("unet", unet), ("vae", vae)):
        model.save_pretrained(folder / name)
    DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
    ).save_pretrained(folder / "scheduler")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(load_vocabulary().ids))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def max_errors(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max |ref|)."""
    diff = (ours - ref).abs().max().item()
    return diff, diff / ref.abs().max().item()


def assert_parity(model: StableDiffusion, refs) -> dict[str, tuple[float, float]]:
    text, unet, vae = refs
    config = model.config
    generator = torch.Generator().manual_seed(7)
    ids = model.tokenizer(["a photo of an astronaut riding a horse", ""])
    latent = config.image_size // config.vae.downsample_factor
    x = torch.randn(2, config.unet.in_channels, latent, latent, generator=generator)
    context = torch.randn(2, 77, config.unet.context_dim, generator=generator)
    t = torch.tensor([10.0, 980.0])
    images = torch.rand(1, 3, config.image_size, config.image_size, generator=generator) * 2 - 1
    z = torch.randn(1, config.vae.latent_channels, latent, latent, generator=generator)
    with torch.no_grad():
        pairs = {
            "text_encoder": (model.text_encoder(ids), text(ids).last_hidden_state),
            "unet": (model.unet(x, t, context), unet(x, t, encoder_hidden_states=context).sample),
            "vae.encode": (model.vae.encode(images).mean, vae.encode(images).latent_dist.mean),
            "vae.decode": (model.vae.decode(z), vae.decode(z).sample),
        }
    errors = {name: max_errors(ours, ref) for name, (ours, ref) in pairs.items()}
    for name, (absolute, _) in errors.items():
        assert absolute <= PARITY_ATOL, (name, errors)
    return errors


@pytest.fixture(scope="module")
def tiny_refs():
    return {name: reference_models(PRESETS[name]) for name in ("tiny", "tiny-sd2")}


@pytest.fixture(scope="module")
def tiny_file(tiny_refs, tmp_path_factory):
    return write_original(tmp_path_factory.mktemp("tiny") / "tiny.safetensors", tiny_refs["tiny"], PRESETS["tiny"])


# ---- SDXL ---------------------------------------------------------------------------------------------------------

SGM_TEXT_PREFIXES = {  # sd_xl_base.yaml's conditioner.embedders.0 / .1 and sd_xl_refiner.yaml's bigG-only .0
    "clip": "conditioner.embedders.0.transformer.",
    "openclip_2": "conditioner.embedders.1.model.",
    "openclip": "conditioner.embedders.0.model.",
}


def sdxl_reference_models(config: ModelConfig, seed: int = 0, device: str | None = None) -> dict[str, torch.nn.Module]:
    """{"text_encoder", ["text_encoder_2",] "unet", "vae"} shaped like an SDXL `config`, parameters drawn under `seed`:
    transformers' CLIPTextModel for an encoder without a projection, CLIPTextModelWithProjection for one with;
    diffusers' UNet2DConditionModel with the "text_time" added embedding; AutoencoderKL. device="meta" builds them
    without memory or drawing (a full-size SDXL is 14 GB in fp32: materialise one at a time)."""
    encoders = {"text_encoder": config.text_encoder, "text_encoder_2": config.text_encoder_2}
    with torch.device(device or "cpu"):
        models = {
            name: (CLIPTextModelWithProjection if text.projection_dim else CLIPTextModel)(clip_text_config(text))
            for name, text in encoders.items()
            if text is not None
        }
        u = config.unet
        plain = diffusers_unet(u, sample_size=config.image_size // config.vae.downsample_factor)
        settings = {k: v for k, v in plain.config.items() if not k.startswith("_")}  # from_config drops the added
        settings.update(addition_embed_type="text_time", addition_time_embed_dim=u.addition_time_embed_dim,
                        projection_class_embeddings_input_dim=u.addition_embed_input_dim)
        models["unet"] = UNet2DConditionModel(**settings)
        models["vae"] = DiffusersVAE.from_config(reference_models(config, device="meta")[2].config)
    if device == "meta":
        return {name: model.eval() for name, model in models.items()}
    generator = torch.Generator().manual_seed(seed)
    for model in models.values():
        randomize(model, generator)
        model.eval()
    return models


def write_clip_tokenizer(folder: pathlib.Path, pad_token: str | None = None):
    """transformers' CLIPTokenizer built offline from kedavra's vendored CLIP vocabulary, saved to `folder`;
    pad_token "!" is SD 2.x's and SDXL's tokenizer_2."""
    merges = gzip.open(VOCAB_PATH, "rt", encoding="utf-8").read().split("\n")[1 : NUM_MERGES + 1]
    alphabet = sorted(byte_alphabet())  # CLIP orders the byte characters by code point
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *(m.replace(" ", "") for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    extra = {} if pad_token is None else {"pad_token": pad_token}
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, **extra)
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_sdxl_diffusers(folder: pathlib.Path, refs, config: ModelConfig, **index_extras):
    """An SDXL diffusers folder (StableDiffusionXLPipeline), or the refiner's (StableDiffusionXLImg2ImgPipeline:
    the one text encoder saved as text_encoder_2/, model_index.json text_encoder null) when `config` has a single
    text encoder. The scheduler is SDXL's EulerDiscreteScheduler config."""
    refiner = config.text_encoder_2 is None
    folders = {"text_encoder": "text_encoder_2"} if refiner else {"text_encoder": "text_encoder",
                                                                     "text_encoder_2": "text_encoder_2"}
    folders |= {"unet": "unet", "vae": "vae"}
    for name, sub in folders.items():
        refs[name].save_pretrained(folder / sub)
    EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           prediction_type="epsilon", steps_offset=1,
                           timestep_spacing="leading").save_pretrained(folder / "scheduler")
    if not refiner:
        write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2", pad_token="!")
    none, clip = [None, None], ["transformers", "CLIPTextModel"]
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "_diffusers_version": "0.19.0",
        "text_encoder": none if refiner else clip, "tokenizer": none if refiner else ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        **index_extras,
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def sgm_state_dict(refs, config: ModelConfig, open_clip_names) -> dict[str, torch.Tensor]:
    """The references as Stability's SGM single file (sd_xl_base.yaml / sd_xl_refiner.yaml): U-Net and VAE through
    sd_keys, text encoder 1 in transformers' names under conditioner.embedders.0.transformer., the bigG-like encoder
    in OpenCLIP names (`open_clip_names`: transformers' names -> OpenCLIP's) under conditioner.embedders.1.model.
    (the refiner's only encoder: conditioner.embedders.0.model.)."""
    out = {}
    modules = sd_keys.unet_modules(config.unet)
    for key, tensor in convert_unet_state_dict(refs["unet"].state_dict(), "diffusers", config.unet).items():
        out[sd_keys.UNET_PREFIX + sd_keys.unet_key(key, modules)] = tensor
    for key, tensor in convert_vae_state_dict(refs["vae"].state_dict(), "diffusers", config.vae).items():
        name, is_conv = sd_keys.vae_key(key, config.vae)
        out[sd_keys.VAE_PREFIX + name] = tensor[:, :, None, None] if is_conv else tensor  # (C, C) -> (C, C, 1, 1)
    if config.text_encoder_2 is None:
        texts = {"openclip": refs["text_encoder"]}
    else:
        texts = {"clip": refs["text_encoder"], "openclip_2": refs["text_encoder_2"]}
    for style, model in texts.items():
        state = model.state_dict()
        if style == "clip":
            state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
        else:
            state = open_clip_names(state)
        out.update({SGM_TEXT_PREFIXES[style] + k: v for k, v in state.items()})
    return out


def write_sgm_original(path, refs, config: ModelConfig, open_clip_names, metadata=None):
    tensors = {k: v.contiguous() for k, v in sgm_state_dict(refs, config, open_clip_names).items()}
    save_file(tensors, str(path), metadata=metadata)
    return path


def original_unet_layer_names(unet: UNet2DConditionModel, config: UNetConfig) -> dict[str, str]:
    """diffusers' name of every Linear and Conv2d layer of `unet` -> its name in the original layout (CompVis LDM for
    SD 1.x / 2.x, Stability's SGM for SDXL: what kohya's sd-scripts writes after lora_unet_ for SDXL), through
    kedavra's checkpoint names and tests/sd_keys.py (not kedavra.adapters)."""
    state = unet.state_dict()
    by_storage = {tensor.data_ptr(): key for key, tensor in state.items()}
    modules = sd_keys.unet_modules(config)
    layers = {name for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)}
    names = {}
    for ours, tensor in convert_unet_state_dict(state, "diffusers", config).items():
        theirs = by_storage[tensor.data_ptr()].removesuffix(".weight")
        if theirs in layers and ours.endswith(".weight"):
            names[theirs] = sd_keys.unet_key(ours, modules).removesuffix(".weight")
    return names


def tiny_sd_pipelines(tmp_path_factory, **pipeline_options):
    """(kedavra's model read from a diffusers folder, diffusers' StableDiffusionPipeline) over the same tiny random
    weights (reference_models, seed 1), both with SD 1.x's Euler scheduler settings (leading spacing, steps_offset
    1). pipeline_options go to kedavra's Pipeline (fp32 by default)."""
    from diffusers import StableDiffusionPipeline

    from kedavra.checkpoint import load_model
    from kedavra.pipeline.pipeline import Pipeline

    config = PRESETS["tiny"]
    refs = reference_models(config, seed=1)
    folder = write_diffusers(tmp_path_factory.mktemp("tiny_sd"), refs, config)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    scheduler.save_pretrained(folder / "scheduler")
    text, unet, vae = refs
    reference = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=write_clip_tokenizer(tmp_path_factory.mktemp("tok")), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    return Pipeline(load_model(folder), **({"dtype": "fp32"} | pipeline_options)), reference
