"""A diffusers folder whose tokenizer has a vocabulary of its own (vocab.json + merges.txt other than CLIP's, as the
small test pipelines people bring have): kedavra reads it as transformers' CLIPTokenizer does, keeps it in the model's
config (saved and loaded with the model), and a whole run gives diffusers' latents.

The vocabularies are built here, as CLIP builds its own: the byte alphabet with and without "</w>", then one token
per merge in rank order, then the start and end tokens; the first 486 merges give a 1,000-token vocabulary, the size
of the tiny test pipelines'. A second one drops every non-ASCII byte, so that those bytes become the unknown token."""

import dataclasses
import json
import random
import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from reference_models import reference_models, write_diffusers  # noqa: E402
from test_pipeline_parity import LATENT_REL_TOL  # noqa: E402

from kedavra.checkpoint import CheckpointError, load_model, save_model  # noqa: E402
from kedavra.networks.model import PRESETS  # noqa: E402
from kedavra.networks.tokenizer import END_OF_WORD, Tokenizer, byte_alphabet, load_vocabulary  # noqa: E402
from kedavra.pipeline.pipeline import Pipeline  # noqa: E402

SPECIALS = ("<|startoftext|>", "<|endoftext|>")
PROMPTS = ["a red circle above a blue square", "A Café, naïve 3D rendering!!", "A Café, naïve 3D rendering",
           "<|startoftext|>x<|endoftext|> y",
           "photo of a cat, 8k, highly detailed", "   spaced\tout\n text ", "emoji 🐱 and ß", ""]


def vocabulary(num_merges: int, ascii_only: bool = False) -> tuple[list[str], list[str]]:
    """(tokens by id, merges as "a b" lines) of a CLIP-built vocabulary with `num_merges` merges."""
    alphabet = sorted(byte_alphabet())
    if ascii_only:
        alphabet = [byte_alphabet()[b] for b in range(33, 127)]
    tokens = [*alphabet, *(c + END_OF_WORD for c in alphabet)]
    known, merges = set(tokens), []
    for a, b in load_vocabulary().merge_ranks:
        if len(merges) == num_merges:
            break
        if a in known and b in known:
            merges.append(f"{a} {b}")
            tokens.append(a + b)
            known.add(a + b)
    return [*tokens, *SPECIALS], merges


