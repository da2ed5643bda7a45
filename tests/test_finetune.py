"""Fine-tuning (`kedavra train --init`): a run starts from a trained model's weights and config and keeps them,
trains only what the stage names, resumes bitwise, refuses what it cannot train; from kedavra files, SD layouts and
the embedded default. Same runs as tests/test_training.py (tiny, 16 px, `Squares`, fp32, one thread).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from test_training import IMAGE_SIZE, Squares, _weights, small_config

from kedavra import cli
from kedavra.api import DEFAULT_MODEL, embedded_models
from kedavra.checkpoint import CheckpointError, load_model, save_model
from kedavra.commands.demo import torch_threads
from kedavra.diffusion.schedule import get_schedule
from kedavra.networks.model import PRESETS, ModelConfig, StableDiffusion
from kedavra.pipeline.pipeline import Pipeline
from kedavra.training import TrainConfig, Trainer, train
from kedavra.training.distributed import close_distributed, init_distributed


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


INIT_SCALE = 0.5  # the init model's latent scale: no VAE of these runs measures it, so a kept one shows


def _init_config() -> ModelConfig:
    """The init model's config, set apart from the tiny preset's in everything a fine-tune must keep: family,
    v-prediction on the zero-terminal-SNR schedule, VAE scaling factor, trailing spacing, 16 px."""
    tiny = PRESETS["tiny"]
    return dataclasses.replace(tiny, family="my-tiny", prediction_type="v", schedule=get_schedule("sd-zero-snr"),
                               image_size=IMAGE_SIZE, spacing="trailing",
                               vae=dataclasses.replace(tiny.vae, scaling_factor=INIT_SCALE))


@pytest.fixture(scope="module")
def init_model(tmp_path_factory):
    """A kedavra-format model file to fine-tune: `_init_config`, weights drawn under seed 1."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = StableDiffusion(_init_config())
    path = tmp_path_factory.mktemp("init") / "init.safetensors"
    save_model(model, path)
    return path


def finetune_config(out_dir, init, **changes) -> TrainConfig:
    """small_config fine-tuning `init`'s U-Net, its image size left to the model's."""
    return small_config(out_dir, **{"stage": "unet", "image_size": None, "init": str(init), **changes})


def _parts_equal(a: dict, b: dict, part: str) -> bool:
    keys = [k for k in a if k.startswith(part + ".")]
    assert keys and all(k in b for k in keys)
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_finetune_starts_from_the_init_model_and_trains_only_the_unet(tmp_path, init_model):
    """Text encoder frozen: at step 0 every weight (and the EMA) is the init file's, bitwise; the frozen parts get no
    gradient, no AdamW state, no EMA and stay in eval mode; after 3 steps only the U-Net moved, and the exported
    model keeps the init model's config (family, ε/v, schedule, scaling factor, spacing, size) and samples."""
    config = finetune_config(tmp_path, init_model, steps=3, train_text_encoder=False)
    loaded = load_model(init_model).state_dict()
    context = init_distributed("cpu")
    try:
        trainer = Trainer(config, context, dataset=Squares())
        assert trainer.config.image_size == IMAGE_SIZE  # the init model's
        state = trainer.model.state_dict()
        assert state.keys() == loaded.keys() and all(torch.equal(state[k], loaded[k]) for k in loaded)
        assert trainer.ema.shadow.keys() == {k for k in loaded if k.startswith("unet.")}
        assert all(torch.equal(trainer.ema.shadow[k], loaded[k]) for k in trainer.ema.shadow)
        result = trainer.run()
        unet_params = list(trainer.model.unet.parameters())
        assert len(trainer.optimizer.state) == len(unet_params)
        assert all(p.grad is None and not p.requires_grad for part in (trainer.model.text_encoder, trainer.model.vae)
                   for p in part.parameters())
        assert trainer.model.unet.training and not trainer.model.text_encoder.training
        assert not trainer.model.vae.training
    finally:
        close_distributed(context)
    assert result.finished and all(math.isfinite(x) for x in result.losses)
    for name in ("latest/model.safetensors", "latest/ema.safetensors", "model.safetensors"):
        saved = _weights(tmp_path / name)
        assert _parts_equal(saved, loaded, "text_encoder") and _parts_equal(saved, loaded, "vae"), name
        assert not _parts_equal(saved, loaded, "unet"), name
    model = load_model(result.model_path)
    assert model.config == _init_config()
    image = Pipeline(model, dtype="fp32")("a red square on the left", steps=2, seed=0).images[0]
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_finetune_vae_keeps_the_latent_scale(tmp_path, init_model):
    """Stage vae from an init model fine-tunes its VAE alone and keeps its scaling factor (its U-Net was trained on
    latents scaled by it), where a vae run from scratch stores a measured one."""
    result = train(finetune_config(tmp_path, init_model, stage="vae", steps=2), dataset=Squares())[0]
    saved, loaded = _weights(result.model_path), load_model(init_model).state_dict()
    assert _parts_equal(saved, loaded, "text_encoder") and _parts_equal(saved, loaded, "unet")
    assert not _parts_equal(saved, loaded, "vae")
    assert load_model(result.model_path).config == _init_config()


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_finetune_from_sd_layouts(tmp_path, layout):
    """A tiny model in SD 1.x's original single-file layout, or as a diffusers folder (v-prediction and trailing
    spacing in its scheduler config), fine-tunes its U-Net and text encoder at 16 px on its own VAE (bitwise
    unchanged), and the saved model keeps what the loader read."""
    from reference_models import reference_models, write_diffusers, write_original

    tiny = PRESETS["tiny"]
    refs = reference_models(tiny)
    if layout == "original":
        init = write_original(tmp_path / "model.safetensors", refs, tiny)
    else:
        init = write_diffusers(tmp_path / "model", refs, tiny, prediction_type="v_prediction")
    loaded = load_model(init)
    result = train(finetune_config(tmp_path / "run", init, image_size=IMAGE_SIZE, steps=2), dataset=Squares())[0]
    saved = _weights(result.model_path)
    assert _parts_equal(saved, loaded.state_dict(), "vae")
    assert not _parts_equal(saved, loaded.state_dict(), "unet")
    assert not _parts_equal(saved, loaded.state_dict(), "text_encoder")
    assert load_model(result.model_path).config == loaded.config
    assert loaded.config.prediction_type == ("v" if layout == "diffusers" else "eps")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vae": "runs/vae"}, "init '.*' and vae 'runs/vae' both name a VAE"),
        ({"preset": "tiny"}, "preset 'tiny' and init '.*' both say what to train"),
        ({"stage": "vae", "train_text_encoder": False}, "is for stage 'unet' or 'all'"),
        ({"image_size": 0}, "image_size must be an integer >= 1"),
    ],
)
def test_finetune_config_conflicts(tmp_path, init_model, changes, message):
    with pytest.raises(ValueError, match=message):
        finetune_config(tmp_path, init_model, **changes)


