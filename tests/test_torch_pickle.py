"""Pickled checkpoints (kedavra/checkpoint/torch_pickle.py) are read by torch's restricted unpickler: a Lightning-era
.ckpt loads with its training bookkeeping replaced by an inert stand-in; code planted in any container (torch zip,
legacy torch.save, bare pickle, a diffusers folder's .bin, a TorchScript archive) is refused before anything runs;
a TorchScript archive's weights come back without its code being compiled or run (the FID Inception's path)."""

import os
import pathlib
import pickle
import sys
import types
import warnings
import zipfile

import pytest
import sd_keys
import torch
from reference_models import assert_parity, kedavra_state

from kedavra.checkpoint import SafetensorsFile, UnsafeCheckpointError, load_model
from kedavra.checkpoint.torch_pickle import ScriptObject, read_script_archive
from kedavra.networks.model import PRESETS

REFUSAL = r"refused: this pickled checkpoint contains code references \(.*({named}).*\) that could run arbitrary"


# ---- what real checkpoints hold is read ----------------------------------------------------------------------


class ModelCheckpoint:
    """Pickled under Lightning's name by the test below, as SD 1.x-era .ckpt files carry it."""

    def __init__(self):
        self.best_model_path = "epoch=5.ckpt"


def test_ckpt_loads_through_the_restricted_unpickler(tiny_refs, tmp_path, monkeypatch):
    """A Lightning-era .ckpt (state_dict, global_step and a ModelCheckpoint callback) loads; the callback is
    replaced by an inert stand-in, never imported."""
    config = PRESETS["tiny"]
    original = sd_keys.original_state_dict(kedavra_state(tiny_refs["tiny"], config), config)
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    monkeypatch.setattr(ModelCheckpoint, "__module__", names[-1])
    payload = {"state_dict": original, "global_step": 470000, "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}
    torch.save(payload, tmp_path / "model.ckpt")
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    model = load_model(tmp_path / "model.ckpt")
    assert model.config == config
    assert "torch zip" in model.describe()
    assert_parity(model, tiny_refs["tiny"])


def script_archive(module: torch.nn.Module, path: pathlib.Path) -> pathlib.Path:
    """`module` scripted and saved with torch.jit.save (deprecated in torch 2.13; used here only to write one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.(script|save)` is deprecated", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), path)
    return path


def test_script_archive_weights_come_back_as_inert_objects(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    tree = read_script_archive(script_archive(module, tmp_path / "m.pt"))
    linear = vars(tree)["0"]
    assert isinstance(tree, ScriptObject) and isinstance(linear, ScriptObject)
    assert torch.equal(linear.weight, module[0].weight) and torch.equal(linear.bias, module[0].bias)


# ---- pickled code is refused, never run ----------------------------------------------------------------------


class SystemPayload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class TouchPayload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


@pytest.mark.parametrize("payload", [SystemPayload, TouchPayload])
@pytest.mark.parametrize("container", ["zip", "legacy", "pickle", "diffusers-bin"])
def test_planted_payload_is_refused_without_running(tiny_file, tmp_path, payload, container):
    marker = tmp_path / "PWNED"
    state = {k: v.clone() for k, v in SafetensorsFile(tiny_file).tensors().items()}
    state["model_ema.decay"] = payload(marker)  # hidden among the weights
    if container == "zip":
        path = tmp_path / "model.ckpt"
        torch.save({"state_dict": state}, path)
    elif container == "legacy":  # torch.save's format before torch 1.6
        path = tmp_path / "model.ckpt"
        torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=False)
    elif container == "pickle":  # a bare pickle: its tensors name torch.storage._load_from_bytes first
        path = tmp_path / "model.ckpt"
        with open(path, "wb") as f:
            pickle.dump({"state_dict": state}, f, protocol=2)
    else:
        path = tmp_path / "folder"
        for name in ("unet", "vae", "text_encoder"):
            (path / name).mkdir(parents=True)
            torch.save({"conv_in.weight": payload(marker)}, path / name / "diffusion_pytorch_model.bin")
    assert not marker.exists()
    named = r"_load_from_bytes" if container == "pickle" else r"system|Path|getattr"
    with pytest.raises(
        UnsafeCheckpointError,
        match=REFUSAL.format(named=named),
    ):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [SystemPayload, TouchPayload])
def test_planted_payload_in_a_script_archive_is_refused_without_running(tmp_path, payload):
    marker = tmp_path / "PWNED"
    script_archive(torch.nn.Linear(2, 3), tmp_path / "m.pt")
    with zipfile.ZipFile(tmp_path / "m.pt") as source, zipfile.ZipFile(tmp_path / "bad.pt", "w") as target:
        for name in source.namelist():  # the archive's own records, its data.pkl swapped for the payload
            planted = name.endswith("/data.pkl")
            target.writestr(name, pickle.dumps(payload(marker), protocol=2) if planted else source.read(name))
    with pytest.raises(UnsafeCheckpointError, match=REFUSAL.format(named="system|Path|getattr")):
        read_script_archive(tmp_path / "bad.pt")
    assert not marker.exists()
