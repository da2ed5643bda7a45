"""A1111 "parameters" text in PNG files: exact strings, the round trip, A1111-written text, file errors, hashes.

The expected strings follow the layout of AUTOMATIC1111's `create_infotext` (modules/processing.py): prompt,
"Negative prompt: ..." when not empty, then `key: value` pairs in its key order, JSON-quoted where a value holds
a comma, colon or newline.
"""

import hashlib
import json
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from kedavra.formats.png_info import (
    FIELD_KEYS,
    KEY,
    VERSION_KEY,
    GenerationParameters,
    format_parameters,
    model_hash,
    parse_parameters,
    read_parameters,
    read_png_text,
    sha256_file,
    write_png,
)

SD15 = {"model_hash": "6ce0161689", "model": "v1-5-pruned-emaonly"}  # v1-5-pruned-emaonly.safetensors, AutoV2


def params(**changes) -> GenerationParameters:
    base = dict(prompt="a photo of an astronaut riding a horse on mars", negative_prompt="blurry, lowres", steps=20,
                sampler="Euler a", cfg_scale=7, seed=123, width=512, height=512, version="kedavra 0.1.0", **SD15)
    return GenerationParameters(**{**base, **changes})


# ---- exact strings ----------------------------------------------------------------------------------------------

EXACT = {
    "txt2img": (
        params(),
        "a photo of an astronaut riding a horse on mars\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: 6ce0161689, "
        "Model: v1-5-pruned-emaonly, Version: kedavra 0.1.0",
    ),
    "img2img": (
        params(schedule_type="Karras", denoising_strength=0.75, clip_skip=2),
        "a photo of an astronaut riding a horse on mars\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Clip skip: 2, "
        "Version: kedavra 0.1.0",
    ),
    "empty negative prompt": (
        params(prompt="a watercolour fox", negative_prompt="", steps=30, sampler="DPM++ 2M", cfg_scale=7.5,
               seed=4294967295, width=768, height=512, model_hash=None, model=None),
        "a watercolour fox\n"
        "Steps: 30, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 4294967295, Size: 768x512, Version: kedavra 0.1.0",
    ),
    "multi-line prompt": (
        params(prompt="line one,\nline two\n\nline four", negative_prompt="ugly\ndeformed", version=None),
        "line one,\nline two\n\nline four\n"
        "Negative prompt: ugly\ndeformed\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: 6ce0161689, "
        "Model: v1-5-pruned-emaonly",
    ),
    "prompt holding Steps: text": (
        params(prompt="a sign that says Steps: 5, Sampler: fake\nSteps: 9, CFG scale: 1, Seed: 2, Size: 1x1",
               negative_prompt=""),
        "a sign that says Steps: 5, Sampler: fake\nSteps: 9, CFG scale: 1, Seed: 2, Size: 1x1\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: 6ce0161689, "
        "Model: v1-5-pruned-emaonly, Version: kedavra 0.1.0",
    ),
    "quoted values": (
        params(prompt="", negative_prompt="", model="my model, v2", sampler='say "hi"', denoising_strength=0.5,
               extra={"Lora hashes": "add_detail: 7c6bad76eb54", "Hires upscaler": "R-ESRGAN 4x+",
                      "Note": '"as is"', "Empty": ""}),
        'Steps: 20, Sampler: "say \\"hi\\"", CFG scale: 7, Seed: 123, Size: 512x512, Model hash: 6ce0161689, '
        'Model: "my model, v2", Denoising strength: 0.5, Lora hashes: "add_detail: 7c6bad76eb54", '
        'Hires upscaler: R-ESRGAN 4x+, Note: "\\"as is\\"", Empty: "", Version: kedavra 0.1.0',
    ),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_exact_text_and_back(case):
    p, text = EXACT[case]
    assert format_parameters(p) == text
    assert parse_parameters(text) == p


def test_numbers_are_written_without_needless_zeros():
    line = format_parameters(params(cfg_scale=7.0, denoising_strength=1.0)).split("\n")[-1]
    assert "CFG scale: 7, " in line and "Denoising strength: 1, " in line
    line = format_parameters(params(cfg_scale=7.5, denoising_strength=0.1)).split("\n")[-1]
    assert "CFG scale: 7.5, " in line and "Denoising strength: 0.1, " in line


def test_default_version_names_kedavra():
    p = GenerationParameters(prompt="x", steps=1, sampler="Euler", cfg_scale=1, seed=0, width=8, height=8)
    assert format_parameters(p).endswith(", Version: kedavra 0.1.0")


# ---- A1111-written text -----------------------------------------------------------------------------------------

# Written by hand from A1111's documented infotext layout (create_infotext's key order, its quoting of values with
# commas or colons, "Version: v1.10.1"), not copied from an image file; the VAE and LoRA hashes are made up.
A1111_TEXT = (
    "masterpiece, best quality, (a knight in ornate armour:1.2), castle in the background, <lora:add_detail:0.6>\n"
    "Negative prompt: (worst quality, low quality:1.4), watermark, signature\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 2389016452, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, "
    "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, "
    "Hires steps: 15, Hires upscaler: Latent, Lora hashes: \"add_detail: 7c6bad76eb54\", Version: v1.10.1"
)


def test_parses_a1111_text():
    p = parse_parameters(A1111_TEXT)
    assert p == GenerationParameters(
        prompt="masterpiece, best quality, (a knight in ornate armour:1.2), castle in the background, "
               "<lora:add_detail:0.6>",
        negative_prompt="(worst quality, low quality:1.4), watermark, signature",
        steps=28, sampler="DPM++ 2M", schedule_type="Karras", cfg_scale=6.5, seed=2389016452, width=512, height=768,
        model_hash="6ce0161689", model="v1-5-pruned-emaonly", denoising_strength=0.45, clip_skip=2,
        extra={"VAE hash": "735e4c3a44", "VAE": "vae-ft-mse-840000-ema-pruned.safetensors", "Hires upscale": "2",
               "Hires steps": "15", "Hires upscaler": "Latent", "Lora hashes": "add_detail: 7c6bad76eb54"},
        version="v1.10.1",
    )
    assert parse_parameters(format_parameters(p)) == p


def test_parses_old_a1111_text():
    """Before v1.9 the schedule was part of the sampler name and hashes were 8 digits; no Version key."""
    text = ("portrait of an old sailor, oil painting\n"
            "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234567890, Size: 512x512, "
            "Model hash: 45dee52b, ENSD: 31337\n")
    p = parse_parameters(text)
    assert (p.prompt, p.negative_prompt, p.sampler, p.schedule_type) == (
        "portrait of an old sailor, oil painting", "", "DPM++ 2M Karras", None)
    assert (p.model_hash, p.model, p.clip_skip, p.version, p.extra) == ("45dee52b", None, None, None,
                                                                        {"ENSD": "31337"})


def test_negative_prompt_switch_only_at_line_start():
    text = "a sign reading Negative prompt: none\nNegative prompt:ugly\nSteps: 1, Sampler: Euler, CFG scale: 1, " \
           "Seed: 0, Size: 8x8"
    p = parse_parameters(text)
    assert (p.prompt, p.negative_prompt) == ("a sign reading Negative prompt: none", "ugly")


def test_parse_refuses_text_that_is_not_a1111s():
    with pytest.raises(ValueError, match="no key-value line"):
        parse_parameters("just a prompt\nand another line")
    with pytest.raises(ValueError, match="lacks Steps, Sampler"):
        parse_parameters("x\nCFG scale: 7, Seed: 1, Size: 8x8")
    with pytest.raises(ValueError, match="Size must be WIDTHxHEIGHT"):
        parse_parameters("x\nSteps: 1, Sampler: Euler, CFG scale: 1, Seed: 0, Size: 512 by 512")
    with pytest.raises(ValueError, match="Steps must be a whole number"):
        parse_parameters("x\nSteps: 2.5, Sampler: Euler, CFG scale: 1, Seed: 0, Size: 8x8")
    with pytest.raises(ValueError, match="CFG scale must be a number"):
        parse_parameters("x\nSteps: 2, Sampler: Euler, CFG scale: high, Seed: 0, Size: 8x8")


@pytest.mark.parametrize("changes, message", [
    ({"prompt": "cat\nNegative prompt: dog"}, "prompt line 2"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"width": 512.0}, "width must be an int"),
    ({"cfg_scale": float("nan")}, "cfg_scale must be a finite number"),
    ({"denoising_strength": 1.5}, r"denoising_strength must be in \[0, 1\]"),
    ({"clip_skip": 0}, "clip_skip must be an integer >= 1"),
    ({"sampler": ""}, "sampler must be a non-empty str"),
    ({"model": ""}, "model must be a non-empty str or None"),
    ({"extra": {"Seed": "1"}}, "one of the fields"),
    ({"extra": {"bad:key": "1"}}, "cannot be written"),
    ({"extra": {"Hires steps": 15}}, "must be a str"),
])
def test_bad_parameters_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        params(**changes)


