"""Multi-head scaled dot-product attention: the one implementation that every network of kedavra calls.

Vaswani et al. 2017 ("Attention Is All You Need"), eq. 1 and Sec. 3.2.2: per head, on Dh-wide slices of the
projected queries, keys and values,
    Attention(Q, K, V) = softmax(Q K^T / sqrt(Dh)) V.
Self-attention takes queries, keys and values from the same tokens; cross-attention (the U-Net's text
conditioning, Rombach et al. 2022, Sec. 3.3) takes the keys and values from a context. The networks keep their
own projection layers, since their names are what checkpoints store (CLIP's and MiniLM's `q_proj`, ...,
`out_proj`; the U-Net's and the VAE's `to_q`, ..., `to_out`), and hand them to `multi_head_attention`:
    project    q = x W_q, k = c W_k, v = c W_v          (B, S, Nh*Dh), (B, L, Nh*Dh)
    split      `split_heads`                            (B, Nh, S, Dh), (B, Nh, L, Dh)
    attend     `attend`: eq. 1 per head                 (B, Nh, S, Dh)
    merge      `merge_heads`, then W_out                (B, S, Nh*Dh) -> (B, S, D)

Which keys a query sees:
    causal       query i sees keys 0..i (CLIP's masked self-attention, Radford et al. 2021, Sec. 2.4)
    key_padding  (B, L) bool, True at the keys to hide (BERT's padding, Devlin et al. 2019)
A hidden key's score gets the dtype's most negative number added (transformers' BertModel extended attention
mask), not -inf, so a query whose every key is hidden attends uniformly instead of giving NaN.

`attend` runs through torch's `F.scaled_dot_product_attention` (SDPA, whose default scale is 1/sqrt(Dh)): a fused
kernel that never holds the probabilities. On a CPU with AVX-512 BF16 and no AMX, an unmasked bf16 call with at
least 256 keys outside autograd goes to kedavra's own kernel instead (kedavra.networks.cpu_attention: about 2x
SDPA there, the same rounding error). Two opt-ins:
    slice_size  the queries go slice_size at a time: the score matrix is at most (B, Nh, slice_size, L)
    recorder    a callable handed the probabilities softmax(Q K^T / sqrt(Dh) + mask), float32 (B, Nh, S, L), of
                every call, for visualisations (kedavra.viz.attention). They are then computed explicitly, in
                float32 and for all queries at once (slice_size is not used); the output is SDPA's up to float
                rounding. With no recorder the SDPA path runs unchanged.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kedavra.networks import cpu_attention

Recorder = Callable[[Tensor], None]  # receives the probabilities (B, Nh, S, L) of one attention call
Projection = Callable[[Tensor], Tensor]  # a Linear layer (or its packed twin, kedavra.networks.acceleration)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, T, Nh*Dh) -> (B, Nh, T, Dh), T tokens (S queries or L keys): head h is channels [h*Dh, (h+1)*Dh)
    (a view when x allows one)."""
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, num_heads, width // num_heads).transpose(1, 2)  # (B, Nh, T, Dh)


