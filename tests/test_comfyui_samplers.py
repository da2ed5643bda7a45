"""ComfyUI's samplers that A1111 does not list (ipndm, ipndm_v, deis, uni_pc, uni_pc_bh2, and its ddim) against
transcriptions of ComfyUI's code written here: comfy/k_diffusion/sampling.py (sample_ipndm, sample_ipndm_v,
sample_deis), comfy/k_diffusion/deis.py (get_deis_coeff_list, "tab" mode) and comfy/extra_samplers/uni_pc.py
(sample_unipc), straightforward float32 loops following its lines, driven as its KSampler drives them: the σ's of
the scheduler built from the model's float32 σ table, the penultimate σ dropped for uni_pc / uni_pc_bh2, the start
√(1+σ_0²) ε at σ_max (σ_0 ε + latent for denoise < 1), the model at the nearest table timestep with ComfyUI's
ModelSamplingDiscrete scalings. x̂_0 after every step and the result agree within 1e-5 relative in fp32 (measured:
2e-6 at most, mostly 4e-7). Inpainting: KSAMPLER.sample around KSamplerX0Inpaint (comfy/samplers.py), with the kept
region's own noise of its ddim (inpaint_options {"random": True}).

From σ_max ≈ 4519 (zero terminal SNR) fp32 loses digits: in ComfyUI's UniPC, a cancelling difference (compared
with its float64 run there: test_unipc_from_zero_terminal_snr_against_comfyuis_float64_run), and in the multistep
samplers with v-prediction on few Karras steps, where weights of ±10³ on the slopes amplify rounding (ComfyUI's fp32
runs of ipndm and deis, 10 steps, are 2e-4 and 2e-3 from their float64 runs; kedavra's float64 DEIS weights differ
from ComfyUI's float32 ones by 1e-6, enough there): those are not compared.
"""

from __future__ import annotations

import math

import pytest
import torch

from kedavra.diffusion.rng import comfyui_inpaint_noise, comfyui_noise
from kedavra.diffusion.samplers import sample
from kedavra.diffusion.samplers.adams import (
    ADAMS_BASHFORTH,
    EDM_SIGMA_MAX,
    EDM_SIGMA_MIN,
    EDM_VP_EPS,
    _vp_betas,
    deis_weights,
    variable_step_weights,
)
from kedavra.diffusion.samplers.denoiser import Denoiser
from kedavra.diffusion.samplers.euler import sample_euler
from kedavra.diffusion.samplers.k_diffusion import (
    K_SAMPLERS,
    k_sampler_names,
    k_sigmas,
    plan_from_sigmas,
    resolve_k_sampler,
)
from kedavra.diffusion.samplers.unipc import sample_unipc
from kedavra.diffusion.samplers.unipc_comfyui import (
    COMFYUI_UNIPC_FINAL_SIGMA,
    COMFYUI_UNIPC_LAST_LEVEL,
    comfyui_unipc_plan,
)
from kedavra.diffusion.schedule import NoiseSchedule
from kedavra.diffusion.sigmas import SigmaTable, build_sigmas

SHAPE = (2, 4, 5, 5)
REL_TOL = 1e-5
SCHEDULES = {"sd": NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012),
             "zsnr": NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012, zero_terminal_snr=True)}
NEW_SAMPLERS = ("ipndm", "ipndm_v", "deis", "uni_pc", "uni_pc_bh2")


def toy_model(x, t):
    """A smooth stand-in for a U-Net whose output depends on t (tests/test_k_samplers.py's)."""
    t = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * torch.tanh(x) + 0.3 * torch.sin(x * 2 + t / 150) + 0.05 * x


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- ComfyUI's side --------------------------------------------------------------------------------------------------


def comfy_model(schedule: NoiseSchedule, prediction: str):
    """ComfyUI's denoiser D(x, σ) over a model: ModelSamplingDiscrete's timestep (argmin |log σ - log σ_t| over its
    float32 table) and EPS / V_PREDICTION scalings with σ_data = 1."""
    log_sigmas = SigmaTable.from_schedule(schedule, "comfyui").sigmas.log()

    def denoise(x, sigma):
        t = (sigma.log()[None, :] - log_sigmas[:, None]).abs().argmin(dim=0).float()
        s = sigma.reshape(-1, 1, 1, 1)
        out = toy_model(x / (s**2 + 1) ** 0.5, t)
        if prediction == "v":
            return x / (s**2 + 1) - out * s / (s**2 + 1) ** 0.5
        return x - out * s

    return denoise


def comfy_sigmas(name: str, steps: int, schedule: NoiseSchedule, kind: str, denoise: float = 1.0) -> torch.Tensor:
    """ComfyUI's KSampler.set_steps / calculate_sigmas: ⌊steps/denoise⌋ steps, one more with the penultimate σ dropped
    for uni_pc / uni_pc_bh2, the last steps + 1 σ's."""
    table = SigmaTable.from_schedule(schedule, "comfyui")
    total = steps if denoise > 0.9999 else int(steps / denoise)
    discard = name in ("uni_pc", "uni_pc_bh2")
    sigmas = build_sigmas(kind, total + int(discard), table, "comfyui")
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas[-(steps + 1):]


