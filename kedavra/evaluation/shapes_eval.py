"""Does an image show what its shapes prompt asks for? A classical-vision scorer in GenEval's categories.

GenEval (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image Alignment")
detects objects with Mask2Former and names colours with CLIP; on procedural shapes over a plain background,
plain image analysis does the same job without weights:

    1. background   the per-channel median of the one-pixel border
    2. foreground   pixels further than FOREGROUND_DISTANCE (RGB Euclidean) from the background
    3. objects      8-connected components of the foreground (numpy label propagation); specks smaller than
                    MIN_AREA_FRACTION of the image are dropped
    4. colour       the nearest PALETTE colour to the median of the component's core (its pixels at least
                    CORE_FRACTION as far from the background as its furthest pixel)
    5. coverage     per pixel, how much of the object colour it holds: the projection of (pixel - background)
                    on (colour - background), clipped to [0, 1]
    6. shape        the template (the data set's own drawing code, `shape_coverage`) with the highest soft IoU
                    against the coverage, among the candidate shapes (the data set's SHAPES unless others are
                    named), each template stretched to the component's box and the box refined by half-pixel
                    moves; below MIN_SHAPE_IOU the object has no shape
    7. size         'large' when the box's longer side is at least LARGE_FRACTION of the image side
    8. relation     GenEval's rule on box centres (`relative_position`); "next to" is left of or right of
    9. placement    the box centre within PLACEMENT_SIDE of the named edge(s) of the image, or PLACEMENT_MIDDLE of
                    its centre (`placed_at`; looser than the data set's own bounds, as GenEval's threshold is)

Categories, by prompt kind (GenEval's tag names; an image gets those its prompt asks about):
    single     single_object (the shape is there), colors (one of them has the colour), size (if named),
               position (if a placement is named: one of them, in the named colour, stands there)
    count      counting (exactly that many of the shape), colors (all of them have the colour)
    pair       two_object (both shapes are there), color_attr (each with its own colour)
    relation   two_object, position (every pair of the two shapes, preferring the named colours, stands in the
               relation), color_attr
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from kedavra.data.shape_drawing import OUTLINES, shape_coverage
from kedavra.data.shapes import PALETTE, SHAPES, PromptSpec, parse_prompt, placement_holds

FOREGROUND_DISTANCE = 40.0  # RGB distance from the background that makes a pixel foreground (data: >= 100)
MIN_AREA_FRACTION = 0.008  # smaller components are specks (the smallest drawn object covers ~0.025 of the image)
MAX_SIDE_FRACTION = 0.8  # a component wider or taller than this is no drawn object (they are <= 0.6)
CORE_FRACTION = 0.75  # core pixels: at least this fraction of the component's largest distance from the background
SOLID_COVERAGE = 0.5  # a pixel at least half covered belongs inside the component's box
MIN_SHAPE_IOU = 0.6  # best template soft IoU below this: the component has no shape
LARGE_FRACTION = 0.41  # box side / image side between small (<= 0.34) and large (>= 0.48) objects
POSITION_THRESHOLD = 0.1  # GenEval's position_threshold: offsets shrink by this times the summed box sizes
DIRECTION_THRESHOLD = 0.5  # GenEval: a relation holds when its axis carries > 0.5 of the normalised offset
BOX_STEP = 0.5  # pixels: each refinement move of a template's box edge
REFINE_PASSES = 3  # rounds of edge moves per template
REFINE_CANDIDATES = 3  # templates refined: the best at the unrefined box
PLACEMENT_SIDE = 0.45  # "on the left": the centre in the left 45 % of the image (the data set draws it in 36 %)
PLACEMENT_MIDDLE = 0.12  # "in the middle": the centre within 12 % of the side from the image's (data set: 8 %)
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr", "size")
NEIGHBOURS_8 = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


@dataclass(frozen=True)
class DetectedObject:
    """A foreground component: shape (None if no template fits), colour, box (x0, y0, x1, y1) in pixels."""

    shape: str | None
    colour: str
    box: tuple[float, float, float, float]
    area: float
    iou: float
    size: str

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)


def to_pixels(image) -> np.ndarray:
    """A PIL image, a uint8 array (H, W, 3) or a tensor (3, H, W) in [-1, 1] -> uint8 array (H, W, 3)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
        pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return image
    raise ValueError(f"image must be a PIL image, a uint8 array (H, W, 3) or a tensor (3, H, W), got "
                     f"{type(image).__name__}")


