r"""Prompt weighting in AUTOMATIC1111's syntax, and prompts longer than CLIP's 77-token context.

What this module implements is the behaviour of AUTOMATIC1111's stable-diffusion-webui ("A1111") with
its default settings (modules prompt_parser.parse_prompt_attention, sd_hijack_clip and sd_emphasis,
emphasis mode "Original"), written from its description and doctests:

1. Parsing (`parse_weighted_prompt`). The prompt is read left to right as escapes, brackets, weights and
   plain text:
     (text)        multiplies the weight of `text` by 1.1; nested brackets multiply: ((text)) is 1.1².
     [text]        divides it by 1.1.
     (text:1.5)    multiplies it by 1.5 instead of 1.1: any number of the form [+-]?[.0-9]+, so negative
                   and fractional weights are allowed, with optional spaces around it. It multiplies the
                   weights already set inside: in `(a (b:2) c)`, b gets 2 · 1.1 = 2.2.
     \( \) \[ \] \\  the character itself, weight unchanged by it. A backslash before any other
                   character is dropped (A1111 does so; `a\b` reads as "ab").
     BREAK         the uppercase word standing alone (regex \s*\bBREAK\b\s*, spaces around it are
                   dropped) ends the current chunk; `BREAKfast` and `break` are plain text.
   Round and square brackets keep separate stacks, so `([a:1.5)]` gives a 1.5 / 1.1. A `(` or `[` left open
   applies its 1.1 or 1/1.1 to everything after it (round ones first, then square, in the order opened),
   so "(unbalanced" is "unbalanced" at 1.1. A `)` or `]` with no open bracket of its kind, and a `:` not
   followed by a number and `)`, are plain text: `(word:abc)` is "word:abc" at 1.1. Weights are computed
   in double precision in A1111's order, so they are the same floats (`((word))` is 1.2100000000000002).
   The result is a list of (text, weight) fragments in which neighbours of equal weight are merged; a
   prompt with no fragments gives [("", 1.0)], and each BREAK is the fragment `BREAK` = ("BREAK", inf)
   (no parsed weight is infinite, so it cannot be mistaken for text).
2. Tokenising: each fragment is tokenised on its own (Tokenizer.encode), each token takes its weight.
3. Chunking (`chunk_prompt`): tokens fill chunks of 75 (the 77-token context less start and end). When a
   token does not fit, is not a comma, and a comma (the token ",</w>") sits within the last
   COMMA_BACKTRACK = 20 tokens of the chunk, the tokens after that comma move to the next chunk (A1111's
   "comma padding backtrack"). BREAK closes the chunk where it is, even an empty one ("BREAK a" gives an
   empty chunk, then "a"); a prompt ending in BREAK gives no trailing empty chunk; an empty prompt gives
   one chunk. Each chunk is framed [start] + ids + [end] and padded to 77 with the tokenizer's pad id
   (Tokenizer.frame); start, end and padding have weight 1.
4. Encoding (`encode_weighted_prompts`, `encode_prompt_pairs`): every chunk goes through the text encoder
   on its own (all chunks in one batch) and the hidden states of a prompt's chunks are concatenated along
   the token axis: (B, 77·k, D). Emphasis (`apply_emphasis`, A1111 sd_emphasis.EmphasisOriginal):
       z_w = z · w (per token),   z_w ← z_w · mean(z) / mean(z_w)
   the mean taken over all tokens and channels of one chunk of one prompt. Prompts of one batch, and a
   prompt and its negative prompt, are padded to the same chunk count with the encoding of the empty
   prompt (A1111 with its "pad_cond_uncond" option, which lets the classifier-free guidance batch hold
   both).
   SDXL (Podell et al. 2023, sec. 2.1) has two tokenizers and encoders: each encodes its own chunks (with
   emphasis, as A1111 applies it to each), the two are concatenated along the channels, (B, 77·k, 768 + 1280),
   and the pooled, projected embedding of the last encoder at each prompt's first chunk conditions the U-Net's
   added embedding (`encode_conditioning`); both encoders are padded to the same chunk count.
   The same steps serve a model whose text side is MiniLM (kedavra.networks.model.with_minilm_text_encoder): its
   WordPiece tokenizer frames chunks as [CLS] + ids + [SEP], padded to its own context (32 tokens), with ","
   as the comma.
   A prompt with no brackets, backslashes or BREAK and at most 75 tokens is one chunk of all-1 weights;
   such chunks skip the emphasis step, so plain prompts give exactly `text_encoder(tokenizer(prompts))`.

Where this differs from A1111, on purpose:
  - The emphasis mean is per prompt and chunk; A1111 takes it over the batch of the i-th chunks of all
    prompts. For one prompt (or a batch of copies of it) the two agree; per prompt keeps a batch giving
    the same images as single calls.
  - BREAK inside brackets still breaks. (A1111 marks BREAK with weight -1, brackets then rescale the
    mark, and the word "BREAK" is encoded as text with weight -1.1.)
  - A weight written as a number that is not a finite float (`(a:1.2.3)`, `(a:.)`, 400 digits) raises a
    ValueError naming it; A1111 fails in float() or computes with inf.
  - At most MAX_CHUNKS = 20 chunks (1,500 tokens) per prompt; a longer prompt is a ValueError.
  - Weights that leave a chunk's mean hidden state at exactly 0 (so the rescale is 0/0 or x/0) are a
    ValueError; A1111 passes NaN or inf to the U-Net.

Textual-inversion embeddings (Gal et al. 2022; files and the library: kedavra.adapters.textual_inversion), the A1111
way (sd_hijack_clip.tokenize_line, sd_hijack.EmbeddingsWithFixes), when an `embeddings` library is given: in each
fragment's tokens, where the tokens of an embedding's name begin (the longest name first), those tokens are
replaced by the embedding's n vectors, each with the fragment's weight. The ids there are EMBEDDING_TOKEN_ID (0),
so the end token stays the largest id, where TextEncoder.pool finds it. An embedding is never split across chunks:
when its n vectors do not fit in the open chunk, the chunk is closed and the embedding starts the next. The text
encoder then takes the token embeddings of the ids with the learned vectors put in (TextEncoder's
`token_embeddings`); SDXL's encoders each take their own (clip_l, clip_g). Without embeddings (or with none named
in the prompt) everything is as before, bit for bit. Where this differs from A1111: when the comma backtrack moves
the words after a comma to the next chunk, an embedding among them moves with them (A1111 leaves its vectors at the
old offsets, over the old chunk's end token and padding); an embedding of more than 75 vectors is a ValueError.
Not implemented (other A1111 features, not attention syntax): prompt editing `[a:b:0.5]` and alternation `[a|b]`
(their brackets read as emphasis here), `AND`.
"""

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kedavra.adapters.textual_inversion import Embedding, EmbeddingLibrary
from kedavra.networks.text_encoder import TextEncoder
from kedavra.networks.tokenizer import Tokenizer
from kedavra.validation import check_int, finite_float