def comfy_start(noise, sigmas, schedule, latent=None):
    """KSAMPLER.sample's noise scaling: √(1+σ_0²) at the table's σ_max (max_denoise), else σ_0, plus the latent."""
    sigma_max = SigmaTable.from_schedule(schedule, "comfyui").sigma_max
    at_max = math.isclose(sigma_max, float(sigmas[0]), rel_tol=1e-5) or float(sigmas[0]) > sigma_max
    x = noise * torch.sqrt(1.0 + sigmas[0] ** 2.0) if at_max else noise * sigmas[0]
    return x + latent if latent is not None else x


def comfy_deis_coefficients(t_steps, max_order, N=10000):
    """deis.py's get_deis_coeff_list, "tab" mode, in t_steps' dtype (ComfyUI's: float32), the derivative of log ᾱ
    written out instead of autograd."""
    dtype = t_steps.dtype
    sigma_min, sigma_max, eps = torch.tensor(0.002, dtype=dtype), torch.tensor(80.0, dtype=dtype), 1e-3
    beta_d = 2 * (torch.log(sigma_min**2 + 1) / eps - torch.log(sigma_max**2 + 1)) / (eps - 1)
    beta_min = torch.log(sigma_max**2 + 1) - 0.5 * beta_d
    t_steps = ((beta_min**2 + 2 * beta_d * (t_steps**2 + 1).log()).sqrt() - beta_min) / beta_d
    beta_0, beta_1 = beta_min, beta_d + beta_min
    coefficients = []
    for i in range(len(t_steps) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            coefficients.append([])
            continue
        taus = torch.linspace(float(t_steps[i]), float(t_steps[i + 1]), N, dtype=dtype)
        dtau = (t_steps[i + 1] - t_steps[i]) / N
        prev_t = t_steps[[i - k for k in range(order)]]
        alpha = torch.exp(-0.5 * taus**2 * (beta_1 - beta_0) - taus * beta_0)
        d_log_alpha = -(taus * (beta_1 - beta_0) + beta_0)
        integrand = -0.5 * d_log_alpha / torch.sqrt(alpha * (1 - alpha))
        row = []
        for j in range(order):
            poly = 1
            for k in range(order):
                if k != j:
                    poly = poly * (taus - prev_t[k]) / (prev_t[j] - prev_t[k])
            row.append(torch.sum(integrand * poly) * dtau)
        coefficients.append(row)
    return coefficients


def comfy_multistep(name, model, x, sigmas):
    """sample_ipndm (max_order 4), sample_ipndm_v (4) and sample_deis (3): x̂_0 of every step and the result."""
    max_order = 3 if name == "deis" else 4
    coefficients = comfy_deis_coefficients(sigmas, max_order) if name == "deis" else None
    buffer, denoised_all = [], []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t_cur * torch.ones(x.shape[0]))
        denoised_all.append(denoised)
        d_cur = (x - denoised) / t_cur
        order = min(max_order, i + 1)
        if name == "deis":
            order = 1 if t_next <= 0 else order
            if order == 1:
                x = x + (t_next - t_cur) * d_cur
            else:
                x = x + sum(c * d for c, d in zip(coefficients[i], [d_cur] + buffer[::-1], strict=False))
        elif t_next == 0:
            x = denoised
        elif order == 1:
            x = x + (t_next - t_cur) * d_cur
        elif name == "ipndm":
            numerators, denominator = {2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}[order]
            x = x + (t_next - t_cur) * sum(c * d for c, d in zip(numerators, [d_cur] + buffer[::-1],
                                                                 strict=False)) / denominator
        else:
            x = x + (t_next - t_cur) * _ipndm_v_combination(sigmas, i, order, d_cur, buffer)
        buffer = (buffer + [d_cur])[-(max_order - 1):]
    return denoised_all, x


def _ipndm_v_combination(t_steps, i, order, d_cur, buffer):
    """sample_ipndm_v's coeff1 d_cur + coeff2 buffer[-1] + ... for orders 2-4, as its lines compute them."""
    h_n, h_n_1 = t_steps[i + 1] - t_steps[i], t_steps[i] - t_steps[i - 1]
    if order == 2:
        return (2 + h_n / h_n_1) / 2 * d_cur - (h_n / h_n_1) / 2 * buffer[-1]
    h_n_2 = t_steps[i - 1] - t_steps[i - 2]
    temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
    if order == 3:
        coeff1 = (2 + h_n / h_n_1) / 2 + temp1
        coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1
        return coeff1 * d_cur + coeff2 * buffer[-1] + temp1 * h_n_1 / h_n_2 * buffer[-2]
    h_n_3 = t_steps[i - 2] - t_steps[i - 3]
    ratio = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
    temp2 = (((1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2)))
             * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3)))
    coeff1 = (2 + h_n / h_n_1) / 2 + temp1 + temp2
    coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + h_n_1 / h_n_2 + ratio) * temp2
    coeff3 = temp1 * h_n_1 / h_n_2 + (h_n_1 / h_n_2 + ratio * (1 + h_n_2 / h_n_3)) * temp2
    coeff4 = -temp2 * ratio * h_n_1 / h_n_2
    return coeff1 * d_cur + coeff2 * buffer[-1] + coeff3 * buffer[-2] + coeff4 * buffer[-3]