def estimate_background(pixels: np.ndarray) -> np.ndarray:
    """The per-channel median of the outermost ring of pixels, float (3,)."""
    ring = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])  # (P, 3)
    return np.median(ring.astype(np.float32), axis=0)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool mask (H, W): labels int (H, W), 0 off the mask, 1..n on it."""
    height, width = mask.shape
    labels = np.where(mask, np.arange(1, height * width + 1).reshape(height, width), 0)
    padded = np.zeros((height + 2, width + 2), dtype=labels.dtype)
    while True:  # every pixel takes the largest label among itself and its neighbours, until nothing changes
        padded[1:-1, 1:-1] = labels
        spread = labels.copy()
        for dy, dx in NEIGHBOURS_8:
            np.maximum(spread, padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width], out=spread)
        spread *= mask
        if np.array_equal(spread, labels):
            break
        labels = spread
    values, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(height, width)
    return (dense if values[0] == 0 else dense + 1), int(len(values) - (values[0] == 0))


def nearest_colour(rgb: np.ndarray) -> str:
    """The PALETTE name closest (RGB Euclidean) to `rgb`."""
    return min(PALETTE, key=lambda name: math.dist(PALETTE[name], rgb))


def soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Σ min(a, b) / Σ max(a, b) for coverages in [0, 1] (the fuzzy-set Jaccard index)."""
    union = float(np.maximum(a, b).sum())
    return float(np.minimum(a, b).sum()) / union if union > 0 else 0.0


def fit_template(shape: str, coverage: np.ndarray, box: tuple[float, float, float, float],
                 passes: int = REFINE_PASSES) -> float:
    """The best soft IoU of `shape`'s template against `coverage` (h, w), its box starting at `box` (window
    pixels) and each edge moved by ±BOX_STEP while that helps, for `passes` rounds over the four edges."""
    height, width = coverage.shape
    best_box = list(box)
    best = soft_iou(coverage, shape_coverage(shape, box, height, width))
    for _ in range(passes):
        improved = False
        for edge in range(4):
            for step in (-BOX_STEP, BOX_STEP):
                trial = list(best_box)
                trial[edge] += step
                if trial[2] - trial[0] < 1 or trial[3] - trial[1] < 1:
                    continue
                score = soft_iou(coverage, shape_coverage(shape, tuple(trial), height, width))
                if score > best:
                    best, best_box, improved = score, trial, True
        if not improved:
            break
    return best


def classify_shape(coverage: np.ndarray, box: tuple[float, float, float, float],
                   shapes: Sequence[str] = SHAPES) -> tuple[str | None, float]:
    """(best shape or None, its soft IoU) for the coverage window (h, w) whose object fills `box` (window
    pixels): the template of every shape in `shapes` at `box`, then the REFINE_CANDIDATES best refined by
    `fit_template`."""
    height, width = coverage.shape
    first = {s: soft_iou(coverage, shape_coverage(s, box, height, width)) for s in shapes}
    candidates = sorted(first, key=first.get, reverse=True)[:REFINE_CANDIDATES]
    scores = {s: fit_template(s, coverage, box) for s in candidates}
    best = max(scores, key=scores.get)
    return (best if scores[best] >= MIN_SHAPE_IOU else None), scores[best]


