"""ComfyUI's newer samplers (res_multistep, res_multistep_ancestral, gradient_estimation, er_sde, heunpp2, ddpm,
seeds_2, seeds_3, exp_heun_2_x0, exp_heun_2_x0_sde, sa_solver, sa_solver_pece) against transcriptions of ComfyUI's
code written here: comfy/k_diffusion/sampling.py (res_multistep, sample_gradient_estimation, sample_er_sde,
sample_heunpp2, generic_step_sampler with DDPMSampler_step, sample_seeds_2, sample_seeds_3, sample_sa_solver) and
comfy/k_diffusion/sa_solver.py (compute_exponential_coeffs, compute_stochastic_adams_b_coeffs,
get_tau_interval_func), straightforward float32 loops following its lines for a discrete ε / v model
(ModelSamplingDiscrete: λ = -log σ, α = 1), driven as its KSampler drives them: the σ's of the scheduler built from
the model's float32 σ table, the start √(1+σ_0²) ε at σ_max (σ_0 ε + latent for denoise < 1), the model at the
nearest table timestep (tests/test_comfyui_samplers.py's comfy_sigmas, comfy_start, comfy_model), the functions'
defaults, and the stochastic samplers' noise from one tape read in order by both sides (ComfyUI's noise_sampler(σ,
σ_next), kedavra's noise(x, σ, σ_next)). x̂_0 after every step and the result agree within 1e-5 relative in fp32
(measured: 2.6e-6 at most, ddpm from zero-terminal-SNR σ_max with v-prediction; mostly 2e-7 to 8e-7). ComfyUI's
dpmpp_2m_sde_heun (sample_dpmpp_2m_sde, solver_type "heun"), which kedavra runs as A1111's DPM++ 2M SDE Heun, is
compared the same way, its Brownian noise taken from the tape.

Left out of the transcriptions: ComfyUI's flow-model (CONST) branches, the CFG++ variants (cfg_pp=True, and the other
*_cfg_pp samplers: tests/test_comfyui_cfg_pp.py) and model_sampling's noise_scale (1 for these models); heunpp2's
churn (KSampler never sets s_churn; its unused draw from torch's global generator is dropped). ComfyUI's "_gpu" SDE
variants differ from the others only in where the Brownian tree is drawn: they resolve to the same samplers here
(test_gpu_variants_are_the_cpu_samplers).
"""

from __future__ import annotations

import math

import noise_tape
import pytest
import torch
from test_comfyui_samplers import SCHEDULES, comfy_model, comfy_sigmas, comfy_start, relative, toy_model

from kedavra.diffusion.samplers import sample
from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.samplers.er_sde import er_sde_integrals, er_sde_noise_scale
from kedavra.diffusion.samplers.k_diffusion import (
    COMFYUI_ALIASES,
    K_SAMPLERS,
    comfyui_names,
    k_sampler_names,
    k_sigmas,
    prepare_k_run,
    resolve_k_sampler,
)
from kedavra.diffusion.samplers.res_multistep import res_weights
from kedavra.diffusion.samplers.sa_solver import sa_solver_noise_interval, stochastic_adams_weights
from kedavra.diffusion.sigmas import SigmaTable

SHAPE = (2, 4, 5, 5)
REL_TOL = 1e-5
DETERMINISTIC = ("res_multistep", "gradient_estimation", "heunpp2", "exp_heun_2_x0")
STOCHASTIC = ("res_multistep_ancestral", "er_sde", "ddpm", "seeds_2", "seeds_3", "exp_heun_2_x0_sde", "sa_solver",
              "sa_solver_pece")
NEW_SAMPLERS = DETERMINISTIC + STOCHASTIC


def NoiseTape(seed: int) -> noise_tape.NoiseTape:  # noqa: N802 (the shared tape, for this file's SHAPE)
    return noise_tape.NoiseTape(seed, SHAPE)


# --- ComfyUI's side: transcriptions of comfy/k_diffusion/sampling.py and sa_solver.py --------------------------------


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def ei_h_phi_1(h):
    return torch.expm1(h)


def ei_h_phi_2(h):
    return (torch.expm1(h) - h) / h


