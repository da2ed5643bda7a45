"""Procedural shapes: coloured circles, squares, triangles, stars, crosses and diamonds on plain backgrounds,
captioned in the style of GenEval's prompts (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for
Evaluating Text-to-Image Alignment"): "a red circle", "a large blue square", "two green triangles",
"a red circle and a blue square", "a yellow star above a purple cross", "a big pink diamond in the top left
corner", in the canonical wording or (half the time) any other the grammar knows ("the blue star to the left of
an orange cross", "3 green triangles"; kedavra/data/shapes_grammar.py).

Every item is a pure function of (seed, split, index): a prompt is sampled (`PromptSpec`), a layout realises it
(`Scene`, the ground truth the evaluator is tested against), and Pillow draws it at 4x and box-filters it down
(anti-aliasing by supersampling), so no image is ever stored.

Held out of the train split (`ShapesConfig.hold_out`, on by default), so that the test split can ask for
combinations a model never saw:
    colour of a shape    shape i of `shapes` never wears colour (i + 1) of `colours`: with the defaults an orange
                         circle, a yellow square, a green triangle, a blue star, a purple cross, a pink diamond
    two-object pairs     shapes i and i + n/2 never share a two-object image: circle+star, square+cross,
                         triangle+diamond (in either order, in "and" and in spatial-relation prompts)
The test split draws from the full space with its own seed stream, so it holds both seen and held-out prompts;
`evaluation_prompts(..., held_out=True)` lists only held-out ones.

Coordinates are pixels of the final image, x to the right and y down, the image spanning [0, image_size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from kedavra.data.folder import image_to_tensor
from kedavra.data.shape_drawing import SUPERSAMPLE, draw_shape
from kedavra.data.shapes_grammar import (  # noqa: F401  (the grammar's names are the data set's too)
    MAX_OBJECTS,
    NUMBER_WORDS,
    PALETTE,
    PLACEMENTS,
    PLURALS,
    PROMPT_KINDS,
    RELATIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    PromptSpec,
    parse_prompt,
)
from kedavra.validation import check_choice, check_int, check_number

BACKGROUNDS = {"black": (0, 0, 0), "gray": (110, 110, 110), "white": (255, 255, 255)}
MIN_CONTRAST = 100.0  # an object's colour is at least this far (RGB Euclidean) from its background
# Half the side of an object's bounding box, as a fraction of the image side, drawn uniformly in the range. Small
# is the smallest at which a star still reads as a star at 32x32 (a 9-10 px box); large leaves room to move.
SIZE_RADIUS = {"small": (0.14, 0.17), "large": (0.24, 0.30)}
MIN_IMAGE_SIZE = 16  # below this a small star is a 4 px blob
BORDER_MARGIN = 0.04  # fraction of the side kept free between any object and the image border
OBJECT_GAP = 0.08  # fraction of the side kept free between the bounding boxes of two objects
RELATION_DOMINANCE = 2.0  # a generated "left of" moves at least this many times further in x than in y
# A placed object's centre lies within this fraction of the side from its edge(s) ("left": x <= 0.36 W), or for
# "middle" within this fraction of the side from the centre on both axes; the evaluator's bounds are looser.
PLACEMENT_SIDE = 0.36
PLACEMENT_MIDDLE = 0.08
LAYOUT_RESTARTS = 200  # placement restarts before a layout is declared impossible (never reached by the presets)
LAYOUT_TRIES = 64  # candidate centres drawn at once for each object before the layout restarts
PROMPT_TRIES = 1_000  # draws per wanted evaluation prompt before concluding that none of the asked sort exists
SPLIT_STREAMS = {"train": 0, "test": 1}  # the seed stream of each split: items are rng([seed, stream, index])
DEFAULT_SIZES = {"train": 50_000, "test": 1_000}


@dataclass(frozen=True)
class ShapesConfig:
    """What the shapes data set draws. `kind_weights` are the probabilities of PROMPT_KINDS (in that order; two
    objects in a relation, the hardest to learn, are drawn most); `size_word_probability` and
    `placement_probability` are how often a single-object caption names its size and where it stands;
    `paraphrase_probability` how often an item's caption is a paraphrase (PromptSpec.paraphrase) rather than the
    canonical wording; `hold_out` keeps the held-out combinations (module docstring) out of the train split."""

    image_size: int = 32
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(PALETTE)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    max_objects: int = MAX_OBJECTS
    kind_weights: tuple[float, ...] = (0.3, 0.2, 0.15, 0.35)
    size_word_probability: float = 0.5
    placement_probability: float = 0.5
    paraphrase_probability: float = 0.5
    hold_out: bool = True

    def __post_init__(self):
        for name in ("shapes", "colours", "backgrounds", "kind_weights"):
            value = getattr(self, name)
            if isinstance(value, str) or not hasattr(value, "__iter__"):
                raise ValueError(f"{name} must be a sequence, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        check_int("image_size", self.image_size, low=MIN_IMAGE_SIZE, note=" (smaller shapes are unreadable)")
        for name, allowed in (("shapes", SHAPES), ("colours", tuple(PALETTE)), ("backgrounds", tuple(BACKGROUNDS))):
            chosen = getattr(self, name)
            if not chosen or len(set(chosen)) != len(chosen):
                raise ValueError(f"{name} must be a non-empty list without repeats, got {chosen!r}")
            for value in chosen:
                check_choice(name[:-1], value, allowed)
        n = check_int("max_objects", self.max_objects, 1, MAX_OBJECTS)
        weights = self.kind_weights
        if (len(weights) != len(PROMPT_KINDS) or not all(isinstance(w, int | float) and w >= 0 for w in weights)
                or not math.isclose(sum(weights), 1.0, abs_tol=1e-6)):
            raise ValueError(f"kind_weights must be {len(PROMPT_KINDS)} probabilities >= 0 for {PROMPT_KINDS} "
                             f"summing to 1, got {weights!r}")
        if n < 2 and any(weights[1:]):
            raise ValueError(f"max_objects=1 allows only 'single' prompts; kind_weights must be (1, 0, 0, 0), got "
                             f"{weights!r}")
        if len(self.shapes) < 2 and (weights[2] or weights[3]):
            raise ValueError(f"two-object prompts need at least two shapes, got shapes={self.shapes!r} with "
                             f"kind_weights={weights!r}")
        for name in ("size_word_probability", "placement_probability", "paraphrase_probability"):
            check_number(name, getattr(self, name), 0, 1)
        for a in self.colours:
            for b in self.colours:
                if not _backgrounds_for((a, b), self.backgrounds):
                    raise ValueError(f"no background in {self.backgrounds} contrasts (>= {MIN_CONTRAST} RGB) with "
                                     f"both {a!r} and {b!r}; add a background or drop a colour")

    def held_out_colours(self) -> frozenset[tuple[str, str]]:
        """(shape, colour) pairs the train split never draws (module docstring)."""
        if not self.hold_out or len(self.colours) < 2:
            return frozenset()
        return frozenset((s, self.colours[(i + 1) % len(self.colours)]) for i, s in enumerate(self.shapes))

    def held_out_pairs(self) -> frozenset[frozenset[str]]:
        """Unordered shape pairs that never share a train image (module docstring)."""
        half = len(self.shapes) // 2
        if not self.hold_out or half < 2:
            return frozenset()
        return frozenset(frozenset((self.shapes[i], self.shapes[i + half])) for i in range(half))

    def is_held_out(self, spec: PromptSpec) -> bool:
        """Whether `spec` asks for a held-out combination."""
        colours = self.held_out_colours()
        if any((o.shape, o.colour) in colours for o in spec.objects):
            return True
        return len(spec.objects) == 2 and frozenset(o.shape for o in spec.objects) in self.held_out_pairs()


def _backgrounds_for(colours, backgrounds) -> tuple[str, ...]:
    """The backgrounds at least MIN_CONTRAST away from every colour in `colours`."""
    return tuple(b for b in backgrounds
                 if all(math.dist(PALETTE[c], BACKGROUNDS[b]) >= MIN_CONTRAST for c in colours))


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: its bounding box is centre ± radius (pixels)."""

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    radius: float

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        (x, y), r = self.centre, self.radius
        return (x - r, y - r, x + r, y + r)