def merge_heads(x: Tensor) -> Tensor:
    """(B, Nh, T, Dh) -> (B, T, Nh*Dh), the inverse of `split_heads` (Vaswani et al. 2017, Sec. 3.2.2: Concat)."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)  # (B, T, Nh*Dh)


def hidden_keys(
    queries: int, keys: int, causal: bool, key_padding: Tensor | None, device: torch.device
) -> Tensor | None:
    """Bool mask, True where a query may not see a key: (B, 1, 1, L) for padding, (1, 1, S, L) for causal,
    (B, 1, S, L) for both; None when every query sees every key."""
    hidden = None if key_padding is None else key_padding[:, None, None, :]  # (B, 1, 1, L)
    if causal:
        future = torch.ones(queries, keys, dtype=torch.bool, device=device).triu(1)  # (S, L): key j > query i
        future = future[None, None]  # (1, 1, S, L)
        hidden = future if hidden is None else hidden | future  # (B, 1, S, L)
    return hidden


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding: Tensor | None = None,
    slice_size: int | None = None,
    recorder: Recorder | None = None,
) -> Tensor:
    """softmax(Q K^T / sqrt(Dh)) V per head: q (B, Nh, S, Dh), k and v (B, Nh, L, Dh) -> (B, Nh, S, Dh).

    causal: query i sees keys 0..i. key_padding: (B, L) bool, True at hidden keys. slice_size: queries per SDPA
    call (None: all). recorder: handed the float32 probabilities (B, Nh, S, L); see the module docstring."""
    queries = q.shape[2]
    if recorder is not None:
        return _attend_recorded(q, k, v, hidden_keys(queries, k.shape[2], causal, key_padding, q.device), recorder)
    sliced = slice_size is not None and slice_size < queries
    if key_padding is None and not sliced:
        if not causal and cpu_attention.applies(q, k, v):
            out = cpu_attention.attention(q, k, v)  # eq. 1 in kedavra's kernel for CPUs with AVX-512 BF16, no AMX
            if out is not None:
                return out  # (B, Nh, S, Dh)
        # Vaswani et al. 2017, eq. 1; SDPA's default scale is 1/sqrt(Dh), its causal mask the one of hidden_keys.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, Nh, S, Dh)
    hidden = hidden_keys(queries, k.shape[2], causal, key_padding, q.device)
    bias = None
    if hidden is not None:  # BertModel's extended attention mask: the dtype's most negative number at hidden keys
        bias = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill(hidden, torch.finfo(q.dtype).min)
    if not sliced:
        # Vaswani et al. 2017, eq. 1 with the mask: softmax(Q K^T / sqrt(Dh) + bias) V
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, Nh, S, Dh)
    chunks, start = [], 0
    for q_chunk in q.split(slice_size, dim=2):  # (B, Nh, slice, Dh)
        end = start + q_chunk.shape[2]
        rows_bias = bias if bias is None or bias.shape[2] == 1 else bias[:, :, start:end]  # the chunk's rows of it
        chunks.append(F.scaled_dot_product_attention(q_chunk, k, v, attn_mask=rows_bias))  # (B, Nh, slice, Dh)
        start = end
    return torch.cat(chunks, dim=2)  # (B, Nh, S, Dh)


def _attend_recorded(q: Tensor, k: Tensor, v: Tensor, hidden: Tensor | None, recorder: Recorder) -> Tensor:
    """Vaswani et al. 2017, eq. 1 written out in float32, handing the probabilities to `recorder` on the way."""
    scores = q.float() @ k.float().transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, Nh, S, L): Q K^T / sqrt(Dh)
    if hidden is not None:
        scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)  # as the bias of the SDPA path
    probabilities = scores.softmax(dim=-1)  # (B, Nh, S, L): each query's row sums to 1
    recorder(probabilities)
    return probabilities.to(v.dtype) @ v  # (B, Nh, S, Dh)


def multi_head_attention(
    x: Tensor,
    context: Tensor,
    projections: tuple[Projection, Projection, Projection, Projection],
    num_heads: int,
    *,
    causal: bool = False,
    key_padding: Tensor | None = None,
    slice_size: int | None = None,
    recorder: Recorder | None = None,
) -> Tensor:
    """Multi-head attention from tokens x (B, S, D) to `context` (B, L, D_ctx) (pass x again for self-attention)
    -> (B, S, D_out): `projections` = (to_q, to_k, to_v, to_out), the network's own layers; the keyword
    arguments are `attend`'s."""
    to_q, to_k, to_v, to_out = projections
    q = split_heads(to_q(x), num_heads)  # (B, Nh, S, Dh)
    k = split_heads(to_k(context), num_heads)  # (B, Nh, L, Dh)
    v = split_heads(to_v(context), num_heads)  # (B, Nh, L, Dh)
    out = attend(q, k, v, causal=causal, key_padding=key_padding, slice_size=slice_size, recorder=recorder)
    return to_out(merge_heads(out))  # (B, Nh, S, Dh) -> (B, S, Nh*Dh) -> (B, S, D_out)


def self_attention_projections(width: int) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """The (q, k, v, out) projections of a width -> width self-attention with biases, as CLIP and BERT have them;
    assign them in that order (`self.q_proj, self.k_proj, self.v_proj, self.out_proj = ...`) so the parameters
    register in the checkpoints' order."""
    return nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
