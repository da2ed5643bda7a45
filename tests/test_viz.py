"""Figures of a real generation (kedavra/viz: trace, reverse, attention, guidance, latents, command) and the
cross-attention recorder they rely on (kedavra/networks/transformer.py, CrossAttention.recorder).

Each figure is checked to show what it claims: the traced x_t and x̂_0 against the sampler's own update rule
(Euler, Karras et al. 2022 eq. 3) and the seed's noise, the last x̂_0 against the final image, the guidance
halves against separate U-Net runs and against the x̂_0 the sampler used (Ho and Salimans 2022, eq. 6), the
attention maps against their stated normalisations (all tokens' shares sum to 1; the words' shares, start token
divided out, sum to 1), against uniform attention, where every word's share is (its tokens) / 77 exactly, and
against attention built by hand (weights set so that a position attends to a chosen word), where the maps must
show that word there and nothing else; and the latent panels against a direct VAE round trip. Tiles are cropped
from the written sheets through their layouts. Random tiny models run in fp32. What the shipped trained model
attends to is a measurement, in docs/visualisations.md, not a test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kedavra.checkpoint import save_model
from kedavra.cli import build_parser, main
from kedavra.diffusion.samplers import resolve_sampler
from kedavra.diffusion.timesteps import make_plan
from kedavra.networks.model import ModelConfig, StableDiffusion
from kedavra.networks.transformer import CrossAttention, TransformerBlock
from kedavra.pipeline.pipeline import Pipeline
from kedavra.viz.attention import (
    REST_LABEL,
    AttentionRecorder,
    cross_attention_layers,
    draw_attention,
    draw_attention_frames,
    feature_shape,
    prompt_words,
    record_attention,
)
from kedavra.viz.guidance import COLUMNS, draw_guidance, take_apart
from kedavra.viz.latents import draw_latents, round_trip
from kedavra.viz.panels import colour_map, display_scale, enlarge, heat_image, overlay, spread_indices, to_image
from kedavra.viz.reverse import decode_reverse, draw_reverse_strip
from kedavra.viz.sample_image import draw_sample_image
from kedavra.viz.trace import decode, figure_request

PROMPT = "a red circle"
STEPS = 3  # Euler steps: cheap at 32 px, and more than one so step-to-step relations are tested
SEED = 5
GUIDANCE = 7.5
WEIGHT_STD = 0.05  # as tests/test_generate_cli.py: random weights with images that are not flat
CONTEXT = 77  # CLIP's context length: uniform attention gives each token 1/77
HAND_SCORE = 40.0  # the score a hand-built layer gives its chosen token (0 to the rest): e^-40 < 1e-17


def random_model(seed: int = 0) -> StableDiffusion:
    """The tiny preset with every weight ~ N(0, WEIGHT_STD²), the zero-initialised output convs too."""
    torch.manual_seed(seed)
    model = StableDiffusion(ModelConfig.from_preset("tiny"))
    with torch.no_grad():
        for parameter in model.parameters():
            torch.nn.init.normal_(parameter, std=WEIGHT_STD)
    return model


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(random_model(), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def maps(pipe):
    """One recorded run, shared: its attention maps, and its trace for the reverse and guidance checks."""
    return record_attention(pipe, figure_request(PROMPT, steps=STEPS, guidance_scale=GUIDANCE, seed=SEED))


@pytest.fixture(scope="module")
def trace(maps):
    return maps.trace


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def crop(sheet: Image.Image, layout, row: int, col: int) -> np.ndarray:
    return pixels(sheet.crop(layout.tile_box(row, col)))


# ---------------------------------------------------------------- the recorder hook
def test_cross_attention_recorder_off_is_bitwise_sdpa_and_on_matches_within_1e_6():
    torch.manual_seed(0)
    attention = CrossAttention(query_dim=32, context_dim=24, num_heads=4, head_dim=8)
    x, context = torch.randn(2, 20, 32), torch.randn(2, 7, 24)  # (B, S, D), (B, L, D_ctx)

    def split(t):
        return t.view(2, -1, 4, 8).transpose(1, 2)  # (B, Nh, tokens, Dh)

    q, k, v = split(attention.to_q(x)), split(attention.to_k(context)), split(attention.to_v(context))
    sdpa = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 20, 32)  # (B, S, Nh*Dh)
    expected = attention.to_out(sdpa)
    off = attention(x, context)
    assert torch.equal(off, expected)  # no recorder: the SDPA path, bit for bit

    recorded = []
    attention.recorder = recorded.append
    on = attention(x, context)
    attention.recorder = None
    assert (on - off).abs().max().item() < 1e-6
    assert torch.equal(attention(x, context), off)  # unset again: back to the same bits
    (probabilities,) = recorded
    assert probabilities.shape == (2, 4, 20, 7) and probabilities.dtype == torch.float32  # (B, Nh, S, L)
    exact = (q.double() @ k.double().transpose(-2, -1) / math.sqrt(8)).softmax(-1)  # Vaswani et al. 2017, eq. 1
    assert (probabilities.double() - exact).abs().max().item() < 1e-6
    assert torch.allclose(probabilities.sum(-1), torch.ones(2, 4, 20), atol=1e-6)

    attention.slice_size = 5  # the sliced SDPA path is untouched too; the recorder ignores slicing
    assert (attention(x, context) - off).abs().max().item() < 1e-6
    attention.recorder = recorded.append
    assert (attention(x, context) - off).abs().max().item() < 1e-6
    assert recorded[-1].shape == (2, 4, 20, 7)


def test_recorded_layers_are_the_cross_attention_ones(pipe):
    layers = cross_attention_layers(pipe)
    context, _ = pipe.encode_prompts([PROMPT], [""])
    shapes = []
    for layer in layers:
        layer.recorder = lambda probabilities: shapes.append(tuple(probabilities.shape))
    try:
        pipe.model.unet(torch.zeros(1, 4, 16, 16), torch.tensor([500.0]), context)
    finally:
        for layer in layers:
            layer.recorder = None
    assert len(shapes) == len(layers) > 0  # each runs once per U-Net call
    assert all(shape[-1] == CONTEXT and shape[-2] in (8 * 8, 4 * 4) for shape in shapes)  # keys: the 77 tokens


# ---------------------------------------------------------------- tokens -> words, layer shapes
def test_prompt_words_map_positions_to_words(pipe):
    tokenizer = pipe.model.tokenizer
    words = prompt_words(tokenizer, "a blue square left of a green triangle")
    assert words.words == ("a", "blue", "square", "left", "of", "a", "green", "triangle")
    assert words.positions == tuple((j,) for j in range(1, 9))  # position 0 is the start token
    several = prompt_words(tokenizer, "kedavra circle")
    assert several.words == ("kedavra", "circle")
    assert len(several.positions[0]) > 1  # BPE splits the made-up word; its tokens form one word
    assert several.positions[1] == (several.positions[0][-1] + 1,)
    assert prompt_words(tokenizer, "(red:1.5) circle").words == ("red", "circle")  # emphasis syntax parsed away
    assert prompt_words(tokenizer, "").words == ()


def test_feature_shape_walks_the_unet_levels():
    assert feature_shape(64, 8, 8) == (8, 8)
    assert feature_shape(16, 8, 8) == (4, 4)
    assert feature_shape(6, 6, 10) == (2, 3)  # 6x10 -> 3x5 -> 2x3: sides halve rounding up
    with pytest.raises(ValueError, match="7 attention positions"):
        feature_shape(7, 8, 8)


# ---------------------------------------------------------------- attention maps
def test_attention_maps_are_shares_that_sum_to_one(maps):
    n, channels, height, width = maps.per_step.shape
    assert (n, channels, height, width) == (STEPS, 3 + 1, 32, 32)  # a, red, circle, the rest
    assert maps.labels("all") == ("a", "red", "circle", REST_LABEL) and maps.labels() == ("a", "red", "circle")
    assert maps.per_step.min() >= 0
    ones = torch.ones(height, width)
    for step in (*range(n), None):
        assert torch.allclose(maps.maps(step, "all").sum(0), ones, atol=1e-5)  # every token's share: 1 in all
        words = maps.maps(step, "words")
        assert words.shape == (3, height, width) and torch.allclose(words.sum(0), ones, atol=1e-5)
        shares = maps.mean if step is None else maps.per_step[step]
        assert torch.allclose(words, shares[:3] / shares[:3].sum(0))  # the start token's part divided out
    assert torch.allclose(maps.mean, maps.per_step.mean(0))
    assert torch.equal(maps.word_map("Circle"), maps.maps()[2])
    assert torch.equal(maps.word_map("circle", step=1, normalise="all"), maps.per_step[1, 2])
    with pytest.raises(ValueError, match="'square' is not a word"):
        maps.word_map("square")
    with pytest.raises(ValueError, match="unknown attention normalisation 'max'"):
        maps.maps(normalise="max")


def test_uniform_attention_gives_each_word_its_token_count_over_77():
    uniform = Pipeline(random_model(seed=1), device="cpu", dtype="fp32")
    with torch.no_grad():
        for layer in cross_attention_layers(uniform):
            layer.to_k.weight.zero_()  # every score 0: softmax is 1/77 on each text position
    maps = record_attention(uniform, figure_request("kedavra circle", steps=2, seed=SEED))
    tokens = len(maps.words.positions[0])
    expected = torch.tensor([tokens, 1, CONTEXT - tokens - 1], dtype=torch.float32) / CONTEXT  # kedavra, circle, rest
    assert torch.allclose(maps.per_step, expected[None, :, None, None].expand_as(maps.per_step), atol=1e-6)
    among_words = torch.tensor([tokens, 1], dtype=torch.float32) / (tokens + 1)
    assert torch.allclose(maps.maps(), among_words[:, None, None].expand(2, 32, 32), atol=1e-5)


# ---------------------------------------------------------------- attention built by hand
def hand_built_cross_attention(target: torch.Tensor) -> CrossAttention:
    """A cross-attention layer from S = len(target) positions to the CONTEXT text tokens, both fed one-hot (position
    s is e_s, token t is e_t), in which position s attends to token target[s]: W_k is the identity and W_q maps
    e_s onto token target[s]'s key with score HAND_SCORE; every other score is 0. Two heads, built alike."""
    positions = len(target)
    layer = CrossAttention(query_dim=positions, context_dim=CONTEXT, num_heads=2, head_dim=CONTEXT)
    with torch.no_grad():
        layer.to_k.weight.copy_(torch.eye(CONTEXT).repeat(2, 1))  # key of token t: e_t, in each head
        queries = F.one_hot(target, CONTEXT).T.float() * HAND_SCORE * math.sqrt(CONTEXT)  # (L, S), column s
        layer.to_q.weight.copy_(queries.repeat(2, 1))  # q_s . k_t / sqrt(Dh) = HAND_SCORE if t == target[s], else 0
    return layer


