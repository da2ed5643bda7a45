"""SDXL text to image against diffusers' StableDiffusionXLPipeline on the same tiny weights (PRESETS["tiny-sdxl"]:
SDXL's shape at test sizes): two text encoders read at their penultimate layer, the pooled projection and the
micro-conditioning through the U-Net's added embedding, guidance with a negative prompt."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from reference_models import randomize  # noqa: E402
from test_pipeline_parity import IMAGE_TOL, LATENT_REL_TOL, clip_tokenizer  # noqa: E402

from kedavra.api import load  # noqa: E402
from kedavra.checkpoint import save_model  # noqa: E402
from kedavra.checkpoint.diffusers_config import same_architecture  # noqa: E402
from kedavra.cli import main  # noqa: E402
from kedavra.formats.png_info import read_parameters  # noqa: E402
from kedavra.networks.model import PRESETS, StableDiffusion  # noqa: E402
from kedavra.networks.text_encoder import convert_text_encoder_state_dict  # noqa: E402
from kedavra.networks.tokenizer import VOCAB_SIZE  # noqa: E402
from kedavra.networks.unet_config import UNetConfig  # noqa: E402
from kedavra.networks.unet_keys import convert_unet_state_dict  # noqa: E402
from kedavra.networks.vae_keys import convert_vae_state_dict  # noqa: E402
from kedavra.pipeline.inpainting import A1111_API_DEFAULTS  # noqa: E402
from kedavra.pipeline.pipeline import Pipeline  # noqa: E402
from kedavra.pipeline.request import GenerationRequest  # noqa: E402

CONFIG = PRESETS["tiny-sdxl"]
UNET = dict(sample_size=16, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2), cross_attention_dim=64, use_linear_projection=True,
            norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80)
TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77)
VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8,
           sample_size=32, scaling_factor=CONFIG.vae.scaling_factor)


def kedavra_model(config, parts: dict) -> StableDiffusion:
    """A StableDiffusion of `config` holding the reference modules' weights (name -> diffusers/transformers model)."""
    converters = {"text_encoder": convert_text_encoder_state_dict, "text_encoder_2": convert_text_encoder_state_dict,
                  "unet": convert_unet_state_dict, "vae": convert_vae_state_dict}
    model = StableDiffusion(config)
    for name, reference in parts.items():
        state = converters[name](reference.state_dict(), "diffusers", getattr(config, name))
        getattr(model, name).load_state_dict(state, strict=True)
    return model