class SigmaConvert:
    """uni_pc.py's SigmaConvert: the UniPC noise schedule whose time is σ, in float32."""

    @staticmethod
    def log_alpha(s):
        return 0.5 * torch.log(1 / ((s * s) + 1))

    def alpha(self, s):
        return torch.exp(self.log_alpha(s))

    def std(self, s):
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(s)))

    def lam(self, s):
        return self.log_alpha(s) - 0.5 * torch.log(1.0 - torch.exp(2.0 * self.log_alpha(s)))


def comfy_unipc(model, x, sigmas, variant, final_sigma=0.001):
    """uni_pc.py's sample_unipc: UniPC multistep, predict_x0, order min(3, n - 1), lower_order_final, on σ's whose
    final 0 is final_sigma (its 0.001); x̂_0 reported after every step (its callback's model_prev_list[-1]) and the
    result."""
    ns = SigmaConvert()
    timesteps = sigmas.clone()
    if timesteps[-1] == 0:
        timesteps[-1] = final_sigma

    def data_prediction(x, t):  # predict_eps_sigma, then UniPC's data_prediction_fn
        x_ve = x * ((t**2 + 1.0) ** 0.5)
        eps = (x_ve - model(x_ve, t.expand(x.shape[0]))) / t
        return (x - ns.std(t) * eps) / ns.alpha(t)

    def update(x, model_prev, t_prev, t, order, use_corrector):  # multistep_uni_pc_bh_update
        lambda_0, lambda_t, model_0 = ns.lam(t_prev[-1]), ns.lam(t), model_prev[-1]
        h = lambda_t - lambda_0
        rks, D1s = [], []
        for i in range(1, order):
            rk = (ns.lam(t_prev[-(i + 1)]) - lambda_0) / h
            rks.append(rk)
            D1s.append((model_prev[-(i + 1)] - model_0) / rk)
        rks = torch.stack(rks + [torch.ones_like(h)])
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k, factorial = h_phi_1 / hh - 1, 1
        B_h = hh if variant == "bh1" else torch.expm1(hh)
        R, b = [], []
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial / B_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        R, b = torch.stack(R), torch.stack(b)
        x_t_ = ns.std(t) / ns.std(t_prev[-1]) * x - ns.alpha(t) * h_phi_1 * model_0
        x_t = x_t_
        if D1s:
            rhos_p = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
            x_t = x_t_ - ns.alpha(t) * B_h * sum(rho * d for rho, d in zip(rhos_p, D1s, strict=True))
        model_t = None
        if use_corrector:
            rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(R, b)
            model_t = data_prediction(x_t, t)
            corr_res = sum(rho * d for rho, d in zip(rhos_c[:-1], D1s, strict=True)) if D1s else 0
            x_t = x_t_ - ns.alpha(t) * B_h * (corr_res + rhos_c[-1] * (model_t - model_0))
        return x_t, model_t

    x = x / torch.sqrt(1.0 + timesteps[0] ** 2.0)
    steps, order = len(timesteps) - 1, min(3, len(timesteps) - 2)
    denoised_all = []
    for step_index in range(steps):
        if step_index == 0:
            model_prev, t_prev = [data_prediction(x, timesteps[0])], [timesteps[0]]
        elif step_index < order:
            x, model_x = update(x, model_prev, t_prev, timesteps[step_index], step_index, True)
            model_prev.append(model_x)
            t_prev.append(timesteps[step_index])
        else:
            for step in range(step_index, step_index + 1 + int(step_index == steps - 1)):
                x, model_x = update(x, model_prev, t_prev, timesteps[step], min(order, steps + 1 - step), step != steps)
                model_prev, t_prev = model_prev[1:] + model_prev[-1:], t_prev[1:] + [timesteps[step]]
                if step < steps:
                    model_prev[-1] = model_x
        denoised_all.append(model_prev[-1])
    return denoised_all, x / ns.alpha(timesteps[-1])


def comfy_run(name, steps, schedule, kind, prediction, noise, init=None, denoise=1.0, float64=False):
    """ComfyUI's run in float32, as it computes; float64: the same code on float64 σ's and noise, UniPC's final
    level being the one float32 gives 0.001 (test_comfyui_unipc_facts)."""
    dtype = torch.float64 if float64 else torch.float32
    sigmas = comfy_sigmas(name, steps, schedule, kind, denoise).to(dtype)
    model = comfy_model(schedule, prediction)
    x = comfy_start(noise.to(dtype), sigmas, schedule, None if init is None else init.to(dtype))
    if name in ("uni_pc", "uni_pc_bh2"):
        final_sigma = COMFYUI_UNIPC_LAST_LEVEL if float64 else COMFYUI_UNIPC_FINAL_SIGMA
        return comfy_unipc(model, x, sigmas, "bh2" if name == "uni_pc_bh2" else "bh1", final_sigma)
    return comfy_multistep(name, model, x, sigmas)


