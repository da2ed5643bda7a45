"""LoRAs applied by kedavra (merged into the weights, kedavra.adapters) against diffusers and peft applying the same
adapters, unmerged, to the same tiny random models (SD 1.x "tiny" and SDXL "tiny-sdxl").

The adapters are made with peft on diffusers' U-Net and transformers' CLIP text encoders (LoRA with LoCon
convolutions and α ≠ r, DoRA, LoHa, LoKr; every factor re-drawn so that the update is far from zero) and saved as
users get them: diffusers / PEFT files through diffusers' save_lora_weights (with its adapter metadata), kohya files
through diffusers' convert_state_dict_to_kohya (with `.alpha` = lora_alpha; SDXL's U-Net in kohya's SGM names),
LyCORIS LoHa / LoKr files under kohya's layer names with peft's tensor names. The reference is diffusers'
load_lora_weights / set_adapters for LoRA and DoRA files, and for LoHa / LoKr (which its loader does not read) the
peft-injected modules themselves inside diffusers' pipeline. Bars: the U-Net's and text encoders' outputs within
1e-5 (fp32), the latents of a whole run within 1e-4 relative, the images within 2/255 per pixel.

Where A1111 / ComfyUI / LyCORIS and peft disagree, kedavra follows the former for kohya / LyCORIS files, and the
tests at the end check those conventions against formulas written from their code."""

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from diffusers.utils import convert_state_dict_to_kohya  # noqa: E402
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from reference_models import (  # noqa: E402
    original_unet_layer_names,
    sdxl_reference_models,
    tiny_sd_pipelines,
    write_clip_tokenizer,
    write_sdxl_diffusers,
)
from safetensors.torch import load_file, save_file  # noqa: E402

from kedavra.adapters.lora_file import LoraFileError, read_lora  # noqa: E402
from kedavra.adapters.lora_math import merged_weight  # noqa: E402
from kedavra.checkpoint import load_model  # noqa: E402
from kedavra.networks.model import PRESETS  # noqa: E402
from kedavra.pipeline.pipeline import Pipeline  # noqa: E402

STEPS = 4
SEED = 11
PROMPT = "a red circle above a blue square"
REQUEST = dict(prompt=PROMPT, negative_prompt="blurry", guidance_scale=5.0)
OUTPUT_ATOL = 1e-5  # fp32 U-Net / text encoder outputs, merged (kedavra) vs unmerged (peft)
LATENT_REL_TOL = 1e-4
PIXEL_TOL = 2  # of 255, per pixel
CHANGED = 20  # of 255: what a LoRA must at least change somewhere in the image for the comparison to mean anything

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",  # attention
                "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"]  # LoCon: ResBlocks, down/upsamplers
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ALPHAS = {"unet": 8, "text_encoder": 2, "text_encoder_2": 6}  # with rank 4: α / r = 2, 0.5, 1.5
RELATIVE_CHANGE = 0.4  # ‖ΔW‖ / ‖W‖ of each adapted layer at strength 1


def adapter_config(kind: str, component: str, effective_conv: bool = True, targets: list[str] | None = None,
                   **options):
    """The peft config of one adapter type for one component (module docstring); `options` for LoraConfig."""
    targets = targets or (UNET_TARGETS if component == "unet" else TEXT_TARGETS)
    alpha = ALPHAS[component]
    if kind in ("lora", "dora"):
        return LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, use_dora=kind == "dora", **options)
    if kind == "loha":
        return LoHaConfig(r=4, alpha=alpha, target_modules=targets, use_effective_conv2d=effective_conv)
    # rank 2 keeps LoKr's second factor decomposed on every layer here (peft / LyCORIS: r < max(c, d) / 2), where
    # peft's α / r and A1111's scale agree (test_lokr_with_both_factors_whole_is_scaled_by_one)
    return LoKrConfig(r=2, alpha=alpha, target_modules=targets, use_effective_conv2d=effective_conv)


def with_adapter(model: torch.nn.Module, kind: str, component: str, seed: int, effective_conv: bool = True,
                 targets: list[str] | None = None, **options):
    """A copy of `model` with a peft adapter named "x" injected and every adapter tensor re-drawn ~ N(0, 1), one
    factor then scaled so that each layer's ‖ΔW‖ is RELATIVE_CHANGE ± 25% of its ‖W‖ (lora_B is zero at peft's
    initialisation); DoRA's magnitude is ‖W + ΔW‖ per output channel (peft's initialisation) times 1 ± 20%."""
    config = adapter_config(kind, component, effective_conv, targets, **options)
    model = inject_adapter_in_model(config, copy.deepcopy(model), "x").eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".x" in name and "magnitude" not in name:
                p.copy_(torch.randn(p.shape, generator=generator))
        for layer in (m for m in model.modules() if isinstance(m, BaseTunerLayer) and "x" in m.scaling):
            weight = layer.get_base_layer().weight
            wanted = RELATIVE_CHANGE * (0.75 + 0.5 * torch.rand((), generator=generator))
            factor = next(getattr(layer, n)["x"] for n in ("lora_B", "hada_w1_a", "lokr_w1", "lokr_w1_a")
                          if "x" in getattr(layer, n, {}))
            factor = getattr(factor, "weight", factor)
            factor.mul_(wanted * weight.norm() / layer.get_delta_weight("x").norm())
            if kind == "dora":
                magnitude = layer.lora_magnitude_vector["x"].weight  # (out,), convolutions (1, out, 1, 1)
                norm = (weight + layer.get_delta_weight("x")).flatten(1).norm(dim=1)
                magnitude.copy_((norm * (1 + 0.2 * torch.randn(norm.shape, generator=generator))).reshape(
                    magnitude.shape))
    return model


