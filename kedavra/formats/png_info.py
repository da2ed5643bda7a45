"""Generation parameters inside PNG files, in AUTOMATIC1111's "parameters" text format (its "infotext").

A1111's web UI, civitai and most image viewers for Stable Diffusion read a PNG text chunk with the keyword
"parameters" holding three parts (A1111 stable-diffusion-webui: `create_infotext` in modules/processing.py
writes it, `parse_generation_parameters` in modules/infotext_utils.py reads it):

    a photo of an astronaut riding a horse,        <- the prompt, any number of lines
    on mars                                         |
    Negative prompt: blurry, lowres                 <- only when the negative prompt is not empty
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512, Version: kedavra 0.1.0

The last line is `key: value` pairs joined by ", ". A value holding a comma, colon or newline is written as a
JSON string ("quoted"), so `Lora hashes: "add_detail: 7c6bad76eb54"` stays one value.

Where A1111's reader loses text its writer put there, ours keeps it, so that format -> parse is the identity
for every valid `GenerationParameters`: we also quote values holding a double quote, or spaces at either end,
or nothing at all; we keep spaces at the ends of prompt lines (A1111 strips every line); we do not strip a
prompt that starts with spaces (A1111 strips the whole text); we take only the first line that starts with
"Negative prompt:" as the switch. A text A1111 wrote reads the same either way, less those strippings.
One thing neither format can hold: a prompt line starting with "Negative prompt:" (it would read as the
switch), so `GenerationParameters` refuses it.

Older A1111 versions folded the schedule into the sampler name ("DPM++ 2M Karras") and wrote 8-digit
"AutoV1" model hashes; such files parse as they are (sampler "DPM++ 2M Karras", no schedule type).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from kedavra import __version__
from kedavra.validation import check_int, check_number, check_optional_int, check_text

KEDAVRA_VERSION = f"kedavra {__version__}"

# A1111 modules/infotext_utils.py `re_param`: one `key: value` pair of the last line; the value is a JSON string
# or runs to the next comma. A line with fewer than 3 pairs is not the key-value line (A1111's test).
KEY_VALUE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
MIN_KEY_VALUE_PAIRS = 3  # A1111 parse_generation_parameters: `len(re_param.findall(lastline)) < 3`
KEY = re.compile(r"\w[\w \-/]*[\w\-/]")  # what KEY_VALUE's key group reads back whole (no space at the end)
SIZE = re.compile(r"([0-9]+)x([0-9]+)")  # A1111 `re_imagesize`, "512x768", ASCII digits only
INTEGER = re.compile(r"[0-9]+")

NEGATIVE_PROMPT_PREFIX = "Negative prompt:"  # A1111 create_infotext writes "\nNegative prompt: " + text
NEEDS_QUOTES = (",", ":", "\n", '"')  # A1111 `quote` uses the first three; a quote sign makes a value ambiguous

# The keys the fields below map to, in the order A1111's create_infotext writes them; other keys go to `extra`
# and are written after "Clip skip" and before "Version", where A1111 puts its extra_generation_params.
FIELD_KEYS = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
              "Denoising strength", "Clip skip")
VERSION_KEY = "Version"

PARAMETERS_KEYWORD = "parameters"  # the PNG text keyword A1111 writes and reads
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # PNG spec (ISO/IEC 15948, W3C PNG 3rd ed.) sec. 5.2
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")  # PNG spec sec. 11.3.3
MAX_KEYWORD_LENGTH = 79  # PNG spec sec. 11.3.3.2: a keyword is 1-79 Latin-1 characters
MAX_TEXT_BYTES = 16 * 2**20  # ours: far above any prompt; bounds what a hostile compressed chunk inflates to

SHORT_HASH_LENGTH = 10  # A1111 "AutoV2" model hash: sha256 hex digest [0:10] (modules/hashes.py)


@dataclass(frozen=True, kw_only=True)
class GenerationParameters:
    """What made an image, as A1111 records it; `sampler` and `schedule_type` are A1111's display names."""

    prompt: str
    negative_prompt: str = ""
    steps: int
    sampler: str  # "Euler a", "DPM++ 2M", ...
    schedule_type: str | None = None  # "Karras", "Automatic", ...; None leaves the key out
    cfg_scale: float
    seed: int
    width: int
    height: int
    model_hash: str | None = None  # model_hash(path): A1111's AutoV2 short hash
    model: str | None = None  # the checkpoint's file name without extension, as A1111 writes it
    denoising_strength: float | None = None  # image-to-image only
    clip_skip: int | None = None
    extra: dict[str, str] = field(default_factory=dict, hash=False)  # other keys, e.g. {"VAE hash": "..."}
    version: str | None = KEDAVRA_VERSION

    def __post_init__(self):
        check_text("prompt", self.prompt)
        check_text("negative_prompt", self.negative_prompt)
        for number, line in enumerate(self.prompt.split("\n"), 1):
            if line.startswith(NEGATIVE_PROMPT_PREFIX):
                raise ValueError(f"prompt line {number} ({line!r}) starts with {NEGATIVE_PROMPT_PREFIX!r}, "
                                 "which A1111's format reads as the start of the negative prompt")
        check_int("steps", self.steps, low=1)
        check_int("seed", self.seed, low=0)
        check_int("width", self.width, low=1)
        check_int("height", self.height, low=1)
        _check_text("sampler", self.sampler, optional=False)
        for name in ("schedule_type", "model_hash", "model", "version"):
            _check_text(name, getattr(self, name), optional=True)
        object.__setattr__(self, "cfg_scale", check_number("cfg_scale", self.cfg_scale))
        if self.denoising_strength is not None:
            strength = check_number("denoising_strength", self.denoising_strength)
            if not 0.0 <= strength <= 1.0:
                raise ValueError(f"denoising_strength must be in [0, 1] or None (text to image), got {strength}")
            object.__setattr__(self, "denoising_strength", strength)
        check_optional_int("clip_skip", self.clip_skip, low=1)
        if not isinstance(self.extra, Mapping):
            raise ValueError(f"extra must be a dict of str to str, got {type(self.extra).__name__}")
        for key, value in self.extra.items():
            _check_extra(key, value)
        object.__setattr__(self, "extra", dict(self.extra))


