"""A1111 prompt weighting and long prompts: parsing, chunking, emphasis, and the plain-prompt path.

Expected fragments come from AUTOMATIC1111's prompt_parser.parse_prompt_attention doctests (marked
"A1111 doctest") or are derived by hand from its stack-based parser (each closing bracket multiplies the
weights of everything since its opening bracket; unclosed ones reach to the end). Chunking follows A1111's
sd_hijack_clip.tokenize_line with comma_padding_backtrack = 20. The text encoder is the "tiny" preset with
seeded random weights.
"""

import math
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kedavra.networks.text_encoder import TextEncoder, TextEncoderConfig
from kedavra.networks.tokenizer import END_TOKEN_ID, START_TOKEN_ID, ZERO_PAD_ID, Tokenizer
from kedavra.pipeline.prompt_weighting import (
    BREAK,
    MAX_CHUNKS,
    apply_emphasis,
    chunk_prompt,
    encode_prompt_pairs,
    encode_weighted_prompts,
    parse_weighted_prompt,
)

CAT, DOG, COMMA = 2368, 1929, 267  # CLIP ids of "cat</w>", "dog</w>", ",</w>" (one token each)
L = 77


@pytest.fixture(scope="module")
def sd15() -> Tokenizer:
    return Tokenizer.from_preset("sd15")


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    """Random weights, and a final LayerNorm scale and bias like a trained one: a fresh LayerNorm (bias 0) makes
    every token's hidden state zero-mean, and A1111's mean rescale then divides 0 by about 0."""
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        encoder.final_norm.weight.normal_(1.0, 0.3)
        encoder.final_norm.bias.normal_(0.2, 0.5)
    return encoder


def words(word: str, count: int) -> str:
    return " ".join([word] * count)