def detect_objects(image, shapes: Sequence[str] = SHAPES) -> list[DetectedObject]:
    """The objects in `image` (PIL, uint8 (H, W, 3) or tensor (3, H, W) in [-1, 1]), in label order.

    shapes: the candidate templates, names in shape_drawing.OUTLINES; the data set's SHAPES by default, more to
        ask whether a model draws a shape outside its grammar (the hexagon of docs/adapters.md)."""
    shapes = _check_shapes(shapes)
    pixels = to_pixels(image)
    height, width, _ = pixels.shape
    values = pixels.astype(np.float32)
    background = estimate_background(pixels)
    distance = np.linalg.norm(values - background, axis=-1)  # (H, W)
    labels, count = label_components(distance > FOREGROUND_DISTANCE)
    side = max(height, width)
    found = []
    for label in range(1, count + 1):
        on = labels == label
        ys, xs = np.nonzero(on)
        if len(ys) < MIN_AREA_FRACTION * height * width:
            continue
        core = on & (distance >= CORE_FRACTION * distance[on].max())
        colour_rgb = np.median(values[core], axis=0)
        direction = colour_rgb - background
        y0, y1 = max(ys.min() - 1, 0), min(ys.max() + 2, height)  # the box, grown by a pixel for soft edges
        x0, x1 = max(xs.min() - 1, 0), min(xs.max() + 2, width)
        window = values[y0:y1, x0:x1] - background
        coverage = np.clip(window @ direction / float(direction @ direction), 0, 1)
        coverage[(labels[y0:y1, x0:x1] != label) & (labels[y0:y1, x0:x1] != 0)] = 0  # other objects' pixels
        rows, cols = np.nonzero(coverage >= SOLID_COVERAGE)
        if len(rows) == 0:
            continue
        box = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
        box_w, box_h = box[2] - box[0], box[3] - box[1]
        if max(box_w, box_h) > MAX_SIDE_FRACTION * side:
            shape, iou = None, 0.0
        else:
            shape, iou = classify_shape(coverage, box, shapes)
        size = "large" if max(box_w, box_h) >= LARGE_FRACTION * side else "small"
        image_box = (box[0] + x0, box[1] + y0, box[2] + x0, box[3] + y0)
        found.append(DetectedObject(shape, nearest_colour(colour_rgb), image_box, float(coverage.sum()), iou, size))
    return found


def _check_shapes(shapes: Sequence[str]) -> tuple[str, ...]:
    """`shapes` as a tuple, checked: a non-empty list of distinct names in OUTLINES."""
    names = () if isinstance(shapes, str) else tuple(shapes)
    if not names or len(set(names)) != len(names) or any(s not in OUTLINES for s in names):
        raise ValueError(f"shapes must be a non-empty list of distinct names from {tuple(OUTLINES)}, got {shapes!r}")
    return names


def relative_position(a: DetectedObject, b: DetectedObject) -> set[str]:
    """The relations of `a` to `b` by GenEval's rule: the centre offset shrunk by POSITION_THRESHOLD times the
    summed box sizes per axis, normalised by the offset's length; an axis past DIRECTION_THRESHOLD names a
    relation (y grows downwards)."""
    (ax, ay), (bx, by) = a.centre, b.centre
    offset = np.array([ax - bx, ay - by])
    dims = np.array([a.box[2] - a.box[0] + b.box[2] - b.box[0], a.box[3] - a.box[1] + b.box[3] - b.box[1]])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -DIRECTION_THRESHOLD:
        relations.add("left of")
    if dx > DIRECTION_THRESHOLD:
        relations.add("right of")
    if dy < -DIRECTION_THRESHOLD:
        relations.add("above")
    if dy > DIRECTION_THRESHOLD:
        relations.add("below")
    return relations


def placed_at(obj: DetectedObject, placement: str, image_size: int) -> bool:
    """Whether `obj` stands at `placement` (kedavra.data.shapes_grammar.PLACEMENTS) of an image_size image, by the
    evaluator's bounds PLACEMENT_SIDE and PLACEMENT_MIDDLE."""
    return bool(placement_holds(placement, obj.centre, image_size, PLACEMENT_SIDE, PLACEMENT_MIDDLE))


def _relation_holds(relation: str, a: DetectedObject, b: DetectedObject) -> bool:
    found = relative_position(a, b)
    return bool(found & {"left of", "right of"}) if relation == "next to" else relation in found


