"""Textual-inversion embeddings (Gal et al. 2022): reading every file format, the library, and their use in prompts.

Parity references: diffusers' StableDiffusionPipeline.load_textual_inversion and StableDiffusionXLPipeline's (called
once per text encoder, as diffusers documents for SDXL's clip_l / clip_g files) on tiny random models built by
tests/reference_models.py, compared through `encode_prompt`. Chunking and emphasis follow A1111's
sd_hijack_clip.tokenize_line, written out here from its source.
"""

import copy
import hashlib
import json
import os

import pytest
import torch
from reference_models import (
    PARITY_ATOL,
    reference_models,
    sdxl_reference_models,
    write_clip_tokenizer,
)
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from kedavra.adapters.textual_inversion import (  # noqa: E402
    SINGLE,
    Embedding,
    EmbeddingLibrary,
    read_embedding,
)
from kedavra.checkpoint.errors import CheckpointError, UnsafeCheckpointError  # noqa: E402
from kedavra.networks.model import PRESETS  # noqa: E402
from kedavra.networks.text_encoder import TextEncoder, convert_text_encoder_state_dict  # noqa: E402
from kedavra.networks.tokenizer import END_TOKEN_ID, Tokenizer  # noqa: E402
from kedavra.pipeline.prompt_weighting import (  # noqa: E402
    EMBEDDING_TOKEN_ID,
    chunk_prompt,
    encode_conditioning,
    encode_weighted_prompts,
)

SD = PRESETS["tiny"]  # SD 1.x-shaped: one 64-wide CLIP text encoder, pads with the end token
SDXL = PRESETS["tiny-sdxl"]  # two 32-wide encoders (ViT-L-like, bigG-like with a projection)
NAME = "kedavra-cat"  # three BPE tokens ("kedavra", "-", "cat"), as file names usually are
CAT = 2368  # CLIP's "cat</w>"
L = 77


def vectors(count: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def words(word: str, count: int) -> str:
    return " ".join([word] * count)


def a1111_pt(path, vec: torch.Tensor, **options):
    """A1111's Embedding.save (modules/textual_inversion/textual_inversion.py), tensor with requires_grad as trained."""
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vec.clone().requires_grad_()}, "name": path.stem,
            "step": 1500, "sd_checkpoint": "a9263745", "sd_checkpoint_name": "v1-5-pruned-emaonly"}
    torch.save(data, path, **options)
    return path


@pytest.fixture(scope="module")
def sd15() -> Tokenizer:
    return Tokenizer.from_preset("sd15")


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    """The tiny encoder with a final LayerNorm bias like a trained one, so A1111's emphasis mean is well defined
    (as in test_prompt_weighting)."""
    torch.manual_seed(0)
    encoder = TextEncoder(SD.text_encoder).eval()
    with torch.no_grad():
        encoder.final_norm.weight.normal_(1.0, 0.3)
        encoder.final_norm.bias.normal_(0.2, 0.5)
    return encoder


def library_of(*embeddings: Embedding) -> EmbeddingLibrary:
    library = EmbeddingLibrary()
    for embedding in embeddings:
        library.add(embedding)
    return library


# ---- Files -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["a1111-pt", "a1111-pt-legacy-pickle", "gal-parameter-dict", "a1111-safetensors",
                                  "diffusers-bin", "diffusers-safetensors"])
