"""The forward process: t single steps give the closed form; the three predictions convert exactly."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kedavra.diffusion.forward_process import (
    add_noise,
    check_prediction_type,
    eps_from_v,
    eps_from_x0,
    q_sample,
    q_step,
    to_x0_eps,
    training_target,
    v_from_eps_x0,
    x0_from_eps,
    x0_from_v,
)
from kedavra.diffusion.schedule import get_schedule


@pytest.mark.parametrize("name,t", [("ddpm", 50), ("sd", 300), ("cosine", 700)])
def test_t_single_steps_give_the_closed_form(name, t):
    """Running q(x_s | x_{s-1}) for s = 0..t gives N(√ᾱ_t x_0, (1-ᾱ_t) I) (DDPM eq. 4): mean and variance
    agree within 5 standard errors over N samples."""
    s = get_schedule(name)
    N = 20000
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((N, 2), 1.5, dtype=torch.float64)
    x = x0
    for step in range(t + 1):
        x = q_step(x, s.betas[step].item(), g)
    alpha_bar = s.alpha_bar[t].item()
    mean, var = x.mean(0), x.var(0)
    expected_var = 1 - alpha_bar
    assert torch.all((mean - alpha_bar**0.5 * 1.5).abs() < 5 * (expected_var / N) ** 0.5)
    # the sample variance of a Gaussian has standard error σ²√(2/(N-1))
    assert torch.all((var - expected_var).abs() < 5 * expected_var * (2 / (N - 1)) ** 0.5)


def test_q_sample_uses_the_closed_form():
    s = get_schedule("sd")
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 10, 500, 999])
    x_t, eps = q_sample(s, x0, t, torch.Generator().manual_seed(2))
    alpha_bar = s.alpha_bar[t].float()[:, None]
    assert torch.allclose(x_t, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps)


tensors = st.lists(st.floats(-5, 5), min_size=4, max_size=4).map(lambda v: torch.tensor(v, dtype=torch.float64))


@settings(max_examples=100, deadline=None)
@given(x0=tensors, eps=tensors, alpha_bar=st.floats(1e-4, 1 - 1e-4))
def test_predictions_convert_into_each_other(x0, eps, alpha_bar):
    x_t = add_noise(x0, eps, alpha_bar)
    v = v_from_eps_x0(eps, x0, alpha_bar)
    assert torch.allclose(x0_from_eps(x_t, eps, alpha_bar), x0, atol=1e-6)
    assert torch.allclose(eps_from_x0(x_t, x0, alpha_bar), eps, atol=1e-6)
    assert torch.allclose(x0_from_v(x_t, v, alpha_bar), x0, atol=1e-9)
    assert torch.allclose(eps_from_v(x_t, v, alpha_bar), eps, atol=1e-9)
    for kind in ("eps", "v", "x0"):
        out = training_target(eps, x0, alpha_bar, kind)
        x0_hat, eps_hat = to_x0_eps(out, x_t, alpha_bar, kind)
        assert torch.allclose(x0_hat, x0, atol=1e-6) and torch.allclose(eps_hat, eps, atol=1e-6)


def test_v_is_the_rotation_of_eps_and_x0():
    """With √ᾱ = cos φ, √(1-ᾱ) = sin φ: x_t = cos φ x_0 + sin φ ε and v = cos φ ε - sin φ x_0 (Salimans and Ho
    2022, sec. 4): (x_t, v) is (x_0, ε) rotated by φ, so norms are preserved."""
    x0, eps = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    x_t, v = add_noise(x0, eps, 0.25), v_from_eps_x0(eps, x0, 0.25)
    assert x_t.norm().item() == pytest.approx(1) and v.norm().item() == pytest.approx(1)
    assert torch.dot(x_t, v).item() == pytest.approx(0, abs=1e-12)


def test_per_sample_alpha_bar_broadcasts():
    x0 = torch.ones(3, 2, 4, 4)
    x_t = add_noise(x0, torch.zeros_like(x0), torch.tensor([0.25, 0.5, 1.0]))
    assert torch.allclose(x_t[:, 0, 0, 0], torch.tensor([0.5, 0.5**0.5, 1.0]))


def test_bad_input():
    with pytest.raises(ValueError, match="unknown prediction type 'noise'"):
        check_prediction_type("noise")
    assert check_prediction_type("v_prediction") == "v"
    with pytest.raises(ValueError, match=r"t must be integer timesteps in \[0, 999\]"):
        q_sample(get_schedule("sd"), torch.zeros(1, 2), torch.tensor([1000]))
