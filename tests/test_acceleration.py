"""Packed oneDNN weights (kedavra.networks.acceleration): the same numbers as the eager layers, repacking when the
weight or the input shape changes, autograd left alone, and a pipeline that gives the same images with and without."""

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from random_models import tiny_model
from torch import nn

from kedavra.networks import acceleration
from kedavra.networks.acceleration import (
    PackedConv2d,
    PackedGEGLU,
    PackedLinear,
    optimize_for_inference,
    pack_weights,
    packable_dtypes,
    packing_available,
    release_packed_weights,
)
from kedavra.networks.model import ModelConfig
from kedavra.networks.transformer import GEGLU
from kedavra.networks.unet import UNet
from kedavra.pipeline.pipeline import Pipeline

pytestmark = pytest.mark.skipif(not packing_available(), reason="this PyTorch build has no oneDNN packed-weight ops")
# oneDNN packs bf16 weights only on CPUs with native bf16 (AVX512-BF16 or AMX); elsewhere bf16 layers stay eager and
# the tests of the packing mechanism run on fp32 convolutions
BF16_PACKS = torch.bfloat16 in packable_dtypes()
needs_bf16_packing = pytest.mark.skipif(not BF16_PACKS, reason="this CPU has no native bf16 (AVX512-BF16 or AMX): "
                                        "oneDNN packs no bf16 weights here, so bf16 layers stay eager")
CONV_DTYPE = torch.bfloat16 if BF16_PACKS else torch.float32  # the mechanism tests' convolutions

# torch.testing.assert_close's default tolerance for bf16 (rtol 1.6e-2 = about two bf16 rounding steps, atol 1e-5)
BF16_RTOL, BF16_ATOL = 1.6e-2, 1e-5
# Whole pipeline, bf16: 8-bit images packed vs eager; measured 0 (bitwise) on the tiny model, allowed one level
# for the GEGLU halves' rare one-step roundings (module docstring of kedavra.networks.acceleration).
PIPELINE_MAX_LEVELS = 1