def _as_spec(prompt) -> PromptSpec:
    if isinstance(prompt, PromptSpec):
        return prompt
    if isinstance(prompt, str):
        return parse_prompt(prompt)
    raise ValueError(f"a prompt must be a caption or a PromptSpec, got {type(prompt).__name__}")


def score_objects(objects: Sequence[DetectedObject], spec: PromptSpec, image_size: int | None = None
                  ) -> dict[str, bool]:
    """The categories `spec` asks about (module docstring), scored on detected objects; a placement needs the
    image's side `image_size`."""
    first = spec.objects[0]
    of_first = [o for o in objects if o.shape == first.shape]
    result = {}
    if spec.kind == "single":
        result["single_object"] = bool(of_first)
        if first.colour is not None:
            result["colors"] = any(o.colour == first.colour for o in of_first)
        if first.size is not None:
            result["size"] = any(o.size == first.size and first.colour in (None, o.colour) for o in of_first)
        if spec.placement is not None:
            if image_size is None:
                raise ValueError(f"scoring the placement of {spec.caption!r} needs the image size")
            result["position"] = any(placed_at(o, spec.placement, image_size) and first.colour in (None, o.colour)
                                     for o in of_first)
        return result
    if spec.kind == "count":
        result["counting"] = len(of_first) == spec.count
        if first.colour is not None:
            result["colors"] = bool(of_first) and all(o.colour == first.colour for o in of_first)
        return result
    second = spec.objects[1]
    of_second = [o for o in objects if o.shape == second.shape]
    result["two_object"] = bool(of_first) and bool(of_second)
    if spec.kind == "relation":
        group_a = [o for o in of_first if o.colour == first.colour] or of_first
        group_b = [o for o in of_second if o.colour == second.colour] or of_second
        result["position"] = result["two_object"] and all(
            _relation_holds(spec.relation, a, b) for a in group_a for b in group_b)
    if first.colour is not None or second.colour is not None:
        result["color_attr"] = (any(first.colour in (None, o.colour) for o in of_first)
                                and any(second.colour in (None, o.colour) for o in of_second))
    return result


def evaluate_image(image, prompt) -> dict[str, bool]:
    """{category: passed} for `image` against `prompt` (a caption in the data set's grammar or a PromptSpec)."""
    pixels = to_pixels(image)
    return score_objects(detect_objects(pixels), _as_spec(prompt), pixels.shape[0])


@dataclass
class EvaluationReport:
    """Per-category accuracy over a batch; `overall` is the fraction of images passing every category they were
    scored on (GenEval's per-image "correct"); `results` and `objects` hold each image's scores and detections."""

    accuracy: dict[str, float]
    counts: dict[str, int]
    overall: float
    results: list[dict[str, bool]] = field(repr=False)
    objects: list[list[DetectedObject]] = field(repr=False)

    def table(self) -> str:
        """A Markdown table: category, images scored, accuracy."""
        lines = ["| category | images | accuracy |", "|---|---:|---:|"]
        lines += [f"| {c} | {self.counts[c]} | {self.accuracy[c]:.3f} |" for c in self.accuracy]
        lines.append(f"| overall | {len(self.results)} | {self.overall:.3f} |")
        return "\n".join(lines)


def evaluate_batch(images: Sequence, prompts: Sequence) -> EvaluationReport:
    """Score each image against its prompt and summarise per category (images may be a (B, 3, H, W) tensor)."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; give one prompt per image")
    if not len(images):
        raise ValueError("evaluate_batch needs at least one image")
    specs = [_as_spec(p) for p in prompts]
    pixels = [to_pixels(image) for image in images]  # each converted once: detection and the placement's image size
    objects = [detect_objects(p) for p in pixels]
    results = [score_objects(found, spec, p.shape[0]) for found, spec, p in zip(objects, specs, pixels, strict=True)]
    accuracy, counts = {}, {}
    for category in CATEGORIES:
        scored = [r[category] for r in results if category in r]
        if scored:
            counts[category] = len(scored)
            accuracy[category] = sum(scored) / len(scored)
    overall = sum(all(r.values()) for r in results) / len(results)
    return EvaluationReport(accuracy, counts, overall, results, objects)
