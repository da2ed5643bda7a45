"""The shapes prompt grammar: every paraphrase parses back to its spec, every wording of the grammar is drawn,
named wordings people type parse to the meaning they have, and the geometry of placements and "next to"."""

import numpy as np
import pytest

from kedavra.data.shapes import (
    PLACEMENTS,
    RELATIONS,
    ObjectSpec,
    PromptSpec,
    ShapesConfig,
    placement_holds,
    prompt_to_scene,
    relation_holds,
    sample_prompt,
)
from kedavra.data.shapes_grammar import PLACEMENT_WORDS, RELATION_WORDS, SIZE_WORDS, parse_prompt


def test_every_paraphrase_parses_back_and_every_wording_is_drawn():
    rng = np.random.default_rng(0)
    config = ShapesConfig(hold_out=False)
    seen = set()
    for _ in range(3_000):
        spec = sample_prompt(config, rng)
        assert parse_prompt(spec.caption) == spec
        text = spec.paraphrase(rng)
        assert parse_prompt(text) == spec, text
        seen.add(f" {text} ")
    joined = "".join(seen)
    wordings = [w for table in (RELATION_WORDS, PLACEMENT_WORDS, SIZE_WORDS) for ws in table.values() for w in ws]
    missing = [w for w in wordings if f" {w} " not in joined]
    assert not missing
    assert any(t.startswith(" the ") for t in seen) and any(t.startswith(" 3 ") for t in seen)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "the blue star to the left of an orange cross",
            PromptSpec("relation", (ObjectSpec("star", "blue"), ObjectSpec("cross", "orange")), relation="left of"),
        ),
        (
            "Red circle is under the green square.",
            PromptSpec("relation", (ObjectSpec("circle", "red"), ObjectSpec("square", "green")), relation="below"),
        ),
        (
            "a circle on top of a triangle",
            PromptSpec("relation", (ObjectSpec("circle"), ObjectSpec("triangle")), relation="above"),
        ),
        (
            "a pink diamond beside a white star",
            PromptSpec("relation", (ObjectSpec("diamond", "pink"), ObjectSpec("star", "white")), relation="next to"),
        ),
        (
            "one red circle with one blue square",
            PromptSpec("pair", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue"))),
        ),
        ("3 blue stars", PromptSpec("count", (ObjectSpec("star", "blue"),), count=3)),
        ("three blue stars", PromptSpec("count", (ObjectSpec("star", "blue"),), count=3)),
        ("a big red circle", PromptSpec("single", (ObjectSpec("circle", "red", "large"),))),
        ("a tiny square", PromptSpec("single", (ObjectSpec("square", None, "small"),))),
        (
            "a huge yellow star in the Top-Right corner",
            PromptSpec("single", (ObjectSpec("star", "yellow", "large"),), placement="top right"),
        ),
        ("an orange cross on the left", PromptSpec("single", (ObjectSpec("cross", "orange"),), placement="left")),
        (
            "the green triangle is in the centre",
            PromptSpec("single", (ObjectSpec("triangle", "green"),), placement="middle"),
        ),
        ("a circle in the lower left corner", PromptSpec("single", (ObjectSpec("circle"),), placement="bottom left")),
    ],
)
def test_wordings_people_type(text, expected):
    assert parse_prompt(text) == expected


def test_canonical_captions_keep_the_original_grammar():
    assert PromptSpec("single", (ObjectSpec("circle", "red", "large"),)).caption == "a large red circle"
    placed = PromptSpec("single", (ObjectSpec("star", "orange"),), placement="top left")
    assert placed.caption == "an orange star in the top left corner"
    relation = PromptSpec("relation", (ObjectSpec("star"), ObjectSpec("cross")), relation="next to")
    assert relation.caption == "a star next to a cross"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PromptSpec("pair", (ObjectSpec("circle"), ObjectSpec("square")), placement="left"), "placement"),
        (lambda: PromptSpec("single", (ObjectSpec("circle"),), placement="upstairs"), "upstairs"),
        (lambda: parse_prompt("a big red circle left of a blue square"), "only 'single' prompts name a size"),
        (lambda: parse_prompt("a red circle in the kitchen"), "placements"),
        (lambda: parse_prompt("five red circles"), "cannot parse"),
    ],
)
def test_bad_prompts_are_refused_with_what_is_allowed(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_placed_and_next_to_scenes_stand_where_their_prompt_says():
    config = ShapesConfig()
    for index in range(60):
        rng = np.random.default_rng(index)
        for placement in PLACEMENTS:
            size = ("small", "large")[index % 2]
            spec = PromptSpec("single", (ObjectSpec("star", "red", size),), placement=placement)
            scene = prompt_to_scene(spec, rng, config)
            assert placement_holds(placement, scene.objects[0].centre, config.image_size)
        scene = prompt_to_scene("a red circle next to a blue square", rng, config)
        a, b = (o.centre for o in scene.objects)
        assert relation_holds("next to", a, b, 2.0)
        assert relation_holds("left of", a, b, 2.0) != relation_holds("right of", a, b, 2.0)
    sides = {
        bool(
            relation_holds(
                "left of",
                *(
                    o.centre
                    for o in prompt_to_scene(
                        "a red circle next to a blue square", np.random.default_rng(i), config
                    ).objects
                ),
                2.0,
            )
        )
        for i in range(20)
    }
    assert sides == {True, False}  # "next to" stands on either side
    assert set(RELATIONS) >= {"next to"}
    assert placement_holds("left", (10.0, 30.0), 32) and not placement_holds("left", (20.0, 5.0), 32)
    assert placement_holds("middle", (16.0, 17.0), 32) and not placement_holds("middle", (16.0, 25.0), 32)
    assert placement_holds("bottom right", (25.0, 25.0), 32) and not placement_holds("bottom right", (25.0, 5.0), 32)