def set_strength(model: torch.nn.Module, strength: float) -> None:
    """peft's own strength of adapter "x" in every adapted layer of `model`: scaling = strength · α / r."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_scale("x", strength)


def peft_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name="x").items()}


def with_text_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's CLIPTextModel names its layers without the `text_model.` that kohya's names (and
    CLIPTextModelWithProjection's) have."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def write_diffusers_lora(path, pipeline_class, models: dict):
    """A diffusers / PEFT file through diffusers' own save_lora_weights, with the adapter metadata it writes (each
    component's LoraConfig: lora_alpha, alpha_pattern, use_rslora, ...)."""
    layers = {f"{component}_lora_layers": peft_state(model) for component, model in models.items()}
    metadata = {f"{component}_lora_adapter_metadata": model.peft_config["x"].to_dict()
                for component, model in models.items()}
    pipeline_class.save_lora_weights(path.parent, **layers, **metadata, weight_name=path.name)
    return path


def write_kohya_lora(path, models: dict, unet_names: dict[str, str] | None = None, te_prefix: str = "lora_te1_"):
    """A kohya file through diffusers' convert_state_dict_to_kohya, then as sd-scripts writes it: the text encoders'
    names with `text_model.`, `.alpha` = the adapter's lora_alpha (the converter writes the rank), DoRA's magnitude
    as `.dora_scale` (the converter leaves peft's name), SD 1.x's one encoder as lora_te_ (the converter writes
    lora_te1_), the U-Net under its original (SGM) names when `unet_names` is given (SDXL)."""
    state = {}
    for component, model in models.items():
        part = peft_state(model)
        state |= {f"{component}.{k}": v for k, v in (part if component == "unet" else with_text_model(part)).items()}
    magnitudes = {k: v for k, v in state.items() if "lora_magnitude_vector" in k}
    kohya = convert_state_dict_to_kohya({k: v for k, v in state.items() if k not in magnitudes})
    for key, value in magnitudes.items():  # diffusers' converter maps lora_A's name; the magnitude sits beside it
        down = convert_state_dict_to_kohya({key.replace("lora_magnitude_vector", "lora_A.weight"): value})
        kohya[next(iter(down)).replace("lora_down.weight", "dora_scale")] = value
    renamed = {}
    for key, value in kohya.items():
        layer, _, tensor = key.partition(".")
        component = next(c for c, prefix in (("unet", "lora_unet_"), ("text_encoder_2", "lora_te2_"),
                                              ("text_encoder", "lora_te1_")) if layer.startswith(prefix))
        if tensor == "alpha":
            value = torch.tensor(float(ALPHAS[component]))
        if component == "text_encoder":
            layer = te_prefix + layer.removeprefix("lora_te1_")
        elif component == "unet" and unet_names is not None:
            layer = "lora_unet_" + _underscored(unet_names)[layer.removeprefix("lora_unet_")]
        renamed[f"{layer}.{tensor}"] = value.contiguous()
    save_file(renamed, str(path))
    return path


def write_converted_lora(path, models: dict):
    """What diffusers' convert_state_dict_to_kohya writes, as is: the U-Net in diffusers' names, the encoders as
    transformers 5 names them (lora_te1_encoder_layers_..., no `text_model.`), `.alpha` = the rank (scale 1)."""
    state = {f"{component}.{k}": v for component, model in models.items() for k, v in peft_state(model).items()}
    save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(state).items()}, str(path))
    return path


def _underscored(names: dict[str, str]) -> dict[str, str]:
    return {k.replace(".", "_"): v.replace(".", "_") for k, v in names.items()}


