"""The model a sampler drives: the U-Net with classifier-free guidance folded in (Ho and Salimans 2022, eq. 6;
kedavra.diffusion.guidance), its extra inputs (an inpainting U-Net's mask channels, SDXL's added conditioning), the
unconditional prediction for the CFG++ samplers, the step records' outputs, and the switch from an SDXL base to its
refiner at a timestep (Podell et al. 2023, sec. 2.5)."""

from __future__ import annotations

from dataclasses import replace

import torch

from kedavra.diffusion.guidance import classifier_free_guidance
from kedavra.diffusion.samplers import StepCallback, StepRecord
from kedavra.networks.step_cache import StepCache


class GuidedUNet:
    """The model a sampler drives: `(x_t, t) -> prediction`, the U-Net (in the working precision, on fp32 samples)
    with classifier-free guidance folded in (kedavra.diffusion.guidance); an inpainting U-Net also gets the mask and
    masked-image latents as extra input channels, an SDXL U-Net its added conditioning (`added`: the prompt's and
    the negative prompt's pooled text and micro-conditioning). `with_uncond` gives the guided prediction with the
    unconditional one of the same evaluation, for the CFG++ samplers. With `record`, it keeps the conditional and
    unconditional outputs of the first evaluation since the last step report, for `reporting`'s step records.
    `embeddings`: the textual-inversion embeddings the text used, for the infotext."""

    def __init__(self, unet, dtype: torch.dtype, context: torch.Tensor, uncond_context: torch.Tensor,
                 guidance_scale: float, guidance_rescale: float, extra_channels: torch.Tensor | None,
                 added: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None, record: bool = False,
                 embeddings: tuple[str, ...] = (), step_cache: int = 0):
        self.unet, self.dtype, self.extra_channels = unet, dtype, extra_channels
        self.cache = StepCache(step_cache) if step_cache > 1 else None  # DeepCache: one per sampling run
        self.embeddings = embeddings
        self.guidance_scale, self.guidance_rescale = guidance_scale, guidance_rescale
        self.use_guidance = guidance_scale != 1.0
        # the conditioning of a conditional call and of a two-halves call (unconditional first, (2B, ...))
        self.context, self.pair_context = context, torch.cat([uncond_context, context])
        self.added = self.pair_added = None  # SDXL's added conditioning in the working precision
        if added is not None:
            cond, uncond = added
            self.added = {key: cond[key].to(dtype) for key in cond}
            self.pair_added = {key: torch.cat([uncond[key], cond[key]]).to(dtype) for key in cond}
        self.record = record
        self.outputs: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (cond, uncond) at the step's level

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The guided prediction at x_t (the conditional one alone at guidance_scale 1)."""
        return self._evaluate(x_t, t, both=self.use_guidance)[0]

    def with_uncond(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(guided, unconditional) predictions at x_t from one evaluation; the unconditional half runs even at
        guidance_scale 1 (ComfyUI's disable_cfg1_optimization, which its CFG++ samplers set)."""
        return self._evaluate(x_t, t, both=True)

    def _evaluate(self, x_t: torch.Tensor, t: torch.Tensor, both: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(guided, uncond): the U-Net on the conditional context alone (uncond None), or on both halves."""
        x_in = x_t if self.extra_channels is None else torch.cat([x_t, self.extra_channels], dim=1)
        if not both:
            cond = self.unet(x_in.to(self.dtype), t, self.context, added_cond=self.added, cache=self.cache).float()
            guided, uncond = cond, None
        else:
            halves = self.unet(torch.cat([x_in, x_in]).to(self.dtype), torch.cat([t, t]), self.pair_context,
                               added_cond=self.pair_added, cache=self.cache).float()  # (2B, ...)
            uncond, cond = halves.chunk(2)
            guided = classifier_free_guidance(cond, uncond, self.guidance_scale, self.guidance_rescale)
        if self.record and self.outputs is None:
            self.outputs = (cond, uncond)
        return guided, uncond

    def reporting(self, callback: StepCallback):
        """A step callback that passes `callback` each step's record with cond and uncond filled in."""

        def report(step: StepRecord):
            cond, uncond = self.outputs
            self.outputs = None
            return callback(replace(step, cond=cond, uncond=uncond))

        return report


class ModelSwitch:
    """Two guided U-Nets as one model for the sampler: `first` at timesteps t >= `cutoff`, `second` below (the SDXL
    base and its refiner). Step records carry the outputs of whichever evaluated the step's own level."""

    def __init__(self, first: GuidedUNet, second: GuidedUNet, cutoff: int):
        self.first, self.second, self.cutoff = first, second, cutoff

    def _at(self, t: torch.Tensor) -> GuidedUNet:
        return self.first if float(t[0]) >= self.cutoff else self.second

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._at(t)(x_t, t)

    def with_uncond(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GuidedUNet.with_uncond of the model that runs at t."""
        return self._at(t).with_uncond(x_t, t)

    def reporting(self, callback: StepCallback):
        """A step callback that passes `callback` each step's record with cond and uncond filled in."""

        def report(step: StepRecord):
            ran = self.first if self.first.outputs is not None else self.second
            cond, uncond = ran.outputs
            self.first.outputs = self.second.outputs = None
            return callback(replace(step, cond=cond, uncond=uncond))

        return report