# ---- the round trip ---------------------------------------------------------------------------------------------

TRICKY = [", ", ": ", ":", ",", '"', '\\"', "\\", "\n", "\r", " ", "\t", "{", "Steps: 20, Sampler: x, Seed: 1",
          "Negative prompt: ", "Size: 1x1", "ü", "日本語", "🙂", "\u2028", "\x85", "é"]
texts = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(TRICKY)), max_size=8).map("".join)
names = texts.filter(bool)
prompts = texts.filter(lambda s: not any(line.startswith("Negative prompt:") for line in s.split("\n")))
keys = st.from_regex(KEY, fullmatch=True).filter(lambda k: k not in FIELD_KEYS and k != VERSION_KEY)
numbers = st.floats(min_value=-100, max_value=100, allow_nan=False) | st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=prompts, negative_prompt=texts, steps=st.integers(1, 10_000), sampler=names,
       schedule_type=st.none() | names, cfg_scale=numbers, seed=st.integers(0, 2**64), width=st.integers(1, 9999),
       height=st.integers(1, 9999), model_hash=st.none() | names, model=st.none() | names,
       denoising_strength=st.none() | st.floats(0, 1), clip_skip=st.none() | st.integers(1, 12),
       extra=st.dictionaries(keys, texts, max_size=4), version=st.none() | names)