def write_lycoris(path, models: dict, unet_names: dict[str, str] | None = None, te_prefix: str = "lora_te1_"):
    """A LyCORIS LoHa / LoKr file: kohya's layer names, peft's tensor names (hada_w1_a, ..., lokr_w1, ...), which are
    LyCORIS' own, and `.alpha` = the adapter's alpha."""
    prefixes = {"unet": "lora_unet_", "text_encoder": te_prefix, "text_encoder_2": "lora_te2_"}
    state = {}
    for component, model in models.items():
        part = peft_state(model)
        if component != "unet":
            part = with_text_model(part)
        for key, value in part.items():
            layer, _, tensor = key.rpartition(".")
            if component == "unet" and unet_names is not None:
                layer = unet_names[layer]
            name = prefixes[component] + layer.replace(".", "_")
            state[f"{name}.{tensor}"] = value.contiguous()
            state[f"{name}.alpha"] = torch.tensor(float(ALPHAS[component]))
    save_file(state, str(path))
    return path


# ---- the two pipelines -------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Pair:
    """kedavra's pipeline and diffusers' over the same weights, kedavra's image without LoRAs, the peft adapters
    ({name: {component: peft-injected copy of diffusers' module}}) and their files (in ours.lora_dir, where
    `<lora:NAME:...>` finds them)."""

    ours: Pipeline
    reference: object
    plain: np.ndarray
    adapters: dict
    files: dict


def generate(ours, prompt: str = PROMPT):
    return ours(**{**REQUEST, "prompt": prompt}, steps=STEPS, sampler="euler", seed=SEED)


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image) for image in result.images]).astype(int)  # (B, H, W, 3)


def make_adapters(reference, kinds: dict[str, tuple], components: tuple[str, ...]) -> dict:
    """{name: {component: with_adapter(...)}} for name -> (kind, seed[, U-Net targets])."""
    adapters = {}
    for name, (kind, seed, *targets) in kinds.items():
        adapters[name] = {component: with_adapter(getattr(reference, component), kind, component, seed + i,
                                                  targets=targets[0] if targets and component == "unet" else None)
                          for i, component in enumerate(components)}
    return adapters


KOHYA_DORA_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "time_emb_proj"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """SD 1.x (tiny): the pipelines of test_pipeline_parity (a diffusers folder loaded by kedavra, diffusers'
    StableDiffusionPipeline with SD's Euler scheduler) and six adapter files: a kohya LoCon, a diffusers LoRA, DoRA
    as a diffusers file (convolutions included) and as a kohya file (Linear layers), LyCORIS LoHa and LoKr."""
    loras = tmp_path_factory.mktemp("loras")
    ours, reference = tiny_sd_pipelines(tmp_path_factory, lora_dir=loras)
    adapters = make_adapters(reference, {"locon": ("lora", 1), "peft_lora": ("lora", 3), "dora": ("dora", 5),
                                         "dora_kohya": ("dora", 7, KOHYA_DORA_UNET_TARGETS), "loha": ("loha", 9),
                                         "lokr": ("lokr", 11)}, ("unet", "text_encoder"))
    sd_class = diffusers.StableDiffusionPipeline
    files = {
        "locon": write_kohya_lora(loras / "locon.safetensors", adapters["locon"], te_prefix="lora_te_"),
        "peft_lora": write_diffusers_lora(loras / "peft_lora.safetensors", sd_class, adapters["peft_lora"]),
        "dora": write_diffusers_lora(loras / "dora.safetensors", sd_class, adapters["dora"]),
        "dora_kohya": write_kohya_lora(loras / "dora_kohya.safetensors", adapters["dora_kohya"], te_prefix="lora_te_"),
        "loha": write_lycoris(loras / "loha.safetensors", adapters["loha"], te_prefix="lora_te_"),
        "lokr": write_lycoris(loras / "lokr.safetensors", adapters["lokr"], te_prefix="lora_te_"),
    }
    return Pair(ours, reference, pixels(generate(ours)), adapters, files)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """SDXL (tiny-sdxl): a diffusers folder loaded by kedavra and diffusers' StableDiffusionXLPipeline over the same
    modules, and four adapter files on the U-Net and both encoders: a kohya LoCon in SGM names with lora_te1_ /
    lora_te2_ (as sd-scripts writes SDXL LoRAs), a diffusers LoRA, LyCORIS LoHa and LoKr in the same kohya names."""
    config = PRESETS["tiny-sdxl"]
    refs = sdxl_reference_models(config, seed=3)
    folder = write_sdxl_diffusers(tmp_path_factory.mktemp("tiny_sdxl"), refs, config)
    tokens = tmp_path_factory.mktemp("sdxl_tok")
    reference = diffusers.StableDiffusionXLPipeline(
        vae=refs["vae"], text_encoder=refs["text_encoder"], text_encoder_2=refs["text_encoder_2"],
        tokenizer=write_clip_tokenizer(tokens / "1"), tokenizer_2=write_clip_tokenizer(tokens / "2", pad_token="!"),
        unet=refs["unet"], scheduler=diffusers.EulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        force_zeros_for_empty_prompt=False)
    reference.set_progress_bar_config(disable=True)
    loras = tmp_path_factory.mktemp("xl_loras")
    ours = Pipeline(load_model(folder), dtype="fp32", lora_dir=loras)
    adapters = make_adapters(reference, {"xl_locon": ("lora", 31), "xl_peft": ("lora", 34), "xl_loha": ("loha", 37),
                                         "xl_lokr": ("lokr", 40)}, ("unet", "text_encoder", "text_encoder_2"))
    sgm = original_unet_layer_names(refs["unet"], config.unet)
    files = {
        "xl_locon": write_kohya_lora(loras / "xl_locon.safetensors", adapters["xl_locon"], unet_names=sgm),
        "xl_peft": write_diffusers_lora(loras / "xl_peft.safetensors", diffusers.StableDiffusionXLPipeline,
                                        adapters["xl_peft"]),
        "xl_loha": write_lycoris(loras / "xl_loha.safetensors", adapters["xl_loha"], unet_names=sgm),
        "xl_lokr": write_lycoris(loras / "xl_lokr.safetensors", adapters["xl_lokr"], unet_names=sgm),
    }
    return Pair(ours, reference, pixels(generate(ours)), adapters, files)