def test_maps_show_the_word_each_position_is_built_to_attend_to(pipe):
    words = prompt_words(pipe.model.tokenizer, PROMPT)  # a, red, circle
    red, circle = words.positions[1][0], words.positions[2][0]
    h, w = 3, 4  # not square, and a triangle for "red": a transposed or flipped fold would show
    on_red = torch.ones(h, w).tril().bool()  # (h, w): column <= row
    target = torch.where(on_red.flatten(), red, circle)  # (S,), row-major as SpatialTransformer flattens the map
    layer = hand_built_cross_attention(target)
    x = torch.eye(h * w).expand(2, -1, -1)  # (2, S, S): [negative prompt, prompt] halves of the guidance batch
    context = torch.stack([torch.zeros(CONTEXT, CONTEXT), torch.eye(CONTEXT)])  # the negative half: uniform
    recorder = AttentionRecorder(words, latent_size=(h, w), image_size=(h, w), guided=True)  # no resampling
    layer.recorder = recorder.record
    with torch.no_grad():
        layer(x, context)
    recorder.end_step()
    (shares,) = recorder.steps  # (K+1, h, w): a, red, circle, the rest
    expected = torch.stack([torch.zeros(h, w), on_red.float(), (~on_red).float(), torch.zeros(h, w)])
    assert torch.allclose(shares, expected, atol=1e-6, rtol=0)