@dataclass(frozen=True)
class Scene:
    """Everything an image shows, and the prompt it realises."""

    image_size: int
    background: str
    objects: tuple[ShapeObject, ...]
    spec: PromptSpec

    @property
    def caption(self) -> str:
        return self.spec.caption

    def render(self) -> Image.Image:
        """The RGB image: drawn at SUPERSAMPLE x and box-filtered down (each pixel the mean of its sub-pixels)."""
        big = self.image_size * SUPERSAMPLE
        canvas = Image.new("RGB", (big, big), BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(canvas)
        for obj in self.objects:
            draw_shape(draw, obj.shape, tuple(c * SUPERSAMPLE for c in obj.bbox), PALETTE[obj.colour])
        return canvas.resize((self.image_size, self.image_size), Image.Resampling.BOX)


def relation_holds(relation: str, a, b, dominance: float):
    """Whether centre `a` is `relation` of centre `b` (arrays (..., 2) or pairs): the displacement along the
    relation's axis points the right way and is at least `dominance` times the one across it (y grows down)."""
    if relation == "next to":  # either side
        return relation_holds("left of", a, b, dominance) | relation_holds("right of", a, b, dominance)
    dx, dy = np.asarray(a)[..., 0] - np.asarray(b)[..., 0], np.asarray(a)[..., 1] - np.asarray(b)[..., 1]
    along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return (along > 0) & (along >= dominance * np.abs(across))


def placement_holds(placement: str, centre, image_size: float, side: float = PLACEMENT_SIDE,
                    middle: float = PLACEMENT_MIDDLE):
    """Whether `centre` (arrays (..., 2) or a pair, pixels, y down) stands at `placement` of an image_size square:
    within `side` x image_size of the named edge(s) ("top left": both), or for "middle" within `middle` x
    image_size of the image's centre on both axes."""
    check_choice("placement", placement, PLACEMENTS)
    x, y = np.asarray(centre)[..., 0] / image_size, np.asarray(centre)[..., 1] / image_size
    if placement == "middle":
        return (np.abs(x - 0.5) <= middle) & (np.abs(y - 0.5) <= middle)
    holds = np.ones(np.shape(x), dtype=bool)
    for word in placement.split():
        holds &= {"left": x <= side, "right": x >= 1 - side, "top": y <= side, "bottom": y >= 1 - side}[word]
    return holds


def _placement_bounds(placement: str | None, low: float, high: float, image_size: int):
    """Per-axis (low, high) bounds of a centre at `placement`, inside the margins' [low, high]."""
    (x_low, x_high), (y_low, y_high) = (low, high), (low, high)
    if placement == "middle":
        half = PLACEMENT_MIDDLE * image_size
        x_low, x_high = max(low, image_size / 2 - half), min(high, image_size / 2 + half)
        return (x_low, x_high), (x_low, x_high)
    edge = PLACEMENT_SIDE * image_size
    for word in (placement or "").split():
        if word == "left":
            x_high = min(high, edge)
        elif word == "right":
            x_low = max(low, image_size - edge)
        elif word == "top":
            y_high = min(high, edge)
        else:
            y_low = max(low, image_size - edge)
    if x_low > x_high or y_low > y_high:
        raise ValueError(f"an object this large cannot stand at {placement!r} of a {image_size}x{image_size} image")
    return (x_low, x_high), (y_low, y_high)


def _layout(radii: list[float], relation: str | None, image_size: int, rng: np.random.Generator,
            placement: str | None = None):
    """Centres for objects of the given radii, inside the margins, their boxes pairwise OBJECT_GAP apart, (for a
    relation) object 0 `relation` of object 1 by RELATION_DOMINANCE, and object 0 at `placement`. Each object
    takes the first valid of LAYOUT_TRIES uniform candidates; if none is valid the layout starts again."""
    margin, gap = BORDER_MARGIN * image_size, OBJECT_GAP * image_size
    for _ in range(LAYOUT_RESTARTS):
        centres: list[np.ndarray] = []
        for r in radii:
            low, high = r + margin, image_size - r - margin
            (x_low, x_high), (y_low, y_high) = _placement_bounds(placement if not centres else None, low, high,
                                                                 image_size)
            candidates = np.stack([rng.uniform(x_low, x_high, LAYOUT_TRIES),
                                   rng.uniform(y_low, y_high, LAYOUT_TRIES)], axis=1)  # (T, 2)
            valid = np.ones(LAYOUT_TRIES, dtype=bool)
            for centre, placed_r in zip(centres, radii[:len(centres)], strict=True):
                reach = r + placed_r + gap  # boxes are apart when the centres are this far apart on some axis
                valid &= (np.abs(candidates - centre) >= reach).any(axis=1)
            if relation is not None and len(centres) == 1:
                valid &= relation_holds(relation, centres[0], candidates, RELATION_DOMINANCE)
            if not valid.any():
                break
            centres.append(candidates[int(np.argmax(valid))])
        if len(centres) == len(radii):
            return [(float(x), float(y)) for x, y in centres]
    raise ValueError(f"cannot place {len(radii)} objects of radii {radii} in a {image_size}x{image_size} image")


def prompt_to_scene(prompt: str | PromptSpec, rng: np.random.Generator, config: ShapesConfig | None = None) -> Scene:
    """A random scene that realises `prompt` (a caption or a PromptSpec), drawn with `rng`.

    Colours the prompt leaves open come from `config.colours`; a single object without a size word is small or
    large at random; objects of multi-object scenes are small. The background is one of `config.backgrounds`
    that contrasts with every object."""
    config = config or ShapesConfig()
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if not isinstance(spec, PromptSpec):
        raise ValueError(f"prompt must be a caption or a PromptSpec, got {type(prompt).__name__}")
    count = spec.count if spec.kind == "count" else len(spec.objects)
    if count > config.max_objects:
        raise ValueError(f"prompt {spec.caption!r} has {count} objects; this config draws at most "
                         f"{config.max_objects}")
    wanted = [spec.objects[0]] * spec.count if spec.kind == "count" else list(spec.objects)
    if spec.kind == "count":
        colours = [spec.objects[0].colour or _pick(config.colours, rng)] * spec.count
    else:
        colours = [o.colour or _pick(config.colours, rng) for o in spec.objects]
    if spec.kind == "single":
        sizes = [spec.objects[0].size or _pick(SIZES, rng)]
    else:
        sizes = ["small"] * len(wanted)
    radii = [float(rng.uniform(*SIZE_RADIUS[s])) * config.image_size for s in sizes]
    centres = _layout(radii, spec.relation, config.image_size, rng, spec.placement)
    backgrounds = _backgrounds_for(set(colours), config.backgrounds) or _backgrounds_for(set(colours), BACKGROUNDS)
    if not backgrounds:
        raise ValueError(f"no background contrasts with all of the colours {sorted(set(colours))}")
    background = _pick(backgrounds, rng)
    objects = tuple(ShapeObject(o.shape, c, s, centre, r)
                    for o, c, s, centre, r in zip(wanted, colours, sizes, centres, radii, strict=True))
    return Scene(config.image_size, background, objects, spec)


def sample_prompt(config: ShapesConfig, rng: np.random.Generator) -> PromptSpec:
    """A random prompt: kind by `kind_weights`, shapes and colours uniform over the config's choices."""
    kind = PROMPT_KINDS[int(rng.choice(len(PROMPT_KINDS), p=np.asarray(config.kind_weights)))]
    if kind == "single":
        size = _pick(SIZES, rng) if rng.random() < config.size_word_probability else None
        placement = _pick(PLACEMENTS, rng) if rng.random() < config.placement_probability else None
        return PromptSpec(kind, (ObjectSpec(_pick(config.shapes, rng), _pick(config.colours, rng), size),),
                          placement=placement)
    if kind == "count":
        count = int(rng.integers(2, config.max_objects + 1))
        return PromptSpec(kind, (ObjectSpec(_pick(config.shapes, rng), _pick(config.colours, rng)),), count=count)
    first, second = rng.choice(len(config.shapes), size=2, replace=False)
    colour_a = _pick(config.colours, rng)
    if kind == "pair":  # "and" prompts bind two different colours (GenEval's colour attribution)
        colour_b = _pick(tuple(c for c in config.colours if c != colour_a) or config.colours, rng)
    else:
        colour_b = _pick(config.colours, rng)
    objects = (ObjectSpec(config.shapes[first], colour_a), ObjectSpec(config.shapes[second], colour_b))
    return PromptSpec(kind, objects, relation=_pick(RELATIONS, rng) if kind == "relation" else None)


def _pick(options, rng: np.random.Generator):
    """One of `options`, uniformly."""
    return options[int(rng.integers(len(options)))]


def item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of item `index`: its own stream, so any index is reproducible alone."""
    return np.random.default_rng([seed, SPLIT_STREAMS[split], index])


def evaluation_prompts(config: ShapesConfig | None = None, *, per_kind: int = 50, seed: int = 0,
                       held_out: bool | None = None) -> list[PromptSpec]:
    """`per_kind` prompts of each kind with a non-zero weight, drawn independently (so they may repeat) from a
    seed stream of their own. held_out: True keeps only prompts with a held-out combination, False only
    train-distribution ones, None any."""
    config = config or ShapesConfig()
    check_int("per_kind", per_kind, low=1)
    if held_out and not (config.held_out_colours() or config.held_out_pairs()):
        raise ValueError("held_out=True needs a config with hold_out=True and at least two colours")
    rng = np.random.default_rng([seed, len(SPLIT_STREAMS)])  # a stream apart from both splits'
    prompts = []
    for kind, weight in zip(PROMPT_KINDS, config.kind_weights, strict=True):
        if not weight:
            continue
        only = replace(config, kind_weights=tuple(float(k == kind) for k in PROMPT_KINDS))
        chosen: list[PromptSpec] = []
        for _ in range(per_kind * PROMPT_TRIES):
            spec = sample_prompt(only, rng)
            if held_out is None or config.is_held_out(spec) == held_out:
                chosen.append(spec)
                if len(chosen) == per_kind:
                    break
        else:
            raise ValueError(f"this config has no {'held-out' if held_out else 'seen'} {kind!r} prompts")
        prompts.extend(chosen)
    return prompts


class ShapesDataset(torch.utils.data.Dataset):
    """`size` items {"image": (3, H, W) in [-1, 1], "caption": str}, item i a pure function of (seed, split, i)."""

    def __init__(self, config: ShapesConfig | None = None, *, split: str = "train", size: int | None = None,
                 seed: int = 0):
        self.config = config or ShapesConfig()
        self.split = check_choice("split", split, SPLIT_STREAMS)
        size = DEFAULT_SIZES[split] if size is None else size
        check_int("size", size, low=1)
        check_int("seed", seed, low=0)
        self.size, self.seed = size, seed

    def __len__(self) -> int:
        return self.size

    def spec(self, index: int) -> PromptSpec:
        return self.scene(index).spec

    def scene(self, index: int) -> Scene:
        """The ground truth behind item `index`: prompt, objects with their boxes, background."""
        if isinstance(index, bool) or not isinstance(index, int | np.integer) or not -self.size <= index < self.size:
            raise IndexError(f"index {index!r} out of range for a data set of {self.size} items")
        rng = item_rng(self.seed, self.split, int(index) % self.size)
        while True:
            spec = sample_prompt(self.config, rng)
            if self.split == "test" or not self.config.is_held_out(spec):
                return prompt_to_scene(spec, rng, self.config)

    def caption(self, index: int, scene: Scene | None = None) -> str:
        """Item `index`'s caption: its scene's canonical caption, or with `paraphrase_probability` a paraphrase
        (drawn from a stream of its own, so the images do not depend on the wording)."""
        scene = scene or self.scene(index)
        rng = np.random.default_rng([self.seed, SPLIT_STREAMS[self.split], int(index) % self.size, 1])
        return scene.spec.paraphrase(rng) if rng.random() < self.config.paraphrase_probability else scene.caption

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        return {"image": image_to_tensor(scene.render()), "caption": self.caption(index, scene)}
