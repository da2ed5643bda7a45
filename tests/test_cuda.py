"""CUDA: the pipeline and the training step on a GPU. Skipped where torch sees no CUDA device (CI has none);
run on a GPU machine with `python -m pytest tests/test_cuda.py`."""

import pytest
import torch
from random_models import tiny_model

from kedavra.formats.images import from_pil
from kedavra.pipeline.pipeline import Pipeline
from kedavra.training import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module", autouse=True)
def exact_fp32():
    """cuDNN convolutions default to TF32 (10-bit mantissa) on Ampere and later; the fp32 comparisons below
    are about the pipeline, not TF32, so switch it off while they run."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_a_seed_gives_the_same_image_on_the_cpu_and_the_gpu():
    """Noise comes from a CPU generator seeded per image, so only float rounding separates the devices."""
    kwargs = dict(seed=7, steps=8, sampler="euler_a", num_images=2)
    on_cpu = Pipeline(tiny_model(), device="cpu", dtype="fp32")("a red circle", **kwargs)
    on_gpu = Pipeline(tiny_model(), device="cuda", dtype="fp32")("a red circle", **kwargs)
    assert on_gpu.seeds == on_cpu.seeds == [7, 8]
    assert torch.allclose(on_gpu.latents.cpu(), on_cpu.latents, rtol=1e-3, atol=1e-3)
    pixels_cpu = torch.stack([from_pil(im) for im in on_cpu.images])
    pixels_gpu = torch.stack([from_pil(im) for im in on_gpu.images])
    assert (pixels_cpu - pixels_gpu).abs().max() <= 2 / 127.5  # within two 8-bit levels


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_on_the_gpu_stays_near_fp32(dtype):
    kwargs = dict(seed=3, steps=8, sampler="dpmpp_2m")
    reference = Pipeline(tiny_model(), device="cuda", dtype="fp32")("a blue square", **kwargs)
    half = Pipeline(tiny_model(), device="cuda", dtype=dtype)("a blue square", **kwargs)
    assert torch.isfinite(half.latents).all()
    difference = (from_pil(half.images[0]) - from_pil(reference.images[0])).abs()
    assert difference.mean() < 0.05, f"{dtype}: mean abs difference {difference.mean():.4f} (images in [-1, 1])"


def test_the_default_precision_on_cuda_is_half():
    pipe = Pipeline(tiny_model(), device="cuda")
    assert pipe.dtype in (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("stage", ["vae", "unet"])
def test_training_steps_on_the_gpu(tmp_path, stage):
    vae = None
    if stage == "unet":
        train(TrainConfig(data="shapes", stage="vae", steps=2, batch_size=4, sample_interval=0,
                          checkpoint_interval=0, out_dir=str(tmp_path / "vae")), device="cuda")
        vae = str(tmp_path / "vae" / "model.safetensors")
    config = TrainConfig(data="shapes", stage=stage, vae=vae, steps=3, batch_size=4, sample_interval=0,
                         checkpoint_interval=0, latent_cache=False, out_dir=str(tmp_path / stage))
    results = train(config, device="cuda")
    assert (tmp_path / stage / "model.safetensors").is_file()
    assert results is not None
