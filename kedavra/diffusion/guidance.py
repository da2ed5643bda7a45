"""Classifier-free guidance: steer a conditional model's prediction away from its unconditional one.

With one network trained both with and without the condition c (the caption dropped at random), the guided
prediction at a step is (Ho and Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6)

    ε̃(x_t, c) = ε(x_t, ∅) + w (ε(x_t, c) - ε(x_t, ∅)),     w = guidance_scale

w = 1 is the conditional model alone, w = 0 the unconditional one, w > 1 extrapolates past the conditional
prediction. The same linear combination applies to v-predictions. Large w over-saturates images, above all with
v-prediction and zero-terminal-SNR models; Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps
are Flawed", sec. 3.4, eq. 15-16) rescale the guided prediction to the conditional one's standard deviation and
mix the two by φ = guidance_rescale:

    ε̃_rescaled = ε̃ · σ(ε(x_t, c)) / σ(ε̃),     ε̃_final = φ ε̃_rescaled + (1 - φ) ε̃

σ is the standard deviation over each sample's elements (all dimensions but the batch).
"""

from __future__ import annotations

import torch


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float,
                             guidance_rescale: float = 0.0) -> torch.Tensor:
    """The guided prediction from the conditional and unconditional ones (B, ...), per the module docstring:
    Ho and Salimans 2022, eq. 6, then Lin et al. 2023, eq. 15-16 when guidance_rescale φ > 0."""
    guided = uncond + guidance_scale * (cond - uncond)  # Ho and Salimans 2022, eq. 6
    if guidance_rescale > 0:
        dims = list(range(1, guided.ndim))
        guided_std = guided.std(dim=dims, keepdim=True).clamp_min(1e-12)  # 0 only for an all-constant prediction
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided_std)  # Lin et al. 2023, eq. 15
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided  # eq. 16
    return guided
