"""The data side of a run: the data set, checked where it enters; the order of its items; the global batch.

Order: epoch e visits the items in the permutation drawn by a generator seeded with (seed, e), batch after
batch of `batch_size` items, the incomplete last batch dropped. So (epoch, batch index within the epoch) is
the whole position of the sampler: a resumed run recomputes the permutation and continues from it.
Under torchrun every rank draws the same permutation and keeps its own slice of each global batch
(like torch's DistributedSampler, but split per batch, so the global batch is the one a single process sees).

Items are dicts {"image": FloatTensor (3, H, W) in [-1, 1], "caption": str} (the kedavra.data contract).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

EPOCH_SEED_STRIDE = 1_000_003  # a prime: seed * stride + epoch keeps (seed, epoch) pairs apart
MAX_SAMPLE_PROMPTS = 8  # prompts in a sample grid when the config names none
PROMPT_SEARCH_ITEMS = 256  # items read to find distinct captions for the sample grid


@dataclass(frozen=True)
class DataPosition:
    """Where the sampler stands: batch `batch` (0-based) of epoch `epoch` comes next."""

    epoch: int = 0
    batch: int = 0

    def advanced(self, batches_per_epoch: int) -> DataPosition:
        if self.batch + 1 < batches_per_epoch:
            return DataPosition(self.epoch, self.batch + 1)
        return DataPosition(self.epoch + 1, 0)


def open_dataset(name: str, image_size: int, seed: int, skip_bad: bool = False):
    """kedavra.data's training split of `name` (a data set name or an image folder; skip_bad: a folder's unreadable
    and uncaptioned images are left out with a warning)."""
    try:
        from kedavra.data import DATASETS, get_dataset
    except ImportError as error:
        raise ValueError(f"cannot load data set {name!r}: kedavra.data is not available ({error})") from error
    if skip_bad and name in DATASETS:
        raise ValueError(f"skip_bad applies to an image folder, not the built-in data set {name!r}")
    options = {"skip_bad": True} if skip_bad else {}
    return get_dataset(name, split="train", image_size=image_size, seed=seed, **options)


class TrainingData:
    """A map-style data set checked at the door, read by global batch in the epoch order of the module docstring."""

    def __init__(self, dataset, image_size: int, batch_size: int, seed: int):
        try:
            size = len(dataset)
        except TypeError as error:
            raise ValueError(f"the data set must have a length (a map-style Dataset), got {type(dataset).__name__}") \
                from error
        if size == 0:
            raise ValueError("the data set is empty: there is nothing to train on")
        if size < batch_size:
            raise ValueError(f"the data set has {size} items, fewer than one batch of {batch_size}; "
                             f"use batch_size <= {size}")
        self.dataset = dataset
        self.size = size
        self.image_size = image_size
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = size // batch_size
        self._captions: dict[int, str] = {}
        self.item(0)  # fail early on a malformed item

    def item(self, index: int) -> tuple[Tensor, str]:
        """Item `index` as (image (3, H, W) float32, caption), checked against the data contract."""
        item = self.dataset[index]
        if not isinstance(item, dict) or "image" not in item or "caption" not in item:
            keys = f" with keys {sorted(item)}" if isinstance(item, dict) else ""
            raise ValueError(f"data set item {index} must be a dict with 'image' and 'caption', "
                             f"got {type(item).__name__}{keys}")
        image, caption = item["image"], item["caption"]
        expected = (3, self.image_size, self.image_size)
        if not isinstance(image, Tensor) or tuple(image.shape) != expected or not image.is_floating_point():
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"data set item {index}: image must be a float tensor of shape {expected}, got {shape}")
        if not isinstance(caption, str):
            raise ValueError(f"data set item {index}: caption must be a str, got {type(caption).__name__}")
        self._captions[index] = caption
        return image.float(), caption

    def permutation(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + epoch)
        return torch.randperm(self.size, generator=generator)

    def indices(self, position: DataPosition) -> Tensor:
        """The global batch at `position`: (batch_size,) item indices."""
        start = position.batch * self.batch_size
        return self.permutation(position.epoch)[start : start + self.batch_size]

    def images(self, indices: Sequence[int] | Tensor) -> Tensor:
        """(B, 3, H, W) images of the items."""
        return torch.stack([self.item(int(i))[0] for i in indices])

    def captions(self, indices: Sequence[int] | Tensor) -> list[str]:
        """Captions of the items (read once, then remembered)."""
        return [self._captions[int(i)] if int(i) in self._captions else self.item(int(i))[1] for i in indices]

    def sample_prompts(self, count: int = MAX_SAMPLE_PROMPTS) -> list[str]:
        """The first `count` distinct non-empty captions, in item order: a fixed prompt list for sample grids."""
        prompts: list[str] = []
        for index in range(min(self.size, PROMPT_SEARCH_ITEMS)):
            caption = self.captions([index])[0]
            if caption and caption not in prompts:
                prompts.append(caption)
                if len(prompts) == count:
                    break
        return prompts


class TokenCache:
    """Token ids per caption, computed once: the BPE tokenizer runs in Python and captions repeat."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: dict[str, Tensor] = {}

    def __call__(self, captions: Sequence[str]) -> Tensor:
        """(B, L) int64 ids."""
        for caption in captions:
            if caption not in self.ids:
                self.ids[caption] = self.tokenizer(caption)[0]  # (L,)
        return torch.stack([self.ids[c] for c in captions])
