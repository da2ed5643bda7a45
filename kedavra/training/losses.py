"""The two training objectives, the KL autoencoder's and the diffusion model's: modules whose forward returns the
per-sample loss, {"loss": (B,), ...} with the parts a stage logs beside it, so the caller takes the batch mean (and
DistributedDataParallel, wrapping an objective, averages the gradients of every trained part).

VAE (Rombach et al. 2022, sec. 3.1 and ldm/modules/losses/contperceptual.py without its LPIPS and GAN terms):
    L = ( Σ_pixels |x - D(z)|  +  β · KL(q(z|x) || N(0, I)) ) / D,    z = μ + σ·ε
with D = 3·H·W, so the first term is the mean absolute error per pixel value and β has LDM's meaning (a weight
against the reconstruction error summed over the image). "mse" squares the error instead of |·|.
The perceptual (LPIPS) and adversarial terms are left out: LPIPS needs pretrained VGG weights, which kedavra
does not download, and at 32 px on flat-coloured shapes the L1 reconstructions are already sharp
(docs/training.md has the measurements).

Diffusion (Ho et al. 2020, eq. 14, "L_simple", with the target of the chosen parameterisation):
    L = w_t · mean_pixels (f(x_t, t, c) - target)²,   x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε   (DDPM eq. 4)
    target = ε, or v = √ᾱ_t ε - √(1-ᾱ_t) x_0 (Salimans and Ho 2022, eq. 6; forward_process.training_target)
with w_t = 1, or min-SNR-γ (Hang et al. 2023, sec. 3.4): w_t = min(SNR_t, γ)/SNR_t for ε and
min(SNR_t, γ)/(SNR_t + 1) for v, both written through ᾱ_t (SNR = ᾱ/(1-ᾱ)) so they stay finite at SNR 0:
    ε:  min(SNR, γ)/SNR       = γ(1-ᾱ) / max(ᾱ, γ(1-ᾱ))     (1 where SNR < γ, including SNR = 0)
    v:  min(SNR, γ)/(SNR + 1) = min(ᾱ, γ(1-ᾱ))              (0 at SNR = 0, where the paper's formula is 0 too)
min-SNR-γ weighs the x_0 error by min(SNR, γ): at the high noise levels where an image's layout is decided (SNR of
0.005 to 0.1 on SD's schedule) it counts 10 to 200 times less than at SNR 1. A floor F (`min_snr_floor`) keeps it at
least F there, the x_0 weight max(min(SNR, γ), F): with F = 1 it is Salimans and Ho's (2022, sec. 4) truncated SNR
weighting max(SNR, 1) below SNR 1, min-SNR-γ above. For v (the only parameterisation it is offered for: the ε weight
F/SNR would be unbounded at SNR 0):
    v:  max(min(SNR, γ), F)/(SNR + 1) = max(min(ᾱ, γ(1-ᾱ)), F(1-ᾱ))     (F at SNR = 0)

The layout term (`layout_weight` λ, `layout_grid` G) adds, at every noise level, the error of the predicted x̂_0
averaged over a G x G grid of the latent (the coarse layout: where which colour is), with x_0 weight λ:
    L_layout = λ · mean_(cells, channels) (pool_G(x̂_0) - pool_G(x_0))²,    x̂_0 from the prediction (DDIM eq. 9)
The pooled error is the one that tells a layout drawn by the prompt's words ("on the left", "above") from one drawn
anywhere, and at high noise (SNR 0.005 to 0.1) it is where the words carry what x_t does not show; min-SNR-γ counts
it there 10 to 200 times less than at SNR 1. Weighting only G² cells' means, not every value as the floor does,
leaves the detail steps' objective as it was. It is the multiscale loss of Hoogeboom et al. 2023 ("simple
diffusion", sec. 3.3: the loss of the prediction downsampled), kept at one coarse scale and weighed in x_0.
For ε prediction x̂_0 = (x_t - √(1-ᾱ) ε̂)/√ᾱ needs ᾱ > 0: a zero-terminal-SNR schedule takes v.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kedavra.diffusion.forward_process import add_noise, to_x0_eps, training_target
from kedavra.networks.vae import AutoencoderKL, DiagonalGaussian


def min_snr_weight(alpha_bar: Tensor, gamma: float, prediction_type: str, floor: float | None = None) -> Tensor:
    """Per-sample loss weights of min-SNR-γ (Hang et al. 2023, sec. 3.4) for ᾱ_t of shape (B,), with the x_0 weight
    kept at least `floor` where given (v only; module docstring).

    The closed forms in ᾱ (module docstring) divide only by max(ᾱ, γ(1-ᾱ)) >= γ/(1+γ) > 0, so every ᾱ in
    [0, 1] gives a finite weight, a zero-terminal-SNR step (ᾱ = 0, SNR = 0) included.
    """
    noise_part = gamma * (1 - alpha_bar)  # γ(1-ᾱ) = γ·ᾱ/SNR
    if floor is not None and prediction_type != "v":
        raise ValueError(f"a min-SNR floor is defined for 'v' prediction (the 'eps' weight floor/SNR is unbounded at "
                         f"SNR 0), got prediction type {prediction_type!r}")
    if prediction_type == "eps":
        return noise_part / torch.maximum(alpha_bar, noise_part)  # min(SNR, γ)/SNR
    if prediction_type == "v":
        weights = torch.minimum(alpha_bar, noise_part)  # min(SNR, γ)/(SNR + 1), as SNR + 1 = 1/(1-ᾱ)
        return weights if floor is None else torch.maximum(weights, floor * (1 - alpha_bar))  # F/(SNR + 1)
    raise ValueError(f"min-SNR weighting is defined for 'eps' and 'v' prediction, got {prediction_type!r}")


def diffusion_loss(prediction: Tensor, target: Tensor, weights: Tensor | None) -> Tensor:
    """Per-sample weighted MSE (B,): mean over each sample's values, times its weight (None: 1), in fp32."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)  # (B,)
    return per_sample if weights is None else per_sample * weights  # w_t · L_simple, DDPM eq. 14


