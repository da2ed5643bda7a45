"""LoRA training (`kedavra train --lora RANK`): the layer against Hu et al. 2021's formula, the layers kohya would
adapt, a run whose file kedavra and diffusers both load to the training model's outputs, frozen base weights,
bitwise resume, learning, data-parallel runs, and the flags that contradict --lora.

Runs as in tests/test_training.py: the tiny preset (SD 1.x-style) at 16 px on `Squares`, fp32, one thread, a few
steps; the base models carry random weights (tests/random_models.py, tests/reference_models.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp
from random_models import tiny_model
from safetensors import safe_open
from test_training import IMAGE_SIZE, Squares, _weights, small_config
from test_training_ddp import _free_port
from torch import nn

from kedavra import cli
from kedavra.adapters.lora_file import read_lora
from kedavra.adapters.lora_math import LayerUpdate
from kedavra.adapters.lora_training import LoraLayer, inject_lora, target_paths
from kedavra.api import DEFAULT_MODEL, embedded_models
from kedavra.checkpoint import load_model, save_model
from kedavra.commands.demo import torch_threads
from kedavra.networks.model import PRESETS, StableDiffusion
from kedavra.pipeline.pipeline import Pipeline
from kedavra.training import TrainConfig, Trainer, checkpointing, train
from kedavra.training.batches import DataPosition
from kedavra.training.distributed import close_distributed, init_distributed
from kedavra.training.lora import base_model_metadata
from kedavra.training.precision import resolve_precision

RANK, ALPHA = 4, 2.0  # scale α / r = 0.5, so a wrong scale shows
IMAGE_TOL = 2 / 255  # images in [0, 1]: within two 8-bit steps of diffusers' (the brief's bound)
UNET_TOL = 1e-4  # fp32 U-Net outputs (O(1)) of the same merged weights, computed in two orders


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def init_file(tmp_path_factory):
    """A tiny kedavra model to adapt: every weight random (the zero-initialised output layers too, so a LoRA's
    change shows in the U-Net's output)."""
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_model(tiny_model("tiny", seed=1), path)
    return path


def lora_config(out_dir, init, **changes) -> TrainConfig:
    """small_config as a LoRA run on `init` at 16 px, rank 4, α 2."""
    values = {"stage": None, "init": str(init), "lora_rank": RANK, "lora_alpha": ALPHA, **changes}
    return small_config(out_dir, **values)


def unet_inputs(model: StableDiffusion, batch: int = 2) -> dict:
    """Fixed random U-Net inputs (x_t, t, context and SDXL's added conditioning) for `model`'s config."""
    generator = torch.Generator().manual_seed(11)
    config = model.config
    side = IMAGE_SIZE // config.vae.downsample_factor
    inputs = {"x": torch.randn(batch, config.unet.in_channels, side, side, generator=generator),
              "t": torch.tensor([20.0, 700.0][:batch]),
              "context": torch.randn(batch, 77, config.unet.context_dim, generator=generator)}
    if config.micro_conditioning:
        inputs["added_cond"] = {"text_embeds": torch.randn(batch, config.text_encoders[-1].projection_dim,
                                                           generator=generator),
                                "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).expand(batch, -1)}
    return inputs


@torch.no_grad()
def run_unet(model: StableDiffusion, inputs: dict) -> torch.Tensor:
    return model.unet(inputs["x"], inputs["t"], inputs["context"], added_cond=inputs.get("added_cond"))


def metadata(path) -> dict[str, str]:
    """A .safetensors file's metadata, read by the safetensors library (what A1111 and diffusers read it with)."""
    with safe_open(str(path), "pt") as file:
        return file.metadata()


def _trainer(config, **kwargs):
    context = init_distributed("cpu")
    return Trainer(config, context, dataset=Squares(), **kwargs), context


# ---- the layer and its targets ------------------------------------------------------------------------------


BASES = {"linear": lambda: nn.Linear(12, 10), "conv3x3": lambda: nn.Conv2d(6, 8, 3, padding=1),
         "conv1x1": lambda: nn.Conv2d(6, 8, 1)}


@pytest.mark.parametrize("kind", list(BASES))
def test_lora_layer_is_hu_et_al_eq_3(kind):
    """A fresh layer computes the base layer bitwise (B = 0); with B drawn, h = W0 x + (α/r) B A x (Hu et al. 2021,
    eq. 3, sec. 4.1), the same as the base layer with lora_math's merged ΔW = (α/r) B A, kohya's shapes; A is
    kaiming-uniform, |A| <= 1/√fan-in."""
    torch.manual_seed(0)
    base = BASES[kind]()
    x = torch.randn(3, 12) if isinstance(base, nn.Linear) else torch.randn(3, 6, 5, 5)
    layer = LoraLayer(base, RANK, ALPHA, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(layer(x), base(x))
    down, up = layer.lora_down.weight, layer.lora_up.weight
    fan_in = down[0].numel()
    assert down.abs().max() <= fan_in**-0.5 and down.abs().max() > 0.5 * fan_in**-0.5
    if isinstance(base, nn.Linear):
        assert (down.shape, up.shape) == ((RANK, 12), (10, RANK))
    else:
        assert (down.shape, up.shape) == ((RANK, 6, *base.kernel_size), (8, RANK, 1, 1))
    with torch.no_grad():
        up.normal_()
    expected = base(x) + ALPHA / RANK * up_apply(up, down_apply(down, x, base))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    delta = LayerUpdate("lora", {"lora_down.weight": down.detach(), "lora_up.weight": up.detach()},
                        ALPHA).delta(base.weight.shape)
    merged = base.weight + delta
    fused = (nn.functional.linear(x, merged, base.bias) if isinstance(base, nn.Linear) else
             nn.functional.conv2d(x, merged, base.bias, padding=base.padding))
    torch.testing.assert_close(layer(x), fused, rtol=0, atol=1e-5)


def down_apply(down, x, base):
    if isinstance(base, nn.Linear):
        return x @ down.T  # (N, r)
    return nn.functional.conv2d(x, down, padding=base.padding)  # (N, r, H, W)


def up_apply(up, h):
    return h @ up.T if h.ndim == 2 else nn.functional.conv2d(h, up)


def test_targets_are_kohyas():
    """Default: the Linear and 1x1 Conv2d layers of every spatial transformer (kohya's Transformer2DModel): 12 per
    transformer in tiny (proj_in, proj_out, 4 + 4 attention projections, 2 feed-forward); conv adds the ResNet blocks'
    and resamplers' layers, never conv_in / conv_out / the time embedding; text_encoder adds the 6 Linear layers of
    each CLIP layer (q, k, v, out, fc1, fc2), of both SDXL encoders. Kohya names as kohya_names gives them."""
    with torch.device("meta"):
        tiny, sdxl = StableDiffusion(PRESETS["tiny"]), StableDiffusion(PRESETS["tiny-sdxl"])
    default, conv = target_paths(tiny), target_paths(tiny, conv=True)
    assert len(default) == 12 * 4 and all(".attentions." in p for p in default)
    assert set(default) < set(conv) and all(".resnets." in p or ".resample." in p for p in set(conv) - set(default))
    assert not any(name in p for p in conv for name in ("conv_in", "conv_out", "time_embedding"))
    with_text = target_paths(tiny, text_encoder=True)
    assert len(with_text) - len(default) == 6 * PRESETS["tiny"].text_encoder.num_layers
    network = inject_lora(sdxl, RANK, text_encoder=True)
    names = set(network.names.values())
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in names  # SDXL: kohya's SGM names
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1" in names
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj" in names


@pytest.mark.parametrize(
    ("family", "prediction", "version", "architecture"),
    [
        ("sd15", "eps", "sd_v1", "stable-diffusion-v1/lora"),
        ("sd21-base", "eps", "sd_v2", "stable-diffusion-v2-512/lora"),
        ("sd21", "v", "sd_v2_v", "stable-diffusion-v2-768-v/lora"),
        ("sd15", "v", "sd_v1_v", "stable-diffusion-v1/lora"),  # an SD 1.5 fine-tuned into a v model
        ("sdxl", "eps", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    ],
)
def test_base_model_metadata_is_kohyas(family, prediction, version, architecture):
    """ss_base_model_version as kohya's model_util / sdxl_model_util write it, the ModelSpec architecture as its
    sai_model_spec does; none for kedavra's own families."""
    config = dataclasses.replace(PRESETS[family], prediction_type=prediction)
    meta = base_model_metadata(config, 512, "run", "2025-01-01")
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == (version, architecture)
    assert meta["ss_v2"] == str(family.startswith("sd21"))
    assert meta["modelspec.prediction_type"] == ("v" if prediction == "v" else "epsilon")
    assert base_model_metadata(PRESETS["tiny"], 32, "run", "2025-01-01") == {}


# ---- a run --------------------------------------------------------------------------------------------------


def test_lora_run_file_merges_to_the_training_model(tmp_path, init_file):
    """A LoRA run (U-Net with LoCon and the text encoder) writes kohya files only: its checkpoint's lora.safetensors
    read by kedavra's read_lora and merged by Pipeline.load_lora into the base gives the U-Net and text encoder
    outputs of the LoRA-injected training model (fp32, up to rounding); the exported OUT/lora.safetensors holds the
    EMA weights; the metadata says what kohya's would."""
    config = lora_config(tmp_path, init_file, steps=3, lr=1e-2, lora_conv=True, lora_text_encoder=True)
    trainer, context = _trainer(config)
    try:
        result = trainer.run()
    finally:
        close_distributed(context)
    checkpoint = result.checkpoint
    assert sorted(p.name for p in checkpoint.iterdir()) == ["lora.safetensors", "lora_ema.safetensors",
                                                            "train_config.json", "training_state.pt"]
    assert result.model_path == tmp_path / "lora.safetensors" and not (tmp_path / "model.safetensors").exists()
    lora = read_lora(checkpoint / "lora.safetensors")
    assert lora.kinds == {"lora": len(trainer.lora.layers)}
    assert {update.alpha for update in lora.updates.values()} == {ALPHA}
    meta = metadata(checkpoint / "lora.safetensors")
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "4",
                                                                                           "2.0")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2.0"}
    assert meta["ss_steps"] == "3" and meta["ss_resolution"] == "(16, 16)" and "ss_base_model_version" not in meta
    assert TrainConfig.from_dict(json.loads(meta["kedavra.train_config"])) == trainer.config

    trainer.model.eval()
    inputs = unet_inputs(trainer.model)
    ids = trainer.model.tokenizer(["a red square on the left", ""])
    base = Pipeline(load_model(init_file), dtype="fp32", optimize=False)
    base_output = run_unet(base.model, inputs)
    base.load_lora(checkpoint / "lora.safetensors")
    merged, training = run_unet(base.model, inputs), run_unet(trainer.model, inputs)
    assert (training - base_output).abs().max() > 1e-2  # the LoRA changed the U-Net
    torch.testing.assert_close(merged, training, rtol=0, atol=UNET_TOL)
    with torch.no_grad():
        torch.testing.assert_close(base.model.text_encoder(ids), trainer.model.text_encoder(ids), rtol=0, atol=1e-5)
    exported = trainer.lora.from_kohya(_weights(result.model_path), "export")
    assert all(torch.equal(exported[name], trainer.ema.shadow[name]) for name in trainer.ema.shadow)
    assert metadata(result.model_path)["kedavra.weights"].startswith("EMA")


def test_base_weights_stay_frozen(tmp_path, init_file):
    """At step 0 the injected model is the base model (bitwise: B = 0); a micro-batch's backward reaches the LoRA
    parameters alone (every other gradient None); after a run every base weight is bitwise the file's, and the
    optimizer and the EMA hold the LoRA parameters only."""
    config = lora_config(tmp_path, init_file, steps=2, lora_text_encoder=True)
    loaded = load_model(init_file)
    trainer, context = _trainer(config)
    try:
        inputs = unet_inputs(trainer.model)
        assert torch.equal(run_unet(trainer.model, inputs), run_unet(loaded, inputs))
        lora_names = set(trainer.lora.named_parameters())
        assert set(trainer.params) == lora_names == set(trainer.ema.shadow)
        assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == lora_names
        draws = trainer.stage.draws(config.batch_size, torch.Generator().manual_seed(0))
        trainer._micro_loss(trainer.data.indices(DataPosition()), draws)["loss"].mean().backward()
        grads = {n: p.grad for n, p in trainer.model.named_parameters()}
        assert all(grads[n] is None for n in grads if n not in lora_names)
        assert all(grads[n] is not None for n in lora_names)
        assert any(grads[n].abs().max() > 0 for n in lora_names if "lora_up" in n)  # A's gradient is 0 while B = 0
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.run()
        assert len(trainer.optimizer.state) == len(lora_names)
        state = trainer.lora.base_state_dict()
        assert state.keys() == loaded.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())
    finally:
        close_distributed(context)


def test_lora_learns(tmp_path, init_file):
    """A LoCon LoRA of rank 4 on the random tiny base brings the diffusion loss down at least 3x within 60 steps at
    lr 1e-2: from 1.16 at the first step to 0.24 over the last ten (measured; attention layers alone: 0.90)."""
    config = lora_config(tmp_path, init_file, steps=60, lr=1e-2, lora_alpha=None, lora_conv=True)
    result = train(config, dataset=Squares())[0]
    first, last = result.losses[0], sum(result.losses[-10:]) / 10
    assert first / last > 3, (first, last)


def test_resume_is_bitwise(tmp_path, init_file):
    """Stopped after 2 steps and resumed to 4 (LoRA dropout drawing from the run's forked global RNG, caption
    dropout, the text encoder's LoRA), a run ends with the bits of one that never stopped: trained and EMA LoRA,
    export, losses. The checkpoint holds no model: a resume whose init file changed is refused."""
    changes = {"steps": 4, "lora_dropout": 0.25, "caption_dropout": 0.5, "lora_text_encoder": True}
    straight = train(lora_config(tmp_path / "straight", init_file, **changes), dataset=Squares())[0]
    config = lora_config(tmp_path / "interrupted", init_file, **changes)
    first = train(config, dataset=Squares(), stop_after=2)[0]
    assert (first.step, first.finished, first.model_path) == (2, False, None)
    second = train(config, dataset=Squares())[0]
    assert first.losses + second.losses == straight.losses
    for name in ("latest/lora.safetensors", "latest/lora_ema.safetensors", "lora.safetensors"):
        a, b = _weights(tmp_path / "straight" / name), _weights(tmp_path / "interrupted" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    moved = tmp_path / "moved.safetensors"
    shutil.copy(init_file, moved)
    config = lora_config(tmp_path / "changed", moved, **changes)
    train(config, dataset=Squares(), stop_after=1)
    other = tiny_model("tiny", seed=2)
    save_model(other, moved)
    with pytest.raises(ValueError, match="is not the base model the checkpoint's LoRA was trained on"):
        train(config, dataset=Squares())


def test_gradient_checkpointing_changes_nothing(tmp_path, init_file):
    """Recomputing the U-Net's blocks (use_reentrant=False) reaches the LoRA parameters inside them: same bits."""
    runs = [train(lora_config(tmp_path / str(flag), init_file, steps=2, gradient_checkpointing=flag),
                  dataset=Squares())[0] for flag in (False, True)]
    plain, recomputed = (_weights(r.checkpoint / "lora.safetensors") for r in runs)
    assert all(torch.equal(plain[k], recomputed[k]) for k in plain)


def _ddp_worker(rank: int, port: int, root, init) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(lora_config(root, init, steps=3, lr=1e-3, lora_text_encoder=True), dataset=Squares(), device="cpu")


def test_two_processes_match_one(tmp_path, init_file):
    """Two gloo processes (torchrun's environment) train the LoRA to the weights of one process, within the bound
    tests/test_training_ddp.py explains (1% of lr after 3 AdamW steps)."""
    one = train(lora_config(tmp_path / "one", init_file, steps=3, lr=1e-3, lora_text_encoder=True),
                dataset=Squares())[0]
    mp.spawn(_ddp_worker, args=(_free_port(), tmp_path / "two", init_file), nprocs=2, join=True)
    for name in ("lora.safetensors", "latest/lora.safetensors", "latest/lora_ema.safetensors"):
        a, b = _weights(one.run_dir / name), _weights(tmp_path / "two" / name)
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, name
    assert checkpointing.load_checkpoint(tmp_path / "two" / "latest").state["world_size"] == 2


# ---- against diffusers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["tiny", "tiny-sdxl"])
def test_diffusers_reads_the_file(tmp_path, family):
    """A LoRA trained on a diffusers folder's weights (U-Net with LoCon, the text encoder(s)), loaded by diffusers'
    load_lora_weights into a pipeline of the same weights, gives kedavra's merged U-Net output and, through both
    pipelines (Euler, 4 steps, guidance 5 with a negative prompt), the same image within 2/255."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from reference_models import (
        reference_models,
        sdxl_reference_models,
        write_clip_tokenizer,
        write_diffusers,
        write_sdxl_diffusers,
    )

    config = PRESETS[family]
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1)
    if family == "tiny-sdxl":
        refs = sdxl_reference_models(config, seed=3)
        folder = write_sdxl_diffusers(tmp_path / "base", refs, config)
        reference = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    else:
        refs = reference_models(config, seed=3)
        folder = write_diffusers(tmp_path / "base", refs, config)
        scheduler.save_pretrained(folder / "scheduler")  # SD 1.x's leading spacing, for kedavra's loader too
        text, unet, vae = refs
        reference = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=text, tokenizer=write_clip_tokenizer(tmp_path / "tok"), unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    result = train(lora_config(tmp_path / "run", folder, steps=3, lr=1e-2, lora_conv=True, lora_text_encoder=True),
                   dataset=Squares())[0]
    ours = Pipeline(load_model(folder), dtype="fp32", optimize=False)
    inputs = unet_inputs(ours.model)
    before = run_unet(ours.model, inputs)
    ours.load_lora(result.model_path)
    reference.load_lora_weights(str(result.model_path))
    added = inputs.get("added_cond")
    with torch.no_grad():
        theirs = reference.unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"],
                                **({"added_cond_kwargs": added} if added else {})).sample
    merged = run_unet(ours.model, inputs)
    assert (merged - before).abs().max() > 1e-2
    torch.testing.assert_close(merged, theirs, rtol=0, atol=UNET_TOL)

    kwargs = dict(prompt="a red square on the left", negative_prompt="blurry", guidance_scale=5.0)
    latents = reference(**kwargs, num_inference_steps=4, height=IMAGE_SIZE, width=IMAGE_SIZE,
                        generator=torch.Generator().manual_seed(5), output_type="latent").images
    with torch.no_grad():
        their_image = (reference.vae.decode(latents / reference.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    our_latents = ours(**kwargs, steps=4, sampler="euler", seed=5, width=IMAGE_SIZE, height=IMAGE_SIZE).latents
    our_image = (ours.model.vae.decode_latents(our_latents) / 2 + 0.5).clamp(0, 1)
    assert (our_image - their_image).abs().max().item() < IMAGE_TOL


# ---- flags ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lora_rank": 0}, r"lora_rank must be an integer \(--lora RANK: .*\) >= 1, got 0"),
        ({"lora_rank": 2.5}, r"lora_rank must be an integer .* got 2.5"),
        ({"lora_alpha": -1.0}, r"lora_alpha must be a finite number > 0.0, got -1.0"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be a number in \[0.0, 1.0\), got 1.0"),
        ({"stage": "vae"}, r"lora_rank 4 \(--lora\) trains LoRA layers .* stage 'vae' trains the VAE"),
        ({"stage": "all"}, r"stage 'all' trains the VAE, then the U-Net"),
        ({"init": None, "preset": "tiny"}, r"lora_rank 4 \(--lora\) needs init .* \(preset 'tiny'\)"),
        ({"lora_text_encoder": True, "train_text_encoder": False},
         r"train_text_encoder=False \(--freeze-text-encoder\) contradicts lora_text_encoder=True"),
        ({"train_text_encoder": True}, r"train_text_encoder=True would train the text encoder's own weights"),
        ({"lora_rank": None, "lora_alpha": None, "lora_conv": True}, r"lora_conv=True is a LoRA setting"),
        ({"lora_rank": None, "lora_alpha": 8.0}, r"lora_alpha=8.0 is a LoRA setting"),
    ],
)
def test_bad_lora_settings(tmp_path, changes, message):
    values = {"stage": None, "init": "base.safetensors", "lora_rank": RANK, "lora_alpha": ALPHA, **changes}
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path, **values)


def test_lora_defaults(tmp_path):
    """A LoRA run is stage unet with LoRA defaults (batch 4, lr 1e-4), α = the rank, the text encoder not trained;
    the stored config round-trips."""
    config = TrainConfig(init="base.safetensors", lora_rank=8, out_dir=str(tmp_path))
    assert (config.stage, config.lora_alpha, config.train_text_encoder) == ("unet", 8.0, False)
    assert (config.steps, config.batch_size, config.lr, config.warmup_steps) == (1000, 4, 1e-4, 0)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert TrainConfig(init="base.safetensors", lora_rank=8, lora_text_encoder=True).train_text_encoder


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora", "0"], "lora_rank must be an integer (--lora RANK: the rank r of the LoRA's low-rank pairs) >= 1, "
                          "got 0"),
        (["--lora", "4", "--lora-alpha", "-2"], "lora_alpha must be a finite number > 0.0, got -2.0"),
        (["--lora", "4", "--stage", "vae"], "stage 'vae' trains the VAE"),
        (["--lora", "4", "--lora-text-encoder", "--freeze-text-encoder"], "contradicts lora_text_encoder=True"),
        (["--lora-conv"], "lora_conv=True is a LoRA setting"),
    ],
)
def test_train_command_refuses_bad_lora_flags(tmp_path, capsys, flags, message):
    assert cli.main(["train", "--init", "base.safetensors", *flags, "-o", str(tmp_path / "bad")]) == 2
    assert message in capsys.readouterr().err
    assert cli.main(["train", "--preset", "tiny", "--lora", "4", "-o", str(tmp_path / "bad")]) == 2
    assert "lora_rank 4 (--lora) needs init (--init MODEL)" in capsys.readouterr().err


@pytest.mark.skipif(DEFAULT_MODEL not in embedded_models(), reason=f"the embedded {DEFAULT_MODEL!r} is not installed")
def test_train_command_trains_a_lora_of_the_embedded_model(tmp_path, monkeypatch, capsys):
    """`kedavra train --init kedavra-shapes --lora 4` (the default precision: bf16 where the CPU computes it
    natively, fp32 elsewhere; a sample grid of the merged EMA LoRA) prints the LoRA's path, and `kedavra generate
    --lora` draws with it."""
    monkeypatch.setattr("kedavra.training.loop.open_dataset", lambda *a, **k: Squares())
    out = tmp_path / "lora"
    assert cli.main(["train", "--init", DEFAULT_MODEL, "--lora", "4", "--image-size", "16", "--steps", "2",
                     "--sample-interval", "2", "--sample-prompt", "a red circle", "--no-progress", "-o",
                     str(out)]) == 0
    printed = capsys.readouterr().out
    assert "finished at step 2" in printed and f"LoRA (EMA weights): {out / 'lora.safetensors'}" in printed
    assert f"(LoRA: {out / 'checkpoints' / 'step_00000002' / 'lora.safetensors'})" in printed
    assert (out / "samples" / "step_00000002.png").read_bytes().startswith(b"\x89PNG")
    meta = metadata(out / "lora.safetensors")
    mixed = "bf16" if resolve_precision("auto", torch.device("cpu")) == "bf16" else "no"  # fp32 without native bf16
    assert meta["ss_mixed_precision"] == mixed and meta["ss_sd_model_name"] == DEFAULT_MODEL
    image = tmp_path / "out.png"
    assert cli.main(["generate", "a red circle", "--model", DEFAULT_MODEL, "--lora", str(out / "lora.safetensors"),
                     "--steps", "2", "--seed", "0", "--precision", "fp32", "-q", "-o", str(image)]) == 0
    assert image.read_bytes().startswith(b"\x89PNG")
    assert math.isfinite(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"])