def test_format_then_parse_is_the_identity(**fields):
    p = GenerationParameters(**fields)
    text = format_parameters(p)
    assert parse_parameters(text) == p
    assert text.count("\n") == p.prompt.count("\n") + bool(p.prompt) + p.negative_prompt.count("\n") \
        + bool(p.negative_prompt)  # every newline but the prompt's own lies between the three parts


# ---- PNG files --------------------------------------------------------------------------------------------------


def picture(mode="RGB", seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(24, 40, len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def test_png_round_trip(tmp_path):
    p, image = EXACT["img2img"][0], picture()
    path = write_png(image, tmp_path / "out.png", p, extra_text={"Software": "kedavra 0.1.0"})
    with Image.open(path) as reread:
        assert np.array_equal(np.asarray(reread), np.asarray(image))
        assert reread.info["parameters"] == format_parameters(p)
        assert reread.info["Software"] == "kedavra 0.1.0"
    assert read_parameters(path) == p
    assert b"tEXtparameters\0" in path.read_bytes()  # Latin-1 text: a plain tEXt chunk
    assert os.listdir(tmp_path) == ["out.png"]  # no temporary file left behind


def test_text_beyond_latin1_goes_in_itxt(tmp_path):
    p = params(prompt="猫が月を見ている, ukiyo-e 🙂", negative_prompt="ぼやけた")
    path = write_png(picture("RGBA"), tmp_path / "cat.png", p)
    assert b"iTXtparameters\0" in path.read_bytes()
    with Image.open(path) as reread:
        assert reread.info["parameters"] == format_parameters(p)
    assert read_parameters(path) == p


@pytest.mark.parametrize("text", ["latin-1 only", "日本語"])
def test_reads_compressed_text_chunks(tmp_path, text):
    """Other programs may store the text compressed (zTXt, or iTXt with the compression flag)."""
    p = params(prompt=text)
    chunks = PngImagePlugin.PngInfo()
    chunks.add_text("parameters", format_parameters(p), zip=True)
    path = tmp_path / "zipped.png"
    picture().save(path, pnginfo=chunks)
    assert (b"zTXtparameters" if text.isascii() else b"iTXtparameters") in path.read_bytes()
    assert read_parameters(path) == p


def test_failed_write_leaves_the_old_file(tmp_path):
    path = write_png(picture(), tmp_path / "keep.png", params())
    before = path.read_bytes()
    with pytest.raises(OSError, match="CMYK"):  # Pillow cannot store CMYK as PNG: fails mid-write
        write_png(Image.new("CMYK", (8, 8)), path, params(seed=5))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.png"]


def test_write_refuses_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_png(picture(), tmp_path / "no" / "such.png", params())
    with pytest.raises(ValueError, match="extra_text may not hold 'parameters'"):
        write_png(picture(), tmp_path / "a.png", params(), extra_text={"parameters": "x"})
    with pytest.raises(ValueError, match="PNG text keyword"):
        write_png(picture(), tmp_path / "a.png", params(), extra_text={"k" * 80: "x"})
    with pytest.raises(ValueError, match="PIL.Image.Image"):
        write_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "a.png", params())
    assert os.listdir(tmp_path) == []


def test_jpeg_is_refused(tmp_path):
    path = tmp_path / "photo.jpg"
    picture().save(path, format="JPEG")
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} is not a PNG file"):
        read_parameters(path)


