"""A folder's scheduler_config.json read as sampling defaults (kedavra.checkpoint.scheduler_config); the whole runs
against diffusers are in tests/test_pipeline_parity.py."""

import pytest

from kedavra.checkpoint.scheduler_config import scheduler_defaults
from kedavra.diffusion.samplers import resolve_sampler


@pytest.mark.parametrize("config,sampler,alpha_one", [
    ({"_class_name": "PNDMScheduler", "skip_prk_steps": True, "set_alpha_to_one": False}, "pndm", False),
    ({"_class_name": "PNDMScheduler", "skip_prk_steps": True}, "pndm", False),  # diffusers' PNDM default
    ({"_class_name": "DDIMScheduler", "clip_sample": False}, "ddim", True),  # diffusers' DDIM default
    ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}, "euler karras", True),
    ({"_class_name": "EulerAncestralDiscreteScheduler"}, "euler_a", True),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde", True),
    ({"_class_name": "DDPMScheduler", "variance_type": "fixed_large", "clip_sample": False}, "ddpm_large", True),
    ({"_class_name": "UniPCMultistepScheduler"}, "unipc", True),
    ({"_class_name": "LCMScheduler"}, "lcm", True),
])
def test_classes_become_kedavra_samplers(config, sampler, alpha_one):
    defaults = scheduler_defaults(config)
    assert (defaults.sampler, defaults.set_alpha_to_one, defaults.notes) == (sampler, alpha_one, ())
    resolve_sampler(defaults.sampler)  # a name kedavra runs


def test_settings_kedavra_does_not_carry_out_are_named_not_refused():
    defaults = scheduler_defaults({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3,
                                   "thresholding": True, "use_exponential_sigmas": True})
    assert defaults.sampler == "dpmpp_2m"
    assert [note.split(" ")[0] for note in defaults.notes] == ["solver_order=3", "thresholding=True",
                                                                "use_exponential_sigmas"]
    pndm = scheduler_defaults({"_class_name": "PNDMScheduler"})  # diffusers' default: the Runge-Kutta warm-up
    assert pndm.notes == ("skip_prk_steps=False is not carried out (kedavra runs True)",)
    other = scheduler_defaults({"_class_name": "LMSDiscreteScheduler"})
    assert other.sampler is None and "'LMSDiscreteScheduler' is not one kedavra computes" in other.notes[0]
    assert scheduler_defaults({}).sampler is None
