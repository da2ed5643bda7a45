"""The one attention implementation (kedavra/networks/attention.py) and the networks that call it.

The core is checked against Vaswani et al. 2017, eq. 1 written out in float64, softmax(Q K^T / sqrt(Dh)) V with the
hidden keys' scores set to -inf: for self- and cross-attention, under the causal mask, the key padding mask and
both, with the queries sliced or not. Without a recorder it is torch's SDPA bit for bit; with one, the recorded
probabilities are that softmax (rows summing to 1, exact zeros at hidden keys) and the output moves by float
rounding only. Each network's attention layer is checked against the same reference with its own weights, and a
cross-attention built by hand attends where it was built to, as its recorder reports.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from kedavra.networks.attention import attend, hidden_keys, merge_heads, split_heads
from kedavra.networks.minilm import MiniLMConfig, MiniLMEncoder
from kedavra.networks.text_encoder import SelfAttention, TextEncoderConfig
from kedavra.networks.transformer import CrossAttention
from kedavra.networks.vae import SpatialSelfAttention, get_vae_config

B, NH, S, L, DH = 2, 3, 11, 7, 8  # batch, heads, queries, keys (cross-attention), head width
TOLERANCE = 1e-6  # fp32 against the float64 reference: a few float32 roundings of numbers of order 1


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor | None = None):
    """Vaswani et al. 2017, eq. 1 in float64, hidden keys at -inf: (output (B, Nh, S, Dh), probabilities)."""
    scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, Nh, S, L)
    if hidden is not None:
        scores = scores.masked_fill(hidden, -math.inf)
    probabilities = scores.softmax(dim=-1)
    return probabilities @ v.double(), probabilities


def qkv(queries: int = S, keys: int = L, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, NH, queries, DH, generator=generator)  # (B, Nh, S, Dh)
    k = torch.randn(B, NH, keys, DH, generator=generator)  # (B, Nh, L, Dh)
    v = torch.randn(B, NH, keys, DH, generator=generator)  # (B, Nh, L, Dh)
    return q, k, v


def padding(keys: int = L) -> torch.Tensor:
    """(B, L): the first sequence's last three keys are padding, the second has none."""
    is_padding = torch.zeros(B, keys, dtype=torch.bool)
    is_padding[0, -3:] = True
    return is_padding


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return (actual.double() - expected).abs().max().item() < TOLERANCE


# ---------------------------------------------------------------- heads
def test_split_heads_gives_each_head_its_channels_and_merge_inverts_it():
    x = torch.arange(B * S * NH * DH, dtype=torch.float32).reshape(B, S, NH * DH)  # (B, S, Nh*Dh)
    heads = split_heads(x, NH)
    assert heads.shape == (B, NH, S, DH)
    for h in range(NH):
        assert torch.equal(heads[:, h], x[..., h * DH : (h + 1) * DH])  # head h: channels [h*Dh, (h+1)*Dh)
    assert torch.equal(merge_heads(heads), x)


# ---------------------------------------------------------------- the core against eq. 1
@pytest.mark.parametrize("keys", [S, L], ids=["self", "cross"])
def test_attend_is_sdpa_bit_for_bit_and_equals_eq_1(keys):
    q, k, v = qkv(keys=keys)
    out = attend(q, k, v)
    assert out.shape == (B, NH, S, DH)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))  # no mask, no recorder: SDPA as it is
    assert close(out, reference(q, k, v)[0])