ROUND_MULTIPLIER = 1.1  # A1111 prompt_parser: (text)
SQUARE_MULTIPLIER = 1 / 1.1  # A1111 prompt_parser: [text]
COMMA_BACKTRACK = 20  # A1111 shared option comma_padding_backtrack, default 20 tokens
MAX_CHUNKS = 20  # ours: 20 chunks of 75 tokens = 1,500 tokens per prompt
BREAK: tuple[str, float] = ("BREAK", math.inf)  # the fragment standing for a BREAK in parsed prompts
EMBEDDING_TOKEN_ID = 0  # A1111 sd_hijack_clip: the id at embedding positions; below the end token, which pools

# One alternative per syntax element, tried in this order (A1111 prompt_parser.re_attention).
_SYNTAX = re.compile(
    r"""
      \\[()\[\]\\]             # escaped bracket or backslash: that character
    | \\                       # any other backslash: dropped
    | [(\[]                    # opening bracket
    | :\s*([+-]?[.\d]+)\s*\)   # ':number)' closes a round bracket with that multiplier
    | [)\]]                    # closing bracket
    | [^\\()\[\]:]+            # plain text
    | :                        # a colon that starts no weight: plain text
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")  # A1111 prompt_parser.re_break


def _check_prompt(prompt, name: str = "prompt") -> None:
    if not isinstance(prompt, str):
        raise ValueError(f"{name} must be a str, got {type(prompt).__name__}: {prompt!r}")


def _parse_weight(number: str, prompt: str) -> float:
    weight = finite_float(number)
    if weight is None:
        raise ValueError(
            f"prompt weight {number!r} in {_shorten(prompt)!r} is not a finite number; write it like (text:1.2)"
        )
    return weight


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def parse_weighted_prompt(prompt: str) -> list[tuple[str, float]]:
    """A1111 prompt text -> [(text, weight), ...] with equal neighbours merged; BREAK as `BREAK`.

    See the module docstring for the syntax. Example: "a (word) b" -> [("a ", 1.0), ("word", 1.1), (" b", 1.0)].
    """
    _check_prompt(prompt)
    pieces: list[list | None] = []  # [text, weight], or None for a BREAK (never rescaled)
    open_round: list[int] = []  # index into `pieces` where each open bracket starts
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece is not None:
                piece[1] *= factor

    for match in _SYNTAX.finditer(prompt):
        token, number = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif number is not None and open_round:
            scale_from(open_round.pop(), _parse_weight(number, prompt))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            for i, text in enumerate(_BREAK_WORD.split(token)):
                if i:
                    pieces.append(None)
                pieces.append([text, 1.0])
    for start in open_round:  # unclosed brackets reach to the end of the prompt
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)

    fragments: list[tuple[str, float]] = []
    for piece in pieces:
        if piece is None:
            fragments.append(BREAK)
        elif fragments and fragments[-1] is not BREAK and fragments[-1][1] == piece[1]:
            fragments[-1] = (fragments[-1][0] + piece[0], piece[1])
        else:
            fragments.append((piece[0], piece[1]))
    return fragments or [("", 1.0)]


@dataclass(frozen=True)
class PromptChunk:
    """One framed chunk: `ids` [start] + up to 75 tokens + [end] + padding (77 in all), the weight of
    each position (1 for start, end and padding), and the textual-inversion embeddings in it: (position in
    `ids` of its first vector, embedding), its n vectors at that position and the n - 1 after it."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    embeddings: tuple[tuple[int, Embedding], ...] = ()


def chunk_prompt(
    tokenizer: Tokenizer,
    prompt: str,
    *,
    comma_backtrack: int = COMMA_BACKTRACK,
    max_chunks: int = MAX_CHUNKS,
    embeddings: EmbeddingLibrary | None = None,
) -> list[PromptChunk]:
    """Parse, tokenise and split a prompt into framed chunks of the tokenizer's context (see module docstring).

    comma_backtrack: how far back (in tokens) a comma may be for the text after it to move to the next
    chunk when a chunk overflows; 0 turns this off. More than `max_chunks` chunks is a ValueError.
    embeddings: the textual-inversion embeddings the prompt may name (None: none, as an empty library).
    """
    _check_prompt(prompt)
    size = tokenizer.max_content_length  # 75 for CLIP
    check_int("comma_backtrack", comma_backtrack, 0, size - 1)
    check_int("max_chunks", max_chunks, 1)
    comma = tokenizer.comma_id
    closed: list[tuple[list[int], list[float], list[tuple[int, Embedding]]]] = []
    ids: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, Embedding]] = []  # (index in ids, embedding) of the open chunk's embeddings
    last_comma: int | None = None  # index of the last comma in the open chunk

    def close_chunk() -> None:
        nonlocal ids, weights, fixes, last_comma
        if len(closed) == max_chunks:
            raise ValueError(
                f"prompt {_shorten(prompt)!r} needs more than {max_chunks} chunks of {size} tokens "
                f"(at most {max_chunks * size} tokens); shorten it"
            )
        closed.append((ids, weights, fixes))
        ids, weights, fixes, last_comma = [], [], [], None

    for text, weight in parse_weighted_prompt(prompt):
        if (text, weight) == BREAK:
            close_chunk()
            continue
        tokens = tokenizer.encode(text)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == size and last_comma is not None and size - last_comma <= comma_backtrack:
                start = last_comma + 1  # the words after the comma move on together, with their embeddings
                moved = ids[start:], weights[start:], [(i - start, e) for i, e in fixes if i >= start]
                del ids[start:], weights[start:]
                fixes[:] = [(i, e) for i, e in fixes if i < start]
                close_chunk()
                ids, weights, fixes = moved
            if len(ids) == size:
                close_chunk()
            found = None if embeddings is None else embeddings.find(tokenizer, tokens, position)
            if found is None:
                ids.append(token)
                weights.append(weight)
                position += 1
                continue
            embedding, name_length = found
            count = embedding.num_vectors
            if count > size:
                raise ValueError(f"embedding {embedding.name!r} has {count} vectors; at most {size} fit in a chunk")
            if len(ids) + count > size:  # A1111 never splits an embedding across chunks
                close_chunk()
            fixes.append((len(ids), embedding))
            ids += [EMBEDDING_TOKEN_ID] * count
            weights += [weight] * count
            position += name_length
    if ids or not closed:
        close_chunk()

    length = tokenizer.config.max_length
    return [
        PromptChunk(tuple(tokenizer.frame(chunk_ids)), (1.0, *w, *[1.0] * (length - 1 - len(w))),  # start, ids, rest
                    tuple((index + 1, embedding) for index, embedding in chunk_fixes))  # + 1: the start token
        for chunk_ids, w, chunk_fixes in closed
    ]


