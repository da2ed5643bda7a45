"""SDXL text to image against diffusers' StableDiffusionXLPipeline on the same tiny weights (PRESETS["tiny-sdxl"]:
SDXL's shape at test sizes): two text encoders read at their penultimate layer, the pooled projection and the
micro-conditioning through the U-Net's added embedding, guidance with a negative prompt."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from reference_models import randomize  # noqa: E402
from test_pipeline_parity import IMAGE_TOL, LATENT_REL_TOL, clip_tokenizer  # noqa: E402

from kedavra.checkpoint.diffusers_config import same_architecture  # noqa: E402
from kedavra.networks.model import PRESETS, StableDiffusion  # noqa: E402
from kedavra.networks.text_encoder import convert_text_encoder_state_dict  # noqa: E402
from kedavra.networks.tokenizer import VOCAB_SIZE  # noqa: E402
from kedavra.networks.unet_config import UNetConfig  # noqa: E402
from kedavra.networks.unet_keys import convert_unet_state_dict  # noqa: E402
from kedavra.networks.vae_keys import convert_vae_state_dict  # noqa: E402
from kedavra.pipeline.pipeline import Pipeline  # noqa: E402

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


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(kedavra Pipeline, diffusers StableDiffusionXLPipeline) over the same random weights."""
    generator = torch.Generator().manual_seed(5)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT, hidden_act="quick_gelu"))
    text_2 = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**TEXT, hidden_act="gelu", projection_dim=32))
    unet, vae = diffusers.UNet2DConditionModel(**UNET), diffusers.AutoencoderKL(**VAE)
    for model in (text, text_2, unet, vae):
        randomize(model, generator)
        model.eval()
    model = StableDiffusion(CONFIG)
    converted = {
        "text_encoder": convert_text_encoder_state_dict(text.state_dict(), "diffusers", CONFIG.text_encoder),
        "text_encoder_2": convert_text_encoder_state_dict(text_2.state_dict(), "diffusers", CONFIG.text_encoder_2),
        "unet": convert_unet_state_dict(unet.state_dict(), "diffusers", CONFIG.unet),
        "vae": convert_vae_state_dict(vae.state_dict(), "diffusers", CONFIG.vae),
    }
    for name, state in converted.items():
        getattr(model, name).load_state_dict(state, strict=True)
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
