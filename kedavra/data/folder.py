"""A user's own folder of captioned images, and the image helpers every data set shares.

Two caption conventions, checked in this order:
    metadata.jsonl   Hugging Face `imagefolder`: one JSON object per line with "file_name" (relative to the
                     folder) and "text"; images the file does not list have no caption
    <stem>.txt       a UTF-8 text file beside each image with the same stem (cat.png + cat.txt)
A folder with `train/` and `test/` subfolders (the `imagefolder` split layout) serves each split from its
subfolder; any other folder is the train split only. Images are found recursively (hidden files and folders
skipped), made RGB (alpha composited on white, EXIF rotation applied), centre-cropped to a square and resized,
so mixed sizes and aspect ratios are fine.

Construction checks every file once, reading headers only: unreadable or empty images, images without a
caption and malformed metadata lines raise a ValueError naming the files (with counts), unless skip_bad=True
turns bad or uncaptioned images into a warning and leaves them out. The user's files are only ever read.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from kedavra.validation import check_choice, check_int

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"  # Hugging Face datasets' imagefolder convention
CAPTION_FIELD = "text"  # the caption column of that convention's text-to-image examples
SPLITS = ("train", "test")  # every data set's splits, and the subfolders that hold them in a folder
MAX_LISTED = 20  # how many bad files an error message names before it says "and N more"


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor (3, H, W) in [-1, 1]: pixel / 127.5 - 1."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.float32))  # (H, W, 3)
    return (pixels / 127.5 - 1).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def flatten_alpha(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """RGB, with any transparency composited over `background`."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """The largest centred square of `image`, resized to size x size (Lanczos, antialiased when shrinking)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)


def _listing(paths, root: Path) -> str:
    names = [str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else str(p) for p in paths]
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _find_images(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if any(part.startswith(".") for part in parts) or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(path)
    return found


def _read_metadata(path: Path) -> dict[Path, str]:
    """{image path: caption} from a metadata.jsonl, with errors naming the line."""
    captions: dict[Path, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number} is not JSON ({error.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {number} must be a JSON object, got {line.strip()[:80]!r}")
            for field in ("file_name", CAPTION_FIELD):
                if not isinstance(record.get(field), str):
                    raise ValueError(f"{path} line {number} lacks a string {field!r} field: {line.strip()[:80]!r}")
            image = (path.parent / record["file_name"]).resolve()
            if not image.is_relative_to(path.parent.resolve()):
                raise ValueError(f"{path} line {number}: file_name {record['file_name']!r} is outside the folder")
            if not image.is_file():
                raise ValueError(f"{path} line {number}: file_name {record['file_name']!r} does not exist")
            if image in captions:
                raise ValueError(f"{path} line {number}: file_name {record['file_name']!r} is listed twice")
            captions[image] = record[CAPTION_FIELD].strip()
    return captions


def _header_ok(path: Path) -> bool:
    """Whether Pillow recognises the file and it has a non-zero size (reads the header only)."""
    try:
        with Image.open(path) as image:
            return image.width > 0 and image.height > 0
    except (UnidentifiedImageError, OSError, ValueError):
        return False


class FolderDataset(torch.utils.data.Dataset):
    """Items {"image": (3, image_size, image_size) in [-1, 1], "caption": str} from a folder (module docstring)."""

    def __init__(self, root: str | Path, *, split: str = "train", image_size: int = 32, skip_bad: bool = False):
        self.image_size = check_int("image_size", image_size, low=1)
        check_choice("split", split, SPLITS)
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ValueError(f"image folder {str(root)!r} does not exist or is not a folder")
        if all((root / s).is_dir() for s in SPLITS):
            root = root / split
        elif split != "train":
            raise ValueError(f"{root} has no {split}/ and train/ subfolders, so it holds only the train split")
        self.root, self.split = root, split
        self.items = self._scan(skip_bad)

    def _scan(self, skip_bad: bool) -> list[tuple[Path, str]]:
        images = _find_images(self.root)
        if not images:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.root}")
        metadata = self.root / METADATA_FILE
        if metadata.is_file():
            captions = _read_metadata(metadata)
            strays = sorted(set(captions) - {path.resolve() for path in images})
            if strays:
                raise ValueError(f"{metadata} lists {len(strays)} file(s) that are not images "
                                 f"({', '.join(IMAGE_EXTENSIONS)}): {_listing(strays, self.root.resolve())}")
            caption_of = {path: captions.get(path.resolve(), "") for path in images}
        else:
            caption_of = {path: _caption_file(path) for path in images}
        unreadable = [path for path in images if not _header_ok(path)]
        uncaptioned = [path for path in images if not caption_of[path] and path not in unreadable]
        problems = []
        if unreadable:
            problems.append(f"{len(unreadable)} unreadable or empty image(s): {_listing(unreadable, self.root)}")
        if uncaptioned:
            source = f"no line in {METADATA_FILE}" if metadata.is_file() else "no non-empty <stem>.txt beside it"
            problems.append(f"{len(uncaptioned)} image(s) without a caption ({source}): "
                            f"{_listing(uncaptioned, self.root)}")
        if problems and not skip_bad:
            raise ValueError(f"{self.root}: " + "; ".join(problems)
                             + " (to leave them out: kedavra train --skip-bad, or skip_bad=True)")
        if problems:
            warnings.warn(f"{self.root}: leaving out " + "; ".join(problems), stacklevel=3)
        bad = set(unreadable) | set(uncaptioned)
        items = [(path, caption_of[path]) for path in images if path not in bad]
        if not items:
            raise ValueError(f"{self.root}: no usable images remain after leaving out the bad ones")
        return items

    def __len__(self) -> int:
        return len(self.items)

    def load_image(self, index: int) -> Image.Image:
        """Item `index` as an RGB PIL image of image_size x image_size."""
        path = self.items[index][0]
        try:
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)
                return fit_square(flatten_alpha(image), self.image_size)
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise ValueError(f"cannot decode image {path}: {error}") from error

    def __getitem__(self, index: int) -> dict:
        return {"image": image_to_tensor(self.load_image(index)), "caption": self.items[index][1]}


def _caption_file(image: Path) -> str:
    text = image.with_suffix(".txt")
    if not text.is_file():
        return ""
    try:
        return text.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as error:
        raise ValueError(f"caption file {text} is not UTF-8 text ({error.reason} at byte {error.start})") from None
