"""Classifier-free guidance (kedavra.diffusion.guidance) on constructed predictions whose answer is known, and the
pipeline's step records, whose cond and uncond combine into the prediction the sampler used."""

import pytest
import torch
from random_models import tiny_model

from kedavra.diffusion.forward_process import to_x0_eps
from kedavra.diffusion.guidance import classifier_free_guidance
from kedavra.pipeline.pipeline import Pipeline

COND = torch.arange(24.0).reshape(2, 3, 4) / 10
UNCOND = torch.ones(2, 3, 4)


def test_scale_one_is_the_conditional_and_zero_the_unconditional_prediction():
    torch.testing.assert_close(classifier_free_guidance(COND, UNCOND, 1.0), COND)  # equal up to rounding
    assert torch.equal(classifier_free_guidance(COND, UNCOND, 0.0), UNCOND)


def test_guidance_extrapolates_linearly_past_the_conditional_prediction():
    """Ho and Salimans 2022, eq. 6 worked by hand: 1 + 3 (c - 1) at every element."""
    torch.testing.assert_close(classifier_free_guidance(COND, UNCOND, 3.0), 1 + 3 * (COND - 1))


@pytest.mark.parametrize("phi", [0.0, 0.3, 1.0])
def test_rescale_mixes_towards_the_conditional_std(phi):
    """Lin et al. 2023, eq. 15-16: φ = 1 gives each sample the conditional prediction's std, φ = 0 plain guidance,
    and any φ the linear mix of the two."""
    plain = classifier_free_guidance(COND, UNCOND, 7.5)
    dims = (1, 2)
    rescaled = plain * COND.std(dim=dims, keepdim=True) / plain.std(dim=dims, keepdim=True)
    torch.testing.assert_close(classifier_free_guidance(COND, UNCOND, 7.5, phi), phi * rescaled + (1 - phi) * plain)
    if phi == 1.0:
        torch.testing.assert_close(classifier_free_guidance(COND, UNCOND, 7.5, 1.0).std(dim=dims),
                                   COND.std(dim=dims))


def test_the_pipelines_step_records_hold_the_two_halves_of_guidance():
    """At every step, guidance applied to the record's cond and uncond gives the x̂_0 the sampler reported (ε-model:
    x̂_0 = (x_t - √(1-ᾱ) ε̃)/√ᾱ, DDPM eq. 15), so viz and previews can take guidance apart without re-running."""
    pipe = Pipeline(tiny_model(), dtype="fp32")
    steps = []
    pipe("a circle", negative_prompt="a square", seed=2, steps=3, guidance_scale=4.0, callback=steps.append)
    assert len(steps) == 3
    for step in steps:
        guided = classifier_free_guidance(step.cond, step.uncond, 4.0)
        x0 = to_x0_eps(guided, step.x_t, step.alpha_bar, pipe.config.prediction_type)[0]
        torch.testing.assert_close(x0, step.x0)
    unguided = []
    pipe("a circle", seed=2, steps=2, guidance_scale=1.0, callback=unguided.append)
    assert all(step.uncond is None and step.cond is not None for step in unguided)
