"""The two-cluster toy: the exact denoiser against Monte Carlo and Tweedie's formula, the forward marginals
against samples, an MLP that provably learns, the convergence study, and the `demo` / `convergence` commands."""

import pytest
import torch
from PIL import Image

from kedavra import cli
from kedavra.commands.demo import torch_threads
from kedavra.diffusion.forward_process import add_noise, to_x0_eps
from kedavra.diffusion.samplers import sample
from kedavra.diffusion.schedule import get_schedule
from kedavra.toy.convergence import (
    ConvergenceConfig,
    fit_order,
    markdown_report,
    random_directions,
    run_convergence,
    sliced_wasserstein,
    steps_for_budget,
)
from kedavra.toy.mixture import (
    TWO_MODES,
    ExactModel,
    GaussianMixture,
    alpha_bar_of,
    denoise,
    expected_fraction_between,
    fraction_between,
)
from kedavra.toy.mlp import ToyMLP, ToyMLPConfig, ToyTrainConfig, build_toy_mlp, train_toy_mlp

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # PNG spec (ISO/IEC 15948), sec. 5.2


@pytest.fixture(autouse=True)
def one_thread():
    """The toy's tensors are tiny; one thread keeps the timings steady on a shared machine."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def data_samples():
    return TWO_MODES.sample(400_000, torch.Generator().manual_seed(0), dtype=torch.float64)


# x_t = √ᾱ c + √(1-ᾱ) z for these c: on a mode, in the gap between the modes, beyond a mode
POINTS = torch.tensor([[-2.1, 0.2], [1.0, -0.3], [2.4, 0.5]], dtype=torch.float64)
OFFSET = torch.tensor([0.5, -0.7], dtype=torch.float64)


@pytest.mark.parametrize("alpha_bar", [1e-4, 0.1, 0.5, 0.9, 0.999])
def test_exact_denoiser_matches_monte_carlo(alpha_bar, data_samples):
    """E[x_0 | x_t] and E[ε | x_t] by self-normalised importance sampling: x_0 from the data, weights
    q(x_t | x_0) = N(√ᾱ x_0, (1-ᾱ) I) (DDPM eq. 4). Agreement within 5 Monte Carlo standard errors."""
    x_t = alpha_bar**0.5 * POINTS + (1 - alpha_bar) ** 0.5 * OFFSET
    x0_exact, eps_exact = denoise(TWO_MODES, x_t, alpha_bar)
    for i in range(len(x_t)):
        residual = x_t[i] - alpha_bar**0.5 * data_samples  # √(1-ᾱ) ε for each x_0, (M, 2)
        weights = torch.softmax(-residual.square().sum(1) / (2 * (1 - alpha_bar)), dim=0)  # (M,)
        effective = 1 / weights.square().sum()
        assert effective > 50, f"too few effective samples ({effective:.0f}) for a meaningful check"
        for values, exact in ((data_samples, x0_exact[i]), (residual / (1 - alpha_bar) ** 0.5, eps_exact[i])):
            mean = weights @ values
            std_error = (weights.square() @ (values - mean).square()).sqrt()
            assert (mean - exact).abs().le(5 * std_error + 1e-6).all(), (alpha_bar, i, mean, exact, std_error)


@pytest.mark.parametrize("alpha_bar", [0.0, 1e-6, 0.3, 0.99, 1 - 1e-9, 1.0])
def test_exact_denoiser_is_tweedie(alpha_bar):
    """Tweedie's formula (Efron 2011; Karras et al. 2022, eq. 3): E[ε | x_t] = -√(1-ᾱ) ∇ log p_t(x_t) and E[x_0 | x_t] =
    (x_t + (1-ᾱ) ∇ log p_t(x_t)) / √ᾱ, with p_t the forward marginal, differentiated by autograd."""
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    x.requires_grad_(True)
    score = torch.autograd.grad(TWO_MODES.marginal(alpha_bar).log_prob(x).sum(), x)[0]
    x = x.detach()
    x0, eps = denoise(TWO_MODES, x, alpha_bar)
    assert torch.isfinite(x0).all() and torch.isfinite(eps).all()
    torch.testing.assert_close(eps, -((1 - alpha_bar) ** 0.5) * score, rtol=1e-9, atol=1e-12)
    if alpha_bar >= 1e-3:
        torch.testing.assert_close(x0, (x + (1 - alpha_bar) * score) / alpha_bar**0.5, rtol=1e-9, atol=1e-9)


def test_exact_denoiser_at_the_ends():
    """ᾱ = 1: nothing to remove (x̂_0 = x_t, ε̂ = 0). ᾱ = 0: x_t is pure noise (ε̂ = x_t) and x̂_0 is the data mean.
    Both without NaN, in float32 too, far from the data (log-sum-exp keeps the weights finite)."""
    x = torch.tensor([[0.3, -0.2], [50.0, -40.0], [-1e3, 1e3]])
    x0, eps = denoise(TWO_MODES, x, 1.0)
    assert torch.equal(x0, x) and torch.equal(eps, torch.zeros_like(x))
    x0, eps = denoise(TWO_MODES, x, 0.0)
    torch.testing.assert_close(eps, x)
    torch.testing.assert_close(x0, torch.zeros_like(x))
    zero_snr = get_schedule("sd-zero-snr")
    t = torch.tensor([999.0, 999.0, 0.0])
    for prediction_type in ("eps", "x0", "v"):
        assert torch.isfinite(ExactModel(TWO_MODES, zero_snr, prediction_type)(x, t)).all()


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_exact_model_outputs_agree(prediction_type):
    """All three prediction types give the same (x̂_0, ε̂), and x_t = √ᾱ x̂_0 + √(1-ᾱ) ε̂ (DDPM eq. 4 holds for the
    posterior means, both sides being linear)."""
    schedule = get_schedule("ddpm")
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.linspace(0, 999, 32).round()
    alpha_bar = schedule.alpha_bar[t.long()]
    x0, eps = denoise(TWO_MODES, x, alpha_bar)
    torch.testing.assert_close(add_noise(x0, eps, alpha_bar), x, rtol=1e-10, atol=1e-10)
    output = ExactModel(TWO_MODES, schedule, prediction_type)(x, t)
    x0_from, eps_from = to_x0_eps(output, x, alpha_bar, prediction_type)
    torch.testing.assert_close(x0_from, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_from, eps, rtol=1e-9, atol=1e-9)


def test_alpha_bar_of_integer_and_fractional_steps():
    """Integer t read the table exactly; fractional t interpolate like the samplers' Karras steps."""
    schedule = get_schedule("sd")
    t = torch.tensor([0.0, 500.0, 500.25, 999.0])
    ab = alpha_bar_of(schedule, t)
    assert ab[[0, 1, 3]].tolist() == schedule.alpha_bar[[0, 500, 999]].tolist()
    assert ab[2] == schedule.alpha_bar_at(torch.tensor([500.25]))[0]
    with pytest.raises(ValueError, match="timesteps must lie"):
        alpha_bar_of(schedule, torch.tensor([1000.0]))