def apply_emphasis(hidden: Tensor, weights: Tensor) -> Tensor:
    """A1111's "Original" emphasis on (N, L, D) hidden states with (N, L) token weights, row by row:
    z_w = z · w, then z_w · mean(z) / mean(z_w) so each row keeps its mean. Rows whose weights are all 1
    are returned unchanged (bit for bit). Computed in float32, returned in `hidden`'s dtype.

    The rescale needs mean(z_w) away from 0. Trained CLIP encoders give that (the final LayerNorm's learned
    bias); a freshly initialised one (bias 0) gives zero-mean tokens and a meaningless ratio. A ratio that is
    not finite is a ValueError.
    """
    weighted = (weights != 1).any(dim=1)  # (N,)
    if not weighted.any():
        return hidden
    z = hidden.float()
    original_mean = z.mean(dim=(1, 2), keepdim=True)  # (N, 1, 1)
    z_weighted = z * weights.to(z)[..., None]  # (N, L, D) * (N, L, 1)
    rescale = original_mean / z_weighted.mean(dim=(1, 2), keepdim=True)  # (N, 1, 1)
    if not rescale[weighted].isfinite().all():
        raise ValueError(
            "prompt weights make a chunk's mean hidden state 0, so A1111's emphasis cannot restore its mean; "
            "change the weights"
        )
    z_weighted = z_weighted * rescale
    return torch.where(weighted[:, None, None], z_weighted.to(hidden.dtype), hidden)