def images_of(reference, latents: torch.Tensor) -> np.ndarray:
    """diffusers' own decoding of its latents into pixels (what output_type="pil" holds), (B, H, W, 3)."""
    with torch.no_grad():
        decoded = reference.vae.decode(latents / reference.vae.config.scaling_factor).sample
    return (reference.image_processor.postprocess(decoded, output_type="np") * 255).round().astype(int)


def compare(pair: Pair, reference=None, prompt: str = PROMPT) -> dict[str, float]:
    """kedavra with `prompt` (LoRA tags in it) against `reference` (default: pair.reference) with the plain prompt,
    at one seed; asserts the bars and that the adapters changed the image, and returns {"latent": max relative
    error, "pixel": max error in 1/255, "changed": the most a pixel moved from kedavra's image without LoRAs}."""
    result = generate(pair.ours, prompt)
    theirs = (reference or pair.reference)(
        **REQUEST, num_inference_steps=STEPS, height=32, width=32, generator=torch.Generator().manual_seed(SEED),
        output_type="latent").images
    errors = {"latent": ((result.latents - theirs).abs().max() / theirs.abs().max()).item(),
              "pixel": int(np.abs(pixels(result) - images_of(reference or pair.reference, theirs)).max()),
              "changed": int(np.abs(pixels(result) - pair.plain).max())}
    assert errors["latent"] < LATENT_REL_TOL and errors["pixel"] <= PIXEL_TOL and errors["changed"] > CHANGED, errors
    return errors


def swapped(reference, **modules):
    """diffusers' pipeline of `reference`'s class over its components with `modules` (peft-injected copies) in."""
    extra = ({"requires_safety_checker": False} if "safety_checker" in reference.components
             else {"force_zeros_for_empty_prompt": reference.config.force_zeros_for_empty_prompt})
    pipeline = type(reference)(**{**reference.components, **modules}, **extra)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def clean(request):
    """The test leaves the pipelines it used (fixtures sd, sdxl) without LoRAs."""
    yield
    for name in ("sd", "sdxl"):
        if name in request.fixturenames:
            pair = request.getfixturevalue(name)
            pair.ours.unload_lora()
            pair.reference.unload_lora_weights()


def state(ours) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ours.model.state_dict().items()}


def assert_bitwise(ours, expected: dict[str, torch.Tensor]) -> None:
    now = ours.model.state_dict()
    changed = [k for k, v in expected.items() if not (now[k].dtype == v.dtype and torch.equal(now[k], v))]
    assert not changed, changed[:5]


# ---- SD 1.x against diffusers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("unet_weight,text_encoder_weight", [(1.0, None), (0.6, None), (1.3, 0.4)])
def test_kohya_locon_matches_diffusers(sd, clean, unet_weight, text_encoder_weight):
    """A kohya LoCon (attention, ResBlock, down/upsampler layers; α / r = 2 on the U-Net, 0.5 on the encoder) through
    load_lora at a weight, and at A1111's separate text-encoder and U-Net weights (diffusers: set_adapters with a
    per-component dict)."""
    te = unet_weight if text_encoder_weight is None else text_encoder_weight
    sd.reference.load_lora_weights(sd.files["locon"], adapter_name="locon")
    sd.reference.set_adapters(["locon"], adapter_weights=[{"unet": unet_weight, "text_encoder": te}])
    sd.ours.load_lora(sd.files["locon"], unet_weight, text_encoder_weight=text_encoder_weight)
    print(f"SD 1.x kohya LoCon, U-Net {unet_weight} / TE {te}: {compare(sd)}")


@pytest.mark.parametrize("tag,weights", [("<lora:peft_lora:0.7>", {"unet": 0.7, "text_encoder": 0.7}),
                                         ("<lora:peft_lora:0.4:1.1>", {"unet": 1.1, "text_encoder": 0.4})])