def bigg(generator):
    text = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**TEXT, hidden_act="gelu", projection_dim=32))
    randomize(text, generator)
    return text.eval()


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(kedavra Pipeline, diffusers StableDiffusionXLPipeline) over the same random weights."""
    generator = torch.Generator().manual_seed(5)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT, hidden_act="quick_gelu"))
    text_2 = bigg(generator)
    unet, vae = diffusers.UNet2DConditionModel(**UNET), diffusers.AutoencoderKL(**VAE)
    for module in (text, unet, vae):
        randomize(module, generator)
        module.eval()
    model = kedavra_model(CONFIG, {"text_encoder": text, "text_encoder_2": text_2, "unet": unet, "vae": vae})
    folder = tmp_path_factory.mktemp("tok")
    tokenizer = clip_tokenizer(folder / "1")
    tokenizer_2 = transformers.CLIPTokenizer(str(folder / "1" / "vocab.json"), str(folder / "1" / "merges.txt"),
                                             pad_token="!", model_max_length=77)  # OpenCLIP pads with id 0
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1)
    reference = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
        scheduler=scheduler, force_zeros_for_empty_prompt=False)
    reference.set_progress_bar_config(disable=True)
    return Pipeline(model, dtype="fp32"), reference


def test_the_diffusers_config_describes_the_preset():
    assert same_architecture(UNetConfig.from_diffusers(dict(diffusers.UNet2DConditionModel(**UNET).config)),
                             CONFIG.unet)


@pytest.mark.parametrize("size", [(32, 32), (48, 32)])
def test_text_to_image_matches_diffusers(both, size):
    ours, reference = both
    width, height = size
    kwargs = dict(prompt="a red circle above a blue square", negative_prompt="blurry", guidance_scale=5.0)
    theirs = reference(**kwargs, num_inference_steps=8, height=height, width=width, num_images_per_prompt=2,
                       generator=[torch.Generator().manual_seed(7 + i) for i in range(2)], output_type="latent")
    result = ours(**kwargs, steps=8, sampler="euler", seed=7, num_images=2, width=width, height=height)
    rel = ((result.latents - theirs.images).abs().max() / theirs.images.abs().max()).item()
    assert rel < LATENT_REL_TOL
    ref_images = (reference.vae.decode(theirs.images / VAE["scaling_factor"]).sample / 2 + 0.5).clamp(0, 1)
    our_images = ours.model.vae.decode_latents(result.latents) / 2 + 0.5
    assert (our_images - ref_images).abs().max().item() < IMAGE_TOL


def test_micro_conditioning_reaches_the_unet(both):
    """The same seed with another original size and crop (Podell et al. 2023, sec. 2.2) moves the result, as in
    diffusers, and matches diffusers' result for the same values."""
    ours, reference = both
    kwargs = dict(prompt="a red circle", negative_prompt="blurry", guidance_scale=5.0)
    plain = ours(**kwargs, steps=4, seed=3).latents
    shifted = ours(**kwargs, steps=4, seed=3, original_size=(64, 96), crop_top_left=(8, 16)).latents
    theirs = reference(**kwargs, num_inference_steps=4, height=32, width=32, original_size=(64, 96),
                       crops_coords_top_left=(8, 16), generator=torch.Generator().manual_seed(3),
                       output_type="latent").images
    assert not torch.allclose(plain, shifted)
    assert ((shifted - theirs).abs().max() / theirs.abs().max()).item() < LATENT_REL_TOL


@pytest.fixture(scope="module")
def refiners(both):
    """(kedavra refiner Pipeline, diffusers StableDiffusionXLImg2ImgPipeline): bigG alone and a refiner-shaped U-Net
    (5 micro-conditioning values), sharing the base's VAE."""
    _, reference = both
    config = PRESETS["tiny-sdxl-refiner"]
    generator = torch.Generator().manual_seed(9)
    text = bigg(generator)
    unet = diffusers.UNet2DConditionModel(**{**UNET, "cross_attention_dim": 32,
                                             "projection_class_embeddings_input_dim": 32 + 5 * 8})
    randomize(unet, generator)
    unet.eval()
    model = kedavra_model(config, {"text_encoder": text, "unet": unet})
    model.vae.load_state_dict(convert_vae_state_dict(reference.vae.state_dict(), "diffusers", config.vae))
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=reference.vae, text_encoder=None, text_encoder_2=text, tokenizer=None, tokenizer_2=reference.tokenizer_2,
        unet=unet, scheduler=reference.scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    refiner.set_progress_bar_config(disable=True)
    return Pipeline(model, dtype="fp32"), refiner


def test_base_then_refiner_matches_diffusers_denoising_end_and_start(both, refiners):
    """The base samples the noisiest 80% of the training timesteps, the refiner the rest, in one Euler run: what
    diffusers computes with denoising_end=0.8 on the base and denoising_start=0.8 on the refiner."""
    (ours, reference), (our_refiner, their_refiner) = both, refiners
    kwargs = dict(prompt="a red circle", negative_prompt="blurry", guidance_scale=5.0)
    handed_over = reference(**kwargs, num_inference_steps=10, height=32, width=32, denoising_end=0.8,
                            generator=torch.Generator().manual_seed(4), output_type="latent").images
    theirs = their_refiner(**kwargs, image=handed_over, num_inference_steps=10, denoising_start=0.8,
                           output_type="latent").images
    result = ours.generate(GenerationRequest.build(**kwargs, steps=10, seed=4, refiner_switch_at=0.8),
                           refiner=our_refiner)
    assert ((result.latents - theirs).abs().max() / theirs.abs().max()).item() < LATENT_REL_TOL
    alone = ours(**kwargs, steps=10, seed=4).latents
    assert not torch.allclose(alone, result.latents)  # the refiner did change the image