def _check_prompts(prompts, name: str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"{name} must be a str or a non-empty sequence of str, got {prompts!r}")
    for i, prompt in enumerate(prompts):
        _check_prompt(prompt, f"{name}[{i}]")
    return list(prompts)


def _pad_chunks(chunk_lists: list[list[PromptChunk]], count: int, empty: PromptChunk) -> list[list[PromptChunk]]:
    return [chunks + [empty] * (count - len(chunks)) for chunks in chunk_lists]


def _token_embeddings(text_encoder: TextEncoder, rows: list[PromptChunk], ids: Tensor, index: int,
                      widths: tuple[int, ...] | None) -> Tensor | None:
    """(N, L, D) input vectors of N chunks with each embedding's vectors for text encoder `index` (of a model whose
    encoders take `widths`; None: this encoder alone) in place of its placeholder ids (Gal et al. 2022, Sec. 3: v*
    where S*'s token embedding would be; A1111 sd_hijack.EmbeddingsWithFixes); None when no chunk holds one."""
    if not any(chunk.embeddings for chunk in rows):
        return None
    if not isinstance(text_encoder, TextEncoder):
        raise ValueError(f"textual-inversion embeddings need a CLIP text encoder; this model's is a "
                         f"{type(text_encoder).__name__}")
    vectors = text_encoder.token_embedding(ids)  # (N, L, D)
    for row, chunk in enumerate(rows):
        for position, embedding in chunk.embeddings:
            learned = embedding.vectors_for(index, widths or (text_encoder.config.width,))  # (n, D)
            vectors[row, position : position + learned.shape[0]] = learned.to(vectors)
    return vectors


