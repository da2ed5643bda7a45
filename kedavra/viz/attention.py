"""Per-word cross-attention maps of a real generation: which pixels attend to each word of the prompt.

Every transformer block of the U-Net has a cross-attention layer, `attn2` (kedavra/networks/transformer.py,
TransformerBlock), whose queries are the S = h·w positions of its feature map and whose keys are the L text
tokens; its probabilities softmax(Q K^T / √Dh) (Rombach et al. 2022, sec. 3.3; Vaswani et al. 2017, eq. 1)
give, for each position, how it shares its attention among the tokens (each row sums to 1). They are
recorded through `CrossAttention.recorder` for the conditional half of the guidance batch (the prompt's,
not the negative prompt's), and then, as in Hertz et al. 2022 ("Prompt-to-Prompt", sec. 3.1, fig. 4):
    1. averaged over the heads                                               (S, L)
    2. summed over the tokens of each word, the start, end and padding
       tokens summed into one more map, "the rest"                           (K+1, S), K words
    3. folded to the layer's feature map and upsampled bilinearly
       to the image, H × W pixels                                            (K+1, H, W)
    4. averaged over every attn2 layer (and every U-Net evaluation) of a step, then over the steps.
Steps 2-4 are convex combinations of the rows, so at every pixel the K+1 maps sum to 1 throughout: a map's
value is the share of that pixel's attention that goes to the word ("all" below).

Two ways to read them (NORMALISATIONS):
    words  (default) each word's share divided by the words' total at that pixel: of the attention a pixel
           pays to the prompt's words, the part that goes to this one; the K maps sum to 1. The start token
           takes most of the attention and its share changes over the image (objects and background differ),
           which in the shares themselves can hide where a word points; dividing it out is the step
           Attend-and-Excite takes (Chefer et al. 2023, sec. 3.1, "we ignore the attention of <sot>").
    all    the shares as recorded, with the start, end and padding tokens as one more map; K+1 maps sum to 1.
Both are computed from the averaged shares (of a step, or of all steps), so they are ratios of averages.

Tokens to words: the prompt is chunked exactly as the pipeline encodes it (kedavra.pipeline.prompt_weighting:
chunk_prompt, so emphasis brackets and BREAK behave the same), chunk c's token j sitting at context position
77·c + j; CLIP's BPE marks the last token of each word with "</w>" (kedavra.networks.tokenizer), which closes a word
(MiniLM's WordPiece: a token that no "##" continuation follows).
A word's map varies by a few hundredths over the image; each is drawn stretched from its own minimum
(transparent) to its own maximum (brightest), which shows where the word is attended most, with its minimum,
maximum and mean written under it to say how much.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from kedavra.networks.tokenizer import Tokenizer
from kedavra.networks.transformer import CrossAttention, TransformerBlock
from kedavra.pipeline.pipeline import Pipeline
from kedavra.pipeline.prompt_weighting import chunk_prompt
from kedavra.pipeline.request import GenerationRequest
from kedavra.viz.panels import (
    DEFAULT_ROWS,
    SheetLayout,
    check_png_path,
    check_step_indices,
    display_scale,
    draw_sheet,
    enlarge,
    overlay,
    save_gif,
    spread_indices,
    to_image,
)
from kedavra.viz.reverse import step_label, title_lines
from kedavra.viz.trace import GenerationTrace, decode, trace_generation

REST_LABEL = "⟨start/end/pad⟩"  # the map of every position that is no word of the prompt
NORMALISATIONS = ("words", "all")  # see the module docstring


@dataclass(frozen=True)
class PromptWords:
    """The words of a prompt and the context positions of each word's tokens."""

    words: tuple[str, ...]
    positions: tuple[tuple[int, ...], ...]


def prompt_words(tokenizer: Tokenizer, prompt: str) -> PromptWords:
    """Words of `prompt` with their token positions in the (77·k)-token context the pipeline builds for it;
    the start token, the end token and the padding after it belong to no word."""
    words, positions, current = [], [], []
    for c, chunk in enumerate(chunk_prompt(tokenizer, prompt)):
        end = chunk.ids.index(tokenizer.end_id, 1)  # the end token closes the text; padding follows it
        for j in range(1, end):
            if chunk.ids[j] == tokenizer.start_id:
                continue
            current.append((c * tokenizer.config.max_length + j, chunk.ids[j]))
            if tokenizer.token_ends_word(chunk.ids[:end], j):
                words.append(tokenizer.decode(token for _, token in current))
                positions.append(tuple(position for position, _ in current))
                current = []
    if current:  # a chunk cut inside a word: keep what there is
        words.append(tokenizer.decode(token for _, token in current))
        positions.append(tuple(position for position, _ in current))
    return PromptWords(tuple(words), tuple(positions))


