"""Captioned image data sets that work offline (a layer on top of the core; the core never imports it).

    shapes   procedural coloured shapes with GenEval-style captions and their ground-truth scenes
    emoji    Noto Color Emoji glyphs captioned with their Unicode names (needs the Debian font package)
    digits   the 5,000 MNIST digits vendored in kedavra/assets, "a handwritten digit seven"
    folder   a user's folder: metadata.jsonl (Hugging Face imagefolder) or a .txt caption beside each image

Every item is {"image": float tensor (3, H, W) in [-1, 1], "caption": str}.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kedavra.data.digits import DigitsDataset
from kedavra.data.emoji import EmojiDataset
from kedavra.data.folder import SPLITS, FolderDataset
from kedavra.data.shapes import ShapesConfig, ShapesDataset
from kedavra.validation import check_choice, check_int

DATASETS = ("shapes", "emoji", "digits")


def _shapes(split: str, image_size: int, seed: int, size: int | None = None, **config) -> ShapesDataset:
    return ShapesDataset(ShapesConfig(image_size=image_size, **config), split=split, size=size, seed=seed)


def _check_options(name: str, options: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for data set {name!r}; allowed: {', '.join(allowed) or 'none'}")


SHAPES_OPTIONS = ("size", "shapes", "colours", "backgrounds", "max_objects", "kind_weights", "size_word_probability",
                  "placement_probability", "paraphrase_probability", "hold_out")
EMOJI_OPTIONS = ("font_path", "background")
FOLDER_OPTIONS = ("skip_bad",)


def get_dataset(name: str, *, split: str = "train", image_size: int = 32, seed: int = 0,
                **options) -> torch.utils.data.Dataset:
    """The data set `name` (one of DATASETS, or a path to a folder of captioned images) for `split`.

    Items are {"image": (3, image_size, image_size) in [-1, 1], "caption": str}. `seed` picks the shapes
    data set's stream (the others are fixed files and ignore it). Options:
        shapes   size (number of items; 50,000 train / 1,000 test), and any ShapesConfig field
        emoji    font_path, background (an RGB triple)
        folder   skip_bad (leave out unreadable and uncaptioned images with a warning instead of failing)
    """
    check_choice("split", split, SPLITS)
    check_int("image_size", image_size, low=1)
    if not isinstance(name, str | Path):
        raise ValueError(f"data set name must be a string, got {type(name).__name__}")
    if name == "shapes":
        _check_options(name, options, SHAPES_OPTIONS)
        return _shapes(split, image_size, seed, **options)
    if name == "emoji":
        _check_options(name, options, EMOJI_OPTIONS)
        return EmojiDataset(split=split, image_size=image_size, **options)
    if name == "digits":
        _check_options(name, options, ())
        return DigitsDataset(split=split, image_size=image_size)
    if Path(name).expanduser().is_dir():
        _check_options("folder", options, FOLDER_OPTIONS)
        return FolderDataset(name, split=split, image_size=image_size, **options)
    raise ValueError(f"unknown data set {str(name)!r}: expected one of {', '.join(DATASETS)} or the path of an "
                     "existing folder of captioned images")


__all__ = [
    "DATASETS",
    "SPLITS",
    "DigitsDataset",
    "EmojiDataset",
    "FolderDataset",
    "ShapesConfig",
    "ShapesDataset",
    "get_dataset",
]