def _check_text(name: str, value, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        allowed = "a non-empty str or None" if optional else "a non-empty str"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_extra(key, value) -> None:
    if not isinstance(key, str) or not KEY.fullmatch(key):
        raise ValueError(f"extra key {key!r} cannot be written: a key is a letter or digit followed by letters, "
                         "digits, spaces, '-' or '/', and ends without a space (A1111's key pattern)")
    if key in FIELD_KEYS or key == VERSION_KEY:
        raise ValueError(f"extra key {key!r} is one of the fields; set the field instead")
    if not isinstance(value, str):
        raise ValueError(f"extra[{key!r}] must be a str (the file stores text), got {type(value).__name__}")


# ---- the text ---------------------------------------------------------------------------------------------------


def format_parameters(p: GenerationParameters) -> str:
    """The A1111 infotext for `p`: prompt lines, "Negative prompt: ..." if any, then the key-value line."""
    pairs = {
        "Steps": str(p.steps),
        "Sampler": p.sampler,
        "Schedule type": p.schedule_type,
        "CFG scale": _format_float(p.cfg_scale),
        "Seed": str(p.seed),
        "Size": f"{p.width}x{p.height}",
        "Model hash": p.model_hash,
        "Model": p.model,
        "Denoising strength": None if p.denoising_strength is None else _format_float(p.denoising_strength),
        "Clip skip": None if p.clip_skip is None else str(p.clip_skip),
        **p.extra,
        VERSION_KEY: p.version,
    }
    key_values = ", ".join(f"{key}: {_quote(value)}" for key, value in pairs.items() if value is not None)
    lines = [p.prompt] if p.prompt else []
    if p.negative_prompt:
        lines.append(f"{NEGATIVE_PROMPT_PREFIX} {p.negative_prompt}")
    return "\n".join([*lines, key_values])


def _format_float(value: float) -> str:
    """Shortest text that reads back as `value`, without a needless ".0": 7.0 -> "7", 7.5 -> "7.5"."""
    text = repr(value)
    return text.removesuffix(".0")


def _quote(value: str) -> str:
    """The value as A1111 writes it: a JSON string where bare text would not read back the same."""
    if value and value == value.strip() and not any(mark in value for mark in NEEDS_QUOTES):
        return value
    return json.dumps(value, ensure_ascii=False)


def _unquote(value: str) -> str:
    """A1111's `unquote`: a value in double quotes is a JSON string; one that fails to decode stays as it is."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        return value
    return decoded if isinstance(decoded, str) else value


def parse_parameters(text: str) -> GenerationParameters:
    """Read an A1111 infotext (ours or A1111's) back into GenerationParameters; ValueError if it is not one."""
    *lines, last_line = text.rstrip().split("\n")
    pairs = KEY_VALUE.findall(last_line)
    if len(pairs) < MIN_KEY_VALUE_PAIRS:
        raise ValueError(f"no key-value line: the last line {last_line[:120]!r} does not hold "
                         f"{MIN_KEY_VALUE_PAIRS} or more `key: value` pairs, as A1111's parameters text does")
    prompt_lines, negative_lines = lines, []
    for index, line in enumerate(lines):
        if line.startswith(NEGATIVE_PROMPT_PREFIX):
            first = line.removeprefix(NEGATIVE_PROMPT_PREFIX)
            prompt_lines, negative_lines = lines[:index], [first.removeprefix(" "), *lines[index + 1:]]
            break
    values = {key: _unquote(value) for key, value in pairs}
    missing = [key for key in ("Steps", "Sampler", "CFG scale", "Seed", "Size") if key not in values]
    if missing:
        raise ValueError(f"the key-value line lacks {', '.join(missing)}: {last_line[:200]!r}")
    size = SIZE.fullmatch(values["Size"])
    if size is None:
        raise ValueError(f"Size must be WIDTHxHEIGHT such as 512x768, got {values['Size']!r}")
    return GenerationParameters(
        prompt="\n".join(prompt_lines),
        negative_prompt="\n".join(negative_lines),
        steps=_parse_int(values, "Steps"),
        sampler=values["Sampler"],
        schedule_type=values.get("Schedule type"),
        cfg_scale=_parse_float(values, "CFG scale"),
        seed=_parse_int(values, "Seed"),
        width=int(size[1]),
        height=int(size[2]),
        model_hash=values.get("Model hash"),
        model=values.get("Model"),
        denoising_strength=_parse_float(values, "Denoising strength") if "Denoising strength" in values else None,
        clip_skip=_parse_int(values, "Clip skip") if "Clip skip" in values else None,
        extra={key: value for key, value in values.items() if key not in FIELD_KEYS and key != VERSION_KEY},
        version=values.get(VERSION_KEY),
    )


def _parse_int(values: dict[str, str], key: str) -> int:
    if not INTEGER.fullmatch(values[key]):
        raise ValueError(f"{key} must be a whole number, got {values[key]!r}")
    return int(values[key])


def _parse_float(values: dict[str, str], key: str) -> float:
    try:
        return float(values[key])
    except ValueError:
        raise ValueError(f"{key} must be a number, got {values[key]!r}") from None


# ---- the PNG file -----------------------------------------------------------------------------------------------


def encode_png(image: Image.Image, params: GenerationParameters | None,
               extra_text: dict[str, str] | None = None) -> bytes:
    """`image` as PNG file bytes with `params` in its "parameters" chunk (None: no such chunk, as for a preview).

    The text goes in a tEXt chunk, or iTXt (UTF-8) when it is not Latin-1, as Pillow's add_text and hence A1111
    do; `extra_text` adds more text chunks ({"Software": ...}).
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    texts = {PARAMETERS_KEYWORD: format_parameters(params)} if params is not None else {}
    chunks = PngImagePlugin.PngInfo()
    for keyword, text in {**texts, **_check_extra_text(extra_text)}.items():
        if _is_latin1(text):
            chunks.add_text(keyword, text)
        else:
            chunks.add_itxt(keyword, text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=chunks)
    return buffer.getvalue()


def write_png(image: Image.Image, path: str | os.PathLike, params: GenerationParameters,
              extra_text: dict[str, str] | None = None) -> Path:
    """Save `image` as a PNG with `params` in its "parameters" chunk, atomically; returns the path.

    The bytes are encode_png's. The file is written beside `path` under a temporary name, flushed to disk, then
    renamed over `path`, so `path` is never a half-written file.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    data = encode_png(image, params, extra_text)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open with 0o666 lets the umask set the mode, as for any new file (mkstemp would make it 0o600).
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)
    return path


def _check_extra_text(extra_text: dict[str, str] | None) -> dict[str, str]:
    extra_text = dict(extra_text or {})
    for keyword, text in extra_text.items():
        if keyword == PARAMETERS_KEYWORD:
            raise ValueError(f"extra_text may not hold {PARAMETERS_KEYWORD!r}: that chunk is written from params")
        if not isinstance(keyword, str) or not 1 <= len(keyword) <= MAX_KEYWORD_LENGTH or not _is_latin1(keyword) \
                or "\0" in keyword:
            raise ValueError(f"PNG text keyword {keyword!r} must be 1-{MAX_KEYWORD_LENGTH} Latin-1 characters "
                             "without NUL (PNG spec sec. 11.3.3.2)")
        if not isinstance(text, str):
            raise ValueError(f"extra_text[{keyword!r}] must be a str, got {type(text).__name__}")
    return extra_text


def _is_latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _sync_folder(folder: Path) -> None:
    """Flush the folder entry so the rename survives a power cut (POSIX; Windows cannot open a folder)."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_parameters(path: str | os.PathLike) -> GenerationParameters:
    """The GenerationParameters in the "parameters" chunk of the PNG at `path`; ValueError naming the file if
    it is not a readable PNG, has no such chunk, or the chunk is not A1111's format."""
    texts = read_png_text(path)
    if PARAMETERS_KEYWORD not in texts:
        found = ", ".join(repr(key) for key in texts) if texts else "none"
        raise ValueError(f"{path} has no {PARAMETERS_KEYWORD!r} text chunk (its text chunks: {found}); it was not "
                         "written with generation parameters, or a program that re-saved it dropped them")
    try:
        return parse_parameters(texts[PARAMETERS_KEYWORD])
    except ValueError as error:
        raise ValueError(f"{path}: its {PARAMETERS_KEYWORD!r} text is not A1111's format: {error}") from None


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """Every tEXt, zTXt and iTXt chunk of a PNG file as {keyword: text}, after checking the whole file.

    Walks the chunks to IEND and checks each CRC (pixels are not decoded), so a truncated or corrupt file is
    refused even where the text chunks before the image data are intact. ValueError names the file.
    """
    try:
        with open(path, "rb") as file:
            return _walk_chunks(file, str(path))
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from error


def _walk_chunks(file, name: str) -> dict[str, str]:
    if file.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
        raise ValueError(f"{name} is not a PNG file: it does not start with the PNG signature")
    texts: dict[str, str] = {}
    offset = len(PNG_SIGNATURE)
    while True:
        header = file.read(8)  # PNG spec sec. 5.3: length (4 bytes, big-endian), type (4), data, CRC (4)
        if len(header) < 8:
            raise ValueError(f"{name} is truncated: it ends at byte {offset + len(header)} before the IEND chunk")
        length, kind = struct.unpack(">I4s", header)
        body_and_crc = file.read(length + 4)
        if len(body_and_crc) < length + 4:
            raise ValueError(f"{name} is truncated: chunk {kind.decode('latin-1')!r} at byte {offset} holds "
                             f"{length} bytes but the file ends first")
        body, crc = body_and_crc[:length], int.from_bytes(body_and_crc[length:], "big")
        if zlib.crc32(kind + body) != crc:
            raise ValueError(f"{name} is corrupt: chunk {kind.decode('latin-1')!r} at byte {offset} fails its CRC")
        if kind in TEXT_CHUNKS:
            try:
                keyword, text = _decode_text_chunk(kind, body)
            except (ValueError, zlib.error) as error:
                raise ValueError(f"{name}: {kind.decode()} chunk at byte {offset} is malformed: {error}") from None
            texts[keyword] = text
        if kind == b"IEND":
            return texts
        offset += 12 + length


def _decode_text_chunk(kind: bytes, body: bytes) -> tuple[str, str]:
    """(keyword, text) of one text chunk (PNG spec sec. 11.3.3.2-4)."""
    keyword, separator, rest = body.partition(b"\0")
    if not separator:
        raise ValueError("no NUL after the keyword")
    if kind == b"tEXt":  # keyword NUL text, Latin-1
        return keyword.decode("latin-1"), rest.decode("latin-1")
    if kind == b"zTXt":  # keyword NUL method(1) zlib(text), Latin-1
        return keyword.decode("latin-1"), _inflate(rest[1:]).decode("latin-1")
    # iTXt: keyword NUL compressed(1) method(1) language NUL translated-keyword NUL text, UTF-8
    compressed = rest[:1] == b"\1"
    _language, _, rest = rest[2:].partition(b"\0")
    _translated_keyword, _, text = rest.partition(b"\0")
    return keyword.decode("latin-1"), (_inflate(text) if compressed else text).decode("utf-8")


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    text = inflater.decompress(data, MAX_TEXT_BYTES + 1)
    if len(text) > MAX_TEXT_BYTES:
        raise ValueError(f"compressed text inflates past {MAX_TEXT_BYTES} bytes")
    if not inflater.eof:
        raise ValueError("compressed text ends early")
    return text


# ---- model hashes -----------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a whole file, read in chunks (checkpoints are GBs)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def model_hash(path: str | os.PathLike) -> str:
    """A1111's "Model hash" for a checkpoint (its AutoV2 short hash): the first 10 hex digits of its SHA-256."""
    return sha256_file(path)[:SHORT_HASH_LENGTH]