def feature_shape(tokens: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) of the U-Net level with `tokens` = h·w positions, for a latent of height × width: each level
    halves the sides, rounding up (kedavra/networks/unet.py, Downsample)."""
    h, w = height, width
    while h * w > tokens:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != tokens:
        raise ValueError(f"{tokens} attention positions match no U-Net level of a {height}x{width} latent")
    return h, w


class AttentionRecorder:
    """Receives attn2 probabilities (B, Nh, S, L) and keeps one (K+1, H, W) map per step (see the docstring)."""

    def __init__(self, words: PromptWords, latent_size: tuple[int, int], image_size: tuple[int, int],
                 guided: bool):
        self.words = words
        self.latent_size = latent_size
        self.image_size = image_size
        self.guided = guided  # the batch is [uncond, cond]: keep its second half
        self.steps: list[torch.Tensor] = []
        self._sum: torch.Tensor | None = None
        self._count = 0

    def grouping(self, length: int, device: torch.device) -> torch.Tensor:
        """(L, K+1) 0/1 matrix: column k picks word k's token positions, the last column every other one."""
        matrix = torch.zeros(length, len(self.words.words) + 1, device=device)
        matrix[:, -1] = 1
        for k, positions in enumerate(self.words.positions):
            matrix[list(positions), k] = 1
            matrix[list(positions), -1] = 0
        return matrix

    def record(self, probabilities: torch.Tensor) -> None:
        batch = probabilities.shape[0]
        conditional = probabilities[batch // 2:] if self.guided else probabilities  # (1, Nh, S, L)
        per_position = conditional.float().mean(dim=(0, 1))  # (S, L): heads averaged
        groups = per_position @ self.grouping(per_position.shape[1], per_position.device)  # (S, K+1)
        h, w = feature_shape(groups.shape[0], *self.latent_size)
        maps = groups.T.reshape(1, groups.shape[1], h, w)  # (S, K+1) -> (1, K+1, h, w)
        maps = F.interpolate(maps, size=self.image_size, mode="bilinear", align_corners=False)[0]  # (K+1, H, W)
        self._sum = maps if self._sum is None else self._sum + maps
        self._count += 1

    def end_step(self) -> None:
        """Close a step: its maps are the mean over the layers' calls recorded since the last step."""
        if self._sum is None:
            raise RuntimeError("no cross-attention was recorded during this step")
        self.steps.append((self._sum / self._count).cpu())
        self._sum, self._count = None, 0


def check_normalise(normalise: str) -> str:
    if normalise not in NORMALISATIONS:
        raise ValueError(f"unknown attention normalisation {normalise!r}; allowed: {', '.join(NORMALISATIONS)}")
    return normalise


def normalised(shares: torch.Tensor, normalise: str) -> torch.Tensor:
    """Shares (..., K+1, H, W) -> the maps of `normalise`: "all" as they are, "words" the K word channels
    divided by their sum, (..., K, H, W)."""
    if check_normalise(normalise) == "all":
        return shares
    words = shares[..., :-1, :, :]  # (..., K, H, W)
    if words.shape[-3] == 0:
        raise ValueError("the prompt has no words to normalise over; use normalise='all'")
    return words / words.sum(dim=-3, keepdim=True)


@dataclass(frozen=True)
class AttentionMaps:
    """A traced run and its attention shares: per_step (n, K+1, H, W) float32, channel K = REST_LABEL."""

    words: PromptWords
    per_step: torch.Tensor
    trace: GenerationTrace

    def labels(self, normalise: str = "words") -> tuple[str, ...]:
        """The name of each map of `normalise`: the words, and for "all" REST_LABEL."""
        return self.words.words if check_normalise(normalise) == "words" else (*self.words.words, REST_LABEL)

    @property
    def mean(self) -> torch.Tensor:
        """The shares averaged over the steps, (K+1, H, W)."""
        return self.per_step.mean(dim=0)

    def maps(self, step: int | None = None, normalise: str = "words") -> torch.Tensor:
        """The maps of `normalise` at a step (0-based) or, with None, from the shares averaged over all steps."""
        return normalised(self.mean if step is None else self.per_step[step], normalise)

    def word_map(self, word: str, step: int | None = None, normalise: str = "words") -> torch.Tensor:
        """(H, W) map of the first word equal to `word` (case-insensitive), at a step or over all steps."""
        lowered = [w.lower() for w in self.words.words]
        if word.lower() not in lowered:
            raise ValueError(f"{word!r} is not a word of the prompt; its words: {', '.join(self.words.words)}")
        return self.maps(step, normalise)[lowered.index(word.lower())]


def cross_attention_layers(pipe: Pipeline) -> list[CrossAttention]:
    """Every attn2 of the U-Net: the layers whose keys are the text tokens."""
    return [module.attn2 for module in pipe.model.unet.modules() if isinstance(module, TransformerBlock)]


def record_attention(pipe: Pipeline, request: GenerationRequest,
                     on_step: Callable[[int, int], None] | None = None) -> AttentionMaps:
    """Generate the one image of `request` (the image `pipe` gives for it; see trace.figure_request) and record
    its per-word attention maps."""
    request = pipe.check(request)
    words = prompt_words(pipe.model.tokenizer, request.prompts[0])
    f = pipe.config.vae.downsample_factor
    recorder = AttentionRecorder(words, (request.height // f, request.width // f), (request.height, request.width),
                                 guided=request.guidance_scale != 1.0)

    def step_done(i: int, n: int) -> None:
        recorder.end_step()
        if on_step is not None:
            on_step(i, n)

    layers = cross_attention_layers(pipe)
    for layer in layers:
        layer.recorder = recorder.record
    try:
        trace = trace_generation(pipe, request, step_done)
    finally:
        for layer in layers:
            layer.recorder = None
    return AttentionMaps(words, torch.stack(recorder.steps), trace)


def _row(maps: torch.Tensor, first: Image.Image, image: Image.Image, scale: int) -> tuple[list, list]:
    """Tiles and labels of one row: `first`, then each map laid over `image`, each stretched min to max."""
    tiles = [enlarge(first, scale)] + [enlarge(overlay(image, m.numpy()), scale) for m in maps]
    labels = [[f"{float(m.min()):.3f} … {float(m.max()):.3f}", f"mean {float(m.mean()):.3f}"] for m in maps]
    return tiles, labels


TITLES = {
    "words": "Cross-attention per word: of the attention each pixel pays to the prompt's words, the share of each",
    "all": "Cross-attention per word: the share of each pixel's attention that goes to the word",
}


def draw_attention(maps: AttentionMaps, x0_images: dict[int, torch.Tensor], indices: Sequence[int],
                   normalise: str = "words") -> tuple[Image.Image, SheetLayout]:
    """The sheet: a row per step in `indices` (its decoded x̂_0 from `x0_images`, then the maps over the final
    image) and a last row over all steps (the final image, then the maps of the mean shares)."""
    image = maps.trace.image
    scale = display_scale(image.width)
    tiles, labels, rows = [], [], []
    for i in check_step_indices(indices, len(maps.trace.steps)):
        row_tiles, row_labels = _row(maps.maps(i, normalise), to_image(x0_images[i]), image, scale)
        tiles.append(row_tiles)
        labels.append([["x̂_0 at this step"]] + row_labels)
        rows.append(step_label(maps.trace, i))
    row_tiles, row_labels = _row(maps.maps(None, normalise), image, image, scale)
    tiles.append(row_tiles)
    labels.append([["final image"]] + row_labels)
    rows.append(["mean over", f"all {len(maps.trace.steps)} steps"])
    names = maps.labels(normalise)
    labels[0] = [labels[0][0]] + [[name, *lines] for name, lines in zip(names, labels[0][1:], strict=True)]
    title = title_lines(maps.trace, f"{TITLES[normalise]} (heads and layers averaged; each map stretched from its "
                                    "min to its max)")
    return draw_sheet(tiles, title, rows, labels)


def draw_attention_frames(maps: AttentionMaps, x0_images: dict[int, torch.Tensor], normalise: str = "words"
                          ) -> list[Image.Image]:
    """One GIF frame per step: the step's x̂_0 and its maps over the final image, labelled with the words."""
    image = maps.trace.image
    scale = display_scale(image.width)
    title = title_lines(maps.trace, f"{TITLES[check_normalise(normalise)]}, step by step")
    frames = []
    for i in range(len(maps.trace.steps)):
        tiles, labels = _row(maps.maps(i, normalise), to_image(x0_images[i]), image, scale)
        names = maps.labels(normalise)
        labels = [["x̂_0"]] + [[name, *lines] for name, lines in zip(names, labels, strict=True)]
        frames.append(draw_sheet([tiles], title, [step_label(maps.trace, i)], [labels])[0])
    return frames


def make_attention_figure(pipe: Pipeline, request: GenerationRequest, path: str | Path, *,
                          at: Sequence[int] | None = None, normalise: str = "words",
                          on_step: Callable[[int, int], None] | None = None) -> dict[str, Path]:
    """Generate the one image of `request` (see trace.figure_request), write the sheet (steps `at`, 0-based,
    default DEFAULT_ROWS spread over the run, and all steps together) of the maps of `normalise` to `path` (.png)
    and one frame per step beside it (.gif)."""
    path = check_png_path(path)
    check_normalise(normalise)
    indices = spread_indices(request.steps, DEFAULT_ROWS) if at is None else check_step_indices(at, request.steps)
    maps = record_attention(pipe, request, on_step)
    x0_images = {i: decode(pipe, step.x0) for i, step in enumerate(maps.trace.steps)}
    sheet, _ = draw_attention(maps, x0_images, indices, normalise)
    sheet.save(path)
    gif = save_gif(draw_attention_frames(maps, x0_images, normalise), path.with_suffix(".gif"))
    return {"sheet": path, "animation": gif}