def comfy_res_multistep(model, x, sigmas, noise_sampler, eta, s_noise=1.0):
    """res_multistep (cfg_pp=False): sample_res_multistep is eta=0, sample_res_multistep_ancestral eta=1."""
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    phi1_fn = lambda t: torch.expm1(t) / t  # noqa: E731
    phi2_fn = lambda t: (phi1_fn(t) - 1.0) / t  # noqa: E731
    old_sigma_down = None
    old_denoised = None
    denoised_all = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        denoised_all.append(denoised)
        if sigma_down == 0 or old_denoised is None:
            d = to_d(x, sigmas[i], denoised)
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            t, t_old, t_next, t_prev = t_fn(sigmas[i]), t_fn(old_sigma_down), t_fn(sigma_down), t_fn(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            x = sigma_fn(h) * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised = denoised
        old_sigma_down = sigma_down
    return denoised_all, x


def comfy_gradient_estimation(model, x, sigmas, ge_gamma=2.0):
    s_in = x.new_ones([x.shape[0]])
    old_d = None
    denoised_all = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        denoised_all.append(denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = x + d * dt
            if i >= 1:
                d_bar = (ge_gamma - 1) * (d - old_d)
                x = x + d_bar * dt
        old_d = d
    return denoised_all, x


def comfy_er_sde(model, x, sigmas, noise_sampler, s_noise=1.0, max_stage=3):
    s_in = x.new_ones([x.shape[0]])

    def default_er_sde_noise_scaler(x):
        return x * ((x**0.3).exp() + 10.0)

    noise_scaler = default_er_sde_noise_scaler
    num_integration_points = 200.0
    point_indice = torch.arange(0, num_integration_points, dtype=torch.float32)
    half_log_snrs = sigmas.log().neg()  # sigma_to_half_log_snr, ModelSamplingDiscrete
    er_lambdas = half_log_snrs.neg().exp()
    old_denoised = None
    old_denoised_d = None
    denoised_all = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        denoised_all.append(denoised)
        stage_used = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            er_lambda_s, er_lambda_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s = sigmas[i] / er_lambda_s
            alpha_t = sigmas[i + 1] / er_lambda_t
            r_alpha = alpha_t / alpha_s
            r = noise_scaler(er_lambda_t) / noise_scaler(er_lambda_s)
            x = r_alpha * r * x + alpha_t * (1 - r) * denoised
            if stage_used >= 2:
                dt = er_lambda_t - er_lambda_s
                lambda_step_size = -dt / num_integration_points
                lambda_pos = er_lambda_t + point_indice * lambda_step_size
                scaled_pos = noise_scaler(lambda_pos)
                s = torch.sum(1 / scaled_pos) * lambda_step_size
                denoised_d = (denoised - old_denoised) / (er_lambda_s - er_lambdas[i - 1])
                x = x + alpha_t * (dt + s * noise_scaler(er_lambda_t)) * denoised_d
                if stage_used >= 3:
                    s_u = torch.sum((lambda_pos - er_lambda_s) / scaled_pos) * lambda_step_size
                    denoised_u = (denoised_d - old_denoised_d) / ((er_lambda_s - er_lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt**2) / 2 + s_u * noise_scaler(er_lambda_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * (
                    er_lambda_t**2 - er_lambda_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
        old_denoised = denoised
    return denoised_all, x


def comfy_heunpp2(model, x, sigmas):
    """sample_heunpp2 with KSampler's s_churn = 0 (gamma = 0; its eps draw, unused then, dropped)."""
    s_in = x.new_ones([x.shape[0]])
    s_end = sigmas[-1]
    denoised_all = []
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        denoised = model(x, sigma_hat * s_in)
        d = to_d(x, sigma_hat, denoised)
        denoised_all.append(denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            w = 2 * sigmas[0]
            w2 = sigmas[i + 1] / w
            w1 = 1 - w2
            d_prime = d * w1 + d_2 * w2
            x = x + d_prime * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            dt_2 = sigmas[i + 2] - sigmas[i + 1]
            x_3 = x_2 + d_2 * dt_2
            denoised_3 = model(x_3, sigmas[i + 2] * s_in)
            d_3 = to_d(x_3, sigmas[i + 2], denoised_3)
            w = 3 * sigmas[0]
            w2 = sigmas[i + 1] / w
            w3 = sigmas[i + 2] / w
            w1 = 1 - w2 - w3
            d_prime = w1 * d + w2 * d_2 + w3 * d_3
            x = x + d_prime * dt
    return denoised_all, x


def comfy_ddpm(model, x, sigmas, noise_sampler):
    """sample_ddpm: generic_step_sampler with DDPMSampler_step."""

    def ddpm_step(x, sigma, sigma_prev, noise, noise_sampler):
        alpha_cumprod = 1 / ((sigma * sigma) + 1)
        alpha_cumprod_prev = 1 / ((sigma_prev * sigma_prev) + 1)
        alpha = alpha_cumprod / alpha_cumprod_prev
        mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * noise / (1 - alpha_cumprod).sqrt())
        if sigma_prev > 0:
            mu += ((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)).sqrt() * noise_sampler(
                sigma, sigma_prev)
        return mu

    s_in = x.new_ones([x.shape[0]])
    denoised_all = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        denoised_all.append(denoised)
        x = ddpm_step(x / torch.sqrt(1.0 + sigmas[i] ** 2.0), sigmas[i], sigmas[i + 1], (x - denoised) / sigmas[i],
                      noise_sampler)
        if sigmas[i + 1] != 0:
            x *= torch.sqrt(1.0 + sigmas[i + 1] ** 2.0)
    return denoised_all, x


def comfy_seeds_2(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, r=0.5, solver_type="phi_1"):
    """sample_seeds_2; exp_heun_2_x0 is (eta=0, s_noise=0, r=1, "phi_2"), exp_heun_2_x0_sde (r=1, "phi_2")."""
    s_in = x.new_ones([x.shape[0]])
    inject_noise = eta > 0 and s_noise > 0
    sigma_fn = lambda lam: lam.neg().exp()  # noqa: E731  half_log_snr_to_sigma, ModelSamplingDiscrete
    lambda_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    fac = 1 / (2 * r)
    denoised_all = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        denoised_all.append(denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r)
        sigma_s_1 = sigma_fn(lambda_s_1)
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        x_2 = sigma_s_1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_s_1 * ei_h_phi_1(-r * h_eta) * denoised
        if inject_noise:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * s_in)
        if solver_type == "phi_1":
            denoised_d = torch.lerp(denoised, denoised_2, fac)
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * ei_h_phi_1(-h_eta) * denoised_d
        else:
            b2 = ei_h_phi_2(-h_eta) / r
            b1 = ei_h_phi_1(-h_eta) - b2
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b2 * denoised_2)
        if inject_noise:
            segment_factor = (r - 1) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(sigma_s_1,
                                                                                                sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return denoised_all, x


def comfy_seeds_3(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, r_1=1.0 / 3, r_2=2.0 / 3):
    s_in = x.new_ones([x.shape[0]])
    inject_noise = eta > 0 and s_noise > 0
    sigma_fn = lambda lam: lam.neg().exp()  # noqa: E731
    lambda_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    denoised_all = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        denoised_all.append(denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r_1)
        lambda_s_2 = torch.lerp(lambda_s, lambda_t, r_2)
        sigma_s_1, sigma_s_2 = sigma_fn(lambda_s_1), sigma_fn(lambda_s_2)
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_s_2 = sigma_s_2 * lambda_s_2.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        x_2 = sigma_s_1 / sigmas[i] * (-r_1 * h * eta).exp() * x - alpha_s_1 * ei_h_phi_1(-r_1 * h_eta) * denoised
        if inject_noise:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * s_in)
        a3_2 = r_2 / r_1 * ei_h_phi_2(-r_2 * h_eta)
        a3_1 = ei_h_phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s_2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_s_2 * (a3_1 * denoised + a3_2 * denoised_2)
        if inject_noise:
            segment_factor = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(sigma_s_1, sigma_s_2)
            x_3 = x_3 + sde_noise * sigma_s_2 * s_noise
        denoised_3 = model(x_3, sigma_s_2 * s_in)
        b3 = ei_h_phi_2(-h_eta) / r_2
        b1 = ei_h_phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject_noise:
            segment_factor = (r_2 - 1) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(sigma_s_2,
                                                                                                sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return denoised_all, x


def comfy_dpmpp_2m_sde(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """sample_dpmpp_2m_sde (sample_dpmpp_2m_sde_heun: solver_type="heun"; the "_gpu" variants: the same with the
    Brownian tree on the model's device), the noise sampler given."""
    s_in = x.new_ones([x.shape[0]])
    lambda_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_denoised = None
    h, h_last = None, None
    denoised_all = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        denoised_all.append(denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (
                    -2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
    return denoised_all, x


def compute_exponential_coeffs(s, t, solver_order, tau_t):
    """sa_solver.py's compute_exponential_coeffs."""
    tau_mul = 1 + tau_t**2
    h = t - s
    p = torch.arange(solver_order, dtype=s.dtype, device=s.device)
    product_terms_factored = t**p - s**p * (-tau_mul * h).exp()
    recursive_depth_mat = p.unsqueeze(1) - p.unsqueeze(0)
    log_factorial = (p + 1).lgamma()
    recursive_coeff_mat = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)
    if tau_t > 0:
        recursive_coeff_mat = recursive_coeff_mat - (recursive_depth_mat * math.log(tau_mul))
    signs = torch.where(recursive_depth_mat % 2 == 0, 1.0, -1.0)
    recursive_coeff_mat = (recursive_coeff_mat.exp() * signs).tril()
    return recursive_coeff_mat @ product_terms_factored


def compute_stochastic_adams_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t):
    """sa_solver.py's compute_stochastic_adams_b_coeffs with simple_order_2=False (sample_sa_solver's default)."""
    num_timesteps = curr_lambdas.shape[0]
    exp_integral_coeffs = compute_exponential_coeffs(lambda_s, lambda_t, num_timesteps, tau_t)
    vandermonde_matrix_T = torch.vander(curr_lambdas, num_timesteps, increasing=True).T
    lagrange_integrals = torch.linalg.solve(vandermonde_matrix_T, exp_integral_coeffs)
    alpha_t = sigma_next * lambda_t.exp()
    return alpha_t * lagrange_integrals


def comfy_percent_to_sigma(schedule, percent):
    """ModelSamplingDiscrete.percent_to_sigma: σ at timestep (1 - percent)·999, log σ interpolated (its sigma())."""
    log_sigmas = SigmaTable.from_schedule(schedule, "comfyui").sigmas.log()
    t = torch.clamp(torch.tensor((1.0 - percent) * 999.0).float(), min=0, max=len(log_sigmas) - 1)
    low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]).exp().item()


def comfy_sa_solver(model, x, sigmas, noise_sampler, schedule, use_pece=False, s_noise=1.0, predictor_order=3,
                    corrector_order=4):
    s_in = x.new_ones([x.shape[0]])
    lambdas = sigmas.log().neg()  # sigma_to_half_log_snr, ModelSamplingDiscrete
    start_sigma, end_sigma = comfy_percent_to_sigma(schedule, 0.2), comfy_percent_to_sigma(schedule, 0.8)

    def tau_func(sigma):  # get_tau_interval_func(start_sigma, end_sigma, eta=1.0)
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.item()
        return 1.0 if start_sigma >= sigma >= end_sigma else 0.0

    max_used_order = max(predictor_order, corrector_order)
    x_pred = x
    h = 0.0
    tau_t = 0.0
    noise = 0.0
    pred_list = []
    lower_order_to_end = sigmas[-1].item() == 0
    denoised_all = []
    for i in range(len(sigmas) - 1):
        denoised = model(x_pred, sigmas[i] * s_in)
        denoised_all.append(denoised)
        pred_list.append(denoised)
        pred_list = pred_list[-max_used_order:]
        predictor_order_used = min(predictor_order, len(pred_list))
        if i == 0 or (sigmas[i + 1] == 0 and not use_pece):
            corrector_order_used = 0
        else:
            corrector_order_used = min(corrector_order, len(pred_list))
        if lower_order_to_end:
            predictor_order_used = min(predictor_order_used, len(sigmas) - 2 - i)
            corrector_order_used = min(corrector_order_used, len(sigmas) - 1 - i)
        if corrector_order_used == 0:
            x = x_pred
        else:
            curr_lambdas = lambdas[i - corrector_order_used + 1:i + 1]
            b_coeffs = compute_stochastic_adams_b_coeffs(sigmas[i], curr_lambdas, lambdas[i - 1], lambdas[i], tau_t)
            pred_mat = torch.stack(pred_list[-corrector_order_used:], dim=1)  # (B, K, ...)
            corr_res = torch.tensordot(pred_mat, b_coeffs, dims=([1], [0]))  # (B, ...)
            x = sigmas[i] / sigmas[i - 1] * (-(tau_t**2) * h).exp() * x + corr_res
            if tau_t > 0 and s_noise > 0:
                x = x + noise
            if use_pece:
                denoised = model(x, sigmas[i] * s_in)
                pred_list[-1] = denoised
        if sigmas[i + 1] == 0:
            x_pred = denoised
        else:
            tau_t = tau_func(sigmas[i + 1])
            curr_lambdas = lambdas[i - predictor_order_used + 1:i + 1]
            b_coeffs = compute_stochastic_adams_b_coeffs(sigmas[i + 1], curr_lambdas, lambdas[i], lambdas[i + 1],
                                                         tau_t)
            pred_mat = torch.stack(pred_list[-predictor_order_used:], dim=1)  # (B, K, ...)
            pred_res = torch.tensordot(pred_mat, b_coeffs, dims=([1], [0]))  # (B, ...)
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigmas[i + 1] / sigmas[i] * (-(tau_t**2) * h).exp() * x + pred_res
            if tau_t > 0 and s_noise > 0:
                noise = noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (
                    -2 * tau_t**2 * h).expm1().neg().sqrt() * s_noise
                x_pred = x_pred + noise
    return denoised_all, x_pred


def comfy_run(name, steps, schedule, kind, prediction, noise, tape, init=None, denoise=1.0):
    """ComfyUI's run in float32, as it computes: x̂_0 of every step and the result."""
    sigmas = comfy_sigmas(name, steps, schedule, kind, denoise)
    model = comfy_model(schedule, prediction)
    x = comfy_start(noise, sigmas, schedule, init)
    noise_sampler = tape.comfy
    runs = {
        "res_multistep": lambda: comfy_res_multistep(model, x, sigmas, noise_sampler, eta=0.0),
        "res_multistep_ancestral": lambda: comfy_res_multistep(model, x, sigmas, noise_sampler, eta=1.0),
        "gradient_estimation": lambda: comfy_gradient_estimation(model, x, sigmas),
        "er_sde": lambda: comfy_er_sde(model, x, sigmas, noise_sampler),
        "heunpp2": lambda: comfy_heunpp2(model, x, sigmas),
        "ddpm": lambda: comfy_ddpm(model, x, sigmas, noise_sampler),
        "seeds_2": lambda: comfy_seeds_2(model, x, sigmas, noise_sampler),
        "seeds_3": lambda: comfy_seeds_3(model, x, sigmas, noise_sampler),
        "exp_heun_2_x0": lambda: comfy_seeds_2(model, x, sigmas, None, eta=0.0, s_noise=0.0, r=1.0,
                                               solver_type="phi_2"),
        "exp_heun_2_x0_sde": lambda: comfy_seeds_2(model, x, sigmas, noise_sampler, r=1.0, solver_type="phi_2"),
        "sa_solver": lambda: comfy_sa_solver(model, x, sigmas, noise_sampler, schedule),
        "sa_solver_pece": lambda: comfy_sa_solver(model, x, sigmas, noise_sampler, schedule, use_pece=True),
        "dpmpp_2m_sde_heun": lambda: comfy_dpmpp_2m_sde(model, x, sigmas, noise_sampler, solver_type="heun"),
        "dpmpp_2m_sde_heun_gpu": lambda: comfy_dpmpp_2m_sde(model, x, sigmas, noise_sampler, solver_type="heun"),
    }
    return runs[name]()


# --- parity ----------------------------------------------------------------------------------------------------------

CASES = [  # (schedule type, steps, schedule, prediction, denoise)
    ("normal", 12, "sd", "eps", 1.0),
    ("karras", 10, "sd", "v", 1.0),
    ("exponential", 3, "sd", "eps", 1.0),
    ("sgm_uniform", 20, "zsnr", "eps", 1.0),
    ("normal", 8, "sd", "eps", 0.6),
    ("karras", 10, "zsnr", "v", 1.0),
    ("simple", 15, "sd", "v", 0.75),
]


def run_pair(name, kind, steps, schedule, prediction, denoise=1.0):
    """(x̂_0 per step and result: kedavra's, ComfyUI's float32 transcription's), on the same noise tape."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100)).tanh() if denoise < 1 else None
    tape = NoiseTape(steps + 7)
    theirs, their_result = comfy_run(name, steps, schedule, kind, prediction, noise, tape, init, denoise)
    tape.rewind()
    ours = []
    result = sample(toy_model, noise, sampler=name, steps=steps, schedule=schedule, prediction_type=prediction,
                    schedule_type=kind, convention="comfyui", init=init, strength=denoise,
                    noise_sampler=tape.kedavra, callback=lambda step: ours.append(step.x0.clone()))
    return (ours, result), (theirs, their_result)


def largest_difference(name, case) -> float:
    kind, steps, schedule_name, prediction, denoise = case
    (ours, result), (theirs, their_result) = run_pair(name, kind, steps, SCHEDULES[schedule_name], prediction, denoise)
    assert len(ours) == len(theirs) == steps
    return max([relative(a, b) for a, b in zip(ours, theirs, strict=True)] + [relative(result, their_result)])


@pytest.mark.parametrize("name", NEW_SAMPLERS + ("dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu"))
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case)))
def test_samplers_follow_comfyuis_code(name, case):
    """Each new sampler, and ComfyUI's names of DPM++ 2M SDE Heun (whose Brownian noise comes from the tape here), as
    ComfyUI's code computes it."""
    assert largest_difference(name, case) < REL_TOL


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_use_their_noise(name):
    """The noise reaches the result: another tape gives another sample (and the comparison above is not vacuous)."""
    schedule = SCHEDULES["sd"]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    runs = [sample(toy_model, noise, sampler=name, steps=8, schedule=schedule, schedule_type="karras",
                   convention="comfyui", noise_sampler=NoiseTape(seed).kedavra) for seed in (1, 2)]
    assert relative(runs[0], runs[1]) > 1e-3


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_draw_no_noise(name):
    def refuse(x, sigma, sigma_next):
        raise AssertionError("noise drawn")

    sample(toy_model, torch.randn(SHAPE), sampler=name, steps=6, schedule=SCHEDULES["sd"], schedule_type="karras",
           convention="comfyui", noise_sampler=refuse)


def test_evaluation_counts():
    """heunpp2 3n - 3 (three slopes, two on the step before the last, one on the last), seeds_2 / exp_heun_2_x0(_sde)
    2n - 1, seeds_3 3n - 2 (none but x̂_0 into σ = 0), sa_solver_pece 2n - 1, the others n."""
    steps = 7
    expected = {"heunpp2": 3 * steps - 3, "seeds_2": 2 * steps - 1, "exp_heun_2_x0": 2 * steps - 1,
                "exp_heun_2_x0_sde": 2 * steps - 1, "seeds_3": 3 * steps - 2, "sa_solver_pece": 2 * steps - 1}
    for name in NEW_SAMPLERS:
        denoiser = Denoiser(toy_model)
        sample(denoiser, torch.randn(SHAPE), sampler=name, steps=steps, schedule=SCHEDULES["sd"],
               schedule_type="normal", convention="comfyui", noise_sampler=NoiseTape(0).kedavra)
        assert denoiser.evaluations == expected.get(name, steps), name


def test_sa_solver_noise_interval_is_comfyuis():
    """ComfyUI's default τ interval, [percent_to_sigma(0.8), percent_to_sigma(0.2)], from the model's σ table; a run
    takes it from the table of its convention."""
    for schedule in SCHEDULES.values():
        low, high = sa_solver_noise_interval(SigmaTable.from_schedule(schedule, "comfyui"))
        assert (low, high) == (comfy_percent_to_sigma(schedule, 0.8), comfy_percent_to_sigma(schedule, 0.2))
        assert 0.3 < low < 1 < 3 < high < 10  # SD's σ at t = 199.8 and 799.2
    for name in ("sa_solver", "sa_solver_pece"):
        for convention in ("comfyui", "a1111"):
            run = prepare_k_run(name, torch.zeros(SHAPE), 10, SCHEDULES["sd"], "karras", convention)
            table = SigmaTable.from_schedule(SCHEDULES["sd"], convention)
            assert run.options == {"noise_interval": sa_solver_noise_interval(table)}


def test_stochastic_adams_weights_are_comfyuis():
    """kedavra's weights (Lagrange polynomials in λ - λ_t against closed-form moments, float64) and ComfyUI's
    (a Vandermonde system in λ, here in float64): the same to rounding; they integrate polynomials of degree < K
    against (1+τ²) e^{(1+τ²)(λ - λ_t)} exactly, and sum to 1 - e^{-(1+τ²)h}."""
    nodes = [-2.1, -1.6, -1.2, -0.9]
    lambda_s, lambda_t = -0.9, -0.55
    for tau in (0.0, 1.0):
        for count in (1, 2, 3, 4):
            ours = stochastic_adams_weights(nodes[-count:], lambda_s, lambda_t, tau)
            theirs = compute_stochastic_adams_b_coeffs(torch.tensor(1.0, dtype=torch.float64) * math.exp(-lambda_t),
                                                       torch.tensor(nodes[-count:], dtype=torch.float64),
                                                       torch.tensor(lambda_s, dtype=torch.float64),
                                                       torch.tensor(lambda_t, dtype=torch.float64), tau)
            assert ours == pytest.approx(theirs.tolist(), rel=1e-10, abs=1e-12)
            c = 1 + tau**2
            assert sum(ours) == pytest.approx(-math.expm1(-c * (lambda_t - lambda_s)), rel=1e-12)


def test_res_and_er_sde_coefficients():
    # RES: b_1 + b_2 = φ_1(-h), c_2 b_2 = φ_2(-h) (the order conditions), so with b_2 = 0 it is DDIM
    h, c2 = 0.37, -0.8
    b1, b2 = res_weights(h, c2)
    assert h * (b1 + b2) == pytest.approx(-math.expm1(-h), rel=1e-14)
    assert c2 * b2 == pytest.approx((math.expm1(-h) / -h - 1) / -h, rel=1e-14)
    # ER-SDE: ComfyUI's Riemann sums against the exact integrals (to the sums' error) and f = λ giving DDIM
    s1, s2 = er_sde_integrals(3.0, 2.0)
    grid = torch.linspace(2.0, 3.0, 200_001, dtype=torch.float64)
    exact_1 = torch.trapezoid(1 / er_sde_noise_scale(grid), grid).item()
    exact_2 = torch.trapezoid((grid - 3.0) / er_sde_noise_scale(grid), grid).item()
    assert s1 == pytest.approx(exact_1, rel=1e-2) and s2 == pytest.approx(exact_2, rel=2e-2)
    assert er_sde_noise_scale(2.0) == pytest.approx(2.0 * (math.exp(2.0**0.3) + 10))


def test_comfyui_ddpm_is_kedavras_ddpm_on_its_plan():
    """ComfyUI's ddpm is ddpm.sample_ddpm (VP) on ComfyUI's plan: from x_T = ε (the VE start √(1+σ_0²) ε) to the
    same sample at σ = 0, and the callback sees the VE state (ComfyUI's x), x_VP √(1+σ²)."""
    from kedavra.diffusion.samplers.ddpm import sample_ddpm
    from kedavra.diffusion.samplers.k_diffusion import plan_from_sigmas

    schedule = SCHEDULES["sd"]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    spec = resolve_k_sampler("ddpm", "comfyui")[0]
    sigmas, table = k_sigmas(spec, 6, schedule, "karras", "comfyui")
    plan = plan_from_sigmas(sigmas, table)
    ours, theirs = [], []
    out = sample(toy_model, noise, sampler="ddpm", steps=6, schedule=schedule, schedule_type="karras",
                 convention="comfyui", noise_sampler=NoiseTape(4).kedavra, callback=lambda step: ours.append(step.x))
    vp = sample_ddpm(Denoiser(toy_model), noise, plan, noise=NoiseTape(4).kedavra,
                     callback=lambda step: theirs.append(step.x))
    assert relative(out, vp) < 1e-6
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert relative(a, b * math.sqrt(1 + sigmas[i + 1].item() ** 2)) < 1e-6


# --- names -----------------------------------------------------------------------------------------------------------


def test_names_resolve_and_unknown_names_list_them_all():
    for name in NEW_SAMPLERS:
        spec, carried = resolve_k_sampler(name, "comfyui")
        assert spec.comfyui == name and spec.a1111 == "" and carried is None and not spec.eta
        assert spec.ancestral == (name in STOCHASTIC) and not spec.brownian and not spec.comfyui_discard_penultimate
        assert name in k_sampler_names()
    assert resolve_k_sampler("SA_Solver_PECE")[0].comfyui == "sa_solver_pece"  # case-insensitive, as every name here
    with pytest.raises(ValueError, match="unknown A1111 / ComfyUI sampler 'res_multistepp'; allowed: Euler,.*"
                                         "res_multistep, res_multistep_ancestral, .*sa_solver_pece.*"
                                         "dpmpp_2m_sde_heun_gpu"):
        resolve_k_sampler("res_multistepp", "comfyui")
    cfg_pp = resolve_k_sampler("res_multistep_cfg_pp", "comfyui")[0]  # the CFG++ variants: test_comfyui_cfg_pp.py
    assert cfg_pp.cfg_pp and cfg_pp != resolve_k_sampler("res_multistep", "comfyui")[0]
    assert [s.comfyui for s in K_SAMPLERS if s.comfyui_discard_penultimate] == [
        "dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"]  # unchanged: comfy/samplers.py's list


def test_gpu_variants_are_the_cpu_samplers():
    """ComfyUI's "_gpu" SDE samplers differ from the others only in drawing the Brownian tree on the model's device;
    kedavra draws it as ComfyUI does on the CPU, where the two give the same numbers: the same spec."""
    pairs = {"dpmpp_sde_gpu": "dpmpp_sde", "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
             "dpmpp_2m_sde_heun_gpu": "dpmpp_2m_sde_heun", "dpmpp_3m_sde_gpu": "dpmpp_3m_sde"}
    for gpu, cpu in pairs.items():
        for convention in ("comfyui", "a1111", None):
            assert resolve_k_sampler(gpu, convention) == resolve_k_sampler(cpu, convention)
        assert gpu in k_sampler_names() and gpu in comfyui_names(resolve_k_sampler(cpu)[0])
    heun = resolve_k_sampler("dpmpp_2m_sde_heun", "comfyui")[0]
    assert heun.a1111 == "DPM++ 2M SDE Heun" and heun.brownian
    assert set(COMFYUI_ALIASES) == {"dpmpp_2m_sde_heun", *pairs}
    schedule = SCHEDULES["sd"]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    runs = [sample(toy_model, noise, sampler=name, steps=5, schedule=schedule, schedule_type="karras",
                   convention="comfyui", noise_sampler=NoiseTape(3).kedavra) for name in ("dpmpp_2m_sde_heun_gpu",
                                                                                          "DPM++ 2M SDE Heun")]
    assert torch.equal(runs[0], runs[1])


def test_requests_and_the_pipeline_reach_the_new_samplers():
    """A request keeps the ComfyUI name; the pipeline runs them with ComfyUI's noise (its seeded per-step sampler):
    the same seed, the same latents."""
    from random_models import tiny_model

    from kedavra.pipeline.pipeline import Pipeline
    from kedavra.pipeline.request import GenerationRequest

    for name in NEW_SAMPLERS + tuple(COMFYUI_ALIASES):
        request = GenerationRequest.build("a cat", sampler=name, schedule_type="normal", convention="comfyui")
        assert name in comfyui_names(request.k_sampler) and request.sampler_spec is None
    pipe = Pipeline(tiny_model(), dtype="fp32")
    for name in ("sa_solver", "seeds_2"):
        latents = [pipe("a red circle", steps=4, sampler=name, schedule_type="karras", convention="comfyui",
                        seed=seed).latents for seed in (5, 5, 6)]
        assert torch.isfinite(latents[0]).all() and torch.equal(latents[0], latents[1])
        assert not torch.equal(latents[0], latents[2])


@pytest.mark.parametrize("name", NEW_SAMPLERS)
def test_the_new_samplers_run_as_a1111_would_and_from_an_init(name):
    """Like ComfyUI's other samplers, they run with A1111's conventions too (interpolated timesteps, σ_0 ε, its
    img2img rule), and from an init with ComfyUI's denoise: finite, of the order of Euler's sample
    (res_multistep_ancestral from an init at 5 steps is twice its size, as in ComfyUI's code)."""
    schedule = SCHEDULES["sd"]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9)).tanh()
    for convention in ("a1111", "comfyui"):
        for start in (None, init):
            run = {"steps": 5, "schedule": schedule, "schedule_type": "Automatic", "convention": convention,
                   "init": start, "strength": 0.5 if start is not None else 1.0}
            out = sample(toy_model, noise, sampler=name, noise_sampler=NoiseTape(1).kedavra, **run)
            euler = sample(toy_model, noise, sampler="euler", **run)
            assert torch.isfinite(out).all() and 1 / 3 < (out.norm() / euler.norm()).item() < 3