def comfy_inpainting_run(name, steps, schedule, kind, noise, init, mask, seed, denoise=1.0):
    """comfy/samplers.py's KSAMPLER.sample around KSamplerX0Inpaint, in float32, for ddim (sample_euler with
    inpaint_options {"random": True}), euler and uni_pc(_bh2); mask is ComfyUI's denoise_mask (1 = paint). With
    "random" the kept region's noise is torch.randn(noise.shape, generator=torch.manual_seed(seed + 1),
    device="cpu"); torch.manual_seed seeds and returns torch's default CPU generator, whose stream a fresh CPU
    generator seeded alike repeats (test_comfyui_inpaint_noise_is_seed_plus_ones), taken here so as not to reseed
    the tests' global one. Returns x̂_0 of every step and the result."""
    sigmas = comfy_sigmas(name, steps, schedule, kind, denoise)
    model = comfy_model(schedule, "eps")
    if name == "ddim":
        kept_noise = torch.randn(noise.shape, generator=torch.Generator().manual_seed(seed + 1), device="cpu")
        kept_noise = kept_noise.to(noise.dtype).to(noise.device)
    else:
        kept_noise = noise
    latent_mask = 1.0 - mask

    def model_k(x, sigma):  # KSamplerX0Inpaint.forward; scale_latent_inpaint = noise_scaling(σ, noise, latent)
        x = x * mask + (init + kept_noise * sigma.reshape(-1, 1, 1, 1)) * latent_mask
        return model(x, sigma) * mask + init * latent_mask

    x = comfy_start(noise, sigmas, schedule, init)  # noise_scaling(σ_0, noise, latent_image, max_denoise)
    if name in ("uni_pc", "uni_pc_bh2"):
        return comfy_unipc(model_k, x, sigmas, "bh2" if name == "uni_pc_bh2" else "bh1")
    denoised_all = []
    for i in range(len(sigmas) - 1):  # k-diffusion's sample_euler, s_churn = 0
        denoised = model_k(x, sigmas[i] * torch.ones(x.shape[0]))
        denoised_all.append(denoised)
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return denoised_all, x


# --- parity ----------------------------------------------------------------------------------------------------------

CASES = [  # (schedule type, steps, schedule, prediction, denoise)
    ("normal", 12, "sd", "eps", 1.0),
    ("karras", 5, "sd", "v", 1.0),
    ("exponential", 2, "sd", "eps", 1.0),
    ("sgm_uniform", 30, "zsnr", "eps", 1.0),
    ("normal", 8, "sd", "eps", 0.6),
    # one step: ComfyUI's UniPC runs at order min(3, 0) = 0 and returns its start (unipc_comfyui.py); two steps: the
    # edge above it; both with denoise < 1 too (the last 2 or 3 σ's of a longer sequence)
    ("normal", 1, "sd", "eps", 1.0),
    ("karras", 1, "sd", "v", 0.5),
    ("normal", 2, "sd", "v", 1.0),
    ("exponential", 2, "sd", "eps", 0.4),
]


@pytest.mark.parametrize("name", NEW_SAMPLERS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case)))
def test_samplers_follow_comfyuis_code(name, case):
    kind, steps, schedule_name, prediction, denoise = case
    schedule = SCHEDULES[schedule_name]
    _check_parity(name, kind, steps, schedule, prediction, denoise)


def _check_parity(name, kind, steps, schedule, prediction, denoise=1.0, float64=False):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100)).tanh() if denoise < 1 else None
    theirs, their_result = comfy_run(name, steps, schedule, kind, prediction, noise, init, denoise, float64)
    ours = []
    result = sample(toy_model, noise, sampler=name, steps=steps, schedule=schedule, prediction_type=prediction,
                    schedule_type=kind, convention="comfyui", init=init, strength=denoise,
                    callback=lambda step: ours.append(step.x0.clone()))
    assert len(ours) == len(theirs) == steps
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert relative(a, b.float()) < REL_TOL, (i, relative(a, b.float()))
    assert relative(result, their_result.float()) < REL_TOL
    return noise, theirs


@pytest.mark.parametrize("name", ["uni_pc", "uni_pc_bh2"])
def test_unipc_from_zero_terminal_snr_against_comfyuis_float64_run(name):
    """From σ_max ≈ 4519 ComfyUI's UniPC loses digits in float32 with a model whose ε is the noise it sees (a
    v-model here): it turns D into ε = (x_VE - D)/σ and back into x̂_0 = (x - √(1-ᾱ) ε)/√ᾱ, a difference that
    cancels to 1/4519 of x. Its float64 run is the reference there; its float32 x̂_0 at σ_max is 3.6e-4 from it."""
    schedule = SCHEDULES["zsnr"]
    noise, theirs = _check_parity(name, "sgm_uniform", 30, schedule, "v", float64=True)
    float32 = comfy_run(name, 30, schedule, "sgm_uniform", "v", noise)[0]
    assert relative(float32[0].double(), theirs[0]) > 1e-4