def random_input(*shape, dtype=CONV_DTYPE, channels_last=False, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def conv_pair(cin, cout, kernel, stride=1, dtype=CONV_DTYPE, channels_last=True, seed=0):
    """An eager conv and its packed twin sharing the same parameters."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2).to(dtype)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    return conv, PackedConv2d.from_conv(conv)


def cached(layer) -> int:
    """How many packed copies `layer` (a GEGLU: its projection) holds right now."""
    layer = layer.proj if isinstance(layer, PackedGEGLU) else layer
    state = layer.__dict__.get("_pack")
    return 0 if state is None or state.copies is None else len(state.copies)


# ---- layers ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=needs_bf16_packing), torch.float32])
@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "stride", "side", "channels_last"),
    [
        (320, 320, 3, 1, 8, True),  # SD 1.5's first-level ResBlock conv on a small map
        (64, 128, 3, 2, 9, True),  # stride-2 Downsample on an odd side
        (128, 64, 1, 1, 8, True),  # 1x1 shortcut / transformer projection
        (4, 32, 3, 1, 8, False),  # conv_in on a contiguous (NCHW) input
    ],
)
@torch.no_grad()
def test_packed_conv_is_bitwise_the_eager_conv(dtype, cin, cout, kernel, stride, side, channels_last):
    """Bitwise on CPUs with AVX-512 (those with native bf16 here); on an AVX2-only CPU oneDNN's packed fp32 kernel
    blocks some reductions differently from the eager one (seen at conv_in's shape), within fp32 rounding."""
    conv, packed = conv_pair(cin, cout, kernel, stride, dtype, channels_last)
    x = random_input(2, cin, side, side, dtype=dtype, channels_last=channels_last)
    out = packed(x)
    assert cached(packed) == 1
    if BF16_PACKS:
        assert torch.equal(out, conv(x))
    else:
        torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(packed(x), out)  # the second call reuses the packed copy


@needs_bf16_packing
@torch.no_grad()
def test_packed_linear_is_bitwise_the_eager_linear_in_bf16_and_leaves_fp32_eager():
    torch.manual_seed(0)
    linear = nn.Linear(320, 1280).bfloat16()
    packed = PackedLinear.from_linear(linear)
    for shape in [(2, 64, 320), (2, 77, 320), (5, 320)]:  # token batches, text context, plain rows
        x = random_input(*shape)
        assert torch.equal(packed(x), linear(x))
    fp32 = PackedLinear.from_linear(nn.Linear(320, 64))
    x = random_input(3, 320, dtype=torch.float32)
    assert torch.equal(fp32(x), nn.functional.linear(x, fp32.weight, fp32.bias)) and cached(fp32) == 0


@needs_bf16_packing
@pytest.mark.parametrize(("tokens", "dim"), [(2 * 64, 320), (2 * 77, 768), (512, 1280)])
@torch.no_grad()
def test_packed_geglu_is_the_chunked_geglu(tokens, dim):
    """x W * GELU(x V) from two packed halves against eager GEGLU's chunk of one (N, 2 inner) product: bitwise
    at the first two shapes; at 512 x 1280 oneDNN blocks the half-width reduction differently and a few
    elements (about 0.02 %) move by one bf16 rounding step, inside torch.testing's bf16 tolerance."""
    torch.manual_seed(0)
    geglu = GEGLU(dim, 4 * dim).bfloat16()
    packed = PackedGEGLU.from_geglu(geglu)
    x = random_input(2, tokens // 2, dim)
    eager, out = geglu(x), packed(x)
    assert cached(packed) == 2 and out.shape == (2, tokens // 2, 4 * dim)
    torch.testing.assert_close(out, eager, rtol=BF16_RTOL, atol=BF16_ATOL)
    if dim < 1280:
        assert torch.equal(out, eager)
    assert (out != eager).float().mean() < 1e-3


@torch.no_grad()
def test_eager_geglu_is_value_times_gelu_of_gate_over_the_projection_halves():
    """GEGLU (Shazeer 2020, eq. 6): rows [0, inner) of proj are W, rows [inner, 2 inner) are V, as PackedGEGLU
    assumes when it slices them."""
    torch.manual_seed(0)
    geglu = GEGLU(8, 16)
    x = torch.randn(3, 5, 8)
    weight, bias = geglu.proj.weight, geglu.proj.bias
    value = x @ weight[:16].T + bias[:16]
    gate = x @ weight[16:].T + bias[16:]
    torch.testing.assert_close(geglu(x), value * nn.functional.gelu(gate), rtol=1e-6, atol=1e-6)


# ---- when the packed copy is rebuilt --------------------------------------------------------------------------


@torch.no_grad()
def test_repacks_after_an_in_place_weight_change_a_state_dict_load_and_a_new_shape():
    conv, packed = conv_pair(32, 32, 3)
    x = random_input(2, 32, 8, 8, channels_last=True)
    packed(x)
    conv.weight.mul_(2)  # shared parameter: bumps its version counter
    assert torch.equal(packed(x), conv(x))
    state = {name: torch.randn_like(value) for name, value in conv.state_dict().items()}
    packed.load_state_dict(state)
    assert torch.equal(packed(x), conv(x))
    bigger = random_input(2, 32, 12, 10, channels_last=True, seed=1)
    assert torch.equal(packed(bigger), conv(bigger))  # repacked for the new shape (the old copy freed)
    assert cached(packed) == 1


@torch.no_grad()
def test_conversion_drops_the_packed_copy_and_data_edits_need_a_release():
    conv, packed = conv_pair(16, 16, 3)
    x = random_input(2, 16, 8, 8, channels_last=True)
    packed(x)
    packed.float()
    assert cached(packed) == 0
    assert torch.equal(packed(x.float()), nn.functional.conv2d(x.float(), packed.weight, packed.bias, padding=1))
    packed.weight.data.mul_(3)  # bypasses the version counter, as the module docstring warns
    assert release_packed_weights(packed) == 1 and cached(packed) == 0
    assert torch.equal(packed(x.float()), nn.functional.conv2d(x.float(), packed.weight, packed.bias, padding=1))


def test_autograd_takes_the_eager_path_with_the_same_gradients():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    linear = nn.Linear(8, 8).bfloat16()
    twin_conv, twin_linear = copy.deepcopy(conv), copy.deepcopy(linear)
    packed_conv, packed_linear = PackedConv2d.from_conv(twin_conv), PackedLinear.from_linear(twin_linear)
    x = torch.randn(2, 8, 6, 6)
    rows = torch.randn(4, 8).bfloat16()
    conv(x).square().sum().backward()
    linear(rows).float().square().sum().backward()
    packed_conv(x).square().sum().backward()
    packed_linear(rows).float().square().sum().backward()
    assert cached(packed_conv) == 0 and cached(packed_linear) == 0
    assert torch.equal(twin_conv.weight.grad, conv.weight.grad)
    assert torch.equal(twin_linear.weight.grad, linear.weight.grad)
    x.requires_grad_(True)
    with torch.no_grad():  # no graph recorded: the packed path again
        packed_conv(x)
    assert cached(packed_conv) == 1


@torch.no_grad()
def test_copies_and_pickles_of_a_used_packed_layer_start_empty_and_agree():
    conv, packed = conv_pair(16, 16, 3)
    x = random_input(2, 16, 8, 8, channels_last=True)
    out = packed(x)
    twin = copy.deepcopy(packed)  # oneDNN's opaque tensors cannot be copied: the cache must not be
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    revived = pickle.loads(pickle.dumps(packed))
    for other in (twin, loaded, revived):
        assert cached(other) == 0 and torch.equal(other(x), out)


# ---- evicted dense weights: one copy, the same numbers ---------------------------------------------------------


def evicting_layers(seed=0):
    """An eager conv, linear and GEGLU (bf16, channels-last conv) and packed, evicting copies of them (not sharing
    parameters), with an input for each."""
    torch.manual_seed(seed)
    eager = nn.ModuleList([nn.Conv2d(32, 64, 3, padding=1), nn.Linear(64, 96), GEGLU(320, 1280)]).bfloat16()
    eager[0].to(memory_format=torch.channels_last)
    packed = copy.deepcopy(eager)
    assert pack_weights(packed, evict=True) == 3
    inputs = (random_input(2, 32, 8, 8, channels_last=True), random_input(2, 10, 64, seed=1),
              random_input(2, 64, 320, seed=2))  # a GEGLU shape where the halves are bitwise the chunked product
    return eager, packed, inputs


def dense_owner(layer):
    """The module whose parameter holds the weight: a GEGLU's projection, else the layer."""
    return layer.proj if isinstance(layer, GEGLU) else layer


def held_bytes(layer) -> int:
    """Bytes of memory the layer's weight parameter holds."""
    return dense_owner(layer)._parameters["weight"].untyped_storage().nbytes()


@needs_bf16_packing
@torch.no_grad()
def test_an_evicting_layer_keeps_its_weight_in_the_packed_copy_alone_with_the_same_numbers():
    eager, packed, inputs = evicting_layers()
    for e, p, x in zip(eager, packed, inputs, strict=True):
        assert not dense_owner(p).evicted and held_bytes(p) > 1000
        out = p(x)
        assert dense_owner(p).evicted and held_bytes(p) == 2  # one bf16 element: the placeholder
        assert torch.equal(out, e(x)) and torch.equal(p(x), out)
        owner = dense_owner(p)
        weight = owner.weight  # reading it puts the exact dense weight back, in its memory format
        reference = dense_owner(e).weight
        assert not owner.evicted and torch.equal(weight, reference) and weight.stride() == reference.stride()
        assert cached(p) >= 1  # the copies stay valid: the next call evicts again without repacking
        assert torch.equal(p(x), out) and owner.evicted


@torch.no_grad()
def test_an_evicting_fp32_conv_keeps_its_weight_in_the_packed_copy_alone():
    """The eviction of the tests above on an fp32 convolution, which packs on every CPU (those tests need bf16
    packing for their linear and GEGLU layers): the placeholder holds one fp32 element after a call, reading the
    weight gives the exact dense values back, and the next call evicts again with the same output."""
    torch.manual_seed(0)
    eager = nn.Conv2d(32, 64, 3, padding=1).to(memory_format=torch.channels_last)
    packed = copy.deepcopy(eager)
    holder = nn.Sequential(packed)
    assert pack_weights(holder, evict=True) == 1
    conv, x = holder[0], random_input(2, 32, 8, 8, dtype=torch.float32, channels_last=True)
    out = conv(x)
    assert conv.evicted and held_bytes(conv) == 4 and cached(conv) == 1
    torch.testing.assert_close(out, eager(x), rtol=1e-5, atol=1e-6)
    weight = conv.weight
    assert not conv.evicted and torch.equal(weight, eager.weight) and weight.stride() == eager.weight.stride()
    assert torch.equal(conv(x), out) and conv.evicted


@needs_bf16_packing
@torch.no_grad()
def test_state_dict_conversion_copies_and_a_new_shape_see_the_dense_weights():
    eager, packed, inputs = evicting_layers()
    for p, x in zip(packed, inputs, strict=True):
        p(x)
    state = packed.state_dict()
    assert all(torch.equal(state[k], v) for k, v in eager.state_dict().items())
    for p, x in zip(packed, inputs, strict=True):
        p(x)  # evicted again
    twin, revived = copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))
    for model in (twin, revived):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in eager.state_dict().items())
    conv, bigger = packed[0], random_input(1, 32, 12, 10, channels_last=True, seed=3)
    conv(inputs[0])
    assert torch.equal(conv(bigger), eager[0](bigger)) and conv.evicted and cached(conv) == 1  # repacked, evicted
    fresh = {k: torch.randn_like(v) for k, v in eager.state_dict().items()}
    eager.load_state_dict(fresh)
    packed.load_state_dict(fresh)
    for e, p, x in zip(eager[:2], packed[:2], inputs[:2], strict=True):
        assert torch.equal(p(x), e(x))
    # the GEGLU's halves round like the chunked product only at some values (test_packed_geglu_is_the_chunked_geglu):
    # a few elements near 0 move by a rounding step of the GELU's tail (outputs of order 10-100 here)
    torch.testing.assert_close(packed[2](inputs[2]), eager[2](inputs[2]), rtol=BF16_RTOL, atol=1e-4)
    packed.float()
    for e, p, x in zip(eager.float(), packed, inputs, strict=True):
        assert not dense_owner(p).evicted and torch.equal(dense_owner(p).weight, dense_owner(e).weight)
        assert torch.equal(p(x.float()), e(x.float()))


@needs_bf16_packing
@torch.no_grad()
def test_edits_and_replacements_of_an_evicted_weight_are_seen():
    eager, packed, inputs = evicting_layers()
    conv, x = packed[0], inputs[0]
    conv(x)
    conv.weight.mul_(2)  # puts the dense weight back, then bumps its version: repacked at the next call
    eager[0].weight.mul_(2)
    assert torch.equal(conv(x), eager[0](x)) and conv.evicted
    new = torch.randn_like(eager[0].weight)
    conv.weight.data = new.clone()
    eager[0].weight.data = new
    assert torch.equal(conv(x), eager[0](x)) and conv.evicted
    conv(x)
    conv.weight = nn.Parameter(new * 3)  # a new Parameter object
    eager[0].weight = nn.Parameter(new * 3)
    assert torch.equal(conv(x), eager[0](x))
    conv(x)
    assert release_packed_weights(packed) == 3 and cached(conv) == 0 and not conv.evicted
    assert torch.equal(conv.weight, eager[0].weight)


@needs_bf16_packing
def test_autograd_on_an_evicted_layer_takes_the_eager_path_with_the_same_gradients():
    eager, packed, inputs = evicting_layers()
    with torch.no_grad():
        for p, x in zip(packed, inputs, strict=True):
            p(x)
    for e, p, x in zip(eager, packed, inputs, strict=True):
        e(x).float().square().sum().backward()
        p(x).float().square().sum().backward()
        assert torch.equal(dense_owner(p).weight.grad, dense_owner(e).weight.grad)


@needs_bf16_packing
@torch.no_grad()
def test_an_optimized_unet_holds_one_copy_of_its_weights_and_the_same_numbers():
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny").unet
    eager = UNet(config).eval()
    for p in eager.parameters():
        p.add_(0.05 * torch.randn_like(p))
    eager = eager.bfloat16().to(memory_format=torch.channels_last)
    packed = optimize_for_inference(copy.deepcopy(eager), "cpu", torch.bfloat16)
    x, t = torch.randn(2, config.in_channels, 16, 16).bfloat16(), torch.tensor([10.0, 900.0])
    context = torch.randn(2, 77, config.context_dim).bfloat16()
    assert torch.equal(packed(x, t, context), eager(x, t, context))
    dense = sum(p.untyped_storage().nbytes() for p in eager.parameters())
    held = sum(p.untyped_storage().nbytes() for p in packed.parameters())
    owners = [m for m in packed.modules() if isinstance(m, (PackedConv2d, PackedLinear))]
    in_copies = sum(c.untyped_storage().nbytes() if c.layout == torch.strided else c.nbytes
                    for m in owners for c in m.__dict__["_pack"].copies)
    assert all(m.evicted for m in owners) and held < 0.1 * dense  # what stays: biases, norms, embeddings
    assert in_copies <= 1.05 * dense  # the packed copies replace the dense weights
    assert torch.equal(packed(x, t, context), eager(x, t, context))
    assert all(torch.equal(packed.state_dict()[k], v) for k, v in eager.state_dict().items())


# ---- whole models ----------------------------------------------------------------------------------------------


def test_pack_weights_swaps_in_place_keeps_the_state_dict_and_is_idempotent():
    config = ModelConfig.from_preset("tiny").unet
    with torch.device("meta"):  # works on a meta model too: nothing is read or packed until a call
        unet = UNet(config)
    keys = list(unet.state_dict())
    plain = sum(type(m) in (nn.Conv2d, nn.Linear, GEGLU) for m in unet.modules())
    assert pack_weights(unet) == plain - sum(isinstance(m, GEGLU) for m in unet.modules())  # GEGLU's proj stays
    assert list(unet.state_dict()) == keys
    assert pack_weights(unet) == 0
    assert any(isinstance(m, PackedGEGLU) for m in unet.modules())


def test_optimize_for_inference_leaves_fp16_and_other_devices_alone():
    model = nn.Sequential(nn.Conv2d(3, 3, 1))
    assert type(optimize_for_inference(model, "cpu", torch.float16)[0]) is nn.Conv2d
    assert type(optimize_for_inference(model, "cuda", torch.bfloat16)[0]) is nn.Conv2d
    assert type(optimize_for_inference(model, "cpu", CONV_DTYPE)[0]) is PackedConv2d


@torch.no_grad()
def test_without_native_bf16_bf16_layers_stay_eager_and_fp32_still_packs(monkeypatch):
    """On a CPU without AVX512-BF16 or AMX oneDNN refuses to pack bf16 weights ("bf16 path needs the cpu support
    avx_ne_convert or avx512bw, avx512vl and avx512dq"): optimize_for_inference leaves a bf16 model as it is, a
    packed bf16 layer runs the eager way with the eager numbers, and fp32 packs as before."""
    monkeypatch.setattr(acceleration, "cpu_has_fast_bf16", lambda: False)
    assert packable_dtypes() == (torch.float32,)
    model = nn.Sequential(nn.Conv2d(3, 3, 1))
    assert type(optimize_for_inference(model, "cpu", torch.bfloat16)[0]) is nn.Conv2d
    conv, packed = conv_pair(8, 8, 3, dtype=torch.bfloat16)
    x = random_input(2, 8, 6, 6, dtype=torch.bfloat16, channels_last=True)
    assert torch.equal(packed(x), conv(x)) and cached(packed) == 0
    assert type(optimize_for_inference(model, "cpu", torch.float32)[0]) is PackedConv2d


@torch.no_grad()
def test_packed_unet_matches_the_eager_unet_in_bf16_and_fp32():
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny").unet
    eager = UNet(config).eval()
    for p in eager.parameters():  # random everywhere, the zero-initialised output layers too
        p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(2, config.in_channels, 16, 16), torch.tensor([10.0, 900.0])
    context = torch.randn(2, 77, config.context_dim)
    for dtype in packable_dtypes():
        model = copy.deepcopy(eager).to(dtype).to(memory_format=torch.channels_last)
        packed = optimize_for_inference(copy.deepcopy(model), "cpu", dtype)
        reference = model(x.to(dtype), t, context.to(dtype))
        assert torch.equal(packed(x.to(dtype), t, context.to(dtype)), reference)


@pytest.mark.parametrize("dtype", [pytest.param("bf16", marks=needs_bf16_packing), "fp32"])
def test_pipeline_gives_the_same_image_with_and_without_the_optimisation(dtype):
    optimized = Pipeline(tiny_model(), dtype=dtype)
    plain = Pipeline(tiny_model(), dtype=dtype, optimize=False)
    assert any(isinstance(m, PackedConv2d) for m in optimized.model.unet.modules())
    assert any(isinstance(m, PackedConv2d) for m in optimized.model.vae.modules())
    assert not any(isinstance(m, PackedConv2d) for m in plain.model.modules())
    kwargs = dict(seed=7, steps=4, guidance_scale=5.0, width=64, height=48)
    a, b = optimized("a red circle", **kwargs), plain("a red circle", **kwargs)
    torch.testing.assert_close(a.latents, b.latents, rtol=BF16_RTOL, atol=BF16_ATOL)
    levels = np.abs(np.asarray(a.images[0], dtype=int) - np.asarray(b.images[0], dtype=int)).max()
    assert levels <= PIPELINE_MAX_LEVELS


def test_pipeline_refuses_a_non_bool_optimize():
    with pytest.raises(ValueError, match="optimize must be True or False"):
        Pipeline(tiny_model(), dtype="fp32", optimize="yes")
