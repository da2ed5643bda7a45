"""Colour emoji from the Noto Color Emoji font, captioned with their Unicode names ("face with tears of joy").

The font comes from the Debian package fonts-noto-color-emoji (`apt-get install -y fonts-noto-color-emoji`),
installed at NOTO_EMOJI_FONT. It is a CBDT bitmap font with a single strike, so it only renders at
NOTO_STRIKE_SIZE; each glyph is drawn there with its own colours, cropped to what it covers, composited on a
plain background, padded to a square with a small margin and resized to image_size.

Which emoji: every single code point whose Unicode category is "So" (symbol, other), that Python's unicodedata
can name, and that the installed font has a glyph for (a missing glyph has an empty bounding box); regional
indicator letters (the halves of flags) are left out. Sequences (flags, skin tones, ZWJ families) are not
included. With Debian 12's font (2.042) and Python 3.11 that is 1,349 emoji. Split: every TEST_EVERY-th emoji in
code-point order is the test split, the rest is train.
"""

from __future__ import annotations

import unicodedata
from functools import cache
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from kedavra.data.folder import SPLITS, image_to_tensor
from kedavra.validation import check_choice, check_int, is_int

NOTO_EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")  # Debian fonts-noto-color-emoji
INSTALL_COMMAND = "apt-get update && apt-get install -y fonts-noto-color-emoji"
NOTO_STRIKE_SIZE = 109  # the one bitmap strike of Noto Color Emoji (CBDT); other sizes fail to load
# Code-point ranges that hold emoji: Latin-1 symbols (©, ®), general punctuation to misc symbols and arrows
# (‼ … ⭕), CJK symbols (〰, ㊗) and the supplementary planes' emoji blocks (🀄 … 🫸).
EMOJI_RANGES = ((0x00A9, 0x00AF), (0x2000, 0x2C00), (0x3030, 0x32A0), (0x1F000, 0x1FB00))
REGIONAL_INDICATORS = (0x1F1E6, 0x1F200)  # letters that pair up into flags
TEST_EVERY = 10  # every 10th emoji (code-point order) is held out for the test split
DEFAULT_BACKGROUND = (255, 255, 255)
EMOJI_MARGIN = 0.05  # free border on each side, as a fraction of the emoji's larger side


@cache
def load_font(path: str) -> ImageFont.FreeTypeFont:
    """The emoji font at its bitmap strike size; a FileNotFoundError with the install command if it is missing."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"the emoji data set needs the Noto Color Emoji font at {path}; install it with: "
                                f"{INSTALL_COMMAND}")
    try:
        return ImageFont.truetype(path, NOTO_STRIKE_SIZE)
    except OSError as error:
        raise ValueError(f"cannot load {path} at size {NOTO_STRIKE_SIZE} (a CBDT colour bitmap font such as Noto "
                         f"Color Emoji is needed): {error}") from error


@cache
def emoji_code_points(path: str = str(NOTO_EMOJI_FONT)) -> tuple[int, ...]:
    """The code points the font at `path` draws (module docstring), in increasing order."""
    font = load_font(path)
    found = []
    for start, stop in EMOJI_RANGES:
        for code in range(start, stop):
            char = chr(code)
            if unicodedata.category(char) != "So" or REGIONAL_INDICATORS[0] <= code < REGIONAL_INDICATORS[1]:
                continue
            if not unicodedata.name(char, ""):
                continue
            left, top, right, bottom = font.getbbox(char)
            if right > left and bottom > top:
                found.append(code)
    return tuple(found)


def caption(code: int) -> str:
    """The lower-cased Unicode name: 'watermelon', 'face with tears of joy'."""
    return unicodedata.name(chr(code)).lower()


def render_emoji(code: int, image_size: int, background=DEFAULT_BACKGROUND, font_path: str = str(NOTO_EMOJI_FONT)):
    """The emoji `code` as an RGB image_size x image_size image on `background`."""
    font = load_font(font_path)
    char = chr(code)
    left, top, right, bottom = font.getbbox(char)
    glyph = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    ImageDraw.Draw(glyph).text((-left, -top), char, font=font, embedded_color=True)
    drawn = glyph.getbbox()  # the pixels the emoji covers, inside its advance box
    if drawn is None:
        raise ValueError(f"{font_path} draws U+{code:04X} ({caption(code)}) blank")
    glyph = glyph.crop(drawn)
    side = round(max(glyph.size) * (1 + 2 * EMOJI_MARGIN))
    canvas = Image.new("RGBA", (side, side), (*background, 255))
    canvas.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return canvas.convert("RGB").resize((image_size, image_size), Image.Resampling.LANCZOS)


def _check_background(background) -> tuple[int, int, int]:
    if (not isinstance(background, tuple | list) or len(background) != 3
            or not all(is_int(c) and 0 <= c <= 255 for c in background)):
        raise ValueError(f"background must be an RGB triple of integers in 0..255, got {background!r}")
    return tuple(background)


class EmojiDataset(torch.utils.data.Dataset):
    """Items {"image": (3, image_size, image_size) in [-1, 1], "caption": str}, one per emoji of the split."""

    def __init__(self, *, split: str = "train", image_size: int = 32, font_path: str | Path = NOTO_EMOJI_FONT,
                 background=DEFAULT_BACKGROUND):
        self.image_size = check_int("image_size", image_size, low=1)
        check_choice("split", split, SPLITS)
        self.split, self.font_path = split, str(font_path)
        self.background = _check_background(background)
        codes = emoji_code_points(self.font_path)
        if not codes:
            raise ValueError(f"{self.font_path} draws none of the emoji code points; is it an emoji font?")
        test = split == "test"
        self.codes = tuple(c for i, c in enumerate(codes) if (i % TEST_EVERY == TEST_EVERY - 1) == test)

    def __len__(self) -> int:
        return len(self.codes)

    def load_image(self, index: int) -> Image.Image:
        return render_emoji(self.codes[index], self.image_size, self.background, self.font_path)

    def __getitem__(self, index: int) -> dict:
        return {"image": image_to_tensor(self.load_image(index)), "caption": caption(self.codes[index])}