def test_comfyui_ddim_is_euler_and_a1111s_ddim_keeps_its_name():
    schedule = SCHEDULES["sd"]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    runs = {name: sample(toy_model, noise, sampler=name, steps=6, schedule=schedule, schedule_type="karras",
                         convention="comfyui") for name in ("ddim", "euler")}
    assert torch.equal(runs["ddim"], runs["euler"])
    for convention in ("comfyui", None):
        assert resolve_k_sampler("ddim", convention)[0].fn is sample_euler
    for name, convention in [("ddim", "a1111"), ("DDIM", "comfyui"), ("DDIM", None), ("Ddim", None)]:
        assert resolve_k_sampler(name, convention)[0].a1111 == "DDIM"  # A1111's DDIM ("ddim" is an alias there)
    with pytest.raises(ValueError, match="DDIM runs as A1111 runs it.*ddim"):
        sample(toy_model, noise, sampler="DDIM", steps=4, schedule=schedule, schedule_type="normal",
               convention="comfyui")
    a1111 = sample(toy_model, noise, sampler="ddim", steps=6, schedule=schedule, schedule_type="Automatic")
    assert torch.equal(a1111, sample(toy_model, noise, sampler="DDIM", steps=6, schedule=schedule,
                                     schedule_type="Automatic"))


def _soft_mask() -> torch.Tensor:
    """A ComfyUI-like soft denoise mask (1 = paint), (1, 1, h, w): 0 on the left columns, soft, then 1."""
    mask = torch.zeros(1, 1, *SHAPE[2:])
    mask[..., 2] = 0.4
    mask[..., 3:] = 1.0
    return mask


INPAINT_CASES = [  # (sampler, schedule type, steps, denoise)
    ("ddim", "normal", 6, 1.0), ("ddim", "karras", 5, 0.7), ("ddim", "normal", 1, 1.0), ("euler", "normal", 6, 1.0),
    ("uni_pc", "normal", 6, 1.0), ("uni_pc_bh2", "karras", 4, 0.7), ("uni_pc", "normal", 1, 0.5),
]


@pytest.mark.parametrize("case", INPAINT_CASES, ids=lambda case: "-".join(map(str, case)))
def test_comfyui_inpainting_follows_comfyuis_code(case):
    """ComfyUI's inpainting (KSamplerX0Inpaint) transcribed: its ddim noises the kept region with its own noise,
    torch.randn from seed + 1 (rng.comfyui_inpaint_noise), euler and UniPC with the initial noise; UniPC asks the
    blend through the VE state. x̂_0 of every step and the result within 1e-5 relative (fp32)."""
    name, kind, steps, denoise = case
    schedule, seed, mask = SCHEDULES["sd"], 1234, _soft_mask()
    noise = comfyui_noise(seed, SHAPE)
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).tanh()
    theirs, their_result = comfy_inpainting_run(name, steps, schedule, kind, noise, init, mask, seed, denoise)
    ours = []
    result = sample(toy_model, noise, sampler=name, steps=steps, schedule=schedule, schedule_type=kind,
                    convention="comfyui", init=init, strength=denoise, mask=mask,
                    inpaint_noise=comfyui_inpaint_noise(seed, SHAPE) if name == "ddim" else None,
                    callback=lambda step: ours.append(step.x0.clone()))
    assert len(ours) == len(theirs) == steps
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert relative(a, b) < REL_TOL, (i, relative(a, b))
    assert ((result - their_result).abs().max() / their_result.abs().max()).item() < REL_TOL
    if name == "ddim" and steps > 1:  # the kept region's noise shows: with the initial noise (euler's) it differs
        euler = sample(toy_model, noise, sampler="euler", steps=steps, schedule=schedule, schedule_type=kind,
                       convention="comfyui", init=init, strength=denoise, mask=mask)
        assert relative(euler, result) > 1e-3


def test_comfyui_inpaint_noise_is_seed_plus_ones():
    """ComfyUI's ddim draws torch.randn(noise.shape, generator=torch.manual_seed(seed + 1), device="cpu"): the
    default CPU generator reseeded, the same numbers as comfyui_noise(seed + 1)."""
    with torch.random.fork_rng(devices=[]):
        theirs = torch.randn(SHAPE, generator=torch.manual_seed(41 + 1), device="cpu")
    assert torch.equal(comfyui_inpaint_noise(41, SHAPE), theirs)
    assert torch.equal(comfyui_inpaint_noise(41, SHAPE), comfyui_noise(42, SHAPE))
    with pytest.raises(ValueError, match=r"seed must be an integer \(seed \+ 1 seeds ComfyUI's inpainting noise\)"):
        comfyui_inpaint_noise(2**64 - 1, SHAPE)


def test_inpaint_noise_is_asked_where_it_applies_and_refused_elsewhere():
    schedule, mask = SCHEDULES["sd"], _soft_mask()
    noise = comfyui_noise(3, SHAPE)
    init = torch.zeros(SHAPE)
    run = {"steps": 3, "schedule": schedule, "schedule_type": "normal", "init": init}
    with pytest.raises(ValueError, match=r"ComfyUI's ddim noises an inpainting mask's kept region .*comfyui_inpaint"):
        sample(toy_model, noise, sampler="ddim", convention="comfyui", mask=mask, **run)
    own = comfyui_inpaint_noise(3, SHAPE)
    with pytest.raises(ValueError, match="inpaint_noise applies to ComfyUI's ddim with a mask .*not euler "
                                         r"\(comfyui, with a mask\)"):
        sample(toy_model, noise, sampler="euler", convention="comfyui", mask=mask, inpaint_noise=own, **run)
    with pytest.raises(ValueError, match=r"not ddim \(comfyui, without a mask\)"):
        sample(toy_model, noise, sampler="ddim", convention="comfyui", inpaint_noise=own, **run)
    with pytest.raises(ValueError, match=r"not DDIM \(a1111, with a mask\)"):
        sample(toy_model, noise, sampler="ddim", convention="a1111", mask=mask, inpaint_noise=own, **run)
    with pytest.raises(ValueError, match="inpaint_noise applies to ComfyUI's inpainting with its ddim: give a "
                                         "schedule type"):
        sample(toy_model, noise, sampler="ddim", steps=3, init=init, mask=mask, inpaint_noise=own)
    with pytest.raises(ValueError, match=r"inpaint_noise has shape \(1, 4, 5, 5\) but noise has \(2, 4, 5, 5\)"):
        sample(toy_model, noise, sampler="ddim", convention="comfyui", mask=mask, inpaint_noise=own[:1], **run)


