"""kedavra.training: the objectives, loss weighting and schedules against their papers' formulas, the stage objects'
contract, learning that shows in the loss, bitwise resume, atomic checkpoints, bad input, and the `kedavra train`
command.

Every run trains the "tiny" preset at 16 px (8x8 latents) on `Squares`, a synthetic data set of coloured squares
defined here, in fp32 on one thread, so the tests depend neither on kedavra.data nor on the CPU's bf16 support.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kedavra import cli
from kedavra.checkpoint import load_model
from kedavra.commands.demo import torch_threads
from kedavra.diffusion.forward_process import add_noise, v_from_eps_x0
from kedavra.diffusion.schedule import get_schedule
from kedavra.networks.model import StableDiffusion
from kedavra.networks.vae import SD_LATENT_SCALE
from kedavra.pipeline import device
from kedavra.pipeline.pipeline import Pipeline
from kedavra.training import NonFiniteLossError, TrainConfig, checkpointing, precision, train
from kedavra.training.batches import DataPosition, TrainingData
from kedavra.training.config import STAGE_DEFAULTS
from kedavra.training.ema import EMA, ema_decay_at
from kedavra.training.losses import DiffusionObjective, layout_error, min_snr_weight
from kedavra.training.models import model_config_for
from kedavra.training.optim import learning_rate
from kedavra.training.stages import COMPONENTS, make_stage

IMAGE_SIZE = 16
COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "yellow": (1.0, 1.0, -1.0)}


class Squares(torch.utils.data.Dataset):
    """n items: a coloured half-size square on the left or the right of a black image, "a red square on the left".
    Items listed in `broken` have NaN pixels (for the non-finite-loss tests)."""

    def __init__(self, n: int = 64, size: int = IMAGE_SIZE, broken: tuple[int, ...] = ()):
        self.n, self.size, self.broken = n, size, set(broken)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        colour = list(COLOURS)[i % len(COLOURS)]
        side = "left" if (i // len(COLOURS)) % 2 == 0 else "right"
        image = torch.full((3, self.size, self.size), -1.0)
        half = self.size // 2
        top = (3 * i) % (self.size - half)
        left = 0 if side == "left" else self.size - half
        image[:, top : top + half, left : left + half] = torch.tensor(COLOURS[colour])[:, None, None]
        if i in self.broken:
            image[:] = math.nan
        return {"image": image, "caption": f"a {colour} square on the {side}"}


def small_config(out_dir, **changes) -> TrainConfig:
    """A fast run: fp32, small batches, no sample grids, a log line per step."""
    values = dict(data="squares", image_size=IMAGE_SIZE, stage="vae", steps=4, batch_size=8, lr=1e-3, warmup_steps=2,
                  precision="fp32", sample_interval=0, checkpoint_interval=0, log_interval=1, out_dir=str(out_dir))
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors; one thread keeps the timings steady on a shared 2-core machine (and the bits identical)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    """A VAE trained for 20 steps (the unet stage's frozen VAE; any VAE will do for it); its exported model."""
    out = tmp_path_factory.mktemp("vae")
    with torch_threads(1):
        result = train(small_config(out, steps=20, lr=2e-3), dataset=Squares())[0]
    return result.model_path


# ---- the math -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_min_snr_weight_is_the_papers_formula(prediction_type):
    """Hang et al. 2023, sec. 3.4: w = min(SNR, γ)/SNR (ε), min(SNR, γ)/(SNR + 1) (v), SNR = ᾱ/(1-ᾱ), computed
    directly in float64 at every timestep of SD's schedule, against the closed forms in ᾱ the code uses."""
    gamma = 5.0
    alpha_bar = get_schedule("sd").alpha_bar
    snr = alpha_bar / (1 - alpha_bar)
    expected = snr.clamp(max=gamma) / (snr if prediction_type == "eps" else snr + 1)
    torch.testing.assert_close(min_snr_weight(alpha_bar, gamma, prediction_type), expected, rtol=1e-12, atol=0)


def test_min_snr_weight_is_finite_at_zero_snr():
    """At ᾱ = 0 (the last step of a zero-terminal-SNR schedule) the limits: ε-weight min(SNR, γ)/SNR -> 1,
    v-weight min(SNR, γ)/(SNR + 1) = 0; every step of "sd-zero-snr" gets a finite weight in [0, 1]."""
    alpha_bar = get_schedule("sd-zero-snr").alpha_bar
    assert alpha_bar[-1] == 0
    for prediction_type, at_zero in (("eps", 1.0), ("v", 0.0)):
        weights = min_snr_weight(alpha_bar, 5.0, prediction_type)
        assert torch.isfinite(weights).all() and (weights >= 0).all() and (weights <= 1).all()
        assert weights[-1] == at_zero


def test_min_snr_floor_keeps_the_x0_weight_at_least_the_floor():
    """The floor F: the x_0 weight max(min(SNR, γ), F) divided by SNR + 1 (v), in float64 against the closed form;
    F = 1 is truncated SNR (Salimans and Ho 2022) below SNR 1, plain min-SNR-γ above; finite (F) at SNR 0."""
    for name in ("sd", "sd-zero-snr"):
        alpha_bar = get_schedule(name).alpha_bar
        snr = alpha_bar / (1 - alpha_bar)
        for floor in (0.5, 1.0, 5.0):
            expected = snr.clamp(max=5.0).clamp(min=floor) / (snr + 1)
            weights = min_snr_weight(alpha_bar, 5.0, "v", floor)
            torch.testing.assert_close(weights, expected, rtol=1e-12, atol=0)
    sd = get_schedule("sd").alpha_bar
    high = sd / (1 - sd) >= 1
    assert torch.equal(min_snr_weight(sd, 5.0, "v", 1.0)[high], min_snr_weight(sd, 5.0, "v")[high])
    assert min_snr_weight(get_schedule("sd-zero-snr").alpha_bar, 5.0, "v", 1.0)[-1] == 1
    with pytest.raises(ValueError, match="floor is defined for 'v' prediction"):
        min_snr_weight(sd, 5.0, "eps", 1.0)


@pytest.mark.parametrize(("changes", "message"), [
    ({"min_snr_floor": 1.0}, r"is for v prediction \(--prediction-type v\).*got prediction type 'eps'"),
    ({"min_snr_floor": 1.0, "prediction_type": "v", "min_snr_gamma": None}, "give a γ too"),
    ({"min_snr_floor": 6.0, "prediction_type": "v"}, r"min_snr_floor must be a number in \(0.0, 5.0\], got 6.0"),
    ({"min_snr_floor": 0, "prediction_type": "v"}, r"min_snr_floor must be a number in \(0.0, 5.0\], got 0"),
])
def test_min_snr_floor_is_checked(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path, stage="unet", vae="v.safetensors", **changes)
    assert small_config(tmp_path, stage="unet", vae="v.safetensors", prediction_type="v",
                        min_snr_floor=1.0).min_snr_floor == 1.0


class ZeroDenoiser(torch.nn.Module):
    """Predicts 0 whatever it sees, and remembers what it saw: the loss is then w_t · mean(target²)."""

    def forward(self, x_t, t, input_ids):
        self.seen = (x_t, t, input_ids)
        return torch.zeros_like(x_t)


@pytest.mark.parametrize(
    ("prediction_type", "gamma", "expected"),
    [
        ("eps", None, [9.0, 1.0, 4.0, 1.0]),  # c²
        ("eps", 2.0, [9.0, 0.5, 4.0, 1.0]),  # c² · min(SNR, 2)/SNR, SNR = 1, 4, 0 (weight 1), 0.25
        ("v", None, [2.0, 0.2, 4.0, 1.8]),  # (√ᾱ c - √(1-ᾱ) a)²
        ("v", 2.0, [1.0, 0.08, 0.0, 0.36]),  # times min(SNR, 2)/(SNR + 1) = 1/2, 2/5, 0, 1/5
    ],
)
def test_diffusion_objective_is_weighted_l_simple(prediction_type, gamma, expected):
    """DDPM eq. 14 per sample, by hand: ᾱ = 0.5, 0.8, 0, 0.2 at t = 0..3, x_0 = a and ε = c constant per sample
    (a = 1, 1, 2, -1; c = 3, 1, 2, 1); a denoiser that predicts 0 leaves w_t · mean(target²), target ε = c or
    v = √ᾱ ε - √(1-ᾱ) x_0 (Salimans and Ho 2022, eq. 6), weighted by min-SNR-γ (Hang et al. 2023) where γ is
    given. The denoiser sees x_t = √ᾱ x_0 + √(1-ᾱ) ε (DDPM eq. 4): 2√2 for the first sample."""
    alpha_bar = torch.tensor([0.5, 0.8, 0.0, 0.2])
    x0 = torch.tensor([1.0, 1.0, 2.0, -1.0])[:, None, None, None].expand(4, 1, 2, 2)  # (B, C, h, w)
    noise = torch.tensor([3.0, 1.0, 2.0, 1.0])[:, None, None, None].expand(4, 1, 2, 2)
    t, ids = torch.arange(4), torch.zeros(4, 3, dtype=torch.long)
    objective = DiffusionObjective(ZeroDenoiser(), alpha_bar, prediction_type, gamma)
    values = objective(x0=x0, noise=noise, t=t, input_ids=ids)
    assert list(values) == ["loss"]
    torch.testing.assert_close(values["loss"], torch.tensor(expected))
    x_t, seen_t, seen_ids = objective.denoiser.seen
    torch.testing.assert_close(x_t[0], torch.full((1, 2, 2), 2 * math.sqrt(2)))
    assert torch.equal(seen_t, t) and torch.equal(seen_ids, ids)


def test_diffusion_objective_with_a_min_snr_floor():
    """The same samples as above, v, γ = 2, floor 1: the x_0 weight max(min(SNR, 2), 1) over SNR + 1 is 1/2, 2/5 as
    without the floor, and 1 and 4/5 (not 0 and 1/5) at SNR 0 and 0.25, times v² = 2, 0.2, 4, 1.8."""
    alpha_bar = torch.tensor([0.5, 0.8, 0.0, 0.2])
    x0 = torch.tensor([1.0, 1.0, 2.0, -1.0])[:, None, None, None].expand(4, 1, 2, 2)
    noise = torch.tensor([3.0, 1.0, 2.0, 1.0])[:, None, None, None].expand(4, 1, 2, 2)
    objective = DiffusionObjective(ZeroDenoiser(), alpha_bar, "v", 2.0, min_snr_floor=1.0)
    values = objective(x0=x0, noise=noise, t=torch.arange(4), input_ids=torch.zeros(4, 3, dtype=torch.long))
    torch.testing.assert_close(values["loss"], torch.tensor([1.0, 0.08, 4.0, 1.44]))


def test_layout_error_is_the_pooled_x0_error():
    """x̂_0 - x_0 = -√((1-ᾱ)/ᾱ) (ε̂ - ε) for ε prediction (DDIM eq. 9): an ε error constant over the latent, c, gives
    the pooled squared error c²(1-ᾱ)/ᾱ; a checkerboard ±c, which every 2 x 2 cell averages away, gives 0, however
    large; v prediction's x̂_0 - x_0 = -√(1-ᾱ) (v̂ - v) (Salimans and Ho 2022, sec. 4)."""
    alpha_bar = torch.tensor([0.5, 0.2, 0.01])
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    x_t = add_noise(x0, noise, alpha_bar)
    c = torch.tensor([1.0, -2.0, 0.5])[:, None, None, None]
    expected = c.flatten() ** 2 * (1 - alpha_bar) / alpha_bar
    torch.testing.assert_close(layout_error(noise + c, x_t, x0, alpha_bar, "eps", 4), expected)
    checkerboard = (torch.arange(8)[:, None] + torch.arange(8)) % 2 * 2 - 1  # (8, 8) of ±1
    assert layout_error(noise + 100 * checkerboard, x_t, x0, alpha_bar, "eps", 4).abs().max() < 1e-6
    v = v_from_eps_x0(noise, x0, alpha_bar)
    torch.testing.assert_close(layout_error(v + c, x_t, x0, alpha_bar, "v", 1), c.flatten() ** 2 * (1 - alpha_bar))


def test_diffusion_objective_adds_the_layout_term():
    """loss = the weighted L_simple + λ · layout error, with "layout" (the λ-weighted term) returned beside it; a
    ZeroDenoiser's ε̂ = 0 puts x̂_0 = x_t/√ᾱ: for constant x_0 = a and ε = c per sample the pooled error is
    (1-ᾱ)/ᾱ · c². An ε model on a zero-terminal-SNR schedule is refused (x̂_0 needs ᾱ > 0)."""
    alpha_bar = torch.tensor([0.5, 0.8, 0.25, 0.2])
    x0 = torch.tensor([1.0, 1.0, 2.0, -1.0])[:, None, None, None].expand(4, 1, 4, 4)
    noise = torch.tensor([3.0, 1.0, 2.0, 1.0])[:, None, None, None].expand(4, 1, 4, 4)
    ids = torch.zeros(4, 3, dtype=torch.long)
    plain = DiffusionObjective(ZeroDenoiser(), alpha_bar, "eps", 2.0)(x0=x0, noise=noise, t=torch.arange(4),
                                                                      input_ids=ids)
    objective = DiffusionObjective(ZeroDenoiser(), alpha_bar, "eps", 2.0, layout_weight=0.5, layout_grid=2)
    values = objective(x0=x0, noise=noise, t=torch.arange(4), input_ids=ids)
    layout = 0.5 * torch.tensor([9.0, 0.25, 12.0, 4.0])  # λ · c² (1-ᾱ)/ᾱ
    assert list(values) == ["loss", "layout"]
    torch.testing.assert_close(values["layout"], layout)
    torch.testing.assert_close(values["loss"], plain["loss"] + layout)
    with pytest.raises(ValueError, match="zero terminal SNR, so train it with v prediction"):
        DiffusionObjective(ZeroDenoiser(), get_schedule("sd-zero-snr").alpha_bar, "eps", 5.0, layout_weight=1.0)


@pytest.mark.parametrize(("changes", "message"), [
    ({"layout_loss": 0.0}, "layout_loss must be a finite number > 0.0, got 0.0"),
    ({"layout_loss": -1.0}, "layout_loss must be a finite number > 0.0, got -1.0"),
    ({"layout_grid": 2}, r"layout_grid=2 \(--layout-grid\) is the layout loss's grid; layout_loss is None"),
    ({"layout_loss": 1.0, "layout_grid": 0}, "layout_grid must be an integer >= 1, got 0"),
    ({"layout_loss": 1.0, "stage": "vae", "vae": None}, "is a term of the diffusion loss, for stage 'unet' or 'all'"),
])
def test_layout_loss_is_checked(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path, **{"stage": "unet", "vae": "v.safetensors", **changes})
    config = small_config(tmp_path, stage="unet", vae="v.safetensors", layout_loss=0.5, layout_grid=2)
    assert (config.layout_loss, config.layout_grid) == (0.5, 2)


def test_auto_precision_is_bf16_where_the_cpu_computes_it(monkeypatch):
    """"auto" resolves to bf16 on a CPU with native bf16 (AMX or AVX-512 BF16) and to fp32 on one without, where
    bf16 is emulated; an explicit precision is kept either way."""
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda native=native: native)
        assert precision.resolve_precision("auto", torch.device("cpu")) == expected
        assert [precision.resolve_precision(p, torch.device("cpu")) for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    assert TrainConfig().precision == "auto"


def test_learning_rate_warmup_and_cosine():
    """Linear warm-up to lr over warmup_steps, then constant, or cosine down to min_lr_ratio·lr at the last step."""
    common = dict(lr=1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert learning_rate(0, schedule="constant", **common) == pytest.approx(1e-4)  # lr · 1/10
    assert learning_rate(4, schedule="constant", **common) == pytest.approx(5e-4)
    assert learning_rate(9, schedule="constant", **common) == pytest.approx(1e-3)
    assert learning_rate(100, schedule="constant", **common) == 1e-3
    assert learning_rate(10, schedule="cosine", **common) == pytest.approx(1e-3)  # cos(0) = 1
    assert learning_rate(59.5, schedule="cosine", **common) == pytest.approx(0.55e-3)  # halfway: (0.1 + 1) / 2
    assert learning_rate(109, schedule="cosine", **common) == pytest.approx(1e-4)  # the last step: min_lr_ratio·lr


def test_ema_warmup_and_update():
    """LitEma's decay min(decay, (1+n)/(10+n)): 0.1 at the first update, 0.5 at the ninth; the update is
    θ_ema <- d·θ_ema + (1-d)·θ."""
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(8, 0.999) == pytest.approx(0.5)
    assert ema_decay_at(10**6, 0.999) == 0.999
    param = torch.nn.Parameter(torch.tensor([2.0]))
    ema = EMA({"w": param}, decay=0.999)
    with torch.no_grad():
        param.fill_(4.0)
    assert ema.update() == pytest.approx(0.1)
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([0.1 * 2.0 + 0.9 * 4.0]))


# ---- the stages ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "trained", "draws", "parts"),
    [
        ("vae", ("vae",), ["posterior"], ("recon", "kl")),
        ("unet", ("text_encoder", "unet"), ["t", "noise", "drop", "posterior"], ()),
    ],
)
def test_stage_objects_keep_their_contract(tmp_path, stage, trained, draws, parts):
    """A stage trains the components it names (the others frozen, in eval mode, outside the optimizer's
    parameters), draws a global batch's random numbers in its fixed order, each with the batch first, and turns
    the items into its objective's arguments; the objective returns per-sample values, "loss" and the parts the
    stage logs, each (B,)."""
    config = small_config(tmp_path, stage=stage, vae="v.safetensors" if stage == "unet" else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = StableDiffusion(model_config_for(config))
    data = TrainingData(Squares(), IMAGE_SIZE, config.batch_size, config.seed)
    runner = make_stage(config, model, data, torch.device("cpu"))
    runner.freeze_untrained()
    assert runner.name == stage and runner.trained_components == trained and runner.parts == parts
    for part in COMPONENTS:
        module = getattr(model, part)
        assert module.training == (part in trained)
        assert all(p.requires_grad == (part in trained) for p in module.parameters())
    assert set(runner.trained_parameters()) == {name for name, _ in model.named_parameters()
                                                if name.split(".")[0] in trained}
    drawn = runner.draws(config.batch_size, torch.Generator().manual_seed(0))
    assert list(drawn) == draws and all(d.shape[0] == config.batch_size for d in drawn.values())
    runner.prepare(progress=False)
    values = runner.objective()(**runner.inputs(data.indices(DataPosition()), drawn))
    assert list(values) == ["loss", *parts]
    assert all(v.shape == (config.batch_size,) and torch.isfinite(v).all() for v in values.values())


# ---- the config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"stage": "decoder"}, "unknown stage 'decoder'; allowed: vae, unet, all"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"lr": -1e-4}, r"lr must be a .*number in \(0.0, 1.0\], got -0.0001"),
        ({"lr": math.nan}, r"lr must be a .*number in \(0.0, 1.0\], got nan"),
        ({"batch_size": 6, "accumulation": 4}, "batch_size 6 must be a multiple of accumulation 4"),
        ({"caption_dropout": 1.0}, r"caption_dropout must be a number in \[0.0, 1.0\), got 1.0"),
        ({"preset": "tiny-inpaint"}, "inpainting"),
        ({"image_size": 18}, "image_size must be a multiple of 4"),
        ({"stage": "unet"}, "stage 'unet' needs `vae`"),
        ({"precision": "fp16"}, "unknown precision 'fp16'; allowed: auto, fp32, bf16"),
        ({"schedule": "sd-zero-snr", "stage": "vae"}, "use prediction_type 'v'"),
        ({"ema_decay": 1.0}, r"ema_decay must be a number in \[0.0, 1.0\), got 1.0"),
        ({"seed": 2**32}, "seed must be an integer from 0 to 4294967295, got 4294967296"),
        ({"latent_cache": 1}, "latent_cache must be True or False, got 1"),
    ],
)
def test_config_rejects_bad_values(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path, **changes)


