"""SDXL at full size, fp32, random weights: every component against its reference, from both checkpoint layouts.

Oracles: transformers' CLIPTextModel (CLIP ViT-L, SDXL's text_encoder) and CLIPTextModelWithProjection (OpenCLIP
ViT-bigG, text_encoder_2), diffusers' UNet2DConditionModel built from the released unet/config.json of SDXL base and
refiner (tests/test_unet_configs.py) and AutoencoderKL shaped like the SDXL VAE, every parameter re-drawn under a
fixed seed (reference_models.randomize). kedavra's module is built on the meta device and receives the reference's
tensors as views (load_state_dict(assign=True)), so a model costs the memory of one fp32 copy: the U-Nets are 10.3 GB
(base) and 9.3 GB (refiner). The original layout is Stability's SGM single file: the U-Net and VAE through
tests/sd_keys.py, ViT-L in transformers' names, bigG in OpenCLIP's (test_text_encoder.to_open_clip_names), as
reference_models.sgm_state_dict writes them (prefixes stripped, as the loader strips them).

One model family at a time: each class's reference is built once (class-scoped fixture) and freed before the next
class builds its own. One run of the file (OMP_NUM_THREADS=2, 2-core CPU): 2 min, peak resident memory (VmHWM) 10.7 GB,
set by the base U-Net; every output was bitwise the reference's except bigG's pooled embedding from the SGM layout
(4.8e-7 relative: its text_projection arrives transposed, a non-contiguous weight, another matmul kernel).
The tiny-config versions of these checks run in the default suite (tests/test_sdxl_checkpoint.py).
"""

import gc

import pytest
import sd_keys
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from reference_models import clip_text_config, max_errors, randomize
from test_text_encoder import to_open_clip_names
from test_unet_configs import SDXL_BASE, SDXL_REFINER, diffusers_to_ldm
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from kedavra.networks.model import PRESETS
from kedavra.networks.text_encoder import TextEncoder, convert_text_encoder_state_dict
from kedavra.networks.tokenizer import Tokenizer
from kedavra.networks.unet import UNet
from kedavra.networks.unet_config import UNetConfig
from kedavra.networks.unet_keys import convert_unet_state_dict
from kedavra.networks.vae import AutoencoderKL as KedavraVAE
from kedavra.networks.vae_keys import convert_vae_state_dict

REL_TOL = 1e-4  # fp32: max |ours - reference| / max |reference|, the bound at full size
PROMPTS = ["a photo of an astronaut riding a horse", ""]
LATENT = 16  # a 128 x 128 image: small enough for fp32 on a 2-core CPU, every level still above 1 x 1
SDXL = PRESETS["sdxl"]