def test_a_model_built_to_attend_to_red_gives_red_all_the_attention():
    """Every attn2 of the pipeline sends all of its attention to the token "red", wherever it is: the text encoder
    is built so that only "red" has a nonzero hidden state, and the U-Net's attn2 layers so that every query
    points at it with score HAND_SCORE. The negative prompt has no "red" and attends uniformly, so the maps would
    show 1/77 if the recorder kept the wrong half of the guidance batch."""
    model = random_model(seed=2)
    (red,) = model.tokenizer.encode("red")
    text = model.text_encoder
    width = text.config.width
    signs = torch.ones(width)
    signs[1::2] = -1  # mean 0, variance 1: the final LayerNorm (weight 1, bias 0) gives signs / sqrt(1 + eps)
    with torch.no_grad():
        text.position_embedding.zero_()
        text.token_embedding.weight.zero_()
        text.token_embedding.weight[red] = signs  # every other token: 0, and LayerNorm(0) = 0
        for layer in text.layers:
            for residual_out in (layer.attn.out_proj, layer.mlp.fc_out):  # each block adds 0: the identity
                residual_out.weight.zero_()
                residual_out.bias.zero_()
        text.final_norm.weight.fill_(1.0)
        text.final_norm.bias.zero_()
        for block in (m for m in model.unet.modules() if isinstance(m, TransformerBlock)):
            block.norm2.weight.zero_()
            block.norm2.bias.fill_(1.0)  # attn2's input: ones at every position
            attention = block.attn2
            attention.to_q.weight.fill_(1.0 / attention.to_q.in_features)  # q = ones
            scale = HAND_SCORE / (width * math.sqrt(attention.head_dim))  # q . k_red / sqrt(Dh) ~ HAND_SCORE
            attention.to_k.weight.copy_(scale * torch.ones(attention.to_k.out_features, 1) * signs)
    built = Pipeline(model, device="cpu", dtype="fp32")
    maps = record_attention(built, figure_request(PROMPT, steps=2, guidance_scale=GUIDANCE, seed=SEED))
    expected = torch.tensor([0.0, 1.0, 0.0, 0.0])  # a, red, circle, the rest
    assert torch.allclose(maps.per_step, expected[:, None, None].expand_as(maps.per_step), atol=1e-6, rtol=0)
    assert torch.allclose(maps.word_map("red"), torch.ones(32, 32), atol=1e-6, rtol=0)