@pytest.mark.parametrize("alpha_bar", [0.0, 0.3, 0.9, 1.0])
def test_forward_marginal_matches_samples(alpha_bar):
    """x_t = √ᾱ x_0 + √(1-ᾱ) ε from data samples has the mean and covariance of `marginal(ᾱ)`, the mixture
    Σ_k w_k N(√ᾱ μ_k, (ᾱ s_k² + 1-ᾱ) I); tolerance 5 standard errors of the sample moments."""
    g = torch.Generator().manual_seed(3)
    n = 200_000
    x0 = TWO_MODES.sample(n, g, dtype=torch.float64)
    x_t = add_noise(x0, torch.randn(n, 2, generator=g, dtype=torch.float64), alpha_bar)
    marginal = TWO_MODES.marginal(alpha_bar)
    assert marginal.means == tuple(tuple(alpha_bar**0.5 * c for c in m) for m in TWO_MODES.means)
    assert marginal.stds == tuple((alpha_bar * s**2 + 1 - alpha_bar) ** 0.5 for s in TWO_MODES.stds)
    cov = marginal.covariance()
    mean_error = 5 * (cov.diagonal() / n).sqrt()
    assert (x_t.mean(0) - marginal.mean()).abs().le(mean_error).all()
    # Var of a sample variance ≈ (m4 - σ⁴)/n; bound with the sample fourth moment
    centred = x_t - x_t.mean(0)
    var_error = 5 * ((centred**4).mean(0) - centred.var(0) ** 2).div(n).sqrt()
    assert (torch.cov(x_t.T).diagonal() - cov.diagonal()).abs().le(var_error).all()
    assert abs(torch.cov(x_t.T)[0, 1]) < 5 * (cov[0, 0] * cov[1, 1] / n).sqrt()


