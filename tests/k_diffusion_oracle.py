"""k-diffusion's `sampling` and `external` modules (PyPI k-diffusion 0.1.1.post1, the sampler code A1111 and
ComfyUI run), loaded without the package's __init__, which imports torchvision, absent beside the CPU torch.

scripts/setup.sh --test installs k-diffusion, torchsde and torchdiffeq without their dependencies; tests that use
the oracle skip with the reason when they are missing.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest


def _append_dims(x, target_dims):
    """k_diffusion.utils.append_dims: the only helper of utils that sampling and external call."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def load_k_diffusion():
    """(sampling, external) modules of k-diffusion; pytest.skip when the package or torchsde is not installed."""
    if "k_diffusion_oracle.sampling" in sys.modules:
        return sys.modules["k_diffusion_oracle.sampling"], sys.modules["k_diffusion_oracle.external"]
    spec = importlib.util.find_spec("k_diffusion")
    missing = [name for name in ("torchsde", "torchdiffeq", "scipy") if importlib.util.find_spec(name) is None]
    if spec is None or missing:
        pytest.skip(f"k-diffusion oracle not installed ({', '.join(missing) or 'k_diffusion'}); "
                    "run scripts/setup.sh --test")
    package = types.ModuleType("k_diffusion_oracle")
    package.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion_oracle.utils")
    utils.append_dims = _append_dims
    sys.modules["k_diffusion_oracle"] = package
    sys.modules["k_diffusion_oracle.utils"] = utils
    package.utils = utils
    loaded = []
    for name in ("sampling", "external"):
        full = f"k_diffusion_oracle.{name}"
        module_spec = importlib.util.spec_from_file_location(full, f"{package.__path__[0]}/{name}.py")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[full] = module
        module_spec.loader.exec_module(module)
        setattr(package, name, module)
        loaded.append(module)
    return tuple(loaded)