class VAEObjective(nn.Module):
    """The VAE with its loss: forward(images, noise) -> per-sample {"loss", "recon", "kl"}, each (B,).

    images (B, 3, H, W) in [-1, 1]; `noise` (the ε of z = μ + σ·ε, shaped like the latents) is drawn by the caller
    from its generator, so the posterior sample is reproducible and a batch split over processes draws the same
    numbers. "recon" is the reconstruction error per pixel value, "kl" the KL summed over the latent values.
    """

    def __init__(self, vae: AutoencoderKL, recon_loss: str, kl_weight: float):
        super().__init__()
        self.vae = vae
        self.recon_loss = recon_loss
        self.kl_weight = kl_weight

    def forward(self, images: Tensor, noise: Tensor) -> dict[str, Tensor]:
        posterior = self.vae.encode(images)
        z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)  # Kingma and Welling 2014, eq. 10
        reconstruction = self.vae.decode(z).float()
        error = reconstruction - images.float()
        per_value = error.abs() if self.recon_loss == "l1" else error.square()
        recon = per_value.flatten(1).mean(dim=1)  # (B,) mean over the D = 3·H·W values
        kl = _float_posterior(posterior).kl()  # (B,) summed over latent values, Kingma and Welling 2014, App. B
        values = images[0].numel()
        return {"loss": recon + self.kl_weight * kl / values, "recon": recon, "kl": kl}