def test_requests_reach_comfyuis_samplers():
    """A request checks its name without the convention and keeps "ddim"; the pipeline's run resolves it again with
    the convention: ComfyUI's ddim is Euler, A1111's DDIM its CompVis sampler."""
    from random_models import tiny_model

    from kedavra.pipeline.pipeline import Pipeline
    from kedavra.pipeline.request import GenerationRequest

    for name in NEW_SAMPLERS:
        request = GenerationRequest.build("a cat", sampler=name, schedule_type="normal", convention="comfyui")
        assert request.k_sampler.comfyui == name and request.sampler_spec is None
    pipe = Pipeline(tiny_model(), dtype="fp32")
    latents = {name: pipe("a red circle", steps=3, sampler=name, schedule_type="normal", convention="comfyui",
                          seed=5).latents for name in ("ddim", "euler")}
    assert torch.equal(latents["ddim"], latents["euler"])
    a1111 = {name: pipe("a red circle", steps=3, sampler=name, schedule_type="Automatic", seed=5).latents
             for name in ("ddim", "DDIM")}
    assert torch.equal(a1111["ddim"], a1111["DDIM"])


def test_pipeline_gives_comfyuis_ddim_its_inpainting_noise():
    """A ComfyUI inpainting request with ddim noises the kept region with rng.comfyui_inpaint_noise(seed): the first
    model input there is init + σ_0·that noise (init read off the result, which Euler's last step into σ = 0 leaves
    as the init where the mask is 0), where euler's is init + σ_0·the initial noise."""
    import numpy as np
    from PIL import Image
    from random_models import tiny_model

    from kedavra.pipeline.pipeline import Pipeline

    pipe = Pipeline(tiny_model(), dtype="fp32")
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    pixels = np.zeros((32, 32), np.uint8)
    pixels[:, 16:] = 255
    seed, noises = 9, {}
    for name in ("ddim", "euler"):
        records = []
        result = pipe("a red circle", steps=3, sampler=name, schedule_type="normal", convention="comfyui", seed=seed,
                      init_image=picture, mask=Image.fromarray(pixels), strength=1.0, callback=records.append)
        sigma = math.sqrt((1 - records[0].alpha_bar) / records[0].alpha_bar)
        x = records[0].x_t / math.sqrt(records[0].alpha_bar)  # the first input, VE view
        noises[name] = ((x - result.latents) / sigma)[..., :6]  # latent columns 0-5: mask 0 (bilinear, 16 wide)
    shape = tuple(result.latents.shape)
    assert relative(noises["ddim"], comfyui_inpaint_noise(seed, shape)[..., :6]) < 1e-5
    assert relative(noises["euler"], comfyui_noise(seed, shape)[..., :6]) < 1e-5


def test_names_resolve_and_unknown_names_list_them_all():
    for name in NEW_SAMPLERS + ("ddim",):
        spec, carried = resolve_k_sampler(name, "comfyui")
        assert spec.comfyui == name and spec.a1111 == "" and carried is None and not spec.ancestral
        assert name in k_sampler_names()
    assert resolve_k_sampler("IPNDM_V")[0].comfyui == "ipndm_v"  # case-insensitive, as every name here
    assert [s.comfyui for s in K_SAMPLERS if s.comfyui_discard_penultimate] == [
        "dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"]  # comfy/samplers.py DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    with pytest.raises(ValueError, match="unknown A1111 / ComfyUI sampler 'ipndm_w'; allowed: Euler,.*DDIM.*"
                                         "ipndm, ipndm_v, deis, uni_pc, uni_pc_bh2, ddim"):
        resolve_k_sampler("ipndm_w")


# --- the weights and the facts the docstrings state ------------------------------------------------------------------


