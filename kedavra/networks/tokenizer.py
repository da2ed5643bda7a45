"""CLIP's tokenizer: prompt text -> token ids for the text encoder.

Radford et al. 2021 ("Learning Transferable Visual Models From Natural Language Supervision"), Sec. 2.4:
a lower-cased byte pair encoding (Sennrich et al. 2016) with a 49,152-entry vocabulary, each text
wrapped in start and end tokens and capped at 76 positions plus the end token. The vocabulary works on
UTF-8 bytes, each shown as a printable character (the byte-level alphabet of GPT-2, Radford et al.
2019), so any text can be encoded without an unknown token.

The walk of one prompt:
  clean (HTML entities, typography, NFC, whitespace, lower case) -> split into words, digits and
  punctuation runs with CLIP's pattern -> each piece to bytes -> BPE merges -> ids
  -> [start] + ids + [end], truncated and padded to `max_length` (77).

Two cleaning recipes reproduce the two references SD was run with:
  "hf"      transformers' CLIPTokenizer (tokenizers backend), used by diffusers for SD 1.x:
            NFC, whitespace runs -> one space, lower case one character at a time.
  "openai"  OpenAI CLIP's `simple_tokenizer` as open_clip ships it, used by SD 2.x: ftfy's
            table-driven fixes that ordinary prompts can trigger (curly quotes, Latin ligatures,
            fullwidth forms, invisible control characters), HTML entities decoded twice, NFC,
            whitespace, `str.lower`. ftfy's mojibake repair ("cafÃ©" -> "café") is left out: it
            changes only text that was already garbled by a wrong decoding, and it is a heuristic
            that would pull in a dependency for prompts nobody types.

A model may bring its own vocabulary (a diffusers folder's tokenizer/vocab.json and merges.txt, e.g. the small test
pipelines with 1,000 tokens): `TokenizerConfig.tokens` and `merges` then hold it, and it is read as transformers'
CLIPTokenizer reads those files (the same byte-level BPE with "</w>" word ends; a symbol the vocabulary lacks becomes
the unknown token). Without them the vendored CLIP vocabulary is used.
"""

import functools
import gzip
import html
import re
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

VOCAB_PATH = Path(__file__).parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"  # OpenAI CLIP, MIT
NUM_MERGES = 49152 - 256 - 2  # CLIP simple_tokenizer.py: merges[1 : 49152 - 256 - 2 + 1]
MAX_CACHED_PIECES = 1 << 16  # words whose BPE each vocabulary remembers
VOCAB_SIZE = 256 + 256 + NUM_MERGES + 2  # bytes, bytes ending a word, merges, start and end = 49408
START_TOKEN_ID = VOCAB_SIZE - 2  # 49406, "<|startoftext|>"
END_TOKEN_ID = VOCAB_SIZE - 1  # 49407, "<|endoftext|>"
ZERO_PAD_ID = 0  # open_clip tokenize(): torch.zeros(...) under the tokens, the id of "!"
CONTEXT_LENGTH = 77  # CLIP text context: start + 75 tokens + end
END_OF_WORD = "</w>"  # CLIP BPE marks the last symbol of every word with this suffix
CLEANINGS = ("hf", "openai")
PAD_CHOICES = ("eos", "zero")

# Unicode White_Space: what `\s` matches in the regex engines of both references (Oniguruma in
# tokenizers, the `regex` package in open_clip). Python's `str.isspace` adds U+001C..U+001F.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# CLIP simple_tokenizer.py pattern, after the special tokens: contractions, letter runs, single
# digits, runs of anything else that is not whitespace.
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")