class DiffusionObjective(nn.Module):
    """A denoiser with the diffusion loss: forward(x0, noise, t, **conditioning) -> per-sample {"loss": (B,)}.

    x0 (B, C, h, w) the clean (scaled) latents, noise ε shaped like them and t (B,) integer timesteps in
    [0, T) are drawn by the caller from its generator; conditioning: the denoiser's keyword arguments, input_ids
    (B, L) the captions' token ids (SDXL: also input_ids_2 and time_ids, kedavra.training.conditioning).
    denoiser(x_t, t, **conditioning) predicts `prediction_type` ("eps" or "v") from x_t; `alpha_bar` (T,) is ᾱ_t of
    the model's schedule. min_snr_gamma: γ of the min-SNR-γ weights (Hang et al. 2023), None for w_t = 1;
    min_snr_floor: the least x_0 weight at high noise (v only, module docstring), None for none.
    layout_weight, layout_grid: λ and G of the layout term (module docstring), None for none; the per-sample
    "layout" part is returned beside "loss" when it is on.
    """

    def __init__(self, denoiser: nn.Module, alpha_bar: Tensor, prediction_type: str, min_snr_gamma: float | None,
                 min_snr_floor: float | None = None, layout_weight: float | None = None, layout_grid: int = 4):
        super().__init__()
        if layout_weight is not None and prediction_type == "eps" and float(alpha_bar.min()) <= 0:
            raise ValueError("the layout loss reads x̂_0 = (x_t - √(1-ᾱ) ε̂)/√ᾱ, undefined where ᾱ = 0: this schedule "
                             "has zero terminal SNR, so train it with v prediction (--prediction-type v)")
        self.layout_weight = layout_weight
        self.layout_grid = layout_grid
        self.denoiser = denoiser
        self.alpha_bar = alpha_bar.float()  # (T,) ᾱ_t, DDPM eq. 4; a plain tensor, not a buffer DDP would broadcast
        self.prediction_type = prediction_type
        self.min_snr_gamma = min_snr_gamma
        self.min_snr_floor = min_snr_floor

    def forward(self, x0: Tensor, noise: Tensor, t: Tensor, **conditioning: Tensor) -> dict[str, Tensor]:
        alpha_bar = self.alpha_bar.to(t.device)[t]  # (B,)
        x_t = add_noise(x0, noise, alpha_bar)  # DDPM eq. 4
        target = training_target(noise, x0, alpha_bar, self.prediction_type)  # ε, or v (Salimans and Ho 2022, eq. 6)
        prediction = self.denoiser(x_t, t, **conditioning)  # (B, C, h, w)
        gamma = self.min_snr_gamma
        weights = (min_snr_weight(alpha_bar, gamma, self.prediction_type, self.min_snr_floor)
                   if gamma is not None else None)  # (B,)
        loss = diffusion_loss(prediction, target, weights)  # DDPM eq. 14, weighted per sample
        if self.layout_weight is None:
            return {"loss": loss}
        layout = self.layout_weight * layout_error(prediction, x_t, x0, alpha_bar, self.prediction_type,
                                                   self.layout_grid)
        return {"loss": loss + layout, "layout": layout.detach()}


def layout_error(prediction: Tensor, x_t: Tensor, x0: Tensor, alpha_bar: Tensor, prediction_type: str,
                 grid: int) -> Tensor:
    """(B,) mean squared error of x̂_0 against x_0, both averaged over a grid x grid partition of the latent
    (adaptive average pooling), in fp32: the layout term of the module docstring without its weight."""
    x0_hat, _ = to_x0_eps(prediction.float(), x_t.float(), alpha_bar.float(), prediction_type)  # DDIM eq. 9
    pooled_hat = F.adaptive_avg_pool2d(x0_hat, grid)  # (B, C, grid, grid)
    pooled = F.adaptive_avg_pool2d(x0.float(), grid)
    return (pooled_hat - pooled).square().flatten(1).mean(dim=1)


def _float_posterior(posterior: DiagonalGaussian) -> DiagonalGaussian:
    """The posterior with its moments in fp32, so the KL sum is not taken in bf16 under autocast."""
    return DiagonalGaussian(torch.cat([posterior.mean.float(), posterior.logvar.float()], dim=1))