def test_ipndm_v_weights_are_comfyuis():
    uniform = [10.0, 9.0, 8.0, 7.0, 6.0, 5.0]
    for order in (1, 2, 3):
        expected = [-weight for weight in ADAMS_BASHFORTH[order]]
        assert variable_step_weights(uniform, 4, order) == pytest.approx(expected, rel=1e-12)
    expected = [-57 / 24, 65 / 24, -43 / 24, 11 / 24]  # order 4 on a uniform grid: not Adams–Bashforth 4's
    assert variable_step_weights(uniform, 4, 4) == pytest.approx(expected, rel=1e-12)
    sigmas = [14.6, 9.1, 6.0, 3.7, 2.1, 1.0]  # docstring: order 3 exact for slopes linear in σ, not quadratic
    w = variable_step_weights(sigmas, 3, 3)
    nodes = [sigmas[3], sigmas[2], sigmas[1]]
    assert sum(wj * s for wj, s in zip(w, nodes, strict=True)) == pytest.approx((2.1**2 - 3.7**2) / 2, rel=1e-12)
    assert sum(wj * s**2 for wj, s in zip(w, nodes, strict=True)) != pytest.approx((2.1**3 - 3.7**3) / 3, rel=1e-2)
    w = variable_step_weights(sigmas, 4, 4)  # order 4's sum: h_0 (1 + b q (h_2/h_3 - h_1/h_2)), not h_0
    h = [sigmas[5 - k] - sigmas[4 - k] for k in range(4)]
    s1, s2 = h[0] + h[1], h[0] + h[1] + h[2]
    b = ((1 / 2 - h[0] / (6 * s1) + (1 - h[0] / (2 * s1)) * h[0] / (6 * s2))
         * h[0] * s1 * s2 / (h[1] * (h[1] + h[2]) * (h[1] + h[2] + h[3])))
    q = h[1] * (h[1] + h[2]) / (h[2] * (h[2] + h[3]))
    assert sum(w) == pytest.approx(h[0] * (1 + b * q * (h[2] / h[3] - h[1] / h[2])), rel=1e-12)
    assert sum(w) != pytest.approx(h[0], rel=1e-3)


def test_deis_time_and_weights():
    beta_d, beta_min = _vp_betas()  # the VP-SDE through EDM's σ range (Karras et al. 2022, Table 1)
    sigma = lambda t: math.sqrt(math.expm1(beta_d * t**2 / 2 + beta_min * t))  # noqa: E731
    assert sigma(1.0) == pytest.approx(EDM_SIGMA_MAX, rel=1e-12)
    assert sigma(EDM_VP_EPS) == pytest.approx(EDM_SIGMA_MIN, rel=1e-9)
    spec = resolve_k_sampler("deis")[0]
    sigmas = k_sigmas(spec, 12, SCHEDULES["sd"], "karras", "comfyui")[0].double().tolist()
    theirs = comfy_deis_coefficients(torch.tensor(sigmas, dtype=torch.float32), 3)
    exact = comfy_deis_coefficients(torch.tensor(sigmas, dtype=torch.float64), 3)
    for i in range(1, 11):
        w = deis_weights(sigmas, i, min(3, i + 1))
        step = abs(sigmas[i + 1] - sigmas[i])
        assert max(abs(a - b.item()) for a, b in zip(w, exact[i], strict=True)) < 1e-10 * step
        # ComfyUI's float32 weights (its log(1 + σ²) at σ ≈ 0.03 alone is 7e-5 off): 2.2e-5 of the step at most
        assert max(abs(a - b.item()) for a, b in zip(w, theirs[i], strict=True)) < 5e-5 * step
        assert sum(w) == pytest.approx(sigmas[i + 1] - sigmas[i], rel=1e-5)  # the Euler step, up to the quadrature
    assert deis_weights(sigmas, 0, 1) == [sigmas[1] - sigmas[0]]


@pytest.mark.parametrize("name", ["ipndm", "ipndm_v", "deis", "uni_pc", "uni_pc_bh2"])
def test_a_constant_denoiser_is_followed_exactly(name):
    """D(x; σ) = c solves the ODE exactly as x(σ) = c + (σ/σ_0)(x_0 - c): every multistep method whose weights sum
    to the step, and UniPC at any order (its differences D_k vanish), land on it; iPNDM-v's order-4 weights do not
    sum to the step on a non-uniform grid (`variable_step_weights`), DEIS's only up to its quadrature (3e-6 of
    the step)."""
    schedule = SCHEDULES["sd"]
    c = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    steps = 8
    states = []
    sample(Denoiser(lambda x_t, t: c.expand_as(x_t), "x0"), noise, sampler=name, steps=steps, schedule=schedule,
           schedule_type="karras", convention="comfyui", callback=lambda step: states.append(step.x.clone()))
    spec = resolve_k_sampler(name, "comfyui")[0]
    sigmas = k_sigmas(spec, steps, schedule, "karras", "comfyui")[0].double()
    if name.startswith("uni_pc"):
        sigmas[-1] = COMFYUI_UNIPC_LAST_LEVEL
    x_0 = noise * math.sqrt(1 + sigmas[0].item() ** 2)
    errors = [relative(x, c + sigmas[i + 1].item() / sigmas[0].item() * (x_0 - c)) for i, x in enumerate(states)]
    if name == "ipndm_v":
        assert max(errors[:3]) < 1e-6 and errors[3] > 1e-4  # order 4 from the fourth step on
    else:
        assert max(errors) < (5e-5 if name == "deis" else 1e-6), errors