def test_diffusers_file_in_a_prompt_tag_matches_diffusers(sd, clean, tag, weights):
    """A diffusers / PEFT file (lora_alpha in its adapter metadata; the encoder's names without transformers 5's
    missing `text_model.`) named by A1111's tag, against set_adapters."""
    sd.reference.load_lora_weights(sd.files["peft_lora"], adapter_name="peft_lora")
    sd.reference.set_adapters(["peft_lora"], adapter_weights=[weights])
    print(f"SD 1.x diffusers LoRA {tag}: {compare(sd, prompt=f'{PROMPT} {tag}')}")


def test_two_loras_stack_as_diffusers_set_adapters(sd, clean):
    """load_lora's kohya LoCon at 0.8 and a tag's diffusers LoRA at -0.5 add up as set_adapters([...], [0.8, -0.5])."""
    sd.reference.load_lora_weights(sd.files["locon"], adapter_name="locon")
    sd.reference.load_lora_weights(sd.files["peft_lora"], adapter_name="peft_lora")
    sd.reference.set_adapters(["locon", "peft_lora"], adapter_weights=[0.8, -0.5])
    sd.ours.load_lora("locon", 0.8)
    print(f"SD 1.x two LoRAs: {compare(sd, prompt=f'{PROMPT} <lora:peft_lora:-0.5>')}")


def test_dora_file_matches_diffusers_at_weight_one(sd, clean):
    """DoRA (Liu et al. 2024) from a diffusers file (lora_magnitude_vector, convolutions' (1, out, 1, 1) included) at
    weight 1, where every convention agrees. The U-Net's reference is diffusers' load_lora_weights; the encoder's is
    peft's module, since diffusers 0.42 with transformers 5 leaves the encoder's magnitudes at their initial values
    (transformers' load_adapter: `lora_magnitude_vector` UNEXPECTED, `lora_magnitude_vector.weight` MISSING)."""
    sd.reference.load_lora_weights(sd.files["dora"], adapter_name="dora")
    sd.ours.load_lora(sd.files["dora"])
    errors = compare(sd, swapped(sd.reference, text_encoder=sd.adapters["dora"]["text_encoder"]))
    print(f"SD 1.x DoRA, diffusers file: {errors}")


def test_kohya_dora_matches_the_peft_modules(sd, clean):
    """DoRA from a kohya file (`dora_scale`, one value per output row of each Linear layer) at weight 1. diffusers 0.42
    drops `dora_scale` from kohya files ("not compatible in Diffusers at the moment"), so the reference is peft's
    DoRA modules themselves."""
    sd.ours.load_lora(sd.files["dora_kohya"])
    print(f"SD 1.x DoRA, kohya file: {compare(sd, swapped(sd.reference, **sd.adapters['dora_kohya']))}")


@pytest.mark.parametrize("kind", ["loha", "lokr"])
@pytest.mark.parametrize("tag,strengths", [("1", (1.0, 1.0)), ("0.5:1.2", (0.5, 1.2))])
def test_lycoris_file_matches_the_peft_modules(sd, clean, kind, tag, strengths):
    """A LyCORIS LoHa / LoKr file (CP-decomposed 3x3 convolutions: hada_t1 / hada_t2, lokr_t2) named in a tag, against
    peft's LoHa / LoKr modules at the tag's strengths (scaling = strength · α / r) inside diffusers' pipeline."""
    models = sd.adapters[kind]
    set_strength(models["text_encoder"], strengths[0])
    set_strength(models["unet"], strengths[1])
    try:
        errors = compare(sd, swapped(sd.reference, **models), prompt=f"{PROMPT} <lora:{kind}:{tag}>")
    finally:
        set_strength(models["text_encoder"], 1.0)
        set_strength(models["unet"], 1.0)
    print(f"SD 1.x LyCORIS {kind} <lora:{kind}:{tag}>: {errors}")


MERGED_CASES = {  # id: (kind, file format, CP-decomposed 3x3 convolutions, LoraConfig options)
    "lora-kohya": ("lora", "kohya", False, {}),
    "lora-diffusers-rslora-alpha_pattern": ("lora", "diffusers", False,
                                            {"use_rslora": True, "alpha_pattern": {"to_q": 16, "fc1": 1}}),
    "dora-diffusers": ("dora", "diffusers", False, {}),
    "loha-cp": ("loha", "lycoris", True, {}),
    "loha-flat": ("loha", "lycoris", False, {}),
    "lokr-cp": ("lokr", "lycoris", True, {}),
    "lokr-flat": ("lokr", "lycoris", False, {}),
}