def _encode_chunks(text_encoder: TextEncoder, chunk_lists: list[list[PromptChunk]], clip_skip: int | None) -> Tensor:
    """B lists of k chunks each -> (B, k·L, D): one text-encoder batch of B·k chunks, then emphasis."""
    return _encode_pooled(text_encoder, chunk_lists, clip_skip, pooled=False)[0]


def _encode_pooled(text_encoder: TextEncoder, chunk_lists: list[list[PromptChunk]], clip_skip: int | None,
                   pooled: bool, index: int = 0, widths: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor | None]:
    """(B, k·L, D) emphasised states of B lists of k chunks, and with `pooled` the encoder's pooled (projected)
    embedding of each list's first chunk (B, P), from the same pass (TextEncoder.encode). index, widths: which of
    the model's text encoders this is and the widths of all of them, for the chunks' embeddings (default: the
    only one)."""
    device = next(text_encoder.parameters()).device
    batch, count = len(chunk_lists), len(chunk_lists[0])
    rows = [chunk for chunks in chunk_lists for chunk in chunks]  # prompt-major: prompt 0's chunks first
    ids = torch.tensor([chunk.ids for chunk in rows], dtype=torch.long, device=device)  # (B·k, L)
    weights = torch.tensor([chunk.weights for chunk in rows], dtype=torch.float32, device=device)  # (B·k, L)
    vectors = _token_embeddings(text_encoder, rows, ids, index, widths)
    extra = {} if vectors is None else {"token_embeddings": vectors}  # (B·k, L, D)
    if pooled:
        states, pooled_rows = text_encoder.encode(ids, clip_skip=clip_skip, **extra)  # (B·k, L, D), (B·k, P)
        pooled_rows = pooled_rows.reshape(batch, count, -1)[:, 0]  # (B, P): each prompt's first chunk
    else:
        states, pooled_rows = text_encoder(ids, clip_skip=clip_skip, **extra), None
    hidden = apply_emphasis(states, weights)  # (B·k, L, D)
    return hidden.reshape(batch, count * ids.shape[1], hidden.shape[-1]), pooled_rows  # (B, k·L, D)


def encode_weighted_prompts(
    tokenizer: Tokenizer,
    text_encoder: TextEncoder,
    prompts: str | Sequence[str],
    *,
    num_chunks: int | None = None,
    clip_skip: int | None = None,
    embeddings: EmbeddingLibrary | None = None,
) -> Tensor:
    """Weighted, possibly long prompts -> (B, L·k, D) hidden states, L = 77, k = the most chunks of any
    prompt (or `num_chunks` if given, which must be at least that); shorter prompts are padded with the
    empty prompt's chunk. clip_skip: passed to the text encoder (None: its config's). embeddings: the
    textual-inversion embeddings the prompts may name, for a model with this one text encoder."""
    prompts = _check_prompts(prompts, "prompts")
    chunk_lists = [chunk_prompt(tokenizer, prompt, embeddings=embeddings) for prompt in prompts]
    needed = max(map(len, chunk_lists))
    count = needed if num_chunks is None else num_chunks
    check_int("num_chunks", count, needed, note=" (as many as the longest prompt's chunks)")
    empty = chunk_prompt(tokenizer, "")[0]
    return _encode_chunks(text_encoder, _pad_chunks(chunk_lists, count, empty), clip_skip)


