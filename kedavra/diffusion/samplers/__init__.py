"""Samplers: the reverse process, from noise to data, driving any `model(x_t, t)`.

    from kedavra.diffusion.samplers import sample
    x0 = sample(model, noise, sampler="dpmpp_2m", steps=20, schedule=get_schedule("sd"), generator=g)

Names users know from diffusers, AUTOMATIC1111's web UI and ComfyUI all resolve to the same sampler
(see SAMPLERS and docs/samplers.md).
"""

from kedavra.diffusion.samplers.denoiser import Denoiser, StepCallback, StepRecord
from kedavra.diffusion.samplers.registry import SAMPLERS, SamplerSpec, check_eta, resolve_sampler, sample

__all__ = ["SAMPLERS", "Denoiser", "SamplerSpec", "StepCallback", "StepRecord", "check_eta", "resolve_sampler",
           "sample"]
