"""torch.save files (.ckpt, .pt, .bin), read with torch's restricted unpickler so that nothing in them runs; the
package docstring's "Security" paragraph says what is let through."""

import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from kedavra.checkpoint.errors import UnsafeCheckpointError, _fail, _some


class _Discarded:
    """Inert stand-in for training-bookkeeping objects in pickled checkpoints: takes anything, keeps nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# Globals that real SD 1.x-era .ckpt files name outside their weights (Lightning's checkpoint callback state,
# numpy scalars in it); they are replaced by _Discarded, never imported. Everything else is refused.
DISCARDED_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
)


def _read_torch_file(path: Path, zipped: bool) -> dict[str, Tensor]:
    """The state dict of a torch.save file, read by torch's restricted unpickler (nothing from it is run)."""
    stand_ins = [(_Discarded, name) for name in DISCARDED_GLOBALS]
    try:
        with torch.serialization.safe_globals(stand_ins):
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as error:
        names = _unsafe_globals(path, zipped, error)
        raise _fail(
            path,
            f"refused: this pickled checkpoint contains code references ({_some(names) or error}) that could run "
            "arbitrary code when loaded; kedavra never executes code from a checkpoint. Get a .safetensors "
            "version of the model, or convert this file only if you trust its source",
            UnsafeCheckpointError,
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise _fail(path, f"corrupt or truncated torch checkpoint: {error}") from None
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):  # Lightning: {"state_dict": ...}
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise _fail(path, f"a torch file holding a {type(loaded).__name__}, not a state dict of tensors")
    not_tensors = sorted(k for k, v in loaded.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise _fail(path, f"{len(not_tensors)} entries of the state dict are not tensors: {_some(not_tensors)}")
    return dict(loaded)


def _unsafe_globals(path: Path, zipped: bool, error: Exception) -> list[str]:
    """The globals a pickle names beyond torch's allowlist, found by scanning opcodes (nothing is run)."""
    if zipped:
        try:
            return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in DISCARDED_GLOBALS]
        except Exception:  # the scan only improves the message; the refusal stands regardless
            pass
    return re.findall(r"GLOBAL ([\w.]+)", str(error))