# ftfy 6 (Speer 2019) fixes kept by the "openai" recipe, as tables.
CURLY_QUOTES = str.maketrans(  # ftfy chardata SINGLE_QUOTE_RE / DOUBLE_QUOTE_RE
    {**{c: "'" for c in "\u02bc\u2018\u2019\u201a\u201b"}, **{c: '"' for c in "\u201c\u201d\u201e\u201f"}}
)
LATIN_LIGATURES = str.maketrans(  # ftfy chardata LIGATURES
    {
        "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
        "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
        "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
    }
)  # fmt: skip
INVISIBLE_CONTROLS = dict.fromkeys(  # ftfy chardata CONTROL_CHARS: C0 controls but \t \n \f \r, etc.
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]
)


@dataclass(frozen=True)
class TokenizerConfig:
    """How prompts become ids. The defaults are SD 1.x (transformers' CLIPTokenizer)."""

    max_length: int = CONTEXT_LENGTH
    pad_with: str = "eos"  # "eos": pad with the end token (SD 1.x); "zero": with id 0 (SD 2.x)
    cleaning: str = "hf"  # one of CLEANINGS, see the module docstring
    # Prompt text that stands for the start and end tokens (each reference spells them its own way).
    special_text: tuple[str, str] = ("<|startoftext|>", "<|endoftext|>")
    # A vocabulary of the model's own, None: the vendored CLIP one. tokens: id -> token (vocab.json); merges: the
    # BPE merges in rank order, each "a b" (merges.txt); unknown: the token a symbol outside the vocabulary becomes.
    tokens: tuple[str, ...] | None = field(default=None, repr=False)
    merges: tuple[str, ...] | None = field(default=None, repr=False)
    unknown: str = "<|endoftext|>"

    def __post_init__(self):
        for name in ("tokens", "merges"):  # JSON round trips give lists
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 2:
            raise ValueError(
                f"TokenizerConfig.max_length must be an int >= 2 (start and end tokens), got {self.max_length!r}"
            )
        if self.pad_with not in PAD_CHOICES:
            raise ValueError(f"TokenizerConfig.pad_with must be one of {PAD_CHOICES}, got {self.pad_with!r}")
        if self.cleaning not in CLEANINGS:
            raise ValueError(f"TokenizerConfig.cleaning must be one of {CLEANINGS}, got {self.cleaning!r}")
        text = self.special_text
        if not isinstance(text, tuple) or len(text) != 2 or not all(isinstance(t, str) and t for t in text):
            raise ValueError(f"TokenizerConfig.special_text must be a tuple of two non-empty strings, got {text!r}")
        if text[0] == text[1]:
            raise ValueError(f"TokenizerConfig.special_text needs two different strings, got {text!r}")
        if (self.tokens is None) != (self.merges is None):
            raise ValueError("TokenizerConfig.tokens and merges come together: give both (a vocabulary of the "
                             "model's own) or neither (CLIP's)")
        if self.tokens is not None:
            _check_vocabulary(self)

    @property
    def vocab_size(self) -> int:
        """How many ids the text encoder's token embedding must hold."""
        return VOCAB_SIZE if self.tokens is None else len(self.tokens)

    def vocabulary(self) -> "Vocabulary":
        return load_vocabulary() if self.tokens is None else _own_vocabulary(self.tokens, self.merges)

    @property
    def pad_id(self) -> int:
        if self.pad_with == "zero":
            return ZERO_PAD_ID
        return END_TOKEN_ID if self.tokens is None else self.tokens.index(self.special_text[1])

    @classmethod
    def from_preset(cls, name: str) -> "TokenizerConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown tokenizer preset {name!r}; known presets: {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS: dict[str, TokenizerConfig] = {
    "sd15": TokenizerConfig(),  # transformers CLIPTokenizer, padding="max_length" with its pad "<|endoftext|>"
    "sd21": TokenizerConfig(  # open_clip tokenize(), as Stability's FrozenOpenCLIPEmbedder calls it
        pad_with="zero", cleaning="openai", special_text=("<start_of_text>", "<end_of_text>")
    ),
}


