"""kedavra.networks.cpu_attention: the AVX-512 BF16 flash-attention kernel against answers known in advance and
against SDPA in float32, and when `attend` hands it a call.

The kernel's tests run where the CPU qualifies (AVX-512 BF16, no AMX) and the kernel builds; the dispatch rules
are checked everywhere."""

import pytest
import torch
import torch.nn.functional as F

from kedavra.networks import attention as attention_module
from kedavra.networks import cpu_attention

qualifies = cpu_attention.cpu_qualifies()
kernel = pytest.mark.skipif(not qualifies, reason="the CPU lacks AVX-512 BF16 or has AMX: kedavra uses SDPA there")

BF16_STEP = 2**-8  # bf16's relative rounding step (8 bits of mantissa)


def random_qkv(batch, heads, queries, keys, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, width, generator=g).bfloat16() for n in (queries, keys, keys))
    return q, k, v


def run_kernel(q, k, v):
    out = cpu_attention.attention(q, k, v)
    assert out is not None, f"the kernel did not build: {cpu_attention.KERNEL.failed}"
    return out


@kernel
@pytest.mark.parametrize("shape", [
    (2, 8, 300, 300, 40),   # SD 1.5's head width, keys not a multiple of the block (256)
    (1, 3, 37, 513, 64),    # SDXL's width, queries not a multiple of 4 or of the 32-query task
    (2, 2, 64, 256, 80),    # one block exactly
    (1, 2, 200, 700, 160),  # width 160: value tiles of 4 + 4 + 2 vectors
    (1, 1, 70, 260, 512),   # the VAE's single 512-wide head
    (1, 2, 9, 256, 2),      # the narrowest even width
])
def test_matches_float32_attention_as_closely_as_sdpa_bf16(shape):
    """Against SDPA in float32 on the same bf16 inputs, the kernel's error is at most twice SDPA-bf16's own plus
    one bf16 step of the output's scale (both round the probabilities to bf16)."""
    q, k, v = random_qkv(*shape)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    sdpa_error = (F.scaled_dot_product_attention(q, k, v).float() - exact).abs().max().item()
    ours = run_kernel(q, k, v)
    assert ours.shape == q.shape and ours.dtype == torch.bfloat16
    error = (ours.float() - exact).abs().max().item()
    assert error <= 2 * sdpa_error + BF16_STEP * exact.abs().max().item(), (error, sdpa_error)


@kernel
def test_zero_queries_average_exactly_the_real_keys_values():
    """q = 0 gives every key the same score, so each output is the mean of the values over the real keys: the
    300 keys' padding to 512 must add nothing (the padded keys are masked, not zero-scored)."""
    q, k, v = random_qkv(1, 2, 33, 300, 40)
    out = run_kernel(torch.zeros_like(q), k, v)
    mean = v.float().mean(dim=2, keepdim=True).expand_as(out)
    torch.testing.assert_close(out.float(), mean, atol=2 * BF16_STEP * v.float().abs().max().item(), rtol=0)


@kernel
def test_huge_scores_pick_the_matching_key_without_overflow():
    """Scores of size 1e4 (query i matches key 400 + i, in the second block of keys, after a first block whose
    best score is far lower): the softmax is one-hot on the matching key, so the output is that key's value,
    with no inf or NaN from the running maximum's rescaling."""
    width, keys, queries = 64, 600, 8
    k = torch.zeros(1, 1, keys, width)
    k[0, 0, :, 0] = -1.0
    q = torch.zeros(1, 1, queries, width)
    for i in range(queries):
        k[0, 0, 400 + i, 1 + i] = 100.0
        q[0, 0, i, 1 + i] = 100.0  # score 1e4 / sqrt(64) with its key, 0 with the others
    v = torch.randn(1, 1, keys, width, generator=torch.Generator().manual_seed(1))
    out = run_kernel(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float()[0, 0], v.bfloat16().float()[0, 0, 400:400 + queries], atol=0, rtol=0)


