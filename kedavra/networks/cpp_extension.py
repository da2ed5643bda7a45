"""kedavra's own C++ kernels: each compiled once per machine by torch.utils.cpp_extension, or a warning and None.

A kernel's source sits beside the Python module that calls it (cpu_attention.cpp, int8.cpp). The first call to
`CppExtension.get` compiles it with the machine's C++ compiler and ninja (tens of seconds; `scripts/setup.sh` builds
them ahead) into torch's cache (~/.cache/torch_extensions), later processes load the cached build. A build that
fails (no compiler, an old assembler) warns once, naming the kernel and the fallback, and `get` then returns None:
every caller has a pure-PyTorch path beside its kernel.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import ModuleType

import torch


class CppExtension:
    """One C++ source compiled as a Python module on first use (module docstring)."""

    def __init__(self, name: str, source: Path, cflags: list[str], fallback: str):
        """name: the module's name in torch's cache; fallback: what runs instead, for the warning ("torch's SDPA")."""
        self.name, self.source, self.cflags, self.fallback = name, source, cflags, fallback
        self.module: ModuleType | None = None
        self.failed: str | None = None  # why the build failed, once it has
        self._lock = threading.Lock()

    def get(self) -> ModuleType | None:
        """The compiled module (built on the first call), or None, with one warning, if it cannot be built."""
        with self._lock:
            if self.module is None and self.failed is None:
                try:
                    from torch.utils.cpp_extension import load

                    self.module = load(self.name, [str(self.source)], extra_cflags=self.cflags, verbose=False)
                except Exception as error:  # no compiler, no ninja, an old assembler: the fallback stays
                    self.failed = f"{type(error).__name__}: {error}".splitlines()[0]
                    warnings.warn(f"kedavra's {self.source.name} could not be built ({self.failed}); using "
                                  f"{self.fallback}", RuntimeWarning, stacklevel=3)
        return self.module


def profiled(name: str) -> AbstractContextManager:
    """A span named `name` around an extension's call while torch.profiler records (scripts/profile_unet.py), which
    does not see such a call as an op of its own; a no-op otherwise."""
    return torch.profiler.record_function(name) if torch.autograd._profiler_enabled() else nullcontext()