@functools.cache
def byte_alphabet() -> tuple[str, ...]:
    """The printable character standing for each byte 0..255 (GPT-2's byte-level BPE alphabet).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, soft hyphen)
    are moved to U+0100 onwards, in byte order. The vocabulary lists these characters in the order
    "printable bytes first, then the moved ones", which is why id 0 is "!".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(moved)}
    return tuple(chars[b] for b in range(256))


@dataclass(frozen=True)
class Vocabulary:
    tokens: tuple[str, ...]  # id -> token
    ids: dict[str, int]  # token -> id
    merge_ranks: dict[tuple[str, str], int]  # symbol pair -> priority (lower merges first)
    _merged: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False, repr=False)  # bpe's cache

    def bpe(self, piece: str) -> tuple[str, ...]:
        """Merge the byte characters of one piece, lowest-ranked pair first (Sennrich et al. 2016, Alg. 1); the
        last symbol carries END_OF_WORD."""
        cached = self._merged.get(piece)
        if cached is not None:
            return cached
        ranks, never = self.merge_ranks, len(self.merge_ranks)
        symbols = [*piece[:-1], piece[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pair = min(zip(symbols[:-1], symbols[1:], strict=True), key=lambda p: ranks.get(p, never))
            if pair not in ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        if len(self._merged) < MAX_CACHED_PIECES:
            self._merged[piece] = tuple(symbols)
        return tuple(symbols)


@functools.cache
def load_vocabulary(path: Path = VOCAB_PATH) -> Vocabulary:
    """CLIP's 49,408 tokens: 256 byte characters, the same with END_OF_WORD, one per merge, start, end."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    in_vocab_order = sorted(byte_alphabet())  # printable bytes first, then the moved ones
    tokens = (
        *in_vocab_order,
        *(c + END_OF_WORD for c in in_vocab_order),
        *("".join(pair) for pair in merges),
        "<|startoftext|>",
        "<|endoftext|>",
    )
    return Vocabulary(tokens, {t: i for i, t in enumerate(tokens)}, {p: i for i, p in enumerate(merges)})


@functools.lru_cache(maxsize=8)
def _own_vocabulary(tokens: tuple[str, ...], merges: tuple[str, ...]) -> Vocabulary:
    """A model's own vocabulary (`TokenizerConfig.tokens` / `merges`), built once per process."""
    pairs = [tuple(line.split(" ")) for line in merges]
    return Vocabulary(tokens, {t: i for i, t in enumerate(tokens)}, {p: i for i, p in enumerate(pairs)})


def _check_vocabulary(config: TokenizerConfig) -> None:
    """A vocabulary of the model's own: distinct string tokens holding the start, end and unknown tokens, merges of
    two symbols each, CLIPTokenizer's cleaning."""
    tokens, merges = config.tokens, config.merges
    if not isinstance(tokens, tuple) or not tokens or not all(isinstance(t, str) and t for t in tokens):
        raise ValueError("TokenizerConfig.tokens must be a non-empty sequence of non-empty strings (id -> token)")
    if len(set(tokens)) != len(tokens):
        twice = sorted({t for t in tokens if tokens.count(t) > 1})[:5]
        raise ValueError(f"TokenizerConfig.tokens lists tokens more than once: {twice}")
    for token in (*config.special_text, config.unknown):
        if token not in tokens:
            raise ValueError(f"TokenizerConfig.tokens lacks the special token {token!r} (start, end and unknown "
                             f"tokens: {(*config.special_text, config.unknown)})")
    if not isinstance(merges, tuple) or not all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges):
        bad = next((m for m in merges if not isinstance(m, str) or len(m.split(" ")) != 2), merges) \
            if isinstance(merges, tuple) else merges
        raise ValueError(f"TokenizerConfig.merges must be strings of two symbols separated by one space, got {bad!r}")
    if config.cleaning != "hf":
        raise ValueError(f"TokenizerConfig.cleaning must be 'hf' with a vocabulary of the model's own (it is read as "
                         f"transformers' CLIPTokenizer reads vocab.json and merges.txt), got {config.cleaning!r}")
    if config.pad_with == "zero" and tokens[0] != "!":
        raise ValueError(f"TokenizerConfig.pad_with 'zero' pads with id 0, which must be '!' as in CLIP's byte-level "
                         f"vocabulary; this vocabulary's id 0 is {tokens[0]!r}")


