"""The shapes data set's prompt grammar: what a prompt asks for (`PromptSpec`), its canonical caption, the ways
people phrase the same request (`paraphrase`), and the parser that reads any of them back (`parse_prompt`).

A prompt is one of four kinds, in the style of GenEval's prompts (Ghosh et al. 2023): a single object, optionally
sized and placed in the image ("a large red circle in the top left corner"), a count ("three green triangles"), two
objects ("a red circle and a blue square") or two objects in a spatial relation ("a red circle left of a blue
square"). The canonical caption is one fixed wording of a spec; `paraphrase` draws the others users type:

    articles          "a red circle", "the red circle", "one red circle", "red circle"
    sizes             small / little / tiny, large / big / huge
    numbers           "three blue stars", "3 blue stars"
    two objects       "and", "with"
    relations         "left of", "to the left of", "on the left side of"; "above", "over", "on top of";
                      "below", "under", "beneath", "underneath"; "next to", "beside"; with or without "is"
    placements        "on the left", "at the top", "in the top right corner", "in the upper left", "in the middle"

`parse_prompt` accepts every wording `paraphrase` can produce (and upper case, extra spaces, hyphens in
"top-left", a final full stop), so the evaluator scores an image against whichever wording made it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from kedavra.validation import check_choice, check_int

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses", "diamond": "diamonds"}
# Object colours, chosen so that every pair is >= 100 apart in RGB (Euclidean; the closest pair, orange/yellow, is
# 107 apart) and the nearest-colour rule of the evaluator cannot confuse them. GenEval's colour
# list (red, orange, yellow, green, blue, purple, pink, brown, black, white) less brown, which sits too close to
# red and orange at 32x32.
PALETTE = {
    "red": (220, 20, 20),
    "orange": (255, 128, 0),
    "yellow": (255, 235, 0),
    "green": (20, 170, 40),
    "blue": (30, 70, 230),
    "purple": (150, 40, 190),
    "pink": (255, 105, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SIZES = ("small", "large")
# "next to" is either side, left or right (the evaluator accepts both).
RELATIONS = ("left of", "right of", "above", "below", "next to")
# Where a single object stands in the image (kedavra.data.shapes.placement_holds gives the geometry).
PLACEMENTS = ("left", "right", "top", "bottom", "top left", "top right", "bottom left", "bottom right", "middle")
PROMPT_KINDS = ("single", "count", "pair", "relation")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
MAX_OBJECTS = len(NUMBER_WORDS) - 1  # four small objects are what fits a 32x32 image with gaps between them

# The wordings of each meaning; the first is the canonical caption's.
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
RELATION_WORDS = {
    "left of": ("left of", "to the left of", "on the left of", "on the left side of"),
    "right of": ("right of", "to the right of", "on the right of", "on the right side of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath", "underneath"),
    "next to": ("next to", "beside"),
}
PLACEMENT_WORDS = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "top left": ("in the top left corner", "in the top left", "in the upper left corner", "at the top left"),
    "top right": ("in the top right corner", "in the top right", "in the upper right corner", "at the top right"),
    "bottom left": ("in the bottom left corner", "in the bottom left", "in the lower left corner",
                    "at the bottom left"),
    "bottom right": ("in the bottom right corner", "in the bottom right", "in the lower right corner",
                     "at the bottom right"),
    "middle": ("in the middle", "in the center", "in the centre"),
}
ARTICLES = ("a", "the", "one", "")  # "a" becomes "an" before a vowel; "" is no article
PAIR_LINKS = ("and", "with")


@dataclass(frozen=True)
class ObjectSpec:
    """One object a prompt asks for; colour and size None when the prompt does not name them."""

    shape: str
    colour: str | None = None
    size: str | None = None

    def __post_init__(self):
        check_choice("shape", self.shape, SHAPES)
        if self.colour is not None:
            check_choice("colour", self.colour, tuple(PALETTE))
        if self.size is not None:
            check_choice("size", self.size, SIZES)

    def phrase(self, article: str = "a", size_word: str | None = None) -> str:
        """'a large red circle', 'an orange star'; `article` one of ARTICLES, `size_word` a wording of the size."""
        size = size_word if self.size is not None and size_word is not None else self.size
        words = " ".join(w for w in (size, self.colour, self.shape) if w is not None)
        if article == "a" and words[0] in "aeiou":
            article = "an"
        return f"{article} {words}" if article else words


@dataclass(frozen=True)
class PromptSpec:
    """A structured prompt: kind in PROMPT_KINDS, its objects, the count (kind 'count'), the relation ('relation')
    or where a single object stands (`placement`, kind 'single').

    single    1 object, may name a size and a placement   "a large red circle in the top left corner"
    count     1 object, count 2..MAX_OBJECTS               "two green triangles"
    pair      2 objects of different shapes                "a red circle and a blue square"
    relation  2 objects of different shapes                "a red circle left of a blue square" (the first relative
              to the second, as in GenEval)
    """

    kind: str
    objects: tuple[ObjectSpec, ...]
    count: int = 1
    relation: str | None = None
    placement: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        check_choice("prompt kind", self.kind, PROMPT_KINDS)
        expected = 1 if self.kind in ("single", "count") else 2
        if len(self.objects) != expected or not all(isinstance(o, ObjectSpec) for o in self.objects):
            raise ValueError(f"a {self.kind!r} prompt takes {expected} ObjectSpec(s), got {self.objects!r}")
        if self.kind == "count":
            check_int("count", self.count, 2, MAX_OBJECTS)
        elif self.count != 1:
            raise ValueError(f"only 'count' prompts take a count, got count={self.count!r} for {self.kind!r}")
        if self.kind == "relation":
            check_choice("relation", self.relation, RELATIONS)
        elif self.relation is not None:
            raise ValueError(f"only 'relation' prompts take a relation, got {self.relation!r} for {self.kind!r}")
        if self.kind == "single":
            if self.placement is not None:
                check_choice("placement", self.placement, PLACEMENTS)
        elif self.placement is not None:
            raise ValueError(f"only 'single' prompts take a placement, got {self.placement!r} for {self.kind!r}")
        if expected == 2 and self.objects[0].shape == self.objects[1].shape:
            raise ValueError(f"the two objects of a {self.kind!r} prompt need different shapes, got "
                             f"{self.objects[0].shape!r} twice")
        if any(o.size is not None for o in self.objects) and self.kind != "single":
            raise ValueError(f"only 'single' prompts name a size (objects of counts and two-object prompts are "
                             f"drawn small), got {self.objects!r}")

    @property
    def caption(self) -> str:
        """The canonical wording; `parse_prompt(spec.caption) == spec`."""
        return _words(self, _first_choice)

    def paraphrase(self, rng: np.random.Generator) -> str:
        """A wording drawn uniformly among the grammar's choices (module docstring); parses back to `self`."""
        return _words(self, lambda options: options[int(rng.integers(len(options)))])


