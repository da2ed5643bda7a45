"""The two training objectives: the KL autoencoder's and the diffusion model's.

VAE (Rombach et al. 2022, sec. 3.1 and ldm/modules/losses/contperceptual.py without its LPIPS and GAN terms):
    L = ( Σ_pixels |x - D(z)|  +  β · KL(q(z|x) || N(0, I)) ) / D,    z = μ + σ·ε
with D = 3·H·W, so the first term is the mean absolute error per pixel value and β has LDM's meaning (a weight
against the reconstruction error summed over the image). "mse" squares the error instead of |·|.
The perceptual (LPIPS) and adversarial terms are left out: LPIPS needs pretrained VGG weights, which kedavra
does not download, and at 32 px on flat-coloured shapes the L1 reconstructions are already sharp
(docs/training.md has the measurements).

Diffusion (Ho et al. 2020, eq. 14, "L_simple", with the target of the chosen parameterisation):
    L = w_t · mean_pixels (f(x_t, t, c) - target)²,   target = ε or v (forward_process.training_target)
with w_t = 1, or min-SNR-γ (Hang et al. 2023, sec. 3.4): w_t = min(SNR_t, γ)/SNR_t for ε and
min(SNR_t, γ)/(SNR_t + 1) for v, both written through ᾱ_t (SNR = ᾱ/(1-ᾱ)) so they stay finite at SNR 0:
    ε:  min(SNR, γ)/SNR       = γ(1-ᾱ) / max(ᾱ, γ(1-ᾱ))     (1 where SNR < γ, including SNR = 0)
    v:  min(SNR, γ)/(SNR + 1) = min(ᾱ, γ(1-ᾱ))              (0 at SNR = 0, where the paper's formula is 0 too)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kedavra.networks.vae import AutoencoderKL, DiagonalGaussian


def min_snr_weight(alpha_bar: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Per-sample loss weights of min-SNR-γ (Hang et al. 2023, sec. 3.4) for ᾱ_t of shape (B,).

    The closed forms in ᾱ (module docstring) divide only by max(ᾱ, γ(1-ᾱ)) >= γ/(1+γ) > 0, so every ᾱ in
    [0, 1] gives a finite weight, a zero-terminal-SNR step (ᾱ = 0, SNR = 0) included.
    """
    noise_part = gamma * (1 - alpha_bar)  # γ(1-ᾱ) = γ·ᾱ/SNR
    if prediction_type == "eps":
        return noise_part / torch.maximum(alpha_bar, noise_part)  # min(SNR, γ)/SNR
    if prediction_type == "v":
        return torch.minimum(alpha_bar, noise_part)  # min(SNR, γ)/(SNR + 1), as SNR + 1 = 1/(1-ᾱ)
    raise ValueError(f"min-SNR weighting is defined for 'eps' and 'v' prediction, got {prediction_type!r}")


def diffusion_loss(prediction: Tensor, target: Tensor, weights: Tensor | None) -> Tensor:
    """Per-sample weighted MSE (B,): mean over each sample's values, times its weight (DDPM eq. 14)."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)  # (B,)
    return per_sample if weights is None else per_sample * weights


class VAEObjective(nn.Module):
    """The VAE with its loss: forward(images, noise) -> per-sample (loss, reconstruction error, KL), each (B,).

    `noise` (the ε of z = μ + σ·ε, shaped like the latents) is drawn by the caller from its generator, so the
    posterior sample is reproducible and a batch split over processes draws the same numbers.
    """

    def __init__(self, vae: AutoencoderKL, recon_loss: str, kl_weight: float):
        super().__init__()
        self.vae = vae
        self.recon_loss = recon_loss
        self.kl_weight = kl_weight

    def forward(self, images: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        posterior = self.vae.encode(images)
        z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)  # Kingma and Welling 2014, eq. 10
        reconstruction = self.vae.decode(z).float()
        error = reconstruction - images.float()
        per_value = error.abs() if self.recon_loss == "l1" else error.square()
        recon = per_value.flatten(1).mean(dim=1)  # (B,) mean over the D = 3·H·W values
        kl = _float_posterior(posterior).kl()  # (B,) summed over latent values, Kingma and Welling 2014, App. B
        values = images[0].numel()
        return recon + self.kl_weight * kl / values, recon, kl


CONTEXT_CACHE_BYTES = 2 * 2**30  # a frozen text encoder's outputs kept for repeated captions, at most this much


class DiffusionObjective(nn.Module):
    """The text encoder and the U-Net, trained together: forward(x_t, t, input_ids) -> the U-Net's prediction.

    One module so that one DistributedDataParallel wrapper averages the gradients of both. A frozen text encoder
    (no parameter requiring grad: MiniLM, or --freeze-text-encoder) runs without autograd, one caption at a time,
    and its output per caption is kept (up to CONTEXT_CACHE_BYTES) since captions repeat: the same numbers as
    running it again, however the batches fall, so a resumed run stays bitwise equal to an uninterrupted one.
    """

    def __init__(self, text_encoder: nn.Module, unet: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder
        self.unet = unet
        self.contexts: dict[bytes, Tensor] = {}
        self.cached_bytes = 0

    def forward(self, x_t: Tensor, t: Tensor, input_ids: Tensor) -> Tensor:
        if any(p.requires_grad for p in self.text_encoder.parameters()):
            context = self.text_encoder(input_ids)  # (B, L, D)
        else:
            context = torch.stack([self._frozen_context(row) for row in input_ids])  # (B, L, D)
        return self.unet(x_t, t, context)  # (B, C, h, w)

    @torch.no_grad()
    def _frozen_context(self, ids: Tensor) -> Tensor:
        """(L,) ids -> (L, D) hidden states of the frozen text encoder, from the cache where possible."""
        key = ids.cpu().numpy().tobytes()
        if key in self.contexts:
            return self.contexts[key]
        context = self.text_encoder(ids[None])[0]  # (L, D)
        size = context.numel() * context.element_size()
        if self.cached_bytes + size <= CONTEXT_CACHE_BYTES:
            self.contexts[key] = context
            self.cached_bytes += size
        return context


def _float_posterior(posterior: DiagonalGaussian) -> DiagonalGaussian:
    """The posterior with its moments in fp32, so the KL sum is not taken in bf16 under autocast."""
    return DiagonalGaussian(torch.cat([posterior.mean.float(), posterior.logvar.float()], dim=1))