def test_truncated_png_is_refused(tmp_path):
    path = write_png(picture(), tmp_path / "cut.png", params())
    data = path.read_bytes()
    for length in (len(data) // 2, len(data) - 1, 20):
        path.write_bytes(data[:length])
        with pytest.raises(ValueError, match=f"{re.escape(str(path))} is truncated"):
            read_parameters(path)


def test_corrupt_png_is_refused(tmp_path):
    path = write_png(picture(), tmp_path / "bad.png", params())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte in the image data
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fails its CRC"):
        read_parameters(path)


def test_png_without_parameters_is_refused(tmp_path):
    chunks = PngImagePlugin.PngInfo()
    chunks.add_text("Software", "GIMP")
    chunks.add_text("Comment", "hello")
    path = tmp_path / "plain.png"
    picture().save(path, pnginfo=chunks)
    with pytest.raises(ValueError, match=r"no 'parameters' text chunk \(its text chunks: 'Software', 'Comment'\)"):
        read_parameters(path)
    picture().save(path)
    with pytest.raises(ValueError, match=r"its text chunks: none"):
        read_parameters(path)


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot read .*missing.png"):
        read_parameters(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="cannot read"):
        read_png_text(tmp_path)
    chunks = PngImagePlugin.PngInfo()
    chunks.add_text("parameters", "a prompt and nothing else")
    path = tmp_path / "other.png"
    picture().save(path, pnginfo=chunks)
    with pytest.raises(ValueError, match="other.png: its 'parameters' text is not A1111's format"):
        read_parameters(path)


# ---- hashes -----------------------------------------------------------------------------------------------------


def test_model_hash_is_a1111_autov2(tmp_path):
    """AutoV2 = SHA-256 hex [:10]; the digests of "" and "abc" are the FIPS 180-2 test vectors."""
    empty, abc = tmp_path / "empty.safetensors", tmp_path / "abc.safetensors"
    empty.write_bytes(b"")
    abc.write_bytes(b"abc")
    assert model_hash(empty) == "e3b0c44298"
    assert sha256_file(abc) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert model_hash(abc) == "ba7816bf8f"


def test_hash_of_a_file_longer_than_one_read(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, size=3 * 2**20 + 7, dtype=np.uint8).tobytes()
    path = tmp_path / "big.ckpt"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_a1111_quoting_matches_json():
    """A quoted value is a JSON string: what `json.loads` of the quoted text gives back is the value."""
    line = format_parameters(params(model='a, "b"\nc')).split("\n")[-1]
    quoted = re.search(r'Model: ("(?:\\.|[^\\"])+")', line)[1]
    assert json.loads(quoted) == 'a, "b"\nc'