def _first_choice(options):
    return options[0]


def _words(spec: PromptSpec, choose) -> str:
    """The spec in words, each free wording decided by `choose(options)` (canonical: always the first)."""
    first = spec.objects[0]
    if spec.kind == "count":
        number = choose((NUMBER_WORDS[spec.count], str(spec.count)))
        return " ".join(w for w in (number, first.colour, PLURALS[first.shape]) if w is not None)

    def phrase(obj: ObjectSpec) -> str:
        size_word = choose(SIZE_WORDS[obj.size]) if obj.size is not None else None
        return obj.phrase(choose(ARTICLES), size_word)

    if spec.kind == "single":
        text = phrase(first)
        if spec.placement is not None:
            text += " " + choose(("", "is ")) + choose(PLACEMENT_WORDS[spec.placement])
        return text
    if spec.kind == "pair":
        return f"{phrase(first)} {choose(PAIR_LINKS)} {phrase(spec.objects[1])}"
    verb = choose(("", "is "))
    return f"{phrase(first)} {verb}{choose(RELATION_WORDS[spec.relation])} {phrase(spec.objects[1])}"


def _alternatives(words_of: dict[str, tuple[str, ...]]) -> tuple[str, dict[str, str]]:
    """A regex alternation of every wording (longest first) and the map wording -> meaning."""
    meaning = {w: key for key, words in words_of.items() for w in words}
    return "|".join(sorted(meaning, key=len, reverse=True)), meaning


_SIZE_ALT, _SIZE_OF = _alternatives(SIZE_WORDS)
_RELATION_ALT, _RELATION_OF = _alternatives(RELATION_WORDS)
_PLACEMENT_ALT, _PLACEMENT_OF = _alternatives(PLACEMENT_WORDS)
_OBJECT = (rf"(?:(?:an?|the|one) )?(?:({_SIZE_ALT}) )?(?:({'|'.join(PALETTE)}) )?({'|'.join(SHAPES)})")
_SINGLE = re.compile(rf"{_OBJECT}(?: (?:is )?({_PLACEMENT_ALT}))?")
_COUNT = re.compile(rf"({'|'.join(NUMBER_WORDS[2:])}|[2-{MAX_OBJECTS}]) (?:({'|'.join(PALETTE)}) )?"
                    rf"({'|'.join(PLURALS.values())})")
_TWO = re.compile(rf"{_OBJECT} (?:({'|'.join(PAIR_LINKS)})|(?:is )?({_RELATION_ALT})) {_OBJECT}")


def parse_prompt(text: str) -> PromptSpec:
    """The PromptSpec of a caption in the grammar, in any wording `paraphrase` draws (case, repeated spaces,
    hyphens and a final full stop ignored)."""
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
    words = " ".join(text.lower().replace("-", " ").strip().removesuffix(".").split())
    if match := _SINGLE.fullmatch(words):
        size, colour, shape, placement = match.groups()
        return PromptSpec("single", (ObjectSpec(shape, colour, _SIZE_OF.get(size)),),
                          placement=_PLACEMENT_OF.get(placement))
    if match := _COUNT.fullmatch(words):
        number, colour, plural = match.groups()
        shape = next(s for s, p in PLURALS.items() if p == plural)
        count = int(number) if number.isdigit() else NUMBER_WORDS.index(number)
        return PromptSpec("count", (ObjectSpec(shape, colour),), count=count)
    if match := _TWO.fullmatch(words):
        size_a, colour_a, shape_a, link, relation, size_b, colour_b, shape_b = match.groups()
        objects = (ObjectSpec(shape_a, colour_a, _SIZE_OF.get(size_a)),
                   ObjectSpec(shape_b, colour_b, _SIZE_OF.get(size_b)))
        if link is not None:
            return PromptSpec("pair", objects)
        return PromptSpec("relation", objects, relation=_RELATION_OF[relation])
    raise ValueError(f"cannot parse prompt {text!r}; expected forms like 'a large red circle', 'a blue star in the "
                     f"top left corner', 'two green triangles', 'a red circle and a blue square', 'a red circle to "
                     f"the left of a blue square' with shapes {SHAPES}, colours {tuple(PALETTE)}, sizes "
                     f"{tuple(SIZE_WORDS[s] for s in SIZES)}, relations {tuple(_RELATION_OF)}, placements "
                     f"{tuple(_PLACEMENT_OF)}")