def test_mixture_validation():
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture(((0, 0), (1, 1)), (1, 1), (0.5, 0.6))
    with pytest.raises(ValueError, match="stds must be finite and > 0"):
        GaussianMixture(((0, 0), (1, 1)), (1, 0), (0.5, 0.5))
    with pytest.raises(ValueError, match="one std and one weight per mean"):
        GaussianMixture(((0, 0), (1, 1)), (1,), (0.5, 0.5))
    with pytest.raises(ValueError, match="same dimension"):
        GaussianMixture(((0, 0), (1,)), (1, 1), (0.5, 0.5))
    with pytest.raises(ValueError, match="integer >= 0"):
        TWO_MODES.sample(-1)
    with pytest.raises(ValueError, match="alpha_bar must lie"):
        TWO_MODES.marginal(1.5)


def test_fraction_between():
    """|x_1| < 1 for the two clusters; the mixture's own share is Φ(-2.5) - Φ(-7.5) = 0.0062097 (normal table)."""
    assert expected_fraction_between(TWO_MODES) == pytest.approx(0.0062097, abs=1e-7)
    x = torch.tensor([[-0.99, 5.0], [0.0, 0.0], [1.01, 0.0], [-1.5, 0.0]])
    assert fraction_between(x, TWO_MODES) == 0.5
    big = TWO_MODES.sample(400_000, torch.Generator().manual_seed(4))
    assert fraction_between(big, TWO_MODES) == pytest.approx(0.0062097, abs=5 * (0.0062 / 400_000) ** 0.5)


def test_toy_mlp_builds_on_meta_and_leaves_global_rng_alone():
    with torch.device("meta"):
        ToyMLP(ToyMLPConfig())
    state = torch.random.get_rng_state()
    a = build_toy_mlp(ToyMLPConfig(), torch.Generator().manual_seed(5))
    b = build_toy_mlp(ToyMLPConfig(), torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ValueError, match="time_dim"):
        ToyMLPConfig(time_dim=3)
    with pytest.raises(ValueError, match="steps"):
        ToyTrainConfig(steps=0)


def test_toy_mlp_learns_the_two_modes():
    """1500 AdamW steps: the held-out ε loss falls at least 4× from its start and ends within 5% of the exact
    denoiser's (the lowest any model can reach); sampling with the MLP puts > 95% of the points within 3 stds of
    a mode, split between the two within 42-58%."""
    result = train_toy_mlp(TWO_MODES, ToyTrainConfig(steps=1500, batch_size=256, seed=0))
    assert result.eval_loss_end < result.eval_loss_start / 4, result
    assert result.eval_loss_end < 1.05 * result.eval_loss_exact, result
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        x = sample(
            result.model,
            noise,
            sampler="ddpm",
            steps=200,
            schedule=get_schedule("ddpm"),
            spacing="trailing",
            generator=torch.Generator().manual_seed(7),
        )
    means = torch.tensor(TWO_MODES.means)
    distance = torch.cdist(x, means)  # (B, 2)
    near = distance.min(1).values < 3 * TWO_MODES.stds[0]
    assert near.float().mean() > 0.95
    share_left = (distance.argmin(1) == 0).float().mean()
    assert 0.42 < share_left < 0.58


def test_sliced_wasserstein_of_a_shift_is_exact():
    """Shifting every point by d shifts every projection by d·θ, keeps the order, so SW1 = mean_θ |d·θ|."""
    g = torch.Generator().manual_seed(8)
    a = torch.randn(500, 2, generator=g, dtype=torch.float64)
    shift = torch.tensor([0.5, -0.2], dtype=torch.float64)
    directions = random_directions(64, 2, g)
    assert sliced_wasserstein(a + shift, a, directions) == pytest.approx((directions @ shift).abs().mean().item())
    assert sliced_wasserstein(a, a, directions) == 0.0