def test_attention_sheet_tiles_are_the_maps_over_the_image(pipe, maps):
    assert all(layer.recorder is None for layer in pipe.model.unet.modules() if isinstance(layer, CrossAttention))
    plain = pipe(PROMPT, steps=STEPS, guidance_scale=GUIDANCE, seed=SEED).images[0]  # the run without recording
    assert np.abs(pixels(maps.trace.image) - pixels(plain)).max() <= 1
    x0_images = {i: decode(pipe, step.x0) for i, step in enumerate(maps.trace.steps)}
    sheet, layout = draw_attention(maps, x0_images, [0, STEPS - 1])
    assert (layout.rows, layout.cols) == (3, 1 + 3)  # two steps + all steps; x̂_0 + 3 words
    scale = display_scale(32)
    assert np.array_equal(crop(sheet, layout, 2, 0), pixels(enlarge(maps.trace.image, scale)))
    assert np.array_equal(crop(sheet, layout, 0, 0), pixels(enlarge(to_image(x0_images[0]), scale)))
    circle = enlarge(overlay(maps.trace.image, maps.maps()[2].numpy()), scale)  # last row, column of "circle"
    assert np.array_equal(crop(sheet, layout, 2, 3), pixels(circle))
    sheet, layout = draw_attention(maps, x0_images, [1], normalise="all")
    assert (layout.rows, layout.cols) == (2, 1 + 4)  # and the start/end/padding map
    rest = enlarge(overlay(maps.trace.image, maps.per_step[1, 3].numpy()), scale)
    assert np.array_equal(crop(sheet, layout, 0, 4), pixels(rest))
    assert len(draw_attention_frames(maps, x0_images)) == STEPS


# ---------------------------------------------------------------- the reverse process
def test_trace_follows_the_euler_update_from_the_seeds_noise(pipe, trace):
    assert [step.index for step in trace.steps] == list(range(STEPS))
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(SEED))[0]
    assert (trace.steps[0].x_t - noise).abs().max().item() < 1e-5  # x_T is the seed's noise (VP start)
    spec, karras = resolve_sampler("euler")
    plan = make_plan(pipe.config.schedule, STEPS, pipe.config.spacing, pipe.config.steps_offset, karras)
    states = [step.x_t * (1 + s**2) ** 0.5 for step, s in zip(trace.steps, plan.sigmas.tolist(), strict=False)]
    states.append(trace.latents)  # VE states x = x_t / √ᾱ, then the result at σ = 0
    for i, step in enumerate(trace.steps):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        euler = states[i] + (states[i] - step.x0) / sigma * (sigma_next - sigma)  # Karras et al. 2022, eq. 3
        assert (states[i + 1] - euler).abs().max().item() < 1e-4
        assert step.alpha_bar == pytest.approx(1 / (1 + sigma**2))