def test_config_round_trip_and_stage_defaults(tmp_path):
    config = small_config(tmp_path, sample_prompts=("a red square",))
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    vae = TrainConfig(stage="vae")
    assert (vae.steps, vae.batch_size, vae.lr) == (STAGE_DEFAULTS["vae"].steps, STAGE_DEFAULTS["vae"].batch_size,
                                                   STAGE_DEFAULTS["vae"].lr)
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"learning_rate": 1e-4})
    numpy_values = small_config(tmp_path, steps=np.int64(5), lr=np.float32(0.5))  # stored as plain numbers
    assert (type(numpy_values.steps), type(numpy_values.lr)) == (int, float) and json.dumps(numpy_values.to_dict())


# ---- learning -------------------------------------------------------------------------------------------------


def test_vae_learns(tmp_path):
    """The VAE's loss (L1 per pixel value + β·KL/D) falls at least 3x within 60 steps: from ~0.97 at the first step
    (a random decoder) to 0.22 over the last ten (measured)."""
    result = train(small_config(tmp_path, steps=60, lr=2e-3), dataset=Squares())[0]
    first, last = result.losses[0], sum(result.losses[-10:]) / 10
    assert first / last > 3, (first, last)


def test_unet_learns(tmp_path, trained_vae):
    """The U-Net and text encoder's min-SNR-weighted ε loss falls at least 3x within 60 steps: from 0.90 at the
    first step (the zero-initialised output layer predicts ε = 0) to 0.20 over the last ten (measured)."""
    config = small_config(tmp_path, stage="unet", vae=str(trained_vae), steps=60)
    result = train(config, dataset=Squares())[0]
    first, last = result.losses[0], sum(result.losses[-10:]) / 10
    assert first / last > 3, (first, last)


