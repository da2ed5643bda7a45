"""Diffusers folders whose sizes are none of kedavra's presets, loaded as their config.json files describe them:
a whole text-to-image run against diffusers' StableDiffusionPipeline on the same folder, and configs outside SD's
vocabulary refused by field."""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from reference_models import randomize  # noqa: E402
from test_pipeline_parity import IMAGE_TOL, LATENT_REL_TOL, clip_tokenizer  # noqa: E402

from kedavra.checkpoint import CheckpointError, load_model  # noqa: E402
from kedavra.networks.tokenizer import VOCAB_SIZE  # noqa: E402
from kedavra.pipeline.pipeline import Pipeline  # noqa: E402

# A block-removed, narrow SD: no mid block (BK-SDM), attention only at the second level, one resnet per level,
# heads per level, an exact-GELU 3-layer text encoder of width 48 and a three-level VAE (f = 4).
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            mid_block_type=None, layers_per_block=1, attention_head_dim=(2, 4), cross_attention_dim=48,
            norm_num_groups=8)
TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=100, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu")
VAE = dict(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
           up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, norm_num_groups=8,
           sample_size=32, scaling_factor=0.5)


def write_folder(folder, seed: int = 0):
    """A diffusers folder of the sizes above with random weights; returns (text, unet, vae, scheduler)."""
    generator = torch.Generator().manual_seed(seed)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT))
    unet = diffusers.UNet2DConditionModel(**UNET)
    vae = diffusers.AutoencoderKL(**VAE)
    for name, model in (("text_encoder", text), ("unet", unet), ("vae", vae)):
        randomize(model, generator)
        model.eval().save_pretrained(folder / name)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1)
    scheduler.save_pretrained(folder / "scheduler")
    clip_tokenizer(folder / "tokenizer").save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return text, unet, vae, scheduler


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("bk_sd")
    return path, write_folder(path)


def test_the_folder_loads_with_the_sizes_its_configs_give(folder):
    path, _ = folder
    model = load_model(path)
    config = model.config
    assert config.family == path.name and config.image_size == 8 * 4  # unet sample_size x the VAE's f
    text = config.text_encoder
    assert (text.width, text.num_layers, text.activation) == (48, 3, "gelu")
    assert config.vae.downsample_factor == 4 and config.vae.scaling_factor == 0.5
    assert "described by the folder's unet/, text_encoder/ and vae/ config.json" in model.source


def test_text_to_image_matches_diffusers_on_the_same_folder(folder):
    path, (text, unet, vae, scheduler) = folder
    ours = Pipeline(load_model(path), dtype="fp32")
    reference = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(path / "tokenizer"),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    size, kwargs = ours.config.image_size, dict(prompt="a red circle", negative_prompt="blurry", guidance_scale=6.0)
    theirs = reference(**kwargs, num_inference_steps=6, height=size, width=size,
                       generator=torch.Generator().manual_seed(3), output_type="latent")
    result = ours(**kwargs, steps=6, sampler="euler", seed=3)
    assert ((result.latents - theirs.images).abs().max() / theirs.images.abs().max()).item() < LATENT_REL_TOL
    ref_images = (vae.decode(theirs.images / VAE["scaling_factor"]).sample / 2 + 0.5).clamp(0, 1)
    our_images = ours.model.vae.decode_latents(result.latents) / 2 + 0.5
    assert (our_images - ref_images).abs().max().item() < IMAGE_TOL


@pytest.mark.parametrize(("component", "field", "value"), [
    ("unet", "class_embed_type", "timestep"),
    ("unet", "down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    ("vae", "shift_factor", 0.1159),
    ("text_encoder", "hidden_act", "relu"),
])
def test_a_config_outside_the_vocabulary_is_refused_by_field(folder, tmp_path, component, field, value):
    path, _ = folder
    copy = tmp_path / "copy"
    for part in ("unet", "vae", "text_encoder", "scheduler", "tokenizer"):
        (copy / part).mkdir(parents=True)
        for file in (path / part).iterdir():
            (copy / part / file.name).write_bytes(file.read_bytes())
    config = json.loads((copy / component / "config.json").read_text())
    config[field] = value
    (copy / component / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"{component}/config.json: .*{field}"):
        load_model(copy)