def test_last_predicted_x0_is_the_final_image(pipe, trace):
    assert (trace.steps[-1].x0 - trace.latents).abs().max().item() < 1e-5
    frames = decode_reverse(pipe, trace)
    assert frames.x0.shape == frames.x_t.shape == (STEPS, 3, 32, 32)
    assert (frames.x0[-1] - decode(pipe, trace.latents)).abs().max().item() < 1e-5
    assert np.abs(pixels(to_image(frames.x0[-1])) - pixels(trace.image)).max() <= 1
    strip, layout, shown = draw_reverse_strip(frames, columns=2)
    assert shown == [0, STEPS - 1] and (layout.rows, layout.cols) == (2, 2)
    scale = display_scale(32)
    assert np.abs(crop(strip, layout, 1, 1) - pixels(enlarge(trace.image, scale))).max() <= 1
    assert np.array_equal(crop(strip, layout, 0, 0), pixels(enlarge(to_image(frames.x_t[0]), scale)))


def test_spread_indices_keep_first_and_last():
    assert spread_indices(20, 4) == [0, 6, 13, 19]
    assert spread_indices(3, 8) == [0, 1, 2]
    assert spread_indices(5, 1) == [4]
    with pytest.raises(ValueError, match="the number of steps to show must be an integer >= 1"):
        spread_indices(5, 0)


# ---------------------------------------------------------------- guidance
def test_guidance_halves_are_the_unets_cond_and_uncond_and_recombine_to_the_sampler_x0(pipe, trace):
    context, uncond_context = pipe.encode_prompts([PROMPT], [""])
    for step in trace.steps:
        t = torch.tensor([step.t])
        cond = pipe.model.unet(step.x_t[None], t, context)[0]
        uncond = pipe.model.unet(step.x_t[None], t, uncond_context)[0]
        assert (step.cond - cond).abs().max().item() < 1e-4
        assert (step.uncond - uncond).abs().max().item() < 1e-4
        guided = trace.guided(step)
        assert torch.allclose(guided, step.uncond + GUIDANCE * (step.cond - step.uncond))  # Ho and Salimans eq. 6
        assert (trace.to_x0(step, guided) - step.x0).abs().max().item() < 1e-4  # what the sampler stepped with
        x0_cond, x0_uncond = trace.to_x0(step, step.cond), trace.to_x0(step, step.uncond)
        linear = x0_uncond + GUIDANCE * (x0_cond - x0_uncond)  # x̂_0 is linear in the prediction
        assert (trace.to_x0(step, guided) - linear).abs().max().item() < 1e-4


def test_guidance_sheet_shows_the_parts(pipe, trace):
    parts = take_apart(pipe, trace, [STEPS - 1, 0])
    assert [part.index for part in parts] == [0, STEPS - 1]
    sheet, layout = draw_guidance(trace, parts)
    assert (layout.rows, layout.cols) == (2, len(COLUMNS))
    scale = display_scale(32)
    high = max(float(part.difference_norm.max()) for part in parts)
    for row, part in enumerate(parts):
        assert (part.x0_guided - decode(pipe, trace.steps[part.index].x0)).abs().max().item() < 1e-4
        assert np.array_equal(crop(sheet, layout, row, 0), pixels(enlarge(to_image(part.x0_cond), scale)))
        assert np.array_equal(crop(sheet, layout, row, 1), pixels(enlarge(to_image(part.x0_uncond), scale)))
        norm = part.difference_norm.repeat_interleave(2, 0).repeat_interleave(2, 1)  # 16 -> 32: nearest, f = 2
        assert np.array_equal(crop(sheet, layout, row, 2), pixels(enlarge(heat_image(norm.numpy(), high), scale)))
        assert np.array_equal(crop(sheet, layout, row, 3), pixels(enlarge(to_image(part.x0_guided), scale)))
    with pytest.raises(ValueError, match="step index 9"):
        take_apart(pipe, trace, [9])