def test_fit_order_recovers_a_power_law():
    nfe = [5, 10, 20, 50, 1000]
    errors = [3.0 * n**-2 for n in nfe]
    order, used = fit_order(nfe, errors, floor=1e-5, max_error=0.1)
    assert order == pytest.approx(2.0)
    assert used == (10, 20, 50)  # 3/25 > 0.1 and 3e-6 < floor are left out
    assert fit_order([5, 10], [1.0, 0.5], floor=0.0) is None


def test_convergence_error_falls_with_evaluations():
    """Small budget: two deterministic samplers and a stochastic one, NFE 5 and 50, 400 samples. The ODE error
    falls more than 5×, the sliced distance falls, and Heun's evaluations are counted (2n-1)."""
    config = ConvergenceConfig(
        samplers=("ddim", "dpmpp_2m", "heun", "euler_a"),
        budgets=(5, 50),
        num_samples=400,
        reference_steps=200,
        num_projections=64,
    )
    result = run_convergence(config)
    by = {(p.sampler, p.budget): p for p in result.points}
    for sampler in ("ddim", "dpmpp_2m", "heun"):
        assert by[sampler, 50].ode_error < by[sampler, 5].ode_error / 5
        assert by[sampler, 50].sliced_w1 < by[sampler, 5].sliced_w1
    assert by["euler_a", 50].ode_error is None
    assert by["euler_a", 50].sliced_w1 < by["euler_a", 5].sliced_w1
    assert (by["heun", 50].steps, by["heun", 50].nfe) == (25, 49)
    assert steps_for_budget("heun", 10) == 5 and steps_for_budget("ddim", 10) == 10
    assert result.reference_error < 1e-3
    report = markdown_report(result)
    assert "| `dpmpp_2m` |" in report and "Noise floor" in report


def test_convergence_config_validation():
    with pytest.raises(ValueError, match="unknown sampler"):
        ConvergenceConfig(samplers=("nope",))
    with pytest.raises(ValueError, match="ascending"):
        ConvergenceConfig(budgets=(50, 5))
    with pytest.raises(ValueError, match="num_samples"):
        ConvergenceConfig(num_samples=1)


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert 10_000 < len(data) < 2_000_000
    with Image.open(path) as image:
        image.verify()


def test_demo_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(
        ["demo", "-o", str(out), "--train-steps", "100", "--samples", "300", "--steps", "50", "--seed", "1"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("forward.png", "reverse_paths.png", "landing.png"):
        _check_png(out / name)
        assert str(out / name) in printed
    assert "between the modes" in printed and "exact denoiser" in printed and "trained MLP" in printed


def test_convergence_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "conv"
    code = cli.main(
        [
            "convergence",
            "-o",
            str(out),
            "--samples",
            "200",
            "--samplers",
            "ddim,heun,ddpm",
            "--nfe",
            "5,20",
            "--reference-steps",
            "50",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    _check_png(out / "convergence.png")
    report = (out / "convergence.md").read_text()
    assert "| `heun` |" in report and "| `heun` |" in printed
    assert "(NFE 19)" in report  # Heun's real count for a budget of 20


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--samples", "-5"], "--samples must be an integer >= 1"),
        (["demo", "--train-steps", "0"], "--train-steps must be an integer >= 1"),
        (["convergence", "--samples", "-1"], "--samples must be an integer >= 2"),
        (["convergence", "--nfe", "5,x"], "--nfe must be comma-separated integers"),
        (["convergence", "--samplers", "nope"], "unknown sampler"),
    ],
)
def test_commands_reject_bad_input(argv, message, tmp_path, capsys):
    assert cli.main(argv + ["-o", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_commands_reject_an_unwritable_directory(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert cli.main(["demo", "-o", str(blocker / "sub"), "--train-steps", "1", "--samples", "10"]) == 2
    assert "cannot write to output directory" in capsys.readouterr().err
    assert cli.main(["convergence", "-o", str(blocker)]) == 2
    assert "is not a directory" in capsys.readouterr().err