def test_comfyui_unipc_is_kedavras_unipc_on_comfyuis_plan():
    """uni_pc = sample_unipc(order=3, "bh1") on the comfyui σ's (penultimate dropped) with the final 0 replaced by
    ComfyUI's 0.001 as its float32 evaluates it, from x_VE/√(1+σ_0²), returned as x_VP·√(1+σ_last²)."""
    schedule = SCHEDULES["sd"]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    for steps in (2, 3, 7):
        spec = resolve_k_sampler("uni_pc", "comfyui")[0]
        sigmas, table = k_sigmas(spec, steps, schedule, "normal", "comfyui")
        assert torch.equal(sigmas, comfy_sigmas("uni_pc", steps, schedule, "normal"))
        plan = comfyui_unipc_plan(plan_from_sigmas(sigmas, table))
        assert plan.sigmas[-1].item() == COMFYUI_UNIPC_LAST_LEVEL and plan.sigmas[-2].item() == sigmas[-2].item()
        start = noise * math.sqrt(1 + sigmas[0].item() ** 2)
        expected = {}
        for order in (3, min(3, steps - 1)):  # ComfyUI's order min(3, n-1): the same run for n >= 2
            x = sample_unipc(Denoiser(toy_model), start / math.sqrt(1 + plan.sigmas[0].item() ** 2), plan,
                             order=order, variant="bh1", lower_order_final=True)
            expected[order] = x * math.sqrt(1 + plan.sigmas[-1].item() ** 2)
        assert torch.equal(expected[3], expected[min(3, steps - 1)])
        out = sample(toy_model, noise, sampler="uni_pc", steps=steps, schedule=schedule, schedule_type="normal",
                     convention="comfyui")
        assert torch.equal(out, expected[3])


def test_comfyui_unipc_facts():
    # ComfyUI's float32 √(1-ᾱ) at σ = 0.001 is exactly 2⁻¹⁰ (1 - ᾱ rounds to 2⁻²⁰); the level kept here has it
    ns = SigmaConvert()
    sigma = torch.tensor(COMFYUI_UNIPC_FINAL_SIGMA, dtype=torch.float32)
    assert ns.std(sigma).item() == 2.0**-10
    level = COMFYUI_UNIPC_LAST_LEVEL
    assert level / math.sqrt(1 + level**2) == pytest.approx(2.0**-10, rel=1e-15)
    assert ns.lam(sigma).item() == pytest.approx(-math.log(level), rel=1e-7)
    # the first step's prediction (the state reported after step 0, before UniC corrects it) is DPM-Solver++(1),
    # which in the VE view is an Euler step in σ: x̂_0 + (σ_1/σ_0)(x_0 - x̂_0)
    schedule = SCHEDULES["sd"]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    records = []
    sample(toy_model, noise, sampler="uni_pc_bh2", steps=5, schedule=schedule, schedule_type="normal",
           convention="comfyui", callback=records.append)
    sigmas = comfy_sigmas("uni_pc_bh2", 5, schedule, "normal").double()
    x_0 = noise * math.sqrt(1 + sigmas[0].item() ** 2)
    euler = records[0].x0 + sigmas[1].item() / sigmas[0].item() * (x_0 - records[0].x0)
    assert relative(records[0].x, euler) < 1e-6


def test_comfyui_unipc_one_step_returns_the_start_rescaled():
    """At one step ComfyUI's UniPC runs at order min(3, 0) = 0 and takes no step (unipc_comfyui.py): the result is
    x_VE·√(1+σ_last²)/√(1+σ_0²), the unit noise itself at denoise 1; the model runs once, its x̂_0 reported."""
    from kedavra.diffusion.samplers.k_diffusion import prepare_k_run

    schedule = SCHEDULES["sd"]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9)).tanh()
    for name in ("uni_pc", "uni_pc_bh2"):
        for start_image, denoise in ((None, 1.0), (init, 0.5)):
            records, denoiser = [], Denoiser(toy_model)
            out = sample(denoiser, noise, sampler=name, steps=1, schedule=schedule, schedule_type="normal",
                         convention="comfyui", init=start_image, strength=denoise, callback=records.append)
            run = prepare_k_run(name, noise, 1, schedule, "normal", "comfyui", start_image, denoise)
            sigma_0 = run.plan.sigmas[0].item()
            expected = run.start * math.sqrt(1 + COMFYUI_UNIPC_LAST_LEVEL**2) / math.sqrt(1 + sigma_0**2)
            assert relative(out, expected) < 1e-7
            assert denoiser.evaluations == 1 and len(records) == 1 and torch.equal(records[0].x, out)
            if start_image is None:
                assert relative(out, noise) < 1e-6


def test_comfyui_unipc_callback_sees_and_replaces_the_ve_state():
    schedule = SCHEDULES["sd"]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    run = {"steps": 6, "schedule": schedule, "schedule_type": "karras", "convention": "comfyui"}
    records = []
    out = sample(toy_model, noise, sampler="uni_pc", callback=records.append, **run)
    assert torch.equal(records[-1].x, out)  # the last state reported is the result, in the VE view
    same = sample(toy_model, noise, sampler="uni_pc", callback=lambda step: step.x.clone(), **run)
    assert relative(same, out) < 1e-6  # handing the state back (VE -> VP) changes nothing but rounding
    halved = sample(toy_model, noise, sampler="uni_pc", callback=lambda step: step.x / 2 if step.index == 5 else None,
                    **run)
    assert relative(halved, out / 2) < 1e-6