@kernel
def test_strided_heads_give_the_contiguous_result():
    """q as split_heads makes it (a view of (B, S, Nh*Dh)) gives the same output, bit for bit, as a contiguous q."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 300, 4 * 40, generator=g).bfloat16()
    q = attention_module.split_heads(x, 4)
    assert not q.is_contiguous()
    _, k, v = random_qkv(2, 4, 300, 300, 40, seed=3)
    assert torch.equal(run_kernel(q, k, v), run_kernel(q.contiguous(), k, v))


@kernel
def test_attend_uses_the_kernel_where_it_applies(monkeypatch):
    calls = []
    real = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda q, k, v: calls.append(q.shape) or real(q, k, v))
    q, k, v = random_qkv(1, 2, 300, 300, 40)
    with torch.no_grad():
        out = attention_module.attend(q, k, v)
    assert calls == [q.shape]
    assert torch.equal(out, real(q, k, v))


@pytest.mark.parametrize("case", ["fp32", "grad", "few keys", "causal", "padding", "sliced", "odd width",
                                  "wider values", "switched off", "cpu without it"])
def test_attend_keeps_sdpa_elsewhere(case, monkeypatch):
    """Masks, slices, autograd, fp32, short key sequences (a text context), an odd head width, values wider than
    the keys, the switch KEDAVRA_CPU_ATTENTION=0 and a CPU that does not qualify all go to SDPA, with SDPA's
    result."""
    monkeypatch.setattr(cpu_attention, "attention", lambda q, k, v: pytest.fail(f"kernel called for {case}"))
    monkeypatch.setattr(cpu_attention, "cpu_qualifies", lambda: case != "cpu without it")
    if case == "switched off":
        monkeypatch.setenv(cpu_attention.SWITCH, "0")
    width = 41 if case == "odd width" else 40
    q, k, v = random_qkv(1, 2, 300, 77 if case == "few keys" else 300, width)
    kwargs = {}
    if case == "fp32":
        q, k, v = q.float(), k.float(), v.float()
    if case == "grad":
        q.requires_grad_(True)
    if case == "causal":
        kwargs["causal"] = True
    if case == "padding":
        kwargs["key_padding"] = torch.zeros(1, k.shape[2], dtype=torch.bool)
    if case == "sliced":
        kwargs["slice_size"] = 128
    if case == "wider values":
        v = torch.cat([v, v], dim=-1)  # (B, Nh, L, 2 Dh): SDPA allows a value width of its own
    out = attention_module.attend(q, k, v, **kwargs)
    mask = torch.ones(300, 300, dtype=torch.bool).tril() if case == "causal" else None
    with torch.no_grad():
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out.detach().float(), expected.float(), atol=1e-2, rtol=0)


def test_a_failed_build_warns_once_and_falls_back_to_sdpa(monkeypatch):
    """Without a compiler the build raises: `attention` warns once, says why, and `attend` gives SDPA's output."""
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_attention.KERNEL, "module", None)
    monkeypatch.setattr(cpu_attention.KERNEL, "failed", None)
    monkeypatch.setattr(cpu_attention, "cpu_qualifies", lambda: True)
    q, k, v = random_qkv(1, 2, 40, 300, 40)
    with pytest.warns(RuntimeWarning, match="Ninja is required"):
        assert cpu_attention.attention(q, k, v) is None
    assert not cpu_attention.enabled()  # later calls go straight to SDPA, without a second warning
    with torch.no_grad():
        torch.testing.assert_close(attention_module.attend(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("keys", [256, 300, 513, 17, 1])
def test_packing_matches_the_layouts_written_out(keys):
    """pack_keys / pack_values against the layouts of cpu_attention.cpp built the slow way (pad, then permute):
    key (16 b + j), dimension (2 d + e) at [b, d, j, e]; key (2 p + e), dimension d at [p, d, e]; zeros elsewhere."""
    q, k, v = random_qkv(2, 3, 4, keys, 40)
    padded = -(-keys // cpu_attention.BLOCK_KEYS) * cpu_attention.BLOCK_KEYS
    k_padded = F.pad(k, (0, 0, 0, padded - keys))  # (B, Nh, Lp, Dh)
    expected_k = k_padded.unflatten(2, (padded // 16, 16)).unflatten(-1, (20, 2)).permute(0, 1, 2, 4, 3, 5)
    assert torch.equal(cpu_attention.pack_keys(k, padded), expected_k)
    v_padded = F.pad(v, (0, 48 - 40, 0, padded - keys))  # (B, Nh, Lp, Dv)
    expected_v = v_padded.unflatten(2, (padded // 2, 2)).transpose(3, 4)  # (B, Nh, Lp/2, Dv, 2)
    assert torch.equal(cpu_attention.pack_values(v, padded), expected_v)