def _category_classes(majors: str) -> dict[str, str]:
    """For each major general category in `majors` ("L", "N"), a character-class body listing its
    code points as ranges, from this Python's Unicode database."""
    ranges: dict[str, list[str]] = {m: [] for m in majors}
    run_major, run_start = None, 0
    for code in range(0x110001):
        major = unicodedata.category(chr(code))[0] if code < 0x110000 else None
        if major != run_major:
            if run_major in ranges:
                ranges[run_major].append(f"\\U{run_start:08x}-\\U{code - 1:08x}")
            run_major, run_start = major, code
    return {m: "".join(r) for m, r in ranges.items()}


@functools.cache
def _piece_pattern(special_text: tuple[str, ...] = ()) -> re.Pattern:
    """CLIP's pre-tokenisation pattern, with \\p{L} and \\p{N} spelled out for the stdlib `re`:
    `special_text` (matched first), contractions, letter runs, single digits, runs of anything else
    that is not whitespace (CLIP simple_tokenizer.py)."""
    classes = _category_classes("LN")
    letters, numbers = classes["L"], classes["N"]
    alternatives = [*map(re.escape, special_text), *CONTRACTIONS]
    return re.compile("|".join(alternatives) + f"|[{letters}]+|[{numbers}]|[^{WHITESPACE}{letters}{numbers}]+")


_WHITESPACE_RUN = re.compile(f"[{WHITESPACE}]+")


def bpe(piece: str) -> tuple[str, ...]:
    """`Vocabulary.bpe` on CLIP's vendored vocabulary."""
    return load_vocabulary().bpe(piece)


class PromptFraming:
    """What CLIP's BPE tokenizer and MiniLM's WordPiece tokenizer share: framing a prompt's ids as
    [start] + ids + [end], padded to the context. Subclasses give `config.max_length`, `start_id`, `end_id`,
    `pad_id`, `encode` and `decode`."""

    @property
    def max_content_length(self) -> int:
        """Tokens of prompt text that fit between the start and end tokens (75 for CLIP)."""
        return self.config.max_length - 2

    def frame(self, ids: Sequence[int]) -> list[int]:
        """[start] + ids + [end], cut to `max_length` (end token kept) and padded to it.

        Warns with the dropped text when the ids do not fit.
        """
        keep = self.max_content_length
        if len(ids) > keep:
            warnings.warn(
                f"prompt is {len(ids)} tokens but only {keep} fit in the {self.config.max_length}-token "
                f"context; dropped: {self.decode(ids[keep:])!r}",
                stacklevel=2,
            )
        framed = [self.start_id, *ids[:keep], self.end_id]
        return framed + [self.pad_id] * (self.config.max_length - len(framed))

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """One prompt or a list of prompts -> (B, max_length) int64 ids, framed and padded."""
        if isinstance(prompts, str):
            prompts = [prompts]
        elif not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a str or a sequence of str, got {type(prompts).__name__}")
        return torch.tensor([self.frame(self.encode(p)) for p in prompts], dtype=torch.long).reshape(
            len(prompts), self.config.max_length
        )