def test_every_single_encoder_format_is_read(tmp_path, kind):
    vec = vectors(1 if kind == "diffusers-bin" else 3, 768)
    path = tmp_path / f"{NAME}{'.safetensors' if 'safetensors' in kind else '.bin' if 'bin' in kind else '.pt'}"
    if kind == "a1111-pt":
        a1111_pt(path, vec)
    elif kind == "a1111-pt-legacy-pickle":
        a1111_pt(path, vec, _use_new_zipfile_serialization=False)
    elif kind == "gal-parameter-dict":  # Gal et al.'s textual_inversion code pickled an nn.ParameterDict
        torch.save({"string_to_token": {"*": torch.tensor(265)},
                    "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})}, path)
    elif kind == "a1111-safetensors":
        save_file({"emb_params": vec}, str(path))
    elif kind == "diffusers-bin":
        torch.save({"<cat-toy>": vec[0]}, path)  # diffusers' learned_embeds.bin: one (D,) vector
    else:
        save_file({"<cat-toy>": vec}, str(path))
    embedding = read_embedding(path)
    assert embedding.name == NAME and not embedding.is_sdxl
    torch.testing.assert_close(embedding.vectors[SINGLE], vec, rtol=0, atol=0)
    assert embedding.vectors[SINGLE].dtype == torch.float32 and not embedding.vectors[SINGLE].requires_grad
    assert embedding.num_vectors == vec.shape[0]
    assert embedding.short_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    if kind.startswith("a1111-pt"):
        assert (embedding.step, embedding.sd_checkpoint, embedding.sd_checkpoint_name) == (
            1500, "a9263745", "v1-5-pruned-emaonly")


def test_sdxl_file_and_formats_told_by_content_not_name(tmp_path):
    clip_l, clip_g = vectors(2, 768), vectors(2, 1280, seed=1)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "xl.pt"))  # a safetensors file named .pt
    embedding = read_embedding(tmp_path / "xl.pt")
    assert embedding.is_sdxl and embedding.num_vectors == 2
    assert torch.equal(embedding.vectors["clip_l"], clip_l) and torch.equal(embedding.vectors["clip_g"], clip_g)
    a1111_pt(tmp_path / "pickle.safetensors", vectors(1, 768))  # a torch pickle named .safetensors
    assert read_embedding(tmp_path / "pickle.safetensors", name="other").name == "other"


class _RunsCode:
    def __reduce__(self):
        return os.getcwd, ()