def test_the_refiner_finishes_an_a1111_inpainting_run(both, refiners):
    """The refiner refines the whole picture the base inpainted: the base's mask and A1111 mask settings stay with
    the base (they once reached the refiner's request without its mask and were refused there)."""
    (ours, _), (our_refiner, _) = both, refiners
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    kwargs = dict(init_image=init, mask=mask, inpaint=A1111_API_DEFAULTS, sampler="Euler",
                  schedule_type="Automatic", steps=4, seed=1)
    refined = ours.generate(GenerationRequest.build("a red circle", **kwargs, refiner_switch_at=0.5),
                            refiner=our_refiner)
    alone = ours.generate(GenerationRequest.build("a red circle", **kwargs))
    assert refined.images[0].size == alone.images[0].size == (32, 32)
    assert not torch.equal(refined.latents, alone.latents)


def test_a_refiner_is_no_base_and_a_base_no_refiner(both, refiners):
    (ours, _), (our_refiner, _) = both, refiners
    with pytest.raises(ValueError, match="is an SDXL refiner: it refines an image"):
        our_refiner("a red circle", steps=2)
    with pytest.raises(ValueError, match="is an SDXL base model; the refiner stage needs"):
        ours.generate(GenerationRequest.build("a red circle", steps=2), refiner=ours)


@pytest.fixture(scope="module")
def sdxl_files(both, refiners, tmp_path_factory):
    """The tiny base and refiner as kedavra files in one models folder."""
    folder = tmp_path_factory.mktemp("sdxl_models")
    save_model(both[0].model, folder / "base.safetensors")
    save_model(refiners[0].model, folder / "refiner.safetensors")
    return folder


def test_the_cli_runs_the_refiner_writes_it_to_the_png_and_reproduces_from_it(sdxl_files, tmp_path):
    base, refiner = sdxl_files / "base.safetensors", sdxl_files / "refiner.safetensors"
    common = ["--model", str(base), "--refiner", str(refiner), "--precision", "fp32", "-q"]
    out = tmp_path / "refined.png"
    assert main(["generate", "a red circle", "--negative", "blurry", "--steps", "6", "--seed", "2", "--sampler",
                 "euler", "--refiner-switch-at", "0.7", *common, "-o", str(out)]) == 0
    params = read_parameters(out)
    assert params.extra["Refiner"].startswith("refiner [") and params.extra["Refiner switch at"] == "0.7"
    pipe, refine = load(base, dtype="fp32"), load(refiner, dtype="fp32")
    request = GenerationRequest.build("a red circle", "blurry", steps=6, seed=2, sampler="euler",
                                      refiner_switch_at=0.7)
    expected = pipe.generate(request, refiner=refine).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), *common, "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), np.asarray(expected))


def test_the_server_takes_a1111s_refiner_fields(sdxl_files):
    httpx = pytest.importorskip("httpx")
    serving = pytest.importorskip("test_serving")
    catalog = serving.ModelCatalog(sdxl_files, initial=sdxl_files / "base.safetensors")
    entry = catalog.identify(catalog.find("base"))
    worker = serving.Worker(serving.loader(entry.path), entry, catalog, serving.loader)
    body = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 4, "seed": 5,
            "refiner_checkpoint": "refiner", "refiner_switch_at": 0.5}
    config = serving.ServerConfig(api_key=None, max_body_bytes=serving.BODY_LIMIT)
    with serving.serve(worker, config) as url, httpx.Client(base_url=url, timeout=60) as http:
        answer = http.post("/sdapi/v1/txt2img", json=body)
        assert answer.status_code == 200, answer.text
        infotext = json.loads(answer.json()["info"])["infotexts"][0]
        assert "Refiner: refiner [" in infotext and "Refiner switch at: 0.5" in infotext
        unknown = http.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "nowhere"})
        assert unknown.status_code == 422 and "refiner_checkpoint" in unknown.text


def test_training_refuses_an_sdxl_init_by_name(sdxl_files, tmp_path):
    from kedavra.training.config import TrainConfig
    from kedavra.training.models import build_model

    config = TrainConfig(data="shapes", init=str(sdxl_files / "base.safetensors"), out_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="is an SDXL model .*fine-tunes SD 1.x / 2.x-style models"):
        build_model(config)