# ---------------------------------------------------------------- latents
def test_latent_panels_and_round_trip_error(pipe):
    vae = pipe.model.vae
    image = draw_sample_image(32)
    trip = round_trip(vae, image, device="cpu")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1  # (3, H, W)
    with torch.no_grad():
        z = vae.encode(x[None]).mode()
        direct = vae.decode(z).clamp(-1, 1)[0]
    assert torch.allclose(trip.latents, z[0] * vae.config.scaling_factor, atol=1e-6)
    mse = float(((direct - x) ** 2).mean())
    assert trip.mse == pytest.approx(mse, rel=1e-5)
    assert trip.psnr == pytest.approx(10 * math.log10(4 / mse), rel=1e-5)
    assert torch.allclose(trip.error, (direct - x).abs().mean(0), atol=1e-6)

    sheet, layout = draw_latents(trip)
    channels = vae.config.latent_channels
    assert channels == 4 and layout.cols == 1 + channels + 2  # image, 4 channels, decoded, error
    scale, bound = display_scale(32), float(trip.latents.abs().max())
    panels = [crop(sheet, layout, 0, 1 + c) for c in range(channels)]
    for c, panel in enumerate(panels):
        upsampled = trip.latents[c].repeat_interleave(2, 0).repeat_interleave(2, 1)  # (16, 16) -> (32, 32)
        expected = Image.fromarray(colour_map(upsampled.numpy(), -bound, bound, "RdBu_r"))
        assert np.array_equal(panel, pixels(enlarge(expected, scale)))
    assert all(not np.array_equal(panels[0], panel) for panel in panels[1:])

    sampled = round_trip(vae, image, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = vae.encode_to_latents(x[None], generator=torch.Generator().manual_seed(3))[0]
    assert sampled.sampled and torch.allclose(sampled.latents, expected, atol=1e-6)


# ---------------------------------------------------------------- the commands
@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(random_model(), path)
    return path


def test_viz_commands_write_their_figures(model_file, tmp_path, capsys):
    steps = 2  # the figures' contents are checked above; here, that each command writes them
    common = ["--model", str(model_file), "--steps", str(steps), "--precision", "fp32", "-q"]
    assert main(["viz", "reverse", PROMPT, *common, "-o", str(tmp_path / "r.png")]) == 0
    with Image.open(tmp_path / "r.gif") as gif:
        assert gif.n_frames == steps  # one frame per step
    assert main(["viz", "attention", PROMPT, *common, "--at", "1,2", "--normalise", "all", "-o",
                 str(tmp_path / "a" / "a.png")]) == 0
    with Image.open(tmp_path / "a" / "a.gif") as gif:
        assert gif.n_frames == steps
    assert main(["viz", "guidance", PROMPT, *common, "--at", "2", "-o", str(tmp_path / "g.png")]) == 0
    draw_sample_image(40).save(tmp_path / "in.png")
    assert main(["viz", "latents", str(tmp_path / "in.png"), "--model", str(model_file), "-o",
                 str(tmp_path / "l.png")]) == 0
    printed = capsys.readouterr().out.split()
    for name in ("r.png", "r.gif", "a.png", "a.gif", "g.png", "l.png"):
        assert any(word.endswith(name) for word in printed), name
    assert Image.open(tmp_path / "l.png").size[0] > 7 * 32


def test_viz_forward_is_kedavra_forward():
    """`kedavra viz forward` takes the same flags, --image included, and runs the same function (whose figures
    tests/test_viz_forward.py checks)."""
    argv = ["--image", "cat.png", "--size", "16", "--timesteps", "0,999", "--schedules", "sd", "-o", "out"]
    grouped, plain = build_parser().parse_args(["viz", "forward", *argv]), build_parser().parse_args(["forward", *argv])
    assert grouped.func is plain.func
    assert {k: v for k, v in vars(grouped).items() if k not in ("command", "figure")} == {
        k: v for k, v in vars(plain).items() if k != "command"}


@pytest.mark.parametrize("argv, message", [
    (["viz"], "name a figure"),
    (["viz", "reverse", PROMPT, "-o", "out.jpg"], "must name a .png file"),
    (["viz", "guidance", PROMPT, "--at", "4", "--steps", "3"], "step 4 is not a step of a 3-step run"),
    (["viz", "attention", PROMPT, "--at", "x"], "'x' is not a step number"),
    (["viz", "attention", PROMPT, "--normalise", "max"], "unknown attention normalisation 'max'; allowed: words, all"),
    (["viz", "guidance", PROMPT, "--cfg-scale", "1"], "no guidance to take apart"),
    (["viz", "latents", "missing.png"], "image 'missing.png' does not exist"),
    (["viz", "reverse", PROMPT, "--model", "no-such-model.safetensors"], "no model file or folder"),
])
def test_viz_commands_refuse_bad_input_in_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert message in error[-1] and error[-1].startswith("kedavra viz")
