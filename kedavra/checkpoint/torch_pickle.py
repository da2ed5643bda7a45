"""torch.save files (.ckpt, .pt, .bin) and the weights inside torch.jit.save archives, read with torch's restricted
unpickler so that nothing in them runs; the package docstring's "Security" paragraph says what is let through."""

import io
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, _weights_only_unpickler

from kedavra.checkpoint.errors import UnsafeCheckpointError, _fail
from kedavra.validation import some


class _Discarded:
    """Inert stand-in for training-bookkeeping objects in pickled checkpoints: takes anything, keeps nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class ScriptObject:
    """Inert stand-in for the objects of a TorchScript archive's classes (`__torch__.*`): keeps the attributes
    pickled into it (tensors, sub-modules, plain values) and nothing else; no TorchScript method is compiled or run."""


# Globals that real SD 1.x-era .ckpt files name outside their weights (Lightning's checkpoint callback state,
# numpy scalars in it); they are replaced by _Discarded, never imported. Everything else is refused.
DISCARDED_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
)
SCRIPT_CLASS_PREFIX = "__torch__."  # the namespace of the classes a torch.jit.save archive pickles its modules as
SCRIPT_INT_LIST = "torch.jit._pickle.build_intlist"  # how a TorchScript pickle stores a List[int] attribute


def _int_list(values) -> list[int]:
    """The stand-in for SCRIPT_INT_LIST: the same list, built by nothing but list()."""
    return list(values)


@contextmanager
def _restricted_unpickling(path: Path, zipped: bool, stand_ins: tuple[tuple[object, str], ...] = ()) -> Iterator[None]:
    """torch's restricted unpickler (weights_only) for the block, with DISCARDED_GLOBALS mapped to _Discarded and
    `stand_ins` ((stand-in, global name) pairs) allowed; a refused global becomes UnsafeCheckpointError naming it,
    a broken file CheckpointError."""
    allowed = [*((_Discarded, name) for name in DISCARDED_GLOBALS), *stand_ins]
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as error:
        names = _unsafe_globals(path, zipped, error)
        raise _fail(
            path,
            f"refused: this pickled checkpoint contains code references ({some(names) or error}) that could run "
            "arbitrary code when loaded; kedavra never executes code from a checkpoint. Get a .safetensors "
            "version of the model, or convert this file only if you trust its source",
            UnsafeCheckpointError,
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise _fail(path, f"corrupt or truncated torch checkpoint: {error}") from None


def _read_torch_file(path: Path, zipped: bool) -> dict[str, Tensor]:
    """The state dict of a torch.save file, read by torch's restricted unpickler (nothing from it is run)."""
    with _restricted_unpickling(path, zipped):
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):  # Lightning: {"state_dict": ...}
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise _fail(path, f"a torch file holding a {type(loaded).__name__}, not a state dict of tensors")
    not_tensors = sorted(k for k, v in loaded.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise _fail(path, f"{len(not_tensors)} entries of the state dict are not tensors: {some(not_tensors)}")
    return dict(loaded)


def read_script_archive(path: str | Path) -> object:
    """The object tree pickled in a torch.jit.save archive (its data.pkl), read by the restricted unpickler that
    reads .ckpt files: each `__torch__.*` class becomes ScriptObject, SCRIPT_INT_LIST a plain list, every other
    global goes through torch's allowlist (tensors, storages, plain containers) or is refused. None of the
    archive's TorchScript code is compiled or run.

    torch.load hands TorchScript archives to torch.jit.load (and refuses them under weights_only), so the archive
    is read with torch.load's own zip reader and weights_only unpickler, called directly."""
    path = Path(path)
    with _restricted_unpickling(path, zipped=True):
        reader = torch._C.PyTorchFileReader(str(path))
        named = _weights_only_unpickler.get_globals_in_pkl(io.BytesIO(reader.get_record("data.pkl")))
    stand_ins = (*((ScriptObject, name) for name in named if name.startswith(SCRIPT_CLASS_PREFIX)),
                 (_int_list, SCRIPT_INT_LIST))
    with _restricted_unpickling(path, zipped=True, stand_ins=stand_ins):
        return torch.serialization._load(reader, "cpu", _weights_only_unpickler, encoding="utf-8")


def _unsafe_globals(path: Path, zipped: bool, error: Exception) -> list[str]:
    """The globals a pickle names beyond torch's allowlist, found by scanning opcodes (nothing is run)."""
    if zipped:
        try:
            return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in DISCARDED_GLOBALS]
        except Exception:  # the scan only improves the message; the refusal stands regardless
            pass
    return re.findall(r"GLOBAL ([\w.]+)", str(error))