def test_finetune_refuses_what_it_cannot_train(tmp_path, init_model):
    """An inpainting model, an image size off the VAE's grid, an eps override on a zero-SNR schedule: ValueErrors
    naming the value; an unreadable file: the loader's CheckpointError; a missing one: FileNotFoundError."""
    inpaint = tmp_path / "inpaint.safetensors"
    with torch.device("meta"):
        model = StableDiffusion(PRESETS["tiny-inpaint"])
    save_model(model.to_empty(device="cpu"), inpaint)
    cases = [
        (finetune_config(tmp_path, inpaint), ValueError, "is an inpainting model .* 9 input channels"),
        (finetune_config(tmp_path, init_model, image_size=15), ValueError, "image_size must be a multiple of 2"),
        (finetune_config(tmp_path, init_model, prediction_type="eps"), ValueError,
         "init '.*'s schedule has zero terminal SNR"),
        (finetune_config(tmp_path, tmp_path / "inpaint.safetensors.txt"), FileNotFoundError, "no model file"),
    ]
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    cases.append((finetune_config(tmp_path, tmp_path / "garbage.safetensors"), CheckpointError, "garbage"))
    for config, error, message in cases:
        with pytest.raises(error, match=message):
            train(config, dataset=Squares())
    assert not (tmp_path / "latest").exists()


def test_finetune_resume_is_bitwise(tmp_path, init_model):
    """A fine-tune stopped after 2 steps and resumed to 4 (its image size resolved again from the checkpoint) ends
    with the bits of one that never stopped."""
    straight = train(finetune_config(tmp_path / "straight", init_model, steps=4, train_text_encoder=False),
                     dataset=Squares())[0]
    config = finetune_config(tmp_path / "interrupted", init_model, steps=4, train_text_encoder=False)
    first = train(config, dataset=Squares(), stop_after=2)[0]
    second = train(config, dataset=Squares())[0]
    assert first.losses + second.losses == straight.losses
    for name in ("latest/model.safetensors", "latest/ema.safetensors", "model.safetensors"):
        a, b = _weights(tmp_path / "straight" / name), _weights(tmp_path / "interrupted" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.skipif(DEFAULT_MODEL not in embedded_models(), reason=f"the embedded {DEFAULT_MODEL!r} is not installed")
def test_train_command_finetunes_the_embedded_model(tmp_path, monkeypatch, capsys):
    """`kedavra train --init kedavra-shapes` (stage all: its VAE, then its U-Net on that VAE, the text encoder
    frozen): both stages finish, the result keeps the embedded model's config and `kedavra generate` draws with
    it; --init with --preset exits with status 2 naming both."""
    monkeypatch.setattr("kedavra.training.loop.open_dataset", lambda *a, **k: Squares())
    out = tmp_path / "ft"
    assert cli.main(["train", "--init", DEFAULT_MODEL, "--image-size", "16", "--vae-steps", "1", "--steps", "1",
                     "--batch-size", "8", "--precision", "fp32", "--sample-interval", "0", "--freeze-text-encoder",
                     "--no-progress", "-o", str(out)]) == 0
    assert capsys.readouterr().out.count("finished at step 1") == 2
    unet_config = json.loads((out / "unet" / "latest" / "train_config.json").read_text())
    assert unet_config["init"] == str(out / "vae" / "model.safetensors") and not unet_config["train_text_encoder"]
    embedded = load_model(embedded_models()[DEFAULT_MODEL])
    tuned = load_model(out / "unet" / "model.safetensors")
    assert tuned.config == embedded.config
    assert _parts_equal(tuned.state_dict(), embedded.state_dict(), "text_encoder")
    image = tmp_path / "out.png"
    assert cli.main(["generate", "a red circle", "--model", str(out / "unet" / "model.safetensors"), "--steps", "2",
                     "--seed", "0", "--precision", "fp32", "-q", "-o", str(image)]) == 0
    assert image.read_bytes().startswith(b"\x89PNG")
    assert cli.main(["train", "--init", DEFAULT_MODEL, "--preset", "tiny", "-o", str(tmp_path / "bad")]) == 2
    assert f"preset 'tiny' and init '{DEFAULT_MODEL}' both say what to train" in capsys.readouterr().err