@pytest.mark.parametrize(("content", "message"), [
    ({"lora_unet_down.lora_down.weight": torch.zeros(4, 8), "lora_unet_down.lora_up.weight": torch.zeros(8, 4),
      "lora_unet_down.alpha": torch.tensor(4.0)}, r"not a textual-inversion embedding: it has 3 keys \(lora_unet_down"),
    ({"string_to_param": {"*": vectors(1, 8), "+": vectors(1, 8)}}, "string_to_param must hold one term"),
    ({"emb_params": torch.zeros(1, 2, 8)}, r"shape \(1, 2, 8\)"),
    ({"emb_params": torch.zeros(2, 8, dtype=torch.int64)}, "floating-point"),
    ({"clip_l": vectors(2, 768), "clip_g": vectors(1, 1280)}, "differ in count"),
])
def test_files_that_are_no_embedding_are_named_with_their_keys(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    if all(isinstance(v, torch.Tensor) for v in content.values()):
        save_file(content, str(path))
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as error:
        read_embedding(path)
    assert str(path) in str(error.value)


def test_unsafe_and_foreign_files_are_refused(tmp_path):
    torch.save({"string_to_param": {"*": _RunsCode()}}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="getcwd"):
        read_embedding(tmp_path / "evil.pt")
    (tmp_path / "notes.pt").write_text("just text")
    with pytest.raises(CheckpointError, match="a text file"):
        read_embedding(tmp_path / "notes.pt")
    torch.save(vectors(1, 8), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="holding a Tensor"):
        read_embedding(tmp_path / "tensor.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_embedding(tmp_path / "missing.pt")


def test_vectors_that_fit_no_encoder_name_both_widths(tmp_path):
    sd1 = read_embedding(a1111_pt(tmp_path / "sd1.pt", vectors(1, 768)))
    with pytest.raises(ValueError, match=r"^embedding 'sd1' has vectors of width 768, this model's text encoder takes "
                                         r"1024 \(an SD 1\.x embedding on an SD 2\.x model\?\)$"):
        EmbeddingLibrary(widths=(1024,)).add(sd1)
    with pytest.raises(ValueError, match=r"needs SDXL's clip_l and clip_g vectors \(an SD 1\.x embedding on an SDXL"):
        EmbeddingLibrary(widths=(768, 1280)).add(sd1)
    xl = Embedding("xl", {"clip_l": vectors(1, 768), "clip_g": vectors(1, 1280)})
    with pytest.raises(ValueError, match=r"'xl' is an SDXL embedding .* of width 768 \(an SDXL embedding on an SD 1"):
        EmbeddingLibrary(widths=(768,)).add(xl)
    half = Embedding("half", {"clip_l": vectors(1, 768)})
    with pytest.raises(ValueError, match=r"'half' has no clip_g vectors, which this model's text encoder 2 \(width "
                                         r"1280\) needs"):
        EmbeddingLibrary(widths=(768, 1280)).add(half)
    assert EmbeddingLibrary(widths=(768,)).add(sd1) is sd1


def test_a_library_without_widths_checks_when_a_prompt_uses_the_embedding(sd15, encoder):
    library = library_of(Embedding(NAME, {SINGLE: vectors(1, 32)}))
    with pytest.raises(ValueError, match=f"'{NAME}' has vectors of width 32, this model's text encoder takes 64"):
        encode_weighted_prompts(sd15, encoder, f"a {NAME}", embeddings=library)
    assert encode_weighted_prompts(sd15, encoder, "a dog", embeddings=library).shape == (1, L, 64)


# ---- The library ------------------------------------------------------------------------------------------------


def test_a_folder_loads_with_its_subfolders_and_reports_each_failure(tmp_path):
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    a1111_pt(folder / "good.pt", vectors(2, 64))
    save_file({"emb_params": vectors(1, 64)}, str(folder / "sub" / "Deeper.safetensors"))
    (folder / "broken.pt").write_bytes((folder / "good.pt").read_bytes()[:300])  # a truncated download
    (folder / "empty.bin").write_bytes(b"")
    save_file({"lora_unet_a.alpha": torch.tensor(1.0), "lora_unet_a.lora_up.weight": torch.zeros(2, 2)},
              str(folder / "lora.safetensors"))
    save_file({"emb_params": vectors(1, 32)}, str(folder / "sub" / "narrow.safetensors"))
    torch.save({"tok": vectors(1, 64)}, folder / "sub" / "GOOD.bin")  # the name "good" again, other case
    (folder / "readme.txt").write_text("not read")
    library = EmbeddingLibrary(widths=(64,))
    report = library.load_dir(folder)
    assert report.loaded == ("good", "Deeper")
    assert list(library) == ["Deeper", "good"]  # A1111 lists them by lower-cased name
    reasons = {path.name: reason for path, reason in report.failed.items()}
    assert set(reasons) == {"broken.pt", "empty.bin", "lora.safetensors", "narrow.safetensors", "GOOD.bin"}
    assert "corrupt" in reasons["broken.pt"] and "empty file" in reasons["empty.bin"]
    assert reasons["lora.safetensors"].startswith(str(folder / "lora.safetensors"))
    assert "lora_unet_a.alpha" in reasons["lora.safetensors"]
    assert "width 32, this model's text encoder takes 64" in reasons["narrow.safetensors"]
    assert "already taken by 'good'" in reasons["GOOD.bin"]
    good_hash = hashlib.sha256((folder / "good.pt").read_bytes()).hexdigest()[:12]
    assert library.hashes(["good"]) == {"good": good_hash}
    assert set(library.hashes()) == {"good", "Deeper"}
    with pytest.raises(FileNotFoundError, match="no such folder"):
        library.load_dir(tmp_path / "nowhere")
    assert library.remove("good").name == "good" and "good" not in library


def test_names_are_unique_and_a_name_is_found_longest_first(sd15):
    short, long = Embedding("kedavra", {SINGLE: vectors(1, 64)}), Embedding(NAME, {SINGLE: vectors(2, 64)})
    library = library_of(short, long)
    with pytest.raises(ValueError, match="already taken by 'kedavra'"):
        library.add(Embedding("KEDAVRA", {SINGLE: vectors(1, 64)}))
    (chunk,) = chunk_prompt(sd15, "Kedavra-Cat and kedavra, kedavras", embeddings=library)  # the tokenizer lower-cases
    assert chunk.embeddings == ((1, long), (4, short))  # [start, long x2, "and", short, ",", "kedavras", end]
    expected = (sd15.start_id, 0, 0, *sd15.encode("and"), 0, sd15.comma_id, *sd15.encode("kedavras"), sd15.end_id)
    assert chunk.ids[: len(expected)] == expected


# ---- Prompts ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("before", "chunks", "at"), [(72, 1, ((0, 73),)), (73, 2, ((1, 1),))])
def test_an_embedding_is_never_split_across_chunks(sd15, before, chunks, at):
    """A1111 tokenize_line: when the n vectors do not fit in the open chunk, it is closed (padded) first."""
    embedding = Embedding(NAME, {SINGLE: vectors(3, 64)})
    result = chunk_prompt(sd15, f"{words('cat', before)} {NAME}", embeddings=library_of(embedding))
    assert len(result) == chunks
    (index, position), = at
    chunk = result[index]
    assert chunk.embeddings == ((position, embedding),)
    assert chunk.ids[position : position + 4] == (EMBEDDING_TOKEN_ID,) * 3 + (END_TOKEN_ID,)
    assert result[0].ids[1:before + 1] == (CAT,) * before
    with pytest.raises(ValueError, match="has 76 vectors; at most 75 fit in a chunk"):
        chunk_prompt(sd15, NAME, embeddings=library_of(Embedding(NAME, {SINGLE: vectors(76, 64)})))


def test_comma_backtrack_moves_an_embedding_with_the_words_after_the_comma(sd15):
    """60 cats, a comma, "dog", 3 vectors, 10 cats fill the chunk; the next cat moves what follows the comma on
    (A1111 comma_padding_backtrack) and the embedding with it (A1111 would leave its vectors at the old offset)."""
    embedding = Embedding(NAME, {SINGLE: vectors(3, 64)})
    prompt = f"{words('cat', 60)}, dog {NAME} {words('cat', 11)}"
    first, second = chunk_prompt(sd15, prompt, embeddings=library_of(embedding))
    assert first.embeddings == () and first.ids[61:63] == (sd15.comma_id, END_TOKEN_ID)
    assert second.embeddings == ((2, embedding),)
    assert second.ids[1:6] == (*sd15.encode("dog"), 0, 0, 0, CAT)


@torch.no_grad()
def test_emphasis_weights_each_vector_of_the_embedding(sd15, encoder):
    """(NAME:1.2) gives its n vectors weight 1.2; A1111's EmphasisOriginal rescale, written out here."""
    library = library_of(Embedding(NAME, {SINGLE: vectors(2, 64)}))
    (chunk,) = chunk_prompt(sd15, f"a photo of ({NAME}:1.2)", embeddings=library)
    assert chunk.weights[:7] == (1.0, 1.0, 1.0, 1.0, 1.2, 1.2, 1.0)
    cond = encode_weighted_prompts(sd15, encoder, f"a photo of ({NAME}:1.2)", embeddings=library)
    z = encode_weighted_prompts(sd15, encoder, f"a photo of {NAME}", embeddings=library)
    w = torch.ones(1, L, 1)
    w[0, 4:6] = 1.2
    expected = z * w * (z.mean() / (z * w).mean())
    torch.testing.assert_close(cond, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(cond, z, atol=1e-3)


@torch.no_grad()
def test_prompts_without_embeddings_are_unchanged_bit_for_bit(sd15, encoder):
    library = library_of(Embedding(NAME, {SINGLE: vectors(2, 64)}))
    prompts = ["a red circle", words("cat", 80) + ", (dog:1.3)", "a [bird] BREAK cat"]
    for prompt in prompts:
        assert chunk_prompt(sd15, prompt, embeddings=library) == chunk_prompt(sd15, prompt)
    pairs = [(sd15, encoder)]
    plain = encode_conditioning(pairs, prompts, "blurry")
    with_library = encode_conditioning(pairs, prompts, "blurry", embeddings=library)
    assert torch.equal(plain.context, with_library.context) and torch.equal(plain.uncond_context,
                                                                           with_library.uncond_context)
    assert plain.embeddings == with_library.embeddings == ()
    assert torch.equal(encode_weighted_prompts(sd15, encoder, "a red circle", embeddings=library),
                       encoder(sd15("a red circle")))


@torch.no_grad()
def test_the_text_encoder_takes_token_embeddings_without_changing_anything_else(sd15, encoder):
    ids = sd15(["a red circle", "a cat"])
    hidden, pooled = encoder.encode(ids)
    own = encoder.token_embedding(ids)  # (B, L, D)
    assert torch.equal(encoder(ids, token_embeddings=own), encoder(ids))
    assert all(torch.equal(a, b) for a, b in zip(encoder.encode(ids, token_embeddings=own), (hidden, pooled),
                                                 strict=True))
    with pytest.raises(ValueError, match=r"token_embeddings must be \(B, L, D\) = \(2, 77, 64\)"):
        encoder(ids, token_embeddings=own[:, :, :32])
    assert not any("embedding" in key and key not in ("token_embedding.weight", "position_embedding")
                   for key in encoder.state_dict())


@torch.no_grad()
def test_conditioning_reports_the_embeddings_used_for_the_infotext(sd15, encoder, tmp_path):
    library = EmbeddingLibrary(widths=(64,))
    cat = library.load(a1111_pt(tmp_path / f"{NAME}.pt", vectors(2, 64)))
    bad = library.load(a1111_pt(tmp_path / "bad,hands:v2.pt", vectors(1, 64, seed=2)))
    library.load(a1111_pt(tmp_path / "unused.pt", vectors(1, 64, seed=3)))
    text = encode_conditioning([(sd15, encoder)], [f"a {NAME}", "a dog"], r"bad,hands:v2", embeddings=library)
    assert text.embeddings == (NAME, "bad,hands:v2")
    assert library.ti_hashes(text.embeddings) == f"{NAME}: {cat.short_hash}, badhandsv2: {bad.short_hash}"


# ---- Parity with diffusers --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_reference(tmp_path_factory):
    """(CLIPTextModel, U-Net, VAE) of the tiny preset with random weights, and a folder with CLIP's tokenizer."""
    folder = tmp_path_factory.mktemp("tokenizer")
    write_clip_tokenizer(folder)
    return reference_models(SD), folder


def kedavra_encoder(config, reference) -> TextEncoder:
    encoder = TextEncoder(config).eval()
    encoder.load_state_dict(convert_text_encoder_state_dict(reference.state_dict(), "diffusers", config))
    return encoder


@pytest.mark.parametrize("count", [1, 3])
@torch.no_grad()
def test_sd_prompt_embeddings_match_diffusers_load_textual_inversion(sd_reference, tmp_path, count):
    (text, unet, vae), folder = sd_reference
    text = copy.deepcopy(text)  # diffusers resizes the token embedding of the model it extends
    encoder = kedavra_encoder(SD.text_encoder, text)
    path = a1111_pt(tmp_path / f"{NAME}.pt", vectors(count, SD.text_encoder.width, seed=count))
    reference = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(folder), unet=unet,
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    reference.load_textual_inversion(str(path), token=NAME)
    library = EmbeddingLibrary(widths=(SD.text_encoder.width,))
    library.load(path)
    for prompt in (f"a photo of {NAME}", f"{NAME} on a table, {NAME}"):
        theirs, _ = reference.encode_prompt(prompt, "cpu", 1, False)
        ours = encode_weighted_prompts(Tokenizer(SD.tokenizer), encoder, prompt, embeddings=library)
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() < PARITY_ATOL
        plain, _ = reference.encode_prompt(prompt.replace(NAME, "cat"), "cpu", 1, False)
        assert (plain - theirs).abs().max().item() > 0.1  # the vectors did change the states


@torch.no_grad()
def test_sdxl_clip_l_and_clip_g_match_diffusers_load_textual_inversion(tmp_path):
    """clip_l into text_encoder / tokenizer, clip_g into text_encoder_2 / tokenizer_2, as diffusers' docs for SDXL
    embeddings say. The per-token states (prompt_embeds) match. The pooled embedding does not, by design:
    transformers pools at the argmax of the ids (SD configs' eos_token_id == 2), which diffusers' added token ids
    (> 49407) take over; kedavra pools at the real end token (A1111 puts id 0 at embedding positions so that the
    end token stays the argmax), which is checked against the reference's own states at that token."""
    refs = sdxl_reference_models(SDXL)
    tokenizers = [write_clip_tokenizer(tmp_path / "1"), write_clip_tokenizer(tmp_path / "2", pad_token="!")]
    encoders = [kedavra_encoder(SDXL.text_encoder, refs["text_encoder"]),
                kedavra_encoder(SDXL.text_encoder_2, refs["text_encoder_2"])]
    clip_l, clip_g = vectors(2, SDXL.text_encoder.width, seed=4), vectors(2, SDXL.text_encoder_2.width, seed=5)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / f"{NAME}.safetensors"))
    reference = diffusers.StableDiffusionXLPipeline(
        vae=refs["vae"], text_encoder=refs["text_encoder"], text_encoder_2=refs["text_encoder_2"],
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=refs["unet"],
        scheduler=diffusers.EulerDiscreteScheduler(), force_zeros_for_empty_prompt=False)
    reference.load_textual_inversion(clip_l, token=NAME, text_encoder=reference.text_encoder,
                                     tokenizer=reference.tokenizer)
    reference.load_textual_inversion(clip_g, token=NAME, text_encoder=reference.text_encoder_2,
                                     tokenizer=reference.tokenizer_2)
    library = EmbeddingLibrary(widths=(SDXL.text_encoder.width, SDXL.text_encoder_2.width))
    library.load(tmp_path / f"{NAME}.safetensors")
    prompt = f"a photo of {NAME}"
    theirs, _, their_pooled, _ = reference.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    pairs = [(Tokenizer(SDXL.tokenizer), encoders[0]), (Tokenizer(SDXL.tokenizer_2), encoders[1])]
    ours = encode_conditioning(pairs, prompt, "", pooled=True, embeddings=library)
    assert ours.embeddings == (NAME,)
    assert ours.context.shape == theirs.shape
    assert (ours.context - theirs).abs().max().item() < PARITY_ATOL
    ids = reference.tokenizer_2(reference.maybe_convert_prompt(prompt, reference.tokenizer_2), padding="max_length",
                                max_length=L, truncation=True, return_tensors="pt").input_ids  # (1, L)
    states = reference.text_encoder_2(ids, output_hidden_states=True).last_hidden_state  # final LayerNorm applied
    at_end = reference.text_encoder_2.text_projection(states[:, ids[0].tolist().index(END_TOKEN_ID)])  # (1, P)
    at_argmax = reference.text_encoder_2.text_projection(states[:, ids[0].argmax()])
    assert (ours.pooled - at_end).abs().max().item() < PARITY_ATOL
    assert (their_pooled - at_argmax).abs().max().item() < PARITY_ATOL  # transformers' pooling, hijacked
    assert ids[0].argmax() != ids[0].tolist().index(END_TOKEN_ID)



def test_pipeline_cli_and_server_use_embeddings(tmp_path, capsys):
    """pipe.load_textual_inversion and --embeddings-dir: a prompt naming the embedding changes the image, the result
    carries A1111's "TI hashes" (the file's SHA-256, 12 digits), a broken file in the folder is reported, and the
    server lists the folder at /sdapi/v1/embeddings."""
    from random_models import tiny_model

    from kedavra.checkpoint import save_model
    from kedavra.cli import main
    from kedavra.formats.png_info import read_parameters
    from kedavra.pipeline.pipeline import TI_HASHES_KEY, Pipeline

    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": vectors(2, SD.text_encoder.width)}, folder / "shiny.safetensors")
    (folder / "broken.pt").write_text("not an embedding")
    digest = hashlib.sha256((folder / "shiny.safetensors").read_bytes()).hexdigest()[:12]
    generation = {"steps": 2, "seed": 1, "width": 32, "height": 32}

    pipe = Pipeline(tiny_model("tiny"), dtype="fp32")
    plain = pipe("a shiny cat", **generation)
    pipe.load_textual_inversion(folder / "shiny.safetensors")
    used = pipe("a shiny cat", **generation)
    assert not torch.equal(used.latents, plain.latents)
    assert used.parameters == {TI_HASHES_KEY: f"shiny: {digest}"}
    assert torch.equal(pipe("a plain cat", **generation).latents, Pipeline(tiny_model("tiny"), dtype="fp32")(
        "a plain cat", **generation).latents)

    model_path = tmp_path / "tiny.safetensors"
    save_model(tiny_model("tiny"), model_path)
    common = ["--model", str(model_path), "--steps", "2", "--seed", "1", "--precision", "fp32", "-q"]
    out = str(tmp_path / "a.png")
    assert main(["generate", "a shiny cat", "--embeddings-dir", str(folder), *common, "-o", out]) == 0
    assert read_parameters(tmp_path / "a.png").extra[TI_HASHES_KEY] == f"shiny: {digest}"
    assert f"note: embedding {folder / 'broken.pt'} not loaded" in capsys.readouterr().err
    assert main(["generate", "a cat", "--embeddings-dir", str(tmp_path / "none"), *common, "-o",
                 str(tmp_path / "b.png")]) == 2

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from kedavra.api import load
    from kedavra.serving.app import ServerConfig, create_app
    from kedavra.serving.worker import ModelCatalog, Worker

    loader = lambda path: load(path, dtype="fp32", embeddings_dir=folder)  # noqa: E731
    catalog = ModelCatalog(None, initial=model_path)
    worker = Worker(loader(model_path), catalog.identify(catalog.entries()[0]), catalog, loader)
    app = create_app(worker, ServerConfig(api_key=None, max_body_bytes=2**20))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        listing = client.get("/sdapi/v1/embeddings").json()
        assert listing["loaded"] == {"shiny": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                               "shape": SD.text_encoder.width, "vectors": 2}}
        assert list(listing["skipped"]) == ["broken"]
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "a shiny cat", "steps": 2, "seed": 1,
                                                          "width": 32, "height": 32})
        assert f'TI hashes: "shiny: {digest}"' in json.loads(response.json()["info"])["infotexts"][0]
    worker.stop()