@pytest.mark.parametrize("case", MERGED_CASES)
def test_merged_unet_and_text_encoder_match_peft(sd, tmp_path, case):
    """The tight check, per adapter type, file format and convolution layout: one U-Net evaluation and the text
    encoder's states of kedavra's merged model against peft's unmerged modules. rsLoRA's α / √r (Kalajdzievski 2023)
    and a per-layer alpha_pattern reach kedavra only through the diffusers file's adapter metadata."""
    kind, file_format, effective_conv, options = MERGED_CASES[case]
    models = {"unet": with_adapter(sd.reference.unet, kind, "unet", 50, effective_conv, **options),
              "text_encoder": with_adapter(sd.reference.text_encoder, kind, "text_encoder", 51, **options)}
    path = tmp_path / f"{case}.safetensors"
    if file_format == "kohya":
        write_kohya_lora(path, models, te_prefix="lora_te_")
    elif file_format == "diffusers":
        write_diffusers_lora(path, diffusers.StableDiffusionPipeline, models)
    else:
        write_lycoris(path, models, te_prefix="lora_te_")
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 16, 16, generator=generator)  # (B, C, H, W) latents
    context = torch.randn(2, 77, PRESETS["tiny"].unet.context_dim, generator=generator)  # (B, L, D)
    t = torch.tensor([10.0, 980.0])
    ids = sd.ours.model.tokenizer(["a photo of an astronaut riding a horse", ""])
    sd.ours.load_lora(path)
    try:
        with torch.no_grad():
            unet = sd.ours.model.unet(x, t, context) - models["unet"](x, t, encoder_hidden_states=context).sample
            text = sd.ours.model.text_encoder(ids) - models["text_encoder"](ids).last_hidden_state
    finally:
        sd.ours.unload_lora()
    errors = {"unet": unet.abs().max().item(), "text_encoder": text.abs().max().item()}
    print(f"SD 1.x {case}, merged vs peft: {errors}")
    assert max(errors.values()) < OUTPUT_ATOL, errors


# ---- SDXL against diffusers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("unet_weight,text_encoder_weight", [(1.0, None), (0.9, 0.4)])
def test_sdxl_kohya_locon_in_sgm_names_matches_diffusers(sdxl, clean, unet_weight, text_encoder_weight):
    """An SDXL kohya LoCon (U-Net in SGM names lora_unet_input_blocks_..., which diffusers' loader maps through
    _maybe_map_sgm_blocks_to_diffusers; lora_te1_ / lora_te2_ encoders) through load_lora; A1111's text-encoder
    weight applies to both encoders."""
    te = unet_weight if text_encoder_weight is None else text_encoder_weight
    sdxl.reference.load_lora_weights(sdxl.files["xl_locon"], adapter_name="xl_locon")
    sdxl.reference.set_adapters(["xl_locon"], adapter_weights=[{"unet": unet_weight, "text_encoder": te,
                                                                "text_encoder_2": te}])
    sdxl.ours.load_lora(sdxl.files["xl_locon"], unet_weight, text_encoder_weight=text_encoder_weight)
    print(f"SDXL kohya LoCon, U-Net {unet_weight} / TE {te}: {compare(sdxl)}")


def test_sdxl_diffusers_file_in_a_prompt_tag_matches_diffusers(sdxl, clean):
    sdxl.reference.load_lora_weights(sdxl.files["xl_peft"], adapter_name="xl_peft")
    sdxl.reference.set_adapters(["xl_peft"], adapter_weights=[{"unet": 1.2, "text_encoder": 0.6,
                                                               "text_encoder_2": 0.6}])
    print(f"SDXL diffusers LoRA: {compare(sdxl, prompt=f'{PROMPT} <lora:xl_peft:0.6:1.2>')}")


@pytest.mark.parametrize("kind", ["xl_loha", "xl_lokr"])
def test_sdxl_lycoris_file_matches_the_peft_modules(sdxl, clean, kind):
    models = sdxl.adapters[kind]
    for component, strength in (("unet", 0.8), ("text_encoder", 1.3), ("text_encoder_2", 1.3)):
        set_strength(models[component], strength)
    try:
        errors = compare(sdxl, swapped(sdxl.reference, **models), prompt=f"{PROMPT} <lora:{kind}:1.3:0.8>")
    finally:
        for model in models.values():
            set_strength(model, 1.0)
    print(f"SDXL LyCORIS {kind}: {errors}")


def test_sdxl_lora_as_diffusers_converter_writes_it_matches_diffusers(sdxl, clean, tmp_path):
    path = write_converted_lora(tmp_path / "converted.safetensors", sdxl.adapters["xl_locon"])
    sdxl.reference.load_lora_weights(path, adapter_name="converted")
    sdxl.ours.load_lora(path)
    print(f"SDXL diffusers-converted kohya LoRA: {compare(sdxl)}")


def test_sd1_lora_as_diffusers_converter_writes_it_matches_diffusers(sd, clean, tmp_path):
    path = write_converted_lora(tmp_path / "converted.safetensors", sd.adapters["locon"])
    sd.reference.load_lora_weights(path, adapter_name="converted")
    sd.ours.load_lora(path)
    print(f"SD 1.x diffusers-converted kohya LoRA: {compare(sd)}")