def test_a_run_with_the_layout_loss_logs_its_term(tmp_path, trained_vae):
    """--layout-loss: the unet stage names "layout" among its parts, and metrics.jsonl logs the weighted term's
    interval mean beside the loss, which includes it (so the loss exceeds it)."""
    config = small_config(tmp_path, stage="unet", vae=str(trained_vae), steps=4, layout_loss=2.0, layout_grid=2)
    train(config, dataset=Squares())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "layout" in row]
    assert logged and all(0 < row["layout"] < row["loss"] and math.isfinite(row["layout"]) for row in logged)


def test_v_prediction_on_zero_terminal_snr(tmp_path, trained_vae):
    """v-prediction with min-SNR-γ on a zero-terminal-SNR schedule (t = 999 has SNR 0) trains with finite losses,
    and the exported model says how it was trained, sampling from the last timestep (trailing spacing, Lin et al.
    2023, sec. 3.3)."""
    config = small_config(tmp_path, stage="unet", vae=str(trained_vae), steps=3, batch_size=16,
                          prediction_type="v", schedule="sd-zero-snr")
    result = train(config, dataset=Squares())[0]
    assert result.skipped == 0 and all(math.isfinite(x) for x in result.losses)
    model = load_model(result.model_path)
    assert model.config.prediction_type == "v" and model.config.schedule == get_schedule("sd-zero-snr")
    assert (model.config.spacing, model.config.steps_offset) == ("trailing", 0)