# ---- Parsing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        # A1111 doctests
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
        # A1111 wiki "Attention/emphasis" examples, weights as its parser multiplies them
        ("a (word) b", [("a ", 1.0), ("word", 1.1), (" b", 1.0)]),
        ("((word))", [("word", 1.1 * 1.1)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", (1 / 1.1) * (1 / 1.1))]),
        ("(word:1.5)", [("word", 1.5)]),
        ("(word: 1.5 )", [("word", 1.5)]),
        ("(word:.5)", [("word", 0.5)]),
        ("(word:-1)", [("word", -1.0)]),
        ("(word:+2)", [("word", 2.0)]),
        (r"\(word\)", [("(word)", 1.0)]),
        (r"a \\ b", [("a \\ b", 1.0)]),
        # (b:2) closes first and multiplies b by 2, the outer ) then multiplies a, b, c by 1.1
        ("(a (b:2) c)", [("a ", 1.1), ("b", 2.0 * 1.1), (" c", 1.1)]),
        ("((a:1.5))", [("a", 1.5 * 1.1)]),
        ("([a:1.5)]", [("a", 1.5 * (1 / 1.1))]),  # round and square brackets are separate stacks
        ("[(a])", [("a", (1 / 1.1) * 1.1)]),  # ] closes the [ even though ( is still open
        ("(a [b] c)", [("a ", 1.1), ("b", (1 / 1.1) * 1.1), (" c", 1.1)]),
        ("a (b", [("a ", 1.0), ("b", 1.1)]),  # unclosed: to the end
        ("a [b (c", [("a ", 1.0), ("b ", 1 / 1.1), ("c", 1.1 * (1 / 1.1))]),  # round first, then square
        ("a) b] c", [("a) b] c", 1.0)]),  # stray closers are text
        ("a:1.5) b", [("a:1.5) b", 1.0)]),  # a weight with no open bracket is text
        ("(word:abc)", [("word:abc", 1.1)]),  # ':' without a number is text; ')' closes with 1.1
        ("(a:1.5e3)", [("a:1.5e3", 1.1)]),  # only [+-]?[.0-9]+ is a weight
        ("(a:1)", [("a", 1.0)]),
        (r"a\b", [("ab", 1.0)]),  # a backslash before another character is dropped
        ("()", [("", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse(prompt, expected):
    assert parse_weighted_prompt(prompt) == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("a\nBREAK\tb", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("a, BREAK, b", [("a,", 1.0), BREAK, (", b", 1.0)]),
        ("BREAK a", [("", 1.0), BREAK, ("a", 1.0)]),
        ("a BREAK BREAK b", [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # A1111 would encode "BREAK" at -1.1 here
        ("BREAKfast break aBREAK", [("BREAKfast break aBREAK", 1.0)]),
    ],
)
def test_parse_break(prompt, expected):
    assert parse_weighted_prompt(prompt) == expected


@pytest.mark.parametrize("weight", ["1.2.3", ".", "+.", "9" * 400])
def test_parse_rejects_weights_that_are_not_finite_numbers(weight):
    with pytest.raises(ValueError, match="not a finite number"):
        parse_weighted_prompt(f"(word:{weight})")


@pytest.mark.parametrize("prompt", [None, 3, b"a cat", ["a cat"]])
def test_parse_rejects_non_str(prompt):
    with pytest.raises(ValueError, match="prompt must be a str"):
        parse_weighted_prompt(prompt)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab ,:.1()[]\\", max_size=30))
def test_parse_invariants(prompt):
    """Any mix of syntax parses (or names a bad weight); weights are finite; neighbours differ."""
    try:
        fragments = parse_weighted_prompt(prompt)
    except ValueError as error:
        assert "not a finite number" in str(error)
        return
    assert fragments and all(math.isfinite(w) for _, w in fragments)
    assert all(a[1] != b[1] for a, b in pairwise(fragments))
    if not any(c in prompt for c in "()[]\\"):  # no syntax: the text comes back whole at weight 1
        assert fragments == [(prompt, 1.0)]


# ---- Chunking ----------------------------------------------------------------------------------------


def contents(chunk) -> list[int]:
    """The token ids between start and end."""
    ids = list(chunk.ids)
    assert ids[0] == START_TOKEN_ID
    return ids[1 : ids.index(END_TOKEN_ID)]


def test_chunk_framing_and_weights(sd15):
    (chunk,) = chunk_prompt(sd15, "a (cat:1.5) [dog]")
    assert chunk.ids == tuple(sd15.frame(sd15.encode("a cat dog")))
    assert chunk.weights == (1.0, 1.0, 1.5, 1 / 1.1) + (1.0,) * (L - 4)


def test_empty_prompt_is_one_chunk(sd15):
    (chunk,) = chunk_prompt(sd15, "")
    assert chunk.ids == (START_TOKEN_ID,) + (END_TOKEN_ID,) * (L - 1) and chunk.weights == (1.0,) * L


@pytest.mark.parametrize(("count", "sizes"), [(1, [1]), (75, [75]), (76, [75, 1]), (150, [75, 75]), (151, [75, 75, 1])])
def test_chunk_boundaries(sd15, count, sizes):
    chunks = chunk_prompt(sd15, words("cat", count))
    assert [len(contents(c)) for c in chunks] == sizes
    assert all(len(c.ids) == L and len(c.weights) == L for c in chunks)


def test_comma_backtrack_moves_the_words_after_the_last_comma(sd15):
    first, second = chunk_prompt(sd15, words("cat", 70) + " , (" + words("dog", 10) + ")")
    assert contents(first) == [CAT] * 70 + [COMMA]  # the chunk ends after the comma, padded
    assert first.ids[72:] == (END_TOKEN_ID,) * 5
    assert contents(second) == [DOG] * 10
    assert second.weights[1:11] == (1.1,) * 10  # weights travel with their tokens


@pytest.mark.parametrize(("comma_at", "moves"), [(55, True), (54, False), (74, False)])
def test_comma_backtrack_reach(sd15, comma_at, moves):
    """A comma at index i of a full chunk moves the tail only when 75 - i <= 20."""
    prompt = words("cat", comma_at) + " , " + words("dog", 75 - comma_at - 1 + 5)
    first, second = chunk_prompt(sd15, prompt)
    kept = comma_at + 1 if moves else 75
    assert len(contents(first)) == kept and contents(first)[comma_at] == COMMA
    assert contents(second) == [DOG] * (80 - kept)


def test_comma_backtrack_off(sd15):
    first, _ = chunk_prompt(sd15, words("cat", 70) + " , " + words("dog", 10), comma_backtrack=0)
    assert len(contents(first)) == 75


def test_break_chunks(sd15):
    assert [contents(c) for c in chunk_prompt(sd15, "cat BREAK dog")] == [[CAT], [DOG]]
    assert [contents(c) for c in chunk_prompt(sd15, "BREAK dog")] == [[], [DOG]]
    assert [contents(c) for c in chunk_prompt(sd15, "cat BREAK")] == [[CAT]]
    assert [contents(c) for c in chunk_prompt(sd15, "cat BREAK BREAK dog")] == [[CAT], [], [DOG]]
    # a full chunk followed by BREAK closes once, not twice
    assert [len(contents(c)) for c in chunk_prompt(sd15, words("cat", 75) + " BREAK dog")] == [75, 1]


def test_sd21_chunks_pad_with_zero():
    sd21 = Tokenizer.from_preset("sd21")
    first, second = chunk_prompt(sd21, words("cat", 80))
    assert first.ids[-1] == END_TOKEN_ID
    assert second.ids[:8] == (START_TOKEN_ID, *[CAT] * 5, END_TOKEN_ID, ZERO_PAD_ID)
    assert second.ids[7:] == (ZERO_PAD_ID,) * (L - 7)


def test_chunk_limit(sd15):
    assert len(chunk_prompt(sd15, words("cat", 75 * MAX_CHUNKS))) == MAX_CHUNKS
    with pytest.raises(ValueError, match=f"more than {MAX_CHUNKS} chunks"):
        chunk_prompt(sd15, words("cat", 75 * MAX_CHUNKS + 1))
    with pytest.raises(ValueError, match="more than 2 chunks"):
        chunk_prompt(sd15, "a BREAK b BREAK c", max_chunks=2)


@pytest.mark.parametrize(("option", "value"), [("comma_backtrack", -1), ("comma_backtrack", 75), ("max_chunks", 0)])
def test_chunk_options_are_checked(sd15, option, value):
    with pytest.raises(ValueError, match=option):
        chunk_prompt(sd15, "a cat", **{option: value})


# ---- Emphasis ----------------------------------------------------------------------------------------


def test_emphasis_keeps_each_rows_mean_and_scales_tokens_by_their_weight():
    torch.manual_seed(0)
    hidden = torch.randn(3, L, 8) + 0.5
    weights = torch.ones(3, L)
    weights[0, 3], weights[1, 5:9] = 1.5, 0.8  # row 2 stays all ones
    out = apply_emphasis(hidden, weights)
    torch.testing.assert_close(out.mean(dim=(1, 2)), hidden.mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)
    ratio = out / hidden  # = w_t · c per row
    c = ratio[:, 0, 0]
    torch.testing.assert_close(ratio, weights[..., None].expand_as(hidden) * c[:, None, None])
    assert torch.equal(out[2], hidden[2])
    # row by row: a row's result does not depend on the other rows of the batch
    torch.testing.assert_close(apply_emphasis(hidden[:1], weights[:1]), out[:1], rtol=0, atol=0)


def test_emphasis_of_all_ones_is_the_identity_and_keeps_dtype():
    hidden = torch.randn(2, L, 8, dtype=torch.bfloat16)
    assert apply_emphasis(hidden, torch.ones(2, L)) is hidden
    weights = torch.ones(2, L)
    weights[0, 1] = 1.3
    assert apply_emphasis(hidden, weights).dtype == torch.bfloat16


def test_emphasis_refuses_a_zero_mean():
    weights = torch.ones(1, L)
    weights[0, 1] = 2.0
    with pytest.raises(ValueError, match="mean hidden state 0"):
        apply_emphasis(torch.zeros(1, L, 8), weights)


# ---- Encoding ----------------------------------------------------------------------------------------


@torch.no_grad()
def test_plain_prompts_equal_the_plain_encoder(sd15, encoder):
    prompts, negatives = ["a red circle on a blue square", "two cats: one black, one white"], ["", "blurry"]
    cond, uncond = encode_prompt_pairs(sd15, encoder, prompts, negatives)
    assert torch.equal(cond, encoder(sd15(prompts)))
    assert torch.equal(uncond, encoder(sd15(negatives)))
    assert torch.equal(encode_weighted_prompts(sd15, encoder, prompts), encoder(sd15(prompts)))
    assert torch.equal(encode_weighted_prompts(sd15, encoder, words("cat", 75)), encoder(sd15(words("cat", 75))))


@torch.no_grad()
def test_weighted_prompt_matches_a1111_emphasis(sd15, encoder):
    """Oracle: A1111's EmphasisOriginal on a batch of one chunk, written out here."""
    cond = encode_weighted_prompts(sd15, encoder, "a (red:1.5) [[circle]], (masterpiece)")
    ids = sd15(["a red circle, masterpiece"])
    z = encoder(ids)
    w = torch.ones(1, L)
    w[0, 2], w[0, 3], w[0, 5] = 1.5, 1 / 1.1 / 1.1, 1.1  # [start, a, red, circle, ",", masterpiece, end ...]
    z_weighted = z * w[..., None]
    expected = z_weighted * (z.mean() / z_weighted.mean())
    assert z.mean().abs() > 0.05  # the fixture's LayerNorm bias keeps the rescale well defined
    torch.testing.assert_close(cond, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cond.mean(), z.mean(), rtol=1e-5, atol=0)
    assert not torch.allclose(cond, z, atol=1e-3)  # the weights did change it


@torch.no_grad()
def test_long_prompt_is_the_concatenation_of_its_chunks(sd15, encoder):
    prompt = words("cat", 80) + " (dog:1.2)"
    cond, uncond = encode_prompt_pairs(sd15, encoder, [prompt], [""])
    assert cond.shape == uncond.shape == (1, 2 * L, encoder.config.width)
    first = encoder(sd15([words("cat", 75)]))  # all weights 1: no emphasis
    torch.testing.assert_close(cond[:, :L], first, rtol=0, atol=1e-6)
    second = chunk_prompt(sd15, prompt)[1]
    z = encoder(torch.tensor([second.ids]))
    expected = apply_emphasis(z, torch.tensor([second.weights]))
    torch.testing.assert_close(cond[:, L:], expected, rtol=0, atol=1e-6)
    empty = encoder(sd15([""]))
    torch.testing.assert_close(uncond, torch.cat([empty, empty], dim=1), rtol=0, atol=1e-6)


@torch.no_grad()
def test_shapes_pad_across_batch_and_negatives(sd15, encoder):
    prompts = ["a cat", words("cat", 160), "dog BREAK cat"]  # 1, 3 and 2 chunks
    cond, uncond = encode_prompt_pairs(sd15, encoder, prompts, "blurry BREAK ugly BREAK bad BREAK worse")
    assert cond.shape == uncond.shape == (3, 4 * L, encoder.config.width)
    empty = encoder(sd15([""]))[0]
    for row, used in zip(cond, (1, 3, 2), strict=True):
        for k in range(used, 4):
            torch.testing.assert_close(row[k * L : (k + 1) * L], empty, rtol=0, atol=1e-6)
    assert encode_weighted_prompts(sd15, encoder, ["a cat"], num_chunks=3).shape == (1, 3 * L, encoder.config.width)


def test_encode_errors(sd15, encoder):
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a str"):
        encode_prompt_pairs(sd15, encoder, ["a cat", 7], [""])
    with pytest.raises(ValueError, match=r"negative_prompts\[0\] must be a str"):
        encode_prompt_pairs(sd15, encoder, ["a cat"], [None])
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        encode_prompt_pairs(sd15, encoder, ["a", "b", "c"], ["x", "y"])
    with pytest.raises(ValueError, match="non-empty"):
        encode_weighted_prompts(sd15, encoder, [])
    with pytest.raises(ValueError, match="num_chunks"):
        encode_weighted_prompts(sd15, encoder, words("cat", 80), num_chunks=1)
    with pytest.raises(ValueError, match="not a finite number"):
        encode_weighted_prompts(sd15, encoder, "(cat:1..2)")