def write_tokenizer(folder, tokens, merges, **options):
    """transformers' CLIPTokenizer on the vocabulary, saved as a diffusers pipeline saves it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                           model_max_length=77, **options)
    tokenizer.save_pretrained(folder)
    for name in ("tokenizer.json",):  # as the older pipelines on the Hub: vocab.json and merges.txt only
        (folder / name).unlink(missing_ok=True)
    return tokenizer


def random_prompts(tokens, count=40, seed=0):
    rng = random.Random(seed)
    words = [t.removesuffix(END_OF_WORD) for t in tokens if t not in SPECIALS and len(t) > 2]
    return [" ".join(rng.choice(words) + rng.choice(["", ",", "é", "!?", " 42"]) for _ in range(rng.randint(1, 12)))
            for _ in range(count)]


@pytest.mark.parametrize("ascii_only,pad", [(False, None), (True, None), (False, "!")],
                         ids=["1000-tokens", "ascii-with-unknowns", "padded-with-!"])
def test_ids_match_transformers(tmp_path, ascii_only, pad):
    tokens, merges = vocabulary(486 if not ascii_only else 300, ascii_only)
    theirs = write_tokenizer(tmp_path / "tokenizer", tokens, merges, **({} if pad is None else {"pad_token": pad}))
    from kedavra.checkpoint.diffusers_config import _tokenizer  # the folder as load_model reads it

    config = _tokenizer(tmp_path / "tokenizer", PRESETS["tiny"].text_encoder)
    assert config.tokens == tuple(tokens) and config.merges == tuple(merges) and config.vocab_size == len(tokens)
    assert config.pad_with == ("eos" if pad is None else "zero")
    ours = Tokenizer(config)
    for prompt in PROMPTS + random_prompts(tokens):
        if pad == "!" and "!" in prompt:  # transformers splits its pad token "!" out; kedavra does not (docs)
            continue
        expected = theirs(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours([prompt])[0].tolist() == expected, prompt
    if ascii_only:  # "é" and the emoji are outside the vocabulary: the unknown token, here the end token's id
        assert ours.encode("café") == theirs("café", add_special_tokens=False).input_ids
        assert theirs.unk_token_id in ours.encode("café")
    assert ours.decode(ours.encode("a red circle")) == "a red circle"
    assert ours.end_id == len(tokens) - 1 and ours.start_id == len(tokens) - 2


@pytest.fixture(scope="module")
def own_vocabulary_folder(tmp_path_factory):
    """A tiny SD diffusers folder whose tokenizer and text encoder have a 1,000-token vocabulary, and diffusers'
    StableDiffusionPipeline over it."""
    tokens, merges = vocabulary(486)
    base = PRESETS["tiny"]
    config = dataclasses.replace(base, text_encoder=dataclasses.replace(base.text_encoder, vocab_size=len(tokens)),
                                 tokenizer=dataclasses.replace(base.tokenizer, tokens=tuple(tokens),
                                                               merges=tuple(merges)))
    refs = reference_models(config, seed=3)
    folder = write_diffusers(tmp_path_factory.mktemp("own_vocab"), refs, config)
    (folder / "tokenizer" / "vocab.json").unlink()
    tokenizer = write_tokenizer(folder / "tokenizer", tokens, merges)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1)
    scheduler.save_pretrained(folder / "scheduler")
    text, unet, vae = refs
    reference = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    return folder, config, reference


def test_whole_run_matches_diffusers_and_the_vocabulary_travels_with_the_model(own_vocabulary_folder, tmp_path):
    folder, config, reference = own_vocabulary_folder
    model = load_model(folder)
    assert model.config.tokenizer == config.tokenizer and model.config.text_encoder.vocab_size == 1000
    kwargs = dict(prompt="a red circle above a blue square, café", negative_prompt="blurry", guidance_scale=7.5)
    theirs = reference(**kwargs, num_inference_steps=8, height=32, width=32,
                       generator=torch.Generator().manual_seed(5), output_type="latent").images
    ours = Pipeline(model, dtype="fp32")(**kwargs, steps=8, sampler="euler", seed=5).latents
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < LATENT_REL_TOL
    save_model(model, tmp_path / "own.safetensors")
    again = load_model(tmp_path / "own.safetensors")
    assert again.config == model.config
    assert torch.equal(Pipeline(again, dtype="fp32")(**kwargs, steps=8, sampler="euler", seed=5).latents, ours)


def test_bad_tokenizer_folders_are_named(own_vocabulary_folder, tmp_path):
    folder, _, _ = own_vocabulary_folder
    tokens, merges = vocabulary(486)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    tokenizer = broken / "tokenizer"
    for file in tokenizer.iterdir():
        file.unlink()
    (tokenizer / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    with pytest.raises(CheckpointError, match="merges.txt: missing: a BPE vocabulary of the model's own needs both"):
        load_model(broken)
    (tokenizer / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tokenizer / "vocab.json").write_text(json.dumps({t: 2 * i for i, t in enumerate(tokens)}))
    with pytest.raises(CheckpointError, match="vocab.json: the vocabulary must map tokens to the ids 0..N-1"):
        load_model(broken)
    (tokenizer / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    settings = {"pad_token": "<pad>", "model_max_length": 77}
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match="pad token '<pad>' is not supported; allowed: the end token"):
        load_model(broken)
    settings = {"added_tokens_decoder": {"1000": {"content": "<sks>"}}}
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match=r"added tokens \['<sks>'\] are not supported"):
        load_model(broken)
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(CheckpointError, match="lacks the special token '<s>'"):
        load_model(broken)