# ---- resume, checkpoints, artifacts ------------------------------------------------------------------------------


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(path)


def _losses(run_dir) -> list[float]:
    return [row["loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("stage", ["vae", "unet"])
def test_resume_is_bitwise(tmp_path, stage, trained_vae):
    """Stopped after 3 steps and resumed to 7, a run ends with the same bits as one that never stopped: the model,
    the EMA weights, the exported model and every logged loss (on the CPU, torch.equal)."""
    changes = {"vae": str(trained_vae), "caption_dropout": 0.5} if stage == "unet" else {}
    config = small_config(tmp_path / "straight", stage=stage, steps=7, **changes)
    straight = train(config, dataset=Squares())[0]
    interrupted_dir = tmp_path / "interrupted"
    config = small_config(interrupted_dir, stage=stage, steps=7, **changes)
    first = train(config, dataset=Squares(), stop_after=3)[0]
    assert (first.step, first.finished, first.model_path) == (3, False, None)
    second = train(config, dataset=Squares())[0]
    assert second.finished and len(second.losses) == 4
    assert first.losses + second.losses == straight.losses
    for name in ("latest/model.safetensors", "latest/ema.safetensors", "model.safetensors"):
        a, b = _weights(tmp_path / "straight" / name), _weights(interrupted_dir / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert _losses(interrupted_dir) == _losses(tmp_path / "straight")


def test_checkpoint_write_crash_keeps_latest(tmp_path, monkeypatch):
    """A crash while checkpoint 4 is written leaves `latest` on checkpoint 2, complete; the run resumes from it."""
    config = small_config(tmp_path, steps=4, checkpoint_interval=2)
    train(config, dataset=Squares(), stop_after=2)
    before = os.readlink(tmp_path / "latest")

    def crash(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(checkpointing.os, "rename", crash)  # the move of the finished folder into place
    with pytest.raises(OSError, match="disk on fire"):
        train(config, dataset=Squares())
    monkeypatch.undo()
    assert os.readlink(tmp_path / "latest") == before
    assert not list((tmp_path / "checkpoints").glob(".*partial*"))  # the half-written folder was removed
    checkpoint = checkpointing.load_checkpoint(checkpointing.find_checkpoint(tmp_path))
    assert checkpoint.state["step"] == 2
    assert train(config, dataset=Squares())[0].step == 4


def test_run_folder_artifacts(tmp_path, trained_vae):
    """A unet run writes metrics.jsonl, loss.png, sample grids, pruned checkpoints and an exported EMA model that
    the Pipeline samples from; the exported VAE carries its measured latent scale (LDM sec. 4.3.2), not SD's."""
    config = small_config(tmp_path, stage="unet", vae=str(trained_vae), steps=4, checkpoint_interval=1,
                          keep_checkpoints=2, sample_interval=2, sample_prompts=("a red square on the left",))
    result = train(config, dataset=Squares())[0]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(row["images_per_s"] > 0 and row["lr"] > 0 and row["skipped"] == 0 for row in rows)
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_00000002.png", "step_00000004.png"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]
    assert os.readlink(tmp_path / "latest") == os.path.join("checkpoints", "step_00000004")
    model = load_model(result.model_path)
    vae_scale = load_model(trained_vae).config.vae.scaling_factor
    assert model.config.vae.scaling_factor == vae_scale != SD_LATENT_SCALE
    assert model.config.image_size == IMAGE_SIZE
    image = Pipeline(model, dtype="fp32")("a red square on the left", steps=2, seed=0).images[0]
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_accumulation_matches_one_big_batch(tmp_path):
    """Two micro-steps of 4 give the weights of one step of 8 (the same global batch and draws) up to float rounding
    of the split sums, amplified by AdamW as in tests/test_training_ddp.py: max |Δ| measured 4.1e-6 after 3 steps at
    lr 1e-3, allowed 1e-5 (1% of lr); the losses agree within 1e-5 relative."""
    one = train(small_config(tmp_path / "one", steps=3), dataset=Squares())[0]
    two = train(small_config(tmp_path / "two", steps=3, accumulation=2), dataset=Squares())[0]
    a, b = _weights(one.checkpoint / "model.safetensors"), _weights(two.checkpoint / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    torch.testing.assert_close(torch.tensor(two.losses), torch.tensor(one.losses), rtol=1e-5, atol=0)


def test_gradient_checkpointing_changes_nothing(tmp_path, trained_vae):
    """Recomputing the U-Net's blocks in the backward pass gives the same weights (deterministic recomputation)."""
    results = [train(small_config(tmp_path / str(flag), stage="unet", vae=str(trained_vae), steps=2,
                                  gradient_checkpointing=flag), dataset=Squares())[0] for flag in (False, True)]
    plain, recomputed = (_weights(r.checkpoint / "model.safetensors") for r in results)
    assert all(torch.equal(plain[k], recomputed[k]) for k in plain)


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_nonfinite_steps_are_skipped(tmp_path):
    """A batch with a NaN image gives a NaN loss: the step is skipped (weights untouched), counted and logged."""
    data = Squares(broken=(5,))
    result = train(small_config(tmp_path, steps=8), dataset=data)[0]
    assert 1 <= result.skipped < 8
    assert sum(math.isnan(x) for x in result.losses) == result.skipped
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped"] == result.skipped
    assert any(row["loss"] is None for row in rows)
    assert all(torch.isfinite(t).all() for t in _weights(tmp_path / "model.safetensors").values())


def test_nonfinite_run_stops_with_error(tmp_path):
    """All-NaN data: after max_nonfinite consecutive skipped steps the run stops with an error naming the step,
    and the untouched (initial) weights are saved in a checkpoint."""
    config = small_config(tmp_path, steps=10, max_nonfinite=3)
    with pytest.raises(NonFiniteLossError, match=r"stopped at step 3: .* 3 consecutive steps \(steps 1-3\)"):
        train(config, dataset=Squares(broken=tuple(range(64))))
    checkpoint = checkpointing.load_checkpoint(checkpointing.find_checkpoint(tmp_path))
    assert checkpoint.state["skipped"] == 3
    assert all(torch.isfinite(t).all() for t in checkpoint.model_state.values())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (Squares(n=0), "the data set is empty"),
        (Squares(n=5), "the data set has 5 items, fewer than one batch of 8"),
        ([{"image": torch.zeros(3, 8, 8), "caption": "x"}] * 8, r"must be a float tensor of shape \(3, 16, 16\)"),
        ([{"picture": torch.zeros(3, 16, 16)}] * 8, "must be a dict with 'image' and 'caption'"),
    ],
)
def test_bad_data_is_refused(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        train(small_config(tmp_path), dataset=data)
    assert not (tmp_path / "latest").exists()


def test_resume_with_another_config_names_the_fields(tmp_path):
    train(small_config(tmp_path, steps=2), dataset=Squares())
    with pytest.raises(ValueError, match=r"differs in 2 field\(s\): batch_size: checkpoint 8, now 16; lr: checkpoint "
                                         r"0.001, now 0.002"):
        train(small_config(tmp_path, steps=2, batch_size=16, lr=2e-3), dataset=Squares())
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(small_config(tmp_path, steps=2), dataset=Squares(), resume=False)
    with pytest.raises(ValueError, match="its data set had 64 items, this one has 72"):
        train(small_config(tmp_path, steps=3), dataset=Squares(n=72))
    assert checkpointing.load_checkpoint(checkpointing.find_checkpoint(tmp_path)).state["step"] == 2  # untouched


# ---- the command -------------------------------------------------------------------------------------------------


def test_train_command_stops_resumes_and_refuses(tmp_path, monkeypatch, capsys):
    """`kedavra train` (stage all on Squares): --stop-after, then --resume DIR alone finishes both stages with the
    stored settings; --resume of the unet stage's folder with more --steps trains on; a conflicting flag on resume
    exits with status 2 and names the field."""
    monkeypatch.setattr("kedavra.training.loop.open_dataset", lambda *a, **k: Squares())
    out = tmp_path / "run"
    flags = ["train", "--image-size", "16", "--vae-steps", "2", "--steps", "2", "--batch-size", "8", "--precision",
             "fp32", "--sample-interval", "0", "--no-progress", "-o", str(out)]
    assert cli.main([*flags, "--stop-after", "1"]) == 0
    assert "stopped at step 1" in capsys.readouterr().out
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished at step 2") == 2
    assert (out / "vae" / "model.safetensors").is_file() and (out / "unet" / "model.safetensors").is_file()
    assert cli.main(["train", "--resume", str(out / "unet"), "--steps", "3", "--no-progress"]) == 0  # train longer
    assert "finished at step 3" in capsys.readouterr().out
    assert cli.main(["train", "--resume", str(out), "--lr", "0.5", "--no-progress"]) == 2
    assert "lr: checkpoint 0.0004, now 0.5" in capsys.readouterr().err
    assert cli.main(["train", "--steps", "0", "-o", str(tmp_path / "bad")]) == 2
    assert "steps must be an integer >= 1, got 0" in capsys.readouterr().err


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capsys):
    """A truncated latest/model.safetensors (a crash mid-copy, a full disk): resuming says so in one line and
    continues from the step before; with every checkpoint damaged it is a ValueError naming them, no traceback."""
    train(small_config(tmp_path, steps=3, checkpoint_interval=1, keep_checkpoints=3), dataset=Squares())
    latest = checkpointing.find_checkpoint(tmp_path)
    assert latest.name.endswith("3")
    weights = latest / checkpointing.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    train(small_config(tmp_path, steps=4, checkpoint_interval=1, keep_checkpoints=3), dataset=Squares())
    note = capsys.readouterr().err
    assert "cannot read checkpoint" in note and "resuming from the newest intact checkpoint" in note
    assert note.count("\n") == 1  # one line
    for folder in (tmp_path / checkpointing.CHECKPOINTS_DIR).iterdir():
        if folder.is_dir():
            (folder / checkpointing.STATE_FILE).write_bytes(b"broken")
    with pytest.raises(ValueError, match="no intact checkpoint to resume"):
        train(small_config(tmp_path, steps=5, checkpoint_interval=1, keep_checkpoints=3), dataset=Squares())


def test_skip_bad_reaches_an_image_folder_and_is_refused_for_built_in_data(tmp_path):
    from PIL import Image

    from kedavra.training.batches import open_dataset

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red square")
    (folder / "broken.png").write_text("not an image")
    (folder / "broken.txt").write_text("a caption")
    with pytest.raises(ValueError, match="kedavra train --skip-bad"):
        open_dataset(str(folder), 16, 0)
    with pytest.warns(UserWarning):
        assert len(open_dataset(str(folder), 16, 0, skip_bad=True)) == 3
    with pytest.raises(ValueError, match="skip_bad applies to an image folder, not the built-in data set 'shapes'"):
        open_dataset("shapes", 16, 0, skip_bad=True)
    assert cli.build_parser().parse_args(["train", "--skip-bad"]).skip_bad is True