def assert_close(name: str, ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape, (name, ours.shape, reference.shape)
    absolute, relative = max_errors(ours, reference)
    print(f"{name}: max abs error {absolute:.3g}, relative {relative:.3g}")  # shown with pytest -s
    assert relative <= REL_TOL, (name, absolute, relative)


def kedavra_module(module_class, config, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """kedavra's module built on the meta device, its parameters the given tensors (views: no copy)."""
    with torch.device("meta"):
        module = module_class(config)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


@pytest.fixture(scope="class")
def free_after():
    """Frees the class's references (pytest drops the class-scoped fixtures first) before the next class builds."""
    yield
    gc.collect()


# ---- text encoders ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="class")
def text_refs(free_after):
    """ViT-L then bigG, about 0.5 + 2.8 GB in fp32."""
    generator = torch.Generator().manual_seed(0)
    refs = {}
    for name, model_class in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        model = model_class(clip_text_config(getattr(SDXL, name)))
        randomize(model, generator)
        refs[name] = model.eval()
    return refs


def sgm_text_state(name: str, reference: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The encoder as sd_xl_base_1.0.safetensors holds it (conditioner.embedders.N. stripped) and its layout."""
    state = reference.state_dict()
    if name == "text_encoder":  # FrozenCLIPEmbedder: transformers' CLIPTextModel under .transformer.
        return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}, "ldm_sd1"
    return to_open_clip_names(state), "ldm_sd2"  # FrozenOpenCLIPEmbedder2: open_clip's names under .model.


@pytest.mark.slow  # full-size ViT-L and bigG in fp32: ~25 s for the class on a 2-core CPU, ~3.5 GB
class TestTextEncoders:
    @pytest.mark.parametrize("layout", ["diffusers", "sgm"])
    @pytest.mark.parametrize("name", ["text_encoder", "text_encoder_2"])
    def test_penultimate_states_and_pooled_embedding(self, text_refs, name, layout):
        config = getattr(SDXL, name)
        reference = text_refs[name]
        if layout == "diffusers":
            state, converter_layout = reference.state_dict(), "diffusers"
        else:
            state, converter_layout = sgm_text_state(name, reference)
        ours = kedavra_module(TextEncoder, config, convert_text_encoder_state_dict(state, converter_layout, config))
        ids = Tokenizer(SDXL.tokenizer if name == "text_encoder" else SDXL.tokenizer_2)(PROMPTS)
        with torch.no_grad():
            hidden, pooled = ours.encode(ids)
            expected = reference(ids, output_hidden_states=True)
        assert_close(f"{name} {layout} hidden", hidden, expected.hidden_states[-2])
        expected_pooled = expected.text_embeds if config.projection_dim else expected.pooler_output
        assert_close(f"{name} {layout} pooled", pooled, expected_pooled)


# ---- U-Nets -----------------------------------------------------------------------------------------------------


def reference_unet(config: dict, seed: int) -> UNet2DConditionModel:
    """diffusers' U-Net from a released config: built on the meta device (its own init would be wasted), then
    given memory and re-drawn. It has no buffers, so to_empty leaves nothing unset."""
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    assert not list(model.buffers())
    model.to_empty(device="cpu")
    randomize(model, torch.Generator().manual_seed(seed))
    return model.eval()


def unet_inputs(config: UNetConfig, micro_conditioning: list[float]):
    """Batch 2 (a guidance pair's shape): latents, two timesteps, a 77-token context, pooled embeds and time ids."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, config.in_channels, LATENT, LATENT, generator=generator)
    t = torch.tensor([10.0, 980.0])
    context = torch.randn(2, 77, config.context_dim, generator=generator)
    pooled = config.addition_embed_input_dim - len(micro_conditioning) * config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled, generator=generator),
             "time_ids": torch.tensor([micro_conditioning, micro_conditioning[::-1]])}
    return x, t, context, added


def check_unet(reference: UNet2DConditionModel, config: UNetConfig, layout: str, micro_conditioning: list[float]):
    state = reference.state_dict()
    if layout == "ldm":
        state = diffusers_to_ldm(state, config)  # sgm's openaimodel.py names (views)
    ours = kedavra_module(UNet, config, convert_unet_state_dict(state, layout, config))
    x, t, context, added = unet_inputs(config, micro_conditioning)
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        assert_close(f"unet {layout}", ours(x, t, context, added_cond=added), expected)


@pytest.fixture(scope="class")
def base_unet(free_after):
    return reference_unet(SDXL_BASE, seed=1)


@pytest.fixture(scope="class")
def refiner_unet(free_after):
    return reference_unet(SDXL_REFINER, seed=2)


@pytest.mark.slow  # 2.57 B parameters in fp32 (10.3 GB, shared with ours): ~45 s for the class on a 2-core CPU
class TestBaseUNet:
    @pytest.mark.parametrize("layout", ["diffusers", "ldm"])
    def test_parity(self, base_unet, layout):
        config = PRESETS["sdxl"].unet
        assert config == UNetConfig.from_diffusers(SDXL_BASE)
        # original size, crop top-left, target size (Podell et al. 2023, sec. 2.2)
        check_unet(base_unet, config, layout, [1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0])


@pytest.mark.slow  # 2.32 B parameters in fp32 (9.3 GB, shared with ours): ~30 s for the class on a 2-core CPU
class TestRefinerUNet:
    @pytest.mark.parametrize("layout", ["diffusers", "ldm"])
    def test_parity(self, refiner_unet, layout):
        config = PRESETS["sdxl-refiner"].unet
        assert config == UNetConfig.from_diffusers(SDXL_REFINER)
        # original size, crop top-left, aesthetic score (the refiner's conditioning)
        check_unet(refiner_unet, config, layout, [1024.0, 1024.0, 0.0, 0.0, 6.0])


# ---- VAE --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="class")
def vae_ref(free_after):
    v = SDXL.vae
    model = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * v.num_levels,
                          up_block_types=("UpDecoderBlock2D",) * v.num_levels, block_out_channels=v.block_channels,
                          layers_per_block=v.num_res_blocks, latent_channels=v.latent_channels,
                          norm_num_groups=v.norm_groups, scaling_factor=v.scaling_factor)
    randomize(model, torch.Generator().manual_seed(3))
    return model.eval()


@pytest.mark.slow  # the SDXL VAE (83.7 M parameters) decoding to 128 x 128 in fp32: ~3 s for the class
class TestVAE:
    @pytest.mark.parametrize("layout", ["diffusers", "ldm"])
    def test_decode(self, vae_ref, layout):
        config = SDXL.vae
        state = convert_vae_state_dict(vae_ref.state_dict(), "diffusers", config)
        if layout == "ldm":  # first_stage_model. names, attention projections as 1x1 convolutions
            original = {}
            for key, tensor in state.items():
                name, is_conv = sd_keys.vae_key(key, config)
                original[name] = tensor[:, :, None, None] if is_conv else tensor
            state = convert_vae_state_dict(original, "ldm", config)
        ours = kedavra_module(KedavraVAE, config, state)
        z = torch.randn(1, config.latent_channels, LATENT, LATENT, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            assert_close(f"vae decode {layout}", ours.decode(z), vae_ref.decode(z).sample)