def encode_prompt_pairs(
    tokenizer: Tokenizer,
    text_encoder: TextEncoder,
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str],
    *,
    clip_skip: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Prompts and their negative prompts -> (cond, uncond), both (B, L·k_max, D) with the same chunk
    count k_max, ready to stack for classifier-free guidance. A str is one prompt; a single negative
    prompt is used for every prompt."""
    text = encode_conditioning([(tokenizer, text_encoder)], prompts, negative_prompts, clip_skip=clip_skip)
    return text.context, text.uncond_context


@dataclass(frozen=True)
class TextConditioning:
    """What the text gives the U-Net for classifier-free guidance: token states (B, L·k, D) for the prompts and
    their negative prompts, and, for SDXL's added embedding, the last encoder's pooled projections (B, P); and the
    names of the textual-inversion embeddings the prompts and negative prompts used, in order of first use (for
    the infotext's "TI hashes": EmbeddingLibrary.ti_hashes)."""

    context: Tensor
    uncond_context: Tensor
    pooled: Tensor | None = None
    uncond_pooled: Tensor | None = None
    embeddings: tuple[str, ...] = ()


def encode_conditioning(
    encoders: Sequence[tuple[Tokenizer, TextEncoder]],
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str],
    *,
    clip_skip: int | None = None,
    pooled: bool = False,
    embeddings: EmbeddingLibrary | None = None,
) -> TextConditioning:
    """Prompts and their negative prompts through every (tokenizer, text encoder) pair, the states concatenated
    along the channels in the pairs' order (SDXL: ViT-L then bigG), all padded to one chunk count; with `pooled`,
    the last encoder's pooled projection of each prompt's first chunk. With one pair the states are
    `encode_prompt_pairs`'. clip_skip: passed to every encoder (None: each one's config). embeddings: the
    textual-inversion embeddings the prompts may name (SDXL: clip_l vectors to the first pair, clip_g to the
    second); the names used come back in TextConditioning.embeddings."""
    prompts = _check_prompts(prompts, "prompts")
    negatives = _check_prompts(negative_prompts, "negative_prompts")
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one or one each")
    chunked = [([chunk_prompt(tok, p, embeddings=embeddings) for p in prompts],
                [chunk_prompt(tok, p, embeddings=embeddings) for p in negatives]) for tok, _ in encoders]
    count = max(len(chunks) for cond, uncond in chunked for chunks in cond + uncond)
    widths = tuple(encoder.config.width for _, encoder in encoders)
    sides: dict[str, list[tuple[Tensor, Tensor | None]]] = {"cond": [], "uncond": []}
    for index, ((tokenizer, encoder), (cond, uncond)) in enumerate(zip(encoders, chunked, strict=True)):
        empty = chunk_prompt(tokenizer, "")[0]
        want_pooled = pooled and index == len(encoders) - 1
        for side, chunk_lists in (("cond", cond), ("uncond", uncond)):
            sides[side].append(_encode_pooled(encoder, _pad_chunks(chunk_lists, count, empty), clip_skip, want_pooled,
                                              index, widths))
    context, uncond_context = (torch.cat([states for states, _ in sides[s]], dim=-1) for s in ("cond", "uncond"))
    used = (embedding.name for cond, uncond in chunked for chunks in cond + uncond for chunk in chunks
            for _, embedding in chunk.embeddings)
    return TextConditioning(context, uncond_context, sides["cond"][-1][1], sides["uncond"][-1][1],
                            tuple(dict.fromkeys(used)))