# ---- loading, unloading, refusing ------------------------------------------------------------------------------------


def test_unload_restores_every_parameter_bitwise(sd, clean):
    """After LoRAs of every type (load_lora and a prompt tag), unloading one leaves bitwise what loading the others
    alone gives, and unloading all bitwise the original weights."""
    ours = sd.ours
    before = state(ours)
    ours.load_lora(sd.files["dora"])
    dora_alone = state(ours)
    ours.unload_lora()
    ours.load_lora(sd.files["locon"], 0.8, text_encoder_weight=0.3)
    ours.load_lora(sd.files["dora"])
    generate(ours, f"{PROMPT} <lora:loha:0.5> <lora:lokr:0.7>")
    ours.unload_lora("locon")
    generate(ours)
    assert_bitwise(ours, dora_alone)
    ours.unload_lora()
    assert_bitwise(ours, before)


def test_an_sdxl_lora_on_sd1_is_refused_and_changes_nothing(sd, sdxl, clean):
    """An SDXL kohya LoCon on the SD 1.x tiny model: its SGM U-Net names are the LDM names SD 1.x LoRAs may use too,
    so 79 of its 143 layers find a layer (many of the same shape); the encoders' lora_te1_ / lora_te2_ and the
    other 64 do not, and strict loading refuses it."""
    before = state(sd.ours)
    with pytest.raises(LoraFileError, match=r"\d+ of its \d+ layers match no layer of this tiny model"):
        sd.ours.load_lora(sdxl.files["xl_locon"])
    assert_bitwise(sd.ours, before)


def test_the_refusal_of_an_sdxl_lora_on_sd1_names_both_architectures(sd, sdxl, clean):
    with pytest.raises(LoraFileError) as refused:
        sd.ours.load_lora(sdxl.files["xl_locon"])
    assert "SDXL" in str(refused.value) and "this tiny model" in str(refused.value)


def test_an_unmatched_layer_is_refused_or_skipped_with_a_warning(sd, clean, tmp_path):
    """strict=True refuses a file with a layer the model lacks, naming it; strict=False applies the rest (what
    diffusers' load_lora_weights applies of the file without it) and warns."""
    extra = "lora_unet_down_blocks_7_resnets_0_conv1"
    tensors = load_file(sd.files["locon"]) | {f"{extra}.lora_down.weight": torch.ones(4, 32, 3, 3),
                                              f"{extra}.lora_up.weight": torch.ones(32, 4, 1, 1),
                                              f"{extra}.alpha": torch.tensor(8.0)}
    save_file(tensors, tmp_path / "extra.safetensors")
    before = state(sd.ours)
    with pytest.raises(LoraFileError, match=rf"1 of its \d+ layers match no layer of this tiny model: {extra}"):
        sd.ours.load_lora(tmp_path / "extra.safetensors")
    assert_bitwise(sd.ours, before)
    with pytest.warns(UserWarning, match=rf"1 layers match no layer of this model and were skipped: {extra}"):
        sd.ours.load_lora(tmp_path / "extra.safetensors", strict=False)
    sd.reference.load_lora_weights(sd.files["locon"], adapter_name="locon")
    print(f"strict=False, the rest applied: {compare(sd)}")


# ---- where A1111 / ComfyUI / LyCORIS and peft differ ---------------------------------------------------------------


def peft_dora_layers(model: torch.nn.Module):
    """(name, W, ΔW with α / r, magnitude as peft stores it) of every DoRA layer of a peft-injected model."""
    for name, layer in model.named_modules():
        if isinstance(layer, BaseTunerLayer) and "x" in layer.scaling:
            yield (name, layer.get_base_layer().weight.detach(), layer.get_delta_weight("x").detach(),
                   layer.lora_magnitude_vector["x"].weight.detach())


def norm_per_output(weight: torch.Tensor) -> torch.Tensor:
    return weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))  # (out, 1[, 1, 1])


def norm_per_input(weight: torch.Tensor) -> torch.Tensor:
    """A1111's apply_weight_decompose: the norm of each input column, (1, in[, 1, 1])."""
    return weight.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.ndim - 2))