class Tokenizer(PromptFraming):
    """Prompt text -> CLIP token ids, and back."""

    def __init__(self, config: TokenizerConfig):
        if not isinstance(config, TokenizerConfig):
            raise TypeError(f"Tokenizer needs a TokenizerConfig, got {type(config).__name__}")
        self.config = config
        self.vocab = config.vocabulary()
        if config.tokens is None:
            self._start_id, self._end_id, self._unknown_id = START_TOKEN_ID, END_TOKEN_ID, END_TOKEN_ID
        else:
            self._start_id, self._end_id = (self.vocab.ids[text] for text in config.special_text)
            self._unknown_id = self.vocab.ids[config.unknown]
        self._special_ids = dict(zip(config.special_text, (self._start_id, self._end_id), strict=True))
        if config.cleaning == "hf":  # tokenizers splits out special-token text first, as written
            self._special_split = re.compile("(" + "|".join(map(re.escape, config.special_text)) + ")")
            self._pattern = _piece_pattern()
        else:  # CLIP's pattern matches it among the pieces of the cleaned (lower-cased) text
            self._special_split = None
            self._pattern = _piece_pattern(config.special_text)

    @classmethod
    def from_preset(cls, name: str) -> "Tokenizer":
        return cls(TokenizerConfig.from_preset(name))

    @property
    def pad_id(self) -> int:
        return self.config.pad_id

    @property
    def start_id(self) -> int:
        return self._start_id

    @property
    def end_id(self) -> int:
        return self._end_id

    def token_ends_word(self, ids: Sequence[int], j: int) -> bool:
        """Whether token j of `ids` is the last of its word: CLIP's BPE marks it with "</w>"."""
        return self.vocab.tokens[ids[j]].endswith(END_OF_WORD)

    @property
    def comma_id(self) -> int | None:
        """The comma token, where long prompts prefer to break into chunks (A1111 sd_hijack_clip: vocab[',</w>']);
        None in a vocabulary without one."""
        return self.vocab.ids.get("," + END_OF_WORD)

    def clean(self, text: str) -> str:
        """Normalise text as the configured reference does before splitting it."""
        if self.config.cleaning == "openai":
            text = html.unescape(html.unescape(text))  # CLIP simple_tokenizer.py basic_clean
            for table in (CURLY_QUOTES, LATIN_LIGATURES, _standard_widths(), INVISIBLE_CONTROLS):
                text = text.translate(table)
            text = unicodedata.normalize("NFC", text)
            return _WHITESPACE_RUN.sub(" ", text).strip().lower()
        text = _WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text))
        return text.replace("Σ", "σ").lower()  # per character: no word-final ς as str.lower would give

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without start/end tokens, padding or truncation (for chunking long prompts)."""
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}: {text!r}")
        alphabet, ids = byte_alphabet(), []
        for part in self._special_split.split(text) if self._special_split else [text]:
            if part in self._special_ids:
                ids.append(self._special_ids[part])
                continue
            for piece in self._pattern.findall(self.clean(part)):
                if piece in self._special_ids:
                    ids.append(self._special_ids[piece])
                    continue
                as_bytes = "".join(alphabet[b] for b in piece.encode("utf-8"))
                ids.extend(self.vocab.ids.get(symbol, self._unknown_id) for symbol in self.vocab.bpe(as_bytes))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, one space after each word-final token (none at the end). A start token is
        skipped and the first end token ends the text, so framed and padded sequences decode to their
        prompt. Encoding the result gives the same ids.
        """
        byte_of = {c: b for b, c in enumerate(byte_alphabet())}
        data = bytearray()
        size = len(self.vocab.tokens)
        for i in map(int, ids):
            if not 0 <= i < size:
                raise ValueError(f"token id {i} is outside the tokenizer's vocabulary 0..{size - 1}")
            if i == self.end_id:
                break
            if i != self.start_id:
                token = self.vocab.tokens[i]
                word = token.removesuffix(END_OF_WORD)
                # a token outside the byte alphabet (a special token of the model's own vocabulary) as its text
                data += b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode() for c in word)
                data += b" " if word != token else b""
        return data.decode("utf-8", errors="replace").removesuffix(" ")


@functools.cache
def _standard_widths() -> dict[int, str]:
    """Fullwidth and halfwidth forms (U+FF01..U+FFEF) and the ideographic space to their usual
    characters, one character at a time (ftfy fixes.fix_character_width)."""
    table = {ord("\u3000"): " "}
    for code in range(0xFF01, 0xFFF0):
        usual = unicodedata.normalize("NFKC", chr(code))
        if usual != chr(code):
            table[code] = usual
    return table