def test_causal_query_sees_itself_and_the_keys_before_it():
    q, k, v = qkv(keys=S)
    future = torch.ones(S, S, dtype=torch.bool).triu(1)  # (S, S): True at key j > query i
    assert torch.equal(hidden_keys(S, S, True, None, q.device), future[None, None])
    out = attend(q, k, v, causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert close(out, reference(q, k, v, future)[0])
    assert torch.equal(out[:, :, 0], v[:, :, 0])  # the first token sees only itself
    changed_future = v.clone()
    changed_future[:, :, 5:] += 1.0
    assert torch.equal(attend(q, k, changed_future, causal=True)[:, :, :5], out[:, :, :5])  # 0..4 never see 5..


def test_key_padding_hides_the_padding_keys():
    q, k, v = qkv()
    is_padding = padding()
    out = attend(q, k, v, key_padding=is_padding)
    assert close(out, reference(q, k, v, is_padding[:, None, None, :])[0])
    unpadded = attend(q[:1], k[:1, :, :-3], v[:1, :, :-3])  # the first sequence without its padding keys
    assert (out[:1] - unpadded).abs().max().item() < TOLERANCE
    assert close(out[1:], reference(q[1:], k[1:], v[1:])[0])  # no padding: plain attention


def test_a_query_whose_every_key_is_hidden_averages_the_values_instead_of_nan():
    q, k, v = qkv()
    everything = torch.ones(B, L, dtype=torch.bool)
    out = attend(q, k, v, key_padding=everything)
    assert close(out, v.double().mean(dim=2, keepdim=True).expand(B, NH, S, DH))  # BertModel's convention
    recorded = []
    assert close(attend(q, k, v, key_padding=everything, recorder=recorded.append), out.double())
    assert torch.allclose(recorded[0], torch.full((B, NH, S, L), 1 / L))


def test_causal_and_padding_together():
    q, k, v = qkv(keys=S)
    is_padding = padding(S)
    hidden = hidden_keys(S, S, True, is_padding, q.device)
    assert hidden.shape == (B, 1, S, S)
    assert torch.equal(hidden[1, 0], hidden_keys(S, S, True, None, q.device)[0, 0])  # no padding: causal only
    assert close(attend(q, k, v, causal=True, key_padding=is_padding), reference(q, k, v, hidden)[0])


@pytest.mark.parametrize("mask", ["none", "causal", "padding", "both"])
@pytest.mark.parametrize("slice_size", [1, 4, S, 100])
def test_sliced_queries_give_the_unsliced_result(mask, slice_size):
    q, k, v = qkv(keys=S)
    options = {"causal": mask in ("causal", "both"), "key_padding": padding(S) if mask in ("padding", "both") else None}
    whole = attend(q, k, v, **options)
    sliced = attend(q, k, v, slice_size=slice_size, **options)
    assert (sliced - whole).abs().max().item() < TOLERANCE
    if slice_size >= S:
        assert torch.equal(sliced, whole)  # one slice: the unsliced call itself


# ---------------------------------------------------------------- the recorder
@pytest.mark.parametrize("mask", ["none", "causal", "padding"])
def test_recorder_gets_the_probabilities_of_eq_1_and_the_output_is_unchanged(mask):
    q, k, v = qkv(keys=S)
    options = {"causal": mask == "causal", "key_padding": padding(S) if mask == "padding" else None}
    hidden = hidden_keys(S, S, options["causal"], options["key_padding"], q.device)
    expected_out, expected = reference(q, k, v, hidden)
    recorded = []
    out = attend(q, k, v, recorder=recorded.append, slice_size=4, **options)  # recording ignores slicing
    (probabilities,) = recorded
    assert probabilities.shape == (B, NH, S, S) and probabilities.dtype == torch.float32  # (B, Nh, S, L)
    assert torch.allclose(probabilities.sum(-1), torch.ones(B, NH, S), atol=TOLERANCE)  # each row sums to 1
    assert close(probabilities, expected)
    if hidden is not None:
        assert torch.all(probabilities.masked_select(hidden.expand_as(probabilities)) == 0)  # hidden: exactly 0
    assert close(out, expected_out)
    assert (out - attend(q, k, v, **options)).abs().max().item() < TOLERANCE


def test_recorder_keeps_the_input_dtype_and_records_float32():
    q, k, v = (t.bfloat16() for t in qkv())
    recorded = []
    out = attend(q, k, v, recorder=recorded.append)
    assert out.dtype == torch.bfloat16 and recorded[0].dtype == torch.float32
    assert (out.float() - attend(q, k, v).float()).abs().max().item() < 2e-2  # bf16 keeps ~3 significant digits


def test_hand_built_cross_attention_attends_where_it_was_built_to():
    """Query position s is built to attend to text token target[s]: one-hot positions and tokens, W_k the
    identity and W_q mapping position s onto token target[s]'s key with score SCORE, every other score 0."""
    positions, tokens, score = 6, 5, 40.0  # e^-40 ~ 4e-18: the other tokens' share is below float32's resolution
    target = torch.tensor([3, 3, 0, 4, 1, 3])
    attention = CrossAttention(query_dim=positions, context_dim=tokens, num_heads=2, head_dim=tokens)
    with torch.no_grad():
        attention.to_k.weight.copy_(torch.eye(tokens).repeat(2, 1))  # both heads: key of token t = e_t
        query_of = F.one_hot(target, tokens).T.float() * score * math.sqrt(tokens)  # (tokens, positions)
        attention.to_q.weight.copy_(query_of.repeat(2, 1))  # query of position s = score sqrt(Dh) e_target[s]
    x, context = torch.eye(positions)[None], torch.eye(tokens)[None]  # (1, S, S), (1, L, L): one-hot rows
    recorded = []
    attention.recorder = recorded.append
    attention(x, context)
    expected = F.one_hot(target, tokens).float().expand(1, 2, positions, tokens)  # (B, Nh, S, L)
    assert torch.allclose(recorded[0], expected, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- the networks call it
def projections_of(module, names):
    return tuple(getattr(module, name) for name in names)


def reference_layer(x, context, projections, num_heads, hidden=None):
    """Multi-head attention (Vaswani et al. 2017, Sec. 3.2.2) with eq. 1 in float64, from the layers' weights."""
    to_q, to_k, to_v, to_out = projections
    q, k, v = (split_heads(layer(t).double(), num_heads) for layer, t in ((to_q, x), (to_k, context), (to_v, context)))
    out, _ = reference(q, k, v, hidden)
    return F.linear(merge_heads(out), to_out.weight.double(), to_out.bias.double())


def test_clip_attention_is_causal_eq_1():
    torch.manual_seed(0)
    config = TextEncoderConfig.from_preset("tiny")
    layer = SelfAttention(config)
    x = torch.randn(B, 9, config.width)
    with torch.no_grad():
        future = torch.ones(9, 9, dtype=torch.bool).triu(1)
        expected = reference_layer(x, x, projections_of(layer, ("q_proj", "k_proj", "v_proj", "out_proj")),
                                   config.num_heads, future)
        assert (layer(x).double() - expected).abs().max().item() < 1e-5


def test_bidirectional_text_attention_sees_every_token_eq_1():
    torch.manual_seed(0)
    config = dataclasses.replace(TextEncoderConfig.from_preset("tiny"), causal=False)
    layer = SelfAttention(config)
    x = torch.randn(B, 9, config.width)
    with torch.no_grad():
        expected = reference_layer(x, x, projections_of(layer, ("q_proj", "k_proj", "v_proj", "out_proj")),
                                   config.num_heads, torch.zeros(9, 9, dtype=torch.bool))
        assert (layer(x).double() - expected).abs().max().item() < 1e-5
        x_changed = x.clone()
        x_changed[:, -1] += 1.0  # the last token reaches the first one's output only without the causal mask
        assert (layer(x_changed)[:, 0] - layer(x)[:, 0]).abs().max().item() > 1e-3


def test_unet_self_and_cross_attention_are_eq_1():
    torch.manual_seed(0)
    names = ("to_q", "to_k", "to_v", "to_out")
    cross = CrossAttention(query_dim=32, context_dim=24, num_heads=4, head_dim=8)  # attn2: keys from the text
    self_attention = CrossAttention(query_dim=32, context_dim=32, num_heads=4, head_dim=8)  # attn1
    x, context = torch.randn(B, 20, 32), torch.randn(B, 7, 24)  # (B, S, D), (B, L, D_ctx)
    with torch.no_grad():
        expected = reference_layer(x, context, projections_of(cross, names), 4)
        assert (cross(x, context).double() - expected).abs().max().item() < 1e-5
        expected = reference_layer(x, x, projections_of(self_attention, names), 4)
        assert (self_attention(x).double() - expected).abs().max().item() < 1e-5  # context None: x itself


def test_vae_attention_is_single_head_eq_1_added_to_its_input():
    torch.manual_seed(0)
    vae = SpatialSelfAttention(32, get_vae_config("tiny"))
    image = torch.randn(B, 32, 4, 5)  # (B, C, H, W)
    with torch.no_grad():
        tokens = vae.norm(image).flatten(2).transpose(1, 2)  # (B, S, C)
        expected = reference_layer(tokens, tokens, projections_of(vae, ("to_q", "to_k", "to_v", "to_out")), 1)
        expected = image.double() + expected.transpose(1, 2).reshape(image.shape)  # (B, C, H, W): one head, Dh = C
        assert (vae(image).double() - expected).abs().max().item() < 1e-5


def test_minilm_padding_keys_do_not_change_the_real_tokens():
    torch.manual_seed(0)
    config = MiniLMConfig(vocab_size=50, max_positions=16, width=32, num_layers=2, num_heads=4, mlp_width=64)
    encoder = MiniLMEncoder(config).eval()
    ids = torch.tensor([[5, 9, 17, 3]])
    padded = torch.cat([ids, torch.full((1, 6), config.pad_id)], dim=1)  # (1, 10): six padding keys
    with torch.no_grad():
        assert (encoder(padded)[:, :4] - encoder(ids)).abs().max().item() < 1e-5