def test_dora_at_another_strength_scales_the_decomposed_update(sd, clean):
    """At strength s, kedavra merges W + s (W' - W) with W' = m (W + ΔW) / ‖W + ΔW‖: the decomposed update times the
    multiplier, as A1111 (network.py finalize_updown after apply_weight_decompose), ComfyUI (weight_decompose) and
    LyCORIS (functional apply_dora_scale) do. peft / diffusers put s inside: m (W + sΔW) / ‖W + sΔW‖. They agree at
    s = 1 (above); at s = 0.5 the merged weights follow A1111's form, and the U-Net output's distance to peft's is
    measured."""
    lora = read_lora(sd.files["dora"])
    for name, weight, delta, magnitude in peft_dora_layers(sd.adapters["dora"]["unet"]):
        combined = weight + delta
        decomposed = magnitude.reshape(-1, *[1] * (weight.ndim - 1)) * combined / norm_per_output(combined)
        merged = merged_weight(weight, lora.updates[f"unet.{name}"], 0.5)
        torch.testing.assert_close(merged, weight + 0.5 * (decomposed - weight), rtol=1e-5, atol=1e-6)
    unet = sd.adapters["dora"]["unet"]
    generator = torch.Generator().manual_seed(8)
    x, context = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 77, 64, generator=generator)
    set_strength(unet, 0.5)
    sd.ours.load_lora(sd.files["dora"], 0.5)
    try:
        with torch.no_grad():
            theirs = unet(x, torch.tensor([500.0]), encoder_hidden_states=context).sample
            distance = (sd.ours.model.unet(x, torch.tensor([500.0]), context) - theirs).abs().max().item()
    finally:
        set_strength(unet, 1.0)
    print(f"DoRA at 0.5: U-Net output, kedavra (A1111's form) vs peft: max |difference| {distance:.3g}, "
          f"max |peft output| {theirs.abs().max().item():.3g}")
    assert distance > 100 * OUTPUT_ATOL  # the conventions differ measurably; kedavra is A1111's


def test_kohya_dora_scale_of_a_square_convolution_is_per_input_column(sd, tmp_path):
    """peft's magnitude of a convolution is (1, out, 1, 1) (one value per output channel); diffusers'
    convert_state_dict_to_kohya copies it as `dora_scale` unchanged. In a kohya / LyCORIS file (1, C, 1, 1) is
    LyCORIS' per-input-channel layout, which A1111 (always per input column) and ComfyUI (per output only when
    dora_scale.shape[0] == out) read per input: kedavra does the same for square convolutions, and reads it per
    output where only that fits (out ≠ in). The U-Net output's distance to peft's (which meant per output) is
    measured."""
    unet = with_adapter(sd.reference.unet, "dora", "unet", 60, targets=["conv1", "conv2"])
    lora = read_lora(write_kohya_lora(tmp_path / "conv_dora.safetensors", {"unet": unet}))
    square = 0
    for name, weight, delta, magnitude in peft_dora_layers(unet):
        combined = weight + delta
        assert magnitude.shape == (1, weight.shape[0], 1, 1)
        if weight.shape[0] == weight.shape[1]:
            square += 1
            expected = magnitude * combined / norm_per_input(combined)  # (1, C, 1, 1) as (1, in, 1, 1)
        else:
            expected = magnitude.reshape(-1, 1, 1, 1) * combined / norm_per_output(combined)
        merged = merged_weight(weight, lora.updates["lora_unet_" + name.replace(".", "_")], 1.0)
        torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)
    assert square >= 4
    generator = torch.Generator().manual_seed(9)
    x, context = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 77, 64, generator=generator)
    sd.ours.load_lora(tmp_path / "conv_dora.safetensors")
    try:
        with torch.no_grad():
            theirs = unet(x, torch.tensor([500.0]), encoder_hidden_states=context).sample
            distance = (sd.ours.model.unet(x, torch.tensor([500.0]), context) - theirs).abs().max().item()
    finally:
        sd.ours.unload_lora()
    print(f"kohya DoRA on convolutions ({square} square): U-Net output, kedavra (LyCORIS / A1111 / ComfyUI reading) "
          f"vs peft: max |difference| {distance:.3g}, max |peft output| {theirs.abs().max().item():.3g}")


def test_lokr_with_both_factors_whole_is_scaled_by_one(tmp_path):
    """A LoKr layer whose two factors are both stored whole (lokr_w1, lokr_w2: peft's and LyCORIS' choice when
    r ≥ max(c, d) / 2) has scale 1 in A1111 (network_lokr: no lokr_w1_b / lokr_w2_b, so no dim, calc_scale 1),
    ComfyUI and LyCORIS (lokr.py: both whole, alpha = lora_dim); peft scales it by α / r all the same."""

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(32, 32)

    config = LoKrConfig(r=16, alpha=ALPHAS["unet"], target_modules=["proj"])  # the alpha write_lycoris writes
    model = inject_adapter_in_model(config, Layer(), "x")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".x" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    update = read_lora(write_lycoris(tmp_path / "whole.safetensors", {"unet": model})).updates["lora_unet_proj"]
    assert set(update.tensors) == {"lokr_w1", "lokr_w2"} and update.alpha == 8.0
    kron = torch.kron(model.proj.lokr_w1["x"], model.proj.lokr_w2["x"]).detach()
    torch.testing.assert_close(update.delta(kron.shape), kron)
    torch.testing.assert_close(model.proj.get_delta_weight("x").detach(), 8 / 16 * kron)  # peft: α / r = 0.5
